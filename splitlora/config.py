"""Run configuration: YAML files plus `--set key=value` overrides, validated into typed sections.

Every error is a `ConfigError` whose one-line message names the key (or file) at fault.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("splitlora")
MAX_CONFIG_BYTES = 1 << 20



class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    name: str = "smollm2-135m-instruct"
    split_layer: int = Field(3, ge=1)
    top_layers: int = Field(0, ge=0)   # m > 0: U-shaped split; the client also holds the last m blocks + head
    quantization: Literal["none", "int8", "nf4"] = "none"      # of the frozen base weights (QLoRA)
    quantize: Literal["server", "client", "both"] = "both"     # which side's base weights are quantized


class RuntimeSection(_Section):
    """Where and in what precision each role computes (splitlora/runtime.py)."""

    device: str = "auto"                       # auto (cuda, else mps, else cpu), cpu, cuda, cuda:N, mps
    server_device: str | None = None           # the main server's; default: device
    client_devices: str | list[str] | None = None   # one for all clients, or one per client; default: device
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"          # frozen base weights, loaded directly in it
    autocast: Literal["none", "bf16", "fp16"] = "none"       # mixed-precision compute on both sides
    gradient_checkpointing: bool = False       # recompute each block in backward (client and server parts)


class LoraSection(_Section):
    rank: int = Field(4, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] | None = None   # None: the family's attention query and value
    rslora: bool = False


class DataSection(_Section):
    name: Literal["e2e", "jsonl", "hf"] = "e2e"
    train_file: str = "data/e2e/devset.csv"   # e2e, jsonl
    val_file: str | None = None               # None: hold out val_fraction of train groups (by MR)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    val_max_samples: int = Field(64, ge=1)
    max_length: int = Field(128, ge=8)
    # hf: a local dataset through `datasets` (hfdata.py): files or a save_to_disk directory, a split
    # (`train`, `train[:90%]`), an optional validation split, a format (formats/) and its column names
    path: str | None = None
    split: str = "train"
    val_split: str | None = None              # None: hold out val_fraction of the split's groups
    format: str = "prompt_completion"         # prompt_completion, alpaca, messages, text
    fields: dict[str, str] = {}               # the format's key -> the dataset's column
    max_samples: int | None = Field(None, ge=1)   # keep only the first N rows (the rest is never read)
    chat_template: Literal["auto", "none"] = "none"   # auto: the tokenizer's template, loss on assistant turns
    # iid; dirichlet over partition_attribute (any column); attribute: one client per value; quantity:
    # IID content, client sizes from client_sizes (relative) or a seeded power law (exponent power_law)
    partition: Literal["iid", "dirichlet", "attribute", "quantity"] = "iid"
    partition_attribute: str = "food"
    dirichlet_alpha: float = Field(0.5, gt=0)
    client_sizes: list[float] | None = None
    power_law: float = Field(1.5, gt=0)

    @field_validator("format")
    @classmethod
    def _known_format(cls, name: str) -> str:
        from .formats import NAMES

        if name not in NAMES:
            raise ValueError(f"unknown data format {name!r} (known: {', '.join(NAMES)})")
        return name

    @model_validator(mode="after")
    def _hf_needs_a_path(self):
        if self.name == "hf" and not self.path:
            raise ValueError("data.path: data.name hf reads a local dataset; give its file or directory")
        return self


class StrategySection(_Section):
    name: str = "splitlora"   # a strategy of the registry (splitlora/strategies/: one file each, or a plug-in)
    num_clients: int = Field(3, ge=1)
    aggregation_interval: int = Field(100, ge=1)
    server_mode: Literal["shared", "per_client"] = "shared"
    # how client adapters are combined (splitlora/robust.py): fedavg, clipped (update-norm clipping),
    # median or trimmed_mean (coordinate-wise; trim_fraction of the clients dropped at each end)
    aggregation: Literal["fedavg", "clipped", "median", "trimmed_mean"] = "fedavg"
    trim_fraction: float = Field(0.2, ge=0, lt=0.5)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from .strategies import available   # the package's file names and the plug-ins: no torch

        if name not in available():
            raise ValueError(f"unknown strategy {name!r} (known: {', '.join(available())})")
        return name


class TrainSection(_Section):
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, ge=0)
    seed: int = 0
    eval_interval: int = Field(100, ge=1)
    eval_batch_size: int = Field(8, ge=1)
    log_interval: int = Field(10, ge=1)
    checkpoint_interval: int = Field(100, ge=1)
    tensorboard: bool = False   # also write metrics.jsonl's scalars to RUN_DIR/tb/ (torch.utils.tensorboard)


class WireSection(_Section):
    precision: Literal["fp32", "fp16", "bf16", "int8"] = "fp32"   # activations and their gradients


class DeploySection(_Section):
    timeout_s: float = Field(120.0, gt=0)        # a client that does not answer in time leaves the round
    join_timeout_s: float = Field(600.0, gt=0)   # how long the server waits for all clients at start
    retries: int = Field(20, ge=0)               # client reconnection attempts (exponential backoff)
    max_backoff_s: float = Field(30.0, gt=0)     # the longest wait between two attempts
    max_message_mb: int | None = Field(None, ge=1)   # None: from the model's sizes (the largest expected message)
    bound_factor: float = Field(100.0, gt=1)     # activations/gradients up to this x what the model produces
    hello_timeout_s: float = Field(10.0, gt=0)   # a new session must say hello within this time
    max_pending_sessions: int = Field(2, ge=1)   # sessions per client certificate still waiting for hello


class PrivacySection(_Section):
    """Defense on what clients send: smashed activations, and under the U-shape the gradient up."""

    clip_norm: float | None = Field(None, gt=0)    # per-example L2 clipping; None: no clipping, no noise
    noise_multiplier: float = Field(0.0, ge=0)     # Gaussian noise std = noise_multiplier x clip_norm
    grad_clip_norm: float | None = Field(None, gt=0)   # the same for the gradient a U-shaped client sends up
    grad_noise_multiplier: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _noise_needs_clip(self):
        for noise, clip in (("noise_multiplier", "clip_norm"), ("grad_noise_multiplier", "grad_clip_norm")):
            if getattr(self, noise) > 0 and getattr(self, clip) is None:
                raise ValueError(f"privacy.{noise} needs privacy.{clip} (the noise is scaled by it)")
        return self


class DloraSection(_Section):
    """Kill & Revive of client-side adapters (strategy `dlora`; see splitlora/strategies/dlora.py)."""

    warmup_steps: int = Field(20, ge=0)        # every adapter trains this long before any is killed
    threshold: float = Field(0.05, ge=0)       # relative change per aggregation interval below which it is killed
    revive_interval: int = Field(100, ge=1)    # every this many steps all killed adapters train again


class HsplitSection(_Section):
    """Heterogeneous clients (strategies `hsplitlora`, `hetlora`; see splitlora/strategies/hsplitlora.py). Budgets are
    the clients' device profiles (`cost.clients`)."""

    client_step_s: float = Field(1.0, gt=0)        # client compute per step a device may spend (sets its split)
    rank: int = Field(4, ge=1)                     # mean LoRA rank per module on the strongest client (<= lora.rank)
    min_split_layer: int = Field(1, ge=1)
    max_split_layer: int = Field(6, ge=1)
    realloc_threshold: float = Field(0.1, ge=0)    # total-variation shift of importance that re-decides ranks
    importance_beta: float = Field(0.85, ge=0, lt=1)
    export_tolerance: float = Field(1e-4, gt=0)    # relative error allowed when exporting the total update
    # how adapters of different ranks are combined (docs/methods.md): stack_fold, stack_svd, stack_keep
    # (hsplitlora) or zero_pad (HetLoRA: strategy hetlora); none: the strategy's own default
    aggregation: Literal["stack_fold", "stack_svd", "stack_keep", "zero_pad"] | None = None


