"""The exported adapter is an ordinary PEFT adapter of the model the run trained."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer

import splitlora.train as train_mod
from splitlora.lora import apply_lora, lora_config
from splitlora.models import tiny_model

from conftest import SEED, exported_adapter, run_training


def train_and_capture(cfg, out, monkeypatch):
    """Run train() and keep the Run it built, so the trained strategy's parts can be inspected."""
    captured = []
    real_build_run = train_mod.build_run

    def build_run(c, hub=None):
        run = real_build_run(c, hub)
        captured.append(run)
        return run

    monkeypatch.setattr(train_mod, "build_run", build_run)
    run_training(cfg, out)
    assert len(captured) == 1
    return captured[0]


def tokens(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, 20), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    return ids, mask


@pytest.mark.parametrize("family, rslora, server_mode", [
    ("gpt2", False, "shared"),
    ("llama", False, "per_client"),
    ("llama", True, "shared"),
])
def test_exported_adapter_loads_into_peft_and_matches_the_trained_split_model(
        family, rslora, server_mode, make_config, tmp_path, monkeypatch):
    cfg = make_config({"model.name": f"tiny-{family}", "lora.rslora": rslora, "strategy.server_mode": server_mode,
                       "train.max_steps": 3})
    out = tmp_path / "run"
    run = train_and_capture(cfg, out, monkeypatch)

    # The file holds exactly the keys PEFT itself writes for this model, and training moved B off zero.
    state = exported_adapter(out)
    fresh = apply_lora(tiny_model(family, SEED).model, lora_config(
        run.template.get_base_model().config, 4, 8, 0.0, rslora=rslora), SEED)
    assert set(state) == set(get_peft_model_state_dict(fresh))
    assert all(state[k].abs().max() > 0 for k in state if "lora_B" in k)

    # Plain PEFT on a fresh base model (same preset, same seed) ...
    peft = PeftModel.from_pretrained(tiny_model(family, SEED).model, out / "adapter").eval()
    # ... computes what the strategy's trained client part + server part compute. The reference is the
    # parts' own LoRA parameters, not the file, so a key mapped to the wrong layer/module would show.
    strategy = run.strategy
    client = strategy.clients[1].client.part.eval()
    server = strategy.server.learners[-1].part.eval()
    ids, mask = tokens()
    with torch.no_grad():
        expected = server(client(ids, mask), mask)
        got = peft(input_ids=ids, attention_mask=mask).logits
        base = tiny_model(family, SEED).model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], rtol=0, atol=1e-5)
    assert (got[keep] - base[keep]).abs().max() > 1e-3  # the adapter really changes the model

    # Every exported tensor is the trained parameter of the part that owns it.
    for part in (client, server):
        for key, p in part.adapter.items():
            torch.testing.assert_close(state[key], p.detach(), rtol=0, atol=1e-6)

    # adapter_config.json carries the configured LoRA hyper-parameters.
    acfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    targets = {"gpt2": {"c_attn"}, "llama": {"q_proj", "v_proj"}}[family]
    assert acfg["r"] == 4 and acfg["lora_alpha"] == 8 and acfg["lora_dropout"] == 0.0
    assert set(acfg["target_modules"]) == targets
    assert acfg["use_rslora"] is rslora
    assert acfg["fan_in_fan_out"] is (family == "gpt2")
    assert acfg["peft_type"] == "LORA" and acfg["task_type"] == "CAUSAL_LM"

    # rsLoRA scales by alpha / sqrt(r) instead of alpha / r, in PEFT and in the parts that trained.
    scaling = 8 / math.sqrt(4) if rslora else 8 / 4
    for model in (peft, client, server):
        lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        assert lora_layers and all(m.scaling["default"] == pytest.approx(scaling) for m in lora_layers)


def test_rslora_changes_the_model():
    """Same weights, rslora on vs off: different scaling, different logits."""
    lm_a, lm_b = tiny_model("llama", SEED), tiny_model("llama", SEED)
    a = apply_lora(lm_a.model, lora_config(lm_a.model.config, 4, 8, 0.0, rslora=False), SEED)
    b = apply_lora(lm_b.model, lora_config(lm_b.model.config, 4, 8, 0.0, rslora=True), SEED)
    with torch.no_grad():
        for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert na == nb
            if pa.requires_grad:
                pa.fill_(0.05)
                pb.fill_(0.05)
    ids, mask = tokens()
    with torch.no_grad():
        la = a.eval()(input_ids=ids, attention_mask=mask).logits
        lb = b.eval()(input_ids=ids, attention_mask=mask).logits
    assert (la - lb).abs().max() > 1e-4


@pytest.mark.parametrize("targets", [["q_proj", "k_proj", "v_proj", "o_proj"], ["v_proj"]])
def test_configured_target_modules_are_exported(targets, make_config, tmp_path):
    cfg = make_config({"lora.target_modules": targets, "strategy.name": "cenlora", "train.max_steps": 1})
    out = tmp_path / "run"
    run_training(cfg, out)
    acfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(acfg["target_modules"]) == set(targets)
    keys = exported_adapter(out)
    modules = {k.split(".")[-3] for k in keys}  # ...<module>.lora_A.weight
    assert modules == set(targets)
    assert len(keys) == 4 * len(targets) * 2  # 4 layers, A and B
