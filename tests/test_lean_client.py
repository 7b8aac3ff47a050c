"""A deployed client never materialises the server part: only the embeddings and blocks [0, k) hold
memory (the rest are meta tensors, never read from disk), and the client part computes exactly what
the same part of the whole model computes, with the same LoRA initialisation."""

from __future__ import annotations

import pytest
import torch

import splitlora.build as B
import splitlora.models as M
import splitlora.train as T
from splitlora.runtime import runtime_of
from splitlora.families import family_of
from splitlora.split import split_model

SMOLLM2_FILE = M.cache_dir() / M.SMOLLM2 / "model.safetensors"


@pytest.fixture
def loaded(monkeypatch):
    """Every model client_role loads (the whole transformers model, not only the part it keeps)."""
    models = []

    def spy(*args, **kwargs):
        lm = M.load_model(*args, **kwargs)
        models.append(lm.model)
        return lm

    monkeypatch.setattr(B, "load_model", spy)   # the one place a role's model is built
    return models


def _assert_lean(role, hf, k: int) -> None:
    """Blocks >= k, the final norm and their LoRA are meta; everything the client part uses is real."""
    mods = family_of(hf.config).modules(hf)
    for i, block in enumerate(mods["blocks"]):
        devices = {p.device.type for p in block.parameters()}
        assert devices == ({"cpu"} if i < k else {"meta"}), (i, devices)
    final_norm = mods.get("norm", mods.get("ln_f"))
    assert all(p.device.type == "meta" for p in final_norm.parameters())
    assert [n for n, p in role.part.named_parameters() if p.device.type == "meta"] == []
    assert all(b.device.type == "cpu" for b in role.part.buffers())   # rotary tables hold real values
    # what is materialised is the client part (embeddings + k blocks), nothing of the server part
    real = {id(p) for p in hf.parameters() if p.device.type != "meta"}
    assert real == {id(p) for p in role.part.parameters()}


def _assert_equals_full_client_part(cfg, role) -> None:
    """Outputs, buffers and LoRA initialisation equal those of the whole model's client part."""
    T.torch.manual_seed(cfg.train.seed)
    _, full = B.role_model(cfg, runtime_of(cfg, "server"))
    ref = split_model(full, cfg.model.split_layer)[0]
    assert set(ref.adapter) == set(role.part.adapter)
    for key, p in ref.adapter.items():
        assert torch.equal(p, role.part.adapter[key]), key
    for (name, b), (_, ref_b) in zip(role.part.named_buffers(), ref.named_buffers(), strict=True):
        assert torch.equal(b, ref_b), name
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, full.get_base_model().config.vocab_size - 2, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0     # right padding, as in training
    role.part.eval()
    ref.eval()
    with torch.no_grad():
        assert torch.equal(role.part(ids, mask), ref(ids, mask))


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_split_client_materialises_only_its_part(model, make_config, loaded):
    cfg = make_config({"model.name": model, "model.split_layer": 2})
    role = T.client_role(cfg, 1)
    assert len(loaded) == 1
    _assert_lean(role, loaded[0], 2)
    _assert_equals_full_client_part(cfg, role)


def test_fedlora_client_holds_the_whole_model(make_config, loaded):
    role = T.client_role(make_config({"strategy.name": "fedlora"}), 0)
    assert all(p.device.type == "cpu" for p in loaded[0].parameters())
    assert role.part.has_head


@pytest.mark.skipif(not SMOLLM2_FILE.exists(), reason=f"no cached SmolLM2 weights at {SMOLLM2_FILE}")
def test_smollm2_client_reads_only_its_layers(make_config, loaded, tensor_reads):
    read = tensor_reads
    k = 3
    cfg = make_config({"model.name": M.SMOLLM2, "model.split_layer": k, "data.max_length": 128})
    role = T.client_role(cfg, 0)
    hf = loaded[0]
    _assert_lean(role, hf, k)
    # only the embedding matrix (tied with the LM head) and blocks [0, k) were read from the file
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    layers = {int(key.split(".")[2]) for key in read if key.startswith("model.layers.")}
    assert layers == set(range(k))
    assert set(read) - {key for key in read if key.startswith("model.layers.")} == {"model.embed_tokens.weight"}
    materialised = sum(p.numel() for p in hf.parameters() if p.device.type != "meta")
    total = sum(p.numel() for p in hf.parameters())   # meta tensors still know their shapes
    assert materialised < 0.35 * total
    _assert_equals_full_client_part(cfg, role)   # (reads the whole model: after the assertions on `read`)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_partial_load_of_a_model_directory(family, tmp_path):
    """A saved HF directory (safetensors, tied head stored once): either part loads alone and computes
    what the same part of the whole model computes."""
    lm = M.tiny_model(family, seed=5)
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    whole = M.load_model(str(tmp_path)).model
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, whole.config.vocab_size - 2, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    hidden = torch.randn(2, 10, whole.config.hidden_size, generator=g)
    for layers, kw, x in ((range(2), {"head": False}, ids), (range(2, 4), {"embeddings": False}, hidden)):
        part_model = M.load_model(str(tmp_path), layers=layers, **kw).model
        blocks = family_of(part_model.config).modules(part_model)["blocks"]
        assert [i for i, b in enumerate(blocks) if any(p.device.type != "meta" for p in b.parameters())] \
            == list(layers)
        with torch.no_grad():
            got = _bare_part(part_model, layers)(x, mask)
            want = _bare_part(whole, layers)(x, mask)
        assert torch.equal(got, want)
        assert not any(p.device.type == "meta" for p in _bare_part(part_model, layers).parameters())


def _bare_part(model, layers):
    """Blocks `layers` of a model without LoRA, as a ModelPart."""
    from splitlora.split import ModelPart

    fam = family_of(model.config)
    return ModelPart(fam, model.config, fam.modules(model), layers.start, layers.stop, {}).eval()


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_ushaped_client_materialises_only_its_two_parts(model, make_config, loaded):
    """A U-shaped client holds the embeddings, blocks [0, k) and [L - m, L) and the head; the middle
    stays meta; its parts compute what the whole model's U-shaped client parts compute."""
    from splitlora.split import split_u

    cfg = make_config({"model.name": model, "model.split_layer": 1, "model.top_layers": 1})
    role = T.client_role(cfg, 0)
    hf = loaded[0]
    real = {id(p) for p in hf.parameters() if p.device.type != "meta"}
    assert real == {id(p) for p in role.part.parameters()}
    assert any(p.device.type == "meta" for p in hf.parameters())
    T.torch.manual_seed(cfg.train.seed)
    _, full = B.role_model(cfg, runtime_of(cfg, "server"))
    ref = split_u(full, 1, 1)[0]
    assert all(torch.equal(p, role.part.adapter[k]) for k, p in ref.adapter.items())
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    role.part.eval()
    ref.eval()
    with torch.no_grad():
        h = role.part(ids, mask)
        assert torch.equal(h, ref(ids, mask))
        assert torch.equal(role.part.top(h, mask), ref.top(h, mask))
