"""Cost model: FLOPs of model parts against a hand count and against torch's FLOP counter, simulated
step times of schedules against hand computations, and sim_time_s in a run's metrics."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import read_metrics, run_training

from splitlora.config import ConfigError
from splitlora.cost import PROFILES, CostModel, Profile, Shapes, StepWork, counted_flops, part_flops
from splitlora.lora import apply_lora, lora_config
from splitlora.models import tiny_model
from splitlora.train import build_run
from splitlora.split import split_model


def _peft(family: str, rank: int = 4, eager: bool = False):
    lm = tiny_model(family, seed=0)
    if eager:   # attention as plain matrix products, which torch's FLOP counter sees (fused SDPA it may not)
        lm.model.set_attn_implementation("eager")
    return apply_lora(lm.model, lora_config(lm.model.config, rank, 8, 0.0), 0)


def test_tiny_llama_client_part_flops_by_hand():
    """tiny-llama: H 64, MLP 128, 4 heads of 16 (q, o: 64x64), 2 kv heads (k, v: 64x32), LoRA r 4 on q, v."""
    s = Shapes.from_model(_peft("llama"))
    n, b, t = 16, 2, 8                      # tokens, batch, length
    linear = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 64 * 128 + 64 * 128 + 128 * 64      # 36,864 per token
    lora = 4 * (64 + 64) + 4 * (64 + 32)     # q and v: r·(in+out)
    att = 2 * b * t * t * 64                 # one T x T product over heads x head dim (= 64)
    fwd_block = 2 * n * linear + 2 * n * lora + 2 * att
    # backward, upper block: every input gradient; LoRA: dB, d(Ax), dA and dX; 4 attention gradients
    lora_q_bwd = 2 * n * 4 * (2 * 64 + 64) + 2 * n * 4 * 64
    lora_v_bwd = 2 * n * 4 * (2 * 32 + 64) + 2 * n * 4 * 64
    upper_bwd = 2 * n * linear + lora_q_bwd + lora_v_bwd + 4 * att
    # lowest block (the input needs no gradient): q, k, v get no input gradient, nor do their LoRA
    # inputs, and K (no LoRA on k) needs none: dQ, dScores, dV only
    lowest_bwd = (2 * n * (linear - 64 * 64 - 64 * 32 - 64 * 32) + (lora_q_bwd - 2 * n * 4 * 64)
                  + (lora_v_bwd - 2 * n * 4 * 64) + 3 * att)
    f = part_flops(s, 0, 2, False, b, t, input_grad=False)
    assert (f.forward, f.backward) == (2 * fwd_block, lowest_bwd + upper_bwd)
    assert (f.forward, f.backward) == (2_482_176, 2_310_144)
    # the server part of a 2 + 2 split: input gradient everywhere, plus the head (H x vocab) both ways
    server = part_flops(s, 2, 4, True, b, t, input_grad=True)
    head = 2 * n * 64 * s.vocab
    assert (server.forward, server.backward) == (2 * fwd_block + head, 2 * upper_bwd + head)


def _measured(part, b: int, t: int, input_grad: bool) -> tuple[int, int]:
    """(forward, backward) matrix-product FLOPs torch counts for one training pass of `part`."""
    if part.has_embeddings:
        x = torch.randint(0, part.config.vocab_size, (b, t))
    else:
        x = torch.randn(b, t, part.config.hidden_size, requires_grad=input_grad)
    return counted_flops(part, x, torch.ones(b, t, dtype=torch.long))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_part_flops_match_torch_flop_counter(family):
    """The formula counts what autograd computes: torch's FLOP counter on a real pass of each part
    (linear layers, LoRA, attention, head; forward and backward) gives the same numbers."""
    peft = _peft(family, eager=True)
    peft.train()
    s = Shapes.from_model(peft)
    client, server = split_model(peft, 2)
    b, t = 2, 12
    for part, start, stop, head, grad in ((client, 0, 2, False, False), (server, 2, 4, True, True)):
        fwd, bwd = _measured(part, b, t, grad)
        f = part_flops(s, start, stop, head, b, t, input_grad=grad)
        assert (f.forward, f.backward) == (fwd, bwd), (family, start, f, fwd, bwd)


P = Profile(peak_tflops=1.0, efficiency=0.5, memory_gb=8, up_mbps=8, down_mbps=16, latency_ms=10)
S = Profile(peak_tflops=10.0, efficiency=0.5, memory_gb=80, up_mbps=1000, down_mbps=1000, latency_ms=0)


def test_two_client_split_schedule_by_hand():
    """Two clients, different devices and batch lengths: the server takes the first arrival first, the
    step ends with the slower client's backward, then adapters go up and the average comes down."""
    s = Shapes.from_model(_peft("llama"))
    slow = dataclasses.replace(P, peak_tflops=0.5)
    model = CostModel(s, 2, [P, slow], S)
    work = StepWork(split=[(0, 2, 8), (1, 2, 16)],
                    messages=[(0, "smashed", 10_000), (1, "smashed", 20_000), (0, "grad", 9_000),
                              (1, "grad", 18_000), (0, "adapter_up", 1_000), (1, "adapter_up", 1_000),
                              (0, "adapter_down", 1_000), (1, "adapter_down", 1_000), (0, "command", 99)])
    cf = {n: part_flops(s, 0, 2, False, 2, n, False) for n in (8, 16)}
    sf = {n: part_flops(s, 2, 4, True, 2, n, True).total for n in (8, 16)}
    lat = 0.010
    up = lambda nbytes: lat + nbytes * 8 / 8e6          # noqa: E731 - client uplink 8 Mbit/s
    down = lambda nbytes: lat + nbytes * 8 / 16e6       # noqa: E731 - client downlink 16 Mbit/s
    arrive0 = cf[8].forward / 0.5e12 + up(10_000)
    arrive1 = cf[16].forward / 0.25e12 + up(20_000)
    assert arrive0 < arrive1
    free0 = arrive0 + sf[8] / 5e12
    free1 = max(arrive1, free0) + sf[16] / 5e12
    done0 = free0 + down(9_000) + cf[8].backward / 0.5e12
    done1 = free1 + down(18_000) + cf[16].backward / 0.25e12
    expected = max(done0, done1) + up(1_000) + down(1_000)
    assert model.step_seconds(work) == pytest.approx(expected, rel=1e-12)

    # sl: one client per step, so the chain is sequential
    one = StepWork(split=[(1, 2, 16)], messages=[(1, "smashed", 20_000), (1, "grad", 18_000)])
    assert model.step_seconds(one) == pytest.approx(
        cf[16].forward / 0.25e12 + up(20_000) + sf[16] / 5e12 + down(18_000) + cf[16].backward / 0.25e12)

    # fedlora: whole model on each client in parallel; cenlora: on the server after the data upload
    whole = {n: part_flops(s, 0, 4, True, 2, n, False).total for n in (8, 16)}
    fed = StepWork(local=[(0, 2, 8), (1, 2, 16)])
    assert model.step_seconds(fed) == pytest.approx(max(whole[8] / 0.5e12, whole[16] / 0.25e12))
    cen = StepWork(central=[(2, 16)], messages=[(0, "data", 80_000), (1, "data", 40_000)])
    assert model.step_seconds(cen) == pytest.approx(up(80_000) + whole[16] / 5e12)


