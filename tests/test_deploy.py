"""Deployment on loopback: server and clients over gRPC with mutual TLS compute what the simulator
computes, refuse bad peers and bad messages, and survive a client that dies."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
import yaml

from conftest import assert_states_equal, exported_adapter, read_metrics, run_training
from splitlora.transport.certs import create_certs
from splitlora.transport.codec import FULL_METHOD, pack
from splitlora.transport.deploy import serve

# every role draws its LoRA dropout from its own stream (runtime.RandomStream), so a deployed run
# equals the single-process simulator bit for bit with dropout as without it
BASE = {"strategy.num_clients": 2, "strategy.aggregation_interval": 2, "train.max_steps": 4,
        "deploy.timeout_s": 20, "deploy.join_timeout_s": 30, "deploy.retries": 3}


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    create_certs(d, 3)
    return d


def start(cfg, out, certs_dir, insecure=False):
    """serve() in a thread; returns (thread, port, hub, result dict)."""
    ready: queue.Queue = queue.Queue()
    result: dict = {}

    def run():
        try:
            result["summary"] = serve(cfg, "127.0.0.1:0", str(certs_dir), str(out), insecure=insecure,
                                      progress=False, on_listening=lambda port, hub: ready.put((port, hub)))
        except Exception as e:  # noqa: BLE001 - reported to the test
            result["error"] = e
            ready.put((None, None))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    port, hub = ready.get(timeout=60)
    return t, port, hub, result


def run_clients(cfg, port, certs_dir, tmp_path, ids=(0, 1)):
    """Real client processes (`splitlora client ...`); each has its own RNG, as on separate machines."""
    config = tmp_path / "client.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    script = Path(sys.executable).with_name("splitlora")
    return [subprocess.Popen([str(script), "client", "--config", str(config), "--client-id", str(i),
                              "--server", f"127.0.0.1:{port}", "--certs", str(certs_dir)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"})
            for i in ids]


def finished(proc, timeout: float) -> str:
    """The process's stderr once it has exited; if it has not within `timeout`, SIGABRT makes it print
    every thread's stack (PYTHONFAULTHANDLER) and the test fails with those stacks."""
    import signal

    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        err = proc.communicate(timeout=30)[1]
        raise AssertionError(f"a process did not exit within {timeout} s; its stacks:\n{err[-6000:]}") from None


def wait_all(procs, server_thread, result, timeout=180):
    for p in procs:
        try:
            err = finished(p, timeout)
        except AssertionError as e:
            raise AssertionError(f"a client did not finish; the server: {result.get('error', 'running')}; {e}") from None
        assert p.returncode == 0, err[-2000:]
    server_thread.join(timeout)
    assert "error" not in result, result.get("error")


HET = {"strategy.name": "hsplitlora", "lora.rank": 8, "cost.clients": ["phone", "edge"], "hsplit.client_step_s": 1e-3,
       "hsplit.max_split_layer": 3, "hsplit.realloc_threshold": 0.0, "train.eval_interval": 2, "train.max_steps": 6}
DLORA = {"strategy.name": "dlora", "strategy.aggregation_interval": 1, "dlora.warmup_steps": 0,
         "dlora.threshold": 1e9, "dlora.revive_interval": 4, "train.max_steps": 6}
