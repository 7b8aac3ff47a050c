"""`bench memory`: the peak memory of a client part and of a server part of large shapes (random
weights, `shape:` presets) and the seconds of one training step at batch 1 x 256, each case in a fresh
process (`python -m splitlora.experiments.memory CASE`), so no case's memory counts in another's.

A case is (shape, side, variant): the client holds the embeddings and blocks [0, k), the server blocks
[k, L), the final norm and the LM head (a split at k = 2). Variants: fp32, bf16, bf16 with gradient
checkpointing, int8 and nf4 base weights (bf16 compute). Only the case's part is materialised (lean
loading), LoRA rank 8 on q and v, one AdamW step. Peak memory is the process's peak RSS on the CPU and
`torch.cuda.max_memory_allocated` on a GPU. A case whose fp32 weights alone would not fit in memory is
estimated instead (its bf16 measurement, plus the weights' extra bytes), and marked so.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import torch

from .common import peak_rss_bytes

VARIANTS = {"fp32": ["runtime.dtype=fp32"], "bf16": ["runtime.dtype=bf16", "runtime.autocast=bf16"],
            "bf16+ckpt": ["runtime.dtype=bf16", "runtime.autocast=bf16", "runtime.gradient_checkpointing=true"],
            "int8": ["runtime.dtype=bf16", "runtime.autocast=bf16", "model.quantization=int8"],
            "nf4": ["runtime.dtype=bf16", "runtime.autocast=bf16", "model.quantization=nf4"]}


def run_case(shape: str, side: str, variant: str, split_layer: int = 2, seq: int = 256, sets=()) -> dict:
    """One case, in this process: build the part, train one step, measure."""
    from ..build import role_model
    from ..config import load_config
    from ..data import collate
    from ..learning import Learner, OptimConfig, lm_losses
    from ..runtime import runtime_of
    from ..split import make_part, num_layers

    cfg = load_config(None, [f"model.name=shape:{shape}", f"model.split_layer={split_layer}", "lora.rank=8",
                             "lora.alpha=16", "lora.dropout=0", *VARIANTS[variant], *sets])
    rt = runtime_of(cfg, side)
    t0 = time.perf_counter()
    if side == "client":
        lm, peft = role_model(cfg, rt, layers=range(split_layer), head=False)
    else:
        lm, peft = role_model(cfg, rt, layers=range(split_layer, 10**6), embeddings=False)
    build_s = time.perf_counter() - t0
    total = num_layers(lm.model.config)
    part = make_part(peft, 0, split_layer) if side == "client" else make_part(peft, split_layer, total)
    part.checkpointing = rt.checkpointing
    learner = Learner(part, OptimConfig(1e-4, 0.0, 0, 10, 1.0, 0.0))
    hidden, vocab = lm.model.config.hidden_size, lm.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(vocab, 49152), (1, seq), generator=g)
    batch = {k: v.to(rt.device) for k, v in collate([{"input_ids": ids[0].tolist(), "labels": ids[0].tolist()}],
                                                     0).items()}
    part.train()
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    times = []
    for _ in range(2):   # the first step warms up (allocator, kernels); the second is timed
        rt.synchronize()
        t1 = time.perf_counter()
        if side == "client":
            with rt.compute():
                h = part(batch["input_ids"], batch["attention_mask"])
            h.backward(torch.randn(h.shape, generator=g).to(h.device, h.dtype) * 1e-3)
        else:
            x = (torch.randn(1, seq, hidden, generator=g) * 0.5).to(rt.device, rt.dtype).requires_grad_(True)
            with rt.compute():
                logits = part(x, batch["attention_mask"])
            lm_losses(logits, batch["labels"], 0.0)[0].backward()
        learner.step(0)
        times.append(rt.elapsed(t1))
    params = {"frozen_bytes": sum(p.numel() * p.element_size() for p in part.parameters()
                                  if not p.requires_grad and p.device.type != "meta"),
              "trainable": sum(p.numel() for p in part.trainable_parameters()),
              "materialised_params": sum(p.numel() for p in part.parameters() if p.device.type != "meta")}
    peak = torch.cuda.max_memory_allocated(rt.device) if rt.device.type == "cuda" else peak_rss_bytes()
    return {"shape": shape, "side": side, "variant": variant, "split_layer": split_layer, "seq_len": seq,
            "device": str(rt.device), "peak_bytes": peak, "peak_gib": peak / 2**30,
            "peak_kind": "cuda max_memory_allocated" if rt.device.type == "cuda" else "peak RSS (VmHWM)",
            "step_s": times[-1], "first_step_s": times[0], "build_s": build_s, **params, "measured": True}


def _part_params(shape: str, side: str, split_layer: int) -> int:
    """Parameters of a part, from the shape's config alone (no weights)."""
    from transformers import AutoModelForCausalLM

    from ..models import parameters_on_meta
    from ..shapes import SHAPES
    from ..families import family_of

    config = SHAPES[shape]()
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    mods = family_of(config).modules(model)
    blocks = list(mods["blocks"])
    if side == "client":
        own = [mods[k] for k in family_of(config).embed_modules] + blocks[:split_layer]
    else:
        own = blocks[split_layer:] + [mods[k] for k in family_of(config).head_modules]
    return sum(p.numel() for m in own for p in m.parameters())


