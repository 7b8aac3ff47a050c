"""The U-shaped split: exact (losses and every LoRA gradient equal the unsplit model's), trains with
every split strategy (splitlora, sl, dlora, hsplitlora, hetlora), exports one PEFT adapter, and no message the client sends carries a token id or a
label (which the normal split's messages do, so the check can fail)."""

from __future__ import annotations

import pytest
import torch
from conftest import exported_adapter, read_metrics, run_training
from peft import get_peft_model_state_dict
from test_split import lora_model, peft_key, right_padded_batch

from splitlora.config import ConfigError
from splitlora.learning import OptimConfig, lm_loss
from splitlora.roles import Client, MainServer
from splitlora.split import split_u
from splitlora.train import build_run
from splitlora.transport.local import Link


class _Stream:
    """One fixed batch, as a client's data stream."""

    def __init__(self, batch):
        self.batch, self.num_samples = batch, len(batch["input_ids"])

    def next_batch(self):
        return self.batch


@pytest.mark.parametrize("k,m", [(1, 1), (1, 2), (2, 1)])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_ushape_equals_unsplit(family, k, m):
    peft = lora_model(family)
    peft.train()   # GPT-2's own dropout: the same seed gives the same masks, the parts run the same ops in order
    ids, mask, labels = right_padded_batch()
    torch.manual_seed(123)
    ref_loss = lm_loss(peft(input_ids=ids, attention_mask=mask).logits, labels, 0.1)
    ref_loss.backward()
    ref = {peft_key(n): p.grad for n, p in peft.named_parameters() if p.requires_grad}

    client_part, server_part = split_u(peft, k, m)
    client_part, server_part = client_part.replicate(), server_part.replicate()
    assert set(client_part.adapter) | set(server_part.adapter) == set(get_peft_model_state_dict(peft))
    optim = OptimConfig(lr=0.0, weight_decay=0.0, warmup_steps=0, total_steps=10, max_grad_norm=0.0,
                        label_smoothing=0.1)
    client = Client(0, client_part, _Stream({"input_ids": ids, "attention_mask": mask, "labels": labels}), optim)
    server = MainServer([server_part], optim)
    # each role draws dropout from its own stream; one stream shared by both, started where the unsplit
    # run started, gives the unsplit run's masks (the parts draw in the unsplit model's order)
    torch.manual_seed(123)
    client.rng.state = torch.get_rng_state()
    server.rng = client.rng
    grads = {}
    for p in client_part.trainable_parameters() + server_part.trainable_parameters():
        p.register_hook(lambda g, p=p: grads.__setitem__(id(p), g.clone()))
    msg, _ = client.forward()
    assert "labels" not in msg
    top_grad, loss = client.top_step(server.middle_forward(0, msg)["activations"])
    client.backward(server.middle_backward(0, top_grad["activations_grad"], 0)["activations_grad"], 0)
    assert loss.smoothed == pytest.approx(ref_loss.item(), rel=1e-5)
    for part in (client_part.bottom, client_part.top, server_part):
        for key, p in part.adapter.items():
            assert torch.allclose(grads[id(p)], ref[key], atol=1e-6, rtol=1e-4), key


class RecordingLink(Link):
    """A link that keeps every message the client sends (up) as the server would receive it."""

    def __init__(self, precision="fp32"):
        super().__init__(precision)
        self.sent: list[dict[str, torch.Tensor]] = []

    def up(self, tensors, cid=-1, kind="up"):
        out = super().up(tensors, cid, kind)
        self.sent.append(out)
        return out


def _readable(sent, token_ids: set[int]) -> list[str]:
    """Tensors the server could read as text: any integer tensor, or a float sequence (>= 8 values,
    not all the same, e.g. not a zero-initialised LoRA B or an optimizer step count) of token ids."""
    found = []
    for msg in sent:
        for name, t in msg.items():
            if name.endswith(".rng"):   # a client state's dropout-generator bytes: seeded from the run's seed,
                continue                # which the server knows (runtime.role_seed), so they tell it nothing
            if not t.is_floating_point() and t.dtype != torch.bool:
                found.append(name)
            elif t.is_floating_point() and t.numel() >= 8 and t.unique().numel() > 1 \
                    and bool(((t == t.round()) & (t >= 0)).all()) and set(t.unique().long().tolist()) <= token_ids:
                found.append(name)
    return found


@pytest.mark.parametrize("top_layers", [0, 1])
def test_no_token_or_label_leaves_a_ushaped_client(top_layers, make_config):
    run = build_run(make_config({"model.top_layers": top_layers, "model.split_layer": 1, "train.max_steps": 2}))
    s = run.strategy
    link = RecordingLink()
    for c in s.clients:
        c.link = link
    s.s.link = link
    for t in range(2):   # two split steps and an aggregation (adapters go up too)
        s.step(t)
    vocab = set(range(run.template.get_base_model().config.vocab_size))
    readable = _readable(link.sent, vocab)
    if top_layers:
        assert readable == [] and len(link.sent) > 4
        assert all(set(m) <= {"activations", "attention_mask", "activations_grad"} or
                   all(".lora_" in k for k in m) for m in link.sent)
    else:
        assert "labels" in readable   # the normal split sends the target tokens: the check can fail


