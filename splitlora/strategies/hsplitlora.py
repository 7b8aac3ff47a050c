"""`hsplitlora`: heterogeneous clients (HSplitLoRA, arXiv 2505.02795).

Each client gets its own split point and LoRA ranks from its device budget (`cost.clients` profiles):
the deepest split whose client pass fits `hsplit.client_step_s` seconds of its compute and its
memory, and a LoRA parameter budget of `hsplit.rank` per module scaled by its compute relative to
the strongest client, spread over its modules by importance (`hetero.allocate_ranks`). Every LoRA
module is built at rank `lora.rank` (the most a client may get, and the server's); a client of rank
r trains the first r components (the rest are zero and masked), and the cost model, messages and
parameter counts use r.

The server keeps one server-side adapter (SFL-V2) for blocks [min k, L); client i runs it from its own
k_i. A block that is client-side for one client and server-side for another has several copies; at
an aggregation every client counts with the copy it trained through (its own, or the server's).
U-shaped (`model.top_layers` = m): every client also holds blocks [L − m, L) and the head (their cost
and memory count against its budget, their ranks come from its budget), the server blocks [min k, L − m).

`hsplitlora`: noise-free aggregation (`hsplit.aggregation`; docs/methods.md). Per module, the copies'
round updates are stacked (`hetero.stack_updates`) into ΔW = Σ_i p_i s (B_i A_i − B0_i A0_i) exactly and
added to the run's total; each copy then gets a new adapter (A', B') and its base gains
ΔW − s B'A' + s B0 A0, so every copy computes with pretrained + total: `stack_fold` restarts B at zero,
`stack_svd` hands each copy the top components of the copies' average (FlexLoRA), `stack_keep` keeps A,
B and their AdamW moments. Clients download their modules' factors (and the new adapter under
stack_svd). The importance of each module, Σ|W ⊙ ΔW| per round (EMA), decides ranks again when its
distribution moved by more than `hsplit.realloc_threshold` (total variation); a shrunk rank's dropped
components go into the base. The exported adapter is the total update as a PEFT adapter of the rank it
needs (`hsplit.export_tolerance`).
`hetlora`: the same clients, ranks and splits, with A and B averaged separately over the zero-padded
copies (FedAvg of the masked tensors); each copy keeps its first r components.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from safetensors.torch import save_file

from .. import hetero
from ..checkpoint import atomic_directory
from ..cost import Profile, Shapes, part_flops, part_memory_bytes
from ..roles import MainServer, refit_adapter
from ..split import base_weight, full_part, lora_layers, lora_targets, make_part
from .splitlora import SplitLoRA


def _factors(layer) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def cut_to_rank(a: torch.Tensor, b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    return a[:r], b[:, :r]


class HSplitLoRA(SplitLoRA):
    """Clients at splits and ranks of their own, reached only through the client contract: `set_layout`
    (a part at a split, its ranks, its starting adapter and the current base weights), `adapter_state`
    (cut to its ranks) and `fold` (the round's stacked factors, new ranks, new rows of A)."""

    name = "hsplitlora"
    section = "hsplit"
    client_layouts = True
    fold_modes = {"stack_fold": "restart", "stack_svd": "replace", "stack_keep": "keep"}   # roles.refit_adapter
    aggregations = tuple(fold_modes)   # hetlora: zero_pad
    default_aggregation = "stack_keep"   # the best measured (benchmarks/README.md: bench hetero)

    @classmethod
    def resolve(cls, cfg):
        """`hsplit.aggregation: zero_pad` is the HetLoRA baseline (strategies/hetlora.py)."""
        if cfg.hsplit.aggregation == "zero_pad":
            from .hetlora import HetLoRA

            return HetLoRA
        return cls

    @classmethod
    def options(cls, cfg) -> dict:
        from ..train import cost_profiles

        if cfg.hsplit.aggregation not in (None, *cls.aggregations):
            other = "hetlora" if cfg.hsplit.aggregation == "zero_pad" else "hsplitlora"
            raise ValueError(f"hsplit.aggregation: {cfg.hsplit.aggregation} is strategy {other}'s, not {cls.name}'s "
                             f"({', '.join(cls.aggregations)})")
        if cfg.strategy.aggregation != "fedavg":
            raise ValueError(f"strategy.aggregation: {cls.name} combines adapters of different ranks its own way; "
                             "the robust options are for fedlora, sl, splitlora and dlora")
        if cfg.train.eval_interval % cfg.strategy.aggregation_interval:
            raise ValueError(f"train.eval_interval: {cls.name} evaluates right after aggregations; make it a "
                             "multiple of strategy.aggregation_interval")
        return {**super().options(cfg), "profiles": cost_profiles(cfg)[0], "batch_size": cfg.train.batch_size,
                "max_length": cfg.data.max_length}

    @classmethod
    def client_depth(cls, cfg, layers=None):
        """A client may be moved as deep as hsplit.max_split_layer (the server keeps a block at least)."""
        deepest = cfg.hsplit.max_split_layer
        return deepest if layers is None else max(1, min(deepest, layers - cfg.model.top_layers - 1))

    @classmethod
    def message_numel(cls, part, num_clients):
        """set_layout (the base weights of its LoRA modules and its adapter), its state (the same, with two
        AdamW moments) or fold (the round's update of up to every client's copy and the server's, now and
        as the round began, the client's own adapter now and before, and a new adapter)."""
        adapter = sum(p.numel() for p in part.adapter.values())
        base = sum(base_weight(m).numel() for m in lora_layers(part).values())
        return max(base + 3 * adapter, (2 * (num_clients + 1) + 3) * adapter)   # a client state: + AdamW moments

    def __init__(self, setup, profiles: list[Profile], batch_size: int, max_length: int, rank: int = 4,
                 client_step_s: float = 1.0, min_split_layer: int = 1,
                 max_split_layer: int = 6, realloc_threshold: float = 0.1, importance_beta: float = 0.85,
                 export_tolerance: float = 1e-4, aggregation: str | None = None):
        super().__init__(setup)   # every client at model.split_layer until it is given its layout
        self.aggregation = aggregation or self.default_aggregation
        if self.aggregation not in self.aggregations:
            raise ValueError(f"hsplit.aggregation: {self.name} aggregates by {' or '.join(self.aggregations)}, "
                             f"not {self.aggregation!r}")
        self.mode = self.fold_modes.get(self.aggregation)   # what each copy's adapter becomes at a fold
        self.shapes = Shapes.from_model(setup.template)
        self.layers = len(self.shapes.blocks)
        self.top = self.layers - setup.top_layers   # U-shape: blocks [top, L) and the head stay on every client
        self.profiles = [profiles[i % len(profiles)] for i in range(setup.num_clients)]
        config = setup.template.peft_config["default"]
        self.batch, self.length, self.rank, self.max_rank = batch_size, max_length, rank, config.r
        self.client_step_s, self.split_range = client_step_s, (min_split_layer, max_split_layer)
        self.realloc_threshold, self.export_tolerance = realloc_threshold, export_tolerance
        self.tracker = hetero.ImportanceTracker(importance_beta)
        self.reference: dict[str, float] = {}
        self.scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        self.prefix = lora_targets(setup.template)        # (block, name) -> PEFT key prefix
        self.base = self._base_weights()
        self.module_shapes = {(b, lin.name): (lin.fan_in, lin.fan_out) for b in range(self.layers)
                              for lin in self.shapes.blocks[b] if lin.rank}   # (block, name) -> (in, out)
        self.total = {mod: torch.zeros(out, inp) for mod, (inp, out) in self.module_shapes.items()}
        self.initial = full_part(setup.template).adapter_state()   # what a module starts from (B = 0)
        self.reallocations: list[dict] = []
        self._init_gen = torch.Generator().manual_seed(setup.seed * 7919 + 1)
        self.folded = False   # whether any update is in the base yet (else clients keep their own base)
        self.held: dict[int, tuple | None] = {i: None for i in range(setup.num_clients)}   # (split, incarnation)
        self.given: dict[int, dict[str, torch.Tensor]] = {}   # cid -> its adapter as this round began (bounds)
        self.splits = [self._split_for(p) for p in self.profiles]
        self.ranks = [self._ranks_for(i, {}) for i in range(setup.num_clients)]
        self._build_server()
        self._sync()

    # -- budgets --------------------------------------------------------------------------------------
    def _split_for(self, p: Profile, shapes: Shapes | None = None, strict: bool = True) -> int:
        """The deepest split whose client training pass (at max length, with the client's LoRA ranks
        where known, else lora.rank) fits the step time and the memory; if none fits, an error at the
        start (`strict`) and the shallowest allowed split during a run."""
        s = shapes or self.shapes
        u = self.top < self.layers
        top_flops = part_flops(s, self.top, self.layers, True, self.batch, self.length, True).total if u else 0
        top_mem = part_memory_bytes(0, 0, s, self.top, self.layers, True, self.batch, self.length) if u else 0
        cum = [part_flops(s, 0, k, False, self.batch, self.length, False).total + top_flops for k in range(self.top)]
        mem = [part_memory_bytes(0, 0, s, 0, k, False, self.batch, self.length) + top_mem for k in range(self.top)]
        lo, hi = self.split_range
        fits = [k for k in range(lo, min(hi, self.top - 1) + 1)
                if cum[k] <= p.flops * self.client_step_s and mem[k] <= p.memory_gb * 2**30]
        if not fits and not strict:
            return lo
        if not fits:
            top = f" and the top {self.layers - self.top} (U-shape)" if self.top < self.layers else ""
            raise ValueError(f"hsplit: a client with {p.peak_tflops:g} TFLOPS x {p.efficiency:g} cannot run even "
                             f"{lo} block(s){top} in hsplit.client_step_s={self.client_step_s} s")
        return max(fits)

    def _ranks_for(self, cid: int, importance: dict[str, float]) -> dict[tuple[int, str], int]:
        """Ranks of client cid's client-side modules: hsplit.rank per module on the strongest device,
        scaled by this device's compute, spread by importance."""
        shapes = {mod: s for mod, s in self.module_shapes.items() if self._client_side(cid, mod[0])}
        strongest = max(p.flops for p in self.profiles)
        budget = int(self.rank * sum(i + o for i, o in shapes.values()) * self.profiles[cid].flops / strongest)
        budget = max(budget, sum(i + o for i, o in shapes.values()))   # at least rank 1 everywhere
        names = {f"{b}.{n}": mod for mod in shapes for b, n in [mod]}
        got = hetero.allocate_ranks({k: importance.get(k, 0.0) for k in names}, budget,
                                    {k: shapes[m] for k, m in names.items()}, r_min=1, r_max=self.max_rank)
        return {names[k]: r for k, r in got.items()}

    def _client_side(self, cid: int, block: int) -> bool:
        return block < self.splits[cid] or block >= self.top

    # -- parts ----------------------------------------------------------------------------------------
    def _base_weights(self) -> dict[tuple[int, str], torch.Tensor]:
        """The frozen base weight of every LoRA target, as [out, in] views, shared by the server's parts
        (the clients hold copies of their own, kept equal by the folds they are sent)."""
        layers = lora_layers(full_part(self.s.template))
        out = {mod: base_weight(layers[prefix]) for mod, prefix in self.prefix.items()}
        if any(not w.is_floating_point() for w in out.values()):
            raise ValueError(f"model.quantization: {self.name} folds updates into the base weights; a quantized "
                             "base cannot take them (use model.quantization: none)")
        return out

    def _build_server(self) -> None:
        """One server part from the shallowest split, fresh LoRA (B = 0), and the view each client runs."""
        server = make_part(self.s.template, min(self.splits), self.top).replicate()
        compute_s = self.server.compute_s
        self.server = MainServer([server], self.s.optim, self.s.server_runtime, self.s.seed)
        self.server.compute_s = compute_s
        self.server.views = {i: server.view(k) for i, k in enumerate(self.splits)}
        self.server_given = self._server_adapter()   # the server copy's adapter as the round began

    def _server_adapter(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {p: tuple(f.detach().clone() for f in _factors(layer)) for p, layer in self._server_layers().items()}

    def _product(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.scaling * (b.to(torch.float32) @ a.to(torch.float32))

    def _effective(self, mod) -> torch.Tensor:
        """The weight every copy of module mod computes with (base + its adapter as the round began): the
        shared base, plus the server copy's adapter where the server holds the module."""
        held = self.server_given.get(self.prefix[mod])
        return self.base[mod] if held is None else self.base[mod] + self._product(*held).to(self.base[mod].dtype)

    def _client_mods(self, cid: int) -> list[tuple[int, str]]:
        return [mod for mod in self.total if self._client_side(cid, mod[0])]

    def _start_adapter(self, cid: int) -> dict[str, torch.Tensor]:
        """What client cid's modules start from when it is given its layout (cut to its ranks)."""
        out = {}
        for mod in self._client_mods(cid):
            p = self.prefix[mod]
            a, b = cut_to_rank(self.initial[f"{p}.lora_A.weight"], self.initial[f"{p}.lora_B.weight"], self.ranks[cid][mod])
            out[f"{p}.lora_A.weight"], out[f"{p}.lora_B.weight"] = a, b
        return out

    def _set_layout(self, c, adapter: dict | None = None) -> bool:
        """Give client c its part, ranks, starting adapter and (once anything is folded) the base weights
        under it (the effective weights less the adapter's product): at the start, after its split
        changed, whenever it missed a fold, and on resuming (`adapter`: what it held as the round began)."""
        cid, mods = c.cid, self._client_mods(c.cid)
        ranks = {self.prefix[m]: self.ranks[cid][m] for m in mods}
        adapter = self._start_adapter(cid) if adapter is None else adapter
        base = {}
        for m in mods if self.folded else ():
            p = self.prefix[m]
            w = self._effective(m).detach()
            a, b = adapter[f"{p}.lora_A.weight"], adapter[f"{p}.lora_B.weight"]
            base[p] = w - self._product(a, b).to(w.dtype) if b.any() else w
        ok, _ = self.guarded(self.t, c, lambda c: c.set_layout(self.splits[cid], ranks, adapter, base))
        self.held[cid] = (self.splits[cid], getattr(c, "incarnation", 0)) if ok else None
        if ok:
            self.given[cid] = {k: v.clone() for k, v in adapter.items()}
        return ok

    def _in_sync(self, c, split: int) -> bool:
        return self.held[c.cid] == (split, getattr(c, "incarnation", 0))

    def _sync(self, resume: bool = False) -> None:
        """Every connected client that does not hold its layout (never given, missed a fold, or a new
        process since) gets it whole; on resuming, with the adapter it held as the round began."""
        for c in self.clients:
            if getattr(c, "connected", True) and not self._in_sync(c, self.splits[c.cid]):
                self._set_layout(c, self.given.get(c.cid) if resume else None)

    def _server_layers(self) -> dict[str, torch.nn.Module]:
        return lora_layers(self.server.learners[0].part)

    @torch.no_grad()
    def _update_server(self, deltas, svds) -> None:
        """The round's update into the server copy and the shared base: the copy's new adapter by the
        aggregation (stack_fold: B = 0 and B's moments forgotten; stack_keep: kept with its moments;
        stack_svd: the top lora.rank SVD components of the average, both moments forgotten), and its
        base gains ΔW less what its adapter's product gained. A module the server does not hold is in the
        base whole."""
        learner, layers = self.server.learners[0], self._server_layers()
        for mod, (a_d, b_d) in deltas.items():
            p = self.prefix[mod]
            change = b_d @ a_d
            if p in layers:
                a, b = _factors(layers[p])
                before = self._product(*self.server_given[p])
                r = a.shape[0]
                given = self._truncated(svds[mod], r) if self.mode == "replace" else None
                refit_adapter(a, b, learner.optimizer.state, self.mode, r, r, given=given)
                change = change - self._product(a, b) + before
            self.base[mod].add_(change.to(self.base[mod].dtype))
        self.server_given = self._server_adapter()

    def _truncated(self, svd, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """stack_svd: a copy of rank r gets the top r SVD components of the average (FlexLoRA); a slot the
        average leaves empty gets LoRA's init for A (B stays 0, so the product is unchanged)."""
        a, b, _ = hetero.truncate(svd, rank, self.scaling)
        empty = ~(a.any(dim=1) | b.any(dim=0))
        if empty.any():
            bound = 1 / math.sqrt(a.shape[1])
            a[empty] = (torch.rand(int(empty.sum()), a.shape[1], generator=self._init_gen) * 2 - 1) * bound
        return a, b

    def _rows(self, cid: int, old: dict, new: dict) -> dict[str, torch.Tensor]:
        """LoRA's init (kaiming_uniform(a=sqrt(5)), PEFT's default for A) for the rows of A a grown rank adds."""
        rows = {}
        for mod in self._client_mods(cid):
            r0, r1 = old[mod], new[mod]
            if r1 > r0:
                fan_in = self.module_shapes[mod][0]
                bound = 1 / math.sqrt(fan_in)
                rows[self.prefix[mod]] = (torch.rand(r1 - r0, fan_in, generator=self._init_gen) * 2 - 1) * bound
        return rows

    def layouts(self) -> dict[int, tuple[int, Shapes]]:
        """cid -> (split layer, shapes with its ranks client-side and max_rank server-side): cost model."""
        if getattr(self, "_layouts_for", None) is not self.ranks:
            self._layouts = {}
            for i, k in enumerate(self.splits):
                blocks = [[dataclasses.replace(lin, rank=(self.ranks[i][(b, lin.name)] if self._client_side(i, b)
                                                          else self.max_rank))
                           if lin.rank else lin for lin in blk] for b, blk in enumerate(self.shapes.blocks)]
                self._layouts[i] = (k, dataclasses.replace(self.shapes, blocks=blocks))
            self._layouts_for = self.ranks
        return self._layouts

    # -- aggregation ----------------------------------------------------------------------------------
    def step(self, t):
        self.t = t
        self._sync()
        result = super().step(t)
        self.work.layouts = self.layouts()
        return result

    def _uploads(self, t: int) -> dict[int, dict[str, torch.Tensor]]:
        """cid -> the adapter each live client holding its layout sends (its modules, cut to its ranks),
        unless it moved further from what the client began the round with than AdamW can."""
        ready = [c for c in self.live() if self._in_sync(c, self.splits[c.cid])]
        ups = [(c, s) for c in ready for ok, s in [self.guarded(t, c, lambda c: c.adapter_state())] if ok]
        ups = self._bounded(t, ups, lambda c: self.given[c.cid])
        if not ups:
            raise self._no_client_left(t, "aggregate")
        return {c.cid: s for c, s in ups}

    def _copy(self, cid: int, mod, states: dict, server: dict) -> tuple[object, torch.Tensor, torch.Tensor]:
        """(which copy, A, B) client cid trained module mod through: its own (from `states`) or the server's."""
        p = self.prefix[mod]
        if self._client_side(cid, mod[0]):
            return cid, states[cid][f"{p}.lora_A.weight"], states[cid][f"{p}.lora_B.weight"]
        a, b = _factors(server[p])
        return "server", a.detach(), b.detach()

    def _start(self, key, mod) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of copy `key` (a client id or "server") of module mod as the round began."""
        p = self.prefix[mod]
        if key == "server":
            return self.server_given[p]
        return self.given[key][f"{p}.lora_A.weight"], self.given[key][f"{p}.lora_B.weight"]

    def aggregate(self, t):
        uploads = self._uploads(t)
        server = self._server_layers()
        deltas, svds = {}, {}
        for mod in self.total:
            copies = {}   # copy -> (A, B, A0, B0, samples of the clients that trained through it)
            for cid in uploads:
                key, a, b = self._copy(cid, mod, uploads, server)
                w = copies.get(key, (0.0,))[-1]
                copies[key] = (a, b, *self._start(key, mod), w + self.clients[cid].num_samples)
            deltas[mod], svds[mod] = self._combine(list(copies.values()))
            self.total[mod] += deltas[mod][1] @ deltas[mod][0]
        self.folded = True
        splits, ranks = list(self.splits), self.ranks
        self._update_server(deltas, svds)
        self._update_importance(deltas)
        for c in self.clients:   # downloads: the round's update of the client's modules, its new adapter
            if not getattr(c, "connected", True):
                self.held[c.cid] = None
            elif self.splits[c.cid] == splits[c.cid] and self._in_sync(c, splits[c.cid]) and c.cid in uploads:
                self._send_fold(c, deltas, svds, ranks[c.cid], uploads[c.cid])
            else:
                self._set_layout(c)
            if self.held[c.cid] is not None:
                self.dropped.discard(c.cid)
        self.rounds += 1
        self.last_aggregation = t + 1
        return {}

    def _combine(self, copies):
        """Noise-free: the round's update ΔW = Σ_i p_i s (B_i A_i − B0_i A0_i) of one module as stacked
        factors (exact); for stack_svd also the SVD of the copies' average adapter Σ_i p_i s B_i A_i."""
        weights = [w for *_, w in copies]
        factors = hetero.stack_updates([(a, b, a0, b0, self.scaling) for a, b, a0, b0, _ in copies], weights)
        svd = None
        if self.mode == "replace":
            svd = hetero.factored_svd(*hetero.stack([(a, b, self.scaling) for a, b, *_ in copies], weights))
        return factors, svd

    def _send_fold(self, c, deltas, svds, old_ranks, upload) -> None:
        """The round's update to client c as factors for its base (ΔW, less what its own adapter's
        product gains) and its adapter at its new ranks by the aggregation; what the adapter then is,
        known from its upload, is the reference its next upload is bounded against."""
        cid = c.cid
        mods = self._client_mods(cid)
        ranks = {self.prefix[m]: self.ranks[cid][m] for m in mods}
        svd = self.mode == "replace"
        rows = {} if svd else self._rows(cid, old_ranks, self.ranks[cid])
        factors, given = {}, {}
        for m in mods:
            p, r = self.prefix[m], self.ranks[cid][m]
            a, b = upload[f"{p}.lora_A.weight"], upload[f"{p}.lora_B.weight"]
            old, room = a.shape[0], max(a.shape[0], r)   # the client's adapter after its refit, by the same rule
            a_new, b_new = a.new_zeros(room, a.shape[1]), b.new_zeros(b.shape[0], room)
            a_new[:old], b_new[:, :old] = a, b
            refit_adapter(a_new, b_new, {}, self.mode, old, r, rows.get(p),
                          self._truncated(svds[m], r) if svd else None)
            a_new, b_new = a_new[:r].clone(), b_new[:, :r].clone()
            a0, b0 = self._start(cid, m)
            factors[p] = hetero.concat(deltas[m], (a_new, -self.scaling * b_new), (a0, self.scaling * b0))
            given[f"{p}.lora_A.weight"], given[f"{p}.lora_B.weight"] = a_new, b_new
        adapter = given if svd else None
        ok, _ = self.guarded(self.t, c, lambda c: c.fold(factors, ranks, rows, self.mode, adapter))
        if not ok:
            self.held[cid] = None
            return
        self.given[cid] = given

    def _update_importance(self, deltas) -> None:
        """Σ|W ⊙ ΔW| of each module this round (EMA); ranks re-decided when its distribution moved."""
        for mod, (A, B) in deltas.items():
            self.tracker.update(f"{mod[0]}.{mod[1]}", hetero.taylor_importance(self._effective(mod), B @ A))
        scores = self.tracker.scores()
        if not self.reference or self.tracker.shifted(self.reference, self.realloc_threshold):
            self.reference = dict(scores)
            self.ranks = [self._ranks_for(i, scores) for i in range(len(self.clients))]
            splits = [self._split_for(p, self.layouts()[i][1], strict=False) for i, p in enumerate(self.profiles)]
            event = {"step": self.t + 1}
            if splits != self.splits:   # the server copy's adapter goes into the base first: nothing is lost
                self.splits = event["splits"] = splits
                self.ranks = [self._ranks_for(i, scores) for i in range(len(self.clients))]
                with torch.no_grad():
                    for mod in self.total:
                        self.base[mod].copy_(self._effective(mod))
                self._build_server()   # the clients whose split moved get their new layout (aggregate)
            self.reallocations.append({**event, "mean_ranks": self.mean_ranks()})

    # -- reporting and export -------------------------------------------------------------------------
    def mean_ranks(self) -> list[float]:
        return [sum(r.values()) / max(1, len(r)) for r in self.ranks]

    def client_trainable(self, cid: int) -> int:
        shapes = self.module_shapes
        return sum(r * sum(shapes[mod]) for mod, r in self.ranks[cid].items())

    def trainable_counts(self):
        server = sum(self.max_rank * sum(s) for mod, s in self.module_shapes.items()
                     if min(self.splits) <= mod[0] < self.top)
        return max(self.client_trainable(i) for i in range(len(self.clients))), server

    def extra_metrics(self) -> dict:
        return {"client_splits": list(self.splits), "client_mean_ranks": [round(r, 3) for r in self.mean_ranks()]}

    def global_adapter(self):
        """The template's own (untrained, B = 0) adapter, with the server copy's adapter as the round began
        where the server holds a module: with the shared base, every update of the run."""
        out = make_part(self.s.template, 0, self.layers).adapter_state()
        for p, (a, b) in self.server_given.items():
            out[f"{p}.lora_A.weight"], out[f"{p}.lora_B.weight"] = a.clone(), b.clone()
        return out

    def summary(self) -> dict:
        return {"reallocations": self.reallocations}

    def export_to(self, out_dir, template=None) -> dict:
        """The run's total update as a PEFT adapter of the original base model: per module an SVD of
        ΔW_total, at the smallest rank R (shared by all modules) whose tail is within export_tolerance
        of ||ΔW_total||, lora_alpha = R (scaling 1). Returns the rank and the largest relative error."""
        template = self.s.template
        svds = {mod: torch.linalg.svd(d, full_matrices=False) for mod, d in self.total.items()}

        def needed(sv):
            total = float(sv.norm())
            tails = torch.sqrt(torch.flip(torch.cumsum(torch.flip(sv**2, [0]), 0), [0]))   # ||S[r:]|| for each r
            ok = [r for r in range(len(sv) + 1) if total == 0 or (float(tails[r]) if r < len(sv) else 0) <= self.export_tolerance * total]
            return min(ok)

        rank = max(1, max(needed(sv) for _, sv, _ in svds.values()))
        tensors, errors = {}, []
        prefixes = self.prefix
        for mod, (u, sv, vh) in svds.items():
            r = min(rank, len(sv))
            root = sv[:r].sqrt()
            a = torch.zeros(rank, vh.shape[1])
            b = torch.zeros(u.shape[0], rank)
            a[:r], b[:, :r] = root[:, None] * vh[:r], u[:, :r] * root
            tensors[f"{prefixes[mod]}.lora_A.weight"] = a.contiguous()
            tensors[f"{prefixes[mod]}.lora_B.weight"] = b.contiguous()
            total = float(sv.norm())
            errors.append(float(sv[r:].norm()) / total if total > 0 else 0.0)
        config = dataclasses.replace(template.peft_config["default"], r=rank, lora_alpha=rank, use_rslora=False)
        with atomic_directory(out_dir) as tmp:
            config.save_pretrained(tmp)
            save_file(tensors, f"{tmp}/adapter_model.safetensors")
        self.export_info = {"export_rank": rank, "export_max_relative_error": max(errors)}
        return self.export_info

    def state_dict(self):
        return {**super().state_dict(), "splits": list(self.splits), "total": {f"{b}.{n}": d for (b, n), d in self.total.items()},
                "base": {f"{b}.{n}": w.detach().clone() for (b, n), w in self.base.items()} if self.folded else None,
                "ranks": [{f"{b}.{n}": r for (b, n), r in ranks.items()} for ranks in self.ranks],
                "tracker": self.tracker.state_dict(), "reference": self.reference,
                "reallocations": self.reallocations, "init_gen": self._init_gen.get_state(),
                "given": {str(cid): g for cid, g in self.given.items()},
                "server_given": {p: list(ab) for p, ab in self.server_given.items()}}

    def load_state_dict(self, state):
        """The splits, ranks and base weights as they were; every client is given its layout again (with
        those base weights), then gets its state back."""
        mod = lambda k: (int(k.split(".", 1)[0]), k.split(".", 1)[1])  # noqa: E731
        self.ranks = [{mod(k): r for k, r in ranks.items()} for ranks in state["ranks"]]
        if state["splits"] != self.splits:
            self.splits = state["splits"]
            self._build_server()
        with torch.no_grad():
            for key, d in state["total"].items():
                self.total[mod(key)] = d.clone()
            for key, w in (state.get("base") or {}).items():
                self.base[mod(key)].copy_(w)
        self.folded = state.get("base") is not None
        self.server_given.update({p: tuple(ab) for p, ab in state.get("server_given", {}).items()})
        self.given.update({int(cid): g for cid, g in state.get("given", {}).items()})   # what they began with
        self.held = {cid: None for cid in self.held}
        self._sync(resume=True)
        super().load_state_dict(state)
        self.tracker.load_state_dict(state["tracker"])
        self.reference, self.reallocations = state["reference"], state["reallocations"]
        self._init_gen.set_state(state["init_gen"])
