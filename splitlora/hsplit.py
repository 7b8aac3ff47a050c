"""Heterogeneous clients (HSplitLoRA, arXiv 2505.02795) and the HetLoRA-style baseline, as strategies.

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

`hsplitlora`: noise-free aggregation. Per module, the copies are stacked (`hetero.stack`) into
ΔW = Σ_i p_i s B_i A_i exactly; ΔW is folded into the frozen base weight, which every copy shares,
every copy's B restarts at zero (A keeps what it learned, so ΔW restarts at zero too), and the fed
server adds ΔW to the run's total update. Nothing is truncated, so nothing is lost; clients download the
stacked factors of their modules. The importance of each module, Σ|W ⊙ ΔW| per round (EMA), decides
ranks again when its distribution moved by more than `hsplit.realloc_threshold` (total variation);
since every adapter restarts at each aggregation anyway, re-deciding loses no trained adapter. The
exported adapter is the total update as a PEFT adapter of the rank it needs (`hsplit.export_tolerance`).
`hetlora`: the same clients, ranks and splits, with A and B averaged separately over the zero-padded
copies (FedAvg of the masked tensors); each copy keeps its first r components.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from safetensors.torch import save_file

from . import hetero
from .checkpoint import atomic_directory
from .cost import Profile, Shapes, part_flops, part_memory_bytes
from .split import ModelPart, UPart, family_of, make_part
from .roles import Client, MainServer
from .strategies import _MODULE_KEY, STRATEGIES, SplitLoRA


def _modules(part: ModelPart) -> dict[tuple[int, str], tuple[torch.nn.Parameter, torch.nn.Parameter, str]]:
    """(block, layer name) -> (A, B, PEFT key prefix) of a part's LoRA modules."""
    out = {}
    for key, p in part.adapter.items():
        m = _MODULE_KEY.search(key)
        mod = (int(m.group(1)), m.group(2))
        a, b, prefix = out.get(mod, (None, None, key.rsplit(".lora_", 1)[0]))
        out[mod] = (p, b, prefix) if ".lora_A." in key else (a, p, prefix)
    return out


def _view(part: ModelPart, start: int) -> ModelPart:
    """Blocks [start, part.stop) of a server part, sharing its modules and LoRA parameters."""
    blocks = [None] * part.start + list(part.blocks)
    view = ModelPart(part.family, part.config, {**dict(part.mods), "blocks": blocks}, start, part.stop, {})
    view.adapter = {k: p for k, p in part.adapter.items() if int(_MODULE_KEY.search(k).group(1)) >= start}
    return view


