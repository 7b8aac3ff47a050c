"""Heterogeneous clients: splits and ranks from budgets, noise-free aggregation of copies of different
ranks (client-side and server-side copies of the same block together), the exported adapter, resume,
and the HetLoRA baseline."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import read_metrics, run_training
from peft import PeftModel
from test_resume_cli import run_interrupted_and_resumed

from splitlora.config import ConfigError
from splitlora.split import lora_layers
from splitlora.models import tiny_model
from splitlora import data as D
from splitlora.learning import lm_loss
from splitlora.train import build_run

def _modules(part):
    """(block, layer name) -> (A, B, PEFT key prefix) of a part's LoRA modules."""
    out = {}
    for prefix, layer in lora_layers(part).items():
        block, name = re.search(r"\.(?:layers|h)\.(\d+)\.(.+)$", prefix).groups()
        out[(int(block), name)] = (layer.lora_A["default"].weight, layer.lora_B["default"].weight, prefix)
    return out


# three devices, weakest first; a client step budget that lets them hold 1, 2 and 3 of the 4 blocks
HET = {"strategy.name": "hsplitlora", "strategy.num_clients": 3, "strategy.aggregation_interval": 2,
       "train.eval_interval": 2, "lora.rank": 8, "cost.clients": ["phone", "edge", "laptop"],
       "hsplit.client_step_s": 1e-3, "hsplit.max_split_layer": 3}


def test_smaller_budget_gets_shallower_split_and_smaller_ranks(make_config):
    s = build_run(make_config(HET)).strategy
    assert s.splits == [1, 2, 3]
    ranks = s.mean_ranks()
    assert ranks[0] <= ranks[1] <= ranks[2] and ranks[0] < ranks[2]
    assert s.client_trainable(0) < s.client_trainable(1) < s.client_trainable(2)
    # the cost model sees each client's own split and ranks: the phone's pass costs the fewest FLOPs
    run = build_run(make_config(HET))
    layouts = run.strategy.layouts()
    flops = [run.cost._flops("client", 2, 64, frozenset(), layouts[i]).total for i in range(3)]
    assert flops[0] < flops[1] < flops[2]


# U-shaped: every client also holds block 3 and the head; the budget that fits that gives splits 1, 2, 2
HET_U = {**HET, "model.top_layers": 1, "hsplit.client_step_s": 2e-3}


def test_ushaped_clients_hold_the_top_block_at_their_own_ranks(make_config):
    s = build_run(make_config(HET_U)).strategy
    assert s.splits == [1, 2, 2]
    server = _modules(s.server.learners[0].part)
    assert {b for b, _ in server} == {1, 2}   # the middle: from the shallowest split to L - m
    for cid, c in enumerate(s.clients):
        mods = _modules(c.client.part)
        assert {b for b, _ in mods} == set(range(s.splits[cid])) | {3}
        assert set(s.ranks[cid]) == set(mods)
    assert sum(s.ranks[0].values()) <= sum(s.ranks[2].values())
    layouts = s.layouts()   # the cost model prices the top at the client's ranks
    tops = [build_run(make_config(HET_U)).cost._flops("top", 2, 64, frozenset(), layouts[i]).total for i in range(3)]
    assert tops[0] <= tops[2]


@pytest.mark.parametrize("overrides", [HET, HET_U], ids=["split", "ushape"])
def test_noise_free_aggregation_folds_exactly_the_weighted_sum_of_products(overrides, make_config):
    """Block 1 is client-side for two clients (own copies, ranks r_1, r_2) and server-side for the phone
    (the server's copy): the base moves by Σ p_i s B_i A_i over the copies each client trained through
    (U-shaped: block 3 has one copy per client)."""
    run = build_run(make_config({**overrides, "hsplit.aggregation": "stack_fold"}))
    s = run.strategy
    s.step(0)
    weights = [c.num_samples for c in s.clients]
    p = [w / sum(weights) for w in weights]
    expected = {}
    server = _modules(s.server.learners[0].part)
    for mod in s.total:
        delta = 0
        for cid, c in enumerate(s.clients):
            own = _modules(c.client.part)
            a, b, _ = own[mod] if mod in own else server[mod]
            delta = delta + p[cid] * s.scaling * (b.detach() @ a.detach())
        expected[mod] = delta
    before = {mod: w.clone() for mod, w in s.base.items()}
    s.aggregate(1)
    for mod in s.total:
        got = s.base[mod] - before[mod]
        assert torch.allclose(got, expected[mod], atol=1e-6 * (1 + expected[mod].abs().max().item())), mod
        assert torch.allclose(s.total[mod], got, atol=1e-7)
    # and every copy restarted: B = 0, A nonzero only on its first r rows
    for cid, c in enumerate(s.clients):
        for mod, (a, b, _) in _modules(c.client.part).items():
            r = s.ranks[cid][mod]
            assert not b.any() and a[:r].abs().sum() > 0 and not a[r:].any()


