"""Heterogeneous-rank LoRA: aggregation of adapters of different ranks, importance-based rank allocation
(the math only; no training loop; the split point is chosen from the cost model by
`strategies.hsplitlora`).

Why this module exists: in HSplitLoRA (arXiv 2505.02795) clients differ in compute and memory, so each
client k trains LoRA adapters of its own rank r_k and holds its own number of layers. FedAvg of the A and B
tensors (`roles.fedavg`) needs equal shapes, and even with zero padding it averages the factors, not the
updates: mean(B) @ mean(A) != mean(B @ A). The functions here are what a heterogeneous strategy needs:

- `stack`: noise-free aggregation. Concatenating the clients' factors gives factors of exactly
  ΔW = Σ_k p_k s_k B_k A_k (rank Σ_k r_k), with no cross terms B_i A_j.
- `stack_updates`: the same for adapters that did not start the round at zero (the round's update
  Σ_k p_k s (B_k A_k − B0_k A0_k), exactly); `concat` sums factor pairs.
- `redistribute` (`factored_svd`, `truncate`, `aggregate`; FlexLoRA, `hsplit.aggregation: stack_svd`):
  the best rank-r approximation of that ΔW (Eckart–Young), from a thin SVD computed on the factors, as
  LoRA factors for a client of rank r and scaling s, with what the truncation lost (relative error and
  the remainder as factors).
- `hetlora_average`: the zero-padding baseline (HetLoRA-style; `strategies.hetlora`).
- `taylor_importance`, `ImportanceTracker`, `total_variation`: first-order Taylor importance of target
  weights, smoothed over steps, and whether its distribution has moved.
- `allocate_ranks`: ranks per target weight within a parameter budget, more rank to more important weights.

Conventions: a LoRA module's update is ΔW = s · B @ A with A: [r, in], B: [out, r] and s the scaling
(alpha / r, or alpha / sqrt(r) with rsLoRA), always passed explicitly. Client weights (e.g. sample counts)
are normalised here to p_k = w_k / Σ_j w_j.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------
# Aggregation


class Adapter(NamedTuple):
    """One client's LoRA factors for one target weight: ΔW_k = scaling · B @ A. Any (A, B, s) tuple works."""

    A: Tensor        # [r, in]
    B: Tensor        # [out, r]
    scaling: float


def _normalise(weights: Sequence[float], n: int) -> list[float]:
    """p_k = w_k / Σ_j w_j; weights must be finite, >= 0, with a positive sum, one per adapter."""
    if len(weights) != n:
        raise ValueError(f"need one weight per adapter: {n} adapters, {len(weights)} weights")
    ws = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in ws):
        raise ValueError(f"weights must be finite and >= 0, got {ws}")
    total = sum(ws)
    if total <= 0:
        raise ValueError("weights sum to 0; at least one client must have a positive weight")
    return [w / total for w in ws]


def _check(adapters: Sequence[tuple[Tensor, Tensor, float]]) -> list[Adapter]:
    """The adapters as `Adapter`s, after checking shapes: A [r_k, in], B [out, r_k], r_k >= 1, same in/out."""
    if not adapters:
        raise ValueError("no adapters to aggregate")
    out = [Adapter(*a) for a in adapters]
    in_f, out_f = out[0].A.shape[-1], out[0].B.shape[0]
    for k, (a, b, _) in enumerate(out):
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
            raise ValueError(f"adapter {k}: need A [r, in] and B [out, r] with r >= 1, "
                             f"got A {tuple(a.shape)}, B {tuple(b.shape)}")
        if a.shape[1] != in_f or b.shape[0] != out_f:
            raise ValueError(f"adapter {k}: shape ({b.shape[0]} x {a.shape[1]}) differs from adapter 0's "
                             f"({out_f} x {in_f}); all adapters must belong to the same target weight")
    return out


