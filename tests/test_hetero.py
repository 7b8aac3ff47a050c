"""Heterogeneous-rank LoRA math (splitlora.hetero): stacking reproduces Σ p_k s_k B_k A_k and zero-padded
averaging does not, factored SVD truncation against a dense SVD, rank allocation, split choice and the
importance tracker, with hand-computed values where they are small enough."""

from __future__ import annotations

import math

import pytest
import torch

from splitlora.hetero import (
    ImportanceTracker,
    aggregate,
    allocate_ranks,
    hetlora_average,
    redistribute,
    stack,
    taylor_importance,
    total_variation,
    weighted_delta,
)

IN, OUT = 20, 32
RANKS = (2, 4, 8)
WEIGHTS = (10.0, 30.0, 60.0)        # sample counts; p = 0.1, 0.3, 0.6


def _adapters(ranks=RANKS, seed: int = 0):
    """Random trained-looking adapters (B non-zero) with LoRA (alpha / r) and one rsLoRA (alpha / sqrt r) scaling."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, r in enumerate(ranks):
        a = torch.randn(r, IN, generator=g) / math.sqrt(IN)
        b = torch.randn(OUT, r, generator=g)
        s = 16 / math.sqrt(r) if i == len(ranks) - 1 else 16 / r
        out.append((a, b, s))
    return out


def _target(adapters, weights):
    """Σ_k p_k s_k B_k A_k written out, independent of the module."""
    p = [w / sum(weights) for w in weights]
    return sum(pk * s * (b @ a) for pk, (a, b, s) in zip(p, adapters))


def _rel(x, y) -> float:
    return float(torch.linalg.norm(x - y) / torch.linalg.norm(y))


def test_stack_reproduces_weighted_sum_of_products():
    ads = _adapters()
    a, b = stack(ads, WEIGHTS)
    assert a.shape == (sum(RANKS), IN) and b.shape == (OUT, sum(RANKS))
    target = _target(ads, WEIGHTS)
    assert torch.allclose(b @ a, target, atol=1e-5 * float(torch.linalg.norm(target)))
    assert torch.allclose(weighted_delta(ads, WEIGHTS), target, atol=1e-5 * float(torch.linalg.norm(target)))


def test_zero_padded_average_has_cross_terms():
    """HetLoRA's average, seen by the rank-8 client (which keeps all of Ā, B̄): s_3 B̄ Ā − target equals the
    double sum s_3 Σ_i Σ_j p_i p_j B̃_i Ã_j − Σ_k p_k s_k B_k A_k, and it is far from 0."""
    ads = _adapters()
    p = [w / sum(WEIGHTS) for w in WEIGHTS]
    out = hetlora_average(ads, WEIGHTS)
    assert [(a.shape, b.shape) for a, b in out] == [((r, IN), (OUT, r)) for r in RANKS]
    r_max, s_3 = max(RANKS), ads[-1][2]
    pad_a = [torch.cat([a, torch.zeros(r_max - a.shape[0], IN)]) for a, _, _ in ads]
    pad_b = [torch.cat([b, torch.zeros(OUT, r_max - b.shape[1])], dim=1) for _, b, _ in ads]
    double_sum = sum(p[i] * p[j] * pad_b[i] @ pad_a[j] for i in range(3) for j in range(3))
    target = _target(ads, WEIGHTS)
    error = s_3 * double_sum - target
    a_3, b_3 = out[-1]
    assert torch.allclose(s_3 * b_3 @ a_3 - target, error, atol=1e-5 * float(torch.linalg.norm(target)))
    assert float(torch.linalg.norm(error) / torch.linalg.norm(target)) > 0.1
    # the cross terms alone (i != j) are a large part of it
    cross = sum(p[i] * p[j] * pad_b[i] @ pad_a[j] for i in range(3) for j in range(3) if i != j)
    assert float(torch.linalg.norm(s_3 * cross) / torch.linalg.norm(target)) > 0.1


@pytest.mark.parametrize("rank", [sum(RANKS), sum(RANKS) + 2])
def test_redistribute_at_full_rank_is_lossless(rank):
    ads = _adapters()
    a, b = stack(ads, WEIGHTS)
    target = b @ a
    a_r, b_r, info = redistribute(a, b, rank, scaling=2.0)
    assert a_r.shape == (rank, IN) and b_r.shape == (OUT, rank)
    assert info.error < 1e-5
    assert torch.allclose(2.0 * b_r @ a_r, target, atol=1e-5 * float(torch.linalg.norm(target)))
    assert info.A_rest.shape == (0, IN) and info.B_rest.shape == (OUT, 0)


def test_redistribute_when_stacked_rank_exceeds_the_matrix_rank():
    """Σ r_k = 30 > in = 20: ΔW has at most 20 singular values; rank 20 is lossless, shapes follow `rank`."""
    ads = _adapters(ranks=(6, 8, 16), seed=1)
    a, b = stack(ads, WEIGHTS)
    a_r, b_r, info = redistribute(a, b, 24, scaling=0.5)
    assert a_r.shape == (24, IN) and info.singular_values.numel() == IN and info.error == 0.0
    assert torch.allclose(0.5 * b_r @ a_r, b @ a, atol=1e-5 * float(torch.linalg.norm(b @ a)))


def test_redistribute_truncation_matches_dense_svd():
    ads = _adapters()
    a, b = stack(ads, WEIGHTS)
    dw = b @ a
    rank, scaling = 5, 16 / 5
    a_r, b_r, info = redistribute(a, b, rank, scaling)
    sv = torch.linalg.svdvals(dw)
    assert torch.allclose(info.singular_values, sv[: sum(RANKS)], rtol=1e-4, atol=1e-5 * float(sv[0]))
    tail = float(torch.linalg.vector_norm(sv[rank:]) / torch.linalg.vector_norm(sv))
    assert info.error == pytest.approx(tail, rel=1e-4)
    trunc = scaling * b_r @ a_r
    assert _rel(trunc, dw) == pytest.approx(tail, rel=1e-4)
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    dense_trunc = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    assert torch.allclose(trunc, dense_trunc, atol=1e-5 * float(torch.linalg.norm(dw)))
    # singular values split evenly: A_r and B_r carry the same norms, row by row / column by column
    assert torch.allclose(torch.linalg.norm(a_r, dim=1), torch.linalg.norm(b_r, dim=0), rtol=1e-4)
    # the remainder adds back to ΔW
    assert info.A_rest.shape == (sum(RANKS) - rank, IN)
    assert torch.allclose(trunc + info.B_rest @ info.A_rest, dw, atol=1e-5 * float(torch.linalg.norm(dw)))


def test_redistribute_zero_delta():
    a_r, b_r, info = redistribute(torch.randn(6, IN), torch.zeros(OUT, 6), 4, scaling=2.0)
    assert a_r.shape == (4, IN) and b_r.shape == (OUT, 4)
    assert info.error == 0.0 and info.norm == 0.0
    assert torch.count_nonzero(b_r @ a_r) == 0 and torch.isfinite(a_r).all() and torch.isfinite(b_r).all()


def test_aggregate_gives_each_client_its_best_rank():
    ads = _adapters()
    target = _target(ads, WEIGHTS)
    sv = torch.linalg.svdvals(target)
    out = aggregate(ads, WEIGHTS)
    errors = []
    for (a_k, b_k, info), (_, _, s_k), r in zip(out, ads, RANKS):
        assert a_k.shape == (r, IN) and b_k.shape == (OUT, r)
        best = float(torch.linalg.vector_norm(sv[r:]) / torch.linalg.vector_norm(sv))
        assert _rel(s_k * b_k @ a_k, target) == pytest.approx(best, rel=1e-4)
        errors.append(info.error)
    assert errors[0] > errors[1] > errors[2] > 0


def test_shape_and_weight_errors():
    a, b, s = _adapters()[0]
    with pytest.raises(ValueError, match="same target weight"):
        stack([(a, b, s), (torch.randn(2, IN + 1), torch.randn(OUT, 2), s)], [1, 1])
    with pytest.raises(ValueError, match="one weight per adapter"):
        stack([(a, b, s)], [1, 1])
    with pytest.raises(ValueError, match="sum to 0"):
        stack([(a, b, s)], [0])
    with pytest.raises(ValueError, match="rank must be"):
        redistribute(a, b, 0, 1.0)


def test_taylor_importance_by_hand():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    g = torch.tensor([[2.0, 1.0], [-1.0, 5.0]])
    # Σ|W ⊙ G| = |2| + |−2| + |−3| + 0 = 7 (the signed sum, −3, would let the terms cancel)
    assert taylor_importance(w, g) == 7.0
    with pytest.raises(ValueError, match="shape"):
        taylor_importance(w, g.T[:1])


def test_importance_tracker_ema_by_hand():
    t = ImportanceTracker(beta=0.85)
    assert t.update("q", 2.0) == 2.0                       # first step: the score itself
    assert t.update("q", torch.tensor(4.0)) == pytest.approx(0.85 * 2.0 + 0.15 * 4.0)   # 2.3
    t.update("v", 1.0)
    assert t.scores() == pytest.approx({"q": 2.3, "v": 1.0})
    state = t.state_dict()
    u = ImportanceTracker()
    u.load_state_dict(state)
    assert u.beta == 0.85 and u.scores() == t.scores()
    assert u.update("q", 0.0) == pytest.approx(0.85 * 2.3)
    with pytest.raises(ValueError):
        t.update("q", float("nan"))


def test_importance_tracker_shifted():
    t = ImportanceTracker(beta=0.0)                         # β = 0: the average is the last score
    t.update("q", 3.0)
    t.update("v", 1.0)
    ref = t.scores()                                       # distribution (0.75, 0.25)
    t.update("q", 30.0)
    t.update("v", 10.0)                                    # 10x larger, same distribution
    assert total_variation(t.scores(), ref) == pytest.approx(0.0)
    assert not t.shifted(ref, 0.01)
    t.update("q", 10.0)                                    # now (0.5, 0.5): TV = ½(0.25 + 0.25) = 0.25
    assert total_variation(t.scores(), ref) == pytest.approx(0.25)
    assert t.shifted(ref, 0.2)
    assert not t.shifted(ref, 0.3)
    t.update("o", 20.0)                                    # a new name counts as 0 in the reference:
    assert total_variation(t.scores(), ref) == pytest.approx(0.5)   # (.25, .25, .5) vs (.75, .25, 0)
    assert t.shifted(ref, 0.3)


def test_allocate_ranks_by_hand():
    """Equal shapes, importance 3 : 1, 16 rank units: D'Hondt gives 12 : 4 (ties go to the smaller name)."""
    shapes = {"a": (64, 64), "b": (64, 64)}
    ranks = allocate_ranks({"a": 3.0, "b": 1.0}, 16 * 128, shapes)
    assert ranks == {"a": 12, "b": 4}
    assert allocate_ranks({"a": 1.0, "b": 3.0}, 16 * 128, shapes) == {"a": 4, "b": 12}
    # nothing measured yet: equal; one module at 0: it stays at r_min
    assert allocate_ranks({"a": 0.0, "b": 0.0}, 16 * 128, shapes) == {"a": 8, "b": 8}
    assert allocate_ranks({"a": 1.0, "b": 0.0}, 16 * 128, shapes, r_max=10) == {"a": 10, "b": 1}


