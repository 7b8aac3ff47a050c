"""Checkpoints without pickle: nested state (dicts, lists, numbers, strings, tensors) is written as one
safetensors file for the tensors plus one JSON file for the rest, into a temp dir renamed into place,
so a crash mid-write never leaves a half checkpoint behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_TENSOR = "__tensor__"


def split_tensors(obj, tensors: dict[str, torch.Tensor], path: str = "t"):
    """Replace each tensor in `obj` by a reference and collect it into `tensors`."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().contiguous().clone()
        return {_TENSOR: path}
    if isinstance(obj, dict):
        return {str(k): split_tensors(v, tensors, f"{path}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    return obj


def join_tensors(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


@contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yield a temp dir beside `target`; if the block succeeds it takes `target`'s place by rename.

    A crash leaves either the old directory or (between the two renames) `<target>.old` behind.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        yield tmp
        old = target.with_name(target.name + ".old")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(directory: str | os.PathLike, state: dict) -> None:
    """Write `state` atomically; a state holding a non-finite floating-point value is never written."""
    tensors: dict[str, torch.Tensor] = {}
    meta = split_tensors(state, tensors)
    bad = next((k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise ValueError(f"refusing to write a checkpoint with non-finite values ({bad})")
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta))


def _complete(directory: Path) -> bool:
    return (directory / "state.json").is_file() and (directory / "state.safetensors").is_file()


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint at `directory` (e.g. RUN/checkpoint): itself, else `<it>.old`
    (a crash between the two renames of `atomic_directory`), else None."""
    directory = Path(directory)
    for candidate in (directory, directory.with_name(directory.name + ".old")):
        if _complete(candidate):
            return candidate
    return None


def remove_partial(directory: str | os.PathLike) -> list[Path]:
    """Remove what interrupted writes of checkpoint `directory` left beside it (`<name>.XXXXXXXX` temp
    folders; `<name>.old` is kept: it may be the newest complete one). Returns what was removed."""
    directory = Path(directory)
    gone = []
    if directory.parent.is_dir():
        for p in directory.parent.glob(directory.name + ".*"):
            if p.is_dir() and p.name != directory.name + ".old":
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone


def load_checkpoint(directory: str | os.PathLike) -> dict:
    found = latest_checkpoint(directory)
    if found is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint at {directory} (nor {Path(directory).name}.old)")
    meta = json.loads((found / "state.json").read_text())
    return join_tensors(meta, load_file(str(found / "state.safetensors")))