ProfileSpec = str | dict[str, float | str]   # a profile name (cost.PROFILES, profiles_file) or its fields


class CostSection(_Section):
    """Device and link profiles for simulated time (see splitlora/cost.py)."""

    client: ProfileSpec = "edge"
    clients: list[ProfileSpec] | None = None      # one per client; overrides `client`
    server: ProfileSpec = "gpu-server"
    profiles_file: str | None = None               # more named profiles, e.g. from `splitlora calibrate`


class Config(_Section):
    model: ModelSection = ModelSection()
    lora: LoraSection = LoraSection()
    data: DataSection = DataSection()
    strategy: StrategySection = StrategySection()
    train: TrainSection = TrainSection()
    wire: WireSection = WireSection()
    deploy: DeploySection = DeploySection()
    cost: CostSection = CostSection()
    dlora: DloraSection = DloraSection()
    hsplit: HsplitSection = HsplitSection()
    privacy: PrivacySection = PrivacySection()
    runtime: RuntimeSection = RuntimeSection()

    @model_validator(mode="after")
    def _fp16_training(self):
        """fp16 training across a split needs dynamic loss scaling that the client's backward and the
        server's step agree on (an overflow on either side must skip the step on every role); splitlora
        trains in bf16, whose range is fp32's, instead."""
        r = self.runtime
        if "fp16" in (r.dtype, r.autocast):
            raise ValueError("runtime.dtype / runtime.autocast: fp16 training is not supported across the split "
                             "(it needs loss scaling shared by every role); use bf16")
        if isinstance(r.client_devices, list) and len(r.client_devices) != self.strategy.num_clients:
            raise ValueError(f"runtime.client_devices: {len(r.client_devices)} devices for "
                             f"{self.strategy.num_clients} clients")
        return self

    @model_validator(mode="after")
    def _warmup_fits(self):
        """A short run (`--set train.max_steps=2` on a shipped config) just works: warm-up is clamped."""
        t = self.train
        if t.warmup_steps >= t.max_steps:
            clamped = t.max_steps - 1
            log.warning(f"train.warmup_steps: {t.warmup_steps} is not below train.max_steps ({t.max_steps}); "
                        f"using {clamped}")
            t.warmup_steps = clamped
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def _one_line(err: ValidationError, source: str, overrides: dict[str, str]) -> str:
    """One line naming each bad key, and where its value came from: the `--set` that gave it, else the file."""
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = "unknown config key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        given = next((item for dotted, item in overrides.items()
                      if key and (key == dotted or key.startswith(dotted + ".") or dotted.startswith(key + "."))),
                     None)
        where = f"--set {given}" if given else source
        parts.append(f"{where}: {key}: {msg}" if key else f"{where}: {msg}")
    return "; ".join(parts)


def _set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read YAML `path` (optional), apply `key=value` overrides (values parsed as YAML), validate."""
    tree: dict = {}
    source = "config"
    if path is not None:
        source = str(path)
        try:
            size = Path(path).stat().st_size
            if size > MAX_CONFIG_BYTES:
                raise ConfigError(f"--config: {path} is {size / 2**20:.1f} MiB; a config is at most "
                                  f"{MAX_CONFIG_BYTES >> 20} MiB (is this the right file?)")
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"--config: file not found: {path}") from None
        except (UnicodeDecodeError, IsADirectoryError) as e:
            raise ConfigError(f"--config: {path} is not a YAML text file ({type(e).__name__})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    given: dict[str, str] = {}   # dotted key -> the --set item that gave it
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
        _set(tree, key.strip(), value)
        given[key.strip()] = item
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_one_line(e, source, given)) from None


def resolve_path(field: str, value: str) -> Path:
    """A data path as given, else relative to the repository (so runs work from any directory)."""
    for candidate in (Path(value), REPO_ROOT / value):
        if candidate.exists():
            return candidate
    raise ConfigError(f"{field}: file not found: {value}")
