"""Chat templates: render a conversation with the tokenizer's own template (`apply_chat_template`), and
mark which characters of the rendering are the assistant's turns, so the loss falls on them only.

The same rendering gives the prompt a chat model is decoded from (everything before the last assistant
turn, and the template's generation prompt), so a model is trained on the format it is used with. With
no template (`data.chat_template: none`, or a tokenizer without one) conversations are rendered as
`role: content` lines, the assistant's ended by the end-of-text token.
"""

from __future__ import annotations

from dataclasses import replace

from .errors import DataError

PLAIN = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
         "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
         "{% if add_generation_prompt %}assistant: {% endif %}")
ROLES = ("system", "user", "assistant", "tool")


class Chat:
    """A tokenizer's chat rendering (`mode` auto: its template if it has one; none: the plain one)."""

    def __init__(self, tokenizer, mode: str = "auto"):
        self.tokenizer = tokenizer
        self.template = getattr(tokenizer, "chat_template", None) if mode == "auto" else None
        self.uses_template = bool(self.template)

    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                  chat_template=self.template or PLAIN)

    def segments(self, messages: list[dict], where: str = "messages") -> list[tuple[str, bool]]:
        """The rendering as (text, is an assistant turn) pieces: each assistant turn is what the template
        adds to the conversation before it, past its generation prompt (its end-of-turn token included)."""
        check_messages(messages, where)
        pieces, done = [], ""
        for j, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, upto = self.render(messages[:j], generation_prompt=True), self.render(messages[:j + 1])
            if not (before.startswith(done) and upto.startswith(before)):
                raise DataError(f"{where}: the chat template does not render turn {j} as an extension of the "
                                "turns before it, so the assistant's tokens cannot be told apart "
                                "(set data.chat_template: none)")
            pieces += [(before[len(done):], False), (upto[len(before):], True)]
            done = upto
        full = self.render(messages)
        if not full.startswith(done):
            raise DataError(f"{where}: the chat template renders the whole conversation differently from its turns")
        if full[len(done):]:
            pieces.append((full[len(done):], False))
        return [(text, trained) for text, trained in pieces if text]

    def prompt(self, messages: list[dict]) -> str:
        """What a model is decoded from: the conversation before its last assistant turn, then the
        template's generation prompt."""
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return self.render(messages[:last], generation_prompt=True)


def check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of {{role, content}} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise DataError(f"{where}: message {i} must be {{role: one of {', '.join(ROLES)}, content: text}}, "
                            f"got {m!r:.80}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn (nothing to learn)")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: the conversation starts with the assistant (nothing to condition on)")


def apply(examples: list, tokenizer, mode: str) -> list:
    """Prompt/completion examples (E2E, JSONL) as a user turn and the assistant's answer, rendered with the
    tokenizer's template when `mode` is auto and it has one (the group, the references' key, is kept)."""
    from .formats.prompt_completion import chat_example

    chat = Chat(tokenizer, mode)
    if not chat.uses_template:
        return examples
    out = []
    for ex in examples:
        rendered = chat_example(chat, ex.prompt, ex.completion, "data")
        out.append(replace(ex, prompt=rendered.prompt, completion=rendered.completion, segments=rendered.segments))
    return out


def prompt_for(data, tokenizer, text: str) -> str:
    """A user's text as the run's data format renders a prompt (`splitlora generate`)."""
    from . import formats

    return formats.of(data).prompt(text, Chat(tokenizer, data.chat_template))
