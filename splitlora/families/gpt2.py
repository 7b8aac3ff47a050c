"""GPT-2: learned positions added once to the token embeddings (on the client), Conv1D linear layers
([in, out] weights), q, k, v fused into `c_attn`."""

from __future__ import annotations

from transformers import GPT2Config

from .base import Family


class GPT2(Family):
    def embed(self, config, mods, input_ids, position_ids):
        return mods["drop"](mods["wte"](input_ids) + mods["wpe"](position_ids))

    def extra(self, config, mods, hidden, position_ids):
        return {"position_ids": position_ids}

    def block(self, config, block, hidden, mask, ctx, i):
        cache = ctx["cache"]
        return block(hidden, attention_mask=mask, encoder_hidden_states=None, encoder_attention_mask=None,
                     use_cache=cache is not None, position_ids=ctx["position_ids"], **{self.cache_kw: cache})

    def head(self, config, mods, hidden):
        return mods["lm_head"](mods["ln_f"](hidden))


FAMILIES = [
    GPT2("gpt2", lambda v: GPT2Config(vocab_size=v, n_positions=256, n_embd=64, n_layer=4, n_head=4,
                                      bos_token_id=v - 2, eos_token_id=v - 2),
         paths={"wte": "transformer.wte", "wpe": "transformer.wpe", "drop": "transformer.drop",
                "blocks": "transformer.h", "ln_f": "transformer.ln_f", "lm_head": "lm_head"},
         embed_modules=("wte", "wpe", "drop"), head_modules=("ln_f", "lm_head"), norm="ln_f", embed_key="wte",
         targets=("c_attn",), conv1d=True, qkv=("attn.c_attn",) * 3,
         stages={"attn.c_attn": 0, "attn.c_proj": 1, "mlp.c_fc": 2, "mlp.c_proj": 3}),
]