class HSplitLoRA(SplitLoRA):
    name = "hsplitlora"

    def __init__(self, setup, profiles: list[Profile], batch_size: int, max_length: int, rank: int = 4,
                 client_step_s: float = 1.0, min_split_layer: int = 1,
                 max_split_layer: int = 6, realloc_threshold: float = 0.1, importance_beta: float = 0.85,
                 export_tolerance: float = 1e-4):
        if setup.remote is not None:
            raise ValueError(f"strategy.name: {self.name} runs in the simulator only")
        super().__init__(setup)   # a uniform split at model.split_layer; replaced below
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
        self.base = self._base_weights()
        self.total = {mod: torch.zeros(out, inp) for mod, (inp, out) in self._module_shapes().items()}
        self.reallocations: list[dict] = []
        self._init_gen = torch.Generator().manual_seed(setup.seed * 7919 + 1)
        self.splits = [self._split_for(p) for p in self.profiles]
        self.ranks = [self._ranks_for(i, {}) for i in range(setup.num_clients)]
        self._build()

    # -- budgets --------------------------------------------------------------------------------------
    def _module_shapes(self) -> dict[tuple[int, str], tuple[int, int]]:
        return {(b, lin.name): (lin.fan_in, lin.fan_out) for b in range(self.layers)
                for lin in self.shapes.blocks[b] if lin.rank}

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
        shapes = {mod: s for mod, s in self._module_shapes().items() if self._client_side(cid, mod[0])}
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
        """The frozen base weight of every LoRA target, as [out, in] views (GPT-2's Conv1D stores [in, out]),
        shared by every part built from the template."""
        hf = self.s.template.get_base_model()
        blocks = family_of(hf.config).modules(hf)["blocks"]
        out = {}
        for mod in self._module_shapes():
            w = blocks[mod[0]].get_submodule(mod[1]).base_layer.weight
            out[mod] = w.T if self.shapes.family == "gpt2" else w
        return out

    def _build(self) -> None:
        """Client parts at their splits, one server part from the shallowest split, fresh LoRA at each
        copy's rank, and the masks that keep every copy at its rank. Data streams and compute counters
        carry over (the parts are rebuilt when a split changes)."""
        for i, c in enumerate(self.clients):
            part = make_part(self.s.template, 0, self.splits[i])
            if self.top < self.layers:
                part = UPart(part, make_part(self.s.template, self.top, self.layers))
            part = part.replicate()
            old, c.client = c.client, Client(i, part, c.client.stream, self.s.optim, self.s.privacy, self.s.seed,
                                             self.s.server_runtime)
            c.client.compute_s, c.client.noise = old.compute_s, old.noise
        server = make_part(self.s.template, min(self.splits), self.top).replicate()
        compute_s = self.server.compute_s
        self.server = MainServer([server], self.s.optim, self.s.server_runtime, self.s.seed)
        self.server.compute_s = compute_s
        self.server.views = {i: _view(server, k) for i, k in enumerate(self.splits)}
        self._reset()

    def _copies(self):
        """(owner, part, {module: rank}) of every LoRA copy: each client's, then the server's (owner -1)."""
        for i, c in enumerate(self.clients):
            yield i, c.client.part, self.ranks[i]
        server = self.server.learners[0].part
        yield -1, server, {mod: self.max_rank for mod in _modules(server)}

    @torch.no_grad()
    def _reset(self) -> None:
        """After a fold every copy's update restarts at zero: B = 0 (and its optimizer moments), while A
        keeps what it learned (ΔW = s·B·A is 0 either way). Rows of A a copy newly holds (its rank grew, or
        a new part) get LoRA's init; rows beyond its rank are zeroed."""
        learners = [c.client.learner for c in self.clients] + self.server.learners
        for _, part, ranks in self._copies():
            for mod, (a, b, _) in _modules(part).items():
                r = ranks[mod]
                live = int((a.abs().sum(dim=1) > 0).sum())   # rows trained so far (a prefix)
                if r > live:
                    bound = 1 / math.sqrt(a.shape[1])   # kaiming_uniform(a=sqrt(5)), PEFT's default for A
                    a[live:r] = (torch.rand(r - live, a.shape[1], generator=self._init_gen) * 2 - 1) * bound
                a[r:] = 0
                b.zero_()
                for learner in learners:
                    learner.optimizer.state.pop(b, None)
                    if r != live:
                        learner.optimizer.state.pop(a, None)
        self._mask()

    def _mask(self) -> None:
        """Gradient masks that keep each copy's components beyond its rank at zero."""
        for _, part, ranks in self._copies():
            for mod, (a, b, _) in _modules(part).items():
                r = ranks[mod]
                for p, keep in ((a, (slice(0, r),)), (b, (slice(None), slice(0, r)))):
                    mask = torch.zeros_like(p)
                    mask[keep] = 1
                    if hasattr(p, "_rank_hook"):
                        p._rank_hook.remove()
                    p._rank_hook = p.register_hook(lambda g, m=mask: g * m)

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

    def step(self, t):
        result = super().step(t)
        self.work.layouts = self.layouts()
        return result

    # -- aggregation ----------------------------------------------------------------------------------
    def aggregate(self, t):
        live = [c.cid for c in self.live()]
        p = {cid: self.clients[cid].num_samples for cid in live}
        client_mods = [_modules(c.client.part) for c in self.clients]
        server_mods = _modules(self.server.learners[0].part)
        for cid in live:   # uploads: each client's own modules at its rank
            self.s.link.up(self._at_rank(cid, client_mods[cid]), cid, "adapter_up")
        deltas = {}
        for mod in self.total:
            copies = {}   # id(copy) -> (A, B, weight)
            for cid in live:
                a, b, _ = client_mods[cid][mod] if mod in client_mods[cid] else server_mods[mod]
                r = self.ranks[cid][mod] if mod in client_mods[cid] else self.max_rank
                _, _, w = copies.get(id(a), (None, None, 0.0))
                copies[id(a)] = (a.detach()[:r], b.detach()[:, :r], w + p[cid])
            deltas[mod] = self._combine(mod, list(copies.values()))
        self._update_importance(deltas)
        for c in self.clients:   # downloads: the stacked factors of the client's modules
            if getattr(c, "connected", True):
                self._send_down(c.cid, deltas, client_mods[c.cid])
                self.dropped.discard(c.cid)
        self.rounds += 1
        return {}

    def _at_rank(self, cid: int, mods) -> dict[str, torch.Tensor]:
        """A client's adapter message: each of its modules' A and B cut to the client's rank."""
        out = {}
        for mod, (a, b, prefix) in mods.items():
            r = self.ranks[cid][mod]
            out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = a.detach()[:r], b.detach()[:, :r]
        return out

    def _combine(self, mod, copies):
        """Noise-free: stack, fold ΔW into the shared base, add it to the total; the copies restart."""
        A, B = hetero.stack([(a, b, self.scaling) for a, b, _ in copies], [w for _, _, w in copies])
        delta = B @ A
        with torch.no_grad():
            self.base[mod].add_(delta)
        self.total[mod] += delta
        return (A, B)

    def _send_down(self, cid, deltas, mods) -> None:
        down = {}
        for mod, (_, _, prefix) in mods.items():
            A, B = deltas[mod]
            down[f"{prefix}.stacked_A"], down[f"{prefix}.stacked_B"] = A, B
        if down:
            self.s.link.down(down, cid, "adapter_down")

    def _update_importance(self, deltas) -> None:
        """Σ|W ⊙ ΔW| of each module this round (EMA); ranks re-decided when its distribution moved."""
        for mod, (A, B) in deltas.items():
            self.tracker.update(f"{mod[0]}.{mod[1]}", hetero.taylor_importance(self.base[mod], B @ A))
        scores = self.tracker.scores()
        if not self.reference or self.tracker.shifted(self.reference, self.realloc_threshold):
            self.reference = dict(scores)
            self.ranks = [self._ranks_for(i, scores) for i in range(len(self.clients))]
            splits = [self._split_for(p, self.layouts()[i][1], strict=False) for i, p in enumerate(self.profiles)]
            event = {"step": self.t + 1}
            if splits != self.splits:   # every update was just folded into the base: nothing is lost
                self.splits = event["splits"] = splits
                self.ranks = [self._ranks_for(i, scores) for i in range(len(self.clients))]
                self._build()
            self.reallocations.append({**event, "mean_ranks": self.mean_ranks()})
        self._reset()

    # -- reporting and export -------------------------------------------------------------------------
    def mean_ranks(self) -> list[float]:
        return [sum(r.values()) / max(1, len(r)) for r in self.ranks]

    def client_trainable(self, cid: int) -> int:
        shapes = self._module_shapes()
        return sum(r * sum(shapes[mod]) for mod, r in self.ranks[cid].items())

    def trainable_counts(self):
        server = sum(self.max_rank * sum(s) for mod, s in self._module_shapes().items()
                     if min(self.splits) <= mod[0] < self.top)
        return max(self.client_trainable(i) for i in range(len(self.clients))), server

    def extra_metrics(self) -> dict:
        return {"client_splits": list(self.splits), "client_mean_ranks": [round(r, 3) for r in self.mean_ranks()]}

    def global_adapter(self):
        """The template's own (untrained, B = 0) adapter: after an aggregation every update is in the base."""
        return make_part(self.s.template, 0, self.layers).adapter_state()

    def export_to(self, out_dir) -> dict:
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
        prefixes = {mod: prefix for mod, (_, _, prefix) in _modules(make_part(template, 0, self.layers)).items()}
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
                "ranks": [{f"{b}.{n}": r for (b, n), r in ranks.items()} for ranks in self.ranks],
                "tracker": self.tracker.state_dict(), "reference": self.reference,
                "reallocations": self.reallocations, "init_gen": self._init_gen.get_state()}

    def load_state_dict(self, state):
        if state["splits"] != self.splits:   # parts as they were at the checkpoint, then their state
            self.splits = state["splits"]
            self.ranks = [{(int(k.split(".", 1)[0]), k.split(".", 1)[1]): r for k, r in ranks.items()}
                          for ranks in state["ranks"]]
            self._build()
        super().load_state_dict(state)
        with torch.no_grad():
            for key, d in state["total"].items():
                b, n = key.split(".", 1)
                mod = (int(b), n)
                self.base[mod].add_(d - self.total[mod])
                self.total[mod] = d.clone()
        self.ranks = [{(int(k.split(".", 1)[0]), k.split(".", 1)[1]): r for k, r in ranks.items()}
                      for ranks in state["ranks"]]
        self.tracker.load_state_dict(state["tracker"])
        self.reference, self.reallocations = state["reference"], state["reallocations"]
        self._init_gen.set_state(state["init_gen"])
        self._mask()


