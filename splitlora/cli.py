"""Command line: `splitlora train`, `eval`, `score`, `serve`, `client`, `certs`, `calibrate`, `compare`, `attack` and
`bench overhead|deploy|hetero|noise`.

Errors a user can fix (config, model, data, split point) print one line naming the field or file
and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import warnings

# only light modules here: torch and transformers are imported by the command that needs them, so
# `--help` and a config error answer at once
from .errors import USER_ERRORS, ConfigError, Interrupted, RunError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitlora", description="Split-federated LoRA fine-tuning")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train with a strategy from a YAML config")
    t.add_argument("--config", help="YAML config (default: the resumed run's config.yaml)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    t.add_argument("--output", required=True, help="run directory")
    t.add_argument("--resume", help="run directory whose checkpoint/ to continue from")
    t.add_argument("--overwrite", action="store_true", help="replace the run already in --output")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    e = sub.add_parser("eval", help="decode a trained run on E2E and score it")
    e.add_argument("run_dir", metavar="RUN_DIR")
    e.add_argument("--output", required=True, help="directory for predictions.txt, references.txt, metrics.json")
    e.add_argument("--split", default="test", choices=["test", "validation"])
    e.add_argument("--limit", type=int, help="only the first N MRs")
    e.add_argument("--mode", default="merged", choices=["merged", "split"],
                   help="decode with the adapter merged into the base (default) or through the split model")
    e.add_argument("--greedy", action="store_true", help="greedy decoding (fast checks)")
    e.add_argument("--beam", type=int, help="beam size (default 10; 1 = greedy)")
    e.add_argument("--length-penalty", type=float)
    e.add_argument("--no-repeat-ngram", type=int)
    e.add_argument("--repetition-penalty", type=float)
    e.add_argument("--max-new-tokens", type=int)
    e.add_argument("--batch-size", type=int, help="MRs decoded together")
    e.add_argument("--no-progress", action="store_true")
    g = sub.add_parser("generate", help="decode a prompt with a trained run (rendered as the run's data was)")
    g.add_argument("run_dir", metavar="RUN_DIR")
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    g.add_argument("--mode", default="merged", choices=["merged", "split"])
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--beam", type=int, default=1, help="beam size (default 1: greedy)")
    s_ = sub.add_parser("score", help="score predictions against references like the E2E scorer")
    s_.add_argument("references", metavar="REFERENCES", help="references.txt (groups split by blank lines) or CSV")
    s_.add_argument("predictions", metavar="PREDICTIONS", help="predictions.txt (one line per MR) or CSV")
    sv = sub.add_parser("serve", help="run the main server and fed server of a deployment")
    sv.add_argument("--config", required=True)
    sv.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sv.add_argument("--address", required=True, help="HOST:PORT to listen on")
    sv.add_argument("--certs", help="directory made by `splitlora certs`")
    sv.add_argument("--output", required=True, help="run directory")
    sv.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    sv.add_argument("--insecure", action="store_true", help="plaintext, loopback addresses only")
    sv.add_argument("--no-progress", action="store_true")
    cl = sub.add_parser("client", help="run one data owner of a deployment")
    cl.add_argument("--config", required=True)
    cl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    cl.add_argument("--client-id", type=int, required=True)
    cl.add_argument("--server", required=True, help="HOST:PORT of the server")
    cl.add_argument("--certs", help="directory made by `splitlora certs`")
    cl.add_argument("--insecure", action="store_true", help="plaintext, loopback addresses only")
    cl.add_argument("--progress", action="store_true",
                    help="a progress bar (default: a line every train.log_interval steps, readable when several "
                         "clients share a terminal)")
    ce = sub.add_parser("certs", help="create a CA, a server certificate and client certificates")
    ce.add_argument("--output", required=True)
    ce.add_argument("--clients", type=int, required=True)
    ce.add_argument("--server-name", action="append", help="DNS name or IP of the server (repeatable)")
    ce.add_argument("--overwrite", action="store_true")
    ca = sub.add_parser("calibrate", help="measure this machine as a device profile for simulated time")
    ca.add_argument("--config", required=True, help="YAML config (model, split layer, batch, data)")
    ca.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ca.add_argument("--output", required=True, help="profiles file to write (local-client, local-server)")
    ca.add_argument("--report", help="JSON file for the fit and the check (default: OUTPUT with .report.json)")
    ca.add_argument("--steps", type=int, default=8, help="steps of each check run (default 8)")
    co = sub.add_parser("compare", help="run several strategies on the same budget and write a report")
    co.add_argument("--config", required=True)
    co.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    co.add_argument("--strategies", default="cenlora,fedlora,sl,splitlora", help="comma-separated")
    co.add_argument("--output", required=True, help="directory for the runs, compare.json and report.md")
    co.add_argument("--samples", type=int, help="sample budget (default: train.max_steps x samples per step)")
    co.add_argument("--eval-samples", type=int, help="evaluate every N samples (default: from train.eval_interval)")
    co.add_argument("--target", type=float, help="target validation loss (default: best cenlora loss + margin)")
    co.add_argument("--margin", type=float, default=0.05, help="relative margin over cenlora's loss (default 0.05)")
    co.add_argument("--reuse", action="store_true",
                    help="read strategies whose run directory already holds a finished run of the same config")
    co.add_argument("--no-progress", action="store_true")
    at = sub.add_parser("attack", help="a curious server tries to recover client tokens from smashed activations")
    at.add_argument("run_dir", metavar="RUN_DIR")
    at.add_argument("--output", required=True, help="directory for attack.json and attack.png")
    at.add_argument("--depths", default="1,3,6", help="split depths (client blocks), comma-separated")
    at.add_argument("--noise", default="0,0.001,0.005", help="noise multipliers, comma-separated")
    at.add_argument("--clip-norm", type=float, help="per-example clip norm (default: the run's, else 1000)")
    at.add_argument("--top-layers", default="1", help="U-shape: client top blocks m whose gradient up is attacked "
                    "(comma-separated; empty: none)")
    at.add_argument("--grad-noise", help="noise multipliers on the gradient up (default: --noise)")
    at.add_argument("--grad-clip-norm", type=float,
                    help="clip norm of the gradient up (default: the run's, else the median public one)")
    at.add_argument("--victims", type=int, default=32, help="held-out examples to attack")
    at.add_argument("--public", type=int, default=400, help="public examples (E2E test set) the attacker uses")
    b = sub.add_parser("bench", help="benchmarks writing JSON")
    b.add_argument("which", choices=["overhead", "deploy", "hetero", "noise", "precision", "memory", "scale"])
    b.add_argument("--output", required=True, help="JSON file to write")
    b.add_argument("--model", help="overhead, deploy: default smollm2-135m-instruct; scale: default tiny-llama")
    b.add_argument("--steps", type=int,
                   help="overhead: timed steps (default 30); hetero: training steps (default: configs/hsplitlora.yaml's); "
                        "deploy, scale: training steps, the first untimed (default 6)")
    b.add_argument("--split-layer", type=int, help="overhead, deploy: default 3; memory: default 2")
    b.add_argument("--clients", default="1,2,4,8,16", help="scale: numbers of client processes")
    b.add_argument("--workdir", help="deploy, hetero, scale: keep the runs and logs here (default: a temporary directory); "
                   "noise: its runs (default runs/bench-noise)")
    b.add_argument("--repeats", type=int, default=1, help="deploy: (in-process, deployed) pairs per precision")
    b.add_argument("--reuse", action="store_true", help="hetero, noise: read runs already finished in --workdir")
    b.add_argument("--seeds", default="0,1,2", help="hetero: train.seed values")
    b.add_argument("--intervals", default="4,1", help="hetero: aggregation intervals (steps)")
    b.add_argument("--partitions", default="iid,dirichlet", help="hetero: iid, dirichlet (over food)")
    b.add_argument("--aggregations", default="stack_fold,stack_svd,stack_keep,zero_pad",
                   help="hetero: hsplit.aggregation values")
    b.add_argument("--weakest", default="iid@4", help="hetero: settings (PARTITION@INTERVAL) that also run "
                   "splitlora at the weakest budget")
    b.add_argument("--no-dlora", action="store_true", help="hetero: skip the Kill & Revive pair")
    b.add_argument("--config", default="configs/demo.yaml", help="noise, precision: the config to train")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides (runtime.device=cuda, runtime.dtype=bf16, ...), applied to every run or "
                        "model the bench makes")
    b.add_argument("--precisions", default="fp32,bf16", help="deploy: wire precisions to compare")
    b.add_argument("--peak-tflops", type=float, help="overhead: the device's peak TFLOP/s, for the MFU")
    b.add_argument("--shapes", default="llama-3.2-1b,llama-3-8b", help="memory: shape presets (shape:NAME)")
    b.add_argument("--sides", default="client,server", help="memory: which parts")
    b.add_argument("--variants", default="fp32,bf16,bf16+ckpt,int8,nf4", help="memory: precision variants")
    b.add_argument("--noise", default="0.005,0.02", help="noise: multipliers on the smashed activations")
    b.add_argument("--clip-norm", type=float, default=1000.0, help="noise: clip norm of the activations")
    b.add_argument("--grad-noise", default="", help="noise: multipliers on the gradient up (U-shaped configs)")
    b.add_argument("--grad-clip-norm", type=float, help="noise: clip norm of the gradient up")
    b.add_argument("--quiet-wait", type=float, default=0, metavar="S",
                   help="deploy: before each timed run, wait up to S seconds for an idle machine")
    return p


def _load_config(path, sets):
    from .config import load_config

    return load_config(path, sets)


def _train(args) -> None:
    from pathlib import Path

    config = args.config
    if config is None and args.resume:
        config = Path(args.resume) / "config.yaml"
        if not config.exists():
            raise ConfigError(f"--resume: {args.resume} has no config.yaml (is it a run directory?); "
                              "name the config with --config")
    if config is None:
        raise ConfigError("--config is required unless --resume names a run directory")
    cfg = _load_config(config, args.set)
    from .train import train

    try:
        summary = train(cfg, args.output, resume=args.resume, progress=not args.no_progress,
                        overwrite=args.overwrite)
    except Interrupted as e:
        raise Interrupted(e.step, e.checkpoint, e.signal_name,
                          f"splitlora train --resume {args.output} --output {args.output}") from None
    print(json.dumps({k: summary[k] for k in ("step", "initial_val_loss", "final_val_loss", "bytes_up",
                                              "bytes_down", "wall_s", "adapter")}, indent=2))


def _eval(args) -> None:
    from .decode import DecodeConfig
    from .evaluate import evaluate, table

    cfg = DecodeConfig.greedy() if args.greedy or args.beam == 1 else DecodeConfig()
    chosen = {"num_beams": args.beam, "length_penalty": args.length_penalty,
              "no_repeat_ngram_size": args.no_repeat_ngram, "repetition_penalty": args.repetition_penalty,
              "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}
    cfg = DecodeConfig(**{**cfg.to_dict(), **{k: v for k, v in chosen.items() if v is not None}})
    result = evaluate(args.run_dir, args.output, cfg, split=args.split, limit=args.limit, mode=args.mode,
                      progress=not args.no_progress)
    print(table(result))


def _generate(args) -> None:
    from .chat import prompt_for
    from .decode import DecodeConfig, generate
    from .evaluate import load_trained

    model, tokenizer, cfg = load_trained(args.run_dir, args.mode)
    prompts = [prompt_for(cfg.data, tokenizer, p) for p in args.prompt]
    texts, _ = generate(model, tokenizer, prompts, DecodeConfig.greedy(num_beams=args.beam, no_repeat_ngram_size=0,
                                                                       max_new_tokens=args.max_new_tokens))
    for prompt, text in zip(args.prompt, texts, strict=True):
        print(json.dumps({"prompt": prompt, "output": text}, ensure_ascii=False))


def _score(args) -> None:
    from .metrics import score_files

    print(json.dumps(score_files(args.references, args.predictions), indent=2))


def _serve(args) -> None:
    from .transport.deploy import serve

    cfg = _load_config(args.config, args.set)
    try:
        summary = serve(cfg, args.address, args.certs, args.output, resume=args.resume, insecure=args.insecure,
                        progress=not args.no_progress)
    except Interrupted as e:
        command = shlex.join(["splitlora", *args.argv, *([] if args.resume else ["--resume"])])
        raise Interrupted(e.step, e.checkpoint, e.signal_name, command) from None
    print(json.dumps({k: summary[k] for k in ("step", "final_val_loss", "bytes_up", "bytes_down", "dropouts",
                                              "adapter")}, indent=2))


def _client(args) -> None:
    from .transport.deploy import client

    client(_load_config(args.config, args.set), args.client_id, args.server, args.certs, insecure=args.insecure,
           progress=args.progress)


def _certs(args) -> None:
    from .transport.certs import create_certs

    names = args.server_name or ["localhost", "127.0.0.1", "::1"]
    paths = create_certs(args.output, args.clients, server_names=names, overwrite=args.overwrite)
    print(f"wrote a CA, a server certificate for {', '.join(names)} and {args.clients} client certificates "
          f"to {paths['dir']}")


def _calibrate(args) -> None:
    from .experiments.calibrate import calibrate

    result = calibrate(_load_config(args.config, args.set), args.output, steps=args.steps,
                       log=lambda m: print(m, file=sys.stderr))
    report = args.report or f"{args.output}.report.json"
    with open(report, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({"profiles_file": args.output, "report": report, "check": result["check"]}, indent=2))


def _compare(args) -> None:
    from .experiments.compare import compare

    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    result = compare(_load_config(args.config, args.set), names, args.output, samples=args.samples,
                     eval_samples=args.eval_samples, target=args.target, margin=args.margin,
                     progress=not args.no_progress, reuse=args.reuse)
    print(f"wrote {args.output}/report.md and compare.json; target {result['target_val_loss']:.4f}; "
          + ", ".join(f"{k} {v:.3f}" for k, v in result["time_to_target_ratios"].items()))


def _attack(args) -> None:
    from .experiments.attack import attack

    floats = lambda text: [float(x) for x in text.split(",") if x.strip()]  # noqa: E731
    result = attack(args.run_dir, args.output, depths=[int(x) for x in floats(args.depths)],
                    noise_levels=floats(args.noise), clip_norm=args.clip_norm, victims=args.victims,
                    public=args.public, top_layers=[int(x) for x in floats(args.top_layers)],
                    grad_noise_levels=None if args.grad_noise is None else floats(args.grad_noise),
                    grad_clip_norm=args.grad_clip_norm, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(result["results"], indent=2))


SMOLLM2 = "smollm2-135m-instruct"


def _bench(args) -> None:
    import importlib

    fn = getattr(importlib.import_module(f".experiments.{args.which}", __package__), args.which)   # one file each
    if args.which == "overhead":
        result = fn(args.model or SMOLLM2, steps=args.steps or 30, split_layer=args.split_layer or 3,
                                sets=args.set, peak_tflops=args.peak_tflops)
    elif args.which == "noise":
        floats = lambda text: [float(x) for x in text.split(",") if x.strip()]  # noqa: E731
        result = fn(args.config, args.workdir or "runs/bench-noise", floats(args.noise), args.clip_norm,
                             floats(args.grad_noise), args.grad_clip_norm, args.set, args.reuse,
                             log=lambda m: print(m, file=sys.stderr))
    elif args.which == "precision":
        result = fn(args.config, sets=args.set, workdir=args.workdir,
                                 log=lambda m: print(m, file=sys.stderr))
    elif args.which == "memory":
        split = lambda text: tuple(x.strip() for x in text.split(",") if x.strip())  # noqa: E731
        result = fn(split(args.shapes), split(args.sides), split(args.variants), args.split_layer or 2,
                              sets=args.set, log=lambda m: print(m, file=sys.stderr))
    elif args.which == "scale":
        counts = tuple(int(x) for x in args.clients.split(",") if x.strip())
        result = fn(counts, model=args.model or "tiny-llama", steps=args.steps or 6, workdir=args.workdir,
                             sets=args.set, log=lambda m: print(m, file=sys.stderr))
    elif args.which == "hetero":
        items = lambda text: tuple(x.strip() for x in text.split(",") if x.strip())  # noqa: E731
        result = fn(steps=args.steps, workdir=args.workdir, reuse=args.reuse, sets=args.set,
                    log=lambda m: print(m, file=sys.stderr), seeds=tuple(int(x) for x in items(args.seeds)),
                    intervals=tuple(int(x) for x in items(args.intervals)), partitions=items(args.partitions),
                    aggregations=items(args.aggregations), weakest=items(args.weakest), dlora=not args.no_dlora)
    else:
        precisions = tuple(p.strip() for p in args.precisions.split(",") if p.strip())
        result = fn(args.model or SMOLLM2, steps=args.steps or 6, split_layer=args.split_layer or 3,
                              precisions=precisions, repeats=args.repeats, quiet_wait_s=args.quiet_wait,
                              workdir=args.workdir, sets=args.set, log=lambda m: print(m, file=sys.stderr))
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


def _quiet_libraries() -> None:
    """Warnings a user cannot act on (deprecations inside transformers and PEFT) are not shown; our own
    warnings (e.g. a clamped config value) print as one `splitlora: warning:` line."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")   # transformers' "Loading weights" bar
    for module in ("transformers", "peft", "torch", "accelerate", "bitsandbytes"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    # bitsandbytes: int8 casts bf16 inputs to fp16 (its design), and an optional kernel package is absent
    warnings.filterwarnings("ignore", category=UserWarning, module="bitsandbytes")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    log = logging.getLogger("splitlora")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_OneLine())
        log.addHandler(handler)
        log.propagate = False


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"splitlora: {record.levelname.lower()}: {record.getMessage()}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_libraries()
    try:
        commands = {"train": _train, "eval": _eval, "generate": _generate, "score": _score, "serve": _serve, "client": _client,
                    "certs": _certs, "calibrate": _calibrate, "compare": _compare, "attack": _attack,
                    "bench": _bench}
        commands[args.command](args)
    except USER_ERRORS as e:
        print(f"splitlora: error: {e}", file=sys.stderr)
        return 2
    except (RunError, OSError) as e:   # the run cannot go on (every client dropped out; a disk full): one line
        print(f"splitlora: error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"splitlora: stopped ({e.signal_name}) after step {e.step}; checkpoint in {e.checkpoint}; "
              f"continue with: {e.resume_command or '--resume'}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("splitlora: interrupted; work since the last checkpoint is lost", file=sys.stderr)
        return 130
    finally:
        if os.environ.get("SPLITLORA_PEAK_RSS_FILE"):   # for the benchmarks: this process's own peak RSS
            from .experiments.common import peak_rss_bytes
            with open(os.environ["SPLITLORA_PEAK_RSS_FILE"], "w") as f:
                f.write(str(peak_rss_bytes()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
