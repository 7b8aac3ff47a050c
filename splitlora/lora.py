"""LoRA through PEFT: wrap a base model, and write/read the one adapter directory a run exports.

Every role trains a slice of the same PEFT adapter ("default"); stitching the client-side and
server-side slices back together gives an ordinary PEFT adapter for the whole model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

from .checkpoint import atomic_directory
from .families import family_of


def lora_config(model_config, rank: int, alpha: float, dropout: float, target_modules=None,
                rslora: bool = False) -> LoraConfig:
    fam = family_of(model_config)
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora,
                      target_modules=list(target_modules or fam.targets),
                      fan_in_fan_out=fam.conv1d, bias="none", task_type="CAUSAL_LM")


def apply_lora(model, config: LoraConfig, seed: int) -> PeftModel:
    """Freeze the base model and add LoRA (A ~ PEFT's default init under `seed`, B = 0)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    return peft_model


def load_into(peft_model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Load a whole-model adapter state (PEFT file keys) into `peft_model`; every key must match."""
    result = set_peft_model_state_dict(peft_model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise KeyError(f"adapter keys not in the model: {unexpected[:3]}")


def export_adapter(peft_model: PeftModel, state: dict[str, torch.Tensor], out_dir: str | os.PathLike) -> Path:
    """Write `state` as a PEFT adapter directory, atomically (temp dir, then rename)."""
    load_into(peft_model, state)
    with atomic_directory(out_dir) as tmp:
        peft_model.save_pretrained(tmp)
    return Path(out_dir)
