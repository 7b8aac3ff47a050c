"""Simulated time: what a run would take on real devices and links.

On one machine every role runs in turn, so wall time cannot show what split learning saves. The cost
model replays each step's work on device and link profiles:
- FLOPs from the model's shapes (`Shapes`, `part_flops`): every linear layer (frozen base weights and
  LoRA factors), the attention products and the LM head, forward and backward, counting only the
  gradients autograd computes (frozen weights get no weight gradient; no input gradient where nothing
  below needs one). Norms, activations, softmax and the optimizer step are left out (< 2 % here).
- bytes from the messages the transport counted in that step (`StepWork.messages`);
- the strategy's schedule (`CostModel.step_seconds`): clients start together; each split client's
  smashed message reaches the server, which takes batches in arrival order; the slowest client ends
  the step; `sl` has one client per step, so its steps are sequential; `fedlora` computes the whole
  model on each client; `cenlora` computes on the server after the clients uploaded their data;
  adapters then go up (in parallel) and the average comes down.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from .contract import UP_KINDS
from .errors import CostError



@dataclass(frozen=True)
class Profile:
    """A device and its network link. `peak_tflops` is dense fp32-equivalent throughput of the part of
    the device that trains; `efficiency` is the fraction of it a small-batch LoRA step reaches."""

    peak_tflops: float
    efficiency: float
    memory_gb: float
    up_mbps: float
    down_mbps: float
    latency_ms: float
    source: str = ""

    @property
    def flops(self) -> float:
        """Effective FLOP/s."""
        return self.peak_tflops * 1e12 * self.efficiency

    def compute_s(self, flops: float) -> float:
        return flops / self.flops


# Presets. Peak throughputs are vendor figures; efficiencies are our assumptions for small-batch training
# (they are what `splitlora calibrate` measures for a real device); links are typical access networks.
_MOBILE = "Ookla Speedtest Global Index, 2024 global medians: mobile ~50 Mbps down / ~10 Mbps up"
_FIXED = "Ookla Speedtest Global Index, 2024 global medians: fixed broadband ~90 Mbps down / ~45 Mbps up"
PROFILES: dict[str, Profile] = {
    "phone": Profile(2.0, 0.10, 8, up_mbps=10, down_mbps=50, latency_ms=40,
                     source="Snapdragon 8 Gen 2 (Adreno 740 GPU) ~2 TFLOPS fp32; 8 GB RAM; " + _MOBILE),
    "edge": Profile(1.28, 0.30, 8, up_mbps=45, down_mbps=90, latency_ms=20,
                    source="NVIDIA Jetson Orin Nano 8GB datasheet: 1024-core Ampere GPU at 625 MHz "
                           "= 1.28 TFLOPS fp32; 8 GB; " + _FIXED),
    "laptop": Profile(3.6, 0.30, 16, up_mbps=45, down_mbps=90, latency_ms=20,
                      source="Apple M2 (10-core GPU) 3.6 TFLOPS fp32 (Apple, 2022); 16 GB; " + _FIXED),
    "gpu-server": Profile(156.0, 0.30, 80, up_mbps=10_000, down_mbps=10_000, latency_ms=1,
                          source="NVIDIA A100 80GB SXM datasheet: 156 TFLOPS TF32 tensor core; "
                                 "80 GB; 10 Gbit/s datacentre uplink"),
}


def load_profiles(path: str | Path | None) -> dict[str, Profile]:
    """The presets plus the named profiles of a YAML/JSON file ({name: {field: value}}), such as the
    one `splitlora calibrate` writes."""
    out = dict(PROFILES)
    if path is None:
        return out
    try:
        tree = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CostError(f"cost.profiles_file: cannot read {path}: {e}") from None
    if not isinstance(tree, dict):
        raise CostError(f"cost.profiles_file: {path} must map profile names to their fields")
    for name, spec in tree.items():
        out[str(name)] = make_profile(spec, f"cost.profiles_file {path}: {name}")
    return out


def make_profile(spec, where: str) -> Profile:
    names = {f.name for f in fields(Profile)}
    if not isinstance(spec, dict) or not set(spec) <= names or not set(spec) >= names - {"source"}:
        raise CostError(f"{where}: a profile needs {sorted(names - {'source'})} (and optionally source)")
    p = Profile(**spec)
    for k in names - {"source"}:
        v = getattr(p, k)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0 or \
                (v == 0 and k != "latency_ms"):
            raise CostError(f"{where}: {k} must be a positive number, not {v!r}")
    return p


def resolve(spec, profiles: dict[str, Profile], where: str) -> Profile:
    """A profile from its name or from a mapping of its fields."""
    if isinstance(spec, str):
        if spec not in profiles:
            raise CostError(f"{where}: unknown profile {spec!r} (known: {', '.join(sorted(profiles))})")
        return profiles[spec]
    return make_profile(spec, where)


# -- FLOPs from shapes ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Linear:
    name: str      # within its block, e.g. self_attn.q_proj
    fan_in: int
    fan_out: int
    rank: int      # LoRA rank, 0 without LoRA
    stage: tuple[int, int] = (0, 0)   # (branch, level) in its block: the family's `stages` (cost model)
    uses: int = 1  # times each token passes it (a mixture of experts: num_experts_per_tok)

    def after(self, other: "Linear") -> bool:
        """This layer reads what `other` computed (a gradient needed by `other` flows through its input)."""
        return other.stage[0] == self.stage[0] and other.stage[1] < self.stage[1]


def _stage(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, tuple) else (0, int(value))


def _linears(module) -> list[tuple[str, int, int, int]]:
    """(name, in, out, LoRA rank) of every Linear/Conv1D in `module` (a LoRA layer counts as its base)."""
    from peft.tuners.lora import LoraLayer

    found = []
    for name, m in module.named_modules():
        if isinstance(m, LoraLayer):
            base, rank = m.get_base_layer(), sum(m.r.values())
        elif ".base_layer" in name or ".lora_" in name or not hasattr(m, "weight") or \
                type(m).__name__ not in ("Linear", "Conv1D"):
            continue
        else:
            base, rank = m, 0
        w = base.weight
        fan_in, fan_out = (w.shape[0], w.shape[1]) if type(base).__name__ == "Conv1D" else (w.shape[1], w.shape[0])
        found.append((name, int(fan_in), int(fan_out), int(rank)))
    return found


@dataclass
class Shapes:
    """What the FLOP count needs to know of a model: its blocks' linear layers (where each sits in its
    block, from the model's family), attention width, the linear layers of the embedding side (OPT's
    projection in) and of the head (LM head, OPT's projection out), hidden size and vocabulary."""

    blocks: list[list[Linear]]
    qkv: tuple[str, str, str]   # the layers that make queries, keys and values (one name thrice if fused)
    attn_dim: int               # heads x head dim of the attention products
    hidden: int
    vocab: int
    embed: list[Linear] = field(default_factory=list)
    head: list[Linear] = field(default_factory=list)

    @classmethod
    def from_model(cls, peft_model) -> Shapes:
        from .families import family_of

        hf = peft_model.get_base_model()
        fam, cfg = family_of(hf.config), hf.config
        stages = {k: _stage(v) for k, v in fam.stages_for(cfg).items()}

        def placed(name, fan_in, fan_out, rank, uses=1):
            if name not in stages:
                raise CostError(f"cost model: family {fam.name} does not say where {name!r} sits in its block "
                                f"(families/: add it to the family's stages)")
            return Linear(name, fan_in, fan_out, rank, stages[name], uses)

        mods = fam.modules(hf)
        blocks = [[placed(*lin) for lin in _linears(block)] + [placed(n, i, o, 0, u) for n, i, o, u in fam.routed(cfg, block)]
                  for block in mods["blocks"]]
        side = {k: [Linear(n or k, i, o, r) for n, i, o, r in _linears(mods[k])]
                for k in (*fam.embed_modules, *fam.head_modules) if k in mods}
        hidden = cfg.hidden_size if hasattr(cfg, "hidden_size") else cfg.n_embd
        heads = cfg.num_attention_heads if hasattr(cfg, "num_attention_heads") else cfg.n_head
        head_dim = getattr(cfg, "head_dim", None) or hidden // heads
        return cls(blocks, fam.qkv, heads * head_dim, hidden, cfg.vocab_size,
                   embed=[lin for k in fam.embed_modules for lin in side.get(k, [])],
                   head=[lin for k in fam.head_modules for lin in side.get(k, [])])


@dataclass
class Flops:
    forward: float = 0.0
    backward: float = 0.0

    @property
    def total(self) -> float:
        return self.forward + self.backward


def part_flops(s: Shapes, start: int, stop: int, head: bool, batch: int, seq: int, input_grad: bool,
               frozen: frozenset = frozenset()) -> Flops:
    """FLOPs of one training pass of blocks [start, stop) (+ the LM head) on a batch x seq batch.

    Per token, a linear layer costs 2·in·out forward and, if its input needs a gradient, 2·in·out
    backward (no weight gradient: frozen). LoRA (rank r) costs 2·r·(in+out) forward; backward, a
    trainable one 2·r·(2·out+in) for the gradients of B, of A·x and of A, and every one 2·r·in more
    for the input gradient (after 2·r·out for that of A·x, if frozen). An expert layer of a mixture of
    experts costs the same per token it routes (num_experts_per_tok per token). The attention products
    cost 4·T·d per token forward (Q·Kᵀ and A·V, full T×T as the kernels compute it) and 2·T·d per
    gradient backward (dQ, dK, dScores, dV, each only if needed). The head's linear layers (the LM head,
    and any projection before it) cost 2·in·out per token each way; the embedding side's (a projection
    after the token embedding), forward only.
    `input_grad`: the part's input needs a gradient (a server part returns it to the client).
    `frozen`: (block, layer name) of LoRA modules that get no gradient (DLoRA's killed adapters).
    Nothing is computed backward below the lowest trainable module (autograd does not go there).
    """
    n = batch * seq
    att = 2 * batch * seq * seq * s.attn_dim          # one T x T product

    def trainable(b, lin):
        return lin.rank > 0 and (b, lin.name) not in frozen

    f = Flops()
    if start == 0:   # the part holds the embeddings
        f.forward += sum(2 * n * lin.fan_in * lin.fan_out for lin in s.embed)
    upstream = input_grad     # something below the current point needs a gradient
    for b in range(start, stop):
        live = [lin for lin in s.blocks[b] if trainable(b, lin)]
        for lin in s.blocks[b]:
            grad_in = upstream or any(lin.after(other) for other in live)
            m = n * lin.uses
            f.forward += 2 * m * lin.fan_in * lin.fan_out
            f.backward += 2 * m * lin.fan_in * lin.fan_out if grad_in else 0
            if lin.rank:
                r = lin.rank
                f.forward += 2 * m * r * (lin.fan_in + lin.fan_out)
                if trainable(b, lin):
                    f.backward += 2 * m * r * (2 * lin.fan_out + lin.fan_in) + (2 * m * r * lin.fan_in if grad_in else 0)
                elif grad_in:
                    f.backward += 2 * m * r * (lin.fan_out + lin.fan_in)
        names = {lin.name: trainable(b, lin) for lin in s.blocks[b]}
        q, k, v = (upstream or names.get(name, False) for name in s.qkv)
        f.forward += 2 * att
        f.backward += att * (q + k + (q or k) + v)
        upstream = upstream or bool(live)
    if head:
        for lin in s.head:
            f.forward += 2 * n * lin.fan_in * lin.fan_out
            f.backward += 2 * n * lin.fan_in * lin.fan_out if upstream else 0
    return f


def counted_flops(part, x, attention_mask) -> tuple[int, int]:
    """(forward, backward) FLOPs torch's FLOP counter sees in one training pass of `part` on `x` (the
    loss: the mean square of its output), less the rotary tables' (inv_freq x positions), which the cost
    model does not price. What `part_flops` must equal, with attention (and experts) in eager mode."""
    from torch.utils.flop_counter import FlopCounterMode

    def counted(fc):
        rotary = sum(sum(ops.values()) for name, ops in fc.get_flop_counts().items() if name.endswith("rotary_emb"))
        return fc.get_total_flops() - rotary

    with FlopCounterMode(display=False) as fc:
        out = part(x, attention_mask)
    forward = counted(fc)
    if not out.requires_grad:
        return forward, 0
    with FlopCounterMode(display=False) as fc:
        out.float().square().mean().backward()
    return forward, counted(fc)


# -- memory -----------------------------------------------------------------------------------------

def part_memory_bytes(total_params: int, trainable: int, s: Shapes, start: int, stop: int, head: bool,
                      batch: int, seq: int) -> int:
    """Estimated training peak of a part in fp32: its weights, the LoRA gradients and AdamW moments,
    and the activations kept for backward, per block 17·H + 2.5·heads·T values per token (Korthikanti
    et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", with heads·head_dim
    = H), plus logits and their gradient when it holds the head. An estimate, not a measurement."""
    n = batch * seq
    heads = max(1, s.attn_dim // 64)
    acts = (stop - start) * n * (17 * s.hidden + 2.5 * heads * seq)
    if head:
        acts += 2 * n * s.vocab
    return int(4 * (total_params + 3 * trainable + acts))


# -- one step's work and its simulated time ---------------------------------------------------------

@dataclass
class StepWork:
    """What one global step did: batch shapes (B, T) of each computation, bytes of each message."""

    split: list[tuple[int, int, int]] = field(default_factory=list)   # (cid, B, T): client fwd, server, client bwd
    local: list[tuple[int, int, int]] = field(default_factory=list)   # (cid, B, T): whole model on the client
    central: list[tuple[int, int]] = field(default_factory=list)      # (B, T): whole model on the server
    messages: list[tuple[int, str, int]] = field(default_factory=list)   # (cid, kind, bytes)
    client_frozen: frozenset = frozenset()   # (block, layer name) of client-side LoRA modules with no gradient
    layouts: dict = field(default_factory=dict)   # cid -> (split layer, Shapes): clients with their own split/ranks

    def bytes_of(self, cid: int, kind: str) -> int:
        return sum(b for c, k, b in self.messages if c == cid and k == kind)


# what each message kind is: the message table (contract.COMMANDS) says it; "data" is cenlora's upload
ROUND_KINDS = ("adapter_up", "adapter_down", "layout")   # at aggregations: after the step's batches
STEP_KINDS = ("data", "smashed", "server_activations", "top_grad", "grad")   # within a step (see step_seconds)


class CostModel:
    """Simulated seconds of each step for one run: its model shapes, split layer and profiles."""

    def __init__(self, shapes: Shapes, split_layer: int, clients: list[Profile], server: Profile, top_layers: int = 0):
        self.s, self.k, self.clients, self.server, self.m = shapes, split_layer, clients, server, top_layers
        self.layers = len(shapes.blocks)
        self.client_lora = frozenset((b, lin.name) for b in range(split_layer) for lin in shapes.blocks[b] if lin.rank)
        self.client_flops = 0.0   # device FLOPs simulated so far (every client's)
        self._cache: dict = {}
        self._shapes: dict = {}

    def _flops(self, which: str, b: int, t: int, frozen: frozenset = frozenset(), layout=None) -> Flops:
        k, s = layout or (self.k, self.s)
        key = (which, b, t, frozen, k, id(s))
        top = self.layers - self.m
        if key not in self._cache:
            grad = layout is not None or not self.client_lora <= frozen   # the client's bottom trains
            if which == "middle":
                self._cache[key] = part_flops(s, k, top, False, b, t, input_grad=grad)
            elif which == "top":
                self._cache[key] = part_flops(s, top, self.layers, True, b, t, input_grad=True, frozen=frozen)
            elif which == "client":
                self._cache[key] = part_flops(s, 0, k, False, b, t, input_grad=False, frozen=frozen)
            elif which == "server":   # the activation gradient only for a client with something to train
                self._cache[key] = part_flops(s, k, self.layers, True, b, t, input_grad=grad)
            else:
                self._cache[key] = part_flops(s, 0, self.layers, True, b, t, input_grad=False)
            self._shapes[id(s)] = s   # held, so the id in the key stays this object's
        return self._cache[key]

    def client(self, cid: int) -> Profile:
        return self.clients[cid % len(self.clients)]

    def transfer_s(self, cid: int, kind: str, nbytes: int) -> float:
        """Seconds for one message between client `cid` and the server (latency of both ends)."""
        if nbytes == 0:
            return 0.0
        c = self.client(cid)
        mbps = min(c.up_mbps, self.server.down_mbps) if kind in UP_KINDS else min(self.server.up_mbps, c.down_mbps)
        return (c.latency_ms + self.server.latency_ms) / 1e3 + nbytes * 8 / (mbps * 1e6)

    def step_seconds(self, w: StepWork) -> float:
        cids = sorted({c for c, _, _ in w.messages})
        t = max((self.transfer_s(c, "data", w.bytes_of(c, "data")) for c in cids), default=0.0)
        t += sum(self.server.compute_s(self._flops("whole", b, n).total) for b, n in w.central)
        t += max((self.client(c).compute_s(self._flops("whole", b, n).total) for c, b, n in w.local), default=0.0)
        self.client_flops += sum(self._flops("whole", b, n).total for _, b, n in w.local)
        if w.split:   # clients in parallel; the server takes the batches in arrival order
            def fl(which, c, b, n):
                return self._flops(which, b, n, w.client_frozen, w.layouts.get(c))

            arrivals = sorted((self.client(c).compute_s(fl("client", c, b, n).forward)
                               + self.transfer_s(c, "smashed", w.bytes_of(c, "smashed")), c, b, n)
                              for c, b, n in w.split)
            free, done = 0.0, []
            for arrive, c, b, n in arrivals:
                cp = self.client(c)
                if self.m:   # U-shape: the server holds a client's batch from its middle forward to backward
                    mid = fl("middle", c, b, n)
                    free = (max(arrive, free) + self.server.compute_s(mid.forward)
                            + self.transfer_s(c, "server_activations", w.bytes_of(c, "server_activations"))
                            + cp.compute_s(fl("top", c, b, n).total)
                            + self.transfer_s(c, "top_grad", w.bytes_of(c, "top_grad"))
                            + self.server.compute_s(mid.backward))
                else:
                    free = max(arrive, free) + self.server.compute_s(fl("server", c, b, n).total)
                done.append(free + self.transfer_s(c, "grad", w.bytes_of(c, "grad"))
                            + cp.compute_s(fl("client", c, b, n).backward))
            t += max(done)
            self.client_flops += sum(fl("client", c, b, n).total + (fl("top", c, b, n).total if self.m else 0)
                                     for c, b, n in w.split)
        for kind in ROUND_KINDS:
            t += max((self.transfer_s(c, kind, w.bytes_of(c, kind)) for c in cids), default=0.0)
        return t


def write_profiles(path: str | Path, profiles: dict[str, Profile]) -> None:
    Path(path).write_text(json.dumps({k: asdict(v) for k, v in profiles.items()}, indent=2))
