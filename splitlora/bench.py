"""Benchmarks that write JSON. `overhead`: what splitting costs against plain PEFT on one machine;
`deploy`: what a deployment (processes, gRPC, TLS) costs against the in-process simulator (below).

One SplitLoRA step with one client (client forward, smashed message serialized up, server
forward/backward/step, gradient serialized down, client backward/step) is timed against one
centralized PEFT step (PeftModel forward, loss, backward, AdamW step) on the same batch shape and
LoRA. The two are interleaved step by step so drift in machine speed hits both alike.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import time

import torch

from .lora import apply_lora, lora_config
from .models import load_model
from .roles import Learner, OptimConfig, lm_losses
from .split import full_part
from .strategies import Setup, SplitLoRA


def _features(n: int, seq: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    feats = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (seq,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * (seq // 2) + ids[seq // 2:]})
    return feats


def overhead(model_name: str, steps: int = 30, split_layer: int = 3, batch: int = 4, seq: int = 128,
             rank: int = 4, alpha: float = 32, warmup: int = 3, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    lm = load_model(model_name, seed=seed)
    template = apply_lora(lm.model, lora_config(lm.model.config, rank, alpha, 0.1), seed)
    optim = OptimConfig(lr=2e-4, weight_decay=0.01, warmup_steps=0, total_steps=10**6, max_grad_norm=1.0,
                        label_smoothing=0.1)
    feats = _features(batch * 8, seq, lm.model.config.vocab_size, seed)
    setup = Setup(template=template, client_features=[feats], optim=optim, batch_size=batch, seed=seed,
                  pad_token_id=lm.tokenizer.pad_token_id, split_layer=split_layer, num_clients=1,
                  aggregation_interval=10**6, server_mode="shared")
    split = SplitLoRA(setup)

    central = Learner(full_part(template), optim)   # the template's own LoRA params, PEFT forward below
    from .data import collate
    cbatch = collate(feats[:batch], lm.tokenizer.pad_token_id)

    def central_step(t: int) -> None:
        template.train()
        logits = template(input_ids=cbatch["input_ids"], attention_mask=cbatch["attention_mask"]).logits
        lm_losses(logits, cbatch["labels"], optim.label_smoothing)[0].backward()   # the loss the split step uses
        central.step(t)

    times = {"split": [], "central": []}
    bytes_before = None
    for t in range(warmup + steps):
        for name in ("central", "split") if t % 2 == 0 else ("split", "central"):
            if name == "split" and t == warmup:
                bytes_before = (setup.link.bytes_up, setup.link.bytes_down)
            t0 = time.perf_counter()
            central_step(t) if name == "central" else split.step(t)
            if t >= warmup:
                times[name].append(time.perf_counter() - t0)

    client, server = split.clients[0].client.part, split.server.learners[0].part
    h = lm.model.config.hidden_size
    up = (setup.link.bytes_up - bytes_before[0]) / steps
    down = (setup.link.bytes_down - bytes_before[1]) / steps
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "benchmark": "overhead",
        "model": model_name, "split_layer": split_layer, "batch": batch, "seq_len": seq, "lora_rank": rank,
        "steps": steps, "warmup_steps": warmup, "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "ratio": med["split"] / med["central"],
        "ratio_mean": statistics.mean(times["split"]) / statistics.mean(times["central"]),
        "ratio_paired_median": statistics.median(a / b for a, b in zip(times["split"], times["central"])),
        "split_step_s_median": med["split"], "central_step_s_median": med["central"],
        "split_step_s": times["split"], "central_step_s": times["central"],
        "client_trainable_params": sum(p.numel() for p in client.trainable_parameters()),
        "server_trainable_params": sum(p.numel() for p in server.trainable_parameters()),
        "client_total_params": sum(p.numel() for p in client.parameters()),
        "server_total_params": sum(p.numel() for p in server.parameters()),
        "bytes_up_per_step": up, "bytes_down_per_step": down,
        "activation_bytes_BTH4": batch * seq * h * 4,
        "bytes_up_over_BTH4": up / (batch * seq * h * 4),
        "bytes_down_over_BTH4": down / (batch * seq * h * 4),
    }


# -- deploy: a deployed run against the in-process simulator ------------------------------------------

DEPLOY_DOC = """SplitLoRA with 2 clients, deployed on loopback (`splitlora serve` and one `splitlora client`
process per client, mutual TLS) against the same run in one process (`splitlora train`), LoRA dropout
0 so both compute the same losses (`same_losses`).
- step time: mean wall seconds per training step from metrics.jsonl (cumulative `wall_s` counts only
  the steps: no start-up, evaluation or checkpoint writing), the first `skipped_steps` excluded;
  `seconds_per_step`: client compute (both clients), server compute and the rest (transport,
  serialization, waiting), from the metrics' compute counters.
