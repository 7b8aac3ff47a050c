"""Quantized frozen base weights (QLoRA): `model.quantization: int8 | nf4`, with bitsandbytes.

Why bitsandbytes: it is the maintained library whose int8 and 4-bit NormalFloat both run, train under
PEFT's LoRA (PEFT has LoRA layers for its `Linear8bitLt` and `Linear4bit`) and round-trip an exported
adapter exactly, on the CPU as well as on CUDA, so the tests here run the path a GPU user runs. torchao
has int8 on the CPU, but its 4-bit formats have no CPU kernel PEFT can train through (measured before
choosing: int8 0.67x and nf4 0.51x the bytes of bf16 on a 2048-hidden model; on this CPU a step takes
1.8x and 1.4x as long, since each layer is dequantized on the fly).

Each linear layer of a block is replaced by its quantized counterpart after the block is materialised,
one block at a time, on the block's device (a part quantizes only the blocks it holds; a shape preset
quantizes each block right after creating it). Embeddings, the final norm and the LM head keep the
compute dtype, as transformers' own quantization configs do.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("model.quantization: needs bitsandbytes (pip install 'splitlora[quant]' or "
                          "bitsandbytes>=0.50)") from None
    return bnb


def _quantized(linear: nn.Linear, method: str, dtype: torch.dtype) -> nn.Module:
    bnb = _bnb()
    device, weight = linear.weight.device, linear.weight.data
    has_bias = linear.bias is not None
    if method == "nf4":
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=dtype,
                              quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(weight.to(dtype), requires_grad=False, quant_type="nf4")
        # on CPUs with AVX512-BF16, an eval-mode no-grad forward would repack the weight for a kernel
        # without a backward, and LoRA would silently get no gradients afterwards
        q.support_avx512bf16_for_cpu = False
    else:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                threshold=0.0, device="meta")
        q.weight = bnb.nn.Int8Params(weight.to(dtype), requires_grad=False, has_fp16_weights=False)
    if has_bias:
        q.bias = nn.Parameter(linear.bias.data.to(dtype), requires_grad=False)
    q = q.to(device)   # bitsandbytes quantizes when the weight moves to its device
    if method == "int8":
        # the layer's first forward would move the int8 matrix and its scales from the weight into the
        # layer's own state, leaving a shared weight without them for every other copy of the layer (the
        # parts of a simulation share frozen weights): move them now, so copies share them from the start
        q.init_8bit_state()
        q.weight.data = q.state.CB
    return q


def shared_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Frozen tensors a quantized layer keeps outside its parameters (int8: the matrix and its scales),
    which copies of the layer must share rather than duplicate."""
    out = []
    for m in module.modules():
        state = getattr(m, "state", None)
        for name in ("CB", "SCB"):
            t = getattr(state, name, None)
            if isinstance(t, torch.Tensor):
                out.append(t)
    return out


def quantize_block(block: nn.Module, method: str, dtype: torch.dtype) -> None:
    """Replace every materialised nn.Linear inside `block` by its `method` counterpart, in place."""
    for name, child in list(block.named_children()):
        if type(child) is nn.Linear and child.weight.device.type != "meta":
            setattr(block, name, _quantized(child, method, dtype))
        else:
            quantize_block(child, method, dtype)


def mark(model: nn.Module, method: str) -> None:
    """Tell PEFT the base is quantized, so it wraps the layers with its bitsandbytes LoRA classes."""
    model.is_loaded_in_4bit, model.is_loaded_in_8bit = method == "nf4", method == "int8"


def quantize_blocks(model, method: str, dtype: torch.dtype) -> None:
    """Quantize the materialised blocks of a causal LM (the rest stays as it is)."""
    from .families import family_of

    for block in family_of(model.config).modules(model)["blocks"]:
        if any(p.device.type != "meta" for p in block.parameters()):
            quantize_block(block, method, dtype)
    mark(model, method)


def quantizer(method: str, dtype: torch.dtype):
    """A function quantizing one block, or None for `none`."""
    if method == "none":
        return None
    if method not in ("int8", "nf4"):
        raise ConfigError(f"model.quantization: {method!r} is not one of none, int8, nf4")
    _bnb()

    def quantize(block: nn.Module) -> None:
        quantize_block(block, method, dtype)

    quantize.method = method
    return quantize


def is_quantized(module: nn.Module) -> bool:
    return any(type(m).__module__.startswith("bitsandbytes") for m in module.modules())
