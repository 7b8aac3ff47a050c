"""What one faulty or malicious client can do to the global model, bounded.

- `update_bound`: how far AdamW can move any single adapter value in the steps since the last
  aggregation. Adam's step is at most (1 − β1)/√(1 − β2) ≈ 3.16 learning rates per value whatever the
  gradient (plus weight decay), so an upload whose largest change from the global adapter exceeds a
  margin over that was not produced by training: it is refused, and its client sits out the round.
- `aggregate`: the aggregation rule, `strategy.aggregation`:
  - `fedavg` (default): the sample-weighted mean (McMahan et al. 2017). One client can move the result
    anywhere its bounded update allows, scaled by its weight.
  - `clipped`: each client's update (upload − global) is clipped to the median update norm of the
    round, then averaged with the weights (norm clipping as in Sun et al. 2019, "Can you really backdoor
    federated learning?"): one client moves the result by at most its weight share × the median norm.
  - `median`: the coordinate-wise median of the uploads (Yin et al. 2018); weights are ignored. Tolerates
    fewer than half of the clients being arbitrary.
  - `trimmed_mean`: per coordinate, the ⌊β·n⌋ largest and smallest values are dropped and the rest
    averaged (Yin et al. 2018; β = `strategy.trim_fraction`); weights are ignored. Tolerates ⌊β·n⌋
    arbitrary clients.
"""

from __future__ import annotations

import math

import torch

AGGREGATIONS = ("fedavg", "clipped", "median", "trimmed_mean")

# AdamW defaults (torch.optim.AdamW, which every role uses)
_BETA1, _BETA2 = 0.9, 0.999
ADAM_MAX_STEP = (1 - _BETA1) / math.sqrt(1 - _BETA2)   # |m̂ / √v̂| can reach this, never more
MARGIN = 2.0                                            # over the worst case, for rounding and ε


ROUNDING = 1e-5                                         # relative slack: copies of one adapter may differ by rounding


def update_bound(lrs: list[float], weight_decay: float, reference_max_abs: float) -> float:
    """The largest change of any value AdamW can make in steps with these learning rates, times MARGIN:
    Σ lr × (Adam's largest normalised step + weight decay × the largest value it can reach), plus
    rounding (zero steps: the upload must equal the reference up to rounding)."""
    total, reach = 0.0, reference_max_abs
    for lr in lrs:
        step = lr * (ADAM_MAX_STEP + weight_decay * reach)
        total += step
        reach += step
    return MARGIN * total + ROUNDING * max(reference_max_abs, 1.0)


def max_abs_change(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    return max(((state[k] - reference[k]).abs().max().item() for k in state), default=0.0)


def _norm(update: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((v.double() ** 2).sum() for v in update.values()))


def aggregate(method: str, states: list[dict[str, torch.Tensor]], weights: list[float],
              reference: dict[str, torch.Tensor] | None = None, trim_fraction: float = 0.2) -> dict[str, torch.Tensor]:
    """The aggregate of adapter `states` (same keys) by `method` (see the module docstring); `reference`
    (the global adapter the clients started from) is needed by `clipped`."""
    if not states or len(states) != len(weights):
        raise ValueError("aggregate() needs one weight per adapter state")
    total = float(sum(weights))
    if method == "fedavg":
        return {k: sum(s[k] * (w / total) for s, w in zip(states, weights, strict=True)) for k in states[0]}
    if method == "clipped":
        if reference is None:
            raise ValueError("clipped aggregation needs the reference (global) adapter")
        updates = [{k: s[k] - reference[k] for k in s} for s in states]
        norms = torch.stack([_norm(u) for u in updates])
        tau = norms.median()
        scales = [min(1.0, float(tau / n)) if n > 0 else 1.0 for n in norms]
        return {k: reference[k] + sum(u[k] * (c * w / total) for u, c, w in zip(updates, scales, weights, strict=True))
                for k in states[0]}
    if method in ("median", "trimmed_mean"):
        out = {}
        for k in states[0]:
            stacked = torch.stack([s[k] for s in states])
            if method == "median":
                # torch.median takes the lower of the two middle values; the mean of both is the median
                ordered = stacked.sort(dim=0).values
                n = len(states)
                out[k] = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
            else:
                cut = int(trim_fraction * len(states))
                ordered = stacked.sort(dim=0).values
                out[k] = ordered[cut:len(states) - cut].mean(dim=0)
        return out
    raise ValueError(f"strategy.aggregation: {method!r} is not one of {', '.join(AGGREGATIONS)}")