- bytes: `socket`: counted at the sockets by a TCP relay between the clients and the server (TLS
  records, HTTP/2 and gRPC framing, every message); `messages`: what the server counted (summary.json
  `wire`); `accounted`: what the simulator accounts (metrics bytes_up + bytes_down). `*_run`: the
  whole run, which in a deployment also carries the client states the server checkpoints at every
  aggregation (adapter + AdamW moments) and the evaluation reads of client adapters, neither of which
  the simulator sends over a link; `*_training`: only the steps with split training traffic alone
  (`training_steps_compared`: no aggregation or checkpoint at the step or the one before, not the
  last, which includes the final evaluation), from relay counters sampled when each step's metrics
  record appears.
- `deployment_only_messages`: message bytes the simulator has no counterpart for (client states the
  server reads for its checkpoints, commands and acknowledgements).
- memory: peak RSS (ru_maxrss from wait4) of each process; `rss_ratio`: the larger client's peak
  over the peak of a centralized run (`splitlora train`, cenlora, same model, batch and length).
- `process_stats`: per process, peak RSS, CPU seconds, minor page faults and involuntary context
  switches (wait4), whole lifetime including start-up.
- `other_cpu_s`: CPU seconds used on the machine during a run by processes outside the benchmark
  (from /proc/stat): timings taken while it is large are not to be trusted. With `repeats` > 1 each
  precision runs that many (in-process, deployed) pairs, alternating which goes first; the headline
  numbers are those of the median pair by step ratio (the lower median for an even count), and
  `pairs` lists them all.
