"""A training run from a config: build the roles, step the strategy, evaluate, log, checkpoint, export.

Run directory: config.yaml (resolved), metrics.jsonl, summary.json, adapter/ (PEFT), checkpoint/.
Counters in metrics.jsonl (bytes, samples, seconds) are cumulative since the start of the run;
train_loss is the mean over the steps since the previous record; val_* are null between evaluations.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml
from tqdm import tqdm

from . import data as D
from .checkpoint import load_checkpoint, remove_partial, save_checkpoint
from .config import Config, ConfigError, resolve_path
from .errors import Interrupted
from .rundir import StopRequest, carry_metrics, check_output
from .runtime import DTYPES, Runtime, runtime_of
from .cost import CostError, CostModel, Profile, Shapes, load_profiles, resolve
from .build import role_model
from .lora import load_into
from .learning import Loss, OptimConfig, Privacy, lm_loss
from .roles import Client, FedServer
from .split import client_part, full_part, num_layers
from . import strategies
from .strategies.base import Setup, Strategy, make_client
from .transport.local import Link


@dataclass
class Run:
    cfg: Config
    tokenizer: object
    template: object          # PeftModel holding the global adapter for evaluation and export
    strategy: Strategy
    val_features: list[dict]
    cost: CostModel
    partition: list[dict] = field(default_factory=list)   # each client's size and attribute histogram


def load_examples(cfg: Config, tokenizer=None) -> tuple[list[D.Example], list[D.Example]]:
    """(training, validation) examples; `tokenizer` renders chat templates."""
    d = cfg.data
    if d.name == "hf":   # a local dataset: splits of data.path
        from .hfdata import load_hf
        resolved = d.model_copy(update={"path": str(resolve_path("data.path", d.path))})
        load = lambda split: load_hf(resolved, tokenizer, split)  # noqa: E731
        train_at, val_at, val_key = d.split, d.val_split, "data.val_split"
    else:                # E2E or JSONL files
        from .chat import apply
        read = D.load_e2e if d.name == "e2e" else D.load_jsonl
        load = lambda f: apply(read(resolve_path(*f)), tokenizer, d.chat_template)  # noqa: E731
        train_at, val_at, val_key = ("data.train_file", d.train_file), \
            (("data.val_file", d.val_file) if d.val_file else None), "data.val_file"
    train = load(train_at)
    if val_at:
        return train, load(val_at)
    if d.val_fraction == 0:
        raise ConfigError(f"data.val_fraction: 0 with no {val_key} leaves no validation set")
    return D.split_by_group(train, d.val_fraction, cfg.train.seed)


def client_examples(cfg: Config, train_ex: list[D.Example]) -> list[list[D.Example]]:
    """Every client's share of the training examples (data.partition)."""
    d = cfg.data
    try:
        return D.partition(train_ex, cfg.strategy.num_clients, d.partition, cfg.train.seed,
                           attribute=d.partition_attribute, alpha=d.dirichlet_alpha, sizes=d.client_sizes,
                           power_law=d.power_law)
    except D.DataError as e:
        raise D.DataError(f"strategy.num_clients / data.partition: {e}") from None


def client_data(cfg: Config, tokenizer, parts: list[list[D.Example]], only: int | None = None) -> list[list[dict]]:
    """Every client's share (`client_examples`) tokenized (with `only`: just that client's, as a one-element
    list)."""
    ids = range(len(parts)) if only is None else [only]
    feats = [D.tokenize(parts[i], tokenizer, cfg.data.max_length) for i in ids]
    for i, f in zip(ids, feats):
        _nonempty(cfg, f, f"client {i}")
    return feats


def _nonempty(cfg: Config, feats: list, name: str) -> None:
    if not feats:
        raise D.DataError(f"data.max_length: {cfg.data.max_length} tokens leave the {name} without any "
                          "example that keeps a completion token")


