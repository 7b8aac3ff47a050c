"""`bench deploy`: what a deployment (processes, gRPC, TLS) costs against the in-process simulator."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
from pathlib import Path

import torch
import yaml

from .common import cpu_mark as _cpu_mark, metrics as _metrics, run_processes as _run_processes
from .common import server_port as _server_port, spawn as _spawn, wait_quiet as _wait_quiet

DEPLOY_DOC = """SplitLoRA with 2 clients, deployed on loopback (`splitlora serve` and one `splitlora client`
process per client, mutual TLS) against the same run in one process (`splitlora train`), LoRA dropout
0 so both compute the same losses (`same_losses`).
- step time: mean wall seconds per training step from metrics.jsonl (cumulative `wall_s` counts only
  the steps: no start-up, evaluation or checkpoint writing), the first `skipped_steps` excluded;
  `seconds_per_step`: client compute (both clients), server compute and the rest (transport,
  serialization, waiting), from the metrics' compute counters.
- bytes: `socket`: counted at the sockets by a TCP relay between the clients and the server (TLS
  records, HTTP/2 and gRPC framing, every message); `messages`: what the server counted (summary.json
  `wire`: the run's traffic, and apart the `checkpoint` reads and restores of client states; both
  here); `accounted`: what the simulator accounts (metrics bytes_up + bytes_down). `*_run`: the
  whole run, which in a deployment also carries the client states the server checkpoints at every
  aggregation (adapter + AdamW moments) and the evaluation reads of client adapters, neither of which
  the simulator sends over a link; `*_training`: only the steps with split training traffic alone
  (`training_steps_compared`: no aggregation or checkpoint at the step or the one before, not the
  last, which includes the final evaluation), from relay counters sampled when each step's metrics
  record appears.
- `deployment_only_messages`: message bytes the simulator has no counterpart for (client states the
  server reads for its checkpoints, commands and acknowledgements).
