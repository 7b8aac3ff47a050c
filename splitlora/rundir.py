"""A run directory's life around the training loop: it is never replaced by accident, a resumed run
carries its metrics over, and SIGINT/SIGTERM end training after the step under way with a checkpoint."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

from .errors import ConfigError


def carry_metrics(src: Path, dst: Path, upto_step: int) -> None:
    lines = []
    if src.exists():
        lines = [ln for ln in src.read_text().splitlines() if ln and json.loads(ln)["step"] <= upto_step]
    dst.write_text("".join(ln + "\n" for ln in lines))


RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint", "checkpoint.old", "adapter")


def check_output(out: Path, resume: str | Path | None, overwrite: bool) -> None:
    """Refuse to train into a directory that holds files (an earlier run would be silently replaced),
    unless it is the run being resumed, or `overwrite` and it is a run directory."""
    if not out.exists():
        parent = next((p for p in out.absolute().parents if p.exists()), None)
        if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"--output: cannot create {out}: {parent} is not writable")
        return
    if not out.is_dir():
        raise ConfigError(f"--output: {out} is a file, not a directory")
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--output: {out} is not writable")
    if not any(out.iterdir()) or (resume is not None and Path(resume).resolve() == out.resolve()):
        return
    if not overwrite:
        raise ConfigError(f"--output: {out} already holds a run or other files; continue it with --resume "
                          f"(train --resume {out}), replace it (train --overwrite), or choose another directory")
    if not any((out / name).exists() for name in RUN_FILES):
        raise ConfigError(f"--overwrite: {out} is not a run directory (none of {', '.join(RUN_FILES[:3])}); "
                          "refusing to delete it")


class StopRequest:
    """SIGINT/SIGTERM while training: the step under way finishes, a checkpoint is written, and training
    stops with `Interrupted`; a second signal stops at once. Only in the main thread (where Python
    delivers signals); elsewhere this does nothing."""

    def __init__(self):
        self.signal: str | None = None
        self._old: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f"\nsplitlora: {self.signal}: finishing this step and writing a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