def weighted_delta(adapters: Sequence[tuple[Tensor, Tensor, float]], weights: Sequence[float]) -> Tensor:
    """The dense target of aggregation, Σ_k p_k s_k B_k @ A_k ([out, in]); for checks and small layers."""
    ads = _check(adapters)
    p = _normalise(weights, len(ads))
    return sum(pk * s * (b @ a) for pk, (a, b, s) in zip(p, ads, strict=True))


def stack(adapters: Sequence[tuple[Tensor, Tensor, float]], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Noise-free aggregation: A = [A_1; ...; A_K] (rows), B = [p_1 s_1 B_1, ..., p_K s_K B_K] (columns), so
    B @ A = Σ_k p_k s_k B_k @ A_k exactly (block product: no cross terms B_i A_j). Scaling of the result is
    1; its rank is at most Σ_k r_k, the shapes are A [Σ r_k, in], B [out, Σ r_k]."""
    ads = _check(adapters)
    p = _normalise(weights, len(ads))
    a = torch.cat([ad.A for ad in ads], dim=0)
    b = torch.cat([(pk * ad.scaling) * ad.B for pk, ad in zip(p, ads, strict=True)], dim=1)
    return a, b


def stack_updates(updates: Sequence[tuple[Tensor, Tensor, Tensor, Tensor, float]],
                  weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Noise-free aggregation of what adapters that did not start at zero learned in a round: for updates
    (A_k, B_k, A0_k, B0_k, s_k) (the factors now and as the round began), factors of
    Σ_k p_k s_k (B_k A_k − B0_k A0_k), exactly: the `concat` of each adapter's pair now and its start
    (a start whose B is zero adds no columns)."""
    p = _normalise(weights, len(updates))
    pairs = []
    for pk, (a, b, a0, b0, s) in zip(p, updates, strict=True):
        _check([(a, b, s), (a0, b0, s)])
        pairs += [(a, (pk * s) * b), (a0, (-pk * s) * b0)]
    return concat(*pairs)


def concat(*factors: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """(A, B) with B @ A = Σ B_i @ A_i over factor pairs (A_i [r_i, in], B_i [out, r_i]); pairs whose B is
    all zero are left out (at least the first pair stays)."""
    kept = [f for i, f in enumerate(factors) if i == 0 or bool(f[1].any())]
    return torch.cat([a for a, _ in kept], dim=0), torch.cat([b for _, b in kept], dim=1)


class FactoredSVD(NamedTuple):
    """Thin SVD ΔW = U diag(S) Vh; S descending, k = len(S) <= min(out, in, R)."""

    U: Tensor    # [out, k], orthonormal columns
    S: Tensor    # [k]
    Vh: Tensor   # [k, in], orthonormal rows


def factored_svd(A: Tensor, B: Tensor) -> FactoredSVD:
    """Thin SVD of ΔW = B @ A without forming ΔW: B = Q_B R_B and Aᵀ = Q_A R_A (reduced QR), then the small
    core R_B R_Aᵀ = U' S V'ᵀ, so ΔW = (Q_B U') S (Q_A V')ᵀ. Costs O((out + in) R² + R³) for A [R, in],
    B [out, R], instead of O(out · in · min(out, in)). Computed in float32 (float64 for float64 inputs)."""
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"need A [R, in] and B [out, R], got A {tuple(A.shape)}, B {tuple(B.shape)}")
    work = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)
    q_b, r_b = torch.linalg.qr(B.to(work))          # [out, m], [m, R], m = min(out, R)
    q_a, r_a = torch.linalg.qr(A.to(work).T)        # [in, n], [n, R], n = min(in, R)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return FactoredSVD(q_b @ u, s, vh @ q_a.T)


