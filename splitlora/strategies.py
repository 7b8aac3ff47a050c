"""Training paradigms as thin strategies over the roles: who holds which part, who talks to whom each
step, and when adapters are averaged. One `step(t)` is one global training step:
- cenlora: one whole-model learner on the pooled data, one batch.
- fedlora: every client one whole-model batch; FedAvg of whole adapters every I steps.
- sl: one client at a time, one split batch; every I steps the client adapter passes to the next client.
- splitlora: every client one split batch (shared or per-client server part); client adapters
  (and per-client server adapters) FedAvg'd every I steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .data import BatchStream
from .roles import Client, FedServer, MainServer, OptimConfig, fedavg
from .split import ModelPart, full_part, split_model
from .wire import Link


@dataclass
class Setup:
    """Everything a strategy is built from: the template PEFT model and per-client training features."""

    template: object                       # PeftModel; its own LoRA weights are the global model
    client_features: list[list[dict]]      # tokenized examples of each client
    optim: OptimConfig
    batch_size: int
    seed: int
    pad_token_id: int
    split_layer: int
    num_clients: int
    aggregation_interval: int
    server_mode: str
    link: Link = field(default_factory=Link)
    fed: FedServer = field(default_factory=FedServer)

    def clients(self, part: ModelPart, features: list[list[dict]]) -> list[Client]:
        return [Client(cid, part.replicate(),
                       BatchStream(f, self.batch_size, self.seed * 1009 + cid, self.pad_token_id), self.optim)
                for cid, f in enumerate(features)]


class Strategy:
    name = ""

    def __init__(self, setup: Setup):
        self.s = setup
        self.clients: list[Client] = []
        self.server: MainServer | None = None
        self.rounds = 0

    def step(self, t: int) -> tuple[float, int]:
        """One global step (0-based t); returns (mean training loss, samples processed)."""
        raise NotImplementedError

    def global_adapter(self) -> dict[str, torch.Tensor]:
        """The whole-model adapter (PEFT file keys) the run would export now; sends nothing."""
        raise NotImplementedError

    def finish(self, t: int) -> None:
        """After the last step t: one more aggregation if clients diverged since the last one."""
        if len(self.clients) > 1 and not self._due(t):
            self.aggregate()

    @property
    def weights(self) -> list[int]:
        return [c.num_samples for c in self.clients]

    def aggregate(self) -> None:
        """FedAvg of the client-side adapters, weighted by samples; every client gets the average."""
        avg = self.s.fed.aggregate([self.s.link.up(c.adapter_state()) for c in self.clients], self.weights)
        for c in self.clients:
            c.load_adapter_state(self.s.link.down(avg))
        self.rounds += 1

    def _due(self, t: int) -> bool:
        return (t + 1) % self.s.aggregation_interval == 0

    @property
    def compute(self) -> tuple[float, float]:
        """(client compute seconds, summed over clients; server compute seconds incl. aggregation)."""
        server = (self.server.compute_s if self.server else 0.0) + self.s.fed.compute_s
        return sum(c.compute_s for c in self.clients), server

    def trainable_counts(self) -> tuple[int, int]:
        client = sum(p.numel() for p in self.clients[0].part.trainable_parameters())
        server = sum(p.numel() for p in self.server.learners[0].params) if self.server else 0
        return client, server

    def state_dict(self) -> dict:
        return {"clients": [c.state_dict() for c in self.clients],
                "server": self.server.state_dict() if self.server else None,
                "link": self.s.link.state_dict(), "fed_compute_s": self.s.fed.compute_s, "rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        for c, cs in zip(self.clients, state["clients"], strict=True):
            c.load_state_dict(cs)
        if self.server:
            self.server.load_state_dict(state["server"])
        self.s.link.load_state_dict(state["link"])
        self.s.fed.compute_s = state["fed_compute_s"]
        self.rounds = state["rounds"]


class CenLoRA(Strategy):
    name = "cenlora"

    def __init__(self, setup: Setup):
        super().__init__(setup)
        pooled = [f for feats in setup.client_features for f in feats]
        self.clients = setup.clients(full_part(setup.template), [pooled])

    def step(self, t):
        return self.clients[0].local_step(t)

    @property
    def compute(self):
        """Centralized training runs where the pooled data is: its compute is server compute."""
        return 0.0, self.clients[0].compute_s

    def global_adapter(self):
        return self.clients[0].adapter_state()


class FedLoRA(Strategy):
    name = "fedlora"

    def __init__(self, setup: Setup):
        super().__init__(setup)
        self.clients = setup.clients(full_part(setup.template), setup.client_features)

    def step(self, t):
        results = [c.local_step(t) for c in self.clients]
        if self._due(t):
            self.aggregate()
        return sum(r[0] for r in results) / len(results), sum(r[1] for r in results)

    def global_adapter(self):
        return fedavg([c.adapter_state() for c in self.clients], self.weights)


class SplitLoRA(FedLoRA):
    name = "splitlora"

    def __init__(self, setup: Setup):
        Strategy.__init__(self, setup)
        client_part, server_part = split_model(setup.template, setup.split_layer)
        self.clients = setup.clients(client_part, setup.client_features)
        copies = 1 if setup.server_mode == "shared" else len(self.clients)
        self.server = MainServer([server_part.replicate() for _ in range(copies)], setup.optim)

    def split_step(self, client: Client, t: int) -> tuple[float, int]:
        """Client forward -> server forward/backward -> client backward, over the link."""
        msg, n = client.forward()
        reply, loss = self.server.train_step(client.cid, self.s.link.up(msg), t)
        client.backward(self.s.link.down(reply)["activations_grad"], t)
        return loss, n

    def step(self, t):
        results = [self.split_step(c, t) for c in self.clients]
        if self._due(t):
            self.aggregate()
        return sum(r[0] for r in results) / len(results), sum(r[1] for r in results)

    def aggregate(self):
        super().aggregate()
        if not self.server.shared:   # SFL-V1: per-client server parts are averaged at the same interval
            self.server.load_adapter_state(self.s.fed.aggregate(self.server.adapter_states(), self.weights))

    def _server_adapter(self):
        states = self.server.adapter_states()
        return states[0] if len(states) == 1 else fedavg(states, self.weights)

    def global_adapter(self):
        return {**FedLoRA.global_adapter(self), **self._server_adapter()}


class SL(SplitLoRA):
    """Vanilla split learning: one client trains at a time against one server-side model."""

    name = "sl"

    def __init__(self, setup: Setup):
        if setup.server_mode != "shared":
            raise ValueError("strategy.server_mode: sl trains one server-side model; use 'shared'")
        super().__init__(setup)

    def active(self, t: int) -> Client:
        return self.clients[(t // self.s.aggregation_interval) % len(self.clients)]

    def step(self, t):
        loss, n = self.split_step(self.active(t), t)
        if self._due(t) and len(self.clients) > 1:   # hand the client adapter to the next client
            state = self.s.link.up(self.active(t).adapter_state())
            self.active(t + 1).load_adapter_state(self.s.link.down(state))
            self.rounds += 1
        return loss, n

    def global_adapter(self):
        holder = self.active(self.rounds * self.s.aggregation_interval)
        return {**holder.adapter_state(), **self._server_adapter()}

    def finish(self, t):
        pass   # the adapter is already in one place: the current holder's


STRATEGIES = {cls.name: cls for cls in (CenLoRA, FedLoRA, SL, SplitLoRA)}
