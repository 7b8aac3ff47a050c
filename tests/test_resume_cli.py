"""Resuming from a checkpoint continues the run exactly; the CLI reports user errors in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig

from splitlora.cli import main
from splitlora.models import byte_tokenizer

from conftest import assert_states_equal, exported_adapter, read_metrics, run_training, train_losses, write_config


class Interrupt(Exception):
    pass


def interrupt_after(step_to_fail: int):
    def on_step(step: int) -> None:
        if step == step_to_fail:
            raise Interrupt(step)
    return on_step


def run_interrupted_and_resumed(cfg, tmp_path: Path) -> tuple[Path, Path]:
    """(uninterrupted run dir, resumed run dir): 6 steps with checkpoints at 3 and 6; the interrupted run
    dies after step 4, so the resumed run restarts from the step-3 checkpoint and redoes step 4."""
    full, broken, resumed = tmp_path / "full", tmp_path / "broken", tmp_path / "resumed"
    run_training(cfg, full)
    with pytest.raises(Interrupt):
        run_training(cfg, broken, on_step=interrupt_after(4))
    assert json.loads((broken / "checkpoint" / "state.json").read_text())["step"] == 3
    assert not (broken / "adapter").exists()
    run_training(cfg, resumed, resume=broken)
    return full, resumed


RESUME_STRATEGIES = {
    "splitlora-per_client": {"strategy.name": "splitlora", "strategy.server_mode": "per_client"},
    "sl": {"strategy.name": "sl"},
    # every client adapter dies at step 4 (judged at the aggregations of steps 2 and 4), revives at 5, dies at 6
    "dlora": {"strategy.name": "dlora", "dlora.warmup_steps": 0, "dlora.threshold": 1e9, "dlora.revive_interval": 5},
}


@pytest.mark.parametrize("label", list(RESUME_STRATEGIES))
def test_resume_equals_uninterrupted(label, make_config, tmp_path):
    # lora dropout 0.1: the dropout masks of steps 4-6 come from the torch RNG, so they only match if the
    # checkpoint restores the RNG state (and not just the adapters, optimizer moments and data streams).
    cfg = make_config({**RESUME_STRATEGIES[label], "lora.dropout": 0.1, "train.max_steps": 6,
                       "train.checkpoint_interval": 3, "train.log_interval": 1, "train.eval_interval": 3,
                       "strategy.aggregation_interval": 2})
    full, resumed = run_interrupted_and_resumed(cfg, tmp_path)

    assert_states_equal(exported_adapter(resumed), exported_adapter(full))
    assert train_losses(resumed) == train_losses(full)
    assert [s for s, _ in train_losses(full)] == [1, 2, 3, 4, 5, 6]
    a, b = read_metrics(full), read_metrics(resumed)
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for key in ("round", "val_loss", "bytes_up", "bytes_down", "samples_seen", "client_flops", "sim_time_s"):
        assert [r[key] for r in b] == [r[key] for r in a], key
    if label == "dlora":
        assert [r["alive_client_adapters"] for r in b] == [r["alive_client_adapters"] for r in a]
        assert [r["alive_client_adapters"] == 0 for r in a] == [False] * 4 + [True, False, True]


def test_resume_train_loss_window_across_checkpoint(make_config, tmp_path):
    # log at 2, 4, 6; checkpoint at 3: the record at step 4 should average steps 3 and 4.
    cfg = make_config({"lora.dropout": 0.1, "train.max_steps": 6, "train.checkpoint_interval": 3,
                       "train.log_interval": 2})
    full, resumed = run_interrupted_and_resumed(cfg, tmp_path)
    assert_states_equal(exported_adapter(resumed), exported_adapter(full))   # training itself is exact
    assert train_losses(resumed) == train_losses(full)                         # the log is not


def test_resume_of_a_finished_run_changes_nothing(make_config, tmp_path):
    cfg = make_config({"train.max_steps": 2, "train.checkpoint_interval": 1})
    run_training(cfg, tmp_path / "a")
    run_training(cfg, tmp_path / "b", resume=tmp_path / "a")
    assert_states_equal(exported_adapter(tmp_path / "b"), exported_adapter(tmp_path / "a"))
    assert read_metrics(tmp_path / "b") == read_metrics(tmp_path / "a")


# --- CLI errors ---------------------------------------------------------------------------------------------


@pytest.fixture
def config_file(tmp_path, e2e_file) -> Path:
    return write_config(tmp_path, e2e_file, {"train.max_steps": 2})


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; it must return 2 and print exactly one line, without a traceback."""
    capsys.readouterr()   # drop whatever the test itself printed
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    # transformers' own "Loading weights" progress bar (when a local model directory is read) is not ours
    lines = [ln for ln in captured.err.splitlines() if ln.strip() and not ln.startswith("Loading weights")]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("splitlora: error: ")
    return lines[0]


