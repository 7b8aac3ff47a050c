"""Data formats: how one row of a user's dataset becomes a training example. One file per format, each
with `FIELDS` (the keys it reads: key -> default column name, renamed by `data.fields`) and
`example(row, fields, chat, where)`; registered here by name (`data.format`)."""

from __future__ import annotations

from importlib import import_module

NAMES = ("prompt_completion", "alpaca", "messages", "text")


def get(name: str):
    if name not in NAMES:
        raise KeyError(f"unknown data format {name!r} (known: {', '.join(NAMES)})")
    return import_module(f"{__name__}.{name}")
