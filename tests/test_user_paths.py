"""What a user does besides the presets: a local Hugging Face model directory, their own JSONL data,
and the README's Python API example."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from conftest import read_metrics, write_config
from splitlora.config import load_config
from splitlora.models import tiny_model
from splitlora.train import train

README = Path(__file__).resolve().parents[1] / "README.md"


def test_local_hf_directory_and_jsonl_data(tmp_path, e2e_file):
    lm = tiny_model("llama", seed=3)
    model_dir = tmp_path / "my-model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    rows = [{"prompt": f"Q: what is {i} plus {i}? A:", "completion": f" {2 * i}"} for i in range(30)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = load_config(write_config(tmp_path, e2e_file, {
        "model.name": str(model_dir), "data.name": "jsonl", "data.train_file": str(data),
        "data.val_fraction": 0.2, "strategy.name": "splitlora", "train.max_steps": 3}))
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["step"] == 3 and summary["model"] == str(model_dir)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 1, 2, 3]
    # the local model is the one trained: its weights, not a fresh random init
    from splitlora.models import load_model
    loaded = load_model(str(model_dir)).model
    assert torch.equal(loaded.model.embed_tokens.weight, lm.model.model.embed_tokens.weight)


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    """The README's API walk-through, on the tiny Llama instead of SmolLM2 (same calls)."""
    block = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert "client.forward()" in block and "export_adapter" in block
    code = block.replace('"smollm2-135m-instruct"', '"tiny-llama"').replace("max_length=128", "max_length=256")
    monkeypatch.chdir(README.parent)
    namespace: dict = {}
    exec(compile(code.replace('"my_adapter"', repr(str(tmp_path / "adapter"))), "README", "exec"), namespace)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert namespace["link"].bytes_up > 0 and namespace["link"].bytes_down > 0
    assert namespace["loss"].smoothed > 0 and namespace["loss"].ce > 0


def test_readme_own_data_example_runs(tmp_path):
    """The README's worked example (a JSONL file of one's own, through datasets, with its own column names)
    command by command, on the tiny Llama and two steps."""
    import subprocess
    import sys

    block = re.search(r"## Your own data\n.*?```bash\n(.*?)```", README.read_text(), re.S).group(1)
    lines = [ln.split("  #")[0].strip() for ln in block.strip().splitlines()]
    assert lines[1].startswith("splitlora train") and lines[2].startswith("splitlora eval")
    assert lines[3].startswith("splitlora generate") and len(lines) == 4
    cli = str(Path(sys.executable).with_name("splitlora"))
    lines[1] += " --set model.name=tiny-llama --set train.max_steps=2 --set data.max_length=64 --no-progress"
    lines[2] += " --no-progress"
    (tmp_path / "runs").mkdir()
    for line in lines:
        line = line.replace("configs/demo.yaml", str(README.parent / "configs" / "demo.yaml"))
        line = re.sub(r"^splitlora ", cli + " ", re.sub(r"^python ", sys.executable + " ", line))
        done = subprocess.run(line, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (line, done.stderr[-2000:])
    metrics = json.loads((tmp_path / "runs" / "sums-eval" / "metrics.json").read_text())
    assert metrics["split"] == "validation" and metrics["num_mrs"] > 5
    assert len((tmp_path / "runs" / "sums-eval" / "predictions.txt").read_text().splitlines()) == metrics["num_mrs"]
    assert "exact_match" in metrics and "BLEU" in metrics
