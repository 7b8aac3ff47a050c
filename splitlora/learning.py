"""What a role learns with: the objective (next-token cross-entropy, label-smoothed, over the supervised
tokens), the learning-rate schedule, `Learner` (a part with its own AdamW that never takes a non-finite
step), and `Privacy` (clipping and noise on what a client sends). Shared by every role."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .split import ModelPart


@dataclass(frozen=True)
class OptimConfig:
    lr: float
    weight_decay: float
    warmup_steps: int
    total_steps: int
    max_grad_norm: float   # 0 disables clipping
    label_smoothing: float


def clip_and_noise(t: torch.Tensor, clip_norm: float, noise_multiplier: float, gen: torch.Generator) -> torch.Tensor:
    """Each example's tensor scaled to an L2 norm of at most `clip_norm`, then Gaussian noise of std
    `noise_multiplier` x `clip_norm` on every value."""
    norms = t.flatten(1).float().norm(dim=1).clamp_min(1e-12)
    t = t * (clip_norm / norms).clamp(max=1.0).to(t.dtype).view(-1, *([1] * (t.dim() - 1)))
    if noise_multiplier > 0:
        t = t + torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype) * (noise_multiplier * clip_norm)
    return t


@dataclass(frozen=True)
class Privacy:
    """What a client does to what it sends: clipping and noise (`clip_and_noise`) on its smashed
    activations (`clip_norm`, `noise_multiplier`; applied in the client's graph, so its own backward
    passes through the clipping) and, under the U-shape, on the gradient it sends up (`grad_clip_norm`,
    `grad_noise_multiplier`: a gradient's scale is not an activation's, so it has its own clip norm)."""

    clip_norm: float | None = None
    noise_multiplier: float = 0.0
    grad_clip_norm: float | None = None
    grad_noise_multiplier: float = 0.0

    @property
    def active(self) -> bool:
        return self.clip_norm is not None

    def apply(self, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return clip_and_noise(t, self.clip_norm, self.noise_multiplier, gen) if self.active else t

    def apply_grad(self, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.grad_clip_norm is None:
            return t
        return clip_and_noise(t, self.grad_clip_norm, self.grad_noise_multiplier, gen)


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Linear warm-up over `warmup_steps`, then linear decay to 0 at `total_steps` (step is 0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    remaining = max(cfg.total_steps - cfg.warmup_steps, 1)
    return cfg.lr * max(0.0, (cfg.total_steps - step) / remaining)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Next-token cross-entropy (label-smoothed) averaged over the supervised (completion) tokens."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                           label_smoothing=smoothing)


class Loss(NamedTuple):
    """A training step's loss: what is optimised (label-smoothed) and the plain cross-entropy, which is
    what validation reports (smoothing adds a floor of roughly smoothing x log(vocabulary) to the first)."""

    smoothed: float
    ce: float

    @staticmethod
    def mean(losses: list["Loss"]) -> "Loss":
        return Loss(sum(x.smoothed for x in losses) / len(losses), sum(x.ce for x in losses) / len(losses))


def lm_losses(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> tuple[torch.Tensor, Loss]:
    """(label-smoothed loss to backpropagate, Loss of both values) from one log-softmax: the smoothed loss
    is (1 - s) x NLL + s x the mean over the vocabulary of -log p, as `F.cross_entropy` defines it."""
    logp = F.log_softmax(logits[:, :-1].flatten(0, 1).float(), dim=-1)
    target = labels[:, 1:].flatten()
    keep = (target != -100).to(logp.dtype)
    count = keep.sum()
    nll = -(logp.gather(1, target.clamp_min(0).unsqueeze(1)).squeeze(1) * keep).sum() / count
    loss = nll
    if smoothing:
        loss = (1 - smoothing) * nll - smoothing * (logp.mean(dim=-1) * keep).sum() / count
    return loss, Loss(loss.item(), nll.item())


class ClientDropped(RuntimeError):
    """A client that disconnected or missed its deadline; the strategy goes on without it."""


class BadUpdate(ClientDropped):
    """A client whose batch or upload would make the model non-finite or is out of bounds: the update is
    skipped, the client sits out the round, training goes on."""


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


class Learner:
    """A model part with its own AdamW: the trainable state of one role."""

    def __init__(self, part: ModelPart, cfg: OptimConfig):
        self.part, self.cfg = part, cfg
        self.params = part.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def step(self, global_step: int) -> bool:
        """One AdamW step, unless a gradient is not finite: then the gradients are dropped, nothing
        changes, and False is returned (the state never becomes non-finite)."""
        if not all_finite(p.grad for p in self.params):
            self.optimizer.zero_grad(set_to_none=True)
            return False
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(global_step, self.cfg)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def discard(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        opt = self.optimizer.state_dict()
        return {"adapter": self.part.adapter_state(),
                "optimizer": {"state": [opt["state"].get(i) for i in range(len(self.params))],
                              "param_groups": opt["param_groups"]}}

    def load_state_dict(self, state: dict) -> None:
        self.part.load_adapter_state(state["adapter"])
        opt = state["optimizer"]
        self.optimizer.load_state_dict({
            "state": {i: s for i, s in enumerate(opt["state"]) if s is not None},
            "param_groups": opt["param_groups"]})
