"""The defense on smashed data: per-example clipping, then Gaussian noise scaled by the clip norm, on
what clients send (activations; under the U-shape also the gradient up, with its own clip norm and
multiplier). Off by default."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import read_metrics, run_training

from splitlora.config import ConfigError
from splitlora.learning import Privacy
from splitlora.train import build_run


def test_clipping_bounds_every_example_and_noise_has_the_configured_scale():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 32) * torch.tensor([0.01, 1.0, 10.0, 100.0]).view(4, 1, 1)
    clipped = Privacy(clip_norm=5.0).apply(x, gen)
    norms = clipped.flatten(1).norm(dim=1)
    assert torch.allclose(norms[1:], torch.full((3,), 5.0), rtol=1e-5)     # scaled down to the bound
    assert torch.allclose(clipped[0], x[0])                                  # small ones untouched
    noisy = Privacy(clip_norm=5.0, noise_multiplier=0.5).apply(x, gen)
    assert (noisy - clipped).std().item() == pytest.approx(2.5, rel=0.05)


def test_messages_are_clipped_and_noised_and_training_runs(make_config, tmp_path):
    clip = 20.0
    run = build_run(make_config({"privacy.clip_norm": clip}))
    msg, _ = run.strategy.clients[0].forward()
    assert (msg["activations"].flatten(1).norm(dim=1) <= clip * (1 + 1e-5)).all()
    clean = build_run(make_config({}))
    noisy = build_run(make_config({"privacy.clip_norm": clip, "privacy.noise_multiplier": 1.0}))
    a = clean.strategy.clients[0].forward()[0]["activations"]
    b = noisy.strategy.clients[0].forward()[0]["activations"]
    assert (b - a).abs().mean() > 1.0     # noise of std 20 dominates

    for name, over in (("clip", {"privacy.clip_norm": clip}),
                       ("noise", {"privacy.clip_norm": clip, "privacy.noise_multiplier": 0.5}),
                       ("ushape", {"privacy.clip_norm": clip, "privacy.noise_multiplier": 0.5,
                                   "privacy.grad_clip_norm": 1e-3, "privacy.grad_noise_multiplier": 0.5,
                                   "model.top_layers": 1, "model.split_layer": 1})):
        run_training(make_config({**over, "train.max_steps": 3}), tmp_path / name)
        rows = read_metrics(tmp_path / name)
        assert all(math.isfinite(r["train_loss"]) for r in rows[1:]), name


def _top_grad(run):
    """The gradient client 0 of a U-shaped run sends up for its first batch."""
    s = run.strategy
    msg, _ = s.clients[0].forward()
    return s.clients[0].top_step(s.server.middle_forward(0, msg))[0]["activations_grad"]


def test_the_gradient_up_has_its_own_clip_norm_and_noise(make_config):
    u = {"model.top_layers": 1, "model.split_layer": 1}
    clean = _top_grad(build_run(make_config(u)))
    # the activations' clip norm and noise leave the gradient alone (a gradient's scale is not an activation's)
    assert torch.allclose(_top_grad(build_run(make_config({**u, "privacy.clip_norm": 1e6}))), clean)
    norms = clean.flatten(1).norm(dim=1)
    clip = float(norms.min()) / 2
    clipped = _top_grad(build_run(make_config({**u, "privacy.grad_clip_norm": clip})))
    assert torch.allclose(clipped.flatten(1).norm(dim=1), torch.full_like(norms, clip), rtol=1e-4)
    noisy = _top_grad(build_run(make_config({**u, "privacy.grad_clip_norm": clip, "privacy.grad_noise_multiplier": 2.0})))
    assert (noisy - clipped).std().item() == pytest.approx(2 * clip, rel=0.05)


def test_noise_is_reproducible_and_resumes_exactly(make_config, tmp_path):
    from test_resume_cli import run_interrupted_and_resumed

    cfg = make_config({"privacy.clip_norm": 20.0, "privacy.noise_multiplier": 0.5, "train.max_steps": 6,
                       "train.checkpoint_interval": 3, "train.log_interval": 1})
    full, resumed = run_interrupted_and_resumed(cfg, tmp_path)
    assert [r["train_loss"] for r in read_metrics(full)] == [r["train_loss"] for r in read_metrics(resumed)]


def test_noise_needs_a_clip_norm(make_config):
    with pytest.raises(ConfigError, match="privacy.noise_multiplier needs privacy.clip_norm"):
        make_config({"privacy.noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="privacy.grad_noise_multiplier needs privacy.grad_clip_norm"):
        make_config({"privacy.grad_noise_multiplier": 1.0, "privacy.clip_norm": 1.0})


def test_the_server_never_learns_a_deployed_clients_noise(make_config):
    """A deployed client seeds its noise from the OS (not from the config the server knows) and keeps
    the generator's state out of the client state the server checkpoints."""
    from splitlora.checkpoint import join_tensors
    from splitlora.transport.client import answer
    from splitlora.transport.codec import unpack
    from splitlora.train import client_role

    cfg = make_config({"privacy.clip_norm": 20.0, "privacy.noise_multiplier": 0.5})
    a, b = client_role(cfg, 0), client_role(cfg, 0)
    assert not torch.equal(a.noise.get_state(), b.noise.get_state())
    kind, tensors, meta = unpack(answer(a, "state_dict", {}, {}, "fp32"), 1 << 30)
    assert kind == "state" and "noise" not in join_tensors(meta["state"], tensors)



def test_bench_noise_trains_each_level_and_reuses_finished_runs(tmp_path, e2e_file):
    from conftest import write_config

    from splitlora.experiments.noise import noise

    config = write_config(tmp_path, e2e_file, {"model.top_layers": 1, "model.split_layer": 1, "train.max_steps": 2,
                                               "train.eval_interval": 2})
    out = noise(str(config), tmp_path / "runs", levels=(1.0,), clip_norm=20.0, grad_levels=(1.0,),
                grad_clip_norm=1e-3, log=lambda m: None)
    runs = out["runs"]
    assert set(runs) == {"clean", "act-1", "grad-1"} and out["top_layers"] == 1
    assert runs["act-1"]["noise_multiplier"] == 1.0 and runs["grad-1"]["grad_clip_norm"] == 1e-3
    assert runs["clean"]["val_loss_cost"] == 0 and runs["act-1"]["final_val_loss"] != runs["clean"]["final_val_loss"]
    assert all(r["step"] == 2 for r in runs.values())
    # the same model with the training noise at the split: a different (finite) loss; none for the others
    assert math.isfinite(runs["act-1"]["val_loss_noisy_split"])
    assert runs["act-1"]["val_loss_noisy_split"] != runs["act-1"]["final_val_loss"]
    assert "val_loss_noisy_split" not in runs["clean"] and "val_loss_noisy_split" not in runs["grad-1"]
    seen = []
    again = noise(str(config), tmp_path / "runs", levels=(1.0,), clip_norm=20.0, grad_levels=(1.0,),
                  grad_clip_norm=1e-3, reuse=True, log=seen.append)
    assert again["runs"] == runs and all("read from" in m for m in seen)
    plain = write_config(tmp_path, e2e_file, {"train.max_steps": 2}, name="plain.yaml")
    with pytest.raises(ConfigError, match="model.top_layers"):
        noise(str(plain), tmp_path / "x", levels=(), grad_levels=(1.0,), grad_clip_norm=1.0, log=lambda m: None)
