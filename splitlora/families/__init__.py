"""The model families splitlora splits: one definition each (families/NAME.py), registered here by its
transformers model type. Everything else reads a model's facts from its family. A model type
no family names is accepted only if the default family passes a conformance check on it (generic.py)."""

from __future__ import annotations

import logging

from ..errors import SplitError
from . import gemma, gpt2, gpt_neox, granite, llama, moe, opt, phi3
from .base import CACHE_KW, Family

FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in FAMILIES:
        raise ValueError(f"model type {family.name!r} is registered twice")
    FAMILIES[family.name] = family
    return family


for _module in (llama, moe, gemma, phi3, granite, gpt2, gpt_neox, opt):
    for _family in _module.FAMILIES:
        register(_family)


def supported() -> list[str]:
    return sorted(FAMILIES)


_CHECKING: dict[str, Family] = {}          # model type -> the candidate family under its conformance check
_CHECKED: dict[tuple, Family | str] = {}   # (model type, its tiny config) -> the accepted family, or why not


def family_of(config) -> Family:
    t = config.model_type
    if t in FAMILIES:
        return FAMILIES[t]
    if t in _CHECKING:        # the check itself splits a tiny model of this type
        return _CHECKING[t]
    from .generic import candidate, why_not

    family = candidate(config)
    try:   # decided per config (its scalings, its flags), not per type
        key = (t, family.tiny(258).to_json_string())
    except Exception as e:
        key = (t, config.to_json_string())
        _CHECKED[key] = f"its config cannot be shrunk to a test size ({type(e).__name__}: {e})"
    if key not in _CHECKED:
        _CHECKING[t] = family
        try:
            why = why_not(family)
        finally:
            del _CHECKING[t]
        _CHECKED[key] = family if why is None else why
        if why is None:
            logging.getLogger("splitlora").warning(
                f"model type {t!r} has no family of its own in splitlora; it has Llama's layout and passed the "
                "split conformance check (logits, LoRA gradients, cached decoding, FLOPs) on a tiny model of its "
                "config, so it is split with the default family")
    found = _CHECKED[key]
    if isinstance(found, Family):
        return found
    raise SplitError(f"model.name: model type {t!r} is not supported by the splitter (supported: "
                     f"{', '.join(supported())}); as a generic decoder it was refused: {found}")


__all__ = ["CACHE_KW", "FAMILIES", "Family", "family_of", "register", "supported"]