def _copies_compute_with(s):
    """Every holder's weight for every module it holds: base + s·B·A (client copies and the server's)."""
    out = []
    for holder in [c.client.part for c in s.clients] + [s.server.learners[0].part]:
        for prefix, layer in lora_layers(holder).items():
            mod = next(m for m, p in s.prefix.items() if p == prefix)
            a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
            out.append((mod, layer.base_layer.weight.detach() + s.scaling * (b @ a)))
    return out


@pytest.mark.parametrize("aggregation", ["stack_fold", "stack_svd", "stack_keep"])
@pytest.mark.parametrize("overrides", [HET, HET_U], ids=["split", "ushape"])
def test_every_copy_computes_with_the_exact_aggregate_after_each_round(aggregation, overrides, make_config):
    """Two rounds (the second starts from adapters that are not zero under stack_keep and stack_svd): the
    run's total grows by exactly Σ p_i s (B_i A_i − B0_i A0_i) over the copies the clients trained
    through, and every copy, client or server, then computes with pretrained + total, whatever it keeps
    as its adapter (nothing lost to truncation or rank changes)."""
    s = build_run(make_config({**overrides, "hsplit.aggregation": aggregation})).strategy
    s.realloc_threshold = -1.0   # ranks re-decided every round
    pretrained = {mod: w.clone() for mod, w in s.base.items()}
    weights = [c.num_samples for c in s.clients]
    p = [w / sum(weights) for w in weights]
    for t in (0, 2):
        start = {mod: sum(pc * w for pc, w in zip(p, ws))
                 for mod, ws in _weights_by_trainer(s).items()}
        s.step(t)
        trained = _weights_by_trainer(s)
        expected = {mod: sum(pc * w for pc, w in zip(p, trained[mod])) - start[mod] for mod in s.total}
        total = {mod: d.clone() for mod, d in s.total.items()}
        s.aggregate(t + 1)
        for mod in s.total:
            scale = 1 + expected[mod].abs().max().item()
            assert torch.allclose(s.total[mod] - total[mod], expected[mod], atol=1e-5 * scale), (t, mod)
        for mod, w in _copies_compute_with(s):
            assert torch.allclose(w, pretrained[mod] + s.total[mod], atol=1e-5), (t, mod)
    assert any(d.abs().sum() > 0 for d in s.total.values())
    if aggregation != "stack_fold":   # the adapters were not restarted
        assert any(layer.lora_B["default"].weight.any() for c in s.clients for layer in lora_layers(c.client.part).values())


def _weights_by_trainer(s):
    """mod -> [the weight client i computes module mod with: its own copy, or the server's]."""
    server = {p: (layer.base_layer.weight.detach(), layer) for p, layer in lora_layers(s.server.learners[0].part).items()}
    out = {}
    for mod, prefix in s.prefix.items():
        row = []
        for cid, c in enumerate(s.clients):
            own = lora_layers(c.client.part) if c.client.part is not None else {}
            layer = own[prefix] if s._client_side(cid, mod[0]) else server[prefix][1]
            a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
            row.append(layer.base_layer.weight.detach() + s.scaling * (b @ a))
        out[mod] = row
    return out


