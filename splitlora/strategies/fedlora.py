"""`fedlora`: federated LoRA. Every client trains the whole model on one batch per step; FedAvg of the
whole adapters every `strategy.aggregation_interval` steps."""

from __future__ import annotations

from ..errors import RunError
from ..roles import fedavg
from ..split import full_part
from .base import Strategy, Setup, whole_model_only


class FedLoRA(Strategy):
    """Whole-model clients, FedAvg of their adapters."""

    name = "fedlora"
    whole_model = True

    def __init__(self, setup: Setup):
        super().__init__(setup)
        whole_model_only(setup, self.name)
        part = full_part(setup.template)
        self.clients = setup.clients(part)
        self._start_from(part)

    def step(self, t):
        result = self._each(t, lambda c: self._local_step(c, t))
        if self._due(t):
            self.aggregate(t)
        return result

    def global_adapter(self):
        peeks = [(c, s) for c in self.live() for ok, s in [self.guarded(self.t, c, lambda c: c.peek_adapter_state())]
                 if ok]
        peeks = self._bounded(self.t, peeks)   # what is evaluated and exported is bounded like an aggregate
        if not peeks:
            raise RunError("no client left to evaluate")
        return fedavg([s for _, s in peeks], [c.num_samples for c, _ in peeks])
