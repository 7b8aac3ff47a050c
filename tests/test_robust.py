"""One faulty or malicious client cannot take a run down (issue 13): what it sends is bounded by what the
model produces and what AdamW can do, the server state never becomes non-finite, aggregation can be
robust, a restarted server never silently starts over, one server per address, and big bad inputs fail
fast. The deployed attacks come from a rogue client process with a valid certificate (tests/rogue_client.py)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import exported_adapter, read_metrics, run_training, write_config
from test_deploy import BASE, _free_port, certs, run_clients, start  # noqa: F401 - the certs fixture
from splitlora import robust
from splitlora.config import ConfigError
from splitlora.errors import RunError

ROGUE = Path(__file__).with_name("rogue_client.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
RUN = {**BASE, "train.max_steps": 6, "deploy.timeout_s": 20, "deploy.retries": 20, "deploy.join_timeout_s": 60}


def _finite_adapter(run_dir) -> bool:
    return all(torch.isfinite(v).all() for v in exported_adapter(run_dir).values())


def rogue_process(cfg, port, certs_dir, tmp_path, attacks: str, cid: int = 0):
    config = tmp_path / "rogue.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    return subprocess.Popen([sys.executable, str(ROGUE), str(config), str(cid), str(port), str(certs_dir), attacks],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def run_against_rogue(make_config, certs_dir, tmp_path, attacks: str, rogue_wait_s: float = 5, **overrides):
    """A deployed run with an honest client-1 process and the rogue as client 0; (config, summary, rogue's
    exit code and stderr). The server runs in this process and must finish."""
    cfg = make_config({**RUN, **overrides})
    run_training(cfg, tmp_path / "clean")
    t, port, hub, result = start(cfg, tmp_path / "dep", certs_dir)
    rogue = rogue_process(cfg, port, certs_dir, tmp_path, attacks)
    honest = run_clients(cfg, port, certs_dir, tmp_path, ids=(1,))
    for p in honest:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
    t.join(120)
    assert "error" not in result, f"the server failed: {result.get('error')!r}"
    try:   # a rogue that is not connected when the run ends is never told it is over: it is stopped
        _, rogue_err = rogue.communicate(timeout=rogue_wait_s)
    except subprocess.TimeoutExpired:
        rogue.kill()
        _, rogue_err = rogue.communicate()
    return cfg, result["summary"], rogue.returncode, rogue_err


def assert_completed_like_clean(cfg, summary, tmp_path):
    assert summary["step"] == cfg.train.max_steps
    assert _finite_adapter(tmp_path / "dep")
    clean = json.loads((tmp_path / "clean" / "summary.json").read_text())
    assert summary["final_val_loss"] < summary["initial_val_loss"]            # it trained
    assert abs(summary["final_val_loss"] - clean["final_val_loss"]) < 0.1 * clean["final_val_loss"]


# -- deployed: a rogue client process ----------------------------------------------------------------------

SMASHED_ATTACKS = {   # attack -> what the refusal says
    "act-extreme": "activations out of bounds",
    "act-1e38": "activations out of bounds",
    "act-1e20": "activations out of bounds",
    "mask-false": "attention_mask selects no token",
    "replay": "answers another command (stale or replayed)",
    "compute": "compute_s grew by",
    "header": "exceeds the",
}


def test_rogue_smashed_replies_are_refused_and_the_run_completes(make_config, certs, tmp_path):
    attacks = ["honest"] + list(SMASHED_ATTACKS)
    # aggregation every step: a refused client 0 is taken back at the next one once it has reconnected
    cfg, summary, code, err = run_against_rogue(make_config, certs, tmp_path, ",".join(attacks), rogue_wait_s=60,
                                                **{"train.max_steps": 40, "strategy.aggregation_interval": 1,
                                                   "train.eval_interval": 40})
    assert code == 0, err[-2000:]
    events = summary["dropout_events"]
    assert {e["client"] for e in events} == {0}
    reasons = [e["reason"] for e in events]
    assert len(reasons) == len(SMASHED_ATTACKS), reasons
    for (attack, expected), reason in zip(SMASHED_ATTACKS.items(), reasons):
        assert reason.startswith("client 0: refused its message") and expected in reason, (attack, reason)
    assert "bound" in reasons[0] and "header of" in reasons[-1]
    assert summary["skipped_updates"] == 0 and summary["refused_updates"] == 0
    assert_completed_like_clean(cfg, summary, tmp_path)


def test_rogue_oversize_reply_is_cut_by_the_model_sized_message_limit(make_config, certs, tmp_path):
    cfg, summary, code, err = run_against_rogue(make_config, certs, tmp_path, "oversize",
                                                **{"train.max_steps": 12})
    # gRPC cut the stream (the limit follows the model: ~0.2 MB here, not 256 MB); the status reaches the
    # rogue late, sometimes after the run: the server's side is what is checked
    events = summary["dropout_events"]
    assert [e["client"] for e in events] == [0] and events[0]["reason"].endswith("disconnected")
    assert_completed_like_clean(cfg, summary, tmp_path)


def test_rogue_poisoned_adapter_is_refused_at_aggregation_and_evaluation(make_config, certs, tmp_path):
    cfg, summary, code, err = run_against_rogue(make_config, certs, tmp_path, "adapter-1e30")
    refusals = [e for e in summary["dropout_events"] if "refused its adapter" in e["reason"]]
    assert refusals and {e["client"] for e in summary["dropout_events"]} == {0}
    assert "a value changed by 1e+30" in refusals[0]["reason"] and "AdamW" in refusals[0]["reason"]
    assert summary["refused_updates"] >= len(refusals)
    assert "refused its adapter" in err                                     # the rogue was told why
    assert_completed_like_clean(cfg, summary, tmp_path)
    ckpt = json.loads((tmp_path / "dep" / "checkpoint" / "state.json").read_text())
    assert ckpt["step"] == cfg.train.max_steps                               # checkpoints were written (finite)


def test_a_hello_claiming_more_samples_than_assigned_is_refused_at_the_door(make_config, certs, tmp_path):
    cfg = make_config(RUN)
    t, port, hub, result = start(cfg, tmp_path / "dep", certs)
    rogue = rogue_process(cfg, port, certs, tmp_path, "samples")
    _, err = rogue.communicate(timeout=120)
    assert rogue.returncode == 2
    assert "claims 2147483647 training examples; the run's partition gives it" in err
    clients = run_clients(cfg, port, certs, tmp_path, ids=(0, 1))   # the real client 0 is then served
    for p in clients:
        _, cerr = p.communicate(timeout=240)
        assert p.returncode == 0, cerr[-2000:]
    t.join(120)
    assert result["summary"]["step"] == cfg.train.max_steps and hub.refused >= 1


# -- the simulator: the same guards, in one process -----------------------------------------------------

def _poison_forward(strategy, cid: int, steps: set[int]):
    client = strategy.clients[cid]
    forward = client.forward

    def poisoned():
        msg, n = forward()
        if strategy.t in steps:
            a = msg["activations"]
            msg = {**msg, "activations": (torch.randint(0, 2, a.shape).float() * 2 - 1) * 3e38}
        return msg, n

    client.forward = poisoned


def test_simulator_skips_a_batch_with_non_finite_gradients(make_config, tmp_path):
    from splitlora.train import build_run

    cfg = make_config({"train.max_steps": 4, "strategy.aggregation_interval": 2})
    run = build_run(cfg)
    _poison_forward(run.strategy, 0, {1})
    for t in range(4):
        loss, n = run.strategy.step(t)
        assert math.isfinite(loss.smoothed)
    assert run.strategy.skipped_updates == 1
    assert [(e["step"], e["client"]) for e in run.strategy.dropouts] == [(2, 0)]
    assert "non-finite" in run.strategy.dropouts[0]["reason"]
    server = run.strategy.server.adapter_states()[0]
    assert all(torch.isfinite(v).all() for v in server.values())
    assert all(torch.isfinite(v).all() for v in run.strategy.global_adapter().values())


def test_simulator_refuses_an_adapter_no_optimizer_could_produce(make_config, tmp_path):
    from splitlora.train import build_run

    cfg = make_config({"train.max_steps": 4, "strategy.aggregation_interval": 2})
    run = build_run(cfg)
    client = run.strategy.clients[0]
    client.adapter_state = lambda: {k: torch.full_like(v, 1e30) for k, v in client.client.adapter_state().items()}
    for t in range(4):
        run.strategy.step(t)
    assert run.strategy.refused_updates == 2                                 # at steps 2 and 4
    assert all(torch.isfinite(v).all() and v.abs().max() < 1e3 for v in run.strategy.reference.values())


def test_every_client_poisoned_ends_the_run_saying_why(make_config):
    from splitlora.train import build_run

    cfg = make_config({"train.max_steps": 2})
    run = build_run(cfg)
    for cid in range(2):
        _poison_forward(run.strategy, cid, {0})
    with pytest.raises(RunError, match="step 1: no client left to train .*client 1 at step 1: .*non-finite"):
        run.strategy.step(0)


@pytest.mark.parametrize("strategy", ["splitlora", "fedlora", "sl", "dlora"])
def test_honest_training_is_never_refused(strategy, make_config, tmp_path):
    """The AdamW bound has room: a hot learning rate, weight decay and warm-up refuse nothing."""
    cfg = make_config({"strategy.name": strategy, "train.max_steps": 9, "strategy.aggregation_interval": 3,
                       "train.lr": 0.1, "train.weight_decay": 0.1, "train.warmup_steps": 2,
                       "train.max_grad_norm": 0.0, "train.eval_interval": 3, "dlora.warmup_steps": 0})
    summary = run_training(cfg, tmp_path / "run")
    assert summary["refused_updates"] == 0 and summary["skipped_updates"] == 0 and summary["dropouts"] == 0


def test_update_bound_is_what_adam_can_do():
    """One AdamW step moves a value by at most lr x (1 - b1)/sqrt(1 - b2) (+ weight decay): drive a
    parameter with the gradient sequence that maximises it and stay under the bound."""
    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([p], lr=0.01, weight_decay=0.0)
    for g in [1e-8] * 5000 + [1e3]:   # tiny gradients, then a huge one: the largest normalised step
        p.grad = torch.full_like(p, g)
        before = p.detach().clone()
        opt.step()
    step = (p.detach() - before).abs().max().item()
    assert 0.9 * 0.01 * robust.ADAM_MAX_STEP < step <= 0.01 * robust.ADAM_MAX_STEP * 1.0001
    assert robust.update_bound([0.01], 0.0, 1.0) == pytest.approx(robust.MARGIN * 0.01 * robust.ADAM_MAX_STEP
                                                                  + robust.ROUNDING)


# -- robust aggregation ------------------------------------------------------------------------------------

def _states(*values):
    return [{"w": torch.tensor([float(v), -float(v)])} for v in values]


def test_aggregations_and_what_they_tolerate():
    honest, weights = _states(1.0, 2.0, 3.0), [1, 1, 1]
    reference = {"w": torch.zeros(2)}
    for method in ("fedavg", "median", "trimmed_mean"):   # symmetric honest values: all give the middle
        out = robust.aggregate(method, honest, weights, reference, trim_fraction=0.34)["w"]
        assert torch.allclose(out, torch.tensor([2.0, -2.0])), method
    attacked = _states(1.0, 2.0, 1e6)
    fedavg = robust.aggregate("fedavg", attacked, weights, reference)["w"]
    assert fedavg[0] > 1e5                                                       # taken over
    assert torch.equal(robust.aggregate("median", attacked, weights)["w"], torch.tensor([2.0, -2.0]))
    assert torch.equal(robust.aggregate("trimmed_mean", attacked, weights, trim_fraction=0.34)["w"],
                       torch.tensor([2.0, -2.0]))
    clipped = robust.aggregate("clipped", attacked, weights, reference)["w"]
    # the outlier's update is clipped to the median norm (that of the client at 2): (1 + 2 + 2) / 3
    assert torch.allclose(clipped, torch.tensor([5 / 3, -5 / 3]))
    # weights: fedavg and clipped use them; the median ignores them
    assert robust.aggregate("fedavg", _states(0.0, 3.0), [2, 1])["w"][0] == pytest.approx(1.0)
    assert robust.aggregate("median", _states(0.0, 3.0, 4.0), [100, 1, 1])["w"][0] == 3.0


@pytest.mark.parametrize("method", ["clipped", "median", "trimmed_mean"])
def test_robust_aggregation_trains(method, make_config, tmp_path):
    cfg = make_config({"strategy.aggregation": method, "strategy.num_clients": 3, "train.max_steps": 4,
                       "train.eval_interval": 4})
    summary = run_training(cfg, tmp_path / "run")
    assert summary["final_val_loss"] < summary["initial_val_loss"] and summary["round"] == 2


def test_robust_aggregation_is_refused_where_it_does_not_apply(make_config):
    from splitlora.train import build_run

    with pytest.raises(ConfigError, match="strategy.aggregation: hsplitlora"):
        build_run(make_config({"strategy.name": "hsplitlora", "strategy.aggregation": "median",
                               "hsplit.max_split_layer": 3}))


# -- a restarted server never silently starts over -------------------------------------------------------

def test_resume_needs_a_complete_checkpoint(make_config, tmp_path):
    from splitlora.checkpoint import latest_checkpoint, remove_partial, save_checkpoint
    from splitlora.transport.deploy import serve

    cfg = make_config(RUN)
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        serve(cfg, "127.0.0.1:0", None, str(tmp_path / "dep"), resume=True, insecure=True)
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoint", {"step": 3, "x": torch.ones(2)})
    (run / "checkpoint").rename(run / "checkpoint.old")          # killed between the two renames
    (run / "checkpoint.a1b2c3").mkdir()                           # killed while writing
    assert latest_checkpoint(run / "checkpoint") == run / "checkpoint.old"
    assert remove_partial(run / "checkpoint") == [run / "checkpoint.a1b2c3"]
    assert (run / "checkpoint.old").exists()
    with pytest.raises(ValueError, match="non-finite"):
        save_checkpoint(run / "checkpoint", {"x": torch.tensor([1.0, float("nan")])})
    assert latest_checkpoint(run / "checkpoint") == run / "checkpoint.old"   # nothing was written
    # a server started without --resume where a run is: refused, nothing touched
    with pytest.raises(ConfigError, match="already holds a run"):
        serve(cfg, "127.0.0.1:0", None, str(run), insecure=True)


def test_a_fresh_server_resets_clients_that_hold_an_earlier_runs_state(make_config, certs, tmp_path):
    """The server dies before its first checkpoint; `serve --resume` refuses (nothing to resume), a fresh
    server starts the run anew, the clients (still running, trained a few steps) are told so and start
    over: the run equals the simulator bit for bit."""
    cfg = make_config({**BASE, "strategy.aggregation_interval": 20, "train.max_steps": 24, "deploy.retries": 60,
                       "deploy.max_backoff_s": 0.5, "deploy.join_timeout_s": 120, "train.eval_interval": 24})
    run_training(cfg, tmp_path / "sim")
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    port = _free_port()
    script = str(Path(sys.executable).with_name("splitlora"))

    def server(out, *extra):
        return subprocess.Popen([script, "serve", "--config", str(config), "--address", f"127.0.0.1:{port}",
                                 "--certs", str(certs), "--output", str(out), "--no-progress", *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)

    first = server(tmp_path / "first")
    clients = run_clients(cfg, port, certs, tmp_path)
    metrics, deadline = tmp_path / "first" / "metrics.jsonl", time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and any(r["step"] >= 2 for r in read_metrics(
            tmp_path / "first"))):
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (tmp_path / "first" / "checkpoint").exists()
    again = server(tmp_path / "first", "--resume")
    _, err = again.communicate(timeout=120)
    assert again.returncode == 2 and "holds no complete checkpoint" in err
    fresh = server(tmp_path / "second")
    _, err = fresh.communicate(timeout=240)
    assert fresh.returncode == 0, err[-3000:]
    logs = []
    for c in clients:
        _, cerr = c.communicate(timeout=60)
        assert c.returncode == 0, cerr[-2000:]
        logs.append(cerr)
    assert all("the server's run is at step 0, this client was at step" in log for log in logs), logs
    sim, dep = read_metrics(tmp_path / "sim"), read_metrics(tmp_path / "second")
    assert [r["train_loss"] for r in dep] == [r["train_loss"] for r in sim]
    assert all(torch.equal(a, b) for a, b in zip(exported_adapter(tmp_path / "second").values(),
                                                  exported_adapter(tmp_path / "sim").values()))


# -- one server per address; cheap checks first; one-line errors ---------------------------------------

def test_one_server_per_address(make_config, tmp_path):
    from splitlora.transport.deploy import serve

    cfg = make_config(RUN)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}: the port is in use"):
            serve(cfg, f"127.0.0.1:{port}", None, str(tmp_path / "dep"), insecure=True)
    for bad in ("127.0.0.1:99999", "127.0.0.1:http", "127.0.0.1"):
        with pytest.raises(ConfigError, match="address"):
            serve(cfg, bad, None, str(tmp_path / "dep"), insecure=True)
    assert not (tmp_path / "dep").exists()


def test_a_second_grpc_server_cannot_share_the_port(make_config):
    from splitlora.transport.deploy import start_server
    from splitlora.transport.server import Hub

    hub = Hub(1, 10.0, secure=False)
    server, port = start_server(hub, "127.0.0.1:0", None, insecure=True)
    try:
        with pytest.raises(ConfigError, match="cannot listen"):
            start_server(Hub(1, 10.0, secure=False), f"127.0.0.1:{port}", None, insecure=True)
    finally:
        server.stop(0)


def test_serve_checks_config_and_data_before_waiting_for_clients(make_config, tmp_path):
    from splitlora.transport.deploy import serve
    from splitlora.data import DataError

    cfg = make_config({**RUN, "data.train_file": str(tmp_path / "missing.csv"), "deploy.join_timeout_s": 600})
    listening = []
    with pytest.raises((ConfigError, DataError), match="missing.csv"):
        serve(cfg, "127.0.0.1:0", None, str(tmp_path / "dep"), insecure=True,
              on_listening=lambda port, hub: listening.append(port))
    assert listening == []


def test_message_limits_follow_the_model(make_config, tmp_path):
    from splitlora.transport.limits import message_limits
    from splitlora.transport.codec import BadMessage, pack, unpack
    from splitlora.transport.server import Hub
    from splitlora.train import build_run

    cfg = make_config(RUN)
    hub = Hub(2, 10.0, secure=False)
    run = build_run(cfg, hub)
    expect = hub.proxies[0].expect
    assert hub.max_bytes == expect.max_bytes < 1 << 20                      # not a fixed 256 MB
    shapes = expect.adapter_shapes
    assert (expect.max_bytes, expect.max_header) == message_limits(64, 2, 256, shapes)
    from splitlora.train import client_data, client_examples, load_examples
    parts = client_examples(cfg, load_examples(cfg)[0])
    assert expect.num_samples == len(client_data(cfg, run.tokenizer, parts, only=0)[0])
    assert expect.bounds.act_norm > 0 and expect.bounds.factor == cfg.deploy.bound_factor
    # a header over the bound is refused before it is parsed
    big = pack("smashed", {}, {"pad": "x" * (expect.max_header + 1)})
    with pytest.raises(BadMessage, match="header of"):
        unpack(big, expect.max_bytes, expect.max_header)


def test_large_bad_inputs_fail_fast_with_one_line(tmp_path, e2e_file, capsys):
    from splitlora.cli import main
    from splitlora.data import MAX_LINE_BYTES, load_e2e, load_jsonl, DataError

    huge_yaml = tmp_path / "huge.yaml"
    huge_yaml.write_text("a: " + "x" * (2 << 20))
    assert main(["train", "--config", str(huge_yaml), "--output", str(tmp_path / "o")]) == 2
    assert "a config is at most 1 MiB" in capsys.readouterr().err
    long_line = tmp_path / "long.jsonl"
    long_line.write_text('{"prompt": "a", "completion": "b"}\n' + '{"prompt": "' + "x" * MAX_LINE_BYTES + '"}\n')
    with pytest.raises(DataError, match=r"long.jsonl:2: a line longer than 1 MiB"):
        load_jsonl(long_line)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"mr,ref\n" + bytes(range(128, 256)) * 8)
    with pytest.raises(DataError, match=r"binary.csv:2: not UTF-8 text"):
        load_e2e(binary)
    config = write_config(tmp_path, e2e_file, {"data.train_file": str(binary)})
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not UTF-8 text" in err


def test_a_client_refused_by_the_server_stops_at_once_and_an_unreachable_one_retries(make_config, certs,
                                                                                     tmp_path):
    from splitlora.transport.certs import create_certs

    other = tmp_path / "other-ca"
    create_certs(other, 2)
    # a refusal mistaken for an unreachable server would be retried 20 times (short waits: a slow machine
    # may need a second diagnosis)
    cfg = make_config({**RUN, "deploy.retries": 20, "deploy.max_backoff_s": 2})
    t, port, hub, result = start(cfg, tmp_path / "dep", certs)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    script = str(Path(sys.executable).with_name("splitlora"))
    mixed = tmp_path / "mixed"   # our CA (it trusts the server), a client certificate of another CA
    mixed.mkdir()
    (mixed / "ca.pem").write_bytes((certs / "ca.pem").read_bytes())
    for ext in ("pem", "key"):
        (mixed / f"client-0.{ext}").write_bytes((other / f"client-0.{ext}").read_bytes())
    for certs_dir, says in ((other, "the server's certificate does not verify"),
                            (mixed, "it does not accept")):
        refused = subprocess.run([script, "client", "--config", str(config), "--client-id", "0", "--server",
                                  f"127.0.0.1:{port}", "--certs", str(certs_dir)], capture_output=True, text=True,
                                 timeout=120, env=ENV)
        assert refused.returncode == 2, refused.stderr
        last = refused.stderr.strip().splitlines()[-1]
        assert last.startswith("splitlora: error: client 0: cannot connect:") and says in last, refused.stderr
    # the real clients are then served
    for p in run_clients(cfg, port, certs, tmp_path):
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
    t.join(120)
    # nobody listens: retried, then given up, in one line
    unreachable = subprocess.run([script, "client", "--config", str(config), "--client-id", "0", "--server",
                                  f"127.0.0.1:{_free_port()}", "--certs", str(certs), "--set", "deploy.retries=1"],
                                 capture_output=True, text=True, timeout=120, env=ENV)
    assert unreachable.returncode == 2
    assert unreachable.stderr.strip().splitlines()[-1] == \
        "splitlora: error: client 0: gave up after 1 reconnection attempts"
