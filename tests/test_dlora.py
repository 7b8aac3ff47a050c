"""DLoRA's Kill & Revive: a killed client-side adapter gets no update, no optimizer state and sends no
bytes; with every client adapter dead, no gradient comes back and the client computes no backward (U-shaped:
with the bottom dead, the top still trains); a revived adapter trains again."""

from __future__ import annotations

import torch
from conftest import read_metrics, run_training

from splitlora.train import build_run

DLORA = {"strategy.name": "dlora", "strategy.aggregation_interval": 1, "dlora.warmup_steps": 0}


def _client_adapters(strategy) -> list[dict[str, torch.Tensor]]:
    return [c.client.part.adapter_state() for c in strategy.clients]


def test_a_killed_module_gets_no_update_no_state_and_sends_nothing(make_config):
    run = build_run(make_config({**DLORA, "dlora.threshold": 0.0}))   # threshold 0: nothing dies by itself
    s = run.strategy
    s.step(0)
    whole = [m[2] for m in s.take_work().messages if m[1] == "adapter_up"]   # uploads with every module
    victim = sorted(s.modules)[0]
    s.killed = {victim}
    s._apply()
    before = _client_adapters(s)
    up0 = s.s.link.bytes_up
    s.step(1)                     # a split step and an aggregation
    after = _client_adapters(s)
    for b, a, c in zip(before, after, s.clients):
        for k in b:
            assert torch.equal(b[k], a[k]) == (k in s.modules[victim]), k
        opt = c.client.learner.optimizer
        assert all(p not in opt.state for k, p in c.client.part.adapter.items() if k in s.modules[victim])
        assert all(p in opt.state for k, p in c.client.part.adapter.items() if k not in s.modules[victim])
    # what each client uploaded for aggregation has no tensor of the killed module
    uploads = [m for m in s.take_work().messages if m[1] == "adapter_up"]
    assert len(uploads) == len(s.clients)
    killed = sum(before[0][k].numel() * 4 for k in s.modules[victim])
    assert [nbytes for _, _, nbytes in uploads] == [w - killed - 2 * 88 for w in whole] or \
        all(w - killed - 400 < nbytes < w - killed for w, (_, _, nbytes) in zip(whole, uploads)), (uploads, whole, killed)
    assert s.s.link.bytes_up > up0


def test_all_killed_then_revived(make_config, tmp_path):
    """A threshold no change can beat kills every client module at the first judged aggregation (step
    2); from then on clients receive no gradient, compute no backward and their adapters stay put,
    until the revival at step 4 lets them train again (and they die again at step 5)."""
    cfg = make_config({**DLORA, "dlora.threshold": 1e9, "dlora.revive_interval": 4, "train.max_steps": 6})
    run_training(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    n = rows[0]["alive_client_adapters"]
    assert n > 0
    assert [r["alive_client_adapters"] for r in rows] == [n, n, 0, 0, n, 0, 0]
    assert all(r["killed_client_adapters"] == [] for r in rows[:2]) and len(rows[2]["killed_client_adapters"]) == n
    # step 3, everything dead: nothing comes down (no gradients, no adapters), only smashed data goes up
    assert rows[3]["bytes_down"] == rows[2]["bytes_down"]
    # client FLOPs of a dead step: forward only; of a live step: forward + backward
    dead = rows[3]["client_flops"] - rows[2]["client_flops"]
    live = rows[1]["client_flops"] - rows[0]["client_flops"]
    assert 0 < dead < live
    summary = __import__("json").loads((tmp_path / "run" / "summary.json").read_text())
    kinds = [(e["step"], "killed" if "killed" in e else "revived") for e in summary["dlora_events"]]
    assert kinds == [(2, "killed"), (4, "revived"), (5, "killed")]


def test_revived_modules_train_again(make_config):
    run = build_run(make_config({**DLORA, "dlora.threshold": 1e9, "dlora.revive_interval": 3}))
    s = run.strategy
    for t in range(2):
        s.step(t)
    assert s.killed == set(s.modules)
    frozen = _client_adapters(s)
    s.step(2)                       # dead step; revival after it
    assert s.killed == set()
    assert all(torch.equal(frozen[0][k], v) for k, v in _client_adapters(s)[0].items())
    s.step(3)
    moved = _client_adapters(s)[0]
    assert all(not torch.equal(frozen[0][k], moved[k]) for k in s.modules[sorted(s.modules)[0]])


def test_ushaped_dead_bottom_gets_no_gradient_while_the_top_trains(make_config):
    """U-shaped: with every bottom module killed and the top alive, no activation gradient comes down
    and the bottom stays put, while the top and the server-side adapter still train; the cost model
    prices no bottom backward and no server input gradient. With the top killed too, the top still
    sends the server its gradient."""
    run = build_run(make_config({**DLORA, "dlora.threshold": 0.0, "model.top_layers": 1, "model.split_layer": 1}))
    s = run.strategy
    part = s.clients[0].client.part
    bottom = {k.rsplit(".lora_", 1)[0] for k in part.bottom.adapter}
    top = {k.rsplit(".lora_", 1)[0] for k in part.top.adapter}
    assert s.bottom == bottom and bottom and top and bottom | top == set(s.modules)
    s.step(0)
    run.cost.step_seconds(s.take_work())
    flops_live = run.cost.client_flops   # device FLOPs of a step with everything alive
    for killed in (bottom, bottom | top):
        s.killed = set(killed)
        s._apply()
        before, server = _client_adapters(s), s.server.adapter_states()[0]
        s.step(1)
        work = s.take_work()
        kinds = {kind for _, kind, _ in work.messages}
        assert "grad" not in kinds and {"smashed", "server_activations", "top_grad"} <= kinds
        for b, a in zip(before, _client_adapters(s)):
            for k in b:
                module = k.rsplit(".lora_", 1)[0]
                assert torch.equal(b[k], a[k]) == (module in killed), k
        assert any(not torch.equal(v, s.server.adapter_states()[0][k]) for k, v in server.items())
        spent = run.cost.client_flops
        run.cost.step_seconds(work)
        assert 0 < run.cost.client_flops - spent < flops_live
