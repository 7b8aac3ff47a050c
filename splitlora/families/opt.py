"""OPT: learned positions offset by 2 and computed from the attention mask (so right padding does not
shift them), optional projections in (after the token embedding) and out (before the tied LM head)
when `word_embed_proj_dim` differs from the hidden size, and no rotary table."""

from __future__ import annotations

import torch
from transformers import OPTConfig

from .base import Family


class OPT(Family):
    def positions(self, x, attention_mask):
        return (torch.cumsum(attention_mask, dim=1) * attention_mask - 1).long()

    def embed(self, config, mods, input_ids, position_ids):
        h = mods["embed_tokens"](input_ids)
        if "project_in" in mods:
            h = mods["project_in"](h)
        return h + mods["embed_positions"](None, 0, position_ids=position_ids).to(h.dtype)

    def extra(self, config, mods, hidden, position_ids):
        return {"position_ids": position_ids}

    def block(self, config, block, hidden, mask, ctx, i):
        return block(hidden, attention_mask=mask, position_ids=ctx["position_ids"],
                     use_cache=ctx["cache"] is not None, **{self.cache_kw: ctx["cache"]})

    def head(self, config, mods, hidden):
        for key in ("final_layer_norm", "project_out"):
            if key in mods:
                hidden = mods[key](hidden)
        return mods["lm_head"](hidden)


FAMILIES = [
    OPT("opt", lambda v: OPTConfig(vocab_size=v, hidden_size=32, ffn_dim=64, num_hidden_layers=4,
                                   num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=16,
                                   dropout=0.1, bos_token_id=v - 2, eos_token_id=v - 2, pad_token_id=v - 1),
        paths={"embed_tokens": "model.decoder.embed_tokens", "embed_positions": "model.decoder.embed_positions",
               "project_in": "model.decoder.project_in", "blocks": "model.decoder.layers",
               "final_layer_norm": "model.decoder.final_layer_norm", "project_out": "model.decoder.project_out",
               "lm_head": "lm_head"},
        embed_modules=("embed_tokens", "embed_positions", "project_in"),
        head_modules=("final_layer_norm", "project_out", "lm_head"), norm="final_layer_norm",
        qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        stages={"self_attn.q_proj": 0, "self_attn.k_proj": 0, "self_attn.v_proj": 0, "self_attn.out_proj": 1,
                "fc1": 2, "fc2": 3}),
]
