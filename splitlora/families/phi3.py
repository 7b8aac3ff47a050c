"""Phi-3: a rotary decoder whose attention fuses q, k, v into `qkv_proj` and whose MLP fuses gate and up
into `gate_up_proj`; LoRA's default target is the fused attention projection."""

from __future__ import annotations

from transformers import Phi3Config

from .base import Family
from .llama import SMALL, _ids

FAMILIES = [
    Family("phi3", lambda v: Phi3Config(**_ids(v), **SMALL, resid_pdrop=0.1, tie_word_embeddings=False),
           targets=("qkv_proj",),
           stages={"self_attn.qkv_proj": 0, "self_attn.o_proj": 1, "mlp.gate_up_proj": 2, "mlp.down_proj": 3},
           qkv=("self_attn.qkv_proj",) * 3),
]