def test_stack_svd_and_stack_keep_lose_nothing_at_ranks_at_least_the_stacked_rank(make_config):
    """stack_svd: a copy whose rank is at least the rank of the copies' stacked average gets that average
    whole as its adapter (no tail into the base); stack_keep: a copy keeps what it trained, whole, when its
    rank does not shrink."""
    from splitlora import hetero

    s = build_run(make_config({**HET, "hsplit.aggregation": "stack_svd"})).strategy
    g = torch.Generator().manual_seed(0)
    copies = [(torch.randn(r, 16, generator=g), torch.randn(12, r, generator=g), torch.zeros(r, 16),
               torch.zeros(12, r), w) for r, w in [(1, 3.0), (2, 1.0), (3, 2.0)]]
    _, svd = s._combine(copies)
    average = hetero.weighted_delta([(a, b, s.scaling) for a, b, *_ in copies], [w for *_, w in copies])
    for rank in (6, 8):   # the stacked rank is 1 + 2 + 3
        a, b = s._truncated(svd, rank)
        assert torch.allclose(s.scaling * b @ a, average, atol=1e-5)
    a, b = s._truncated(svd, 5)   # below it, something goes to the base
    assert not torch.allclose(s.scaling * b @ a, average, atol=1e-3)

    keep = build_run(make_config({**HET, "hsplit.aggregation": "stack_keep"})).strategy
    keep._update_importance = lambda deltas: None   # the ranks stay as they are
    keep.step(0)
    def moments(c):
        return [(m["exp_avg"].clone(), m["exp_avg_sq"].clone())
                for m in (c.client.learner.optimizer.state[p] for p in c.client.part.adapter.values())]

    before = {cid: {k: v.clone() for k, v in c.client.adapter_state().items()} for cid, c in enumerate(keep.clients)}
    kept = {cid: moments(c) for cid, c in enumerate(keep.clients)}
    keep.aggregate(1)
    for cid, c in enumerate(keep.clients):
        after = c.client.adapter_state()
        assert after.keys() == before[cid].keys()
        assert all(torch.equal(after[k], before[cid][k]) for k in after)   # A and B as trained
        assert all(torch.equal(x, y) for m, n in zip(moments(c), kept[cid]) for x, y in zip(m, n))   # and AdamW's moments
        assert any(m[1].any() for m in kept[cid])


def test_masked_components_never_train(make_config):
    s = build_run(make_config(HET)).strategy
    s.step(0)
    for cid, c in enumerate(s.clients):
        for mod, (a, b, _) in _modules(c.client.part).items():
            r = s.ranks[cid][mod]
            assert not a[r:].any() and not b[:, r:].any()
            assert b[:, :r].any()   # the kept components did train


