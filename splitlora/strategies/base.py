"""What every strategy shares: `Setup` (what a strategy is built from), `make_client` (the client role as
every process builds it) and `Strategy` (clients that may drop out, aggregation with bounded uploads,
checkpoint state). A strategy talks to its clients only through the client contract (`splitlora.contract`):
`LinkedClient` in the simulator, `RemoteClient` in a deployment; a client whose transport raises
`ClientDropped` leaves the current round, the round aggregates the others (weights renormalised) and a
client that is connected again receives the new global adapter at the next aggregation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import robust
from ..cost import StepWork
from ..data import BatchStream
from ..errors import RunError
from ..learning import BadUpdate, ClientDropped, Loss, OptimConfig, Privacy, all_finite, lr_at
from ..roles import Client, FedServer, MainServer
from ..runtime import Runtime
from ..split import ModelPart, client_part
from ..transport.local import Link, LinkedClient


@dataclass
class Setup:
    """Everything a strategy is built from: the template PEFT model and how to reach each client."""

    template: object                       # PeftModel; its own LoRA weights are the global model
    client_features: list[list[dict]] | None   # tokenized examples of each client (None: remote clients)
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
    remote: Callable | None = None         # (cid, client part) -> RemoteClient, for a deployed server
    top_layers: int = 0                    # m > 0: U-shaped split, the client also holds the last m blocks + head
    privacy: Privacy = field(default_factory=Privacy)   # clipping and noise on what clients send
    server_runtime: Runtime = field(default_factory=Runtime)   # the main server's device and precision
    client_runtimes: list[Runtime] | None = None              # each client's (None: the server's)

    def client_runtime(self, cid: int) -> Runtime:
        return self.client_runtimes[cid] if self.client_runtimes else self.server_runtime

    def clients(self, part: ModelPart, features: list[list[dict]] | None = None) -> list:
        """The clients, each with its own copy of `part` (its own LoRA; the frozen base weights are shared
        with the template where the client's device is the template's, copied to the client's device else)."""
        if self.remote is not None:
            return [self.remote(cid, part) for cid in range(self.num_clients)]
        features = self.client_features if features is None else features
        return [LinkedClient(make_client(cid, part.replicate(self.client_runtime(cid).device), f, self), self.link)
                for cid, f in enumerate(features)]


def make_client(cid: int, part: ModelPart, features: list[dict], setup: Setup) -> Client:
    """The client role as every process builds it: its part, its data stream, its optimizer."""
    stream = BatchStream(features, setup.batch_size, setup.seed * 1009 + cid, setup.pad_token_id)
    client = Client(cid, part, stream, setup.optim, setup.privacy, setup.seed, setup.client_runtime(cid))
    client.builder = lambda split: client_part(setup.template, split, setup.top_layers)   # set_layout
    return client


class Strategy:
    """A training schedule over the roles. What the rest of the package needs to know about a strategy it
    declares here (never switched on its name elsewhere)."""

    name = ""
    section: str | None = None   # the config section holding its own options (keyword arguments of __init__)
    deployable = True            # its clients may run in other processes (`splitlora serve`)
    whole_model = False          # each client holds the whole model (no split point)
    parallel = True              # a step takes a batch from every client (else: from one)
    client_layouts = False       # the server gives each client its split and ranks (`set_layout`) before work
    pooled = False               # the clients' data is pooled where the model trains (clients compute nothing)
    server_modes = ("shared", "per_client")   # strategy.server_mode values it runs with (the first: its default)

    @classmethod
    def resolve(cls, cfg) -> type:
        """The class that runs a config naming this strategy (an option may select a variant)."""
        return cls

    @classmethod
    def options(cls, cfg) -> dict:
        """Keyword arguments of __init__ from a config: its own section's fields."""
        return getattr(cfg, cls.section).model_dump() if cls.section else {}

    @classmethod
    def client_depth(cls, cfg, layers: int | None = None) -> int | None:
        """The deepest split a client may be given (None: the whole model), for a model of `layers` blocks
        (None: not known yet; an upper bound)."""
        return None if cls.whole_model else cfg.model.split_layer

    @classmethod
    def message_numel(cls, part, num_clients: int) -> int:
        """Values in the largest message of the strategy's own commands to a client holding `part`."""
        return 0

    def summary(self) -> dict:
        """Strategy-specific fields of the run's summary."""
        return {}

    def export_to(self, out_dir, template) -> dict:
        """Write the run's adapter (PEFT) to out_dir; returns summary fields about it."""
        from ..lora import export_adapter

        export_adapter(template, self.global_adapter(), out_dir)
        return {}

    def __init__(self, setup: Setup):
        self.s = setup
        self.clients: list = []
        self.server: MainServer | None = None
        self.rounds = 0
        self.dropped: set[int] = set()
        self.dropouts: list[dict] = []    # {"step", "client", "reason"} each time a client left a round
        self.t = -1                       # the step under way (evaluations happen after it)
        self.work = StepWork()            # what the step under way computed and sent (cost model)
        self.reference: dict[str, torch.Tensor] | None = None   # the global client adapter clients start from
        self.last_aggregation = 0         # steps done at the last aggregation (or hand-off)
        self.skipped_updates = 0          # steps skipped because a client's batch gave non-finite values
        self.refused_updates = 0          # uploads refused as out of bounds

    def _start_from(self, client_part) -> None:
        """The clients' initial adapter: the reference their first uploads are bounded against."""
        self.reference = client_part.adapter_state()

    def step(self, t: int) -> tuple[Loss, int]:
        """One global step (0-based t); returns (mean training loss, samples processed)."""
        raise NotImplementedError

    def global_adapter(self) -> dict[str, torch.Tensor]:
        """The whole-model adapter (PEFT file keys) the run would export now; counts no traffic."""
        raise NotImplementedError

    def take_work(self) -> StepWork:
        """The work since the last call (batch shapes; messages as the transport counted them)."""
        work, self.work = self.work, StepWork()
        work.messages = self.s.link.take_log()
        return work

    def _local_step(self, client, t: int, central: bool = False) -> tuple[Loss, int]:
        loss, n = client.local_step(t)
        if central:
            self.work.central.append(tuple(client.last_shape))
        else:
            self.work.local.append((client.cid, *client.last_shape))
        return loss, n

    def finish(self, t: int) -> None:
        """After the last step t: one more aggregation if clients diverged since the last one."""
        if len(self.clients) > 1 and not self._due(t):
            self.aggregate(t)

    # -- clients that may drop out ------------------------------------------------------------------
    def live(self) -> list:
        return [c for c in self.clients if c.cid not in self.dropped]

    def guarded(self, t: int, client, fn: Callable) -> tuple[bool, object]:
        """(True, fn(client)), or (False, None) if the client dropped out or its update was skipped
        (non-finite values): it then sits out the round."""
        try:
            return True, fn(client)
        except ClientDropped as e:
            if isinstance(e, BadUpdate):
                self.skipped_updates += 1
            self._drop(t, client, str(e))
            return False, None

    def _drop(self, t: int, client, reason: str) -> None:
        self.dropped.add(client.cid)
        self.dropouts.append({"step": t + 1, "client": client.cid, "reason": reason})

    def _no_client_left(self, t: int, what: str) -> RunError:
        recent = "; ".join(f"client {d['client']} at step {d['step']}: {d['reason']}" for d in self.dropouts[-3:])
        return RunError(f"step {t + 1}: no client left to {what}" + (f" (last dropouts: {recent})" if recent else ""))

    def _each(self, t: int, fn: Callable) -> tuple[Loss, int]:
        self.t = t
        results = [r for c in self.live() for ok, r in [self.guarded(t, c, fn)] if ok]
        if not results:
            raise self._no_client_left(t, "train")
        return Loss.mean([r[0] for r in results]), sum(r[1] for r in results)

    def _bounded(self, t: int, uploads: list, reference_of: Callable | None = None) -> list:
        """The (client, adapter) uploads whose change from the reference (the global adapter, or each
        client's own: `reference_of(client)`) AdamW could have made in the steps since the last aggregation
        (`robust.update_bound`); the others are refused (the client is told why and sits out the round)
        and never reach the aggregate."""
        if reference_of is None:
            if self.reference is None:
                return uploads
            reference_of = lambda c: self.reference  # noqa: E731
        steps = range(self.last_aggregation, t + 1)
        lrs = [lr_at(s, self.s.optim) for s in steps]
        kept = []
        for c, state in uploads:
            reference = reference_of(c)
            largest = max((v.abs().max().item() for v in reference.values()), default=0.0)
            bound = robust.update_bound(lrs, self.s.optim.weight_decay, largest)
            change = robust.max_abs_change(state, reference)
            if change <= bound:
                kept.append((c, state))
                continue
            reason = (f"client {c.cid}: refused its adapter: a value changed by {change:.3g}, more than the "
                      f"{bound:.3g} AdamW can move one in {len(steps)} steps (x{robust.MARGIN:g})")
            self.refused_updates += 1
            self._drop(t, c, reason)
            if hasattr(c, "refuse"):
                c.refuse(reason)
        return kept

    @property
    def weights(self) -> list[int]:
        return [c.num_samples for c in self.clients]

    def aggregate(self, t: int) -> dict[str, torch.Tensor]:
        """FedAvg of the live clients' adapters, weighted by samples; every connected client (the
        ones that dropped out and came back too) gets the average and is live again."""
        uploads = [(c, s) for c in self.live() for ok, s in [self.guarded(t, c, lambda c: c.adapter_state())] if ok]
        uploads = self._bounded(t, uploads)
        if not uploads:
            raise self._no_client_left(t, "aggregate")
        reference = None if self.reference is None else {k: self.reference[k] for k in uploads[0][1]}
        avg = self.s.fed.aggregate([s for _, s in uploads], [c.num_samples for c, _ in uploads], reference)
        if not all_finite(avg.values()):   # cannot happen with bounded, finite uploads; never let it through
            raise RunError(f"step {t + 1}: the aggregate of {len(uploads)} bounded uploads is not finite")
        for c in self.clients:
            if getattr(c, "connected", True) and self.guarded(t, c, lambda c: c.load_adapter_state(avg))[0]:
                self.dropped.discard(c.cid)   # a client that came back rejoins with the global adapter
        self.rounds += 1
        if self.reference is not None:
            self.reference = {**self.reference, **{k: v.clone() for k, v in avg.items()}}
        self.last_aggregation = t + 1
        return avg

    def _due(self, t: int) -> bool:
        return (t + 1) % self.s.aggregation_interval == 0

    @property
    def compute(self) -> tuple[float, float]:
        """(client compute seconds, summed over clients; server compute seconds incl. aggregation)."""
        server = (self.server.compute_s if self.server else 0.0) + self.s.fed.compute_s
        return sum(c.compute_s for c in self.clients), server

    def extra_metrics(self) -> dict:
        """Strategy-specific fields of each metrics record."""
        return {}

    def trainable_counts(self) -> tuple[int, int]:
        server = sum(p.numel() for p in self.server.learners[0].params) if self.server else 0
        return self.clients[0].num_trainable, server

    def state_dict(self) -> dict:
        """Everything a resumed run needs; a client that cannot be reached is saved as None and keeps
        whatever state it has when it comes back (it gets the global adapter at the next round)."""
        def client_state(c):
            try:
                return c.state_dict() if c.cid not in self.dropped else None
            except ClientDropped:
                return None

        return {"clients": [client_state(c) for c in self.clients],
                "server": self.server.state_dict() if self.server else None,
                "link": self.s.link.state_dict(), "fed_compute_s": self.s.fed.compute_s, "rounds": self.rounds,
                "dropouts": self.dropouts, "reference": self.reference, "last_aggregation": self.last_aggregation,
                "skipped_updates": self.skipped_updates, "refused_updates": self.refused_updates}

    def load_state_dict(self, state: dict) -> None:
        for c, cs in zip(self.clients, state["clients"], strict=True):
            if cs is not None:
                c.load_state_dict(cs)
        if self.server:
            self.server.load_state_dict(state["server"])
        self.s.link.load_state_dict(state["link"])
        self.s.fed.compute_s = state["fed_compute_s"]
        self.rounds = state["rounds"]
        self.dropouts = state["dropouts"]
        self.reference = state.get("reference", self.reference)
        self.last_aggregation = state.get("last_aggregation", 0)
        self.skipped_updates = state.get("skipped_updates", 0)
        self.refused_updates = state.get("refused_updates", 0)


def whole_model_only(setup: Setup, name: str) -> None:
    if setup.top_layers:
        raise ValueError(f"model.top_layers: {name} trains the whole model in one place; the U-shaped split is "
                         "for the split strategies (splitlora, sl, dlora, hsplitlora, hetlora)")
