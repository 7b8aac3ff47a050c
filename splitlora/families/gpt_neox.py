"""GPT-NeoX (Pythia): q, k, v fused into `query_key_value`, a partial rotary table, LayerNorms with
biases, an untied head, blocks that take their KV cache as `layer_past`, and (by default) a
parallel residual: the MLP reads the block's input, not the attention's output — which the cost model's
stages say (two branches), since it changes which input gradients backward computes."""

from __future__ import annotations

from transformers import GPTNeoXConfig

from .base import Family


class GPTNeoX(Family):
    def embed(self, config, mods, input_ids, position_ids):
        return mods["emb_dropout"](mods["embed_in"](input_ids))

    def head(self, config, mods, hidden):
        return mods["lm_head"](mods["final_layer_norm"](hidden))

    def stored(self, name, keys):
        """Checkpoints keep the head under its original name, `embed_out`."""
        return (["embed_out.weight"], lambda t: t[0]) if name == "lm_head.weight" else None

    def stages_for(self, config):
        if config.use_parallel_residual:   # (branch, level): the MLP branch does not read the attention's
            return {"attention.query_key_value": (0, 0), "attention.dense": (0, 1),
                    "mlp.dense_h_to_4h": (1, 0), "mlp.dense_4h_to_h": (1, 1)}
        return {"attention.query_key_value": 0, "attention.dense": 1, "mlp.dense_h_to_4h": 2, "mlp.dense_4h_to_h": 3}


FAMILIES = [
    GPTNeoX("gpt_neox", lambda v: GPTNeoXConfig(
        vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=256, hidden_dropout=0.1, use_parallel_residual=True, tie_word_embeddings=False,
        bos_token_id=v - 2, eos_token_id=v - 2, pad_token_id=v - 1),
        paths={"embed_in": "gpt_neox.embed_in", "emb_dropout": "gpt_neox.emb_dropout",
               "rotary_emb": "gpt_neox.rotary_emb", "blocks": "gpt_neox.layers",
               "final_layer_norm": "gpt_neox.final_layer_norm", "lm_head": "lm_head"},
        embed_modules=("embed_in", "emb_dropout"), head_modules=("final_layer_norm", "lm_head"),
        norm="final_layer_norm", embed_key="embed_in", targets=("query_key_value",),
        qkv=("attention.query_key_value",) * 3, cache_kw="layer_past"),
]
