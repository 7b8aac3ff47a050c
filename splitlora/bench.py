"""Benchmarks that write JSON. `overhead`: what splitting costs against plain PEFT on one machine.

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

from .lora import apply_lora, lora_config
from .models import load_model
from .roles import Learner, OptimConfig, lm_loss
from .split import full_part
from .strategies import Setup, SplitLoRA


def _features(n: int, seq: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    feats = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (seq,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * (seq // 2) + ids[seq // 2:]})
    return feats


def overhead(model_name: str, steps: int = 30, split_layer: int = 3, batch: int = 4, seq: int = 128,
             rank: int = 4, alpha: float = 32, warmup: int = 3, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    lm = load_model(model_name, seed=seed)
    template = apply_lora(lm.model, lora_config(lm.model.config, rank, alpha, 0.1), seed)
    optim = OptimConfig(lr=2e-4, weight_decay=0.01, warmup_steps=0, total_steps=10**6, max_grad_norm=1.0,
                        label_smoothing=0.1)
    feats = _features(batch * 8, seq, lm.model.config.vocab_size, seed)
    setup = Setup(template=template, client_features=[feats], optim=optim, batch_size=batch, seed=seed,
                  pad_token_id=lm.tokenizer.pad_token_id, split_layer=split_layer, num_clients=1,
                  aggregation_interval=10**6, server_mode="shared")
    split = SplitLoRA(setup)

    central = Learner(full_part(template), optim)   # the template's own LoRA params, PEFT forward below
    from .data import collate
    cbatch = collate(feats[:batch], lm.tokenizer.pad_token_id)

    def central_step(t: int) -> None:
        template.train()
        logits = template(input_ids=cbatch["input_ids"], attention_mask=cbatch["attention_mask"]).logits
        lm_loss(logits, cbatch["labels"], optim.label_smoothing).backward()
        central.step(t)

    times = {"split": [], "central": []}
    bytes_before = None
    for t in range(warmup + steps):
        for name in ("central", "split") if t % 2 == 0 else ("split", "central"):
            if name == "split" and t == warmup:
                bytes_before = (setup.link.bytes_up, setup.link.bytes_down)
            t0 = time.perf_counter()
            central_step(t) if name == "central" else split.step(t)
            if t >= warmup:
                times[name].append(time.perf_counter() - t0)

    client, server = split.clients[0].part, split.server.learners[0].part
    h = lm.model.config.hidden_size
    up = (setup.link.bytes_up - bytes_before[0]) / steps
    down = (setup.link.bytes_down - bytes_before[1]) / steps
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "benchmark": "overhead",
        "model": model_name, "split_layer": split_layer, "batch": batch, "seq_len": seq, "lora_rank": rank,
        "steps": steps, "warmup_steps": warmup, "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "ratio": med["split"] / med["central"],
        "ratio_mean": statistics.mean(times["split"]) / statistics.mean(times["central"]),
        "ratio_paired_median": statistics.median(a / b for a, b in zip(times["split"], times["central"])),
        "split_step_s_median": med["split"], "central_step_s_median": med["central"],
        "split_step_s": times["split"], "central_step_s": times["central"],
        "client_trainable_params": sum(p.numel() for p in client.trainable_parameters()),
        "server_trainable_params": sum(p.numel() for p in server.trainable_parameters()),
        "client_total_params": sum(p.numel() for p in client.parameters()),
        "server_total_params": sum(p.numel() for p in server.parameters()),
        "bytes_up_per_step": up, "bytes_down_per_step": down,
        "activation_bytes_BTH4": batch * seq * h * 4,
        "bytes_up_over_BTH4": up / (batch * seq * h * 4),
        "bytes_down_over_BTH4": down / (batch * seq * h * 4),
    }
