"""`splitlora compare`: every strategy on the same data, seed and budget of samples, side by side.

Each strategy trains with `train()` as it is (one run directory each); the number of steps is the
sample budget over the samples a step takes (batch x clients for fedlora and splitlora, batch for
cenlora and sl), and evaluations happen at the same sample counts. The comparison reads the runs'
metrics and reports simulated time and bytes to reach a target validation loss (default: the best
loss cenlora reaches, plus 5 %), client-side trainable parameters, estimated client peak memory and
the final losses, as compare.json and report.md with plots.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm

from ..config import Config, ConfigError
from ..cost import part_memory_bytes
from .. import strategies as registry


def samples_per_step(cfg: Config, name: str) -> int:
    return cfg.train.batch_size * (cfg.strategy.num_clients if registry.get(name).parallel else 1)


def strategy_config(cfg: Config, name: str, samples: int, eval_samples: int) -> Config:
    """`cfg` for strategy `name`, with steps, evaluations and warm-up counted in samples."""
    k, base_k = samples_per_step(cfg, name), samples_per_step(cfg, cfg.strategy.name)
    steps = max(1, math.ceil(samples / k))
    evals = max(1, round(eval_samples / k))
    warmup = min(steps - 1, round(cfg.train.warmup_steps * base_k / k))
    train = cfg.train.model_copy(update={"max_steps": steps, "eval_interval": evals, "warmup_steps": warmup,
                                         "log_interval": min(cfg.train.log_interval, evals),
                                         "checkpoint_interval": steps})
    modes = registry.get(name).server_modes
    strategy = cfg.strategy.model_copy(update={"name": name, "server_mode": cfg.strategy.server_mode
                                               if cfg.strategy.server_mode in modes else modes[0]})
    return cfg.model_copy(update={"train": train, "strategy": strategy})


def reach(rows: list[dict], target: float) -> dict | None:
    """The first evaluated record whose validation loss is at or below `target`."""
    return next((r for r in rows if r["val_loss"] is not None and r["val_loss"] <= target), None)


def client_memory_mib(cfg: Config, name: str, template, splits: list[int] | None = None) -> float:
    """Estimated peak training memory of one client (fp32; see cost.part_memory_bytes), from the run's
    PEFT model `template` (the same for every strategy of a comparison: loaded once): the deepest of
    `splits` (clients with their own split points, hsplitlora/hetlora) or model.split_layer, plus a
    U-shaped client's top blocks and head."""
    from ..cost import Shapes
    from ..split import full_part, split_model, split_u

    cls = registry.get(name)
    if cls.pooled:
        return 0.0   # the client only uploads its data
    s = Shapes.from_model(template)
    L, m, k = len(s.blocks), cfg.model.top_layers, max(splits) if splits else cfg.model.split_layer
    if cls.whole_model:
        part, spans = full_part(template), [(0, L, True)]
    else:
        part = split_u(template, k, m)[0] if m else split_model(template, k)[0]
        spans = [(0, k, False)] + ([(L - m, L, True)] if m else [])
    total = sum(p.numel() for p in part.parameters())
    trainable = sum(p.numel() for p in part.trainable_parameters())
    acts = sum(part_memory_bytes(0, 0, s, a, b, head, cfg.train.batch_size, cfg.data.max_length) for a, b, head in spans)
    return (part_memory_bytes(total, trainable, s, 0, 0, False, 1, 1) + acts) / 2**20


def same_config(run_dir: Path, cfg: Config) -> bool:
    """Whether the run directory's config.yaml is `cfg` (defaults filled in by validation)."""
    from ..config import load_config

    try:
        return load_config(run_dir / "config.yaml").to_dict() == cfg.to_dict()
    except (OSError, ConfigError):
        return False


def _profiles(cfg: Config) -> dict:
    from dataclasses import asdict

    from ..train import cost_profiles

    clients, server = cost_profiles(cfg)
    return {"clients": [asdict(p) for p in clients], "server": asdict(server)}


def _train_all(configs: dict[str, Config], out: Path, progress: bool, reuse: bool) -> dict:
    """name -> {"summary", "rows"} of each strategy's run (cenlora first: it sets the target)."""
    from ..train import train

    order = sorted(configs, key=lambda n: n != "cenlora")
    total = sum(c.train.max_steps * samples_per_step(c, n) for n, c in configs.items())
    overall = tqdm(total=total, desc="compare", unit="sample", position=0, disable=not progress, dynamic_ncols=True)
    runs: dict[str, dict] = {}
    for name in order:
        c, k = configs[name], samples_per_step(configs[name], name)
        done = out / name / "summary.json"
        if reuse and done.exists() and same_config(out / name, c):
            summary = json.loads(done.read_text())
            overall.update(c.train.max_steps * k)
        else:
            summary = train(c, out / name, progress=progress, bar_position=1, overwrite=True,
                            on_step=lambda _s, k=k: overall.update(k))
        rows = [json.loads(ln) for ln in (out / name / "metrics.jsonl").read_text().splitlines() if ln]
        runs[name] = {"summary": summary, "rows": rows}
        line = (f"{name}: {c.train.max_steps} steps, {summary['samples_seen']} samples, final val loss "
                f"{summary['final_val_loss']:.4f}, simulated {summary['sim_time_s']:.1f} s, "
                f"{(summary['bytes_up'] + summary['bytes_down']) / 2**20:.1f} MiB, wall {summary['wall_s']:.0f} s")
        (tqdm.write if progress else print)(line)
    overall.close()
    return runs


