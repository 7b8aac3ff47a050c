"""`splitlora attack`: a curious server tries to read the clients' text from the smashed activations.

The victim is a trained run: its model (the exported adapter on the base) computes the activations a
client would send at split depth d for the run's held-out examples (private text), clipped and noised
as `privacy` would at each noise level. The attacker knows what a server knows: the public pretrained
weights (no adapter), the defense's parameters, and public text of the same kind (the E2E test set's
references here). Two attacks, each scored as the share of the victims' tokens recovered exactly:
- nearest neighbour: the public model's depth-d activations of the public text form a dictionary of
  (activation, token); each received activation gets the token of its most similar entry (cosine);
- learned inversion: a linear softmax classifier from activation to token (over the tokens of the
  public text), trained on the public dictionary with the same clipping and noise.
Under the U-shape the server also receives the gradient of the loss w.r.t. its output, computed on the
client's labels (the next tokens): the same two attacks on public gradients (cosine-normalised), and a
head projection with no training at all (`head_projection`). Each row also gives the share a guess of
the public text's commonest token gets (`most_frequent_baseline`), the floor to compare with.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..learning import clip_and_noise


@torch.no_grad()
def activations(model, features: list[dict], depth: int, pad_id: int, batch: int = 16) -> tuple[torch.Tensor, ...]:
    """(activations [N, T, H], token ids [N, T], mask [N, T]) of blocks [0, depth) of a PEFT model."""
    from .. import data as D
    from ..split import make_part

    part = make_part(model, 0, depth)
    part.eval()
    acts, ids, masks = [], [], []
    device = part.device   # the model's passes run where it is; the attack's analysis in fp32 on the CPU
    for i in range(0, len(features), batch):
        b = D.collate(features[i:i + batch], pad_id)
        acts.append(part(b["input_ids"].to(device), b["attention_mask"].to(device)).float().cpu())
        ids.append(b["input_ids"])
        masks.append(b["attention_mask"].bool())
    return _cat(acts, 0.0), _cat(ids, pad_id), _cat(masks, False)


def _cat(batches: list[torch.Tensor], value) -> torch.Tensor:
    """Batches of [B, T(, H)] with different T, right-padded with `value` to the longest and stacked."""
    t = max(x.shape[1] for x in batches)
    pad = lambda x: (0, 0, 0, t - x.shape[1]) if x.dim() == 3 else (0, t - x.shape[1])  # noqa: E731
    return torch.cat([torch.nn.functional.pad(x, pad(x), value=value) for x in batches])


def top_gradients(model, features: list[dict], top_layers: int, pad_id: int, batch: int, smoothing: float
                  ) -> tuple[torch.Tensor, ...]:
    """What a U-shaped client with the last `top_layers` blocks sends up, batch by batch as in training:
    (gradients of its loss w.r.t. the server's output [N, T, H], the token each position is trained to
    predict [N, T], mask of the positions with one [N, T])."""
    from .. import data as D
    from ..learning import lm_loss
    from ..split import make_part, num_layers

    total = num_layers(model.get_base_model().config)
    bottom, top = make_part(model, 0, total - top_layers), make_part(model, total - top_layers, total)
    bottom.eval()
    top.eval()
    grads, ids, masks = [], [], []
    device = bottom.device
    for i in range(0, len(features), batch):
        b = D.collate(features[i:i + batch], pad_id)
        mask = b["attention_mask"].to(device)
        with torch.no_grad():
            x = bottom(b["input_ids"].to(device), mask)
        x.requires_grad_(True)
        logits = top(x, mask).float()
        (g,) = torch.autograd.grad(lm_loss(logits, b["labels"].to(device), smoothing), x)
        target = torch.nn.functional.pad(b["labels"][:, 1:], (0, 1), value=-100)   # position t predicts t + 1
        grads.append(g.float().cpu())
        ids.append(target.clamp_min(0))
        masks.append(target != -100)
    return _cat(grads, 0.0), _cat(ids, 0), _cat(masks, False)


def defend(acts: torch.Tensor, clip: float, noise: float, seed: int) -> torch.Tensor:
    if noise == 0 and clip <= 0:
        return acts
    return clip_and_noise(acts, clip, noise, torch.Generator().manual_seed(seed))


def head_projection(received: torch.Tensor, norm_weight: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
    """Label recovery from a gradient with no training: the loss gradient at the logits is p − y, most
    negative at the label; pulled back through the public final norm's scale and LM head (and, roughly,
    the top blocks' residual path), the label's row of the head scores lowest."""
    out = []
    for chunk in torch.split(received * norm_weight, 512):
        out.append((chunk @ head_weight.T).argmin(dim=1))
    return torch.cat(out)


def nearest_neighbour(public: torch.Tensor, public_ids: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
    """Token of the most similar (cosine) public activation, for each received activation."""
    p = torch.nn.functional.normalize(public, dim=1)
    out = []
    for chunk in torch.split(torch.nn.functional.normalize(received, dim=1), 2048):
        out.append(public_ids[(chunk @ p.T).argmax(dim=1)])
    return torch.cat(out)


def learned_inversion(public: torch.Tensor, public_ids: torch.Tensor, received: torch.Tensor,
                      epochs: int = 30, seed: int = 0) -> torch.Tensor:
    """A linear classifier activation -> token (over the public text's tokens), full-batch Adam."""
    vocab, target = torch.unique(public_ids, return_inverse=True)
    g = torch.Generator().manual_seed(seed)
    mean, std = public.mean(0), public.std(0).clamp_min(1e-6)
    x = (public - mean) / std
    w = torch.zeros(x.shape[1], len(vocab), requires_grad=True)
    b = torch.zeros(len(vocab), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for idx in torch.split(perm, 4096):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(x[idx] @ w + b, target[idx]).backward()
            opt.step()
    with torch.no_grad():
        return vocab[(((received - mean) / std) @ w + b).argmax(dim=1)]


def attack(run_dir: str | Path, output: str | Path, depths=(1, 3, 6), noise_levels=(0.0, 0.001, 0.005),
           clip_norm: float | None = None, victims: int = 32, public: int = 400, epochs: int = 30,
           top_layers=(1,), grad_noise_levels=None, grad_clip_norm: float | None = None, log=print) -> dict:
    """Both channels a curious server reads: the smashed activations at each split depth, and (U-shape)
    the gradient a client with the last m blocks sends up, for m in `top_layers`. The gradient's clip
    norm is the run's privacy.grad_clip_norm, else the median per-example norm of the public gradients."""
    from .. import data as D
    from ..build import role_model
    from ..config import load_config, resolve_path
    from ..lora import apply_lora, lora_config
    from ..models import load_model
    from ..runtime import runtime_of
    from ..families import family_of
    from ..split import num_layers
    from ..train import load_examples

    run_dir, out = Path(run_dir), Path(output)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(run_dir / "config.yaml")
    clip = clip_norm if clip_norm is not None else (cfg.privacy.clip_norm or 1000.0)
    grad_noise_levels = noise_levels if grad_noise_levels is None else grad_noise_levels
    rt = runtime_of(cfg, "server")   # the curious server's own device and precision
    base = load_model(cfg.model.name, seed=cfg.train.seed, dtype=rt.dtype, device=rt.device)
    _, victim = role_model(cfg, rt, adapter=run_dir / "adapter")
    tok, pad = base.tokenizer, base.tokenizer.pad_token_id
    _, val = load_examples(cfg, base.tokenizer)
    private = D.tokenize(val, tok, cfg.data.max_length)[:victims]
    public_file = resolve_path("data", "data/e2e/testset_w_refs.csv")
    public_feats = D.tokenize(D.load_e2e(public_file)[:public], tok, cfg.data.max_length)
    public_model = apply_lora(base.model, lora_config(base.model.config, 1, 1, 0.0), 0)   # B = 0: the base
    total = num_layers(base.model.config)
    results, scales = [], {"activations": {}, "gradient_up": {}}

    def score(row, known, known_ids, sent, truth, extra=None):
        row.update({"tokens": int(truth.numel()),
                    "most_frequent_baseline": float((truth == known_ids.mode().values).float().mean()),
                    "nearest_neighbour": float((nearest_neighbour(known, known_ids, sent) == truth).float().mean()),
                    "learned_inversion": float((learned_inversion(known, known_ids, sent, epochs) == truth).float().mean()),
                    **(extra or {})})
        results.append(row)
        log(f"attack: {row['channel']} " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in row.items() if k not in ("channel", "tokens")))

    for d in [d for d in depths if 1 <= d < total]:
        pa, pi, pm = activations(public_model, public_feats, d, pad)
        va, vi, vm = activations(victim, private, d, pad)
        scales["activations"][d] = float(va.flatten(1).norm(dim=1).median())
        for noise in noise_levels:
            score({"channel": "activations", "depth": d, "noise_multiplier": noise, "clip_norm": clip},
                  defend(pa, clip, noise, seed=2)[pm], pi[pm], defend(va, clip, noise, seed=1)[vm], vi[vm])

    fam = family_of(base.model.config)
    mods = fam.modules(base.model)
    norm_w, head_w = (mods[n].weight.detach().float().cpu() for n in (fam.norm, fam.lm_head))
    for m in [m for m in top_layers if 1 <= m < total]:
        args = (pad, cfg.train.batch_size, cfg.train.label_smoothing)
        pg, pi, pm = top_gradients(public_model, public_feats, m, *args)
        vg, vi, vm = top_gradients(victim, private, m, *args)
        gclip = grad_clip_norm or cfg.privacy.grad_clip_norm or float(pg.flatten(1).norm(dim=1).median())
        scales["gradient_up"][m] = float(vg.flatten(1).norm(dim=1).median())
        for noise in grad_noise_levels:
            sent = defend(vg, gclip, noise, seed=3)[vm]
            score({"channel": "gradient_up", "top_layers": m, "noise_multiplier": noise, "clip_norm": gclip},
                  torch.nn.functional.normalize(defend(pg, gclip, noise, seed=4)[pm], dim=1), pi[pm],
                  torch.nn.functional.normalize(sent, dim=1), vi[vm],
                  {"head_projection": float((head_projection(sent, norm_w, head_w) == vi[vm]).float().mean())})
    result = {"run": str(run_dir), "model": cfg.model.name, "victim_examples": len(private),
              "public_examples": len(public_feats), "public_text": str(public_file),
              "median_example_norm": scales, "results": results}
    (out / "attack.json").write_text(json.dumps(result, indent=2))
    _plot(results, out / "attack.png")
    return result


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("activations", "depth", "split depth (client blocks)", "smashed activations (input tokens)"),
              ("gradient_up", "top_layers", "client top blocks m (U-shape)", "gradient up (labels = next tokens)")]
    panels = [p for p in panels if any(r["channel"] == p[0] for r in results)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), dpi=100, squeeze=False)
    for ax, (channel, x, xlabel, title) in zip(axes[0], panels):
        rows = [r for r in results if r["channel"] == channel]
        for i, noise in enumerate(sorted({r["noise_multiplier"] for r in rows})):   # colour: noise; style: attack
            sub = [r for r in rows if r["noise_multiplier"] == noise]
            for key, style in (("nearest_neighbour", "-o"), ("learned_inversion", "--s"), ("head_projection", ":^")):
                if key in sub[0]:
                    ax.plot([r[x] for r in sub], [r[key] for r in sub], style, color=f"C{i}",
                            label=f"{key.replace('_', ' ')}, noise {noise:g}")
        ax.set_xticks(sorted({r[x] for r in rows}))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("tokens recovered")
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