DEPLOYED = {"shared": {"strategy.server_mode": "shared"}, "per_client": {"strategy.server_mode": "per_client"},
            "fedlora": {"strategy.name": "fedlora"}, "sl": {"strategy.name": "sl"},
            "clipped": {"strategy.aggregation": "clipped"},
            "bf16": {"runtime.dtype": "bf16", "runtime.autocast": "bf16", "model.top_layers": 1},
            "nf4": {"runtime.dtype": "bf16", "model.quantization": "nf4"},
            "dropout": {"lora.dropout": 0.1}, "dropout_fedlora": {"lora.dropout": 0.1, "strategy.name": "fedlora"},
            "dropout_ushape": {"lora.dropout": 0.1, "model.top_layers": 1, "strategy.server_mode": "per_client"},
            # DLoRA: every module killed at step 2 (the clients compute no backward), revived at 4, killed at 5
            "dlora": {**DLORA, "lora.dropout": 0.1},
            # U-shaped, everything killed: the client gets no gradient but still steps (its top)
            "dlora_ushape": {**DLORA, "model.top_layers": 1, "model.split_layer": 1, "strategy.server_mode": "per_client"},
            # clients at their own splits and ranks (1 and 2 blocks); ranks re-decided at every aggregation
            "hsplitlora": {**HET, "lora.dropout": 0.1},
            "hsplitlora_ushape": {**HET, "model.top_layers": 1, "hsplit.client_step_s": 2e-3},
            "hetlora": {**HET, "strategy.name": "hetlora"},
            # the other aggregations (the default keeps adapters): a new adapter in the fold (stack_svd), B restarted
            "hsplit_svd": {**HET, "hsplit.aggregation": "stack_svd"},
            "hsplit_fold_ushape": {**HET, "hsplit.aggregation": "stack_fold", "model.top_layers": 1,
                                   "hsplit.client_step_s": 2e-3},
            # a user's conversations through datasets, rendered as chat, clients split by a column's values
            "hf_messages": {"data.name": "hf", "data.format": "messages", "data.chat_template": "auto",
                            "data.path": str(Path(__file__).resolve().parents[1] / "data/examples/chat.jsonl"),
                            "data.max_samples": 40, "data.max_length": 512, "data.partition": "dirichlet",
                            "data.partition_attribute": "food"}}


@pytest.mark.parametrize("label", list(DEPLOYED))
def test_deployed_run_equals_simulator(label, make_config, certs, tmp_path):
    cfg = make_config({**BASE, **DEPLOYED[label]})
    run_training(cfg, tmp_path / "sim")
    t, port, hub, result = start(cfg, tmp_path / "dep", certs)
    wait_all(run_clients(cfg, port, certs, tmp_path), t, result)
    sim, dep = read_metrics(tmp_path / "sim"), read_metrics(tmp_path / "dep")
    assert [r["train_loss"] for r in dep] == [r["train_loss"] for r in sim]
    assert [r["val_loss"] for r in dep] == [r["val_loss"] for r in sim]
    assert_states_equal(exported_adapter(tmp_path / "dep"), exported_adapter(tmp_path / "sim"))
    if cfg.strategy.name == "dlora":   # the same modules killed and revived at the same steps
        assert [r["killed_client_adapters"] for r in dep] == [r["killed_client_adapters"] for r in sim]
        assert [r["alive_client_adapters"] for r in dep] == [r["alive_client_adapters"] for r in sim]
        assert [bool(r["killed_client_adapters"]) for r in dep] == [False, False, True, True, False, True, True]
    if cfg.strategy.name in ("hsplitlora", "hetlora"):   # the same splits and ranks, decided at the same steps
        for key in ("client_splits", "client_mean_ranks"):
            assert [r[key] for r in dep] == [r[key] for r in sim], key
        assert len({tuple(r["client_splits"]) for r in dep}) == 1 and len(set(dep[-1]["client_splits"])) == 2
        assert result["summary"].get("reallocations") == json.loads((tmp_path / "sim" / "summary.json").read_text()).get(
            "reallocations")
    wire = result["summary"]["wire"]
    assert set(wire["per_client"]) == {"0", "1"} and all(v["bytes_up"] > 0 for v in wire["per_client"].values())
    assert dep[-1]["dropouts"] == 0 and dep[-1]["live_clients"] == 2 and dep[-1]["refused_updates"] == 0
    # what the strategy accounted is what crossed the wire (the same safetensors messages); the client states
    # read for the checkpoint at every aggregation are counted apart, not as the run's traffic
    ckpt = wire["checkpoint"]["per_client"]
    assert set(ckpt) == {"0", "1"} and all(v["bytes_up"] > 0 for v in ckpt.values())
    # (measured: within 0.8 % for the split strategies, 4 % for fedlora, whose messages are few and small
    # next to the commands' headers)
    for key in ("bytes_up", "bytes_down"):
        assert abs(dep[-1][key] / sim[-1][key] - 1) < 0.05, key


def _hello(cid):
    return pack("hello", meta={"client_id": cid, "num_samples": 1, "num_trainable": 1})


def _session(port, creds, messages, timeout=10):
    channel = grpc.secure_channel(f"127.0.0.1:{port}", creds, options=[("grpc.enable_http_proxy", 0)]) \
        if creds is not None else grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        return list(channel.stream_stream(FULL_METHOD)(iter(messages), timeout=timeout))
    finally:
        channel.close()


