"""Conformance of every model family (splitlora/families/): each test runs on each family's tiny random
config, built from the family's own transformers config class. A family is supported when it passes
all of them: the split, the U-shaped split and KV-cached split decoding compute what the unsplit model
computes; the exported adapter is a plain PEFT adapter; the cost model counts what torch counts; a
part loads only its own tensors; and a saved directory of the family trains and evaluates."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_lora_model
from peft import PeftModel, get_peft_model_state_dict
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import splitlora.models as M
from splitlora.cost import Shapes, counted_flops, part_flops
from splitlora.decode import DecodeConfig, SplitForCausalLM, check_cached_decoding, generate
from splitlora.families import FAMILIES
from splitlora.learning import lm_loss
from splitlora.lora import apply_lora, export_adapter, lora_config
from splitlora.split import split_model, split_u

TYPES = sorted(FAMILIES)
L = 4   # every tiny config has 4 blocks


def lora_model(model_type: str, seed: int = 0, eager: bool = False):
    """The family's tiny model with LoRA whose A *and* B are random (B = 0 would hide server-side errors)."""
    lm = M.tiny_model(model_type, seed)
    if eager:   # attention and experts as plain matrix products, which torch's FLOP counter sees
        lm.model.set_attn_implementation("eager")
        if lm.model.config._experts_implementation is not None:
            lm.model.set_experts_implementation("eager")
    peft = apply_lora(lm.model, lora_config(lm.model.config, rank=4, alpha=8, dropout=0.0), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return peft, lm.tokenizer


def batch(seed: int = 0, length: int = 12):
    """Right padding (rows of 12, 8 and 5 tokens), prompt tokens and padding out of the labels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (3, length), generator=gen)
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 257
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :2] = -100
    return ids, mask, labels


def test_every_family_the_issue_names_is_registered():
    named = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
             "gemma3_text", "phi3", "olmo2", "granite", "smollm3", "gpt2", "gpt_neox", "opt"}
    assert named <= set(FAMILIES)
    for t in TYPES:
        config = FAMILIES[t].tiny(258)
        assert config.model_type == t and config.num_hidden_layers == L


def test_the_tiny_configs_cover_each_quirk():
    """Tied and untied heads, GQA and MQA, biases, sliding windows, soft-capping: each in some family."""
    configs = {t: FAMILIES[t].tiny(258) for t in TYPES}
    tied = {t for t, c in configs.items() if c.tie_word_embeddings}
    assert tied and set(TYPES) - tied
    kv = {t: getattr(c, "num_key_value_heads", None) or c.num_attention_heads for t, c in configs.items()}
    assert any(1 < kv[t] < c.num_attention_heads for t, c in configs.items())      # GQA
    assert any(kv[t] == 1 for t in configs)                                          # MQA
    assert {"sliding_attention"} <= set(configs["gemma2"].layer_types) and configs["mistral"].sliding_window == 4
    assert configs["gemma2"].final_logit_softcapping and configs["gemma2"].attn_logit_softcapping
    peft, _ = lora_model("qwen2")
    assert any(n.endswith("q_proj.base_layer.bias") for n, _ in peft.named_parameters())


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("model_type", TYPES)
def test_split_equals_unsplit(model_type, mode):
    """Loss, logits and every LoRA gradient, at two split points, right padding; train mode keeps the
    families' own dropout (the same seed before both passes gives the same masks)."""
    peft, _ = lora_model(model_type)
    fam = FAMILIES[model_type]
    ids, mask, labels = batch()
    getattr(peft, mode)()
    torch.manual_seed(123)
    ref_logits = peft(input_ids=ids, attention_mask=mask).logits
    ref_loss = lm_loss(ref_logits, labels, 0.1)
    ref_loss.backward()
    ref_grads = {n.replace(".default", ""): p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}
    assert set(ref_grads) == set(get_peft_model_state_dict(peft))
    for k in (1, 3):
        client, server = (p.replicate() for p in split_model(peft, k))
        for part in (client, server):
            getattr(part, mode)()
        assert all(fam.block_index(key) < k for key in client.adapter)
        assert all(fam.block_index(key) >= k for key in server.adapter)
        assert set(client.adapter) | set(server.adapter) == set(ref_grads)
        torch.manual_seed(123)
        h = client(ids, mask)
        hs = h.detach().requires_grad_(True)
        logits = server(hs, mask)
        loss = lm_loss(logits, labels, 0.1)
        loss.backward()
        h.backward(hs.grad)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        for part in (client, server):
            for key, p in part.adapter.items():
                ref = ref_grads[key]
                assert ref.norm() > 0, key
                assert (p.grad - ref).norm() <= 1e-5 * ref.norm(), (k, key)


@pytest.mark.parametrize("model_type", TYPES)
def test_ushaped_split_equals_unsplit(model_type):
    """The U-shaped client (blocks [0, 1) and [3, 4), the final norm and the head, tied or not) and the
    server (blocks [1, 3)) compute the unsplit logits."""
    peft, _ = lora_model(model_type)
    peft.eval()
    ids, mask, _ = batch()
    client, server = split_u(peft, 1, 1)
    tied = peft.get_base_model().config.tie_word_embeddings
    fam = FAMILIES[model_type]
    assert client.top.has_head and fam.lm_head in client.top.mods and fam.lm_head not in server.mods
    head, embedding = client.top.mods[fam.lm_head].weight, client.bottom.mods[fam.embed_key].weight
    assert (head is embedding) == bool(tied)
    with torch.no_grad():
        ref = peft(input_ids=ids, attention_mask=mask).logits
        out = client.top(server(client(ids, mask), mask), mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", TYPES)
def test_kv_cached_split_decoding_equals_unsplit_generate(model_type):
    peft, tok = lora_model(model_type)
    split = SplitForCausalLM(*split_model(peft, 2))
    prompts = ["name : The Eagle | food : French||", "area : riverside||"]
    cfg = DecodeConfig.greedy(max_new_tokens=10, no_repeat_ngram_size=0)
    a, _ = generate(split, tok, prompts, cfg)
    b, _ = generate(peft, tok, prompts, cfg)
    assert a == b and any(a)
    assert check_cached_decoding(split, tok, prompts[0], new_tokens=6) <= 1e-3


@pytest.mark.parametrize("model_type", TYPES)
def test_exported_adapter_loads_into_plain_peft(model_type, tmp_path):
    """The parts' adapter slices, stitched and exported, loaded by PEFT onto a fresh unsplit base, give
    the split model's logits."""
    peft, _ = lora_model(model_type, seed=2)
    peft.eval()
    client, server = split_model(peft, 2)
    state = {**client.adapter_state(), **server.adapter_state()}
    ids, mask, _ = batch()
    with torch.no_grad():
        want = server(client(ids, mask), mask)
    export_adapter(peft, state, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    base = M.tiny_model(model_type, seed=2).model
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", TYPES)
def test_cost_model_flops_equal_torch_flop_counter(model_type):
    """A client part (embeddings + 2 blocks) and a server part (2 blocks + head), forward and backward."""
    peft, _ = lora_model(model_type, eager=True)
    peft.train()
    for m in peft.modules():   # dropout off: the counts do not depend on it, the comparison must not either
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    s = Shapes.from_model(peft)
    client, server = split_model(peft, 2)
    b, t = 2, 12
    hidden = peft.get_base_model().config.hidden_size
    for part, start, stop, head, grad in ((client, 0, 2, False, False), (server, 2, L, True, True)):
        x = torch.randint(0, 256, (b, t)) if start == 0 else torch.randn(b, t, hidden, requires_grad=grad)
        counted = counted_flops(part, x, torch.ones(b, t, dtype=torch.long))   # torch's FLOP counter
        f = part_flops(s, start, stop, head, b, t, input_grad=grad)
        assert (f.forward, f.backward) == counted, (model_type, start)


@pytest.mark.parametrize("model_type", TYPES)
def test_a_part_loads_only_its_own_tensors(model_type, tmp_path, tensor_reads):
    """From a saved directory, a client process (embeddings + blocks [0, 2)) and a server process
    (blocks [2, 4), final norm, head) read only their blocks' tensors, and each part computes the whole
    model's part."""
    lm = M.tiny_model(model_type, seed=5)
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    fam = FAMILIES[model_type]
    read = tensor_reads
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    outside = {k for k in stored if fam.block_index(k) is None}   # embeddings, final norm, head
    whole = M.tiny_model(model_type, seed=5).model
    from splitlora.split import ModelPart
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 10), generator=gen)
    hidden = torch.randn(2, 10, whole.config.hidden_size, generator=gen)
    for layers, kw, x in ((range(2), {"head": False}, ids), (range(2, L), {"embeddings": False}, hidden)):
        read.clear()
        part_model = M.load_model(str(tmp_path), layers=layers, **kw).model
        assert {fam.block_index(k) for k in read} - {None} == set(layers), read
        assert set(read) - {k for k in stored if fam.block_index(k) in layers} <= outside
        assert len(read) < len(stored)
        with torch.no_grad():
            got = ModelPart(fam, part_model.config, fam.modules(part_model), layers.start, layers.stop, {}).eval()
            want = ModelPart(fam, whole.config, fam.modules(whole), layers.start, layers.stop, {}).eval()
            assert torch.equal(got(x, torch.ones(2, 10, dtype=torch.long)), want(x, torch.ones(2, 10, dtype=torch.long)))


def test_block_index_reads_each_familys_keys():
    assert FAMILIES["gpt2"].block_index("base_model.model.transformer.h.3.attn.c_attn.lora_A.weight") == 3
    assert FAMILIES["gpt_neox"].block_index("gpt_neox.layers.12.attention.dense.weight") == 12
    assert FAMILIES["opt"].block_index("model.decoder.layers.0.fc1.weight") == 0
    assert FAMILIES["llama"].block_index("model.embed_tokens.weight") is None
    assert FAMILIES["llama"].block_index("lm_head.weight") is None


def test_auto_model_builds_every_tiny_config():
    """The tiny configs are the transformers classes' own: AutoModelForCausalLM maps each to its model."""
    for t in TYPES:
        model = AutoModelForCausalLM.from_config(FAMILIES[t].tiny(258))
        assert FAMILIES[t].modules(model)["blocks"] is not None


@pytest.mark.parametrize("model_type", TYPES)
def test_a_saved_directory_of_each_family_trains_and_evaluates_from_the_cli(model_type, tmp_path, e2e_file,
                                                                            monkeypatch):
    """What a newcomer does: save_pretrained a model, then `splitlora train --set model.name=DIR` and
    `splitlora eval RUN_DIR` (split decoding, its KV cache checked against a full recompute). METEOR's
    Java scorer (8 s a call, the same for every family; tested in test_metrics) is left out here."""
    from conftest import read_metrics, write_config

    import splitlora.metrics.coco as coco
    from splitlora.cli import main

    monkeypatch.setattr(coco, "_meteor", lambda gts, res: (None, "left out of this test"))

    lm = M.tiny_model(model_type, seed=1)
    model_dir = tmp_path / model_type
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    config = write_config(tmp_path, e2e_file, {"train.max_steps": 3, "train.eval_interval": 3, "train.lr": 2e-2})
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--set", f"model.name={model_dir}", "--output", str(run),
                 "--no-progress"]) == 0
    rows = read_metrics(run)
    val = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    assert rows[-1]["step"] == 3 and len(val) == 2 and val[-1] < val[0]
    assert main(["eval", str(run), "--output", str(tmp_path / "eval"), "--limit", "2", "--greedy",
                 "--max-new-tokens", "6", "--no-progress", "--mode", "split"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["cache_check_max_relative_diff"] < 1e-3 and metrics["num_mrs"] == 2
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == set(FAMILIES[model_type].targets)


def _config(model_type: str, **kw):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type](**kw)


def test_an_unnamed_llama_layout_type_is_accepted_after_the_conformance_check(caplog):
    """Helium has no family of its own; its forward is Llama's, so the check passes (with a warning) and
    it splits exactly; its tiny model is shrunk from the user's config."""
    from splitlora.families import family_of

    config = _config("helium", vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=257)
    family = family_of(config)
    assert "'helium' has no family of its own" in caplog.text
    assert family.name == "helium" and "helium" not in FAMILIES
    assert family_of(config) is family      # decided once per config
    peft = random_lora_model(config)
    ids, mask, _ = batch()
    client, server = split_model(peft, 2)
    with torch.no_grad():
        torch.testing.assert_close(server(client(ids, mask), mask), peft(input_ids=ids, attention_mask=mask).logits,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type, overrides, reason", [
    ("cohere", {}, "other logits"),                      # scales its logits in the causal LM's forward
    ("olmoe", {}, "FLOP count"),                         # experts outside nn.Linear: the cost model would miss them
    ("starcoder2", {}, "linear layers"),                 # c_fc / c_proj: not Llama's names
    ("bloom", {}, "has no model.embed_tokens"),          # another layout
    ("granite_swa", {"embedding_multiplier": 12.0}, "other logits"),   # accepted at 1.0, refused at 12.0
])
def test_an_unnamed_type_the_default_family_would_split_wrong_is_refused_with_the_reason(model_type, overrides,
                                                                                     reason):
    from splitlora.errors import SplitError
    from splitlora.families import family_of

    with pytest.raises(SplitError, match=reason) as err:
        family_of(_config(model_type, **overrides))
    assert f"'{model_type}' is not supported" in str(err.value) and "gemma2" in str(err.value)
    if model_type == "granite_swa":   # the same type with its scalings at 1 is Llama's forward
        assert family_of(_config(model_type)).name == "granite_swa"


@pytest.mark.parametrize("model_type", TYPES)
def test_every_strategy_trains_on_every_family(model_type, make_config, tmp_path):
    """Two steps of each strategy (and a U-shaped SplitLoRA) on the family's tiny model: finite losses, and
    one PEFT adapter of the family's default targets exported."""
    from conftest import read_metrics

    from splitlora.strategies import available
    from splitlora.train import train

    runs = [(name, {}) for name in available()] + [("splitlora", {"model.top_layers": 1})]
    for name, extra in runs:
        cfg = make_config({"model.name": f"tiny-{model_type}", "strategy.name": name, "train.max_steps": 2,
                           "train.eval_interval": 2, **extra})
        run = tmp_path / f"{name}-{len(extra)}"
        assert train(cfg, run, progress=False)["step"] == 2
        losses = [r["train_loss"] for r in read_metrics(run) if r["train_loss"] is not None]
        assert losses and all(loss == loss and loss < 20 for loss in losses), (name, losses)
        adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
        assert set(adapter["target_modules"]) == set(FAMILIES[model_type].targets), name