def _setup(cfg: Config, template, tokenizer, client_features, remote=None, link=None,
           client_runtimes: list[Runtime] | None = None) -> Setup:
    t = cfg.train
    return Setup(
        template=template, client_features=client_features,
        optim=OptimConfig(t.lr, t.weight_decay, t.warmup_steps, t.max_steps, t.max_grad_norm, t.label_smoothing),
        batch_size=t.batch_size, seed=t.seed, pad_token_id=tokenizer.pad_token_id,
        split_layer=cfg.model.split_layer, num_clients=cfg.strategy.num_clients,
        aggregation_interval=cfg.strategy.aggregation_interval, server_mode=cfg.strategy.server_mode,
        top_layers=cfg.model.top_layers,
        privacy=Privacy(**cfg.privacy.model_dump()),
        link=link if link is not None else Link(cfg.wire.precision), remote=remote,
        fed=FedServer(cfg.strategy.aggregation, cfg.strategy.trim_fraction),
        server_runtime=runtime_of(cfg, "server"), client_runtimes=client_runtimes)


def cost_profiles(cfg: Config) -> tuple[list[Profile], Profile]:
    """(client profiles, one per client or one for all; server profile) as configured under cost."""
    c = cfg.cost
    try:
        profiles = load_profiles(resolve_path("cost.profiles_file", c.profiles_file) if c.profiles_file else None)
        if c.clients is not None and len(c.clients) != cfg.strategy.num_clients:
            raise CostError(f"cost.clients: {len(c.clients)} profiles for {cfg.strategy.num_clients} clients")
        clients = ([resolve(p, profiles, f"cost.clients[{i}]") for i, p in enumerate(c.clients)]
                   if c.clients is not None else [resolve(c.client, profiles, "cost.client")])
        return clients, resolve(c.server, profiles, "cost.server")
    except CostError as e:
        raise ConfigError(str(e)) from None


def cost_model(cfg: Config, template) -> CostModel:
    """The run's cost model: its model's shapes and the configured client and server profiles."""
    clients, server = cost_profiles(cfg)
    return CostModel(Shapes.from_model(template), cfg.model.split_layer, clients, server, cfg.model.top_layers)


def build_run(cfg: Config, hub=None) -> Run:
    """Everything a training run needs. With a `hub` (deployed server), clients are remote: their data
    stays with them and the strategy reaches them through the hub's sessions."""
    torch.manual_seed(cfg.train.seed)
    server = runtime_of(cfg, "server")
    # a deployed server does not resolve its clients' devices: they are other machines'
    clients = [runtime_of(cfg, "client", cid) for cid in range(cfg.strategy.num_clients)] if hub is None else None
    if cfg.model.quantization != "none" and any(c.device != server.device for c in clients or ()):
        raise ConfigError("runtime.client_devices: a quantized base is built on one device; in one simulation the "
                          "clients must share the server's device (a deployment puts each role where it runs)")
    lm, template = role_model(cfg, server)   # the simulator's model, on the server's device
    train_ex, val_ex = load_examples(cfg, lm.tokenizer)
    val = D.tokenize(val_ex, lm.tokenizer, cfg.data.max_length)[: cfg.data.val_max_samples]
    _nonempty(cfg, val, "validation set")
    parts = client_examples(cfg, train_ex)   # the partition, once: for the clients, and for partition.json
    if hub is None:
        setup = _setup(cfg, template, lm.tokenizer, client_data(cfg, lm.tokenizer, parts), client_runtimes=clients)
    else:
        setup = _setup(cfg, template, lm.tokenizer, None, link=hub.stats,
                       remote=_remote_clients(cfg, hub, lm, template, parts, val))
    try:
        cls = strategies.for_config(cfg)
        strategy = cls(setup, **cls.options(cfg))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    partition = D.partition_summary(parts, cfg.data.partition_attribute)
    return Run(cfg, lm.tokenizer, template, strategy, val, cost_model(cfg, template), partition)


