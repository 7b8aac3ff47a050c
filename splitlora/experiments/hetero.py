"""`bench hetero`: heterogeneous clients (hsplitlora, hetlora, the weakest-client splitlora) and Kill &
Revive (dlora against splitlora) on the same data, seed and samples."""

from __future__ import annotations

import platform

import torch

from .common import train_or_reuse as _train_or_reuse

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

    from ..config import REPO_ROOT, load_config
    from ..train import build_run

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
