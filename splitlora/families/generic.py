"""Model types no family names, accepted only when they prove themselves: a decoder with Llama's layout
(`model.embed_tokens`, `model.layers`, `model.norm`, `model.rotary_emb`, `lm_head`, Llama's linear layer
names) is split with the default family's calls, but first a tiny random model of its own config class
(the user's config, shrunk) must pass a conformance check: split logits and LoRA gradients equal the
unsplit model's, and KV-cached split decoding equals a full recompute. A forward that does something
the default calls do not (a scaled head, a different cache or position scheme) fails it, and the model
is refused with the reason, never split wrong."""

from __future__ import annotations

import copy

import torch

from .base import LLAMA_STAGES, Family

STAGES = {**LLAMA_STAGES, "mlp.gate_up_proj": 2}   # the linear layers a generic decoder may have

SHRINK = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, vocab_size=258, max_position_embeddings=256)


def _tiny_like(config):
    """A copy of `config` at test size (the same class, so the same forward), or an error."""
    def tiny(vocab: int):
        small = copy.deepcopy(config)
        for key, value in {**SHRINK, "vocab_size": vocab}.items():
            if hasattr(small, key) or key in ("num_hidden_layers", "hidden_size", "vocab_size"):
                setattr(small, key, value)
        for key in ("bos_token_id", "eos_token_id"):
            setattr(small, key, vocab - 2)
        small.pad_token_id = vocab - 1
        if getattr(small, "layer_types", None) is not None:
            small.layer_types = list(config.layer_types)[:SHRINK["num_hidden_layers"]]
        if hasattr(small, "sliding_window") and small.sliding_window:
            small.sliding_window = 4
        return small
    return tiny


def why_not(family: Family) -> str | None:
    """None if `family` splits a tiny model of `config`'s class exactly; else what went wrong."""
    from transformers import AutoModelForCausalLM

    from ..cost import Shapes, counted_flops, part_flops
    from ..decode import SplitForCausalLM, check_cached_decoding
    from ..errors import DecodeError
    from ..lora import apply_lora, lora_config
    from ..models import byte_tokenizer
    from ..split import split_model

    try:
        tok = byte_tokenizer()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(family.tiny(len(tok))).eval()
        model.set_attn_implementation("eager")   # what torch's FLOP counter sees, for the cost check
        if getattr(model.config, "_experts_implementation", None) is not None:
            model.set_experts_implementation("eager")
        mods = family.modules(model)
        missing = [k for k in family.paths if k not in mods]
        if missing:
            return f"it has no {', '.join(family.paths[k] for k in missing)}"
        unknown = {name for block in mods["blocks"] for name, m in block.named_modules()
                   if isinstance(m, torch.nn.Linear) and name not in family.stages}
        if unknown:
            return f"its blocks have linear layers the default family does not know ({', '.join(sorted(unknown))})"
        peft = apply_lora(model, lora_config(model.config, 4, 8, 0.0), 0)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in peft.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        ids = torch.randint(0, 256, (2, 12), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0
        want = peft(input_ids=ids, attention_mask=mask).logits
        want.square().mean().backward()
        client, server = split_model(peft, 1)
        got = server(client(ids, mask), mask)
        keep = mask.bool()
        if not torch.allclose(got[keep], want[keep], rtol=1e-4, atol=1e-5):
            return "the split computes other logits than the model's own forward"
        check_cached_decoding(SplitForCausalLM(client, server).eval(), tok, "name : X||", new_tokens=4)
        hidden = torch.randn(2, 12, model.config.hidden_size, generator=gen, requires_grad=True)
        f = part_flops(Shapes.from_model(peft), 1, 2, True, 2, 12, input_grad=True)
        if (f.forward, f.backward) != counted_flops(server.train(), hidden, torch.ones(2, 12, dtype=torch.long)):
            return "the cost model's FLOP count differs from torch's (weights outside nn.Linear?)"
    except DecodeError as e:
        return f"split decoding with a KV cache failed: {e}"
    except Exception as e:   # a config that cannot be shrunk or split this way is not accepted
        return f"{type(e).__name__}: {e}"
    return None


def candidate(config) -> Family:
    """The default family for `config`'s model type, its tiny config shrunk from `config`."""
    return Family(config.model_type, _tiny_like(config), stages=STAGES)