def test_presets_cite_their_sources():
    for name, p in PROFILES.items():
        assert p.source and p.flops > 0, name


def test_metrics_carry_sim_time_and_strategies_differ(make_config, tmp_path):
    """Every row has a cumulative sim_time_s. A tiny model costs next to nothing to compute, so on a
    phone link splitlora's two messages per step (41 ms latency each) dominate and fedlora, which sends
    adapters only at aggregations, is faster; cenlora pays its data upload at the first step."""
    base = {"cost.client": "phone", "cost.server": "gpu-server", "train.max_steps": 2}
    times = {}
    for name in ("splitlora", "fedlora", "cenlora"):
        run_training(make_config({**base, "strategy.name": name}), tmp_path / name)
        rows = read_metrics(tmp_path / name)
        sim = [r["sim_time_s"] for r in rows]
        assert sim[0] == 0 and all(b > a for a, b in zip(sim, sim[1:])), (name, sim)
        times[name] = sim[-1]
    assert times["splitlora"] > 2 * 2 * 0.041 > times["fedlora"]
    cen = read_metrics(tmp_path / "cenlora")
    assert cen[1]["bytes_up"] > 0 and cen[1]["bytes_up"] == cen[-1]["bytes_up"]   # the data, once


def test_bad_cost_settings_name_the_field(make_config, tmp_path):
    with pytest.raises(ConfigError, match="cost.client: unknown profile 'toaster'"):
        run_training(make_config({"cost.client": "toaster"}), tmp_path / "a")
    with pytest.raises(ConfigError, match="cost.clients: 1 profiles for 2 clients"):
        run_training(make_config({"cost.clients": ["phone"]}), tmp_path / "b")
    with pytest.raises(ConfigError, match="cost.server: .*efficiency must be a positive number"):
        run_training(make_config({"cost.server": {**dataclasses.asdict(S), "efficiency": -1}}), tmp_path / "c")


