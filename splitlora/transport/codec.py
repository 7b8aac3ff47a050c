"""What crosses the client/server boundary, as bytes: safetensors on disk and on the wire, never pickle.

A message is a safetensors blob: its tensors plus metadata {"kind", "meta": JSON} (`pack`, `unpack`,
which checks sizes before parsing anything). Activations and their gradients may travel at a lower
precision (fp16, bf16, or int8 with one fp32 scale per tensor); everything else (masks, labels,
adapters, base weights) travels exactly. The builders below give each command's tensors one layout
that both transports use.
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .limits import HELLO_HEADER

SERVICE, METHOD = "splitlora.Split", "Session"
FULL_METHOD = f"/{SERVICE}/{METHOD}"
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
LOSSY = ("activations", "activations_grad")   # the only tensors a lower wire precision applies to
_SCALE = ".int8_scale"


def _quantize(tensors: dict[str, torch.Tensor], precision: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu()   # serialized from host memory, whatever device the sender computes on
        if k not in LOSSY or precision == "fp32":   # fp32: as it is (bf16 activations are not up-cast)
            out[k] = v
        elif precision in ("fp16", "bf16"):
            out[k] = v.to(torch.float16 if precision == "fp16" else torch.bfloat16)
        else:
            scale = v.abs().max().clamp_min(1e-12) / 127.0
            out[k] = torch.round(v / scale).clamp(-127, 127).to(torch.int8)
            out[k + _SCALE] = scale.reshape(1).float()
    return out


def dequantize(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """int8 back to fp32; fp32, bf16 and fp16 tensors stay as they travelled (the receiver casts to its own
    compute dtype). Anything but the documented forms (F32/F16/BF16, or I8 with one [1] F32 scale, for the
    lossy tensors only) is refused, so a small message cannot expand into a huge one."""
    out = {}
    for k, v in tensors.items():
        if k.endswith(_SCALE):
            base = k[: -len(_SCALE)]
            if base not in LOSSY or base not in tensors:
                raise ValueError(f"unexpected tensor {k}")
            continue
        if k in LOSSY:
            scale = tensors.get(k + _SCALE)
            if scale is not None:
                if v.dtype != torch.int8 or scale.dtype != torch.float32 or tuple(scale.shape) != (1,):
                    raise ValueError(f"{k}: int8 needs one float32 scale of shape [1]")
                v = v.float() * scale
            elif v.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise ValueError(f"{k}: dtype {v.dtype} is not a wire precision")
        out[k] = v
    return out


def encode(tensors: dict[str, torch.Tensor], precision: str = "fp32",
           metadata: dict[str, str] | None = None) -> bytes:
    q = _quantize(tensors, precision)
    return st_save({k: v.contiguous() for k, v in q.items()}, metadata=metadata)


def decode(data: bytes) -> dict[str, torch.Tensor]:
    return dequantize(st_load(data))


def smashed_message(activations: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Client -> server: activations at the split point, the 2-D mask (bool) and the labels (int32)."""
    msg = {"activations": activations, "attention_mask": attention_mask.to(torch.bool)}
    if labels is not None:
        msg["labels"] = labels.to(torch.int32)
    return msg


def data_message(features: list[dict]) -> dict[str, torch.Tensor]:
    """A client's whole tokenized training set as one message (token ids, which are supervised, and
    example lengths): what centralized training needs the clients to upload."""
    return {"input_ids": torch.tensor([i for f in features for i in f["input_ids"]], dtype=torch.int32),
            "supervised": torch.tensor([y != -100 for f in features for y in f["labels"]], dtype=torch.bool),
            "lengths": torch.tensor([len(f["input_ids"]) for f in features], dtype=torch.int32)}


def layout_message(adapter: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Server -> client `set_layout`: the starting adapter (PEFT keys, cut to the client's ranks) and the
    current base weights of its LoRA modules (`<prefix>.base_weight`, [out, in]; none before any fold)."""
    return {**adapter, **{f"{p}.base_weight": w for p, w in base.items()}}


def parse_layout(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(adapter, base) of a `layout_message`."""
    base = {k[: -len(".base_weight")]: v for k, v in tensors.items() if k.endswith(".base_weight")}
    return {k: v for k, v in tensors.items() if not k.endswith(".base_weight")}, base


def fold_message(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rows: dict[str, torch.Tensor],
                 adapter: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Server -> client `fold`: each module's stacked factors (`<prefix>.stacked_A` [R, in], `.stacked_B`
    [out, R]: the base gains B @ A), the new rows of A a grown rank adds (`<prefix>.new_rows`) and, when
    the aggregation replaces the adapter (stack_svd), the new adapter (PEFT keys, cut to the ranks)."""
    out = {}
    for p, (a, b) in factors.items():
        out[f"{p}.stacked_A"], out[f"{p}.stacked_B"] = a, b
    return {**out, **{f"{p}.new_rows": r for p, r in rows.items()}, **(adapter or {})}


def parse_fold(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """(factors, rows, adapter) of a `fold_message`; a key of another form is a KeyError."""
    factors, rows, adapter = {}, {}, {}
    for k, v in tensors.items():
        p, _, what = k.rpartition(".")
        if what == "new_rows":
            rows[p] = v
        elif what in ("stacked_A", "stacked_B"):
            factors.setdefault(p, {})[what] = v
        elif k.endswith((".lora_A.weight", ".lora_B.weight")):
            adapter[k] = v
        else:
            raise KeyError(f"fold: unexpected tensor {k}")
    if any(set(f) != {"stacked_A", "stacked_B"} for f in factors.values()):
        raise KeyError("fold: every module needs stacked_A and stacked_B")
    return {p: (f["stacked_A"], f["stacked_B"]) for p, f in factors.items()}, rows, adapter


class BadMessage(ValueError):
    """A message that is not what the protocol expects here; the text says why."""


def pack(kind: str, tensors: dict | None = None, meta: dict | None = None, precision: str = "fp32") -> bytes:
    return encode(tensors or {}, precision, {"kind": kind, "meta": json.dumps(meta or {})})


def unpack(data: bytes, max_bytes: int, max_header: int = HELLO_HEADER) -> tuple[str, dict[str, torch.Tensor], dict]:
    """(kind, tensors, meta) of a message, or BadMessage. Sizes are checked before anything is parsed."""
    if len(data) > max_bytes:
        raise BadMessage(f"message of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    if len(data) < 8:
        raise BadMessage("not a splitlora message (shorter than a safetensors header)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > max_header:
        raise BadMessage(f"a header of {n} bytes exceeds the {max_header}-byte bound for this run's messages")
    try:
        header = json.loads(data[8:8 + n])
        info = header.get("__metadata__") or {}
        kind, meta = info["kind"], json.loads(info.get("meta", "{}"))
        tensors = st_load(data)
    except Exception as e:  # noqa: BLE001 - any parse failure is the sender's fault
        raise BadMessage(f"not a splitlora message ({type(e).__name__})") from None
    try:
        tensors = dequantize(tensors)
    except ValueError as e:
        raise BadMessage(str(e)) from None
    if not isinstance(meta, dict):
        raise BadMessage("message metadata is not a JSON object")
    return kind, tensors, meta
