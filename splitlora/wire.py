"""What crosses the client/server boundary, as bytes: safetensors on disk and on the wire, never pickle.

`Link` is the in-process transport of the simulator: every message is really serialized and parsed
back, so the byte counts are those of the serialized tensors and the receiver never shares memory
with the sender. `LinkedClient` puts a client role behind a Link; the networked transport
(`splitlora.remote.RemoteClient`) offers the same methods and sends the very same bytes.

Activations and their gradients may travel at a lower precision (fp16, bf16, or int8 with one fp32
scale per tensor); everything else (masks, labels, adapters) travels exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

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


def fold_message(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rows: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """Server -> client `fold`: each module's stacked factors (`<prefix>.stacked_A` [R, in], `.stacked_B`
    [out, R]: ΔW = B @ A) and the new rows of A a grown rank adds (`<prefix>.new_rows`)."""
    out = {}
    for p, (a, b) in factors.items():
        out[f"{p}.stacked_A"], out[f"{p}.stacked_B"] = a, b
    return {**out, **{f"{p}.new_rows": r for p, r in rows.items()}}


def parse_fold(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(factors, rows) of a `fold_message`; a key of another form is a KeyError."""
    factors, rows = {}, {}
    for k, v in tensors.items():
        p, _, what = k.rpartition(".")
        if what == "new_rows":
            rows[p] = v
        elif what in ("stacked_A", "stacked_B"):
            factors.setdefault(p, {})[what] = v
        else:
            raise KeyError(f"fold: unexpected tensor {k}")
    if any(set(f) != {"stacked_A", "stacked_B"} for f in factors.values()):
        raise KeyError("fold: every module needs stacked_A and stacked_B")
    return {p: (f["stacked_A"], f["stacked_B"]) for p, f in factors.items()}, rows


@dataclass
class Link:
    """Counts bytes each way; `up` is client -> server, `down` is server -> client. `log` keeps
    (client, kind, bytes) of each message since the last `take_log()`, for the cost model."""

    precision: str = "fp32"
    bytes_up: int = 0
    bytes_down: int = 0
    log: list = field(default_factory=list)

    def up(self, tensors: dict[str, torch.Tensor], cid: int = -1, kind: str = "up") -> dict[str, torch.Tensor]:
        data = encode(tensors, self.precision)
        self.bytes_up += len(data)
        self.log.append((cid, kind, len(data)))
        return decode(data)

    def down(self, tensors: dict[str, torch.Tensor], cid: int = -1, kind: str = "down") -> dict[str, torch.Tensor]:
        data = encode(tensors, self.precision)
        self.bytes_down += len(data)
        self.log.append((cid, kind, len(data)))
        return decode(data)

    def take_log(self) -> list[tuple[int, str, int]]:
        log, self.log = self.log, []
        return log

    def state_dict(self) -> dict:
        return {"bytes_up": self.bytes_up, "bytes_down": self.bytes_down}

    def load_state_dict(self, state: dict) -> None:
        self.bytes_up, self.bytes_down = state["bytes_up"], state["bytes_down"]


class LinkedClient:
    """A client role reached through a Link: what a strategy talks to in the simulator."""

    def __init__(self, client, link: Link):
        self.client, self.link = client, link
        self.cid = client.cid

    num_samples = property(lambda self: self.client.num_samples)
    num_trainable = property(lambda self: self.client.num_trainable)
    compute_s = property(lambda self: self.client.compute_s)

    last_shape = property(lambda self: self.client.last_shape)
    frozen = property(lambda self: set(self.client.frozen))

    def forward(self) -> tuple[dict[str, torch.Tensor], int]:
        msg, n = self.client.forward()
        return self.link.up(msg, self.cid, "smashed"), n

    def backward(self, activations_grad: torch.Tensor | None, global_step: int) -> None:
        """The activation gradient down (None: nothing is sent, the client only steps its top)."""
        if activations_grad is not None:
            activations_grad = self.link.down({"activations_grad": activations_grad}, self.cid, "grad")["activations_grad"]
        self.client.backward(activations_grad, global_step)

    def local_step(self, global_step: int):
        return self.client.local_step(global_step)

    def top_step(self, server_out: dict[str, torch.Tensor]):
        """U-shape: the server's output down, the gradient of it up."""
        down = self.link.down(server_out, self.cid, "server_activations")
        reply, loss = self.client.top_step(down["activations"])
        return self.link.up(reply, self.cid, "top_grad"), loss

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return self.link.up(self.client.adapter_state(), self.cid, "adapter_up")

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        self.client.load_adapter_state(self.link.down(state, self.cid, "adapter_down"))

    def set_frozen(self, keys) -> None:
        """Freeze these adapter tensors on the client (DLoRA's killed modules): a command, no tensors."""
        self.client.set_frozen(set(keys))

    def set_layout(self, split: int, ranks: dict[str, int], adapter: dict[str, torch.Tensor],
                   base: dict[str, torch.Tensor]) -> None:
        """A heterogeneous client's part, ranks, starting adapter and base weights, down."""
        down = self.link.down(layout_message(adapter, base), self.cid, "layout")
        self.client.set_layout(split, ranks, *parse_layout(down))

    def fold(self, factors, ranks: dict[str, int], rows: dict[str, torch.Tensor]) -> None:
        """HSplitLoRA's round, down: the stacked factors of the client's modules, its new ranks and rows."""
        down = self.link.down(fold_message(factors, rows), self.cid, "adapter_down")
        factors, rows = parse_fold(down)
        self.client.fold(factors, ranks, rows)

    def peek_adapter_state(self) -> dict[str, torch.Tensor]:
        """The whole adapter (frozen tensors too) for evaluation: a measurement, so nothing is counted."""
        return self.client.peek_adapter_state()

    def state_dict(self) -> dict:
        return self.client.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.client.load_state_dict(state)
