"""`text`: plain language modelling, the loss on every token (no prompt)."""

from __future__ import annotations

from ..data import Example
from .common import text_field

FIELDS = {"text": "text"}
DECODES = False   # no prompt to decode from: evaluation reports perplexity


def prompt(text: str, chat) -> str:
    """The text to continue."""
    return text


def example(row: dict, fields: dict, chat, where: str) -> Example:
    text = text_field(row, fields, "text", where)
    return Example("", text, {}, text)
