"""Real architectures' shapes with random weights (`model.name: shape:NAME`), for memory and speed work
where the weights cannot be downloaded.

The model is built on the meta device; only the parts a process keeps are materialised, one tensor at a
time, directly in the target dtype on the target device (never the whole model in fp32 first), each
from a generator seeded by (seed, parameter name), so every process that holds a tensor holds the same
values. A quantized role quantizes each block right after materialising it, so its peak is one block in
the compute dtype beside the quantized rest. The tokenizer is SmolLM2's (its ids fit every vocabulary
here; `shape:tiny`, for tests, has the byte tokenizer). A local Hugging Face directory of a real model of
these sizes loads through the ordinary path.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from .errors import ModelError

SHAPES = {
    "llama-3.2-1b": lambda: LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, rope_theta=500000.0, max_position_embeddings=8192,
        tie_word_embeddings=True, rms_norm_eps=1e-5),
    "llama-3-8b": lambda: LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False,
        rms_norm_eps=1e-5),
    "qwen2.5-7b": lambda: Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, rope_theta=1000000.0, max_position_embeddings=8192, tie_word_embeddings=False,
        rms_norm_eps=1e-6),
    # for the tests and smoke runs: the same code path, a 4-layer model, the byte tokenizer
    "tiny": lambda: LlamaConfig(
        vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False),
}
BYTE_TOKENIZER = {"tiny"}   # presets with the byte tokenizer; the others use SmolLM2's


def _init(name: str, t: torch.Tensor, seed: int) -> None:
    """Norm weights 1, biases 0, everything else N(0, 0.02) from a generator seeded by (seed, name)."""
    if name.endswith("bias"):
        t.zero_()
    elif "norm" in name:
        t.fill_(1.0)
    else:
        gen = torch.Generator(device=t.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        t.normal_(0.0, 0.02, generator=gen)


def shape_model(name: str, keep, dtype: torch.dtype, device, seed: int = 0, tokenizer=None, quantize=None):
    """A LoadedModel of preset `name` (`shape:` prefix) with the `keep` parts (models.Keep; None: all)
    materialised; `quantize(block)` is applied to each kept block right after it is materialised."""
    from .models import Keep, LoadedModel, parameters_on_meta, tie_weights, kept_names, to_device
    from .families import family_of

    key = name.removeprefix("shape:")
    if key not in SHAPES:
        raise ModelError(f"model.name: {name!r} is not a shape preset ({', '.join('shape:' + s for s in SHAPES)})")
    config = SHAPES[key]()
    tok = tokenizer
    if tok is not None:
        config.pad_token_id, config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    keep = keep or Keep(range(config.num_hidden_layers))
    wanted = kept_names(model, keep)
    device = torch.device(device)
    names = {id(m): n for n, m in model.named_modules()}

    def materialise(module: nn.Module) -> None:
        for module_name, sub in module.named_modules(prefix=names[id(module)]):
            for pname, p in list(sub._parameters.items()):
                full = f"{module_name}.{pname}" if module_name else pname
                if p is None or full not in wanted or p.device.type != "meta":
                    continue
                t = torch.empty(p.shape, dtype=dtype, device=device)
                _init(full, t, seed)
                sub._parameters[pname] = nn.Parameter(t, requires_grad=p.requires_grad)

    for block in family_of(config).modules(model)["blocks"]:   # block by block: a quantized role's peak is
        materialise(block)                                      # one block in the compute dtype
        if quantize is not None and all(p.device.type != "meta" for p in block.parameters()):
            quantize(block)
    materialise(model)   # embeddings, norms, head
    to_device(model, device)   # the buffers (rotary tables) were computed on the CPU at construction
    tie_weights(model)
    if quantize is not None:
        from .quantize import mark
        mark(model, quantize.method)
    return LoadedModel(model.eval(), tok, name)