class HetLoRA(HSplitLoRA):
    """The HetLoRA-style baseline: same clients, ranks and splits; A and B averaged separately over the
    zero-padded copies (weighted by the samples of the clients that trained through each copy), each
    copy keeping its first r components. No folding: the base stays the pretrained one."""

    name = "hetlora"

    def _padded_average(self, mod, live, client_mods, server_mods):
        p = {cid: self.clients[cid].num_samples for cid in live}
        total = sum(p.values())
        a_bar = b_bar = 0
        for cid in live:
            a, b, _ = client_mods[cid][mod] if mod in client_mods[cid] else server_mods[mod]
            a_bar = a_bar + p[cid] / total * a.detach()
            b_bar = b_bar + p[cid] / total * b.detach()
        return a_bar, b_bar

    def aggregate(self, t):
        live = [c.cid for c in self.live()]
        client_mods = [_modules(c.client.part) for c in self.clients]
        server_mods = _modules(self.server.learners[0].part)
        for cid in live:
            self.s.link.up(self._at_rank(cid, client_mods[cid]), cid, "adapter_up")
        averages = {mod: self._padded_average(mod, live, client_mods, server_mods) for mod in self.total}
        with torch.no_grad():
            for _, part, ranks in self._copies():
                for mod, (a, b, _) in _modules(part).items():
                    r = ranks[mod]
                    a.zero_()
                    b.zero_()
                    a[:r], b[:, :r] = averages[mod][0][:r], averages[mod][1][:, :r]
        for c in self.clients:
            self.s.link.down(self._at_rank(c.cid, client_mods[c.cid]), c.cid, "adapter_down")
        self.rounds += 1
        return {}

    def global_adapter(self):
        live = [c.cid for c in self.live()]
        client_mods = [_modules(c.client.part) for c in self.clients]
        server_mods = _modules(self.server.learners[0].part)
        out = {}
        for mod, (_, _, prefix) in _modules(make_part(self.s.template, 0, self.layers)).items():
            a, b = self._padded_average(mod, live, client_mods, server_mods)
            out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = a.clone(), b.clone()
        return out

    def export_to(self, out_dir) -> dict:
        from .lora import export_adapter

        export_adapter(self.s.template, self.global_adapter(), out_dir)
        return {}


STRATEGIES.update({HSplitLoRA.name: HSplitLoRA, HetLoRA.name: HetLoRA})
