"""Wire precision: activations and gradients may travel as fp16, bf16 or int8 (one scale per tensor);
masks, labels and adapters always travel exactly."""

from __future__ import annotations

import pytest
import torch

from conftest import read_metrics, run_training
from splitlora.transport.codec import decode, encode, smashed_message
from splitlora.transport.local import Link


@pytest.mark.parametrize("precision,tol,ratio", [("fp32", 0.0, 1.0), ("fp16", 1e-3, 0.5), ("bf16", 1e-2, 0.5),
                                                 ("int8", 1e-2, 0.25)])
def test_round_trip_error_and_size(precision, tol, ratio):
    g = torch.Generator().manual_seed(0)
    act = torch.randn(4, 32, 64, generator=g)
    mask = torch.ones(4, 32, dtype=torch.long)
    mask[1, 20:] = 0
    labels = torch.randint(-100, 200, (4, 32), generator=g)
    msg = smashed_message(act, mask, labels)
    data = encode(msg, precision)
    back = decode(data)
    # what travelled: fp16 and bf16 stay so (the receiver casts), int8 comes back as fp32
    assert back["activations"].dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    err = (back["activations"].float() - act).abs().max() / act.abs().max()
    assert err <= tol
    assert torch.equal(back["attention_mask"], mask.bool()) and torch.equal(back["labels"], labels.int())
    full = len(encode(msg, "fp32"))
    act_bytes = act.numel() * 4
    assert abs((len(data) - (full - act_bytes)) / act_bytes - ratio) < 0.01   # only the activations shrink


def test_bf16_activations_travel_as_they_are():
    act = torch.randn(2, 4, 8).bfloat16()
    msg = smashed_message(act, torch.ones(2, 4), None)
    assert len(encode(msg, "fp32")) < len(encode(smashed_message(act.float(), torch.ones(2, 4), None), "fp32"))
    back = decode(encode(msg, "fp32"))["activations"]
    assert back.dtype == torch.bfloat16 and torch.equal(back, act)


def test_adapters_are_never_quantized():
    state = {"base_model.model.x.lora_A.weight": torch.randn(4, 8)}
    assert torch.equal(decode(encode(state, "int8"))["base_model.model.x.lora_A.weight"],
                       state["base_model.model.x.lora_A.weight"])


def test_link_counts_the_smaller_messages(make_config, tmp_path):
    sizes = {}
    for precision in ("fp32", "bf16"):
        cfg = make_config({"wire.precision": precision, "train.max_steps": 2, "strategy.aggregation_interval": 100})
        run_training(cfg, tmp_path / precision)
        last = read_metrics(tmp_path / precision)[-1]
        assert last["train_loss"] == last["train_loss"]   # finite, not NaN
        sizes[precision] = last["bytes_up"] + last["bytes_down"]
    assert sizes["bf16"] < 0.6 * sizes["fp32"]
    assert Link("int8").precision == "int8"
