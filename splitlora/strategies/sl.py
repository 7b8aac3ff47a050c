"""`sl`: vanilla (sequential) split learning. One client trains at a time against one server-side model;
every `strategy.aggregation_interval` steps the client adapter passes to the next live client."""

from __future__ import annotations

from ..learning import Loss
from .base import Setup
from .splitlora import SplitLoRA


class SL(SplitLoRA):
    """Vanilla split learning: one client trains at a time against one server-side model."""

    name = "sl"
    parallel = False
    server_modes = ("shared",)

    def __init__(self, setup: Setup):
        if setup.server_mode != "shared":
            raise ValueError("strategy.server_mode: sl trains one server-side model; use 'shared'")
        super().__init__(setup)
        self.holder = 0   # the client that holds the client adapter now

    def step(self, t):
        self.t = t
        holder = self.clients[self.holder]
        ok, result = self.guarded(t, holder, lambda c: self.split_step(c, t))
        if not ok:               # the holder dropped: what it learned since the last hand-off is lost
            self.holder = self._next_live(holder.cid)
            return Loss(float("nan"), float("nan")), 0
        if self._due(t) and len(self.clients) > 1:   # hand the client adapter to the next live client
            ok, state = self.guarded(t, holder, lambda c: c.adapter_state())
            ok = ok and bool(self._bounded(t, [(holder, state)]))
            nxt = self._next_live(holder.cid)
            if ok and self.guarded(t, self.clients[nxt], lambda c: c.load_adapter_state(state))[0]:
                self.holder = nxt
                self.reference = {**self.reference, **state}
            elif not ok:   # the holder's work since the last hand-off is lost; the next client holds
                self.holder = nxt
            self.last_aggregation = t + 1
            self.rounds += 1
        return result

    def _next_live(self, cid: int) -> int:
        n = len(self.clients)
        for k in range(1, n + 1):
            if (cid + k) % n not in self.dropped:
                return (cid + k) % n
        raise self._no_client_left(self.t, "train")

    def global_adapter(self):
        holder = self.clients[self.holder]
        ok, state = self.guarded(self.t, holder, lambda c: c.peek_adapter_state())
        kept = self._bounded(self.t, [(holder, state)]) if ok else []
        return {**(kept[0][1] if kept else self.reference), **self._server_adapter()}   # else: the last hand-off

    def state_dict(self):
        return {**super().state_dict(), "holder": self.holder}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.holder = state["holder"]

    def finish(self, t):
        pass   # the adapter is already in one place: the current holder's
