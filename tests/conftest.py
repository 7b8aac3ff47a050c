"""Shared helpers: a tiny E2E data file, tiny YAML run configs, and readers for run directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from splitlora.config import Config, load_config
from splitlora.train import train

# The tiny models are far too small to gain from intra-op threads, and OpenMP threads that spin on a
# busy 2-core machine make every matmul take a scheduler quantum (~100x slower). One thread is also
# what makes the whole suite's timing predictable.
torch.set_num_threads(1)

E2E_DEV = Path(__file__).resolve().parents[1] / "data" / "e2e" / "devset.csv"
N_ROWS = 40  # the first 40 dev rows: 6 meaning representations (groups), one of them held out for val
SEED = 7     # not 0, so that a run ignoring train.seed somewhere would be caught


@pytest.fixture(scope="session")
def e2e_file(tmp_path_factory) -> Path:
    """A small E2E csv (header + the first N_ROWS rows of the real dev set)."""
    lines = E2E_DEV.read_text(encoding="utf-8").splitlines(keepends=True)
    path = tmp_path_factory.mktemp("data") / "small.csv"
    path.write_text("".join(lines[: N_ROWS + 1]), encoding="utf-8")
    return path


def config_tree(data_file: Path, overrides: dict | None = None) -> dict:
    """The base tiny config as a nested dict, with dotted-key `overrides` applied."""
    tree = {
        "model": {"name": "tiny-llama", "split_layer": 2},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        # the tiny models use a byte tokenizer: E2E prompt + completion is ~100-200 tokens
        "data": {"name": "e2e", "train_file": str(data_file), "max_length": 256, "val_fraction": 0.2,
                 "val_max_samples": 8},
        "strategy": {"name": "splitlora", "num_clients": 2, "aggregation_interval": 2,
                     "server_mode": "shared"},
        "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-2, "seed": SEED, "eval_interval": 100,
                  "eval_batch_size": 8, "log_interval": 1, "checkpoint_interval": 100},
    }
    for dotted, value in (overrides or {}).items():
        *sections, key = dotted.split(".")
        node = tree
        for s in sections:
            node = node.setdefault(s, {})
        node[key] = value
    return tree


def write_config(directory: Path, data_file: Path, overrides: dict | None = None,
                 name: str = "config.yaml") -> Path:
    path = Path(directory) / name
    path.write_text(yaml.safe_dump(config_tree(data_file, overrides), sort_keys=False))
    return path


@pytest.fixture
def make_config(tmp_path, e2e_file):
    """make_config({"train.max_steps": 6, ...}) -> a validated Config (written to tmp_path first)."""
    counter = iter(range(1000))

    def make(overrides: dict | None = None) -> Config:
        return load_config(write_config(tmp_path, e2e_file, overrides, name=f"config{next(counter)}.yaml"))

    return make


def run_training(cfg: Config, out: Path, **kwargs) -> dict:
    return train(cfg, out, progress=False, **kwargs)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train_loss"]) for r in read_metrics(run_dir) if r["train_loss"] is not None]


def exported_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


def assert_states_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    """Same keys, and every tensor equal up to `rtol` relative to its norm."""
    assert set(a) == set(b)
    for k in a:
        err = (a[k] - b[k]).norm().item()
        assert err <= rtol * max(b[k].norm().item(), 1e-12), f"{k}: |diff| {err:.3g} vs |ref| {b[k].norm():.3g}"


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def random_lora_model(config):
    """A model of `config` (seed 0) with LoRA (rank 4) whose A and B are both random, in eval mode."""
    from transformers import AutoModelForCausalLM

    from splitlora.lora import apply_lora, lora_config

    torch.manual_seed(0)
    peft = apply_lora(AutoModelForCausalLM.from_config(config), lora_config(config, 4, 8, 0.0), 0).eval()
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return peft


@pytest.fixture
def tensor_reads(monkeypatch):
    """The checkpoint keys splitlora.models reads through safe_open, in order (a list filled as it reads)."""
    import splitlora.models as M

    read: list[str] = []
    real_open = M.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr(M, "safe_open", Recording)
    return read
