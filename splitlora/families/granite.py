"""Granite: a rotary decoder that scales the embeddings (`embedding_multiplier`, in the model's forward),
the residual branches (`residual_multiplier`, inside its blocks) and divides the logits by
`logits_scaling` (in the causal LM's forward)."""

from __future__ import annotations

from transformers import GraniteConfig

from .base import Family
from .llama import SMALL, _ids


class Granite(Family):
    def embed(self, config, mods, input_ids, position_ids):
        return mods["embed_tokens"](input_ids) * config.embedding_multiplier

    def head(self, config, mods, hidden):
        return mods["lm_head"](mods["norm"](hidden)) / config.logits_scaling


FAMILIES = [
    Granite("granite", lambda v: GraniteConfig(
        **_ids(v), **SMALL, embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=8.0,
        attention_multiplier=0.0625, tie_word_embeddings=True)),
]
