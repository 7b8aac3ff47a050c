"""What a deployed peer may send, decided from the model and the config rather than guessed.

- Sizes: the largest message either side expects (smashed activations, their gradient, a client's
  adapter or its whole state with AdamW moments) sets the gRPC message limit, and the number of tensors
  sets how large a message's safetensors header may be; a larger header is refused before it is parsed.
- Values: the server runs the model itself (the run's base weights and initial adapters) on a training-
  sized batch of its validation data, with the run's privacy clipping and noise, and measures the
  largest per-token norm and absolute value of the smashed activations and, under the U-shape, of the
  gradient a client sends up. A client's message may exceed neither by more than `deploy.bound_factor`:
  fine-tuning moves activations by far less, and values near the float range (±3e38 with random signs:
  finite, yet their loss gradient is not) are refused at the door, naming the client and the bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HELLO_HEADER = 16 << 10        # a hello's header: a few metadata fields
_HEADER_BASE = 16 << 10        # metadata (a client state's JSON skeleton, optimizer settings)
_HEADER_PER_TENSOR = 1 << 10   # one safetensors header entry and its reference in the state JSON (~200-400 B)


@dataclass(frozen=True)
class ValueBounds:
    """Largest per-token L2 norm and absolute value allowed in smashed activations and (U-shape) the
    gradient up; None where not measured."""

    act_norm: float | None = None
    act_abs: float | None = None
    grad_norm: float | None = None
    grad_abs: float | None = None
    factor: float = 1.0


def message_limits(hidden: int, batch_size: int, max_length: int, adapter_shapes: dict,
                   extra_numel: int = 0) -> tuple[int, int]:
    """(largest message in bytes, largest header in bytes) of a run's messages in fp32 (the widest wire
    precision): smashed activations with mask and labels, their gradient, the adapter, a client state
    (adapter + two AdamW moments), or a strategy's own message of `extra_numel` values
    (`Strategy.message_numel`), with a quarter of headroom."""
    numel = sum(int(torch.Size(s).numel()) for s in adapter_shapes.values())
    tokens = batch_size * max_length
    tensors = 4 * len(adapter_shapes) + 8   # a client state: the adapter, two moments, owned base weights
    header = _HEADER_BASE + _HEADER_PER_TENSOR * tensors
    largest = max(tokens * (hidden * 4 + 1 + 4), 3 * numel * 4, extra_numel * 4)
    return int(1.25 * largest) + header, header


def _token_stats(t: torch.Tensor) -> tuple[float, float]:
    return t.float().norm(dim=-1).max().item(), t.float().abs().max().item()


def value_bounds(template, split_layer: int, top_layers: int, batch: dict, privacy, smoothing: float,
                 factor: float, seed: int = 0) -> ValueBounds:
    """Bounds from the run's own model on `batch` (collated, training-sized): `factor` x what it produces."""
    from ..learning import lm_loss
    from ..split import split_model, split_u

    was_training = template.training
    template.eval()
    gen = torch.Generator().manual_seed(seed)
    try:
        if top_layers:
            client, server = split_u(template, split_layer, top_layers)
        else:
            client, server = split_model(template, split_layer)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():
            h = privacy.apply(client(ids, mask), gen)
        act_norm, act_abs = _token_stats(h)
        grad_norm = grad_abs = None
        if top_layers:
            with torch.no_grad():
                middle = server(h, mask)
            x = middle.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(lm_loss(client.top(x, mask), batch["labels"], smoothing), x)
            grad_norm, grad_abs = _token_stats(privacy.apply_grad(g, gen))
    finally:
        template.train(was_training)
    scale = lambda v: None if v is None else factor * v  # noqa: E731
    return ValueBounds(scale(act_norm), scale(act_abs), scale(grad_norm), scale(grad_abs), factor)


def check_values(name: str, t: torch.Tensor, norm_bound: float | None, abs_bound: float | None) -> str | None:
    """Why `t` is out of bounds, or None."""
    if norm_bound is None:
        return None
    norm, largest = _token_stats(t)
    if not (norm <= norm_bound and largest <= abs_bound):
        return (f"{name} out of bounds: per-token norm up to {norm:.3g} (bound {norm_bound:.3g}), |value| up to "
                f"{largest:.3g} (bound {abs_bound:.3g}); the model's own are at most 1/deploy.bound_factor of these")
    return None