def test_bad_peers_are_refused(make_config, certs, tmp_path):
    from splitlora.transport.certs import client_credentials

    other = tmp_path / "other-ca"
    create_certs(other, 1)
    cfg = make_config({**BASE, "deploy.join_timeout_s": 20})
    t, port, hub, result = start(cfg, tmp_path / "dep", certs)
    # a certificate from another CA, and no certificate at all: the TLS handshake fails
    with pytest.raises(grpc.RpcError) as e:
        _session(port, client_credentials(other, 0), [_hello(0)])
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with open(certs / "ca.pem", "rb") as f:
        no_cert = grpc.ssl_channel_credentials(root_certificates=f.read())
    with pytest.raises(grpc.RpcError) as e:
        _session(port, no_cert, [_hello(0)])
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    # a valid certificate for client 2 claiming to be client 0
    with pytest.raises(grpc.RpcError) as e:
        _session(port, client_credentials(certs, 2), [_hello(0)])
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "client 2" in e.value.details()
    # an unknown client id, and garbage instead of a hello
    with pytest.raises(grpc.RpcError) as e:
        _session(port, client_credentials(certs, 2), [_hello(7)])
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        _session(port, client_credentials(certs, 0), [b"\x00garbage"])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert hub.refused >= 3
    # the server still trains afterwards
    wait_all(run_clients(cfg, port, certs, tmp_path), t, result)
    assert result["summary"]["step"] == 4


def test_insecure_only_on_loopback(make_config, tmp_path):
    from splitlora.config import ConfigError

    cfg = make_config(BASE)
    with pytest.raises(ConfigError, match="loopback"):
        serve(cfg, "0.0.0.0:0", None, str(tmp_path / "o"), insecure=True)


def test_a_killed_client_is_dropped_and_the_run_completes(make_config, certs, tmp_path):
    import time

    cfg = make_config({**BASE, "strategy.num_clients": 3, "train.max_steps": 6, "deploy.timeout_s": 10,
                       "deploy.retries": 0})
    t, port, hub, result = start(cfg, tmp_path / "dep", certs)
    procs = run_clients(cfg, port, certs, tmp_path, ids=(0, 1, 2))
    metrics = tmp_path / "dep" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    procs[2].kill()                       # mid-run: client 2's process dies
    procs[2].wait()
    wait_all(procs[:2], t, result)
    summary = result["summary"]
    assert summary["step"] == 6
    assert summary["dropouts"] >= 1 and {e["client"] for e in summary["dropout_events"]} == {2}
    records = read_metrics(tmp_path / "dep")
    assert records[-1]["live_clients"] == 2
    assert all(r["train_loss"] == r["train_loss"] for r in records[1:])   # no NaN losses


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# dlora with LoRA dropout: the clients, ahead of the checkpoint, are put back to it, frozen modules and
# dropout streams included (every module dies at step 4, revives at 5, dies at 6, ...)
KILLED = {"splitlora": {}, "dlora_dropout": {"strategy.name": "dlora", "dlora.warmup_steps": 0, "dlora.threshold": 1e9,
                                             "dlora.revive_interval": 5, "lora.dropout": 0.1},
          # the checkpoint holds the folded base weights; the clients get them back with their layouts
          "hsplitlora": {k: v for k, v in HET.items() if k != "train.max_steps"}}
# (the default, stack_keep: each client's own base, under the adapter it keeps, comes back from the checkpoint)
KILLED["hsplit_fold"] = {**KILLED["hsplitlora"], "hsplit.aggregation": "stack_fold"}