def train_argv(config: Path, tmp_path: Path, *sets: str) -> list[str]:
    argv = ["train", "--config", str(config), "--output", str(tmp_path / "out"), "--no-progress"]
    for s in sets:
        argv += ["--set", s]
    return argv


def test_cli_unknown_config_key(capsys, config_file, tmp_path):
    line = cli_error(capsys, train_argv(config_file, tmp_path, "train.lrr=1"))
    assert "train.lrr" in line and "unknown" in line


def test_cli_split_layer_out_of_range(capsys, config_file, tmp_path):
    line = cli_error(capsys, train_argv(config_file, tmp_path, "model.split_layer=9"))
    assert "model.split_layer" in line and "9" in line


def test_cli_split_layer_zero(capsys, config_file, tmp_path):
    assert "model.split_layer" in cli_error(capsys, train_argv(config_file, tmp_path, "model.split_layer=0"))


def test_cli_missing_model_directory(capsys, config_file, tmp_path):
    line = cli_error(capsys, train_argv(config_file, tmp_path, "model.name=/nonexistent"))
    assert "model.name" in line and "/nonexistent" in line


def test_cli_missing_data_file(capsys, config_file, tmp_path):
    line = cli_error(capsys, train_argv(config_file, tmp_path, "data.train_file=nope.csv"))
    assert "data.train_file" in line and "nope.csv" in line


def test_cli_unsupported_model_family(capsys, config_file, tmp_path):
    bloom_dir = tmp_path / "tiny-bloom"    # ALiBi positions, its own layout: no family, refused by the check
    config = BloomConfig(vocab_size=258, hidden_size=16, n_layer=2, n_head=2, pad_token_id=257)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(bloom_dir)
    byte_tokenizer().save_pretrained(bloom_dir)
    line = cli_error(capsys, train_argv(config_file, tmp_path, f"model.name={bloom_dir}"))
    assert "'bloom' is not supported" in line and "model.name" in line
    for supported in ("gpt2", "llama", "opt", "gemma2"):
        assert supported in line


def test_cli_missing_config_file(capsys, tmp_path):
    line = cli_error(capsys, ["train", "--config", str(tmp_path / "missing.yaml"), "--output", str(tmp_path / "o")])
    assert "--config" in line and "missing.yaml" in line


def test_cli_bad_set_syntax(capsys, config_file, tmp_path):
    assert "--set" in cli_error(capsys, train_argv(config_file, tmp_path, "train.lr"))


def test_cli_max_length_that_truncates_every_completion_names_the_field(capsys, config_file, tmp_path):
    # E2E prompts are longer than 16 bytes: every completion is truncated away, for every client
    assert "data.max_length" in cli_error(capsys, train_argv(config_file, tmp_path, "data.max_length=16"))


def test_cli_no_validation_set_does_not_blame_max_length(capsys, config_file, tmp_path):
    code = main(train_argv(config_file, tmp_path, "data.val_fraction=0"))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code == 2:   # an error is fine, as long as it names the field at fault
        assert "data.val_fraction" in err or "data.val_file" in err
    else:           # ... and so is training without validation
        assert code == 0


def test_cli_errors_leave_no_run_directory_contents(capsys, config_file, tmp_path):
    cli_error(capsys, train_argv(config_file, tmp_path, "model.split_layer=9"))
    out = tmp_path / "out"
    assert not (out / "metrics.jsonl").exists() and not (out / "adapter").exists()


# --- the real command ---------------------------------------------------------------------------------------


def test_cli_train_subprocess(config_file, tmp_path):
    script = Path(sys.executable).with_name("splitlora")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "splitlora.cli"]
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, "train", "--config", str(config_file), "--output", str(out)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    printed = json.loads(proc.stdout)
    assert printed["step"] == 2 and printed["adapter"] == str(out / "adapter")
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "checkpoint/state.json", "checkpoint/state.safetensors"):
        assert (out / name).is_file(), name
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 2 and summary["model"] == "tiny-llama"
