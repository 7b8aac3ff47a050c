"""`splitlora calibrate`: this machine as a device profile, and how well the cost model predicts it.

1. Fit: time training passes of the client part (forward + backward) and the server part (forward,
   loss, backward) on random batches of a few lengths; effective FLOP/s of each = the counted FLOPs
   over the measured seconds (summed over the batches), written as profiles `local-client` and
   `local-server` (efficiency 1; in-process links: no latency, 1 Tbit/s).
2. Check: train a few real steps in process with `sl` (one client per step, so the simulated
   schedule is sequential, as it runs here) and with `fedlora` on one client, simulated with those
   profiles, and compare simulated with measured step time (`wall_s`; the first step, warm-up, is
   left out). The error is what the report gives for calibration.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import Config
from ..cost import Profile, Shapes, part_flops, write_profiles


def _time(fn, repeats: int, runtime=None) -> float:
    fn()   # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(runtime.elapsed(t0) if runtime is not None else time.perf_counter() - t0)
    return statistics.median(times)


def fit(cfg: Config, lengths=(32, 64, 128), repeats: int = 3) -> dict:
    """Measured seconds and counted FLOPs of each part per batch length; effective FLOP/s of each."""
    from ..build import role_model
    from ..learning import lm_loss
    from ..runtime import runtime_of
    from ..split import split_model

    torch.manual_seed(cfg.train.seed)
    rt = runtime_of(cfg, "server")   # the parts run where (and in the precision) the run's server would
    _, template = role_model(cfg, rt)
    template.train()
    s = Shapes.from_model(template)
    client, server = split_model(template, cfg.model.split_layer)
    b, vocab, k, layers = cfg.train.batch_size, s.vocab, cfg.model.split_layer, len(s.blocks)
    rows = []
    for t in lengths:
        ids = torch.randint(0, vocab, (b, t), device=rt.device)
        mask = torch.ones(b, t, dtype=torch.long, device=rt.device)
        grad = torch.randn(b, t, s.hidden, device=rt.device, dtype=rt.dtype) * 1e-3

        def client_pass():
            with rt.compute():
                out = client(ids, mask)
            out.backward(grad.to(out.dtype))

        def server_pass():
            x = torch.randn(b, t, s.hidden, requires_grad=True, device=rt.device, dtype=rt.dtype)
            with rt.compute():
                logits = server(x, mask)
            lm_loss(logits.float(), ids, 0.1).backward()

        rows.append({"length": t,
                     "client_s": _time(client_pass, repeats, rt),
                     "client_flops": part_flops(s, 0, k, False, b, t, False).total,
                     "server_s": _time(server_pass, repeats, rt),
                     "server_flops": part_flops(s, k, layers, True, b, t, True).total})
        template.zero_grad(set_to_none=True)
    out = {"batches": rows, "batch_size": b}
    for part in ("client", "server"):
        out[f"{part}_flops_per_s"] = sum(r[f"{part}_flops"] for r in rows) / sum(r[f"{part}_s"] for r in rows)
    return out


def local_profiles(measured: dict) -> dict[str, Profile]:
    def profile(part: str) -> Profile:
        ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        return Profile(peak_tflops=measured[f"{part}_flops_per_s"] / 1e12, efficiency=1.0, memory_gb=round(ram_gb, 1),
                       up_mbps=1e6, down_mbps=1e6, latency_ms=0.0,
                       source=f"splitlora calibrate: this machine's {part} part, {torch.get_num_threads()} threads")
    return {"local-client": profile("client"), "local-server": profile("server")}


def check(cfg: Config, profiles_file: Path, steps: int, workdir: Path) -> dict:
    """Simulated vs measured step time of short in-process runs (sl; fedlora on one client)."""
    from ..train import train

    out = {}
    for name in ("sl", "fedlora"):
        c = cfg.model_copy(update={
            "strategy": cfg.strategy.model_copy(update={"name": name, "server_mode": "shared", "num_clients": 1}),
            "train": cfg.train.model_copy(update={"max_steps": steps, "eval_interval": 10**6, "log_interval": 1,
                                                  "checkpoint_interval": 10**6, "warmup_steps": 0}),
            "data": cfg.data.model_copy(update={"val_max_samples": 1}),
            "cost": cfg.cost.model_copy(update={"client": "local-client", "clients": None, "server": "local-server",
                                                "profiles_file": str(profiles_file)})})
        train(c, workdir / name, progress=False, overwrite=True)
        rows = [json.loads(ln) for ln in (workdir / name / "metrics.jsonl").read_text().splitlines() if ln]
        wall = [b["wall_s"] - a["wall_s"] for a, b in zip(rows, rows[1:])][1:]
        sim = [b["sim_time_s"] - a["sim_time_s"] for a, b in zip(rows, rows[1:])][1:]
        out[name] = {"measured_s": sum(wall), "simulated_s": sum(sim),
                     "error": sum(sim) / sum(wall) - 1,
                     "mean_abs_step_error": statistics.mean(abs(s / w - 1) for s, w in zip(sim, wall)),
                     "steps_compared": len(wall)}
    return out


def calibrate(cfg: Config, output: str | Path, steps: int = 8, lengths=(32, 64, 128), repeats: int = 3,
              workdir: str | Path | None = None, log=print) -> dict:
    """Fit, write the profiles file `output` (YAML-readable JSON), check; returns the report."""
    output = Path(output)
    log("calibrate: timing the client and server parts")
    measured = fit(cfg, lengths, repeats)
    profiles = local_profiles(measured)
    write_profiles(output, profiles)
    log(f"calibrate: client {measured['client_flops_per_s'] / 1e9:.1f} GFLOP/s, server "
        f"{measured['server_flops_per_s'] / 1e9:.1f} GFLOP/s; checking against {steps}-step runs")
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="splitlora-calibrate-"))
    result = {"model": cfg.model.name, "split_layer": cfg.model.split_layer, "torch_threads": torch.get_num_threads(),
              "fit": measured, "profiles": {k: asdict(v) for k, v in profiles.items()},
              "profiles_file": str(output), "check": check(cfg, output, steps, work)}
    for name, r in result["check"].items():
        log(f"calibrate: {name}: simulated {r['simulated_s']:.2f} s vs measured {r['measured_s']:.2f} s "
            f"({r['error']:+.1%}; per step {r['mean_abs_step_error']:.1%} mean absolute error)")
    return result
