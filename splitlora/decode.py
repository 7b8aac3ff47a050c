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
from transformers import DynamicCache, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .errors import DecodeError
from .split import ModelPart

# the field of a causal-LM output that carries the KV cache (`cache` since transformers 5.24)
_OUTPUT_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"



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

    _supports_sdpa = _supports_flash_attn = _supports_flex_attn = True   # the parts' blocks decide,
    _can_set_experts_implementation_cached_value = True                  # attention and experts alike

    def __init__(self, client: ModelPart, server: ModelPart):
        super().__init__(copy.deepcopy(client.config))   # init adjusts its config; keep the parts' own
        self.client, self.server = client, server

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None,
                logits_to_keep: int = 0, cache=None, past_key_values=None, **kwargs):
        """`generate` passes its KV cache as `cache` (transformers >= 5.24) or `past_key_values`."""
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = DynamicCache(config=self.config)
        seen = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.shape[1] != seen + input_ids.shape[1]:
            # the silent failure this guards against: generate feeds only the new token while the
            # cache it holds never reached the parts, so every step would attend to nothing before it
            raise DecodeError(f"split decoding: the attention mask covers {attention_mask.shape[1]} tokens but the "
                              f"KV cache holds {seen} and the step brings {input_ids.shape[1]}; the installed "
                              "transformers passes its cache in a way splitlora does not know (install the tested "
                              "versions: pip install -c constraints.txt -e .)")
        h = self.client(input_ids, attention_mask, position_ids, cache)
        logits = self.server(h, attention_mask, position_ids, cache, logits_to_keep=logits_to_keep)
        return CausalLMOutputWithPast(logits=logits, **{_OUTPUT_CACHE: cache})

    def get_input_embeddings(self):
        return self.client.mods[self.client.family.embed_key]


@torch.no_grad()
def check_cached_decoding(model, tokenizer, prompt: str, new_tokens: int = 8, tolerance: float = 1e-3) -> float:
    """Greedy-decode a few tokens through `generate` and its KV cache, then score the whole sequence once
    without a cache: each step's logits must be the full recompute's (relative to the logits' scale).
    Returns the largest relative difference; raises DecodeError past `tolerance`, so a decoding path
    that loses its cache fails loudly instead of writing fluent-looking garbage."""
    model.eval()
    enc = tokenizer([prompt], return_tensors="pt", add_special_tokens=False).to(model.device)
    out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         num_beams=1, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    stepped = torch.stack(out.logits, dim=1).float()
    n = enc["input_ids"].shape[1]
    full = model(input_ids=out.sequences, attention_mask=torch.ones_like(out.sequences)).logits.float()
    full = full[:, n - 1:n - 1 + stepped.shape[1]]
    diff = ((stepped - full).abs().max() / full.abs().max().clamp_min(1e-6)).item()
    if not diff <= tolerance:
        raise DecodeError(f"decoding with the KV cache differs from a full recompute (relative difference "
                          f"{diff:.3g} > {tolerance:g}); refusing to decode wrong text")
    return diff


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
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(model.device)
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