@dataclass(frozen=True)
class Truncation:
    """What truncating ΔW to a rank lost.

    error: ||ΔW − trunc||_F / ||ΔW||_F = ||S[r:]|| / ||S|| (0 when nothing is cut or ΔW = 0);
    norm: ||ΔW||_F; singular_values: all of ΔW's, descending;
    A_rest [k − r, in], B_rest [out, k − r]: the remainder, B_rest @ A_rest = ΔW − trunc (scaling 1), which a
    caller can fold into the frozen base weight or keep on the server."""

    error: float
    norm: float
    singular_values: Tensor
    A_rest: Tensor
    B_rest: Tensor


def truncate(svd: FactoredSVD, rank: int, scaling: float) -> tuple[Tensor, Tensor, Truncation]:
    """LoRA factors of the best rank-`rank` approximation of ΔW = U diag(S) Vh for a client with scaling s:
    B_r = U[:, :r] diag(sqrt(S_r / s)), A_r = diag(sqrt(S_r / s)) Vh[:r], so s · B_r @ A_r = U_r S_r Vh_r
    (singular values split evenly between the factors). With rank > k = len(S), A_r gets zero rows and B_r
    zero columns up to [rank, in] / [out, rank]; nothing is lost.

    Note: a slot whose A row and B column are both 0 (padding, or a zero singular value) gets no gradient
    in training; a caller that wants it to learn re-initialises the A row (as LoRA's init does) and leaves
    the B column at 0, which keeps ΔW unchanged."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not (math.isfinite(scaling) and scaling > 0):
        raise ValueError(f"scaling must be finite and > 0, got {scaling}")
    u, s, vh = svd
    k = s.numel()
    r = min(rank, k)
    root = (s[:r] / scaling).sqrt()
    b_r = u[:, :r] * root
    a_r = root[:, None] * vh[:r]
    if rank > r:
        a_r = torch.cat([a_r, a_r.new_zeros(rank - r, a_r.shape[1])], dim=0)
        b_r = torch.cat([b_r, b_r.new_zeros(b_r.shape[0], rank - r)], dim=1)
    tail = s[r:].sqrt()
    total = float(torch.linalg.vector_norm(s))
    lost = float(torch.linalg.vector_norm(s[r:]))
    info = Truncation(error=lost / total if total > 0 else 0.0, norm=total, singular_values=s,
                      A_rest=tail[:, None] * vh[r:], B_rest=u[:, r:] * tail)
    return a_r, b_r, info


def redistribute(A: Tensor, B: Tensor, rank: int, scaling: float) -> tuple[Tensor, Tensor, Truncation]:
    """Best rank-`rank` approximation of ΔW = B @ A (e.g. the output of `stack`) as LoRA factors for a client
    with scaling s: s · B_r @ A_r = trunc_rank(ΔW); A_r [rank, in], B_r [out, rank]. See `truncate`."""
    return truncate(factored_svd(A, B), rank, scaling)


def aggregate(adapters: Sequence[tuple[Tensor, Tensor, float]],
              weights: Sequence[float]) -> list[tuple[Tensor, Tensor, Truncation]]:
    """HSplitLoRA-style aggregation of one target weight: `stack` (exact ΔW = Σ p_k s_k B_k A_k), one
    factored SVD, then client k gets (A_k', B_k') with s_k · B_k' @ A_k' = trunc_{r_k}(ΔW), the best its
    rank allows, and what it lost."""
    ads = _check(adapters)
    svd = factored_svd(*stack(ads, weights))
    return [truncate(svd, ad.A.shape[0], ad.scaling) for ad in ads]


def hetlora_average(adapters: Sequence[tuple[Tensor, Tensor, float]],
                    weights: Sequence[float]) -> list[tuple[Tensor, Tensor]]:
    """HetLoRA-style baseline: zero-pad every A_k to [r_max, in] and B_k to [out, r_max], average each
    separately, Ā = Σ p_k Ã_k, B̄ = Σ p_k B̃_k, and give client k (Ā[:r_k], B̄[:, :r_k]).

    This is NOT Σ_k p_k s_k B_k A_k. Client k's update afterwards is
        s_k · B̄[:, :r_k] Ā[:r_k] = s_k Σ_i Σ_j p_i p_j B̃_i[:, :r_k] Ã_j[:r_k],
    which has cross terms B_i A_j (i != j; factors that were never trained together), weights each client's
    own product by p_i² instead of p_i, applies the receiver's scaling s_k to every client's factors and
    drops the other clients' components beyond rank r_k."""
    ads = _check(adapters)
    p = _normalise(weights, len(ads))
    r_max = max(ad.A.shape[0] for ad in ads)
    a_bar = sum(pk * torch.cat([ad.A, ad.A.new_zeros(r_max - ad.A.shape[0], ad.A.shape[1])], dim=0)
                for pk, ad in zip(p, ads, strict=True))
    b_bar = sum(pk * torch.cat([ad.B, ad.B.new_zeros(ad.B.shape[0], r_max - ad.B.shape[1])], dim=1)
                for pk, ad in zip(p, ads, strict=True))
    return [(a_bar[:ad.A.shape[0]].clone(), b_bar[:, :ad.A.shape[0]].clone()) for ad in ads]