def test_allocate_ranks_respects_budget_and_caps():
    shapes = {"q": (64, 64), "k": (64, 32), "v": (64, 32), "mlp": (64, 256)}
    importance = {"q": 5.0, "k": 0.5, "v": 4.0, "mlp": 2.0}
    budget = 2500
    ranks = allocate_ranks(importance, budget, shapes, r_min=2, r_max=8)
    used = sum(r * (i + o) for (i, o), r in zip(shapes.values(), ranks.values()))
    assert used <= budget
    assert all(2 <= r <= 8 for r in ranks.values())
    assert ranks["q"] > ranks["k"] and ranks["v"] > ranks["k"]
    # the budget is used up: no module below its cap could take one more rank unit
    left = budget - sum(r * (shapes[n][0] + shapes[n][1]) for n, r in ranks.items())
    assert all(ranks[n] == 8 or sum(shapes[n]) > left for n in shapes)
    assert allocate_ranks(importance, budget, shapes, r_min=2, r_max=8) == ranks      # deterministic
    with pytest.raises(ValueError, match="below the 1280 needed for rank 2"):
        allocate_ranks(importance, 1000, shapes, r_min=2)
    with pytest.raises(ValueError, match="same modules"):
        allocate_ranks({"q": 1.0}, budget, shapes)
