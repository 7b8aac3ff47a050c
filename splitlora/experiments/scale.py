"""`bench scale`: one server against 1, 2, 4, 8 and 16 client processes on loopback (gRPC, mutual TLS, a
tiny model), so a change that makes the server's work per client grow with the number of clients shows.

Each count N is one deployed SplitLoRA run (shared server-side adapter: the server takes the clients'
batches one after another, so a step's wall time is about N times one client's round trip). Reported per
N: the mean seconds of a step (the first `skip` excluded), that time per client, and its parts per
client and step: client compute, server compute, and the rest (transport, serialization, TLS, waiting);
message bytes per client and step (the server's own count); peak RSS of the server and of the largest
client. `server_overhead_per_client_s` (server compute + the rest, per client and step) is what must stay
flat as N grows. On a machine with fewer cores than processes the idle clients only wait on their
streams; every client's step runs while the others wait for the server.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from .common import cpu_mark, metrics, run_processes, server_port, spawn
from .deploy import deploy_config, per_step, step_times


def scale(counts=(1, 2, 4, 8, 16), model: str = "tiny-llama", steps: int = 6, skip: int = 1, batch: int = 2,
          max_length: int = 256, interval: int = 3, workdir: str | None = None, timeout_s: float = 1800,
          sets=(), log=print) -> dict:
    from ..transport.certs import create_certs

    if steps <= skip + 1:
        raise ValueError(f"bench scale: --steps must exceed {skip + 1} (the first {skip} are not timed)")
    root = Path(workdir or tempfile.mkdtemp(prefix="splitlora-bench-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    certs = root / "certs"
    create_certs(certs, max(counts), overwrite=True)
    runs = {}
    for n in counts:
        log(f"bench scale: {n} client process(es)")
        tree = deploy_config(model, steps, 1, batch, max_length, "fp32", n, interval, 0)
        cfg_path = root / f"scale-{n}.yaml"
        cfg_path.write_text(yaml.safe_dump(tree, sort_keys=False))
        out = root / f"run-{n}"
        shutil.rmtree(out, ignore_errors=True)
        mark = cpu_mark()
        server = spawn(root, ["serve", "--config", str(cfg_path), "--address", "127.0.0.1:0", "--certs", str(certs),
                              "--output", str(out), "--no-progress"], f"server-{n}.log", sets)
        port = server_port(server, root / f"server-{n}.log")
        procs = {"server": server}
        for cid in range(n):
            procs[f"client{cid}"] = spawn(root, ["client", "--config", str(cfg_path), "--client-id", str(cid),
                                                 "--server", f"127.0.0.1:{port}", "--certs", str(certs)],
                                          f"client-{n}-{cid}.log", sets)
        usage = run_processes(procs, timeout_s, mark=mark)
        records = metrics(out)
        summary = json.loads((out / "summary.json").read_text())
        timed = step_times(records, skip)
        parts = per_step(records, skip)
        wire = summary["wire"]["per_client"]
        by_step = {r["step"]: r for r in records}
        step_bytes = (by_step[steps]["bytes_up"] + by_step[steps]["bytes_down"]
                      - by_step[skip]["bytes_up"] - by_step[skip]["bytes_down"]) / (steps - skip)
        runs[str(n)] = {
            "clients": n, "completed_steps": summary["step"], "dropouts": summary["dropouts"],
            "step_s": timed["step_s"], "step_s_all": timed["step_s_all"], "step_s_per_client": timed["step_s"] / n,
            "per_client_and_step_s": {k: v / n for k, v in parts.items()},
            "server_overhead_per_client_s": (parts["server"] + parts["other"]) / n,
            "bytes_per_client_and_step": step_bytes / n,
            "message_bytes_per_client_run": {cid: c["bytes_up"] + c["bytes_down"] for cid, c in sorted(wire.items())},
            "peak_rss_mib": {"server": usage["server"]["peak_rss_mib"],
                             "largest_client": max(usage[f"client{i}"]["peak_rss_mib"] for i in range(n))},
            "elapsed_s": usage["_elapsed_s"], "other_cpu_s": usage["_other_cpu_s"],
        }
        r = runs[str(n)]
        log(f"bench scale: {n}: {r['step_s']:.3f} s/step, {r['step_s_per_client']:.3f} s per client, server "
            f"overhead {r['server_overhead_per_client_s'] * 1e3:.1f} ms per client")
    first = runs[str(counts[0])]["server_overhead_per_client_s"]
    return {"benchmark": "scale", "description": __doc__, "model": model, "split_layer": 1, "batch": batch,
            "max_length": max_length, "steps": steps, "skipped_steps": skip, "aggregation_interval": interval,
            "transport": "gRPC, mutual TLS, loopback", "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "runs": runs,
            "server_overhead_per_client_ratio_to_first": {
                n: r["server_overhead_per_client_s"] / first for n, r in runs.items()},
            "all_completed": all(r["completed_steps"] == steps and r["dropouts"] == 0 for r in runs.values()),
            "workdir": str(root)}