- memory: peak RSS of each process (its own VmHWM, written at exit: wait4's ru_maxrss would add this
  process's memory, counted in the fork before exec); `rss_ratio`: the larger client's peak
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


def step_times(records: list[dict], skip: int) -> dict:
    walls = {r["step"]: r["wall_s"] for r in records}
    deltas = [walls[s] - walls[s - 1] for s in sorted(walls) if s > 0 and s - 1 in walls]
    kept = deltas[skip:]
    return {"step_s": statistics.mean(kept), "step_s_median": statistics.median(kept), "step_s_all": deltas}


def per_step(records: list[dict], skip: int) -> dict:
    """Mean seconds per step of client compute (summed over clients), server compute and the rest
    (transport, serialization, waiting) over the timed steps."""
    by_step = {r["step"]: r for r in records}
    first, last = by_step[skip], by_step[max(by_step)]
    n = last["step"] - first["step"]
    out = {k: (last[f"{k}_compute_s"] - first[f"{k}_compute_s"]) / n for k in ("client", "server")}
    out["other"] = (last["wall_s"] - first["wall_s"]) / n - out["client"] - out["server"]
    return out


def deploy_config(model: str, steps: int, split_layer: int, batch: int, max_length: int, precision: str,
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


class _DeployBench:
    """One `bench deploy`: its settings, its work directory, and the runs it compares."""

    def __init__(self, model_name, steps, split_layer, batch, max_length, num_clients, interval, skip, seed,
                 repeats, quiet_wait_s, timeout_s, sets, log, root, certs):
        self.model_name, self.steps, self.split_layer, self.batch = model_name, steps, split_layer, batch
        self.max_length, self.num_clients, self.interval, self.skip = max_length, num_clients, interval, skip
        self.seed, self.repeats, self.quiet_wait_s, self.timeout_s = seed, repeats, quiet_wait_s, timeout_s
        self.sets, self.log, self.root, self.certs = sets, log, root, certs

    def config(self, precision: str, strategy: str = "splitlora", max_steps: int | None = None) -> Path:
        max_steps = max_steps or self.steps
        tree = deploy_config(self.model_name, max_steps, self.split_layer, self.batch, self.max_length, precision,
                             self.num_clients, self.interval, self.seed, strategy)
        path = self.root / f"{strategy}-{precision}-{max_steps}.yaml"
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
        return path

    def spawn(self, args: list[str], log_name: str):
        return _spawn(self.root, args, log_name, self.sets)

    def in_process(self, cfg_path: Path, out: Path, name: str) -> dict:
        self.log(f"bench deploy: {name} (in process)")
        mark = _cpu_mark()
        proc = self.spawn(["train", "--config", str(cfg_path), "--output", str(out), "--no-progress"], f"{name}.log")
        return _run_processes({name: proc}, self.timeout_s, mark=mark)

    def deployed(self, cfg_path: Path, out: Path, name: str) -> dict:
        self.log(f"bench deploy: {name} (server and {self.num_clients} client processes)")
        shutil.rmtree(out, ignore_errors=True)   # the bench's own run directory from an earlier run
        mark = _cpu_mark()
        server = self.spawn(["serve", "--config", str(cfg_path), "--address", "127.0.0.1:0", "--certs", str(self.certs),
                        "--output", str(out), "--no-progress"], f"{name}-server.log")
        port = _server_port(server, self.root / f"{name}-server.log")
        relay = ByteRelay(port)
        procs = {"server": server}
        for cid in range(self.num_clients):
            procs[f"client{cid}"] = self.spawn(["client", "--config", str(cfg_path), "--client-id", str(cid),
                                           "--server", f"127.0.0.1:{relay.port}", "--certs", str(self.certs)],
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
            usage = _run_processes(procs, self.timeout_s, tick, mark)
        finally:
            relay.close()
        tick()
        return {"usage": usage, "socket": relay.counts(), "snapshots": snapshots, "connections": relay.connections}

    def clean_steps(self) -> list[int]:
        """Steps whose traffic is only split training: no aggregation at the step or the one before
        (the server fetches client states for its checkpoint right after an aggregation step's
        record, so those bytes may be sampled with either step), and not the last (the final
        evaluation reads client adapters)."""
        return [s for s in range(1, self.steps) if s % self.interval and (s == 1 or (s - 1) % self.interval)]

    def pair(self, precision: str, r: int) -> dict:
        """One in-process run and one deployed run of the same configuration (order alternates)."""
        cfg_path, tag = self.config(precision), f"{precision}-{r}" if self.repeats > 1 else precision
        sim_out, dep_out = self.root / f"sim-{tag}", self.root / f"dep-{tag}"
        runs = {}
        for kind in (("sim", "dep") if r % 2 == 0 else ("dep", "sim")):
            runs[kind] = {"waited_for_quiet_s": _wait_quiet(self.quiet_wait_s, self.log)}
            if kind == "sim":
                runs[kind].update(self.in_process(cfg_path, sim_out, f"sim-{tag}"))
            else:
                runs[kind].update(self.deployed(cfg_path, dep_out, f"dep-{tag}"))
        sim_usage, dep = runs["sim"], runs["dep"]
        sim_recs, dep_recs = _metrics(sim_out), _metrics(dep_out)
        summary = json.loads((dep_out / "summary.json").read_text())
        sim_by_step = {r["step"]: r["bytes_up"] + r["bytes_down"] for r in sim_recs}
        accounted = sim_by_step[self.steps]
        wire, ckpt = summary["wire"], summary["wire"]["checkpoint"]   # the run's traffic, checkpoint reads apart
        messages_up, messages_down = wire["bytes_up"] + ckpt["bytes_up"], wire["bytes_down"] + ckpt["bytes_down"]
        messages = messages_up + messages_down
        socket = sum(dep["socket"])
        snaps = {s: sum(c) for s, c in dep["snapshots"].items()}
        clean = [s for s in self.clean_steps() if s in snaps and s - 1 in snaps]
        socket_training = sum(snaps[s] - snaps[s - 1] for s in clean)
        accounted_training = sum(sim_by_step[s] - sim_by_step[s - 1] for s in clean)
        sim_t, dep_t = step_times(sim_recs, self.skip), step_times(dep_recs, self.skip)
        return {
            "step_ratio": dep_t["step_s"] / sim_t["step_s"],
            "step_ratio_median": dep_t["step_s_median"] / sim_t["step_s_median"],
            "deployed_step_s": dep_t["step_s"], "in_process_step_s": sim_t["step_s"],
            "deployed_step_s_all": dep_t["step_s_all"], "in_process_step_s_all": sim_t["step_s_all"],
            "seconds_per_step": {"deployed": per_step(dep_recs, self.skip), "in_process": per_step(sim_recs, self.skip)},
            "wire_over_accounted_run": socket / accounted,
            "wire_over_accounted_training": socket_training / accounted_training if accounted_training else None,
            "messages_over_accounted_run": messages / accounted,
            "wire_over_messages_run": socket / messages,
            "training_steps_compared": clean,
            "bytes": {
                "accounted_run": {"up": sim_recs[-1]["bytes_up"], "down": sim_recs[-1]["bytes_down"]},
                "messages_run": {"up": messages_up, "down": messages_down},
                "checkpoint_messages": {"up": ckpt["bytes_up"], "down": ckpt["bytes_down"]},
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
                             "clients": [dep["usage"][f"client{i}"]["peak_rss_mib"] for i in range(self.num_clients)]},
            "process_stats": {"in_process": sim_usage[f"sim-{tag}"],
                              **{k: v for k, v in dep["usage"].items() if not k.startswith("_")}},
            "other_cpu_s": {"in_process": sim_usage["_other_cpu_s"], "deployed": dep["usage"]["_other_cpu_s"]},
            "elapsed_s": {"in_process": sim_usage["_elapsed_s"], "deployed": dep["usage"]["_elapsed_s"]},
            "waited_for_quiet_s": {"in_process": sim_usage["waited_for_quiet_s"],
                                   "deployed": dep["waited_for_quiet_s"]},
            "order": "in_process first" if r % 2 == 0 else "deployed first",
        }

    def run(self, precisions: tuple[str, ...], centralized_steps: int) -> dict:
        results: dict = {}
        for precision in precisions:
            pairs = [self.pair(precision, r) for r in range(self.repeats)]
            # the headline pair is the median one by step ratio (other processes' CPU is recorded per pair)
            best = sorted(range(self.repeats), key=lambda i: pairs[i]["step_ratio"])[(self.repeats - 1) // 2]
            results[precision] = {**pairs[best], "headline_pair": best}
            if self.repeats > 1:
                results[precision]["pairs"] = [
                    {k: p[k] for k in ("step_ratio", "step_ratio_median", "deployed_step_s", "in_process_step_s",
                                       "deployed_step_s_all", "in_process_step_s_all", "seconds_per_step",
                                       "other_cpu_s", "order",
                                       "wire_over_accounted_training", "same_losses")} for p in pairs]
                results[precision]["step_ratio_median_over_pairs"] = statistics.median(p["step_ratio"] for p in pairs)

        _wait_quiet(self.quiet_wait_s, self.log)
        cen = self.in_process(self.config(precisions[0], "cenlora", centralized_steps), self.root / "cenlora", "cenlora")
        first = results[precisions[0]]
        client_peak = max(first["peak_rss_mib"]["clients"])
        return {
            "benchmark": "deploy", "description": DEPLOY_DOC,
            "model": self.model_name, "split_layer": self.split_layer, "num_clients": self.num_clients,
            "batch": self.batch, "max_length": self.max_length, "steps": self.steps, "skipped_steps": self.skip,
            "aggregation_interval": self.interval,
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
            "workdir": str(self.root),
        }


def deploy(model_name: str = "smollm2-135m-instruct", steps: int = 6, split_layer: int = 3, batch: int = 4,
           max_length: int = 128, precisions: tuple[str, ...] = ("fp32", "bf16"), num_clients: int = 2,
           interval: int = 3, skip: int = 1, centralized_steps: int = 2, seed: int = 0, repeats: int = 1,
           quiet_wait_s: float = 0, workdir: str | None = None, timeout_s: float = 3600, sets=(),
           log=print) -> dict:
    """Deployed run vs in-process run (see DEPLOY_DOC); the runs and their logs stay in `workdir`.
    `sets` (`key=value`) are passed to every process as `--set` (e.g. a data file for a smoke run)."""
    import tempfile

    from ..transport.certs import create_certs

    if steps <= skip + 1:
        raise ValueError(f"bench deploy: --steps must exceed {skip + 1} (the first {skip} are not timed)")
    root = Path(workdir or tempfile.mkdtemp(prefix="splitlora-bench-deploy-"))
    root.mkdir(parents=True, exist_ok=True)
    certs = root / "certs"
    if not (certs / "ca.pem").exists():
        create_certs(certs, num_clients, overwrite=True)
    bench = _DeployBench(model_name, steps, split_layer, batch, max_length, num_clients, interval, skip, seed,
                         repeats, quiet_wait_s, timeout_s, sets, log, root, certs)
    return bench.run(precisions, centralized_steps)
