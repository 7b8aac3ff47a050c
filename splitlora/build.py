"""One place builds a role's model: the base model (on the role's device, in its dtype, quantized or
not, only the parts it holds materialised) with LoRA on top, either the run's own (seeded init, so every
process starts from the same adapter) or an exported adapter with the configuration it was saved with
(its rank, alpha and targets: a heterogeneous run's export has its own rank).
"""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel

from .lora import apply_lora, lora_config
from .models import LoadedModel, load_model
from .runtime import Runtime


def role_model(cfg, runtime: Runtime, adapter: str | Path | None = None, **keep) -> tuple[LoadedModel, PeftModel]:
    """(the base model, the PEFT model over it) for a role with `runtime`. `keep` (layers, embeddings,
    head, top_layers; see `models.load_model`) limits what is materialised; `adapter`: an exported PEFT
    adapter directory to load instead of the run's fresh LoRA (frozen, for evaluation)."""
    lm = load_model(cfg.model.name, seed=cfg.train.seed, dtype=runtime.dtype, device=runtime.device,
                    quantization=runtime.quantization, **keep)
    if adapter is not None:
        return lm, PeftModel.from_pretrained(lm.model, str(adapter)).eval()
    lcfg = lora_config(lm.model.config, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules,
                       cfg.lora.rslora)
    return lm, apply_lora(lm.model, lcfg, cfg.train.seed).eval()