@pytest.mark.parametrize("name", ["dlora", "hsplitlora", "hetlora"])
def test_no_token_or_label_leaves_a_ushaped_client_of_any_split_strategy(name, make_config):
    run = build_run(make_config({**SPLIT_STRATEGIES[name], "model.top_layers": 1, "model.split_layer": 1}))
    s = run.strategy
    link = RecordingLink()
    for c in s.clients:
        c.link = link
    s.s.link = link
    for t in range(2):
        s.step(t)
    assert _readable(link.sent, set(range(run.template.get_base_model().config.vocab_size))) == []
    kinds = {kind for _, kind, _ in link.take_log()}
    assert {"smashed", "top_grad", "adapter_up"} <= kinds and "labels" not in str(link.sent)


SPLIT_STRATEGIES = {
    "splitlora": {}, "sl": {"strategy.name": "sl"},
    "dlora": {"strategy.name": "dlora", "dlora.warmup_steps": 0},
    "hsplitlora": {"strategy.name": "hsplitlora", "strategy.num_clients": 3, "strategy.aggregation_interval": 2,
                   "train.eval_interval": 2, "lora.rank": 8, "cost.clients": ["phone", "edge", "laptop"],
                   "hsplit.client_step_s": 2e-3, "hsplit.max_split_layer": 3},   # U-shaped: splits 1, 2, 2
}
SPLIT_STRATEGIES["hetlora"] = {**SPLIT_STRATEGIES["hsplitlora"], "strategy.name": "hetlora"}


@pytest.mark.parametrize("name", list(SPLIT_STRATEGIES))
def test_ushape_trains_and_exports_one_adapter(name, make_config, tmp_path):
    """Every split strategy trains U-shaped and exports one PEFT adapter of the whole model, whose
    validation loss (the exported adapter on the base, unsplit) is the run's final one."""
    from peft import PeftModel

    from splitlora import data as D
    from splitlora.models import tiny_model

    cfg = make_config({**SPLIT_STRATEGIES[name], "model.top_layers": 1, "model.split_layer": 1, "train.max_steps": 4})
    summary = run_training(cfg, tmp_path / name)
    rows = read_metrics(tmp_path / name)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert summary["bytes_down"] > 0 and summary["client_flops"] > 0
    run = build_run(cfg)
    model = PeftModel.from_pretrained(tiny_model("llama", seed=cfg.train.seed).model, tmp_path / name / "adapter")
    assert set(get_peft_model_state_dict(model)) == set(get_peft_model_state_dict(run.template))
    model.eval()
    total = tokens = 0
    with torch.no_grad():
        for i in range(0, len(run.val_features), 8):
            batch = D.collate(run.val_features[i:i + 8], run.tokenizer.pad_token_id)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += lm_loss(model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
                             batch["labels"], 0.0).item() * n
            tokens += n
    assert total / tokens == pytest.approx(summary["final_val_loss"], rel=1e-4)


def test_ushape_errors_name_the_fields(make_config, tmp_path):
    with pytest.raises(ConfigError, match="model.split_layer / model.top_layers"):
        build_run(make_config({"model.top_layers": 3, "model.split_layer": 1}))
    for name in ("fedlora", "cenlora"):
        with pytest.raises(ConfigError, match=f"model.top_layers: {name} trains the whole model in one place"):
            build_run(make_config({"model.top_layers": 1, "model.split_layer": 1, "strategy.name": name}))


def test_deployed_ushape_equals_simulator_and_sends_no_tokens(make_config, tmp_path, monkeypatch):
    """Over the network (mutual TLS, real client processes): the same losses and adapter as the
    simulator, and every message the server receives is free of token ids and labels."""
    import splitlora.transport.server as remote
    from test_deploy import BASE, run_clients, start, wait_all

    from splitlora.transport.certs import create_certs

    certs = tmp_path / "certs"
    create_certs(certs, 2)
    cfg = make_config({**BASE, "model.top_layers": 1, "model.split_layer": 1})
    run_training(cfg, tmp_path / "sim")
    received = []
    original = remote.unpack

    def recording(data, *limits):
        kind, tensors, meta = original(data, *limits)
        received.append(tensors)
        return kind, tensors, meta

    monkeypatch.setattr(remote, "unpack", recording)
    t, port, _, result = start(cfg, tmp_path / "dep", certs)
    wait_all(run_clients(cfg, port, certs, tmp_path), t, result)
    sim, dep = read_metrics(tmp_path / "sim"), read_metrics(tmp_path / "dep")
    assert [r["train_loss"] for r in dep] == [r["train_loss"] for r in sim]
    assert [r["val_loss"] for r in dep] == [r["val_loss"] for r in sim]
    sa, da = exported_adapter(tmp_path / "sim"), exported_adapter(tmp_path / "dep")
    assert all(torch.equal(sa[k], da[k]) for k in sa)
    vocab = set(range(build_run(cfg).template.get_base_model().config.vocab_size))
    assert sum(len(m) for m in received) > 10 and _readable(received, vocab) == []