AGGREGATIONS = ["stack_fold", "stack_svd", "stack_keep", "zero_pad"]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_exported_adapter_is_the_trained_model(aggregation, make_config, tmp_path):
    """The total update, exported as a plain PEFT adapter of the pretrained base, gives the run's final
    validation loss, whatever the aggregation."""
    cfg = make_config({**HET, "train.max_steps": 4, "hsplit.aggregation": aggregation})
    summary = run_training(cfg, tmp_path / "run")
    assert summary["strategy"] == ("hetlora" if aggregation == "zero_pad" else "hsplitlora")   # zero_pad: HetLoRA
    assert summary.get("export_max_relative_error", 0.0) <= cfg.hsplit.export_tolerance
    assert summary["client_splits"] == [1, 2, 3]
    run = build_run(cfg)   # the same validation slice
    model = PeftModel.from_pretrained(tiny_model("llama", seed=cfg.train.seed).model, tmp_path / "run" / "adapter")
    model.eval()
    total = tokens = 0
    with torch.no_grad():
        for i in range(0, len(run.val_features), 8):
            batch = D.collate(run.val_features[i:i + 8], run.tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += lm_loss(logits, batch["labels"], 0.0).item() * n
            tokens += n
    loss = total / tokens
    assert loss == pytest.approx(summary["final_val_loss"], rel=1e-4)
    assert loss < summary["initial_val_loss"]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_hsplitlora_resume_equals_uninterrupted(aggregation, make_config, tmp_path):
    """Interrupted in the middle of a round (step 3 of rounds of 2): the clients' bases and adapters as
    the round began, their optimizers and the server's come back; the run ends where it would have."""
    cfg = make_config({**HET, "train.max_steps": 6, "train.checkpoint_interval": 3, "train.log_interval": 1,
                       "hsplit.aggregation": aggregation})
    full, resumed = run_interrupted_and_resumed(cfg, tmp_path)
    a, b = read_metrics(full), read_metrics(resumed)
    for key in ("train_loss", "val_loss", "bytes_up", "bytes_down", "client_mean_ranks", "client_flops"):
        assert [r[key] for r in b] == [r[key] for r in a], key
    adapter = json.loads((full / "summary.json").read_text()).get("export_rank")
    assert adapter == json.loads((resumed / "summary.json").read_text()).get("export_rank")


def test_heterogeneous_strategies_evaluate_after_aggregations_only(make_config, tmp_path):
    with pytest.raises(ConfigError, match="train.eval_interval"):
        run_training(make_config({**HET, "train.eval_interval": 3}), tmp_path / "x")


@pytest.mark.parametrize("aggregation", ["stack_fold", "stack_keep"])
def test_split_re_decided_at_a_reallocation_loses_nothing(aggregation, make_config):
    """When importance has shifted (threshold -1: always) and the budget no longer fits, the next
    reallocation moves the splits shallower; the server copy's adapter goes into the base first (under
    stack_fold it is zero), so the model right after the re-split is the one a run without the change
    has (bit for bit when nothing was in the adapter), and training goes on."""
    from splitlora.train import validation_loss

    runs = [build_run(make_config({**HET, "hsplit.aggregation": aggregation})) for _ in range(2)]
    for run in runs:
        run.strategy.realloc_threshold = -1.0
    for t in range(2):
        for run in runs:
            run.strategy.step(t)
    runs[1].strategy.client_step_s /= 2      # the devices got busier
    for t in range(2, 4):
        for run in runs:
            run.strategy.step(t)
    kept, moved = runs[0].strategy, runs[1].strategy
    assert kept.splits == [1, 2, 3]
    assert sum(moved.splits) < sum(kept.splits) and moved.reallocations[-1]["splits"] == moved.splits
    assert validation_loss(runs[1]) == pytest.approx(validation_loss(runs[0]), rel=0 if aggregation == "stack_fold" else 1e-6)
    for t in range(4, 6):
        moved.step(t)
    assert validation_loss(runs[1]) < validation_loss(runs[0]) + 1.0   # trains on with the new parts


@pytest.mark.parametrize("name", ["hsplitlora", "hetlora"])
def test_a_client_that_missed_a_round_rejoins_with_the_current_fold_at_its_own_rank(name, make_config):
    """Client 1 misses the aggregation's download and comes back as a new process (pretrained base, fresh
    part): before it trains again it is given its layout whole: its own split and ranks, the base weights
    with every fold so far, and the adapter the others restarted from."""
    from test_strategies import FlakyTransport

    run = build_run(make_config({**HET, "strategy.name": name}))
    s = run.strategy
    method = "fold" if name == "hsplitlora" else "load_adapter_state"
    s.clients[1] = FlakyTransport(s.clients[1], {1}, method)
    for t in range(2):
        s.step(t)
    assert [d["client"] for d in s.dropouts] == [1] and s.held[1] is None
    inner = s.clients[1].inner
    inner.client = build_run(make_config({**HET, "strategy.name": name})).strategy.clients[1].client   # a new process
    s.step(2)
    mods = _modules(inner.client.part)
    assert set(mods) == {m for m in s.total if s._client_side(1, m[0])} and len(mods) == 2 * s.splits[1]
    for mod, (a, b, _) in mods.items():
        r = s.ranks[1][mod]
        assert not a[r:].any() and not b[:, r:].any()
        layer = lora_layers(inner.client.part)[s.prefix[mod]]
        assert torch.equal(layer.base_layer.weight, s._effective(mod)), mod   # every fold so far (B starts at 0)
        assert layer.base_layer.weight.data_ptr() != s.base[mod].data_ptr()   # its own copy
    if name == "hsplitlora":
        assert any(d.abs().sum() > 0 for d in s.total.values())
    for t in range(3, 4):
        s.step(t)
    assert s.live() == s.clients


class _Poisoned:
    """A client whose uploads are 1e30 everywhere (finite, of the right shapes): what a rogue could send."""

    def __init__(self, inner):
        self.inner, self.cid = inner, inner.cid

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def adapter_state(self):
        return {k: torch.full_like(v, 1e30) for k, v in self.inner.adapter_state().items()}


@pytest.mark.parametrize("name", ["hsplitlora", "hetlora"])
def test_an_adapter_no_optimizer_could_produce_is_refused_and_the_base_stays_finite(name, make_config):
    """Each client's upload is bounded against what it began the round with (its layout's adapter, or its
    A after the last fold and B = 0): a poisoned one is refused, the others are aggregated, and the
    client gets its layout again."""
    run = build_run(make_config({**HET, "strategy.name": name}))
    s = run.strategy
    s.clients[2] = _Poisoned(s.clients[2])
    for t in range(4):
        s.step(t)
    refused = [d for d in s.dropouts if "refused its adapter" in d["reason"]]
    assert [d["client"] for d in refused] == [2, 2] and s.refused_updates == 2
    assert "a value changed by 1e+30" in refused[0]["reason"]
    assert all(torch.isfinite(w).all() for w in s.base.values())
    assert all(torch.isfinite(v).all() for v in s.global_adapter().values()) if name == "hetlora" else True
    honest = build_run(make_config({**HET, "strategy.name": name})).strategy
    for t in range(4):   # every update of the honest clients is bounded as it is: none refused
        honest.step(t)
    assert honest.refused_updates == 0 and honest.dropouts == []


# -- the fold modes, one rule for the server's copy and every client's ------------------------------------

def _adapter_with_moments(rank=4, out=6, inp=5):
    a, b = torch.nn.Parameter(torch.randn(rank, inp)), torch.nn.Parameter(torch.randn(out, rank))
    a.data[3:], b.data[:, 3:] = 0, 0   # trained in its first 3 components
    return a, b, {a: {"exp_avg": 1}, b: {"exp_avg": 1}}


@pytest.mark.parametrize("mode, new, kept_a, kept_b, forgets", [
    ("keep", 3, True, True, set()), ("keep", 2, True, True, {"a", "b"}),
    ("restart", 3, True, False, {"b"}), ("restart", 4, True, False, {"a", "b"}),
    ("replace", 3, False, False, {"a", "b"})])
def test_refit_adapter_by_mode(mode, new, kept_a, kept_b, forgets):
    from splitlora.roles import refit_adapter

    a, b, moments = _adapter_with_moments()
    a0, b0 = a.detach().clone(), b.detach().clone()
    rows = torch.full((new - 3, 5), 7.0) if new > 3 and mode != "replace" else None
    given = (torch.ones(new, 5), torch.ones(6, new)) if mode == "replace" else None
    refit_adapter(a, b, moments, mode, 3, new, rows, given)
    keep = min(3, new)
    assert torch.equal(a[:keep], a0[:keep]) == kept_a and torch.equal(b[:, :keep], b0[:, :keep]) == kept_b
    assert not a[new:].any() and not b[:, new:].any()   # nothing beyond the new rank
    if mode == "restart":
        assert not b.any()
    if rows is not None:
        assert torch.equal(a[3:new], rows)
    if given is not None:
        assert torch.equal(a[:new], given[0]) and torch.equal(b[:, :new], given[1])
    assert {n for n, p in (("a", a), ("b", b)) if p not in moments} == forgets
    with pytest.raises(ValueError, match="rank 2"):
        refit_adapter(a, b, moments, "replace", 3, 2, given=(torch.ones(3, 5), torch.ones(6, 3)))
    with pytest.raises(ValueError, match="unknown fold mode"):
        refit_adapter(a, b, moments, "average", 3, 3)


def test_deployed_client_refuses_a_fold_of_unknown_mode():
    from splitlora.transport.client import Refused, _fold
    from splitlora.transport.codec import fold_message

    called = []

    class Client:
        def fold(self, *args):
            called.append(args)

    message = fold_message({"m": (torch.zeros(1, 2), torch.zeros(2, 1))}, {})
    with pytest.raises(Refused, match="mode must be one of restart, keep, replace"):
        _fold(Client(), message, {"ranks": {"m": 1}, "mode": "average"}, None)
    with pytest.raises(Refused, match="mode"):
        _fold(Client(), message, {"ranks": {"m": 1}}, None)
    _fold(Client(), message, {"ranks": {"m": 1}, "mode": "keep"}, None)
    assert len(called) == 1 and called[0][3] == "keep"
