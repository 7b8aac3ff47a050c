"""Strategies: FedAvg, the splitlora == cenlora identity, metrics, byte accounting, reproducibility, sl."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from splitlora.models import tiny_model
from splitlora.roles import fedavg
from splitlora.runtime import RandomStream
from splitlora.train import build_run

from conftest import assert_states_close, assert_states_equal, exported_adapter, read_metrics, run_training, \
    train_losses

FAMILIES = ["gpt2", "llama"]
REQUIRED_KEYS = {"step", "round", "strategy", "train_loss", "train_ce", "val_loss", "val_ppl", "bytes_up", "bytes_down",
                 "samples_seen", "wall_s", "sim_time_s", "client_compute_s", "server_compute_s", "live_clients",
                 "dropouts", "client_flops", "skipped_updates", "refused_updates"}


def differ(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


# --- FedAvg -------------------------------------------------------------------------------------------------


def test_fedavg_weighted_by_hand():
    a = {"x": torch.tensor([1.0, 2.0, -4.0]), "y": torch.tensor([[0.0, 8.0]])}
    b = {"x": torch.tensor([5.0, 6.0, 4.0]), "y": torch.tensor([[4.0, 0.0]])}
    avg = fedavg([a, b], [1, 3])
    assert set(avg) == {"x", "y"}
    assert torch.equal(avg["x"], torch.tensor([4.0, 5.0, 2.0]))   # (1*a + 3*b) / 4
    assert torch.equal(avg["y"], torch.tensor([[3.0, 2.0]]))
    assert torch.equal(fedavg([a, b], [1, 1])["x"], torch.tensor([3.0, 4.0, 0.0]))
    assert torch.equal(fedavg([a], [7])["x"], a["x"])
    with pytest.raises(ValueError):
        fedavg([a, b], [1])
    with pytest.raises(ValueError):
        fedavg([], [])


@pytest.mark.parametrize("server_mode", ["shared", "per_client"])
def test_splitlora_aggregation_gives_every_client_the_weighted_average(server_mode, make_config):
    cfg = make_config({"strategy.aggregation_interval": 1, "strategy.server_mode": server_mode,
                       "strategy.num_clients": 2})
    strategy = build_run(cfg).strategy
    weights = [c.num_samples for c in strategy.clients]
    assert len(weights) == 2 and sum(weights) > 0

    for c in strategy.clients:          # one step's split training, without the aggregation
        strategy.split_step(c, 0)
    before = [c.adapter_state() for c in strategy.clients]
    assert differ(*before)   # the clients trained on different batches
    server_before = strategy.server.adapter_states()
    strategy.aggregate(0)

    expected = fedavg(before, weights)
    for c in strategy.clients:
        assert_states_close(c.adapter_state(), expected, rtol=1e-6)
    assert_states_equal(strategy.clients[0].adapter_state(), strategy.clients[1].adapter_state())
    assert strategy.rounds == 1
    servers = strategy.server.adapter_states()
    if server_mode == "per_client":
        assert len(servers) == 2
        assert_states_close(servers[0], fedavg(server_before, weights), rtol=1e-6)
        assert_states_equal(servers[0], servers[1])
    else:
        assert len(servers) == 1
        assert_states_equal(servers[0], server_before[0])   # the shared server part is not averaged


@pytest.mark.parametrize("strategy", ["fedlora", "splitlora"])
def test_run_with_aggregation_every_step_keeps_clients_identical(strategy, make_config):
    cfg = make_config({"strategy.name": strategy, "strategy.aggregation_interval": 1, "train.max_steps": 2})
    run = build_run(cfg)
    for t in range(2):
        run.strategy.step(t)
        a, b = (c.adapter_state() for c in run.strategy.clients)
        assert_states_equal(a, b)
        assert run.strategy.rounds == t + 1


# --- SplitLoRA with one client is centralized LoRA ---------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_splitlora_one_client_equals_cenlora(family, make_config, tmp_path, monkeypatch):
    # max_grad_norm 0: clipping is per role in split learning (the client clips the norm of the client-side
    # LoRA gradients, the server that of the server-side ones), which is not the global-norm clipping of
    # centralized training, so the two only agree when clipping is off.
    # lora dropout 0: keeps the comparison about the split itself, independent of how many random numbers
    # each code path draws (GPT-2's own dropout still runs, in the same order in both, when every role draws
    # from the process's one stream: here the roles' own streams are switched off).
    monkeypatch.setattr(RandomStream, "active", lambda self: contextlib.nullcontext())
    common = {"model.name": f"tiny-{family}", "lora.dropout": 0.0, "train.max_grad_norm": 0,
              "strategy.num_clients": 1, "strategy.server_mode": "shared", "train.max_steps": 4,
              "train.weight_decay": 0.01, "train.warmup_steps": 1}
    run_training(make_config({**common, "strategy.name": "splitlora"}), tmp_path / "split")
    run_training(make_config({**common, "strategy.name": "cenlora"}), tmp_path / "cen")

    split, cen = exported_adapter(tmp_path / "split"), exported_adapter(tmp_path / "cen")
    assert_states_close(split, cen, rtol=1e-5)
    assert any(v.abs().max() > 1e-3 for k, v in cen.items() if "lora_B" in k)  # it trained

    ls, lc = train_losses(tmp_path / "split"), train_losses(tmp_path / "cen")
    assert [s for s, _ in ls] == [s for s, _ in lc] == [1, 2, 3, 4]
    assert [l for _, l in ls] == pytest.approx([l for _, l in lc], rel=1e-5)
    ms, mc = read_metrics(tmp_path / "split"), read_metrics(tmp_path / "cen")
    assert ms[-1]["val_loss"] == pytest.approx(mc[-1]["val_loss"], rel=1e-5)
    assert ms[-1]["samples_seen"] == mc[-1]["samples_seen"] == 4 * 2


# --- every strategy writes the metrics ---------------------------------------------------------------------

STRATEGY_CONFIGS = {
    "cenlora": {"strategy.name": "cenlora"},
    "fedlora": {"strategy.name": "fedlora"},
    "sl": {"strategy.name": "sl"},
    "splitlora-shared": {"strategy.name": "splitlora", "strategy.server_mode": "shared"},
    "splitlora-per_client": {"strategy.name": "splitlora", "strategy.server_mode": "per_client"},
}


@pytest.mark.parametrize("label", list(STRATEGY_CONFIGS))
def test_every_strategy_runs_and_writes_metrics(label, make_config, tmp_path):
    cfg = make_config({**STRATEGY_CONFIGS[label], "strategy.num_clients": 2, "strategy.aggregation_interval": 2,
                       "train.max_steps": 4, "train.eval_interval": 2})
    out = tmp_path / "run"
    summary = run_training(cfg, out)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    for r in records:
        assert set(r) == REQUIRED_KEYS
        assert r["strategy"] == cfg.strategy.name
    assert records[0]["train_loss"] is None and records[0]["val_loss"] is not None
    assert all(isinstance(r["train_loss"], float) and r["train_loss"] > 0 for r in records[1:])
    # val at step 0 and every eval_interval; null in between
    assert [r["val_loss"] is not None for r in records] == [True, False, True, False, True]
    for r in records:
        if r["val_loss"] is not None:
            assert r["val_ppl"] == pytest.approx(torch.tensor(r["val_loss"]).exp().item(), rel=1e-5)
        else:
            assert r["val_ppl"] is None
    # cumulative counters never decrease
    for key in ("bytes_up", "bytes_down", "samples_seen", "wall_s", "sim_time_s", "client_compute_s",
                "server_compute_s", "client_flops"):
        values = [r[key] for r in records]
        assert values == sorted(values), key
    per_step = 2 if cfg.strategy.name in ("cenlora", "sl") else 2 * 2   # batch 2, one or both clients
    assert [r["samples_seen"] for r in records] == [per_step * i for i in range(5)]
    last = records[-1]
    if cfg.strategy.name == "cenlora":
        # the clients upload their data once, before the first step; nothing comes down
        assert records[0]["bytes_up"] == 0 and all(r["bytes_up"] == last["bytes_up"] > 0 for r in records[1:])
        assert all(r["bytes_down"] == 0 for r in records)
        # centralized training happens where the pooled data is: no client compute
        assert last["client_compute_s"] == 0 and last["server_compute_s"] > 0
    else:
        assert last["bytes_up"] > 0 and last["bytes_down"] > 0
        assert last["client_compute_s"] > 0
    if cfg.strategy.name in ("sl", "splitlora"):
        assert last["server_compute_s"] > 0
    assert last["round"] == {"cenlora": 0, "fedlora": 2, "sl": 2, "splitlora": 2}[cfg.strategy.name]
    assert summary["step"] == 4 and summary["final_val_loss"] == last["val_loss"]
    assert (out / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("server_mode", ["shared", "per_client"])
def test_splitlora_bytes_up_carry_the_activations(server_mode, make_config):
    """Per step, bytes up >= sum over clients of B*T*H*4 (fp32 activations), plus mask and labels, and not
    much more; bytes down are the activation gradients (same size)."""
    cfg = make_config({"strategy.server_mode": server_mode, "strategy.aggregation_interval": 1000,
                       "train.max_steps": 3})
    hidden = tiny_model("llama").model.config.hidden_size
    strategy = build_run(cfg).strategy
    link = strategy.s.link
    streams = [copy.deepcopy(c.client.stream) for c in strategy.clients]   # replay the batches the clients will draw
    for t in range(3):
        up0, down0 = link.bytes_up, link.bytes_down
        strategy.step(t)
        shapes = [s.next_batch()["input_ids"].shape for s in streams]
        activations = sum(b * seq * hidden * 4 for b, seq in shapes)
        mask_and_labels = sum(b * seq * (1 + 4) for b, seq in shapes)   # bool mask + int32 labels
        up, down = link.bytes_up - up0, link.bytes_down - down0
        assert activations + mask_and_labels <= up <= activations + mask_and_labels + 512 * len(shapes)
        assert activations <= down <= activations + 256 * len(shapes)


# --- reproducibility ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, strategy", [("gpt2", "splitlora"), ("llama", "fedlora")])
def test_same_seed_same_run(family, strategy, make_config, tmp_path):
    overrides = {"model.name": f"tiny-{family}", "strategy.name": strategy, "lora.dropout": 0.1,
                 "train.max_steps": 3}
    run_training(make_config(overrides), tmp_path / "a")
    run_training(make_config(overrides), tmp_path / "b")
    assert_states_equal(exported_adapter(tmp_path / "a"), exported_adapter(tmp_path / "b"))
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    # and the seed matters
    run_training(make_config({**overrides, "train.seed": 1}), tmp_path / "c")
    assert train_losses(tmp_path / "a") != train_losses(tmp_path / "c")


# --- sl -------------------------------------------------------------------------------------------------------


def test_sl_hands_the_client_adapter_to_the_next_client(make_config):
    cfg = make_config({"strategy.name": "sl", "strategy.num_clients": 2, "strategy.aggregation_interval": 1})
    strategy = build_run(cfg).strategy
    c0, c1 = strategy.clients
    initial = c1.adapter_state()
    assert strategy.holder == 0

    strategy.step(0)                       # c0 trains, then hands its adapter to c1
    assert strategy.rounds == 1 and strategy.holder == 1
    assert_states_equal(c1.adapter_state(), c0.adapter_state())
    assert differ(initial, c1.adapter_state())
    assert_states_equal({k: v for k, v in strategy.global_adapter().items() if k in c1.adapter_state()},
                        c1.adapter_state())

    after_first = c0.adapter_state()
    strategy.step(1)                       # c1 continues from it, then hands back to c0
    assert strategy.rounds == 2 and strategy.holder == 0
    assert_states_equal(c0.adapter_state(), c1.adapter_state())
    assert differ(after_first, c0.adapter_state())
    assert strategy.s.link.bytes_up > 0


def test_sl_rejects_per_client_server(make_config):
    from splitlora.config import ConfigError

    with pytest.raises(ConfigError, match="server_mode"):
        build_run(make_config({"strategy.name": "sl", "strategy.server_mode": "per_client"}))


class FlakyTransport:
    """Wraps a client transport; raises ClientDropped on the chosen calls, as a dead peer would."""

    def __init__(self, inner, fail_steps: set[int], method: str = "forward"):
        self.inner, self.fail_steps, self.method, self.calls = inner, fail_steps, method, 0
        self.cid = inner.cid

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name != self.method:
            return attr

        def call(*args, **kwargs):
            self.calls += 1
            if self.calls in self.fail_steps:
                from splitlora.learning import ClientDropped
                raise ClientDropped(f"client {self.cid}: deadline missed (test)")
            return attr(*args, **kwargs)
        return call


@pytest.mark.parametrize("name", ["splitlora", "fedlora"])
def test_a_client_that_drops_sits_out_the_round_and_rejoins(name, make_config):
    from splitlora.train import build_run

    cfg = make_config({"strategy.name": name, "strategy.num_clients": 3, "strategy.aggregation_interval": 2,
                       "train.max_steps": 6})
    strategy = build_run(cfg).strategy
    method = "forward" if name == "splitlora" else "local_step"
    strategy.clients[1] = FlakyTransport(strategy.clients[1], {2}, method)   # fails on its 2nd step
    samples = [strategy.step(t)[1] for t in range(2)]
    assert samples == [3 * 2, 2 * 2]            # step 2 ran without client 1
    assert strategy.dropouts == [{"step": 2, "client": 1, "reason": "client 1: deadline missed (test)"}]
    # the round aggregated clients 0 and 2 only (weights renormalised), and client 1 got the average
    c0, c1, c2 = (c.peek_adapter_state() for c in strategy.clients)
    assert_states_equal(c0, c2)
    assert_states_equal(c1, c0)
    assert strategy.live() == strategy.clients   # rejoined at the round boundary
    assert strategy.step(2)[1] == 3 * 2
