"""Command line: `splitlora train` and `splitlora bench overhead`.

Errors a user can fix (config, model, data, split point) print one line naming the field or file
and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, load_config
from .data import DataError
from .models import ModelError
from .split import SplitError

USER_ERRORS = (ConfigError, DataError, ModelError, SplitError, FileNotFoundError)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitlora", description="Split-federated LoRA fine-tuning")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train with a strategy from a YAML config")
    t.add_argument("--config", help="YAML config (default: the resumed run's config.yaml)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    t.add_argument("--output", required=True, help="run directory")
    t.add_argument("--resume", help="run directory whose checkpoint/ to continue from")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    b = sub.add_parser("bench", help="benchmarks writing JSON")
    b.add_argument("which", choices=["overhead"])
    b.add_argument("--output", required=True, help="JSON file to write")
    b.add_argument("--model", default="smollm2-135m-instruct")
    b.add_argument("--steps", type=int, default=30)
    b.add_argument("--split-layer", type=int, default=3)
    return p


def _train(args) -> None:
    from pathlib import Path

    from .train import train

    config = args.config
    if config is None and args.resume:
        config = str(Path(args.resume) / "config.yaml")
    if config is None:
        raise ConfigError("--config is required unless --resume names a run directory")
    cfg = load_config(config, args.set)
    summary = train(cfg, args.output, resume=args.resume, progress=not args.no_progress)
    print(json.dumps({k: summary[k] for k in ("step", "initial_val_loss", "final_val_loss", "bytes_up",
                                              "bytes_down", "wall_s", "adapter")}, indent=2))


def _bench(args) -> None:
    from .bench import overhead

    result = overhead(args.model, steps=args.steps, split_layer=args.split_layer)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        {"train": _train, "bench": _bench}[args.command](args)
    except USER_ERRORS as e:
        print(f"splitlora: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
