"""Gemma, Gemma 2, Gemma 3 (text). Their embedding module multiplies by √hidden itself; Gemma 2 and 3
soft-cap the logits (the head here does, as their causal LM's forward does) and the attention scores
(inside their blocks), and mix sliding-window and full-attention layers; Gemma 3 has a rotary table per
kind of layer and no logit soft-capping by default (the tiny config sets it, to test the head)."""

from __future__ import annotations

import torch
from transformers import Gemma2Config, Gemma3TextConfig, GemmaConfig

from .base import Family
from .llama import SMALL, _ids

MIXED = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


class Gemma(Family):
    def head(self, config, mods, hidden):
        logits = mods["lm_head"](mods["norm"](hidden))
        cap = getattr(config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


GEMMA = dict(head_dim=16, tie_word_embeddings=True)
FAMILIES = [
    Gemma("gemma", lambda v: GemmaConfig(**_ids(v), **SMALL, **GEMMA)),
    Gemma("gemma2", lambda v: Gemma2Config(**_ids(v), **SMALL, **GEMMA, sliding_window=4, layer_types=MIXED,
                                          final_logit_softcapping=3.0, attn_logit_softcapping=5.0)),
    Gemma("gemma3_text", lambda v: Gemma3TextConfig(**_ids(v), **SMALL, **GEMMA, sliding_window=4,
                                                   layer_types=MIXED, final_logit_softcapping=3.0),
          rotary_by_layer_type=True),
]
