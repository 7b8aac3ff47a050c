"""The model families splitlora splits: one definition each (families/NAME.py), registered here by the
transformers model types it covers. Everything else reads a model's facts from its family."""

from __future__ import annotations

from ..errors import SplitError
from . import gemma, gpt2, gpt_neox, granite, llama, moe, opt, phi3
from .base import CACHE_KW, Family

FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    for t in family.model_types:
        if t in FAMILIES:
            raise ValueError(f"model type {t!r} is registered twice ({FAMILIES[t].name}, {family.name})")
        FAMILIES[t] = family
    return family


for _module in (llama, moe, gemma, phi3, granite, gpt2, gpt_neox, opt):
    for _family in _module.FAMILIES:
        register(_family)


def supported() -> list[str]:
    return sorted(FAMILIES)


def family_of(config) -> Family:
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise SplitError(f"model.name: model type {config.model_type!r} is not supported by the splitter "
                         f"(supported: {', '.join(supported())})")
    return family


__all__ = ["CACHE_KW", "FAMILIES", "Family", "family_of", "register", "supported"]
