"""Every shipped config is valid and trains as it is, with the model swapped for the tiny Llama and the
run shortened (the SmolLM2 runs themselves are benchmarks, not tests); the data-* configs train on
their example datasets (data/examples/), one per data format."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import read_metrics

from splitlora.config import load_config
from splitlora.train import train

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_the_configs_are_there():
    names = {p.stem for p in CONFIGS}
    assert {"cenlora", "fedlora", "sl", "splitlora", "demo", "compare-edge", "dlora", "hsplitlora",
            "hetlora", "data-alpaca", "data-chat", "data-family", "data-text"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_trains_as_it_is(path, e2e_file, tmp_path):
    cfg = load_config(path, [
        "model.name=tiny-llama", f"data.train_file={e2e_file}", "data.max_length=512", "data.val_max_samples=4",
        "train.max_steps=2", "train.warmup_steps=0", "train.eval_interval=2", "train.checkpoint_interval=2",
        "strategy.aggregation_interval=2", "hsplit.max_split_layer=3"])
    train(cfg, tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run")
    assert rows[-1]["step"] == 2 and rows[-1]["val_loss"] is not None