def _remote_clients(cfg: Config, hub, lm, template, parts, val_features):
    """The deployed server's (cid, client part) -> RemoteClient: what each client's messages must look
    like, their size limits and value bounds (`limits`), and its share of the data as partitioned here."""
    from .transport.limits import message_limits, value_bounds
    from .transport.checks import Expectations

    counts = [len(f) for f in client_data(cfg, lm.tokenizer, parts)]
    batch = D.collate(val_features[: cfg.train.batch_size], lm.tokenizer.pad_token_id)
    bounds = value_bounds(template, cfg.model.split_layer, cfg.model.top_layers, batch,
                          Privacy(**cfg.privacy.model_dump()), cfg.train.label_smoothing, cfg.deploy.bound_factor,
                          seed=cfg.train.seed)
    config = lm.model.config
    wire = {"fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32}.get(cfg.wire.precision)

    cls = strategies.for_config(cfg)
    depth = cls.client_depth(cfg, num_layers(config))
    deepest = None if depth is None else client_part(template, depth, cfg.model.top_layers)

    def remote(cid, part):
        # a client's activations and gradients arrive in its base dtype, or as the wire precision made them
        act_dtypes = tuple(dict.fromkeys(d for d in (DTYPES[cfg.runtime.dtype], wire) if d is not None))
        shapes = {k: tuple(p.shape) for k, p in part.adapter.items()}
        largest = deepest or part   # what it may hold during the run (a heterogeneous client moves)
        max_bytes, max_header = message_limits(
            config.hidden_size, cfg.train.batch_size, cfg.data.max_length,
            {k: tuple(p.shape) for k, p in largest.adapter.items()}, cls.message_numel(largest, cfg.strategy.num_clients))
        if cfg.deploy.max_message_mb is not None:
            max_bytes = cfg.deploy.max_message_mb << 20
        return hub.configure(cid, Expectations(config.hidden_size, config.vocab_size, cfg.train.batch_size,
                                               cfg.data.max_length, shapes, max_bytes,
                                               labels=cfg.model.top_layers == 0, max_header=max_header,
                                               bounds=bounds, num_samples=counts[cid], act_dtypes=act_dtypes))
    return remote


def client_role(cfg: Config, cid: int) -> Client:
    """The client role a deployed client process runs: its own part and its own data partition.

    A split client materialises only its part (embeddings + blocks [0, k); a U-shaped client also the
    last m blocks and the head): the server's blocks stay meta tensors and are never read from disk
    (a fedlora client needs the whole model).
    """
    if not 0 <= cid < cfg.strategy.num_clients:
        raise ConfigError(f"--client-id: {cid} is not in [0, {cfg.strategy.num_clients})")
    torch.manual_seed(cfg.train.seed)
    cls, u = strategies.for_config(cfg), cfg.model.top_layers
    runtime = runtime_of(cfg, "client", cid)
    depth = cls.client_depth(cfg)
    lm, template = role_model(cfg, runtime) if depth is None else \
        role_model(cfg, runtime, layers=range(depth), head=bool(u), top_layers=u)
    train_ex, _ = load_examples(cfg, lm.tokenizer)
    features = client_data(cfg, lm.tokenizer, client_examples(cfg, train_ex), only=cid)[0]
    depth = cls.client_depth(cfg, num_layers(lm.model.config))
    part = full_part(template) if depth is None else client_part(template, depth, u)
    role = make_client(cid, part, features, _setup(cfg, template, lm.tokenizer, None,
                                                   client_runtimes=[runtime] * cfg.strategy.num_clients))
    role.layout_required = cls.client_layouts   # a new process does no work before the server says what it holds
    # a deployed client's noise must be unknown to the server, which knows the config's seed
    role.noise.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return role


@torch.no_grad()
def validation_loss(run: Run) -> float:
    """Token-mean cross-entropy (no smoothing) of the global model on the validation slice."""
    load_into(run.template, run.strategy.global_adapter())
    return model_loss(run.template, run.val_features, run.tokenizer.pad_token_id, run.cfg.train.eval_batch_size,
                      run.strategy.s.server_runtime)


@torch.no_grad()
def model_loss(model, features: list[dict], pad_id: int, batch_size: int, runtime: Runtime = Runtime()) -> float:
    """Token-mean cross-entropy (no smoothing) of a whole model (eval mode, on `runtime`'s device and
    precision) on tokenized examples."""
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(features), batch_size):
        batch = {k: v.to(runtime.device) for k, v in D.collate(features[i:i + batch_size], pad_id).items()}
        with runtime.compute():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += lm_loss(logits.float(), batch["labels"], 0.0).item() * n
        tokens += n
    return total / max(tokens, 1)