@pytest.mark.parametrize("label", list(KILLED))
def test_server_killed_and_resumed_completes_without_applying_a_round_twice(label, make_config, certs, tmp_path):
    """The server dies after a checkpoint; `serve --resume` continues from it, the clients reconnect by
    themselves, and the run ends exactly where an uninterrupted run ends."""
    import signal
    import time

    cfg = make_config({**BASE, "train.max_steps": 12, "deploy.retries": 12, **KILLED[label]})
    run_training(cfg, tmp_path / "sim")
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    port, out = _free_port(), tmp_path / "dep"
    script = str(Path(sys.executable).with_name("splitlora"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def server(*extra):
        return subprocess.Popen([script, "serve", "--config", str(config), "--address", f"127.0.0.1:{port}",
                                 "--certs", str(certs), "--output", str(out), "--no-progress", *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    first = server()
    clients = run_clients(cfg, port, certs, tmp_path)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 120
    # wait for the first aggregation's checkpoint (round 1 at step 2), then kill the server mid-round
    while time.monotonic() < deadline and not (
            (out / "checkpoint" / "state.json").exists() and metrics.exists()
            and any(r["step"] >= 3 for r in read_metrics(out))):
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = max(r["step"] for r in read_metrics(out))
    assert 3 <= killed_at < 12                                     # it died mid-run
    second = server("--resume")
    out2, err2 = second.communicate(timeout=240)
    assert second.returncode == 0, err2[-3000:]
    for c in clients:
        err = finished(c, 60)
        assert c.returncode == 0, err[-2000:]
    records = read_metrics(out)
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) and steps[-1] == 12         # no step logged twice
    assert [r["round"] for r in records if r["step"] % 2 == 0 and r["step"]] == [1, 2, 3, 4, 5, 6]
    sim = read_metrics(tmp_path / "sim")
    assert [r["train_loss"] for r in records] == [r["train_loss"] for r in sim]
    assert_states_equal(exported_adapter(out), exported_adapter(tmp_path / "sim"))
    if label == "hsplitlora":
        assert [r["client_mean_ranks"] for r in records] == [r["client_mean_ranks"] for r in sim]
        assert [r["val_loss"] for r in records] == [r["val_loss"] for r in sim]
    if label == "dlora_dropout":
        assert [r["alive_client_adapters"] for r in records] == [r["alive_client_adapters"] for r in sim]
        assert any(r["alive_client_adapters"] == 0 for r in records[killed_at:])


@pytest.mark.parametrize("name", ["cenlora"])
def test_what_cannot_be_deployed_is_refused_before_listening(name, make_config):
    from splitlora.config import ConfigError
    from splitlora.transport.deploy import _check

    with pytest.raises(ConfigError, match=f"{name} cannot be deployed"):
        _check(make_config({"strategy.name": name}), "127.0.0.1:1", insecure=True)


def test_a_heterogeneous_client_replaced_by_a_new_process_rejoins_at_its_own_split_and_ranks(
        make_config, certs, tmp_path):
    """hsplitlora, deployed: a new process of client 1 takes over mid-run (pretrained base, no state) and
    the old one dies; the server gives the new one its layout with every fold so far, and it trains to
    the end with the others."""
    import time

    cfg = make_config({**BASE, **HET, "train.max_steps": 30, "train.eval_interval": 10, "deploy.timeout_s": 10,
                       "deploy.retries": 5})
    t, port, hub, result = start(cfg, tmp_path / "dep", certs)
    proxy, layouts, calls = hub.proxies[1], [], []
    set_layout, forward = proxy.set_layout, proxy.forward

    def gated_forward():   # its third batch (after the first fold) waits for the new process to say hello
        calls.append(proxy.incarnation)
        while len(calls) == 3 and proxy.incarnation == calls[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        return forward()

    proxy.set_layout = lambda *args: (layouts.append(args), set_layout(*args))[1]   # (split, ranks, adapter, base)
    proxy.forward = gated_forward
    deadline = time.monotonic() + 120
    procs = run_clients(cfg, port, certs, tmp_path)
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    incarnation = proxy.incarnation
    new = run_clients(cfg, port, certs, tmp_path, ids=(1,))
    while proxy.incarnation == incarnation and time.monotonic() < deadline:
        time.sleep(0.05)
    procs[1].kill()                       # the old process dies (its session was already replaced)
    procs[1].wait()
    wait_all([procs[0], *new], t, result)
    summary = result["summary"]
    assert summary["step"] == 30 and proxy.incarnation > incarnation
    # the new process was asked for a batch before it had its layout: it refused, and was given it next
    assert {e["client"] for e in summary["dropout_events"]} == {1}
    records = read_metrics(tmp_path / "dep")
    assert records[-1]["live_clients"] == 2 and records[-1]["client_splits"] == records[1]["client_splits"]
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    # its layout at the start (pretrained base: no weights sent), then to the new process, with the base
    # weights of its own modules at the fold the server held, at its own split and ranks
    assert len(layouts) >= 2 and layouts[0][3] == {} and all(lay[0] == layouts[0][0] for lay in layouts)
    assert set(layouts[-1][3]) == set(layouts[-1][1]) and len(layouts[-1][3]) == 2 * layouts[-1][0]
