"""A model family: everything splitlora knows about one transformers architecture, in one object.

The default is the rotary decoder most families share (Llama's layout: `model.embed_tokens`,
`model.rotary_emb`, `model.layers`, `model.norm`, `lm_head`); a family overrides only what its own
forward does differently. The split parts call the transformers modules themselves, the way the
model's forward calls them, so a split model computes what the unsplit one computes.
"""

from __future__ import annotations

import inspect
import re
from typing import Callable

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

# The keyword under which transformers passes a KV cache to masks, blocks and model outputs: `cache` since
# 5.24, `past_key_values` before (still accepted there, with a deprecation warning). Read from the library
# itself, in this one place, so a part calls the blocks exactly as the installed model's forward does.
CACHE_KW = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"

LLAMA_STAGES = {"self_attn.q_proj": 0, "self_attn.k_proj": 0, "self_attn.v_proj": 0, "self_attn.o_proj": 1,
                "mlp.gate_proj": 2, "mlp.up_proj": 2, "mlp.down_proj": 3}


class Family:
    """One architecture. Class attributes are its facts; methods are how its forward uses its modules.

    paths: a part's module keys -> where they live in the causal LM ("blocks" among them); a path the
        model leaves as None (OPT without projections) is simply absent.
    embed_modules / head_modules: keys only the first / the last part holds (the rest go to every part).
    norm / lm_head / embed_key: the keys of the final norm, the output projection, the token embedding.
    targets: default LoRA target modules (attention query and value, or the fused module holding them).
    stages: linear layer name within a block -> where it reads from (0: the block's normed input, then
        the attention products; 1: the attention output projection; 2: the normed residual; 3: the MLP's
        output projection), for the cost model; `qkv`: the layers that make queries, keys and values.
    conv1d: the linear layers are GPT-2's Conv1D ([in, out] weights: PEFT's fan_in_fan_out).
    tiny: a tiny random config of this family (vocab_size -> config), for tests and `tiny-NAME` presets.
    """

    name: str = ""   # the transformers model type
    paths: dict[str, str] = {"embed_tokens": "model.embed_tokens", "rotary_emb": "model.rotary_emb",
                             "blocks": "model.layers", "norm": "model.norm", "lm_head": "lm_head"}
    embed_modules: tuple[str, ...] = ("embed_tokens",)
    head_modules: tuple[str, ...] = ("norm", "lm_head")
    norm, lm_head, embed_key = "norm", "lm_head", "embed_tokens"
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    stages: dict[str, int] = LLAMA_STAGES
    qkv: tuple[str, str, str] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    conv1d: bool = False
    cache_kw: str = CACHE_KW        # the keyword a block takes its KV cache by
    rotary_by_layer_type: bool = False   # one rotary table per kind of layer (sliding / full attention)
    tiny: Callable = None

    def __init__(self, name: str, tiny: Callable, **facts):
        self.name, self.tiny = name, tiny
        for k, v in facts.items():
            if not hasattr(type(self), k):
                raise TypeError(f"family {name}: unknown fact {k!r}")
            setattr(self, k, v)

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # -- where things are ---------------------------------------------------------------------------

    def modules(self, hf) -> dict[str, nn.Module]:
        """Module key -> the causal LM's module (those the model has; "blocks" is the ModuleList)."""
        found = {}
        for key, path in self.paths.items():
            mod = hf
            for attr in path.split("."):
                mod = getattr(mod, attr, None)
            if mod is not None:
                found[key] = mod
        return found

    def block_index(self, key: str) -> int | None:
        """The block a parameter or adapter key belongs to (None: not in a block)."""
        m = re.search(rf"(?:^|\.){re.escape(self.paths['blocks'])}\.(\d+)\.", key)
        return int(m.group(1)) if m else None

    def stored(self, name: str, keys) -> tuple[list[str], Callable] | None:
        """How a checkpoint in the architecture's original layout stores parameter `name`, when no key of
        `keys` is its name: (the keys to read, a function of their tensors giving the parameter)."""
        return None

    def stages_for(self, config) -> dict:
        """`stages` for this config: a level, or (branch, level) where a block has parallel branches."""
        return self.stages

    def routed(self, config, block: nn.Module) -> list[tuple[str, int, int, int]]:
        """Linear maps a block computes outside nn.Linear (a router, 3-D expert weights): (name, in, out,
        times per token). None in a dense family."""
        return []

    # -- how the model's forward calls them -----------------------------------------------------------

    def positions(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Position ids of a training batch (right padding), as the model computes them when given none."""
        return torch.arange(x.shape[1], device=x.device).unsqueeze(0)

    def embed(self, config, mods, input_ids, position_ids) -> torch.Tensor:
        return mods["embed_tokens"](input_ids)

    def extra(self, config, mods, hidden, position_ids) -> dict:
        """What every block of a part shares (rotary tables), computed once per part."""
        rotary = mods["rotary_emb"]
        if self.rotary_by_layer_type:
            tables = {t: rotary(hidden, position_ids, t) for t in sorted(set(config.layer_types))}
        else:
            tables = rotary(hidden, position_ids)
        return {"position_ids": position_ids, "position_embeddings": tables}

    def block(self, config, block, hidden, mask, ctx, i: int) -> torch.Tensor:
        tables = ctx["position_embeddings"]
        return block(hidden, attention_mask=mask, position_ids=ctx["position_ids"],
                     position_embeddings=tables[config.layer_types[i]] if self.rotary_by_layer_type else tables,
                     use_cache=ctx["cache"] is not None, **{self.cache_kw: ctx["cache"]})

    def head(self, config, mods, hidden) -> torch.Tensor:
        return mods["lm_head"](mods["norm"](hidden))

    def masks(self, config, hidden, attention_mask, position_ids, cache=None, layers=range(0)):
        """Per-layer masks exactly as the model's forward builds them (full, sliding, or by layer_types).

        With a KV cache, each mask is sized against the first of `layers` of its kind: a part's own cache
        layers, which (unlike the other part's) have not yet seen the current tokens.
        """
        layer_types = getattr(config, "layer_types", None)

        def first(kind):
            return next((i for i in layers if layer_types is None or layer_types[i] == kind), None)

        kw = dict(config=config, inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids,
                  **{CACHE_KW: cache})
        full = create_causal_mask(**kw, layer_idx=first("full_attention") if cache is not None else None)
        sliding_needed = getattr(config, "sliding_window", None) and (
            layer_types is None or "sliding_attention" in layer_types)
        sliding = None
        if sliding_needed:
            sliding = create_sliding_window_causal_mask(
                **kw, layer_idx=first("sliding_attention") if cache is not None else None)
        if layer_types:
            return lambda i: full if layer_types[i] == "full_attention" else sliding
        return lambda i: sliding if sliding is not None else full
