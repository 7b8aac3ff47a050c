"""The three roles of split federated learning as plain classes with explicit inputs and outputs.

- `Client`: owns its data and a model part (bottom layers, or the whole model for FedLoRA/CenLoRA);
  `forward()` returns the smashed message, `backward(grad)` finishes backpropagation locally.
- `MainServer`: owns the server-side part(s); `train_step()` takes a smashed message, computes the
  loss and returns the gradient of the activations.
- `FedServer`: averages adapters.
The simulator and the networked deployment call exactly these methods; only the transport differs.
Every role times its own compute so per-role compute can be reported.
"""

from __future__ import annotations

import time

import torch

from . import robust
from .contract import FOLD_MODES
from .data import BatchStream
from .learning import BadUpdate, ClientDropped, Learner, Loss, OptimConfig, Privacy, all_finite, lm_losses

__all__ = ["Client", "MainServer", "FedServer", "fedavg", "OptimConfig"]   # OptimConfig: the README's API

from .runtime import RandomStream, Runtime, role_seed
from .split import ModelPart, base_weight, lora_layers, own_base_weight, set_checkpointing
from .transport.codec import smashed_message


@torch.no_grad()
def refit_adapter(a: torch.Tensor, b: torch.Tensor, moments: dict, mode: str, old: int, new: int,
                  rows: torch.Tensor | None = None,
                  given: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """What one LoRA module's adapter (A [R, in], B [out, R], trained in its first `old` components) becomes
    at a heterogeneous aggregation, at rank `new`, and which AdamW moments (`moments`: the optimizer's
    per-parameter state) it forgets; the server's copy and every client's go through here:
    - "restart" (stack_fold): B := 0, B's moments forgotten; A keeps what it learned, its moments too
      unless the rank changed;
    - "keep" (stack_keep): A, B and their moments are kept; both moments forgotten if the rank changed;
    - "replace" (stack_svd): A, B := `given` (cut to `new`); both moments forgotten.
    A grown rank adds `rows` to A; components beyond `new` are zeroed."""
    if mode == "replace":
        a_new, b_new = given
        if tuple(a_new.shape) != (new, a.shape[1]) or tuple(b_new.shape) != (b.shape[0], new):
            raise ValueError(f"the new adapter is not at rank {new}")
        a.zero_(), b.zero_()
        a[:new], b[:, :new] = a_new.to(a.device, a.dtype), b_new.to(b.device, b.dtype)
        moments.pop(a, None), moments.pop(b, None)
        return
    if mode not in ("restart", "keep"):
        raise ValueError(f"unknown fold mode {mode!r}")
    if rows is not None:
        a[old:new] = rows.to(a.device, a.dtype)
    a[new:] = 0
    b[:, new:] = 0
    if mode == "restart":
        b.zero_()
    if mode == "restart" or new != old:
        moments.pop(b, None)
    if new != old:
        moments.pop(a, None)


class Client:
    """A data owner. Split strategies call forward()/backward(); whole-model ones call local_step()."""

    def __init__(self, cid: int, part: ModelPart, stream: BatchStream, cfg: OptimConfig,
                 privacy: Privacy = Privacy(), seed: int = 0, runtime: Runtime = Runtime()):
        self.cid, self.part, self.stream, self.runtime = cid, part, stream, runtime
        self.privacy = privacy
        self.noise = runtime.generator(seed * 7907 + cid)
        self.rng = RandomStream(role_seed(seed, "client", cid), runtime.device)
        set_checkpointing(part, runtime.checkpointing)
        self.learner = Learner(part, cfg)
        self.compute_s = 0.0
        self.last_shape: tuple[int, int] = (0, 0)   # (B, T) of the last whole-model batch, for the cost model
        self.frozen: set[str] = set()                  # adapter keys that get no gradient (DLoRA: killed)
        self.ranks: dict[str, int] = {}                # LoRA module prefix -> its rank here (empty: all full)
        self.builder = None                            # split layer -> a new part (heterogeneous strategies)
        self.layout_required = False                   # no work before set_layout (a deployed heterogeneous client)
        self.base_moved = False                        # its own base weights took a fold (set_layout, fold)
        self.cfg = cfg
        self._activations: torch.Tensor | None = None

    @property
    def num_samples(self) -> int:
        return self.stream.num_samples

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.part.trainable_parameters())

    @property
    def pending(self) -> torch.Tensor | None:
        """The activations of a forward() still waiting for their gradient (None: none)."""
        return self._activations

    def _ready(self) -> None:
        if self.layout_required:
            raise ClientDropped(f"client {self.cid}: no layout yet (a new process): it waits for set_layout")

    def forward(self) -> tuple[dict[str, torch.Tensor], int]:
        """Run the bottom layers on the next batch; returns (smashed message, batch size)."""
        self._ready()
        batch = {k: v.to(self.runtime.device) for k, v in self.stream.next_batch().items()}
        t0 = time.perf_counter()
        self.part.train()
        with self.rng.active(), self.runtime.compute():
            self._activations = self.part(batch["input_ids"], batch["attention_mask"])
        if self.privacy.active:
            self._activations = self.privacy.apply(self._activations, self.noise)
        self.compute_s += self.runtime.elapsed(t0)
        # a U-shaped client computes the loss itself: its labels stay here
        self._pending = (batch["attention_mask"], batch["labels"])
        labels = None if getattr(self.part, "top", None) is not None else batch["labels"]
        msg = smashed_message(self._activations, batch["attention_mask"], labels)
        return msg, len(batch["input_ids"])

    def top_step(self, activations: torch.Tensor) -> tuple[dict[str, torch.Tensor], Loss]:
        """U-shape: the server's output through the client's top blocks and head, the loss on the
        client's own labels, and the gradient of the server's output ({"activations_grad"}, loss)."""
        if self._activations is None:
            raise RuntimeError(f"client {self.cid}: top_step() without a pending forward()")
        t0 = time.perf_counter()
        mask, labels = self._pending
        x = activations.detach().to(self.runtime.device, self.runtime.dtype).requires_grad_(True)
        with self.rng.active(), self.runtime.compute():
            logits = self.part.top(x, mask)
        loss, value = lm_losses(logits, labels, self.learner.cfg.label_smoothing)
        loss.backward()
        if not all_finite([loss, x.grad]):
            self.learner.discard()
            self._activations = None
            raise BadUpdate(f"client {self.cid}: the server's activations gave a non-finite loss or gradient; "
                            "the step is skipped")
        grad = self.privacy.apply_grad(x.grad, self.noise)
        self.compute_s += self.runtime.elapsed(t0)
        return {"activations_grad": grad}, value

    def backward(self, activations_grad: torch.Tensor | None, global_step: int) -> None:
        """Finish backpropagation with the server's gradient and update the client-side adapter. None: the
        bottom has nothing to train (DLoRA killed it all), only a U-shaped client's top steps."""
        if self._activations is None:
            raise RuntimeError(f"client {self.cid}: backward() without a pending forward()")
        t0 = time.perf_counter()
        if activations_grad is not None:
            with self.rng.active():   # a checkpointed block recomputes its forward here
                self._activations.backward(activations_grad.to(self._activations.device, self._activations.dtype))
        self._activations = None
        stepped = self.learner.step(global_step)
        self.compute_s += self.runtime.elapsed(t0)
        if not stepped:
            raise BadUpdate(f"client {self.cid}: a non-finite gradient; the step is skipped")

    def local_step(self, global_step: int) -> tuple[Loss, int]:
        """A whole-model training step on the next batch; returns (loss, batch size)."""
        if not self.part.has_head:
            raise RuntimeError(f"client {self.cid}: local_step() needs the whole model")
        self._ready()
        batch = {k: v.to(self.runtime.device) for k, v in self.stream.next_batch().items()}
        self.last_shape = tuple(batch["input_ids"].shape)
        t0 = time.perf_counter()
        self.part.train()
        with self.rng.active(), self.runtime.compute():
            logits = self.part(batch["input_ids"], batch["attention_mask"])
        loss, value = lm_losses(logits, batch["labels"], self.learner.cfg.label_smoothing)
        loss.backward()
        stepped = self.learner.step(global_step)
        self.compute_s += self.runtime.elapsed(t0)
        if not (stepped and all_finite([loss])):
            raise BadUpdate(f"client {self.cid}: a non-finite loss or gradient; the step is skipped")
        return value, len(batch["input_ids"])

    def set_frozen(self, keys: set[str]) -> None:
        """Freeze these adapter tensors (no gradient, no optimizer state, not sent) and unfreeze the rest."""
        unknown = set(keys) - set(self.part.adapter)
        if unknown:
            raise KeyError(f"client {self.cid}: no adapter tensors {sorted(unknown)[:3]}")
        for k, p in self.part.adapter.items():
            if k in keys and p.requires_grad:
                p.requires_grad_(False)
                p.grad = None
                self.learner.optimizer.state.pop(p, None)
            elif k not in keys and not p.requires_grad:
                p.requires_grad_(True)
        self.frozen = set(keys)

    # -- LoRA modules at ranks of their own (heterogeneous strategies) ---------------------------------
    def _rank_of(self, key: str) -> int | None:
        return self.ranks.get(key.rsplit(".lora_", 1)[0])

    def _cut(self, key: str, v: torch.Tensor) -> torch.Tensor:
        """An adapter tensor cut to its module's rank (A: the first r rows, B: the first r columns)."""
        r = self._rank_of(key)
        return v if r is None else (v[:r] if ".lora_A." in key else v[:, :r])

    def _mask(self) -> None:
        """Gradient masks that keep every module's components beyond its rank at zero."""
        for k, p in self.part.adapter.items():
            if getattr(p, "_rank_hook", None) is not None:
                p._rank_hook.remove()
                p._rank_hook = None
            if self._rank_of(k) is None:
                continue
            mask = torch.zeros_like(p)
            self._cut(k, mask).fill_(1)
            p._rank_hook = p.register_hook(lambda g, m=mask: g * m)

    def set_layout(self, split: int, ranks: dict[str, int], adapter: dict[str, torch.Tensor],
                   base: dict[str, torch.Tensor]) -> None:
        """Hold the part at `split` (built by `builder`), its LoRA modules at `ranks`, starting from
        `adapter` (each tensor cut to its rank), with `base` (prefix -> [out, in]) as the current base
        weight of those modules (missing: the pretrained one). A fresh optimizer; nothing frozen."""
        if self.builder is None:
            raise RuntimeError(f"client {self.cid}: this client cannot change its split")
        part = self.builder(split).replicate(self.runtime.device)
        layers = lora_layers(part)
        if set(ranks) != set(layers) or not set(base) <= set(layers):
            raise KeyError(f"client {self.cid}: the layout's modules are not those of a part at split {split}")
        for prefix, layer in layers.items():   # weights of its own: the folds it is sent go there only
            if prefix in base and tuple(base[prefix].shape) != tuple(base_weight(layer).shape):
                raise ValueError(f"client {self.cid}: base weight of {prefix} has shape {list(base[prefix].shape)}")
            own_base_weight(layer, base.get(prefix))
        self.part, self.ranks, self.frozen, self.layout_required = part, dict(ranks), set(), False
        self.base_moved = bool(base)   # its base weights are no longer the pretrained ones (its state keeps them)
        set_checkpointing(part, self.runtime.checkpointing)
        self.learner = Learner(part, self.cfg)
        self.load_adapter_state(adapter)
        self._mask()

    @torch.no_grad()
    def fold(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], ranks: dict[str, int],
             rows: dict[str, torch.Tensor], mode: str, adapter: dict[str, torch.Tensor] | None = None) -> None:
        """A heterogeneous aggregation, client side (`hsplit.aggregation`): each module's base weight gains
        B @ A of the stacked factors it is sent (scaling included), then its adapter is refitted at the new
        rank by `mode` (`refit_adapter`; `adapter`: the new one, for mode "replace")."""
        layers = lora_layers(self.part)
        if set(factors) != set(layers) or set(ranks) != set(layers) or not set(rows) <= set(layers):
            raise KeyError(f"client {self.cid}: fold for modules this part does not hold")
        if mode not in FOLD_MODES:
            raise ValueError(f"client {self.cid}: fold mode must be one of {', '.join(FOLD_MODES)}, got {mode!r}")
        adapter = adapter or {}
        if (mode == "replace") != bool(adapter) or (
                adapter and set(adapter) != {f"{p}.lora_{x}.weight" for p in layers for x in "AB"}):
            raise KeyError(f"client {self.cid}: fold's adapter does not match the modules this part holds "
                           f"(a new adapter comes with mode replace only)")
        for prefix, layer in layers.items():
            w = base_weight(layer)
            if not getattr(layer.base_layer.weight, "owned", False):
                raise RuntimeError(f"client {self.cid}: fold before set_layout (the base weights are not its own)")
            a_stack, b_stack = factors[prefix]
            w.add_(b_stack.to(w.device, w.dtype) @ a_stack.to(w.device, w.dtype))
            self.base_moved = True
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            new = ranks[prefix]
            given = (adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]) if adapter else None
            try:
                refit_adapter(a, b, self.learner.optimizer.state, mode, self.ranks.get(prefix, a.shape[0]), new,
                              rows.get(prefix), given)
            except ValueError as e:
                raise ValueError(f"client {self.cid}: fold for {prefix}: {e}") from None
        self.ranks = dict(ranks)
        self._mask()

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The trainable (not frozen) adapter tensors, each cut to its module's rank: what this client
        sends for aggregation."""
        self._ready()
        return {k: self._cut(k, v) for k, v in self.part.adapter_state().items() if k not in self.frozen}

    def peek_adapter_state(self) -> dict[str, torch.Tensor]:
        """The whole adapter (frozen tensors too), cut to the ranks: for evaluation."""
        self._ready()
        return {k: self._cut(k, v) for k, v in self.part.adapter_state().items()}

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """The unfrozen adapter tensors (cut to their modules' ranks: the rest of each is zeroed)."""
        if set(state) != set(self.part.adapter) - self.frozen:
            raise KeyError(f"client {self.cid}: the adapter state does not match the unfrozen tensors")
        for k, v in state.items():
            p = self.part.adapter[k]
            if tuple(v.shape) != tuple(self._cut(k, p).shape):
                raise ValueError(f"client {self.cid}: {k} has shape {list(v.shape)}, not {list(self._cut(k, p).shape)}")
            if self._rank_of(k) is not None:
                p.zero_()
            self._cut(k, p).copy_(v)

    def _owned_bases(self) -> dict[str, torch.Tensor]:
        """prefix -> [out, in] of the base weights this client holds as its own (heterogeneous aggregation
        folds updates into them)."""
        return {p: base_weight(layer) for p, layer in lora_layers(self.part).items()
                if getattr(layer.base_layer.weight, "owned", False)}

    def state_dict(self) -> dict:
        """Its learner, data stream, counters and random state, and the base weights it owns once they
        are no longer the pretrained ones (exactly as its folds made them: a resumed client continues bit
        for bit)."""
        base = self._owned_bases() if self.base_moved else {}
        return {"learner": self.learner.state_dict(), "stream": self.stream.state_dict(),
                "compute_s": self.compute_s, "noise": self.noise.get_state(), "rng": self.rng.state,
                "frozen": sorted(self.frozen), "base": {p: w.detach().clone() for p, w in base.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        owned = self._owned_bases()
        if set(state.get("base", {})) - set(owned):
            raise KeyError(f"client {self.cid}: the state holds base weights of modules this client does not own")
        for p, w in state.get("base", {}).items():
            if tuple(w.shape) != tuple(owned[p].shape):
                raise ValueError(f"client {self.cid}: base weight of {p} has shape {list(w.shape)}")
            owned[p].copy_(w)
            self.base_moved = True
        self.set_frozen(set(state.get("frozen", ())))
        self.learner.load_state_dict(state["learner"])
        self.stream.load_state_dict(state["stream"])
        self.compute_s = state["compute_s"]
        if "noise" in state:
            self.noise.set_state(state["noise"])
        if "rng" in state:
            self.rng.state = state["rng"].clone()


class MainServer:
    """The server-side model: one shared part (SFL-V2) or one part per client (SFL-V1)."""

    def __init__(self, parts: list[ModelPart], cfg: OptimConfig, runtime: Runtime = Runtime(), seed: int = 0):
        self.learners = [Learner(p, cfg) for p in parts]
        self.cfg, self.runtime = cfg, runtime
        self.rng = RandomStream(role_seed(seed, "server"), runtime.device)
        for p in parts:
            set_checkpointing(p, runtime.checkpointing)
        self.compute_s = 0.0
        self.views: dict[int, ModelPart] = {}   # cid -> the part to run for it (clients with their own split)
        self._middle: dict[int, tuple] = {}      # U-shape: cid -> (input, output) awaiting the gradient

    @property
    def shared(self) -> bool:
        return len(self.learners) == 1

    def learner_for(self, cid: int) -> Learner:
        return self.learners[0 if self.shared else cid]

    def train_step(self, cid: int, msg: dict[str, torch.Tensor], global_step: int, return_grad: bool = True
                   ) -> tuple[dict[str, torch.Tensor], Loss]:
        """Smashed message in; ({"activations_grad": ...}, loss) out; the server-side adapter steps.
        Without `return_grad` (the client has nothing to train) no activation gradient is computed."""
        t0 = time.perf_counter()
        learner = self.learner_for(cid)
        learner.part.train()
        rt = self.runtime
        activations = msg["activations"].detach().to(rt.device, rt.dtype).requires_grad_(return_grad)
        with self.rng.active():
            with rt.compute():
                logits = self.views.get(cid, learner.part)(activations, msg["attention_mask"].to(rt.device).long())
            loss, value = lm_losses(logits, msg["labels"].to(rt.device).long(), self.cfg.label_smoothing)
            loss.backward()
        grad = activations.grad
        if not all_finite([loss, grad]):
            learner.discard()
        elif learner.step(global_step):
            self.compute_s += self.runtime.elapsed(t0)
            return {"activations_grad": grad}, value
        self.compute_s += self.runtime.elapsed(t0)
        raise BadUpdate(f"client {cid}: its smashed activations gave a non-finite loss or gradient at the server; "
                        "the server's step is skipped")

    def middle_forward(self, cid: int, msg: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """U-shape: the client's smashed activations through the server's blocks; their output goes back."""
        t0 = time.perf_counter()
        learner = self.learner_for(cid)
        learner.part.train()
        rt = self.runtime
        x = msg["activations"].detach().to(rt.device, rt.dtype).requires_grad_(True)
        with self.rng.active(), rt.compute():
            out = self.views.get(cid, learner.part)(x, msg["attention_mask"].to(rt.device).long())
        self.compute_s += self.runtime.elapsed(t0)
        if not all_finite([out]):
            raise BadUpdate(f"client {cid}: its smashed activations gave non-finite values at the server")
        self._middle[cid] = (x, out)
        return {"activations": out.detach()}

    def middle_backward(self, cid: int, grad: torch.Tensor, global_step: int, return_grad: bool = True
                        ) -> dict[str, torch.Tensor]:
        """U-shape: the gradient of the server's output in; the server adapter steps; the gradient of
        the client's smashed activations out (not computed without `return_grad`)."""
        if cid not in self._middle:
            raise RuntimeError(f"server: middle_backward() for client {cid} without a middle_forward()")
        t0 = time.perf_counter()
        x, out = self._middle.pop(cid)
        learner = self.learner_for(cid)
        inputs = [x] if return_grad else []
        inputs += [p for p in self.views.get(cid, learner.part).trainable_parameters() if p.requires_grad]
        with self.rng.active():
            torch.autograd.backward(out, grad.to(out.device, out.dtype), inputs=inputs)
        if not (all_finite([x.grad]) and learner.step(global_step)):
            learner.discard()
            self.compute_s += self.runtime.elapsed(t0)
            raise BadUpdate(f"client {cid}: a non-finite gradient at the server; the server's step is skipped")
        self.compute_s += self.runtime.elapsed(t0)
        return {"activations_grad": x.grad if return_grad else None}

    def adapter_states(self) -> list[dict[str, torch.Tensor]]:
        return [lr.part.adapter_state() for lr in self.learners]

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        for lr in self.learners:
            lr.part.load_adapter_state(state)

    def state_dict(self) -> dict:
        return {"learners": [lr.state_dict() for lr in self.learners], "compute_s": self.compute_s,
                "rng": self.rng.state}

    def load_state_dict(self, state: dict) -> None:
        for lr, s in zip(self.learners, state["learners"], strict=True):
            lr.load_state_dict(s)
        self.compute_s = state["compute_s"]
        if "rng" in state:
            self.rng.state = state["rng"].clone()


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted average of adapter states, tensor by tensor (A and B each averaged, as FedAvg does)."""
    return robust.aggregate("fedavg", states, weights)


class FedServer:
    """Aggregation of client adapters by `method` (`robust.AGGREGATIONS`; default FedAvg weighted by
    client sample counts)."""

    def __init__(self, method: str = "fedavg", trim_fraction: float = 0.2):
        self.method, self.trim_fraction = method, trim_fraction
        self.compute_s = 0.0

    def aggregate(self, states: list[dict[str, torch.Tensor]], weights: list[float],
                  reference: dict[str, torch.Tensor] | None = None, method: str | None = None) -> dict[str, torch.Tensor]:
        """The clients' adapters by this server's method (`method` overrides it: the server's own per-client
        copies are averaged with plain FedAvg)."""
        t0 = time.perf_counter()
        out = robust.aggregate(method or self.method, states, weights, reference, self.trim_fraction)
        self.compute_s += time.perf_counter() - t0
        return out
