"""What a client's replies must look like, checked by the server before anything is used: keys, shapes,
dtypes, finite values and the run's value bounds (`limits`). A reply that fails is a `BadMessage`: the
session ends, the client drops out of the round, and the server goes on. `REPLY_CHECKS` holds one check
per reply kind of the message table (`contract.COMMANDS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..checkpoint import join_tensors
from .codec import BadMessage
from .limits import ValueBounds, check_values


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and abs(float(x)) < float("inf")


def count_of(x) -> int:
    """x if it is an int in [1, 2**31), else 0."""
    return x if isinstance(x, int) and not isinstance(x, bool) and 1 <= x < 2 ** 31 else 0


@dataclass
class Expectations:
    """What replies from clients must look like (sizes and value bounds: `limits`)."""

    hidden: int
    vocab: int
    batch_size: int
    max_length: int
    adapter_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    max_bytes: int = 256 << 20
    labels: bool = True    # False under the U-shaped split: the client keeps its labels
    max_header: int = 1 << 20
    bounds: ValueBounds = field(default_factory=ValueBounds)
    act_dtypes: tuple = (torch.float32,)   # what activations and their gradients may arrive as (runtime, wire)
    num_samples: int | None = None   # the client's share of the data as the run partitions it


def _names(dtypes) -> str:
    return " or ".join(str(d).removeprefix("torch.") for d in dtypes)


def _finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise BadMessage(f"{name} holds NaN or infinite values")


def check_smashed(t: dict[str, torch.Tensor], e: Expectations) -> None:
    keys = {"activations", "attention_mask", "labels"} if e.labels else {"activations", "attention_mask"}
    if set(t) != keys:
        raise BadMessage(f"smashed message needs {', '.join(sorted(keys))}; got {sorted(t)}")
    a, m = t["activations"], t["attention_mask"]
    if a.dtype not in e.act_dtypes or a.dim() != 3 or a.shape[2] != e.hidden:
        raise BadMessage(f"activations must be {_names(e.act_dtypes)} [B, T, {e.hidden}], got {a.dtype} "
                         f"{list(a.shape)}")
    b, n = a.shape[:2]
    if not (1 <= b <= e.batch_size and 1 <= n <= e.max_length):
        raise BadMessage(f"activations of shape {list(a.shape)} exceed batch {e.batch_size} x {e.max_length}")
    if m.dtype != torch.bool or list(m.shape) != [b, n]:
        raise BadMessage(f"attention_mask must be bool [{b}, {n}], got {m.dtype} {list(m.shape)}")
    if not m.any(dim=1).all():
        raise BadMessage("attention_mask selects no token in some example")
    _finite("activations", a)
    if (why := check_values("activations", a, e.bounds.act_norm, e.bounds.act_abs)) is not None:
        raise BadMessage(why)
    if not e.labels:
        return
    y = t["labels"]
    if y.dtype != torch.int32 or list(y.shape) != [b, n]:
        raise BadMessage(f"labels must be int32 [{b}, {n}], got {y.dtype} {list(y.shape)}")
    if ((y != -100) & ((y < 0) | (y >= e.vocab))).any():
        raise BadMessage("labels outside the vocabulary")
    if not (y[:, 1:] != -100).any():
        raise BadMessage("labels supervise no token")


def check_adapter(t: dict[str, torch.Tensor], e: Expectations, frozen=frozenset()) -> None:
    """An adapter a client sends: its part's tensors, less the `frozen` ones (DLoRA's killed modules)."""
    keys = set(e.adapter_shapes) - set(frozen)
    if set(t) != keys:
        raise BadMessage(f"adapter keys differ from the client part's ({len(t)} vs {len(keys)})")
    for k, v in t.items():
        if v.dtype != torch.float32 or tuple(v.shape) != e.adapter_shapes[k]:
            raise BadMessage(f"adapter tensor {k}: {v.dtype} {list(v.shape)}, expected {e.adapter_shapes[k]}")
        _finite(k, v)


def _check_smashed_reply(out, meta, sent, e, frozen):
    check_smashed(out, e)
    if count_of(meta.get("n")) != out["activations"].shape[0]:
        raise BadMessage("smashed reply: n must be the batch size")
    return out


def _check_adapter_reply(out, meta, sent, e, frozen):
    check_adapter(out, e, frozen)
    return out


def _check_loss(meta, what: str) -> None:
    if not (is_number(meta.get("loss")) and is_number(meta.get("ce")) and count_of(meta.get("n"))):
        raise BadMessage(f"{what} reply needs a finite loss and ce and a positive n")


def _check_loss_reply(out, meta, sent, e, frozen):
    _check_loss(meta, "loss")
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(map(count_of, shape))):
        raise BadMessage("loss reply needs the batch shape [B, T]")
    return out


def _check_top_reply(out, meta, sent, e, frozen):
    g = out.get("activations_grad")
    x = sent["activations"]
    if set(out) != {"activations_grad"} or g.dtype not in e.act_dtypes or g.shape != x.shape:
        raise BadMessage(f"top reply needs activations_grad of shape {list(x.shape)}")
    _finite("activations_grad", g)
    if (why := check_values("activations_grad", g, e.bounds.grad_norm, e.bounds.grad_abs)) is not None:
        raise BadMessage(why)
    _check_loss(meta, "top")
    return out


def _check_state_reply(out, meta, sent, e, frozen):
    try:
        return join_tensors(meta["state"], out)
    except Exception:  # noqa: BLE001 - any malformed state is the sender's fault
        raise BadMessage("state reply is not a client state") from None


def _check_ack(out, meta, sent, e, frozen):
    if out:
        raise BadMessage("an acknowledgement carries no tensors")
    return out


# reply kind -> check(tensors, meta, the command's tensors, Expectations, frozen keys) -> the reply's value
REPLY_CHECKS = {"smashed": _check_smashed_reply, "adapter": _check_adapter_reply, "loss": _check_loss_reply,
                "top": _check_top_reply, "state": _check_state_reply, "ack": _check_ack}


def check_compute(meta: dict, before: float, elapsed: float) -> None:
    """A reply's compute_s: a finite number that cannot have grown by more than the command took."""
    if "compute_s" in meta:
        c = meta["compute_s"]
        if not (is_number(c) and c >= 0):
            raise BadMessage("compute_s must be a finite number >= 0")
        if c > before + elapsed + 1.0:   # a lower value: a restarted client process
            raise BadMessage(f"compute_s grew by {c - before:.3g} s during a {elapsed:.3g} s command")
