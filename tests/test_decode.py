"""Decoding: the split model (client part -> server part with one KV cache) decodes exactly what the
unsplit PEFT model decodes, and a trained run's merged adapter gives the same text as its split model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_training
from splitlora import data as D
from splitlora.decode import DecodeConfig, DecodeError, SplitForCausalLM, check_cached_decoding, clean, generate
from splitlora.evaluate import load_trained
from splitlora.lora import apply_lora, lora_config
from splitlora.models import tiny_model
from splitlora.split import split_model

PROMPTS = ["name : Blue Spice | area : city centre||", "name : X||", "eatType : pub | food : English | near : Y||"]


def random_lora(family: str):
    lm = tiny_model(family, 1)
    peft = apply_lora(lm.model, lora_config(lm.model.config, 4, 8, 0.0), 1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return peft, lm.tokenizer


@pytest.mark.parametrize("cfg", [DecodeConfig.greedy(max_new_tokens=24),
                                 DecodeConfig(num_beams=4, max_new_tokens=24, no_repeat_ngram_size=2,
                                              repetition_penalty=1.3, batch_size=2)],
                         ids=["greedy", "beam"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_split_decoding_equals_unsplit(family, k, cfg):
    peft, tok = random_lora(family)
    split = SplitForCausalLM(*split_model(peft, k))
    a, stats = generate(split, tok, PROMPTS, cfg)
    b, _ = generate(peft, tok, PROMPTS, cfg)
    assert a == b
    assert stats["generated_tokens"] > len(PROMPTS) and stats["tokens_per_s"] > 0
    assert any(len(t) > 5 for t in a)   # something was generated (not all empty)


def test_split_kv_cache_is_used_and_exact():
    """Incremental decoding through the split parts with a cache gives the full-recompute logits."""
    from transformers import DynamicCache

    peft, tok = random_lora("llama")
    client, server = split_model(peft, 2)
    ids = torch.tensor([tok("name : X||").input_ids])
    mask = torch.ones_like(ids)
    cache = DynamicCache(config=peft.config if hasattr(peft.config, "num_hidden_layers") else client.config)
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        server(client(ids[:, :-1], mask[:, :-1], pos[:, :-1], cache), mask[:, :-1], pos[:, :-1], cache)
        step = server(client(ids[:, -1:], mask, pos[:, -1:], cache), mask, pos[:, -1:], cache)
        full = server(client(ids, mask), mask)
    assert cache.get_seq_length(0) == ids.shape[1] and cache.get_seq_length(3) == ids.shape[1]
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)


def test_split_model_refuses_a_step_whose_cache_did_not_arrive():
    """The transformers 5.24 failure: generate fed the new token alone while its cache (under a new
    keyword) never reached the parts. Such a step must raise, not decode garbage."""
    peft, tok = random_lora("llama")
    split = SplitForCausalLM(*split_model(peft, 2))
    with torch.no_grad():
        with pytest.raises(DecodeError, match="KV cache holds 0"):
            split(input_ids=torch.tensor([[5]]), attention_mask=torch.ones(1, 6, dtype=torch.long))
        # both keywords generate has used reach the parts
        for kw in ("cache", "past_key_values"):
            out = split(input_ids=torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
                        use_cache=True)
            cache = next(v for k, v in out.items() if k in ("cache", "past_key_values"))
            step = split(input_ids=torch.tensor([[8]]), attention_mask=torch.ones(1, 4, dtype=torch.long),
                         position_ids=torch.tensor([[3]]), **{kw: cache})
            full = split(input_ids=torch.tensor([[5, 6, 7, 8]]), attention_mask=torch.ones(1, 4, dtype=torch.long))
            torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cache_check_passes_on_split_and_unsplit_and_catches_a_stale_cache(family, monkeypatch):
    peft, tok = random_lora(family)
    split = SplitForCausalLM(*split_model(peft, 1))
    assert check_cached_decoding(split, tok, PROMPTS[0]) < 1e-4
    assert check_cached_decoding(peft, tok, PROMPTS[0]) < 1e-4
    # a cache that is lost between steps: each step sees only its own token (fluent-looking nonsense)
    from transformers import DynamicCache
    forward = SplitForCausalLM.forward

    def forgetful(self, input_ids=None, attention_mask=None, **kw):
        kw.pop("cache", None), kw.pop("past_key_values", None)
        mask = None if attention_mask is None else attention_mask[:, -input_ids.shape[1]:]
        return forward(self, input_ids=input_ids, attention_mask=mask,
                       cache=DynamicCache(config=self.config), **{k: v for k, v in kw.items() if k != "position_ids"})

    monkeypatch.setattr(SplitForCausalLM, "forward", forgetful)
    with pytest.raises(DecodeError, match="differs from a full recompute"):
        check_cached_decoding(split, tok, PROMPTS[0])


def test_clean_cuts_at_blank_line_and_joins_lines():
    assert clean(" The pub.\nIt is nice.\n\nname : Z") == "The pub. It is nice."
    assert clean("  a   b ") == "a b"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_trained_run_merged_adapter_and_split_model_give_same_text(family, make_config, tmp_path):
    cfg = make_config({"model.name": f"tiny-{family}", "train.max_steps": 4, "train.lr": 5e-2})
    run_training(cfg, tmp_path / "run")
    examples = D.load_e2e(cfg.data.train_file)
    prompts = list(dict.fromkeys(ex.prompt for ex in examples))[:4]
    texts = {}
    for mode in ("merged", "split"):
        model, tok, _ = load_trained(tmp_path / "run", mode)
        texts[mode], _ = generate(model, tok, prompts, DecodeConfig(num_beams=3, max_new_tokens=16))
    assert texts["merged"] == texts["split"]
    assert type(load_trained(tmp_path / "run", "split")[0]).__name__ == "SplitForCausalLM"


def test_eval_cli_writes_official_format_files(make_config, tmp_path, capsys):
    from splitlora.cli import main

    cfg = make_config({"train.max_steps": 2, "train.lr": 5e-2})
    run_training(cfg, tmp_path / "run")
    out = tmp_path / "eval"
    code = main(["eval", str(tmp_path / "run"), "--output", str(out), "--limit", "3", "--greedy",
                 "--max-new-tokens", "8", "--no-progress"])
    assert code == 0
    # the split model decodes the same text as the merged adapter, and both checked their cache
    code = main(["eval", str(tmp_path / "run"), "--output", str(tmp_path / "eval-split"), "--limit", "3",
                 "--greedy", "--max-new-tokens", "8", "--no-progress", "--mode", "split"])
    assert code == 0
    assert (tmp_path / "eval-split" / "predictions.txt").read_text() == (out / "predictions.txt").read_text()
    split_metrics = json.loads((tmp_path / "eval-split" / "metrics.json").read_text())
    assert split_metrics["mode"] == "split" and split_metrics["cache_check_max_relative_diff"] < 1e-4
    assert len((out / "predictions.txt").read_text().splitlines()) == 3
    groups = (out / "references.txt").read_text().strip("\n").split("\n\n")
    assert len(groups) == 3 and all(g.strip() for g in groups)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", "perplexity", "tokens_per_s", "decoding"):
        assert key in metrics, key
    assert metrics["num_mrs"] == 3 and metrics["decoding"]["num_beams"] == 1
    assert metrics["perplexity"] > 1
    printed = capsys.readouterr().out
    assert "BLEU" in printed and "CIDEr" in printed


def test_eval_cli_errors(tmp_path, capsys):
    from splitlora.cli import main

    assert main(["eval", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert "RUN_DIR" in capsys.readouterr().err
