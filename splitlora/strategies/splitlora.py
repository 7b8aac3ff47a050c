"""`splitlora`: split federated LoRA (SplitLoRA, arXiv 2407.00952). Every client runs its bottom part on
one batch per step (U-shaped: also its top and the loss), the main server the rest (one shared server
part, SFL-V2, or one per client, SFL-V1); client adapters (and per-client server adapters) are FedAvg'd
every `strategy.aggregation_interval` steps."""

from __future__ import annotations

from ..learning import Loss
from ..roles import MainServer, fedavg
from ..split import split_model, split_u
from .base import Setup, Strategy
from .fedlora import FedLoRA


class SplitLoRA(FedLoRA):
    """Split clients (bottom, or bottom and top), one main server, FedAvg of the client adapters."""

    name = "splitlora"
    whole_model = False

    def __init__(self, setup: Setup):
        Strategy.__init__(self, setup)
        client_part, server_part = (split_u(setup.template, setup.split_layer, setup.top_layers) if setup.top_layers
                                    else split_model(setup.template, setup.split_layer))
        self.clients = setup.clients(client_part)
        self.client_part = client_part   # what every client holds (its structure; the clients own the values)
        self._start_from(client_part)
        copies = 1 if setup.server_mode == "shared" else len(self.clients)
        self.server = MainServer([server_part.replicate() for _ in range(copies)], setup.optim, setup.server_runtime,
                                 setup.seed)

    def bottom_trains(self) -> bool:
        """Whether the clients' bottom parts have anything to train (else no activation gradient is sent)."""
        return True

    def split_step(self, client, t: int) -> tuple[Loss, int]:
        """Client forward -> server forward/backward -> client backward. U-shaped: client bottom ->
        server middle -> client top, loss and backward -> server middle backward -> client bottom."""
        msg, n = client.forward()
        self.work.split.append((client.cid, *msg["activations"].shape[:2]))
        grad = self.bottom_trains()
        if self.s.top_layers:
            top_grad, loss = client.top_step(self.server.middle_forward(client.cid, msg))
            reply = self.server.middle_backward(client.cid, top_grad["activations_grad"], t, return_grad=grad)
        else:
            reply, loss = self.server.train_step(client.cid, msg, t, return_grad=grad)
        if grad:
            client.backward(reply["activations_grad"], t)
        elif self.s.top_layers:   # the client's top may still train
            client.backward(None, t)
        return loss, n

    def step(self, t):
        result = self._each(t, lambda c: self.split_step(c, t))
        if self._due(t):
            self.aggregate(t)
        return result

    def aggregate(self, t):
        live = [c.cid for c in self.live()]
        avg = super().aggregate(t)
        if not self.server.shared:   # SFL-V1: per-client server parts are averaged at the same interval
            states = self.server.adapter_states()
            server_avg = self.s.fed.aggregate([states[cid] for cid in live],
                                              [self.clients[cid].num_samples for cid in live], method="fedavg")
            self.server.load_adapter_state(server_avg)
        return avg

    def _server_adapter(self):
        states = self.server.adapter_states()
        return states[0] if len(states) == 1 else fedavg(states, self.weights)

    def global_adapter(self):
        return {**FedLoRA.global_adapter(self), **self._server_adapter()}
