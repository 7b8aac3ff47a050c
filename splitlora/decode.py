"""Decoding a trained run: greedy or beam search with transformers' `generate`, through the split model
(client part then server part, with a KV cache) or through the exported adapter merged into the base.

`SplitForCausalLM` puts the two parts behind the causal-LM interface that `generate` drives, so beam
search, length penalty, n-gram blocking, repetition penalty and cache reordering are the library's.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .split import ModelPart


@dataclass(frozen=True)
class DecodeConfig:
    """Defaults: the SplitLoRA paper's E2E decoding (beam 10, length penalty 0.8, no-repeat 4-grams)."""

    num_beams: int = 10
    length_penalty: float = 0.8
    no_repeat_ngram_size: int = 4
    repetition_penalty: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 8

    @classmethod
    def greedy(cls, **kw) -> "DecodeConfig":
        return cls(**{"num_beams": 1, "length_penalty": 1.0, "batch_size": 32, **kw})

    def to_dict(self) -> dict:
        return asdict(self)


class SplitForCausalLM(PreTrainedModel, GenerationMixin):
    """Client part + server part as one generate()-able model; one KV cache serves both parts."""

    _supports_sdpa = _supports_flash_attn = _supports_flex_attn = True   # the parts' blocks decide

    def __init__(self, client: ModelPart, server: ModelPart):
        super().__init__(copy.deepcopy(client.config))   # init adjusts its config; keep the parts' own
        self.client, self.server = client, server

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, logits_to_keep: int = 0, **kwargs):
        cache = past_key_values if use_cache or past_key_values is not None else None
        h = self.client(input_ids, attention_mask, position_ids, cache)
        logits = self.server(h, attention_mask, position_ids, cache, logits_to_keep=logits_to_keep)
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache)

    def get_input_embeddings(self):
        return self.client.mods["embed_tokens" if "embed_tokens" in self.client.mods else "wte"]


def clean(text: str) -> str:
    """One output line: cut at a blank line (as the SplitLoRA evaluation does), join the rest."""
    return " ".join(text.split("\n\n")[0].split())


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], cfg: DecodeConfig, progress=None) -> tuple[list[str], dict]:
    """Decode `prompts` in batches (left padding); returns (texts, {generated_tokens, seconds, tokens_per_s})."""
    model.eval()
    tokenizer.padding_side = "left"
    gen = GenerationConfig(num_beams=cfg.num_beams, length_penalty=cfg.length_penalty,
                           no_repeat_ngram_size=cfg.no_repeat_ngram_size,
                           repetition_penalty=cfg.repetition_penalty, max_new_tokens=cfg.max_new_tokens,
                           do_sample=False, early_stopping=True if cfg.num_beams > 1 else False,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    # longest prompts first, so batches hold similar lengths; results go back to input order
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    generated, t0 = 0, time.perf_counter()
    for b in range(0, len(order), cfg.batch_size):
        idx = order[b:b + cfg.batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, generation_config=gen)
        new = out[:, enc["input_ids"].shape[1]:]
        for row, i in zip(new, idx, strict=True):
            ids = row.tolist()
            if tokenizer.eos_token_id in ids:
                ids = ids[:ids.index(tokenizer.eos_token_id)]
            generated += len(ids) + 1
            texts[i] = clean(tokenizer.decode(ids, skip_special_tokens=True))
        if progress:
            progress(len(idx))
    seconds = time.perf_counter() - t0
    return texts, {"generated_tokens": generated, "decode_s": seconds, "tokens_per_s": generated / seconds}
