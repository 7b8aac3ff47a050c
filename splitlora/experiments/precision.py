"""`bench precision`: one configuration in fp32, with bf16 autocast, and with bf16 base weights + autocast.

The three runs are built in one process and stepped round-robin (the order rotating every step), so
drift in the machine's speed hits all alike; each run's steps are timed, and after the configuration's
steps each run's validation loss is computed. Peak memory is measured apart, first, in a fresh process
per variant (a few training steps; its own VmHWM): one process's RSS cannot tell three models apart.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .common import peak_rss_bytes

VARIANTS = {"fp32": [], "bf16-autocast": ["runtime.autocast=bf16"],
            "bf16": ["runtime.dtype=bf16", "runtime.autocast=bf16"]}


def precision(config: str, sets=(), workdir: str | None = None, rss_steps: int = 3, log=print) -> dict:
    from ..config import load_config
    from ..train import build_run, validation_loss

    root = Path(workdir or tempfile.mkdtemp(prefix="splitlora-bench-precision-"))
    root.mkdir(parents=True, exist_ok=True)
    cfgs = {name: load_config(config, [*sets, *extra]) for name, extra in VARIANTS.items()}
    rss = {}
    for name, cfg in cfgs.items():   # peak memory of each variant alone, in a fresh process (first: the
        log(f"bench precision: peak memory of {name}")   # runs built below would weigh in the fork)
        path = root / f"{name}.yaml"
        path.write_text(json.dumps(cfg.to_dict()))
        out = subprocess.run([sys.executable, "-m", "splitlora.experiments.precision", str(path), str(rss_steps)],
                             capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            raise RuntimeError(f"bench precision: {name}: {out.stderr.strip().splitlines()[-1:]}")
        rss[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    runs = {}
    for name, cfg in cfgs.items():
        log(f"bench precision: building {name}")
        runs[name] = build_run(cfg)
    steps = next(iter(cfgs.values())).train.max_steps
    initial = {name: validation_loss(run) for name, run in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for t in range(steps):
        for name in names[t % len(names):] + names[:t % len(names)]:
            run = runs[name]
            rt = run.strategy.s.server_runtime
            torch.manual_seed(cfgs[name].train.seed + t)   # the same LoRA dropout draws for every variant
            t0 = time.perf_counter()
            run.strategy.step(t)
            if t == steps - 1:
                run.strategy.finish(t)
            times[name].append(rt.elapsed(t0))
        if (t + 1) % 10 == 0 or t == steps - 1:
            log(f"bench precision: step {t + 1}/{steps}")
    final = {name: validation_loss(run) for name, run in runs.items()}
    median = {name: statistics.median(v[1:] if len(v) > 1 else v) for name, v in times.items()}
    base = next(iter(cfgs.values()))
    return {
        "benchmark": "precision", "config": str(config), "sets": list(sets), "model": base.model.name,
        "steps": steps, "machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "variants": {name: [*extra] for name, extra in VARIANTS.items()},
        "step_s_median": median, "step_ratio_to_fp32": {k: v / median["fp32"] for k, v in median.items()},
        "step_s": times, "initial_val_loss": initial, "final_val_loss": final,
        "val_loss_relative_to_fp32": {k: (v - final["fp32"]) / final["fp32"] for k, v in final.items()},
        "peak_rss_mib": rss, "peak_rss_steps": rss_steps,
        "timing": "in one process, round-robin, the first step of each run excluded from the median",
    }


def _peak(config: str, steps: int) -> dict:
    """A few training steps of `config` in this (fresh) process; its peak resident memory."""
    from ..config import load_config
    from ..train import build_run

    run = build_run(load_config(config))
    for t in range(steps):
        run.strategy.step(t)
    return {"peak_rss_mib": peak_rss_bytes() / 2**20}


if __name__ == "__main__":   # `python -m splitlora.experiments.precision CONFIG STEPS`: JSON on the last line
    print(json.dumps(_peak(sys.argv[1], int(sys.argv[2]))))
