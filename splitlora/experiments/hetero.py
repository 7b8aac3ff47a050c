"""`bench hetero`: aggregations for heterogeneous clients side by side, over seeds: hsplitlora's
stack_fold, stack_svd and stack_keep, HetLoRA's zero_pad, and the weakest-budget splitlora, on the same
clients (configs/hsplitlora.yaml), data and samples, per partition and aggregation interval; then Kill &
Revive (dlora against splitlora)."""

from __future__ import annotations

import platform
import statistics

import torch

from .common import metrics as _metrics
from .common import train_or_reuse as _train_or_reuse

HETERO_DOC = """Heterogeneous clients (configs/hsplitlora.yaml: a phone, an edge board and a laptop; each its own
split and ranks) on the same data and samples. Per setting (partition x aggregation interval) and seed
(train.seed: the LoRA init, the data order and the IID partition), one run per variant:
`stack_fold`, `stack_svd`, `stack_keep` (hsplitlora's noise-free aggregations, hsplit.aggregation),
`zero_pad` (HetLoRA: A and B averaged over zero-padded copies) and `splitlora_weakest` (plain SplitLoRA,
every client held to the weakest client's split and mean rank, same LoRA scaling; in the settings
named by --weakest). Per variant: mean, sd and values over seeds of the final and best validation
loss, samples and simulated seconds until the validation loss first reaches the seed's target (the
worst final loss of that seed's aggregations, splitlora_weakest left out; runs that never reach it are
counted),
client FLOPs (simulated device compute, all clients). Then Kill & Revive once: `dlora`
(configs/dlora.yaml) against `splitlora` with the same config: device FLOPs and bytes saved, and the
validation-loss cost."""

AGGREGATIONS = ("stack_fold", "stack_svd", "stack_keep", "zero_pad")
PARTITIONS = {"iid": ["data.partition=iid"],
              "dirichlet": ["data.partition=dirichlet", "data.partition_attribute=food", "data.dirichlet_alpha=0.5"]}


