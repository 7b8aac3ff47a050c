"""`messages`: a conversation, a list of {role, content}. Rendered with the tokenizer's chat template
(or plain `role: content` lines without one); the loss falls on every assistant turn, and evaluation
decodes the last one from the turns before it."""

from __future__ import annotations

from ..data import Example
from .common import column
from .prompt_completion import user_turn

FIELDS = {"messages": "messages"}
DECODES = True


def example(row: dict, fields: dict, chat, where: str) -> Example:
    messages = column(row, fields, "messages", where)
    segments = chat.segments(messages, where)
    rendered = chat.prompt(messages)
    last = [m for m in messages if m["role"] == "assistant"][-1]["content"]
    return Example(rendered, last, {}, rendered, tuple(segments))


def prompt(text: str, chat) -> str:
    """A user's text: a conversation of one turn."""
    return user_turn(text, chat)