def _strategy_result(name: str, c: Config, run: dict, target: float, template, run_dir: Path) -> dict:
    """One strategy's row of the comparison: its costs, losses, and what it took to reach the target."""
    s, rows = run["summary"], run["rows"]
    hit = reach(rows, target)
    evals = [{k: r.get(k) for k in ("step", "samples_seen", "sim_time_s", "bytes_up", "bytes_down", "val_loss",
                                    "wall_s", "client_flops")} for r in rows if r["val_loss"] is not None]
    return {
        "steps": c.train.max_steps, "samples_per_step": samples_per_step(c, name),
        "samples": s["samples_seen"], "sim_time_s": s["sim_time_s"], "wall_s": s["wall_s"],
        "bytes": s["bytes_up"] + s["bytes_down"], "bytes_up": s["bytes_up"], "bytes_down": s["bytes_down"],
        "client_flops": s.get("client_flops"),   # absent in runs made before it was recorded
        "final_val_loss": s["final_val_loss"], "best_val_loss": s["best_val_loss"],
        "final_val_ppl": math.exp(s["final_val_loss"]),
        "client_trainable_params": s["client_trainable_params"],
        "server_trainable_params": s["server_trainable_params"],
        "client_peak_memory_mib_est": client_memory_mib(c, name, template, s.get("client_splits")),
        "reached_target": hit is not None,
        "sim_time_to_target_s": hit["sim_time_s"] if hit else None,
        "bytes_to_target": hit["bytes_up"] + hit["bytes_down"] if hit else None,
        "samples_to_target": hit["samples_seen"] if hit else None,
        "evaluations": evals, "run_dir": str(run_dir),
    }


def _ratios(st: dict) -> tuple[dict, dict]:
    """splitlora's simulated time to the target over each other strategy's; against one that never reached
    it, only a bound (its whole run's time)."""
    base = st.get("splitlora", {}).get("sim_time_to_target_s")
    if base is None:
        return {}, {}
    ratios = {f"splitlora/{o}": base / r["sim_time_to_target_s"] for o, r in st.items()
              if o != "splitlora" and r["sim_time_to_target_s"]}
    bounds = {f"splitlora/{o}": base / r["sim_time_s"] for o, r in st.items()
              if o != "splitlora" and r["sim_time_to_target_s"] is None and r["sim_time_s"]}
    return ratios, bounds


def compare(cfg: Config, strategies: list[str], output: str | Path, samples: int | None = None,
            eval_samples: int | None = None, target: float | None = None, margin: float = 0.05,
            progress: bool = True, reuse: bool = False) -> dict:
    """Train every strategy (with `reuse`, a strategy whose run directory already has a summary.json
    of the same configuration is read instead of trained again), then compare."""
    from ..build import role_model
    from ..runtime import runtime_of
    from .report import write_report

    unknown = [s for s in strategies if s not in registry.available()]
    if unknown or not strategies:
        raise ConfigError(f"--strategies: unknown {unknown} (known: {', '.join(registry.available())})")
    if target is None and "cenlora" not in strategies:
        raise ConfigError("--target: give a target validation loss, or include cenlora to derive it")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    base_k = samples_per_step(cfg, cfg.strategy.name)
    samples = samples or cfg.train.max_steps * base_k
    eval_samples = eval_samples or cfg.train.eval_interval * base_k
    configs = {name: strategy_config(cfg, name, samples, eval_samples) for name in strategies}
    runs = _train_all(configs, out, progress, reuse)
    rule = "given"
    if target is None:
        target = runs["cenlora"]["summary"]["best_val_loss"] * (1 + margin)
        rule = f"best cenlora validation loss x {1 + margin:g}"
    _, template = role_model(cfg, runtime_of(cfg, "server"))   # for the memory estimates (the same for all)
    result = {"target_val_loss": target, "target_rule": rule, "samples_budget": samples,
              "eval_every_samples": eval_samples, "model": cfg.model.name, "num_clients": cfg.strategy.num_clients,
              "split_layer": cfg.model.split_layer, "batch_size": cfg.train.batch_size,
              "cost": cfg.cost.model_dump(mode="json"), "profiles": _profiles(cfg),
              "strategies": {name: _strategy_result(name, configs[name], runs[name], target, template, out / name)
                             for name in strategies}}
    result["time_to_target_ratios"], result["time_to_target_upper_bounds"] = _ratios(result["strategies"])
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    write_report(result, out)
    return result
