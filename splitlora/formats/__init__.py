"""Data formats: how one row of a user's dataset becomes a training example. One file per format, each
with `FIELDS` (the keys it reads: key -> default column name, renamed by `data.fields`),
`example(row, fields, chat, where)`, `prompt(text, chat)` (a user's text as the format renders a prompt:
`splitlora generate`) and `DECODES` (whether evaluation decodes from its prompts); registered here by
name (`data.format`)."""

from __future__ import annotations

from importlib import import_module

NAMES = ("prompt_completion", "alpaca", "messages", "text")


def of(data):
    """The format of a config's data section (E2E and JSONL data are prompt/completion)."""
    return get(data.format if data.name == "hf" else "prompt_completion")


def get(name: str):
    if name not in NAMES:
        raise KeyError(f"unknown data format {name!r} (known: {', '.join(NAMES)})")
    return import_module(f"{__name__}.{name}")
