"""Mixture-of-experts rotary decoders: Mixtral, Qwen2-MoE (with a shared expert), Qwen3-MoE.

LoRA goes on attention (the default targets); the experts stay frozen. The experts' weights are 3-D
tensors and the router a bare weight, not nn.Linear: `routed` tells the cost model what they compute
(each token passes the router once and `num_experts_per_tok` experts).
"""

from __future__ import annotations

import re

import torch
from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from .base import LLAMA_STAGES, Family
from .llama import SMALL, _ids

MOE_STAGES = {**LLAMA_STAGES,   # the dense MLP of a layer without experts (mlp_only_layers), and:
              "mlp.gate": 2, "mlp.experts.gate_up_proj": 2, "mlp.experts.down_proj": 3,
              "mlp.shared_expert.gate_proj": 2, "mlp.shared_expert.up_proj": 2, "mlp.shared_expert.down_proj": 3,
              "mlp.shared_expert_gate": 2}


class MoE(Family):
    stages = MOE_STAGES
    stored_mlp = "mlp"                                    # where checkpoints keep the MoE block, and
    stored_experts = ("gate_proj", "up_proj", "down_proj")   # each expert's weights, in the original layout

    def stored(self, name, keys):
        """Checkpoints keep each expert's 2-D weights (and Mixtral's router under `block_sparse_moe`);
        the model holds one 3-D tensor per projection: gate and up concatenated, experts stacked."""
        m = re.fullmatch(r"(.*\.)mlp\.(gate\.weight|experts\.gate_up_proj|experts\.down_proj)", name)
        if m is None:
            return None
        prefix, what = m.group(1) + self.stored_mlp, m.group(2)
        if what == "gate.weight":
            return [f"{prefix}.gate.weight"], lambda t: t[0]
        gate, up, down = self.stored_experts
        n = sum(1 for k in keys if re.fullmatch(rf"{re.escape(prefix)}\.experts\.\d+\.{gate}\.weight", k))
        if what == "experts.down_proj":
            return [f"{prefix}.experts.{e}.{down}.weight" for e in range(n)], torch.stack
        wanted = [f"{prefix}.experts.{e}.{w}.weight" for e in range(n) for w in (gate, up)]
        return wanted, lambda t: torch.stack([torch.cat(t[i:i + 2]) for i in range(0, len(t), 2)])

    def routed(self, config, block):
        mlp = getattr(block, "mlp", None)
        if mlp is None or not hasattr(mlp, "experts"):
            return []     # a dense layer of a model with some (mlp_only_layers)
        e = mlp.experts
        k = config.num_experts_per_tok
        (_, two_i, hidden), (_, _, inter) = e.gate_up_proj.shape, e.down_proj.shape
        return [("mlp.gate", hidden, mlp.gate.weight.shape[0], 1),
                ("mlp.experts.gate_up_proj", hidden, two_i, k),
                ("mlp.experts.down_proj", inter, hidden, k)]


MOE = dict(num_local_experts=4, num_experts_per_tok=2)
FAMILIES = [
    MoE("mixtral", lambda v: MixtralConfig(**_ids(v), **SMALL, **MOE, sliding_window=None, tie_word_embeddings=False),
        stored_mlp="block_sparse_moe", stored_experts=("w1", "w3", "w2")),
    MoE("qwen2_moe", lambda v: Qwen2MoeConfig(
        **_ids(v), **SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, qkv_bias=True, tie_word_embeddings=False)),
    MoE("qwen3_moe", lambda v: Qwen3MoeConfig(
        **_ids(v), **SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        head_dim=8, mlp_only_layers=[1], tie_word_embeddings=True)),
]