def estimate(cases: list) -> None:
    """Fill in the peak of each case too large to measure in fp32: its bf16 case's peak plus the 2 extra
    bytes per parameter of fp32 weights (on llama-3.2-1b's server part, where both were measured, this
    gives 5.58 GiB against 5.81 measured). After all cases ran, whatever their order."""
    for c in cases:
        if c["measured"] is False and "estimate" in c:
            bf16 = next((b for b in cases if b.get("measured") and b["variant"] == "bf16"
                         and (b["shape"], b["side"]) == (c["shape"], c["side"])), None)
            c["peak_bytes"] = None if bf16 is None else bf16["peak_bytes"] + 2 * c["params"]


def memory(shapes=("llama-3.2-1b", "llama-3-8b"), sides=("client", "server"), variants=tuple(VARIANTS),
           split_layer: int = 2, sets=(), timeout_s: float = 3600, log=print) -> dict:

    total_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cases = []
    for shape in shapes:
        for side in sides:
            for variant in variants:
                n = _part_params(shape, side, split_layer)
                if variant == "fp32" and n * 4 > 0.8 * total_ram and not any("cuda" in s for s in sets):
                    cases.append({"shape": shape, "side": side, "variant": variant, "measured": False,
                                  "params": n, "estimate": "the bf16 case's peak + 2 bytes per parameter (fp32 "
                                  f"weights would need {n * 4 / 2**30:.1f} GiB of this machine's "
                                  f"{total_ram / 2**30:.1f} GiB)"})
                    log(f"bench memory: {shape} {side} {variant}: estimated (does not fit)")
                    continue
                log(f"bench memory: {shape} {side} {variant}")
                args = json.dumps({"shape": shape, "side": side, "variant": variant, "split_layer": split_layer,
                                   "sets": list(sets)})
                out = subprocess.run([sys.executable, "-m", "splitlora.experiments.memory", args], capture_output=True,
                                     text=True, timeout=timeout_s)
                if out.returncode != 0:
                    cases.append({"shape": shape, "side": side, "variant": variant, "measured": False,
                                  "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"})
                    log(f"bench memory: {shape} {side} {variant}: failed: {cases[-1]['error']}")
                    continue
                case = json.loads(out.stdout.strip().splitlines()[-1])
                case["params"] = n
                cases.append(case)
                log(f"bench memory: {shape} {side} {variant}: peak {case['peak_gib']:.2f} GiB, "
                    f"step {case['step_s']:.1f} s")
    estimate(cases)
    for c in cases:
        if c.get("peak_bytes") is not None:
            c["peak_gib"] = c["peak_bytes"] / 2**30
    return {"benchmark": "memory", "description": __doc__, "split_layer": split_layer, "seq_len": 256,
            "machine": platform.processor() or platform.machine(), "memory_gib": total_ram / 2**30,
            "torch_threads": torch.get_num_threads(), "sets": list(sets), "cases": cases}


if __name__ == "__main__":   # one case in a fresh process: its JSON on the last line of stdout
    spec = json.loads(sys.argv[1])
    print(json.dumps(run_case(spec["shape"], spec["side"], spec["variant"], spec["split_layer"],
                              sets=spec.get("sets", ()))))