def _mean_sd(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _to_target(records: list[dict], target: float) -> tuple[int | None, float | None]:
    """(samples, simulated s) at the first evaluation whose validation loss is at most `target`."""
    for r in records:
        if r.get("val_loss") is not None and r["val_loss"] <= target:
            return r["samples_seen"], r["sim_time_s"]
    return None, None


def _setting_summary(runs: dict[str, list[dict]]) -> dict:
    """Per variant over seeds; the target of a seed is the worst final validation loss of that seed's
    aggregations (so every one reaches it; seeds differ more than variants do)."""
    finals = {v: _mean_sd([r["final_val_loss"] for r in rs]) for v, rs in runs.items()}
    targets: dict[int, float] = {}
    for v, rs in runs.items():
        for r in rs if v != "splitlora_weakest" else ():
            targets[r["seed"]] = max(targets.get(r["seed"], r["final_val_loss"]), r["final_val_loss"])
    out = {"target_val_loss": {str(k): t for k, t in sorted(targets.items())}, "variants": {}}
    for v, rs in runs.items():
        reached = [_to_target(r["curve"], targets[r["seed"]]) if r["seed"] in targets else (None, None) for r in rs]
        out["variants"][v] = {
            "final_val_loss": {**finals[v], "values": [r["final_val_loss"] for r in rs]},
            "best_val_loss": {**_mean_sd([r["best_val_loss"] for r in rs]), "values": [r["best_val_loss"] for r in rs]},
            "samples_to_target": {**_mean_sd([s for s, _ in reached]), "reached": sum(s is not None for s, _ in reached),
                                  "values": [s for s, _ in reached]},
            "sim_s_to_target": {**_mean_sd([t for _, t in reached]), "values": [t for _, t in reached]},
            "client_flops": _mean_sd([r["client_flops"] for r in rs]),
            "sim_time_s": _mean_sd([r["sim_time_s"] for r in rs]),
            "seeds": [r["seed"] for r in rs]}
    ranking = sorted((f["mean"], v) for v, f in finals.items() if f["mean"] is not None)
    out["ranking_by_final_val_loss"] = [v for _, v in ranking]
    return out


def hetero(steps: int | None = None, workdir: str | None = None, reuse: bool = False, sets=(), log=print,
           seeds=(0, 1, 2), intervals=(4, 1), partitions=("iid", "dirichlet"), aggregations=AGGREGATIONS,
           weakest=("iid@4",), dlora: bool = True) -> dict:
    """See HETERO_DOC; with `reuse`, runs already finished in `workdir` with the same config are read (an
    interrupted bench goes on where it stopped). `sets` (`key=value`) apply to every config (e.g. a
    smaller model or data file for a smoke run). Settings run one after another (partitions, then
    intervals), each over every seed, so a partial bench has whole settings."""
    import json
    import tempfile
    from pathlib import Path

    from ..config import REPO_ROOT, load_config
    from ..train import build_run

    unknown = sorted(set(aggregations) - set(AGGREGATIONS)) + sorted(set(partitions) - set(PARTITIONS))
    if unknown:
        raise ValueError(f"bench hetero: unknown aggregation or partition {unknown} "
                         f"(aggregations: {', '.join(AGGREGATIONS)}; partitions: {', '.join(PARTITIONS)})")
    root = Path(workdir or tempfile.mkdtemp(prefix="splitlora-bench-hetero-"))
    sets = [*sets, *([f"train.max_steps={steps}"] if steps else [])]
    het_path = REPO_ROOT / "configs" / "hsplitlora.yaml"
    probe = build_run(load_config(het_path, sets)).strategy
    weak_split, weak_rank = probe.splits[0], max(1, round(min(probe.mean_ranks())))
    layout = {"splits": probe.splits, "mean_ranks": probe.mean_ranks(),
              "client_trainable": [probe.client_trainable(i) for i in range(len(probe.splits))]}
    scaling = probe.scaling
    del probe

    def variant_sets(variant: str) -> list[str]:
        if variant == "splitlora_weakest":
            return ["strategy.name=splitlora", f"model.split_layer={weak_split}", f"lora.rank={weak_rank}",
                    f"lora.alpha={scaling * weak_rank}"]
        return [f"hsplit.aggregation={variant}"]

    settings, configs = {}, {}
    for partition in partitions:
        for interval in intervals:
            name = f"{partition}@{interval}"
            variants = [*aggregations, *(["splitlora_weakest"] if name in weakest else [])]
            runs: dict[str, list[dict]] = {v: [] for v in variants}
            for seed in seeds:
                for variant in variants:
                    cfg = load_config(het_path, [*sets, *PARTITIONS[partition], f"train.seed={seed}",
                                                 f"strategy.aggregation_interval={interval}",
                                                 f"train.eval_interval={max(4, interval)}", *variant_sets(variant)])
                    run_dir = root / name / f"seed{seed}" / variant
                    s = _train_or_reuse(cfg, run_dir, reuse, lambda m: log(f"bench hetero: {name} seed {seed} {variant}{m}"))
                    curve = [{k: r[k] for k in ("step", "samples_seen", "sim_time_s", "val_loss")}
                             for r in _metrics(run_dir) if r.get("val_loss") is not None]
                    runs[variant].append({"seed": seed, "curve": curve, **{k: s.get(k) for k in (
                        "strategy", "samples_seen", "initial_val_loss", "final_val_loss", "best_val_loss", "client_flops",
                        "bytes_up", "bytes_down", "sim_time_s", "wall_s", "client_trainable_params", "client_splits",
                        "client_mean_ranks", "export_rank", "export_max_relative_error")}})
                    configs.setdefault(f"{name}/{variant}", json.loads(json.dumps(cfg.to_dict())))
            settings[name] = {"partition": partition, "aggregation_interval": interval, "runs": runs,
                              "summary": _setting_summary(runs)}

    result = {
        "benchmark": "hetero", "description": HETERO_DOC, "steps": steps or load_config(het_path, sets).train.max_steps,
        "seeds": list(seeds), "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "heterogeneous_layout": layout,
        "weakest": {"split_layer": weak_split, "rank": weak_rank}, "settings": settings,
        "workdir": str(root), "configs": configs,
    }
    if dlora:
        result["dlora"] = _dlora(root, reuse, sets, log)
    return result


def _dlora(root, reuse: bool, sets, log) -> dict:
    """Kill & Revive: dlora against splitlora with configs/dlora.yaml (one seed)."""
    from ..config import REPO_ROOT, load_config

    path = REPO_ROOT / "configs" / "dlora.yaml"
    runs = {}
    for name, extra in (("dlora", []), ("splitlora", ["strategy.name=splitlora"])):
        s = _train_or_reuse(load_config(path, [*sets, *extra]), root / "dlora" / name, reuse,
                            lambda m: log(f"bench hetero: {name}{m}"))
        runs[name] = {k: s.get(k) for k in ("samples_seen", "final_val_loss", "best_val_loss", "client_flops",
                                            "sim_time_s", "wall_s", "dlora_events")}
        runs[name]["bytes"] = s["bytes_up"] + s["bytes_down"]
    d, sp = runs["dlora"], runs["splitlora"]
    return {"runs": runs, "savings": {"client_flops_saved": 1 - d["client_flops"] / sp["client_flops"],
                                      "bytes_saved": 1 - d["bytes"] / sp["bytes"],
                                      "val_loss_cost": d["final_val_loss"] - sp["final_val_loss"]}}