# ---------------------------------------------------------------------------------------------------------
# Importance


def taylor_importance(weight: Tensor, grad_or_delta: Tensor) -> float:
    """First-order Taylor importance of a weight matrix: I(W) = Σ_ij |W_ij · G_ij|.

    The importance of a weight is the change of the loss when it is removed (set to 0), to first order
    |∂L/∂w · w| (Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019; AdaLoRA's
    sensitivity |w · ∇_w L|, Zhang et al., ICLR 2023). We sum these per-element scores over the matrix
    rather than take |Σ_ij W_ij G_ij| (the first-order change if the whole matrix were removed at once):
    no target weight is ever removed here, the question is how much a matrix is worth adapting, and the
    signed sum lets large contributions of opposite sign cancel, so an important matrix could score ~0.

    G is ∂L/∂W (for a LoRA-adapted layer equal to ∂L/∂ΔW, since the layer uses W + ΔW), or an update ΔW a
    round of training made (≈ −lr · Σ gradients; the sign does not matter under |·|). Computed in fp32."""
    if weight.shape != grad_or_delta.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and gradient {tuple(grad_or_delta.shape)} differ in shape")
    with torch.no_grad():
        return float((weight.float() * grad_or_delta.float()).abs().sum())


def _distribution(scores: Mapping[str, float]) -> dict[str, float]:
    """scores / Σ scores; a vector that sums to 0 counts as uniform over its names."""
    if not scores:
        raise ValueError("no importance scores to compare")
    total = sum(scores.values())
    if total > 0:
        return {n: v / total for n, v in scores.items()}
    return {n: 1.0 / len(scores) for n in scores}