def test_compare_report_from_tiny_runs(make_config, tmp_path):
    """compare runs each strategy on the same sample budget and writes compare.json, report.md and
    PNG plots that open."""
    import json

    import matplotlib.image as mpimg

    from splitlora.experiments.compare import compare

    cfg = make_config({"train.max_steps": 2, "train.eval_interval": 1, "cost.client": "phone"})
    result = compare(cfg, ["cenlora", "fedlora", "sl", "splitlora"], tmp_path / "cmp", target=10.0, progress=False)
    st = result["strategies"]
    # the same budget: 2 steps x batch 2 x 2 clients = 8 samples; sl and cenlora take 4 steps of 2
    assert {n: (s["steps"], s["samples"]) for n, s in st.items()} == {
        "cenlora": (4, 8), "fedlora": (2, 8), "sl": (4, 8), "splitlora": (2, 8)}
    # evaluations at the same sample counts (every 4 samples), and every strategy reached the loose target
    assert all([e["samples_seen"] for e in s["evaluations"]] == [0, 4, 8] for s in st.values())
    assert all(s["reached_target"] and s["sim_time_to_target_s"] == 0 for s in st.values())
    assert st["splitlora"]["client_trainable_params"] < st["fedlora"]["client_trainable_params"]
    assert 0 < st["splitlora"]["client_peak_memory_mib_est"] < st["fedlora"]["client_peak_memory_mib_est"]
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["samples_budget"] == 8
    report = (tmp_path / "cmp" / "report.md").read_text()
    for name in st:
        assert f"| {name} |" in report
    for png in ("val_loss_vs_samples.png", "val_loss_vs_sim_time.png", "val_loss_vs_bytes.png"):
        image = mpimg.imread(tmp_path / "cmp" / png)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0, png


def test_compare_target_defaults_to_cenlora_plus_margin(make_config, tmp_path):
    from splitlora.experiments.compare import compare

    cfg = make_config({"train.max_steps": 2, "train.eval_interval": 2})
    result = compare(cfg, ["cenlora", "splitlora"], tmp_path / "cmp", progress=False)
    best = result["strategies"]["cenlora"]["best_val_loss"]
    assert result["target_val_loss"] == pytest.approx(best * 1.05)
    with pytest.raises(ConfigError, match="--target"):
        compare(cfg, ["splitlora"], tmp_path / "cmp2", progress=False)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_frozen_lora_modules_flops_match_torch_flop_counter(family):
    """With some LoRA modules frozen (DLoRA's killed adapters) the count still equals torch's: no
    weight gradients for them, and nothing backward below the lowest trainable module."""
    peft = _peft(family, eager=True)
    peft.train()
    s = Shapes.from_model(peft)
    lora = [lin.name for lin in s.blocks[0] if lin.rank]
    cases = [frozenset((b, n) for b in range(2) for n in lora),          # everything on the client frozen
             frozenset((0, n) for n in lora),                              # the lowest block frozen
             frozenset({(1, lora[0])}),                                    # one module of the upper block
             frozenset({(0, lora[0])})]                                    # q (llama) / c_attn (gpt2) of block 0
    client, _ = split_model(peft, 2)
    for frozen in cases:
        for b, name in frozen:
            for p in _lora_params(client, b, name):
                p.requires_grad_(False)
        fwd, bwd = _measured_client(client, 2, 12)
        f = part_flops(s, 0, 2, False, 2, 12, input_grad=False, frozen=frozen)
        assert (f.forward, f.backward) == (fwd, bwd), (family, sorted(frozen), f, fwd, bwd)
        for p in client.trainable_parameters():
            p.requires_grad_(True)


def _lora_params(part, block: int, name: str):
    return [p for k, p in part.adapter.items() if f".{block}.{name}.lora_" in k
            or f".h.{block}.{name}.lora_" in k]


def _measured_client(part, b: int, t: int) -> tuple[int, int]:
    return _measured(part, b, t, input_grad=False)


def test_compare_reuse_reads_finished_runs(make_config, tmp_path):
    from splitlora.experiments.compare import compare

    cfg = make_config({"train.max_steps": 2, "train.eval_interval": 2})
    first = compare(cfg, ["cenlora", "splitlora"], tmp_path / "cmp", progress=False)
    stamp = (tmp_path / "cmp" / "splitlora" / "metrics.jsonl").stat().st_mtime_ns
    again = compare(cfg, ["cenlora", "splitlora"], tmp_path / "cmp", progress=False, reuse=True)
    assert (tmp_path / "cmp" / "splitlora" / "metrics.jsonl").stat().st_mtime_ns == stamp   # not trained again
    assert again["strategies"]["splitlora"]["final_val_loss"] == first["strategies"]["splitlora"]["final_val_loss"]


def test_client_memory_estimate_follows_the_clients_part(make_config):
    """Deeper splits and a U-shaped client's top blocks + head cost memory; fedlora's whole model most."""
    from splitlora.experiments.compare import client_memory_mib

    cfg = make_config({"model.split_layer": 1})
    template = build_run(cfg).template
    split1 = client_memory_mib(cfg, "splitlora", template)
    split2 = client_memory_mib(cfg, "hsplitlora", template, splits=[1, 2])
    ushape = client_memory_mib(make_config({"model.split_layer": 1, "model.top_layers": 1}), "splitlora", template)
    whole = client_memory_mib(cfg, "fedlora", template)
    assert client_memory_mib(cfg, "cenlora", template) == 0
    assert 0 < split1 < split2 and split1 < ushape < whole
