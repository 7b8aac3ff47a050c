"""`cenlora`: centralized LoRA, the upper baseline. The clients upload their data once; one whole-model
learner trains on the pooled data, one batch per step (its compute is server compute)."""

from __future__ import annotations

from ..transport.codec import data_message
from ..split import full_part
from .base import Strategy, Setup, whole_model_only


class CenLoRA(Strategy):
    """One whole-model learner on the pooled data of every client."""

    name = "cenlora"
    deployable, whole_model, parallel, pooled = False, True, False, True

    def __init__(self, setup: Setup):
        super().__init__(setup)
        whole_model_only(setup, self.name)
        if setup.remote is not None:
            raise ValueError("strategy.name: cenlora pools the data in one place; it has no deployment")
        pooled = [f for feats in setup.client_features for f in feats]
        self.clients = setup.clients(full_part(setup.template), [pooled])

    def step(self, t):
        if t == 0:   # the clients upload their data before centralized training starts
            for cid, feats in enumerate(self.s.client_features):
                self.s.link.up(data_message(feats), cid, "data")
        return self._local_step(self.clients[0], t, central=True)

    @property
    def compute(self):
        """Centralized training runs where the pooled data is: its compute is server compute."""
        return 0.0, self.clients[0].compute_s

    def global_adapter(self):
        return self.clients[0].peek_adapter_state()
