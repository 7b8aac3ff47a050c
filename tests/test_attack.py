"""The curious-server attack: on a tiny trained run it recovers most tokens from shallow activations,
and noise on the smashed data defeats it (so the measurement can tell a defense from none)."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
from conftest import run_training

from splitlora.attack import attack


def test_attack_recovers_shallow_tokens_and_noise_stops_it(make_config, tmp_path):
    run_training(make_config({"train.max_steps": 2}), tmp_path / "run")
    result = attack(tmp_path / "run", tmp_path / "attack", depths=(1, 3), noise_levels=(0.0, 1.0),
                    clip_norm=100.0, victims=6, public=60, epochs=15, log=lambda m: None)
    rows = {(r["depth"], r["noise_multiplier"]): r for r in result["results"]}
    assert set(rows) == {(1, 0.0), (1, 1.0), (3, 0.0), (3, 1.0)}
    clean, noisy = rows[(1, 0.0)], rows[(1, 1.0)]
    assert clean["tokens"] > 100
    assert clean["nearest_neighbour"] > 0.5 and clean["learned_inversion"] > 0.5
    assert noisy["nearest_neighbour"] < clean["nearest_neighbour"] / 2
    assert noisy["learned_inversion"] < clean["learned_inversion"] / 2
    assert json.loads((tmp_path / "attack" / "attack.json").read_text())["results"] == result["results"]
    assert mpimg.imread(tmp_path / "attack" / "attack.png").shape[0] > 100
