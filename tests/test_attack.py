"""The curious-server attack: on a tiny trained run it recovers most tokens from shallow activations and
most labels from a U-shaped client's gradient up, and noise defeats both (so the measurement can tell a
defense from none)."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
from conftest import run_training

from splitlora.experiments.attack import attack


def test_attack_recovers_shallow_tokens_and_noise_stops_it(make_config, tmp_path):
    run_training(make_config({"train.max_steps": 2}), tmp_path / "run")
    result = attack(tmp_path / "run", tmp_path / "attack", depths=(1, 3), noise_levels=(0.0, 1.0),
                    clip_norm=100.0, victims=6, public=60, epochs=15, top_layers=(1,), grad_noise_levels=(0.0, 1.0),
                    log=lambda m: None)
    rows = {(r["depth"], r["noise_multiplier"]): r for r in result["results"] if r["channel"] == "activations"}
    assert set(rows) == {(1, 0.0), (1, 1.0), (3, 0.0), (3, 1.0)}
    clean, noisy = rows[(1, 0.0)], rows[(1, 1.0)]
    assert clean["tokens"] > 100
    assert clean["nearest_neighbour"] > 0.5 and clean["learned_inversion"] > 0.5
    assert clean["most_frequent_baseline"] < 0.2   # guessing the public text's commonest token
    assert noisy["nearest_neighbour"] < clean["nearest_neighbour"] / 2
    assert noisy["learned_inversion"] < clean["learned_inversion"] / 2
    # the U-shape's gradient up gives the labels (the next tokens) away, with no training at all
    grads = {r["noise_multiplier"]: r for r in result["results"] if r["channel"] == "gradient_up"}
    assert set(grads) == {0.0, 1.0} and grads[0.0]["top_layers"] == 1 and grads[0.0]["tokens"] > 100
    assert grads[0.0]["head_projection"] > 0.5 and grads[0.0]["learned_inversion"] > 0.5
    for key in ("head_projection", "nearest_neighbour", "learned_inversion"):
        assert grads[1.0][key] < grads[0.0][key] / 2, key
    assert 0 < result["median_example_norm"]["gradient_up"][1] < result["median_example_norm"]["activations"][1]
    assert json.loads((tmp_path / "attack" / "attack.json").read_text())["results"] == result["results"]
    assert mpimg.imread(tmp_path / "attack" / "attack.png").shape[0] > 100