def total_variation(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """TV distance of the normalised score vectors: ½ Σ_n |a_n / Σ a − b_n / Σ b| over the union of names (a
    missing name scores 0); 0 for proportional vectors, 1 for disjoint supports."""
    pa, pb = _distribution(a), _distribution(b)
    return 0.5 * sum(abs(pa.get(n, 0.0) - pb.get(n, 0.0)) for n in sorted(pa.keys() | pb.keys()))


class ImportanceTracker:
    """Exponential moving average of an importance score per named target weight:
    Ī_n ← β Ī_n + (1 − β) I_n at each update of n; the first update sets Ī_n = I_n (no bias toward 0)."""

    def __init__(self, beta: float = 0.85):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self._ema: dict[str, float] = {}
        self._steps: dict[str, int] = {}

    def update(self, name: str, score: float | Tensor) -> float:
        """Fold one score (>= 0, finite; a float or a 1-element tensor) into `name`'s average; returns it."""
        score = float(score)
        if not math.isfinite(score) or score < 0:
            raise ValueError(f"importance of {name!r} must be finite and >= 0, got {score}")
        prev = self._ema.get(name)
        self._ema[name] = score if prev is None else self.beta * prev + (1.0 - self.beta) * score
        self._steps[name] = self._steps.get(name, 0) + 1
        return self._ema[name]

    def scores(self) -> dict[str, float]:
        """The current averages by name (a copy; usable as the reference snapshot for `shifted`)."""
        return dict(sorted(self._ema.items()))

    def state_dict(self) -> dict:
        return {"beta": self.beta, "ema": dict(self._ema), "steps": dict(self._steps)}

    def load_state_dict(self, state: Mapping) -> None:
        beta = float(state["beta"])
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self._ema = {str(n): float(v) for n, v in state["ema"].items()}
        self._steps = {str(n): int(v) for n, v in state.get("steps", {}).items()}

    def shifted(self, reference: Mapping[str, float], threshold: float) -> bool:
        """Whether the normalised importance distribution moved by more than `threshold` in total-variation
        distance (`total_variation`, in [0, 1]) since `reference`, a snapshot taken with `scores()`."""
        return total_variation(self._ema, reference) > threshold


# ---------------------------------------------------------------------------------------------------------
# Allocation


def allocate_ranks(importance: Mapping[str, float], budget_params: int, shapes: Mapping[str, tuple[int, int]],
                   r_min: int = 1, r_max: int | None = None) -> dict[str, int]:
    """Rank per target weight n (shape (in_n, out_n)) with Σ_n r_n (in_n + out_n) <= budget_params.

    Every module starts at r_min; then, while some module below its cap has an extra rank unit that fits the
    remaining budget, the one with the largest importance per parameter it would hold after the step,
    I_n / ((in_n + out_n)(r_n + 1)), gets +1 rank (ties: the smaller name). This is a highest-averages
    (D'Hondt) apportionment with parameters as seats: parameter counts come out roughly proportional to
    importance. Caps: r_max, or min(in_n, out_n) (never below r_min) when r_max is None. Modules with
    importance 0 stay at r_min, unless all are 0 (nothing measured yet): then all count as equal."""
    if set(importance) != set(shapes):
        raise ValueError(f"importance and shapes must name the same modules; only in importance: "
                         f"{sorted(set(importance) - set(shapes))}, "
                         f"only in shapes: {sorted(set(shapes) - set(importance))}")
    if r_min < 1 or (r_max is not None and r_max < r_min):
        raise ValueError(f"need 1 <= r_min <= r_max, got r_min={r_min}, r_max={r_max}")
    for n, v in importance.items():
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"importance of {n!r} must be finite and >= 0, got {v}")
    for n, (i, o) in shapes.items():
        if i < 1 or o < 1:
            raise ValueError(f"shape of {n!r} must be positive (in, out), got {(i, o)}")
    cost = {n: i + o for n, (i, o) in shapes.items()}
    cap = {n: r_max if r_max is not None else max(r_min, min(i, o)) for n, (i, o) in shapes.items()}
    need = r_min * sum(cost.values())
    if need > budget_params:
        raise ValueError(f"budget of {budget_params} parameters is below the {need} needed for rank {r_min} "
                         f"on all {len(shapes)} modules (Σ r_min·(in+out))")
    imp = dict(importance) if any(v > 0 for v in importance.values()) else {n: 1.0 for n in importance}
    ranks = {n: r_min for n in shapes}
    left = budget_params - need
    heap = [(-imp[n] / (cost[n] * (r_min + 1)), n) for n in sorted(shapes) if imp[n] > 0 and r_min < cap[n]]
    heapq.heapify(heap)
    while heap:
        _, n = heapq.heappop(heap)
        if cost[n] > left:    # the budget only shrinks, so this module is done
            continue
        ranks[n] += 1
        left -= cost[n]
        if ranks[n] < cap[n]:
            heapq.heappush(heap, (-imp[n] / (cost[n] * (ranks[n] + 1)), n))
    return ranks
