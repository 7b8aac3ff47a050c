"""report.md and its plots from a comparison's result (compare.json): validation loss against samples,
simulated time and bytes sent, and the table of time and bytes to the target loss."""

from __future__ import annotations

from pathlib import Path

PLOTS = (("samples_seen", "samples", "val_loss_vs_samples.png", 1.0),
         ("sim_time_s", "simulated time (s)", "val_loss_vs_sim_time.png", 1.0),
         ("bytes", "bytes sent, both ways (MiB)", "val_loss_vs_bytes.png", 1 / 2**20))


def _plot(result: dict, x_key: str, x_label: str, path: Path, scale: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, s in result["strategies"].items():
        ev = s["evaluations"]
        xs = [(e["bytes_up"] + e["bytes_down"] if x_key == "bytes" else e[x_key]) * scale for e in ev]
        ax.plot(xs, [e["val_loss"] for e in ev], marker="o", markersize=3, label=name)
    ax.axhline(result["target_val_loss"], color="grey", linestyle="--", linewidth=1, label="target")
    ax.set_xlabel(x_label)
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(x, spec: str = ".1f", none: str = "not reached") -> str:
    return none if x is None else format(x, spec)


def write_report(result: dict, out: str | Path) -> Path:
    out = Path(out)
    for key, label, name, scale in PLOTS:
        _plot(result, key, label, out / name, scale)
    st = result["strategies"]
    lines = [
        "# Strategy comparison", "",
        f"Model {result['model']}, {result['num_clients']} clients, split layer {result['split_layer']}, batch "
        f"{result['batch_size']}; every strategy trained on the same data and seed with a budget of "
        f"{result['samples_budget']} samples, evaluated every {result['eval_every_samples']} samples.",
        f"Target validation loss: {result['target_val_loss']:.4f} ({result['target_rule']}).", "",
        "Simulated time is the cost model's (splitlora/cost.py) for these profiles:", "",
        "| role | TFLOPS peak | efficiency | up / down Mbit/s | latency ms | source |",
        "|---|---|---|---|---|---|",
    ]
    roles = [(f"client {i}" if len(result["profiles"]["clients"]) > 1 else "clients", p)
             for i, p in enumerate(result["profiles"]["clients"])] + [("server", result["profiles"]["server"])]
    for role, p in roles:
        lines.append(f"| {role} | {p['peak_tflops']:g} | {p['efficiency']:g} | {p['up_mbps']:g} / {p['down_mbps']:g} "
                     f"| {p['latency_ms']:g} | {p['source']} |")
    lines += ["", "| strategy | steps | sim. time to target (s) | MiB to target | samples to target | "
              "sim. time, whole run (s) | MiB, whole run | client TFLOPs, whole run | client trainable params | "
              "client peak memory, est. (MiB) | final val loss | best val loss | wall (s) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in st.items():
        mib = None if s["bytes_to_target"] is None else s["bytes_to_target"] / 2**20
        lines.append(
            f"| {name} | {s['steps']} | {_fmt(s['sim_time_to_target_s'])} | {_fmt(mib)} | "
            f"{_fmt(s['samples_to_target'], 'd')} | {s['sim_time_s']:.1f} | {s['bytes'] / 2**20:.1f} | "
            f"{_fmt(None if s['client_flops'] is None else s['client_flops'] / 1e12, '.3f', 'n/a')} | "
            f"{s['client_trainable_params']:,} | {s['client_peak_memory_mib_est']:.0f} | "
            f"{s['final_val_loss']:.4f} | {s['best_val_loss']:.4f} | {s['wall_s']:.0f} |")
    if result.get("time_to_target_ratios"):
        lines += ["", "Simulated time to target, ratios: " + ", ".join(
            f"{k} = {v:.3f}" for k, v in result["time_to_target_ratios"].items()) + "."]
    if result.get("time_to_target_upper_bounds"):
        lines += ["", "Against strategies that did not reach the target within the budget, upper bounds (their whole "
                  "run's simulated time): " + ", ".join(
                      f"{k} < {v:.3f}" for k, v in result["time_to_target_upper_bounds"].items()) + "."]
    lines += ["", "![validation loss vs samples](val_loss_vs_samples.png)",
              "![validation loss vs simulated time](val_loss_vs_sim_time.png)",
              "![validation loss vs bytes](val_loss_vs_bytes.png)", "",
              "Client peak memory is an estimate (weights, LoRA gradients and AdamW moments, activations kept "
              "for backward; cost.part_memory_bytes), not a measurement. cenlora's bytes are the clients' data "
              "uploaded before training.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
