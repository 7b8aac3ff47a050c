"""`bench overhead`: what splitting costs against plain PEFT on one machine.

One SplitLoRA step with one client (client forward, smashed message serialized up, server
forward/backward/step, gradient serialized down, client backward/step) is timed against one
centralized PEFT step (PeftModel forward, loss, backward, AdamW step) on the same batch shape and
LoRA. The two are interleaved step by step so drift in machine speed hits both alike.
"""

from __future__ import annotations

import platform
import statistics
import time

import torch

from ..learning import Learner, OptimConfig, lm_losses
from ..split import full_part
from ..strategies.base import Setup
from ..strategies.splitlora import SplitLoRA


def _features(n: int, seq: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    feats = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (seq,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * (seq // 2) + ids[seq // 2:]})
    return feats


def overhead(model_name: str, steps: int = 30, split_layer: int = 3, batch: int = 4, seq: int = 128,
             rank: int = 4, alpha: float = 32, warmup: int = 3, seed: int = 0, sets=(),
             peak_tflops: float | None = None) -> dict:
    """See the module docstring. `sets` are config overrides (`runtime.device=cuda`, `runtime.dtype=bf16`,
    ...): both sides run on the server's runtime. `peak_tflops`: the device's peak, for the model FLOPs
    utilisation (FLOPs from the cost model, which counts what autograd computes)."""
    from ..build import role_model
    from ..config import load_config
    from ..cost import Shapes, part_flops
    from ..data import collate
    from ..runtime import runtime_of
    from ..split import num_layers

    cfg = load_config(None, [f"model.name={model_name}", f"model.split_layer={split_layer}", f"lora.rank={rank}",
                             f"lora.alpha={alpha}", "lora.dropout=0.1", f"train.seed={seed}", *sets])
    rt = runtime_of(cfg, "server")
    torch.manual_seed(seed)
    lm, template = role_model(cfg, rt)
    optim = OptimConfig(lr=2e-4, weight_decay=0.01, warmup_steps=0, total_steps=10**6, max_grad_norm=1.0,
                        label_smoothing=0.1)
    feats = _features(batch * 8, seq, min(lm.model.config.vocab_size, len(lm.tokenizer)), seed)
    setup = Setup(template=template, client_features=[feats], optim=optim, batch_size=batch, seed=seed,
                  pad_token_id=lm.tokenizer.pad_token_id, split_layer=split_layer, num_clients=1,
                  aggregation_interval=10**6, server_mode="shared", server_runtime=rt, client_runtimes=[rt])
    split = SplitLoRA(setup)

    central = Learner(full_part(template), optim)   # the template's own LoRA params, PEFT forward below
    cbatch = {k: v.to(rt.device) for k, v in collate(feats[:batch], lm.tokenizer.pad_token_id).items()}

    def central_step(t: int) -> None:
        template.train()
        with rt.compute():
            logits = template(input_ids=cbatch["input_ids"], attention_mask=cbatch["attention_mask"]).logits
        lm_losses(logits, cbatch["labels"], optim.label_smoothing)[0].backward()   # the loss the split step uses
        central.step(t)

    times = {"split": [], "central": []}
    bytes_before = None
    for t in range(warmup + steps):
        for name in ("central", "split") if t % 2 == 0 else ("split", "central"):
            if name == "split" and t == warmup:
                bytes_before = (setup.link.bytes_up, setup.link.bytes_down)
            rt.synchronize()
            t0 = time.perf_counter()
            central_step(t) if name == "central" else split.step(t)
            if t >= warmup:
                times[name].append(rt.elapsed(t0))

    client, server = split.clients[0].client.part, split.server.learners[0].part
    h = lm.model.config.hidden_size
    up = (setup.link.bytes_up - bytes_before[0]) / steps
    down = (setup.link.bytes_down - bytes_before[1]) / steps
    med = {k: statistics.median(v) for k, v in times.items()}
    shapes, layers = Shapes.from_model(template), num_layers(lm.model.config)
    flops = {"split": part_flops(shapes, 0, split_layer, False, batch, seq, False).total
             + part_flops(shapes, split_layer, layers, True, batch, seq, True).total,
             "central": part_flops(shapes, 0, layers, True, batch, seq, False).total}
    tflops = {k: flops[k] / med[k] / 1e12 for k in med}
    return {
        "benchmark": "overhead",
        "model": model_name, "split_layer": split_layer, "batch": batch, "seq_len": seq, "lora_rank": rank,
        "steps": steps, "warmup_steps": warmup, "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "runtime": rt.describe(),
        "device_name": torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else None,
        "ratio": med["split"] / med["central"],
        "ratio_mean": statistics.mean(times["split"]) / statistics.mean(times["central"]),
        "ratio_paired_median": statistics.median(a / b for a, b in zip(times["split"], times["central"])),
        "split_step_s_median": med["split"], "central_step_s_median": med["central"],
        "split_step_s": times["split"], "central_step_s": times["central"],
        "tokens_per_s": {k: batch * seq / med[k] for k in med},
        "model_flops_per_step": flops, "achieved_tflops": tflops,
        "mfu": {k: v / peak_tflops for k, v in tflops.items()} if peak_tflops else None,
        "peak_tflops": peak_tflops,
        "client_trainable_params": sum(p.numel() for p in client.trainable_parameters()),
        "server_trainable_params": sum(p.numel() for p in server.trainable_parameters()),
        "client_total_params": sum(p.numel() for p in client.parameters()),
        "server_total_params": sum(p.numel() for p in server.parameters()),
        "bytes_up_per_step": up, "bytes_down_per_step": down,
        "activation_bytes_BTH4": batch * seq * h * 4,
        "bytes_up_over_BTH4": up / (batch * seq * h * 4),
        "bytes_down_over_BTH4": down / (batch * seq * h * 4),
    }
