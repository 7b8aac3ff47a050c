"""The layer split is exact: client part + server part compute what the unsplit PEFT model computes."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import random_lora_model
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM, BloomConfig

from splitlora.lora import apply_lora, lora_config
from splitlora.models import tiny_model
from splitlora.learning import lm_loss
from splitlora.families import family_of
from splitlora.split import SplitError, split_model

FAMILIES = ["gpt2", "llama"]
NUM_LAYERS = 4  # tiny presets


def lora_model(family: str, seed: int = 0):
    """A tiny PEFT model whose LoRA A *and* B are random (B = 0 at init would hide server-side errors)."""
    lm = tiny_model(family, seed)
    peft = apply_lora(lm.model, lora_config(lm.model.config, rank=4, alpha=8, dropout=0.0), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return peft


def right_padded_batch(seed: int = 0):
    """3 rows of lengths 12, 8, 5 (mask zeros at the end), prompt tokens and padding out of the labels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (3, 12), generator=gen)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 257  # <pad>
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :2] = -100
    return ids, mask, labels


def layer_index(key: str) -> int:
    return int(re.search(r"\.(?:h|layers)\.(\d+)\.", key).group(1))


def peft_key(name: str) -> str:
    return name.replace(".default", "")


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_split_equals_unsplit(family, k, mode):
    peft = lora_model(family)
    ids, mask, labels = right_padded_batch()
    smoothing = 0.1

    # Unsplit reference. Train mode keeps the base model's own dropout (GPT-2: 0.1); the same seed
    # before both forwards gives the same masks, since the split forward runs the same ops in order.
    getattr(peft, mode)()
    torch.manual_seed(123)
    ref_logits = peft(input_ids=ids, attention_mask=mask).logits
    ref_loss = lm_loss(ref_logits, labels, smoothing)
    ref_loss.backward()
    ref_grads = {peft_key(n): p.grad for n, p in peft.named_parameters() if p.requires_grad}
    assert set(ref_grads) == set(get_peft_model_state_dict(peft))  # our key naming is PEFT's file naming

    client, server = split_model(peft, k)
    client, server = client.replicate(), server.replicate()
    getattr(client, mode)()
    getattr(server, mode)()
    # The parts slice the adapter: disjoint, together exactly the whole adapter.
    assert not set(client.adapter) & set(server.adapter)
    assert set(client.adapter) | set(server.adapter) == set(ref_grads)
    assert all(layer_index(key) < k for key in client.adapter)
    assert all(layer_index(key) >= k for key in server.adapter)

    torch.manual_seed(123)
    h = client(ids, mask)
    hs = h.detach().requires_grad_(True)
    logits = server(hs, mask)
    loss = lm_loss(logits, labels, smoothing)
    loss.backward()
    h.backward(hs.grad)

    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for part in (client, server):
        for key, p in part.adapter.items():
            assert p.grad is not None, key
            ref = ref_grads[key]
            assert ref.norm() > 0, key
            assert (p.grad - ref).norm() <= 1e-5 * ref.norm(), key


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_mask_reaches_both_parts(family):
    """LEFT padding: real tokens could attend to the pads, so only the mask keeps them out. Changing the
    pad tokens must change nothing at real positions, and the split still equals the unsplit model."""
    peft = lora_model(family).eval()
    ids, mask, _ = right_padded_batch()
    ids, mask = ids.flip(1), mask.flip(1)
    other = ids.clone()
    other[mask == 0] = 5
    client, server = split_model(peft, 2)
    with torch.no_grad():
        a = server(client(ids, mask), mask)
        b = server(client(other, mask), mask)
        ref = peft(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], rtol=0, atol=1e-5)
    torch.testing.assert_close(a[keep], ref[keep], rtol=1e-5, atol=1e-5)


def test_gpt2_positions_added_once_on_the_client():
    peft = lora_model("gpt2").eval()
    client, server = split_model(peft, 2)
    assert set(client.mods) == {"wte", "wpe", "drop"}
    assert set(server.mods) == {"ln_f", "lm_head"}  # no wte/wpe: positions are not added again
    # And it matters: adding the learned positions a second time on the server changes the logits,
    # so the equality test above would catch a double addition.
    ids, mask, _ = right_padded_batch()
    with torch.no_grad():
        h = client(ids, mask)
        good = server(h, mask)
        pos = client.mods["wpe"](torch.arange(ids.shape[1]).unsqueeze(0))
        twice = server(h + pos, mask)
    assert (good - twice).abs().max() > 1e-3