def _loss(x) -> Loss:
    """A pending loss from a checkpoint ([smoothed, ce]; older checkpoints hold the smoothed value alone)."""
    return Loss(*x) if isinstance(x, (list, tuple)) else Loss(x, float("nan"))


@dataclass
class Tally:
    """What the run loop counts (steps, wall and simulated seconds, samples, the last validation loss, the
    training losses since the last record), how it records them (metrics.jsonl) and checkpoints them."""

    run: Run
    out: Path
    start: int = 0
    wall: float = 0.0
    sim: float = 0.0
    samples: int = 0
    last_val: float | None = None
    losses: list = field(default_factory=list)
    board: object = None    # a TensorBoard writer (train.tensorboard)

    def restore(self, state: dict, resume: Path) -> None:
        strategy = self.run.strategy
        strategy.load_state_dict(state["strategy"])
        torch.set_rng_state(state["rng"])
        self.start, self.wall, self.samples = state["step"], state["wall_s"], state["samples_seen"]
        self.last_val, self.sim = state["val_loss"], state.get("sim_s", 0.0)
        self.run.cost.client_flops = state.get("client_flops", 0.0)
        self.losses = [_loss(x) for x in state["pending_losses"]]
        carry_metrics(resume / "metrics.jsonl", self.out / "metrics.jsonl", self.start)

    def record(self, step: int, train_loss: Loss | None, val_loss: float | None) -> dict:
        strategy = self.run.strategy
        client_s, server_s = strategy.compute
        rec = {"step": step, "round": strategy.rounds, "strategy": strategy.name,
               "train_loss": train_loss.smoothed if train_loss else None,
               "train_ce": train_loss.ce if train_loss else None, "val_loss": val_loss,
               "val_ppl": math.exp(val_loss) if val_loss is not None else None,
               "bytes_up": strategy.s.link.bytes_up, "bytes_down": strategy.s.link.bytes_down,
               "samples_seen": self.samples, "wall_s": round(self.wall, 4), "sim_time_s": round(self.sim, 9),
               "client_compute_s": round(client_s, 4), "server_compute_s": round(server_s, 4),
               "live_clients": len(strategy.live()), "dropouts": len(strategy.dropouts),
               "client_flops": self.run.cost.client_flops, "skipped_updates": strategy.skipped_updates,
               "refused_updates": strategy.refused_updates, **strategy.extra_metrics()}
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.board is not None:
            self.board.write(rec)
        return rec

    def checkpoint(self, step: int) -> None:
        save_checkpoint(self.out / "checkpoint", {
            "step": step, "strategy": self.run.strategy.state_dict(), "rng": torch.get_rng_state(),
            "wall_s": self.wall, "sim_s": self.sim, "client_flops": self.run.cost.client_flops,
            "samples_seen": self.samples, "val_loss": self.last_val, "pending_losses": [list(x) for x in self.losses]})

    def summary(self) -> dict:
        """Export the adapter; summary.json: the last record, the validation losses, what the strategy adds."""
        strategy, out = self.run.strategy, self.out
        export_info = strategy.export_to(out / "adapter", self.run.template)
        client_params, server_params = strategy.trainable_counts()
        records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
        vals = [r["val_loss"] for r in records if r["val_loss"] is not None]
        summary = {**records[-1], "initial_val_loss": vals[0] if vals else None, "final_val_loss": self.last_val,
                   "best_val_loss": min(vals) if vals else None, "model": self.run.cfg.model.name,
                   "client_trainable_params": client_params, "server_trainable_params": server_params,
                   "dropout_events": strategy.dropouts, **export_info, **strategy.summary(),
                   "adapter": str(out / "adapter")}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def train(cfg: Config, output: str | Path, resume: str | Path | None = None,
          on_step: Callable[[int], None] | None = None, progress: bool = True, hub=None,
          bar_position: int = 0, overwrite: bool = False, on_built: Callable | None = None) -> dict:
    """Run (or continue) training; returns the summary also written to summary.json. With a `hub`,
    this is the deployed server's run: the same loop, with clients in other processes.

    `output` must be new, empty, the run being resumed, or (with `overwrite`) a run directory to replace;
    it is created only once the run is built, so a config, data or model error leaves nothing behind.
    SIGINT/SIGTERM (main thread) write a checkpoint after the step under way and raise `Interrupted`."""
    out = Path(output)
    check_output(out, resume, overwrite)
    state = load_checkpoint(Path(resume) / "checkpoint") if resume is not None else None
    run = build_run(cfg, hub)
    strategy, tcfg = run.strategy, cfg.train
    if on_built is not None:
        on_built(run)   # the deployed server: listen, and wait for the clients (config, data, model are good)
    if overwrite and out.exists() and not (resume is not None and Path(resume).resolve() == out.resolve()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_partial(out / "checkpoint")   # what interrupted checkpoint writes left
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (out / "partition.json").write_text(json.dumps(run.partition, indent=2))

    tally = Tally(run, out)
    if tcfg.tensorboard:
        from .board import Board
        tally.board = Board(out / "tb", purge_step=state["step"] if state is not None else None)
    if hub is not None:
        hub.start_step = state["step"] if state is not None else 0
        if state is None:   # clients still holding an earlier run's state start over
            for c in strategy.clients:
                strategy.guarded(-1, c, lambda c: c.reset_if_ahead())
    if state is not None:
        tally.restore(state, Path(resume))
    else:
        (out / "metrics.jsonl").write_text("")
        tally.last_val = validation_loss(run)
        tally.record(0, None, tally.last_val)

    bar = tqdm(range(tally.start, tcfg.max_steps), initial=tally.start, total=tcfg.max_steps, desc=strategy.name,
               disable=not progress, dynamic_ncols=True, position=bar_position, leave=bar_position == 0)
    with StopRequest() as stop:
        for t in bar:
            t0 = time.perf_counter()
            loss, n = strategy.step(t)
            if t == tcfg.max_steps - 1:
                strategy.finish(t)
            tally.wall += time.perf_counter() - t0
            tally.sim += run.cost.step_seconds(strategy.take_work())
            tally.samples += n
            tally.losses.append(loss)
            step = t + 1
            last = step == tcfg.max_steps
            val = None
            if step % tcfg.eval_interval == 0 or last:
                val = tally.last_val = validation_loss(run)
            if step % tcfg.log_interval == 0 or val is not None:
                mean = Loss.mean(tally.losses)
                tally.record(step, mean, val)
                bar.set_postfix(loss=f"{mean.smoothed:.3f}", ce=f"{mean.ce:.3f}", val=f"{tally.last_val:.3f}")
                tally.losses = []
            saved = step % tcfg.checkpoint_interval == 0 or last or stop.signal
            if saved:
                tally.checkpoint(step)
            if on_step:
                on_step(step)
            if stop.signal and not last:
                if not saved:
                    tally.checkpoint(step)
                bar.close()
                raise Interrupted(step, out / "checkpoint", stop.signal)
    bar.close()
    return tally.summary()
