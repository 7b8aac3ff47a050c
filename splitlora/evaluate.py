"""Evaluate a trained run: decode one output per unique prompt (an E2E MR), score it against all
references of that prompt, and compute perplexity on the references. E2E runs get the official scorer's
BLEU, NIST, METEOR, ROUGE-L and CIDEr; other tasks exact match, BLEU and ROUGE-L (metrics/task.py);
plain language modelling (`data.format: text`) perplexity only.

Writes predictions.txt and references.txt in the official scorer's plain-text format, and metrics.json.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from . import data as D
from . import formats
from . import metrics as M
from .build import role_model
from .config import Config, ConfigError, load_config, resolve_path
from .decode import DecodeConfig, SplitForCausalLM, check_cached_decoding, generate
from .runtime import Runtime, runtime_of
from .split import split_model

TEST_FILE = "data/e2e/testset_w_refs.csv"


def load_trained(run_dir: str | Path, mode: str = "merged"):
    """(model, tokenizer, config) of a run: the exported adapter merged into the base, or the split model."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"RUN_DIR: {run_dir} has no config.yaml (is it a training run directory?)")
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_model.safetensors").exists():
        raise ConfigError(f"RUN_DIR: {adapter} holds no exported adapter (did the run finish?)")
    cfg = load_config(run_dir / "config.yaml")
    if mode not in ("merged", "split"):
        raise ConfigError(f"--mode: {mode!r} is not one of merged, split")
    # the exported adapter as saved (adapter_config.json: its own rank, alpha and targets), on the run's
    # server device and precision
    lm, peft = role_model(cfg, runtime_of(cfg, "server"), adapter=adapter)
    if mode == "merged":   # a quantized base would be re-quantized by a merge: its adapter stays beside it
        model = peft.merge_and_unload() if cfg.model.quantization == "none" else peft
    else:
        model = SplitForCausalLM(*split_model(peft, cfg.model.split_layer))
    return model.eval(), lm.tokenizer, cfg


def eval_examples(cfg: Config, split: str, tokenizer=None) -> list[D.Example]:
    if split == "test":
        if cfg.data.name != "e2e":
            raise ConfigError(f"--split test: the E2E test set does not fit a run trained on {cfg.data.name} data "
                              f"({cfg.data.train_file}); use --split validation (its held-out examples, or "
                              "data.val_file)")
        from .chat import apply
        return apply(D.load_e2e(resolve_path("test file", TEST_FILE)), tokenizer, cfg.data.chat_template)
    if split == "validation":
        from .train import load_examples
        return load_examples(cfg, tokenizer)[1]
    raise ConfigError(f"--split: {split!r} is not one of test, validation")


def perplexity(model, tokenizer, examples: list[D.Example], max_length: int, batch_size: int = 16) -> float:
    """exp(token-mean cross-entropy) of the references' completion tokens given their MRs."""
    from .train import model_loss

    feats = D.tokenize(examples, tokenizer, max_length)
    return math.exp(model_loss(model, feats, tokenizer.pad_token_id, batch_size, Runtime(model.device)))


def evaluate(run_dir: str | Path, output: str | Path, decode: DecodeConfig, split: str = "test",
             limit: int | None = None, mode: str = "merged", progress: bool = True) -> dict:
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, cfg = load_trained(run_dir, mode)
    examples = eval_examples(cfg, split, tokenizer)
    if not formats.of(cfg.data).DECODES:   # plain text: nothing to decode from, perplexity only
        return _perplexity_only(cfg, model, tokenizer, examples[:limit] if limit else examples, out, run_dir, split)
    prompts = {ex.group: ex.prompt for ex in reversed(examples)}     # first prompt of each group
    refs = D.group_references(examples)
    groups = list(refs)[:limit] if limit else list(refs)
    chosen = set(groups)

    cache_check = check_cached_decoding(model, tokenizer, prompts[groups[0]])
    from tqdm import tqdm
    bar = tqdm(total=len(groups), desc=f"decode ({mode})", disable=not progress, dynamic_ncols=True)
    preds, speed = generate(model, tokenizer, [prompts[g] for g in groups], decode, progress=bar.update)
    bar.close()
    t0 = time.perf_counter()
    ppl = perplexity(model, tokenizer, [ex for ex in examples if ex.group in chosen], cfg.data.max_length)
    ppl_s = time.perf_counter() - t0

    references = [refs[g] for g in groups]
    M.write_predictions(out / "predictions.txt", preds)
    M.write_references(out / "references.txt", references)
    if cfg.data.name == "e2e":
        scores = M.score(preds, references)
    else:
        from .metrics.task import task_scores
        scores = task_scores(preds, references)
    result = {**scores, "perplexity": ppl, "num_mrs": len(groups), "split": split, "mode": mode,
              "run": str(run_dir), "model": cfg.model.name, "decoding": decode.to_dict(), **speed,
              "cache_check_max_relative_diff": cache_check,
              "perplexity_s": ppl_s}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def _perplexity_only(cfg, model, tokenizer, examples, out: Path, run_dir, split: str) -> dict:
    result = {"perplexity": perplexity(model, tokenizer, examples, cfg.data.max_length), "num_examples": len(examples),
              "split": split, "run": str(run_dir), "model": cfg.model.name}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def table(result: dict) -> str:
    if "exact_match" in result:
        keys = ["exact_match", "BLEU", "ROUGE_L", "perplexity"]
    elif "num_mrs" in result:
        keys = ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", "perplexity"]
    else:
        return f"perplexity {result['perplexity']:.4f} over {result['num_examples']} examples"
    cells = [f"{result[k]:.4f}" if isinstance(result.get(k), float) else "n/a" for k in keys]
    width = [max(len(k), len(c)) for k, c in zip(keys, cells, strict=True)]
    line = lambda xs: "  ".join(x.rjust(w) for x, w in zip(xs, width, strict=True))  # noqa: E731
    return f"{line(keys)}\n{line(cells)}\n{result.get('num_mrs', '?')} MRs, " \
           f"{result.get('tokens_per_s', float('nan')):.1f} generated tokens/s"
