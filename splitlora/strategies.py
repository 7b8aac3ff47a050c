"""Training paradigms as thin strategies over the roles: who holds which part, who talks to whom each
step, and when adapters are averaged. One `step(t)` is one global training step:
- cenlora: one whole-model learner on the pooled data, one batch.
- fedlora: every client one whole-model batch; FedAvg of whole adapters every I steps.
- sl: one client at a time, one split batch; every I steps the client adapter passes to the next client.
- splitlora: every client one split batch (shared or per-client server part); client adapters
  (and per-client server adapters) FedAvg'd every I steps.

Strategies talk to clients through a transport with the client role's methods: `LinkedClient` in the
simulator, `RemoteClient` in a deployment. A client whose transport raises `ClientDropped` leaves
the current round; the round aggregates the others (weights renormalised) and a client that is
connected again receives the new global adapter at the next aggregation and trains on from there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import robust
from .cost import StepWork
from .data import BatchStream
from .errors import RunError
from .roles import (BadUpdate, Client, ClientDropped, FedServer, Loss, MainServer, OptimConfig, Privacy,
                    all_finite, fedavg, lr_at)
from .runtime import Runtime
from .split import ModelPart, client_part, full_part, split_model, split_u
from .wire import Link, LinkedClient, data_message


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
        from .lora import export_adapter

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

    def _bounded(self, t: int, uploads: list) -> list:
        """The (client, adapter) uploads whose change from the reference AdamW could have made in the steps
        since the last aggregation (`robust.update_bound`); the others are refused (the client is told
        why and sits out the round) and never reach the aggregate."""
        if self.reference is None:
            return uploads
        steps = range(self.last_aggregation, t + 1)
        largest = max((v.abs().max().item() for v in self.reference.values()), default=0.0)
        bound = robust.update_bound([lr_at(s, self.s.optim) for s in steps], self.s.optim.weight_decay, largest)
        kept = []
        for c, state in uploads:
            change = robust.max_abs_change(state, self.reference)
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


def _whole_model_only(setup: Setup, name: str) -> None:
    if setup.top_layers:
        raise ValueError(f"model.top_layers: {name} trains the whole model in one place; the U-shaped split is "
                         "for the split strategies (splitlora, sl, dlora, hsplitlora, hetlora)")


class CenLoRA(Strategy):
    name = "cenlora"
    deployable, whole_model, parallel = False, True, False

    def __init__(self, setup: Setup):
        super().__init__(setup)
        _whole_model_only(setup, self.name)
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


class FedLoRA(Strategy):
    name = "fedlora"
    whole_model = True

    def __init__(self, setup: Setup):
        super().__init__(setup)
        _whole_model_only(setup, self.name)
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


class SplitLoRA(FedLoRA):
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


class SL(SplitLoRA):
    """Vanilla split learning: one client trains at a time against one server-side model."""

    name = "sl"
    parallel = False

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


_MODULE_KEY = re.compile(r"\.(?:layers|h)\.(\d+)\.(.+)\.lora_[AB]\.weight$")


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
        self._where = {m: (int(k.group(1)), k.group(2)) for m, keys in self.modules.items()
                       for k in [_MODULE_KEY.search(keys[0])]}
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


STRATEGIES = {cls.name: cls for cls in (CenLoRA, FedLoRA, SL, SplitLoRA, DLoRA)}