def test_llama_parts_modules():
    client, server = split_model(lora_model("llama"), 2)
    assert set(client.mods) == {"embed_tokens", "rotary_emb"}
    assert set(server.mods) == {"rotary_emb", "norm", "lm_head"}
    assert len(client.blocks) == 2 and len(server.blocks) == 2
    assert client.has_embeddings and not client.has_head
    assert server.has_head and not server.has_embeddings


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [0, NUM_LAYERS, NUM_LAYERS + 1, -1])
def test_split_layer_out_of_range(family, k):
    with pytest.raises(SplitError, match=r"model\.split_layer") as err:
        split_model(lora_model(family), k)
    assert f"between 1 and {NUM_LAYERS - 1}" in str(err.value)


def tiny_bloom():   # ALiBi positions: a family splitlora does not know
    config = BloomConfig(vocab_size=258, hidden_size=16, n_layer=2, n_head=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def test_unsupported_family_raises_listing_supported():
    bloom = tiny_bloom()
    with pytest.raises(SplitError) as err:
        family_of(bloom.config)
    msg = str(err.value)
    assert "'bloom'" in msg and "model.name" in msg
    for supported in ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "opt"):
        assert supported in msg
    # Splitting an (already LoRA-wrapped) BLOOM model fails the same way, not with an AttributeError.
    peft = get_peft_model(bloom, LoraConfig(r=2, target_modules=["query_key_value"]))
    with pytest.raises(SplitError, match="supported"):
        split_model(peft, 1)
    # ... and so does asking for a LoRA config for it.
    with pytest.raises(SplitError, match="supported"):
        lora_config(bloom.config, 4, 8, 0.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_replicate_shares_frozen_weights_not_lora(family):
    peft = lora_model(family)
    client, server = split_model(peft, 2)
    for part in (client, server):
        a, b = part.replicate(), part.replicate()
        params_a, params_b = dict(a.named_parameters()), dict(b.named_parameters())
        assert params_a.keys() == params_b.keys()
        frozen = [n for n, p in params_a.items() if not p.requires_grad]
        lora = [n for n, p in params_a.items() if p.requires_grad]
        assert frozen and lora
        for n in frozen:
            assert params_a[n].data_ptr() == params_b[n].data_ptr(), n
        for n in lora:
            assert params_a[n].data_ptr() != params_b[n].data_ptr(), n
            assert torch.equal(params_a[n], params_b[n]), n  # a copy, initially equal
        for (na, ba), (nb, bb) in zip(a.named_buffers(), b.named_buffers()):
            assert ba.data_ptr() == bb.data_ptr(), na
        # each replica's adapter dict points at its own trainable parameters
        assert {id(p) for p in a.adapter.values()} == {id(p) for p in a.parameters() if p.requires_grad}
        assert a.adapter.keys() == part.adapter.keys()
        # training one replica's LoRA leaves the other and the original alone
        key = next(iter(a.adapter))
        before = part.adapter[key].detach().clone()
        with torch.no_grad():
            a.adapter[key].add_(1.0)
        assert torch.equal(b.adapter[key], before)
        assert torch.equal(part.adapter[key], before)


def test_adapter_state_roundtrip_and_mismatch():
    client, server = split_model(lora_model("llama"), 2)
    rep = client.replicate()
    state = {k: torch.full_like(v, 0.5) for k, v in rep.adapter_state().items()}
    rep.load_adapter_state(state)
    assert all(torch.equal(v, state[k]) for k, v in rep.adapter_state().items())
    with pytest.raises(KeyError):
        rep.load_adapter_state(server.adapter_state())  # server keys do not fit the client part


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_other_llama_like_types_split_exactly_with_sliding_windows(model_type, k):
    """Mistral (sliding window on every layer) and Qwen2 (per-layer full/sliding types) go through the
    llama family; a window of 4 over 12 tokens makes a wrong mask visible."""
    from transformers import MistralConfig, Qwen2Config

    common = dict(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    config = (MistralConfig(**common) if model_type == "mistral"
              else Qwen2Config(**common, use_sliding_window=True, max_window_layers=2))
    peft = random_lora_model(config)
    ids, mask, _ = right_padded_batch()
    client, server = split_model(peft, k)
    with torch.no_grad():
        ref = peft(input_ids=ids, attention_mask=mask).logits
        out = server(client(ids, mask), mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert family_of(config).name == model_type
    # the window matters at this length: the same weights without a window give other logits
    config.sliding_window = None
    if model_type == "qwen2":
        config.layer_types = ["full_attention"] * NUM_LAYERS
    no_window = AutoModelForCausalLM.from_config(config).eval()
    no_window.load_state_dict(peft.merge_and_unload().state_dict())
    with torch.no_grad():
        unwindowed = no_window(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(unwindowed[0, 6:], ref[0, 6:], atol=1e-4)