"""


class ByteRelay:
    """A TCP relay on loopback that counts the bytes each way (up: towards the server)."""

    def __init__(self, target_port: int):
        import socket
        import threading

        self.target_port, self.up, self.down, self.connections = target_port, 0, 0, 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, server, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "down"), daemon=True).start()

    def _pump(self, src, dst, direction: str) -> None:
        import socket

        try:
            while data := src.recv(1 << 20):
                dst.sendall(data)
                with self._lock:
                    setattr(self, direction, getattr(self, direction) + len(data))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.up, self.down

    def close(self) -> None:
        self._listener.close()


def _cli() -> list[str]:
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("splitlora")
    return [str(script)] if script.exists() else [sys.executable, "-m", "splitlora.cli"]


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat; 0 where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _wait_quiet(max_wait_s: float, log, window_s: float = 3.0, max_busy: float = 0.15) -> float:
    """Wait (at most `max_wait_s`) until the machine is idle: under `max_busy` cores busy over a window.
    Returns the seconds waited (the benchmark goes on regardless; `other_cpu_s` tells what ran)."""
    t0 = time.monotonic()
    while max_wait_s > 0:
        before = _busy_cpu_s()
        time.sleep(window_s)
        if (_busy_cpu_s() - before) / window_s < max_busy or time.monotonic() - t0 > max_wait_s:
            break
        log(f"bench deploy: the machine is busy; waiting ({time.monotonic() - t0:.0f} s)")
    return time.monotonic() - t0


def _cpu_mark() -> tuple[float, float, float]:
    """(machine busy CPU seconds, this process's CPU seconds, monotonic time): taken before spawning."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return _busy_cpu_s(), ru.ru_utime + ru.ru_stime, time.monotonic()


def _run_processes(procs: dict, timeout_s: float, tick=None, mark=None, poll_s: float = 0.02) -> dict:
    """Wait for every process of `procs` (name -> Popen, spawned after `mark`), calling `tick()`
    meanwhile; per name, its peak RSS (MiB) and CPU seconds from wait4, so no other process's usage
    is mixed in; `_other_cpu_s`: CPU time of the machine since `mark` not spent by them or by us."""
    import resource

    usage, deadline = {}, time.monotonic() + timeout_s
    busy0, self0, t0 = mark or _cpu_mark()
    try:
        while len(usage) < len(procs):
            for name, proc in procs.items():
                if name in usage:
                    continue
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    if proc.returncode != 0:
                        raise RuntimeError(f"{name} exited with {proc.returncode} (see its log)")
                    usage[name] = {"peak_rss_mib": ru.ru_maxrss / 1024, "cpu_s": ru.ru_utime + ru.ru_stime,
                                   "minor_faults": ru.ru_minflt, "involuntary_switches": ru.ru_nivcsw}
            if time.monotonic() > deadline:
                raise TimeoutError(f"bench deploy: {sorted(set(procs) - set(usage))} still running after {timeout_s} s")
            if tick:
                tick()
            time.sleep(poll_s)
    finally:
        for name, proc in procs.items():
            if name not in usage and proc.returncode is None:
                proc.kill()
                proc.wait()
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    ours = sum(u["cpu_s"] for u in usage.values()) + self1.ru_utime + self1.ru_stime - self0
    usage["_elapsed_s"] = time.monotonic() - t0
    usage["_other_cpu_s"] = max(0.0, _busy_cpu_s() - busy0 - ours)
    return usage


def _metrics(run_dir) -> list[dict]:
    import json
    from pathlib import Path

    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    out = []
    for ln in lines:
        try:
            out.append(json.loads(ln))
        except ValueError:   # a line being written
            break
    return out


def _step_times(records: list[dict], skip: int) -> dict:
    walls = {r["step"]: r["wall_s"] for r in records}
    deltas = [walls[s] - walls[s - 1] for s in sorted(walls) if s > 0 and s - 1 in walls]
    kept = deltas[skip:]
    return {"step_s": statistics.mean(kept), "step_s_median": statistics.median(kept), "step_s_all": deltas}


def _per_step(records: list[dict], skip: int) -> dict:
    """Mean seconds per step of client compute (summed over clients), server compute and the rest
    (transport, serialization, waiting) over the timed steps."""
    by_step = {r["step"]: r for r in records}
    first, last = by_step[skip], by_step[max(by_step)]
    n = last["step"] - first["step"]
    out = {k: (last[f"{k}_compute_s"] - first[f"{k}_compute_s"]) / n for k in ("client", "server")}
    out["other"] = (last["wall_s"] - first["wall_s"]) / n - out["client"] - out["server"]
    return out


def _deploy_config(model: str, steps: int, split_layer: int, batch: int, max_length: int, precision: str,
                   num_clients: int, interval: int, seed: int, strategy: str = "splitlora") -> dict:
    return {
        "model": {"name": model, "split_layer": split_layer},
        "lora": {"rank": 4, "alpha": 32, "dropout": 0.0},
        "data": {"name": "e2e", "max_length": max_length, "val_max_samples": 8},
        "strategy": {"name": strategy, "num_clients": num_clients, "aggregation_interval": interval,
                     "server_mode": "shared"},
        "train": {"max_steps": steps, "batch_size": batch, "seed": seed, "eval_interval": 10**6,
                  "eval_batch_size": 8, "log_interval": 1, "checkpoint_interval": 10**6},
        "wire": {"precision": precision},
        "deploy": {"timeout_s": 600, "join_timeout_s": 600, "retries": 3},
    }


def deploy(model_name: str = "smollm2-135m-instruct", steps: int = 6, split_layer: int = 3, batch: int = 4,
           max_length: int = 128, precisions: tuple[str, ...] = ("fp32", "bf16"), num_clients: int = 2,
           interval: int = 3, skip: int = 1, centralized_steps: int = 2, seed: int = 0, repeats: int = 1,
           quiet_wait_s: float = 0, workdir: str | None = None, timeout_s: float = 3600, sets=(),
           log=print) -> dict:
    """Deployed run vs in-process run (see DEPLOY_DOC); the runs and their logs stay in `workdir`.
    `sets` (`key=value`) are passed to every process as `--set` (e.g. a data file for a smoke run)."""
    import json
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import yaml

    from .certs import create_certs

    if steps <= skip + 1:
        raise ValueError(f"bench deploy: --steps must exceed {skip + 1} (the first {skip} are not timed)")
    root = Path(workdir or tempfile.mkdtemp(prefix="splitlora-bench-deploy-"))
    root.mkdir(parents=True, exist_ok=True)
    certs = root / "certs"
    if not (certs / "ca.pem").exists():
        create_certs(certs, num_clients, overwrite=True)

    def config(precision: str, strategy: str = "splitlora", max_steps: int = steps) -> Path:
        tree = _deploy_config(model_name, max_steps, split_layer, batch, max_length, precision, num_clients,
                              interval, seed, strategy)
        path = root / f"{strategy}-{precision}-{max_steps}.yaml"
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
        return path

    set_args = [a for item in sets for a in ("--set", item)]

    def spawn(args: list[str], log_name: str):
        if args[0] == "train":
            args = [*args, "--overwrite"]   # the bench's own run directories
        with open(root / log_name, "w") as f:
            return subprocess.Popen(_cli() + args + set_args, stdout=f, stderr=subprocess.STDOUT)

    def in_process(cfg_path: Path, out: Path, name: str) -> dict:
        log(f"bench deploy: {name} (in process)")
        mark = _cpu_mark()
        proc = spawn(["train", "--config", str(cfg_path), "--output", str(out), "--no-progress"], f"{name}.log")
        return _run_processes({name: proc}, timeout_s, mark=mark)

    def deployed(cfg_path: Path, out: Path, name: str) -> dict:
        log(f"bench deploy: {name} (server and {num_clients} client processes)")
        shutil.rmtree(out, ignore_errors=True)   # the bench's own run directory from an earlier run
        mark = _cpu_mark()
        server = spawn(["serve", "--config", str(cfg_path), "--address", "127.0.0.1:0", "--certs", str(certs),
                        "--output", str(out), "--no-progress"], f"{name}-server.log")
        port, deadline = None, time.monotonic() + 600
        while port is None:
            m = re.search(r"serving on port (\d+)", (root / f"{name}-server.log").read_text())
            if m:
                port = int(m.group(1))
            elif server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"bench deploy: the server did not start (see {root / name}-server.log)")
            else:
                time.sleep(0.1)
        relay = ByteRelay(port)
        procs = {"server": server}
        for cid in range(num_clients):
            procs[f"client{cid}"] = spawn(["client", "--config", str(cfg_path), "--client-id", str(cid),
                                           "--server", f"127.0.0.1:{relay.port}", "--certs", str(certs)],
                                          f"{name}-client{cid}.log")
        snapshots: dict[int, tuple[int, int]] = {}   # step -> relay counters when its record appeared
        seen = [-1]   # metrics.jsonl size at the last read: it is parsed only when it grew

        def tick():
            try:
                size = os.stat(out / "metrics.jsonl").st_size
            except OSError:
                return
            if size != seen[0]:
                counts = relay.counts()
                seen[0] = size
                for r in _metrics(out)[len(snapshots):]:
                    snapshots[r["step"]] = counts

        try:
            usage = _run_processes(procs, timeout_s, tick, mark)
        finally:
            relay.close()
        tick()
        return {"usage": usage, "socket": relay.counts(), "snapshots": snapshots, "connections": relay.connections}

    def clean_steps() -> list[int]:
        """Steps whose traffic is only split training: no aggregation at the step or the one before
        (the server fetches client states for its checkpoint right after an aggregation step's
        record, so those bytes may be sampled with either step), and not the last (the final
        evaluation reads client adapters)."""
        return [s for s in range(1, steps) if s % interval and (s == 1 or (s - 1) % interval)]

    def pair(precision: str, r: int) -> dict:
        """One in-process run and one deployed run of the same configuration (order alternates)."""
        cfg_path, tag = config(precision), f"{precision}-{r}" if repeats > 1 else precision
        sim_out, dep_out = root / f"sim-{tag}", root / f"dep-{tag}"
        runs = {}
        for kind in (("sim", "dep") if r % 2 == 0 else ("dep", "sim")):
            runs[kind] = {"waited_for_quiet_s": _wait_quiet(quiet_wait_s, log)}
            if kind == "sim":
                runs[kind].update(in_process(cfg_path, sim_out, f"sim-{tag}"))
            else:
                runs[kind].update(deployed(cfg_path, dep_out, f"dep-{tag}"))
        sim_usage, dep = runs["sim"], runs["dep"]
        sim_recs, dep_recs = _metrics(sim_out), _metrics(dep_out)
        summary = json.loads((dep_out / "summary.json").read_text())
        sim_by_step = {r["step"]: r["bytes_up"] + r["bytes_down"] for r in sim_recs}
        accounted = sim_by_step[steps]
        messages = summary["wire"]["bytes_up"] + summary["wire"]["bytes_down"]
        socket = sum(dep["socket"])
        snaps = {s: sum(c) for s, c in dep["snapshots"].items()}
        clean = [s for s in clean_steps() if s in snaps and s - 1 in snaps]
        socket_training = sum(snaps[s] - snaps[s - 1] for s in clean)
        accounted_training = sum(sim_by_step[s] - sim_by_step[s - 1] for s in clean)
        sim_t, dep_t = _step_times(sim_recs, skip), _step_times(dep_recs, skip)
        return {
            "step_ratio": dep_t["step_s"] / sim_t["step_s"],
            "step_ratio_median": dep_t["step_s_median"] / sim_t["step_s_median"],
            "deployed_step_s": dep_t["step_s"], "in_process_step_s": sim_t["step_s"],
            "deployed_step_s_all": dep_t["step_s_all"], "in_process_step_s_all": sim_t["step_s_all"],
            "seconds_per_step": {"deployed": _per_step(dep_recs, skip), "in_process": _per_step(sim_recs, skip)},
            "wire_over_accounted_run": socket / accounted,
            "wire_over_accounted_training": socket_training / accounted_training if accounted_training else None,
            "messages_over_accounted_run": messages / accounted,
            "wire_over_messages_run": socket / messages,
            "training_steps_compared": clean,
            "bytes": {
                "accounted_run": {"up": sim_recs[-1]["bytes_up"], "down": sim_recs[-1]["bytes_down"]},
                "messages_run": {"up": summary["wire"]["bytes_up"], "down": summary["wire"]["bytes_down"]},
                "socket_run": {"up": dep["socket"][0], "down": dep["socket"][1]},
                "socket_training": socket_training, "accounted_training": accounted_training,
                "deployment_only_messages": messages - accounted,
                "socket_at_step": {str(s): list(c) for s, c in sorted(dep["snapshots"].items())},
            },
            "connections": dep["connections"],
            "same_losses": [r["train_loss"] for r in dep_recs] == [r["train_loss"] for r in sim_recs],
            "same_val_losses": [r["val_loss"] for r in dep_recs] == [r["val_loss"] for r in sim_recs],
            "peak_rss_mib": {"in_process": sim_usage[f"sim-{tag}"]["peak_rss_mib"],
                             "server": dep["usage"]["server"]["peak_rss_mib"],
                             "clients": [dep["usage"][f"client{i}"]["peak_rss_mib"] for i in range(num_clients)]},
            "process_stats": {"in_process": sim_usage[f"sim-{tag}"],
                              **{k: v for k, v in dep["usage"].items() if not k.startswith("_")}},
            "other_cpu_s": {"in_process": sim_usage["_other_cpu_s"], "deployed": dep["usage"]["_other_cpu_s"]},
            "elapsed_s": {"in_process": sim_usage["_elapsed_s"], "deployed": dep["usage"]["_elapsed_s"]},
            "waited_for_quiet_s": {"in_process": sim_usage["waited_for_quiet_s"],
                                   "deployed": dep["waited_for_quiet_s"]},
            "order": "in_process first" if r % 2 == 0 else "deployed first",
        }

    results: dict = {}
    for precision in precisions:
        pairs = [pair(precision, r) for r in range(repeats)]
        # the headline pair is the median one by step ratio (other processes' CPU is recorded per pair)
        best = sorted(range(repeats), key=lambda i: pairs[i]["step_ratio"])[(repeats - 1) // 2]
        results[precision] = {**pairs[best], "headline_pair": best}
        if repeats > 1:
            results[precision]["pairs"] = [
                {k: p[k] for k in ("step_ratio", "step_ratio_median", "deployed_step_s", "in_process_step_s",
                                   "deployed_step_s_all", "in_process_step_s_all", "seconds_per_step",
                                   "other_cpu_s", "order",
                                   "wire_over_accounted_training", "same_losses")} for p in pairs]
            results[precision]["step_ratio_median_over_pairs"] = statistics.median(p["step_ratio"] for p in pairs)

    _wait_quiet(quiet_wait_s, log)
    cen = in_process(config(precisions[0], "cenlora", centralized_steps), root / "cenlora", "cenlora")
    first = results[precisions[0]]
    client_peak = max(first["peak_rss_mib"]["clients"])
    return {
        "benchmark": "deploy", "description": DEPLOY_DOC,
        "model": model_name, "split_layer": split_layer, "num_clients": num_clients, "batch": batch,
        "max_length": max_length, "steps": steps, "skipped_steps": skip, "aggregation_interval": interval,
        "transport": "gRPC, mutual TLS, loopback through a counting TCP relay",
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "torch_threads_per_process": torch.get_num_threads(), "torch": torch.__version__,
        "goals": {"step_ratio": 1.10, "wire_over_accounted": 1.02, "rss_ratio": 0.40},
        "precisions": results,
        "step_ratio": {p: r["step_ratio"] for p, r in results.items()},
        "wire_over_accounted_run": {p: r["wire_over_accounted_run"] for p, r in results.items()},
        "wire_over_accounted_training": {p: r["wire_over_accounted_training"] for p, r in results.items()},
        "client_peak_rss_mib": client_peak, "centralized_peak_rss_mib": cen["cenlora"]["peak_rss_mib"],
        "centralized_steps": centralized_steps, "centralized_other_cpu_s": cen["_other_cpu_s"],
        "rss_ratio": client_peak / cen["cenlora"]["peak_rss_mib"],
        "workdir": str(root),
    }


def _train_or_reuse(cfg, run_dir, reuse: bool, log) -> dict:
    """The run's summary: read if `reuse` and run_dir holds a finished run of the same config, else trained."""
    import json

    from .compare import _same_config
    from .train import train

    if reuse and (run_dir / "summary.json").exists() and _same_config(run_dir, cfg):
        log(f" (read from {run_dir})")
        return json.loads((run_dir / "summary.json").read_text())
    log("")
    return train(cfg, run_dir, progress=False, overwrite=True)   # the bench's own run directory


# -- hetero: heterogeneous clients and Kill & Revive ------------------------------------------------

HETERO_DOC = """Heterogeneous clients (configs/hsplitlora.yaml: a phone, an edge board and a laptop) on the same
data, seed and number of samples: `hsplitlora` (per-client splits and importance-based ranks,
noise-free aggregation), `hetlora` (same splits and ranks, zero-padded averaging of A and B) and
`splitlora_weakest` (plain SplitLoRA with every client held to the weakest client's split and rank,
same LoRA scaling). Then Kill & Revive: `dlora` (configs/dlora.yaml) against `splitlora` with the
same config. Per run: validation loss after the same samples, client FLOPs (simulated device compute
from the cost model, all clients), bytes both ways, simulated time, client trainable parameters.
`dlora_savings`: device FLOPs and bytes saved by dlora against splitlora, and the validation-loss cost."""


def hetero(steps: int | None = None, workdir: str | None = None, reuse: bool = False, sets=(), log=print) -> dict:
    """See HETERO_DOC; with `reuse`, runs already finished in `workdir` with the same config are read.
    `sets` (`key=value`) apply to every config (e.g. a smaller model or data file for a smoke run)."""
    import json
    import tempfile
    from pathlib import Path

    from .config import REPO_ROOT, load_config
    from .train import build_run

    root = Path(workdir or tempfile.mkdtemp(prefix="splitlora-bench-hetero-"))
    sets = [*sets, *([f"train.max_steps={steps}"] if steps else [])]
    het = load_config(REPO_ROOT / "configs" / "hsplitlora.yaml", sets)
    probe = build_run(het).strategy
    weak_split, weak_rank = probe.splits[0], max(1, round(min(probe.mean_ranks())))
    layout = {"splits": probe.splits, "mean_ranks": probe.mean_ranks(),
              "client_trainable": [probe.client_trainable(i) for i in range(len(probe.splits))]}
    del probe
    scaling = het.lora.alpha / het.lora.rank
    variants = {
        "hsplitlora": het,
        "hetlora": load_config(REPO_ROOT / "configs" / "hetlora.yaml", sets),
        "splitlora_weakest": load_config(REPO_ROOT / "configs" / "hsplitlora.yaml", sets + [
            "strategy.name=splitlora", f"model.split_layer={weak_split}", f"lora.rank={weak_rank}",
            f"lora.alpha={scaling * weak_rank}"]),
        "dlora": load_config(REPO_ROOT / "configs" / "dlora.yaml", sets),
        "splitlora": load_config(REPO_ROOT / "configs" / "dlora.yaml", sets + ["strategy.name=splitlora"]),
    }
    runs = {}
    for name, cfg in variants.items():
        s = _train_or_reuse(cfg, root / name, reuse, lambda m: log(f"bench hetero: {name}{m}"))
        runs[name] = {k: s.get(k) for k in ("samples_seen", "initial_val_loss", "final_val_loss", "best_val_loss",
                                            "client_flops", "bytes_up", "bytes_down", "sim_time_s", "wall_s",
                                            "client_trainable_params", "client_splits", "client_mean_ranks",
                                            "alive_client_adapters", "export_rank", "export_max_relative_error")}
        runs[name]["bytes"] = s["bytes_up"] + s["bytes_down"]
        if name == "dlora":
            runs[name]["dlora_events"] = s.get("dlora_events")
    d, sp = runs["dlora"], runs["splitlora"]
    return {
        "benchmark": "hetero", "description": HETERO_DOC, "steps": steps or het.train.max_steps,
        "machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "heterogeneous_layout": layout, "weakest": {"split_layer": weak_split, "rank": weak_rank},
        "runs": runs,
        "dlora_savings": {
            "client_flops_saved": 1 - d["client_flops"] / sp["client_flops"],
            "bytes_saved": 1 - d["bytes"] / sp["bytes"],
            "val_loss_cost": d["final_val_loss"] - sp["final_val_loss"]},
        "workdir": str(root),
        "configs": {k: json.loads(json.dumps(v.to_dict())) for k, v in variants.items()},
    }


# -- noise: what the defense costs in validation loss ------------------------------------------------

NOISE_DOC = """The validation-loss cost of the defense: the same config (same data, seed and steps) trained
clean, with noise on the smashed activations (privacy.clip_norm, privacy.noise_multiplier) at each
level, and, for a U-shaped config, with noise on the gradient up (privacy.grad_clip_norm,
privacy.grad_noise_multiplier) at each level. `final_val_loss` is the run's: the trained global model
on clean inputs; `val_loss_noisy_split` is the same model with the run's clipping and noise on the
activations at the split, as its server-side blocks saw them in training."""


def noisy_validation_loss(cfg, run_dir, seed: int = 0) -> float:
    """Validation loss of a run's exported model with the run's clipping and noise on the activations at
    the split: the inputs its server-side blocks saw in training (the clean loss is the run's own)."""
    from pathlib import Path

    from peft import PeftModel

    from . import data as D
    from .roles import clip_and_noise
    from .split import family_of
    from .train import load_examples, model_loss

    lm = load_model(cfg.model.name, seed=cfg.train.seed)
    model = PeftModel.from_pretrained(lm.model, Path(run_dir) / "adapter")
    features = D.tokenize(load_examples(cfg)[1], lm.tokenizer, cfg.data.max_length)[: cfg.data.val_max_samples]
    block = family_of(lm.model.config).modules(lm.model)["blocks"][cfg.model.split_layer - 1]
    gen, p = torch.Generator().manual_seed(seed), cfg.privacy

    def noisy(module, inputs, out):
        if isinstance(out, tuple):
            return (clip_and_noise(out[0], p.clip_norm, p.noise_multiplier, gen), *out[1:])
        return clip_and_noise(out, p.clip_norm, p.noise_multiplier, gen)

    handle = block.register_forward_hook(noisy)
    try:
        return model_loss(model, features, lm.tokenizer.pad_token_id, cfg.train.eval_batch_size)
    finally:
        handle.remove()


def noise(config: str, output_dir: str, levels=(0.005, 0.02), clip_norm: float = 1000.0, grad_levels=(),
          grad_clip_norm: float | None = None, sets=(), reuse: bool = False, log=print) -> dict:
    """See NOISE_DOC; runs go to output_dir/{clean, act-S, grad-S}; with `reuse`, finished runs with the
    same config are read."""
    from pathlib import Path

    from .config import ConfigError, load_config

    root = Path(output_dir)
    variants = {"clean": []}
    variants.update({f"act-{s:g}": [f"privacy.clip_norm={clip_norm}", f"privacy.noise_multiplier={s}"] for s in levels})
    if grad_levels and grad_clip_norm is None:
        raise ConfigError("--grad-clip-norm: the gradient's noise is scaled by its clip norm (see `splitlora attack`'s "
                          "median_example_norm)")
    variants.update({f"grad-{s:g}": [f"privacy.grad_clip_norm={grad_clip_norm}", f"privacy.grad_noise_multiplier={s}"]
                     for s in grad_levels})
    runs = {}
    for name, extra in variants.items():
        cfg = load_config(config, [*sets, *extra])
        if grad_levels and not cfg.model.top_layers:
            raise ConfigError("model.top_layers: noise on the gradient up needs a U-shaped config")
        s = _train_or_reuse(cfg, root / name, reuse, lambda m: log(f"bench noise: {name}{m}"))
        p = cfg.privacy
        runs[name] = {"clip_norm": p.clip_norm, "noise_multiplier": p.noise_multiplier,
                      "grad_clip_norm": p.grad_clip_norm, "grad_noise_multiplier": p.grad_noise_multiplier,
                      **{k: s[k] for k in ("initial_val_loss", "final_val_loss", "step")}}
        runs[name]["val_loss_cost"] = runs[name]["final_val_loss"] - runs["clean"]["final_val_loss"]
        if p.clip_norm is not None:
            runs[name]["val_loss_noisy_split"] = noisy_validation_loss(cfg, root / name)
    return {"benchmark": "noise", "description": NOISE_DOC, "config": str(config), "sets": list(sets),
            "top_layers": load_config(config, list(sets)).model.top_layers, "runs": runs, "workdir": str(root)}
