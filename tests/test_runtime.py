"""Devices, precision and memory (issue 14): the runtime section decides each role's device and dtype in one
place; bf16 splits exactly like the unsplit model; gradient checkpointing changes nothing but memory;
shape presets materialise only what a part holds, in its dtype; an exported adapter is evaluated with the
configuration it was saved with. Tests that need CUDA are skipped (with the reason) on a CPU machine."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import read_metrics, run_training
from splitlora.config import ConfigError
from splitlora.lora import apply_lora, lora_config
from splitlora.models import Keep, byte_tokenizer, load_model, tiny_model
from splitlora.learning import lm_loss
from splitlora.runtime import Runtime, resolve_device, runtime_of
from splitlora.split import set_checkpointing, split_model

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_runtime_is_decided_from_the_config(make_config):
    cfg = make_config({"runtime.dtype": "bf16", "runtime.autocast": "bf16", "runtime.gradient_checkpointing": True,
                       "runtime.client_devices": ["cpu", "cpu"], "model.quantization": "nf4",
                       "model.quantize": "server"})
    server, client = runtime_of(cfg, "server"), runtime_of(cfg, "client", 1)
    assert server.dtype == client.dtype == torch.bfloat16 and server.autocast == torch.bfloat16
    assert server.checkpointing and server.quantization == "nf4" and client.quantization == "none"
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu") \
        or resolve_device("auto").type == "mps"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="runtime.server_device: cuda:1 asked for, but this machine has no CUDA"):
            runtime_of(make_config({"runtime.server_device": "cuda:1"}), "server")
    with pytest.raises(ConfigError, match="runtime.client_devices\\[0\\]: 'gpu' is not a device"):
        runtime_of(make_config({"runtime.client_devices": ["gpu", "cpu"]}), "client", 0)
    with pytest.raises(ConfigError, match="runtime.client_devices: 3 devices for 2 clients"):
        make_config({"runtime.client_devices": ["cpu"] * 3})
    for key in ("runtime.dtype", "runtime.autocast"):
        with pytest.raises(ConfigError, match="fp16 training is not supported across the split .* use bf16"):
            make_config({key: "fp16"})


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_bf16_split_equals_unsplit_and_checkpointing_changes_nothing(family, checkpointing):
    """Same ops in the same order: the bf16 split gives the unsplit logits and LoRA gradients bit for
    bit, with LoRA dropout (the recomputation replays the same dropout masks) and right padding."""
    lm = tiny_model(family, 0, torch.bfloat16)
    peft = apply_lora(lm.model, lora_config(lm.model.config, 4, 8, 0.1), 0)
    peft.train()
    assert {p.dtype for p in peft.parameters() if p.requires_grad} == {torch.float32}   # LoRA stays fp32
    assert {p.dtype for p in peft.parameters() if not p.requires_grad} == {torch.bfloat16}
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    torch.manual_seed(1)
    ref = peft(input_ids=ids, attention_mask=mask).logits
    lm_loss(ref.float(), labels, 0.1).backward()
    want = {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}
    peft.zero_grad()
    client, server = split_model(peft, 2)
    set_checkpointing(client, checkpointing)
    set_checkpointing(server, checkpointing)
    torch.manual_seed(1)
    logits = server(client(ids, mask), mask)
    lm_loss(logits.float(), labels, 0.1).backward()
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, ref)
    for n, p in peft.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, want[n]), n


def test_gradient_checkpointing_recomputes_blocks():
    import copy

    lm = tiny_model("llama", 0)
    peft = apply_lora(lm.model, lora_config(lm.model.config, 4, 8, 0.0), 0)
    peft.train()
    client, _ = split_model(peft, 2)
    calls, block = [], client.family.block
    client.family = copy.copy(client.family)
    client.family.block = lambda *a: calls.append(1) or block(*a)
    ids = torch.randint(0, 250, (1, 8))
    for on in (False, True):
        calls.clear()
        set_checkpointing(client, on)
        client(ids, torch.ones_like(ids)).sum().backward()
        assert len(calls) == (4 if on else 2)   # each of the 2 blocks run again in backward
    with torch.no_grad():   # evaluation and decoding never recompute
        calls.clear()
        client(ids, torch.ones_like(ids))
        assert len(calls) == 2


def test_bf16_training_lowers_validation_loss_like_fp32(make_config, tmp_path):
    losses = {}
    for name, sets in {"fp32": {}, "bf16": {"runtime.dtype": "bf16", "runtime.autocast": "bf16"}}.items():
        cfg = make_config({"train.max_steps": 6, "train.eval_interval": 6, "train.lr": 2e-2, **sets})
        summary = run_training(cfg, tmp_path / name)
        losses[name] = (summary["initial_val_loss"], summary["final_val_loss"])
    (i32, f32), (i16, f16) = losses["fp32"], losses["bf16"]
    assert f16 < i16 and f32 < i32
    assert abs(i16 - i32) / i32 < 0.01 and abs(f16 - f32) / f32 < 0.02   # bf16 rounding of a random tiny model


def test_a_bf16_message_is_validated_against_the_configured_dtype(make_config):
    from splitlora.transport.checks import Expectations, check_smashed
    from splitlora.transport.codec import BadMessage

    act = torch.randn(2, 5, 64)
    mask, labels = torch.ones(2, 5, dtype=torch.bool), torch.full((2, 5), 7, dtype=torch.int32)
    bf16 = Expectations(64, 258, 2, 16, act_dtypes=(torch.bfloat16,))
    check_smashed({"activations": act.bfloat16(), "attention_mask": mask, "labels": labels}, bf16)
    with pytest.raises(BadMessage, match="activations must be bfloat16"):
        check_smashed({"activations": act, "attention_mask": mask, "labels": labels}, bf16)
    with pytest.raises(BadMessage, match="activations must be float32"):
        check_smashed({"activations": act.bfloat16(), "attention_mask": mask, "labels": labels},
                      Expectations(64, 258, 2, 16))


def test_shape_presets_materialise_only_a_part_in_its_dtype():
    keep = Keep(range(2, 10**6), embeddings=False)   # a server part at k = 2
    a = load_model("shape:tiny", dtype=torch.bfloat16, layers=keep.layers, embeddings=False)
    b = load_model("shape:tiny", dtype=torch.bfloat16, layers=keep.layers, embeddings=False)
    kinds = {n: (p.device.type, p.dtype) for n, p in a.model.named_parameters()}
    assert kinds["model.embed_tokens.weight"][0] == "meta" and kinds["model.layers.1.mlp.up_proj.weight"][0] == "meta"
    assert kinds["model.layers.2.mlp.up_proj.weight"] == ("cpu", torch.bfloat16)
    assert kinds["lm_head.weight"] == ("cpu", torch.bfloat16) and kinds["model.norm.weight"] == ("cpu", torch.bfloat16)
    # seeded by name: another process holding the same tensor holds the same values
    assert torch.equal(a.model.lm_head.weight, b.model.lm_head.weight)
    assert torch.equal(a.model.model.norm.weight, torch.ones_like(a.model.model.norm.weight))
    with pytest.raises(Exception, match="shape:llama-3-8b"):
        load_model("shape:nope")


def test_eval_of_a_heterogeneous_run_uses_the_exported_adapter_config(make_config, tmp_path):
    """hsplitlora exports the total update at its own rank: evaluating through the split model must load
    that adapter as saved (not rebuild LoRA from lora.rank), and agree with the merged model."""
    from splitlora.decode import DecodeConfig, generate
    from splitlora.evaluate import load_trained

    cfg = make_config({"strategy.name": "hsplitlora", "train.max_steps": 4, "strategy.aggregation_interval": 2,
                       "train.eval_interval": 2, "hsplit.max_split_layer": 3, "train.lr": 5e-2})
    run_training(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] != cfg.lora.rank   # the case that broke
    texts = {}
    for mode in ("merged", "split"):
        model, tok, _ = load_trained(tmp_path / "run", mode)
        texts[mode], _ = generate(model, tok, ["name : X||", "eatType : pub||"], DecodeConfig.greedy(max_new_tokens=12))
    assert texts["merged"] == texts["split"]


def test_runtime_describes_itself():
    rt = Runtime(torch.device("cpu"), torch.bfloat16, torch.bfloat16, True, "nf4")
    assert rt.describe() == {"device": "cpu", "dtype": "bfloat16", "autocast": "bfloat16",
                             "gradient_checkpointing": True, "quantization": "nf4"}
    with rt.compute():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


@CUDA
def test_server_on_the_gpu_clients_on_the_cpu_train_like_one_device(make_config, tmp_path):
    base = {"train.max_steps": 4, "train.eval_interval": 4, "lora.dropout": 0.0}
    one = run_training(make_config({**base, "runtime.device": "cpu"}), tmp_path / "cpu")
    two = run_training(make_config({**base, "runtime.server_device": "cuda", "runtime.client_devices": "cpu"}),
                       tmp_path / "mixed")
    assert abs(two["final_val_loss"] - one["final_val_loss"]) < 1e-3 * one["final_val_loss"]
    assert read_metrics(tmp_path / "mixed")[-1]["bytes_up"] == read_metrics(tmp_path / "cpu")[-1]["bytes_up"]


@CUDA
def test_bf16_on_the_gpu_trains(make_config, tmp_path):
    cfg = make_config({"train.max_steps": 4, "runtime.device": "cuda", "runtime.dtype": "bf16",
                       "runtime.autocast": "bf16", "runtime.gradient_checkpointing": True})
    summary = run_training(cfg, tmp_path / "run")
    assert summary["final_val_loss"] < summary["initial_val_loss"]


def test_byte_tokenizer_ids_fit_the_tiny_shape():
    assert len(byte_tokenizer()) <= load_model("shape:tiny").model.config.vocab_size


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_a_quantized_base_trains_and_its_adapter_loads_on_the_same_quantized_base(method, make_config, tmp_path):
    from peft import PeftModel

    from splitlora import data as D
    from splitlora.quantize import is_quantized
    from splitlora.train import load_examples, model_loss

    cfg = make_config({"train.max_steps": 4, "train.eval_interval": 4, "train.lr": 2e-2, "runtime.dtype": "bf16",
                       "runtime.autocast": "bf16", "model.quantization": method})
    summary = run_training(cfg, tmp_path / "run")
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    # plain PEFT on a freshly quantized base gives the run's own validation loss
    lm = load_model("tiny-llama", seed=cfg.train.seed, dtype=torch.bfloat16, quantization=method)
    assert is_quantized(lm.model.model.layers[0]) and not is_quantized(lm.model.lm_head)
    model = PeftModel.from_pretrained(lm.model, tmp_path / "run" / "adapter")
    val = D.tokenize(load_examples(cfg)[1], lm.tokenizer, cfg.data.max_length)[: cfg.data.val_max_samples]
    loss = model_loss(model, val, lm.tokenizer.pad_token_id, cfg.train.eval_batch_size, runtime_of(cfg, "server"))
    assert loss == pytest.approx(summary["final_val_loss"], rel=1e-6)


def test_a_lean_quantized_client_quantizes_only_its_blocks(make_config):
    from splitlora.quantize import is_quantized
    from splitlora.train import client_role

    cfg = make_config({"runtime.dtype": "bf16", "model.quantization": "nf4", "model.quantize": "client"})
    role = client_role(cfg, 0)
    blocks = role.part.blocks
    assert len(blocks) == cfg.model.split_layer and all(is_quantized(b) for b in blocks)
    assert runtime_of(cfg, "server").quantization == "none"
    msg, n = role.forward()
    assert msg["activations"].dtype == torch.bfloat16 and n == cfg.train.batch_size


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_copies_of_a_quantized_part_share_weights_and_agree_whichever_runs_first(method):
    """bitsandbytes int8 moves its matrix from the weight into the layer on the first forward: copies that
    share the weight (the simulator's parts) must still compute the same thing, and share the memory."""
    lm = load_model("tiny-llama", dtype=torch.bfloat16, quantization=method)
    peft = apply_lora(lm.model, lora_config(lm.model.config, 4, 8, 0.0), 0)
    client, _ = split_model(peft, 2)
    ids = torch.randint(0, 250, (2, 6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        first = client(ids, mask)                  # the template's layers run first
        a, b = client.replicate(), client.replicate()
        assert torch.equal(a(ids, mask), first) and torch.equal(b(ids, mask), first)
    qa, qb = a.blocks[0].mlp.up_proj, b.blocks[0].mlp.up_proj
    assert qa is not qb and qa.weight.data_ptr() == qb.weight.data_ptr()


def test_a_role_draws_its_own_random_numbers_wherever_it_runs():
    """A role's stream (LoRA dropout) does not depend on what other roles or the process draw in between,
    and leaves the process's own stream as it found it."""
    from splitlora.runtime import RandomStream, role_seed

    def draws(interleave: bool) -> list[torch.Tensor]:
        torch.manual_seed(5)
        role, out = RandomStream(role_seed(0, "client", 1)), []
        for _ in range(3):
            if interleave:
                torch.rand(7)   # another role, or the simulator, drawing from the global stream
            before = torch.get_rng_state()
            with role.active():
                out.append(torch.nn.functional.dropout(torch.ones(16), 0.5))
            assert torch.equal(torch.get_rng_state(), before)
        return out

    alone, shared = draws(False), draws(True)
    assert all(torch.equal(a, b) for a, b in zip(alone, shared))
    assert not torch.equal(alone[0], alone[1])   # the stream moves on between steps
    assert role_seed(0, "client", 1) != role_seed(0, "client", 2) != role_seed(0, "server")


def test_a_roles_random_stream_is_checkpointed():
    from splitlora.data import BatchStream
    from splitlora.roles import Client, OptimConfig

    lm = tiny_model("llama", 0)
    peft = apply_lora(lm.model, lora_config(lm.model.config, 4, 8, 0.5), 0)
    with torch.no_grad():   # B starts at zero, which would hide the dropout masks
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_()
    part = split_model(peft, 1)[0]
    feats = [{"input_ids": list(range(1, 9)), "labels": list(range(1, 9))}] * 4
    client = Client(0, part, BatchStream(feats, 2, 0, 0), OptimConfig(1e-3, 0.0, 0, 10, 1.0, 0.0))
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in client.state_dict().items()}
    first = client.forward()[0]["activations"]
    client.load_state_dict(state)
    assert torch.equal(client.forward()[0]["activations"], first)   # the same dropout masks again
