"""`messages`: a conversation, a list of {role, content}. Rendered with the tokenizer's chat template
(or plain `role: content` lines without one); the loss falls on every assistant turn, and evaluation
decodes the last one from the turns before it."""

from __future__ import annotations

from ..data import Example
from .common import column

FIELDS = {"messages": "messages"}


def example(row: dict, fields: dict, chat, where: str) -> Example:
    messages = column(row, fields, "messages", where)
    segments = chat.segments(messages, where)
    prompt = chat.prompt(messages)
    last = [m for m in messages if m["role"] == "assistant"][-1]["content"]
    return Example(prompt, last, {}, prompt, tuple(segments))
