"""`prompt_completion`: a prompt and the completion to learn. With a chat template, a user turn and the
assistant's answer; without, the two texts joined as they are (put the separator you want in them)."""

from __future__ import annotations

from ..data import Example
from .common import text_field

FIELDS = {"prompt": "prompt", "completion": "completion"}
DECODES = True


def example(row: dict, fields: dict, chat, where: str) -> Example:
    prompt, completion = text_field(row, fields, "prompt", where), text_field(row, fields, "completion", where)
    if chat.uses_template:
        return chat_example(chat, prompt, completion, where)
    return Example(prompt, completion, {}, prompt)


def prompt(text: str, chat) -> str:
    return user_turn(text, chat) if chat.uses_template else text


def user_turn(text: str, chat) -> str:
    """`text` as a user's turn, then the generation prompt."""
    return chat.render([{"role": "user", "content": text}], generation_prompt=True)


def chat_example(chat, prompt: str, completion: str, where: str) -> Example:
    """A user turn and the assistant's answer (the texts stripped: a turn's spacing is the template's)."""
    completion = completion.strip()
    messages = [{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": completion}]
    rendered = chat.prompt(messages)
    return Example(rendered, completion, {}, rendered, tuple(chat.segments(messages, where)))
