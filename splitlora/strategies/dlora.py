"""`dlora`: SplitLoRA with DLoRA's Kill & Revive of client-side adapters (arXiv 2404.05182)."""

from __future__ import annotations

import torch

from ..split import lora_targets
from .base import Setup
from .splitlora import SplitLoRA


class DLoRA(SplitLoRA):
    """SplitLoRA with DLoRA's Kill & Revive on the client-side adapters (arXiv 2404.05182).

    At every aggregation after `dlora.warmup_steps`, each live LoRA module of the global client
    adapter (its A and B together) whose relative change since the previous aggregation,
    ||θ_now − θ_prev|| / ||θ_prev||, is below `dlora.threshold` is killed on every client: no
    gradient, no optimizer state, not sent at aggregation; if every module of the clients' bottom part
    is dead, clients skip their bottom backward pass and the server sends no activation gradient (a
    U-shaped client's top still trains what is alive there and sends the server its gradient). Every
    `dlora.revive_interval` steps all killed modules train again and are judged anew at the next
    aggregations. Killed sets are the same on every client, so FedAvg stays over like tensors."""

    name = "dlora"
    section = "dlora"

    def __init__(self, setup: Setup, warmup_steps: int = 20, threshold: float = 0.05, revive_interval: int = 100):
        super().__init__(setup)
        self.warmup_steps, self.threshold, self.revive_interval = warmup_steps, threshold, revive_interval
        keys = list(self.client_part.adapter)
        self.modules: dict[str, list[str]] = {}
        for k in keys:
            self.modules.setdefault(k.rsplit(".lora_", 1)[0], []).append(k)
        self._where = {prefix: mod for mod, prefix in lora_targets(setup.template).items()}
        part = self.client_part
        self.bottom = {k.rsplit(".lora_", 1)[0] for k in getattr(part, "bottom", part).adapter}   # U: not the top
        self.killed: set[str] = set()
        self.previous: dict[str, torch.Tensor] | None = None   # global client adapter at the last aggregation
        self.events: list[dict] = []                            # {"step", "killed" | "revived": [...]}

    def frozen_keys(self) -> set[str]:
        return {k for m in self.killed for k in self.modules[m]}

    def frozen_modules(self) -> frozenset:
        """(block, layer name) of the killed modules, for the cost model."""
        return frozenset(self._where[m] for m in self.killed)

    def _apply(self) -> None:
        """Every connected client whose frozen set is not the killed modules' is told (a client that was
        away, or restarted from an older state, is told when it is back: each step checks)."""
        keys = self.frozen_keys()
        for c in self.clients:
            if getattr(c, "connected", True) and c.frozen != keys:
                self.guarded(self.t, c, lambda c: c.set_frozen(keys))

    def bottom_trains(self) -> bool:
        return not self.bottom <= self.killed

    def step(self, t):
        self._apply()
        result = super().step(t)
        self.work.client_frozen = self.frozen_modules()
        if (t + 1) % self.revive_interval == 0 and self.killed:
            self.events.append({"step": t + 1, "revived": sorted(self.killed)})
            self.killed = set()
            self._apply()
        return result

    def aggregate(self, t):
        if len(self.killed) == len(self.modules):   # nothing alive on the clients: nothing to send
            if not self.server.shared:
                live = [c.cid for c in self.live()]
                states = self.server.adapter_states()
                self.server.load_adapter_state(self.s.fed.aggregate(
                    [states[cid] for cid in live], [self.clients[cid].num_samples for cid in live], method="fedavg"))
            self.rounds += 1
            self.last_aggregation = t + 1
            return {}
        avg = super().aggregate(t)
        current = {k: v.clone() for k, v in avg.items()}
        if self.previous is not None and t + 1 > self.warmup_steps:
            kill = []
            for m, keys in self.modules.items():
                if m in self.killed or any(k not in self.previous for k in keys):
                    continue
                now = torch.cat([current[k].flatten() for k in keys])
                before = torch.cat([self.previous[k].flatten() for k in keys])
                if (now - before).norm() <= self.threshold * before.norm().clamp_min(1e-12):
                    kill.append(m)
            if kill:
                self.killed |= set(kill)
                self.events.append({"step": t + 1, "killed": sorted(kill)})
                self._apply()
        self.previous = {**(self.previous or {}), **current}
        return avg

    def summary(self) -> dict:
        return {"dlora_events": self.events}

    def extra_metrics(self) -> dict:
        return {"alive_client_adapters": len(self.modules) - len(self.killed),
                "killed_client_adapters": sorted(self.killed)}

    def state_dict(self):
        return {**super().state_dict(), "killed": sorted(self.killed), "previous": self.previous,
                "dlora_events": self.events}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.killed, self.previous, self.events = set(state["killed"]), state["previous"], state["dlora_events"]
        self._apply()
