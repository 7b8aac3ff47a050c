"""`bench noise`: the validation-loss cost of clipping and noise on what clients send."""

from __future__ import annotations

from .common import train_or_reuse as _train_or_reuse

NOISE_DOC = """The validation-loss cost of the defense: the same config (same data, seed and steps) trained
clean, with noise on the smashed activations (privacy.clip_norm, privacy.noise_multiplier) at each
level, and, for a U-shaped config, with noise on the gradient up (privacy.grad_clip_norm,
privacy.grad_noise_multiplier) at each level. `final_val_loss` is the run's: the trained global model
on clean inputs; `val_loss_noisy_split` is the same model with the run's clipping and noise on the
activations at the split, as its server-side blocks saw them in training."""


def noisy_validation_loss(cfg, run_dir, seed: int = 0) -> float:
    """Validation loss of a run's exported model with the run's clipping and noise on the activations at
    the split: the inputs its server-side blocks saw in training (the clean loss is the run's own)."""
    from pathlib import Path

    from .. import data as D
    from ..build import role_model
    from ..learning import clip_and_noise
    from ..runtime import runtime_of
    from ..families import family_of
    from ..train import load_examples, model_loss

    runtime = runtime_of(cfg, "server")
    lm, model = role_model(cfg, runtime, adapter=Path(run_dir) / "adapter")
    features = D.tokenize(load_examples(cfg, lm.tokenizer)[1], lm.tokenizer, cfg.data.max_length)[: cfg.data.val_max_samples]
    block = family_of(lm.model.config).modules(lm.model)["blocks"][cfg.model.split_layer - 1]
    gen, p = runtime.generator(seed), cfg.privacy

    def noisy(module, inputs, out):
        if isinstance(out, tuple):
            return (clip_and_noise(out[0], p.clip_norm, p.noise_multiplier, gen), *out[1:])
        return clip_and_noise(out, p.clip_norm, p.noise_multiplier, gen)

    handle = block.register_forward_hook(noisy)
    try:
        return model_loss(model, features, lm.tokenizer.pad_token_id, cfg.train.eval_batch_size, runtime)
    finally:
        handle.remove()


def noise(config: str, output_dir: str, levels=(0.005, 0.02), clip_norm: float = 1000.0, grad_levels=(),
          grad_clip_norm: float | None = None, sets=(), reuse: bool = False, log=print) -> dict:
    """See NOISE_DOC; runs go to output_dir/{clean, act-S, grad-S}; with `reuse`, finished runs with the
    same config are read."""
    from pathlib import Path

    from ..config import ConfigError, load_config

    root = Path(output_dir)
    variants = {"clean": []}
    variants.update({f"act-{s:g}": [f"privacy.clip_norm={clip_norm}", f"privacy.noise_multiplier={s}"] for s in levels})
    if grad_levels and grad_clip_norm is None:
        raise ConfigError("--grad-clip-norm: the gradient's noise is scaled by its clip norm (see `splitlora attack`'s "
                          "median_example_norm)")
    variants.update({f"grad-{s:g}": [f"privacy.grad_clip_norm={grad_clip_norm}", f"privacy.grad_noise_multiplier={s}"]
                     for s in grad_levels})
    runs = {}
    for name, extra in variants.items():
        cfg = load_config(config, [*sets, *extra])
        if grad_levels and not cfg.model.top_layers:
            raise ConfigError("model.top_layers: noise on the gradient up needs a U-shaped config")
        s = _train_or_reuse(cfg, root / name, reuse, lambda m: log(f"bench noise: {name}{m}"))
        p = cfg.privacy
        runs[name] = {"clip_norm": p.clip_norm, "noise_multiplier": p.noise_multiplier,
                      "grad_clip_norm": p.grad_clip_norm, "grad_noise_multiplier": p.grad_noise_multiplier,
                      **{k: s[k] for k in ("initial_val_loss", "final_val_loss", "step")}}
        runs[name]["val_loss_cost"] = runs[name]["final_val_loss"] - runs["clean"]["final_val_loss"]
        if p.clip_norm is not None:
            runs[name]["val_loss_noisy_split"] = noisy_validation_loss(cfg, root / name)
    return {"benchmark": "noise", "description": NOISE_DOC, "config": str(config), "sets": list(sets),
            "top_layers": load_config(config, list(sets)).model.top_layers, "runs": runs, "workdir": str(root)}
