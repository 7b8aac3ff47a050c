"""`alpaca`: instruction, optional input, output (Stanford Alpaca's format). Without a chat template the
prompt is Alpaca's own ("### Instruction: ... ### Input: ... ### Response:"); with one, the instruction
and input are the user's turn."""

from __future__ import annotations

from ..data import Example
from .common import text_field
from .prompt_completion import chat_example, user_turn

FIELDS = {"instruction": "instruction", "input": "input", "output": "output"}
DECODES = True

HEADER = ("Below is an instruction that describes a task{with_input}. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n")


def example(row: dict, fields: dict, chat, where: str) -> Example:
    instruction = text_field(row, fields, "instruction", where)
    extra = text_field(row, fields, "input", where, optional=True)
    output = text_field(row, fields, "output", where)
    if chat.uses_template:
        return chat_example(chat, instruction + (f"\n\n{extra}" if extra else ""), output, where)
    prompt = HEADER.format(with_input=", paired with an input that provides further context" if extra else "",
                           instruction=instruction)
    prompt += (f"### Input:\n{extra}\n\n" if extra else "") + "### Response:\n"
    return Example(prompt, output, {}, prompt)


def prompt(text: str, chat) -> str:
    """An instruction with no input."""
    if chat.uses_template:
        return user_turn(text, chat)
    return example({"instruction": text, "output": ""}, FIELDS, chat, "--prompt").prompt
