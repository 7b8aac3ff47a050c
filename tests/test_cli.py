"""Every command of the command line runs on a tiny model for a step or two and writes what it says it
writes (so a refactor cannot break one unnoticed), and the command line's promises to a user hold: one
line per error, answered before torch is imported; a run is never silently replaced; SIGINT/SIGTERM
keep the work; short runs just work."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import read_metrics, write_config
from splitlora.cli import main
from splitlora.config import load_config

TINY_SETS = ["model.name=tiny-llama", "data.max_length=256", "data.val_max_samples=4", "train.max_steps=2",
             "train.eval_interval=2", "train.checkpoint_interval=2", "strategy.aggregation_interval=2",
             "hsplit.max_split_layer=3"]


def _cli() -> list[str]:
    return [sys.executable, "-m", "splitlora.cli"]


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(_cli() + args, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


# -- promises to a user -------------------------------------------------------------------------------

def test_help_and_config_errors_answer_before_torch_is_imported(tmp_path, e2e_file):
    """`--help` and a typo in a key must not wait for torch/transformers (seconds): checked by what is imported."""
    config = write_config(tmp_path, e2e_file)
    code = f"""
import sys
from splitlora.cli import main
rc = main(["train", "--config", {str(config)!r}, "--set", "train.lrr=1", "--output", {str(tmp_path / 'out')!r}])
heavy = sorted(m for m in ("torch", "transformers", "peft", "grpc") if m in sys.modules)
print(rc, heavy)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split("\n")[0] == "2 []", done.stdout + done.stderr
    # one line, naming the --set that gave the bad key (not the config file)
    assert done.stderr.strip() == "splitlora: error: --set train.lrr=1: train.lrr: unknown config key"
    assert not (tmp_path / "out").exists()
    helped = _run(["--help"])
    assert helped.returncode == 0 and "bench" in helped.stdout


def test_errors_name_their_source(tmp_path, e2e_file, capsys):
    config = write_config(tmp_path, e2e_file, {"train.lr": -1})
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "o")]) == 2
    assert f"{config}: train.lr: Input should be greater than 0" in capsys.readouterr().err
    good = write_config(tmp_path, e2e_file, name="good.yaml")
    assert main(["train", "--config", str(good), "--set", "train.lr=-1", "--output", str(tmp_path / "o")]) == 2
    assert "--set train.lr=-1: train.lr" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]) == 2
    assert "--resume: " in capsys.readouterr().err
    # a data error leaves no run directory behind
    assert main(["train", "--config", str(good), "--set", "data.train_file=missing.csv",
                 "--output", str(tmp_path / "o")]) == 2
    assert "data.train_file: file not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    assert main(["train", "--config", str(binary), "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_short_runs_clamp_warmup_with_a_warning(tmp_path, e2e_file, caplog):
    config = write_config(tmp_path, e2e_file, {"train.warmup_steps": 4})
    with caplog.at_level(logging.WARNING, logger="splitlora"):
        cfg = load_config(config, ["train.max_steps=2"])
    assert cfg.train.warmup_steps == 1
    assert "train.warmup_steps: 4 is not below train.max_steps (2); using 1" in caplog.text


def test_train_refuses_an_existing_run_unless_resumed_or_overwritten(tmp_path, e2e_file, capsys):
    config = write_config(tmp_path, e2e_file, {"train.max_steps": 2})
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--output", str(out), "--no-progress"]) == 0
    first = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--resume {out}" in err and "--overwrite" in err
    assert (out / "metrics.jsonl").read_text() == first            # nothing was touched
    assert main(["train", "--resume", str(out), "--output", str(out), "--no-progress"]) == 0   # already done
    assert (out / "metrics.jsonl").read_text() == first
    assert main(["train", "--config", str(config), "--output", str(out), "--no-progress", "--overwrite"]) == 0
    # --overwrite replaces only a run directory
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("mine")
    assert main(["train", "--config", str(config), "--output", str(other), "--overwrite"]) == 2
    assert "not a run directory" in capsys.readouterr().err and (other / "thesis.tex").exists()


def test_sigint_in_training_writes_a_checkpoint_and_the_run_resumes_exactly(make_config, tmp_path):
    from conftest import assert_states_equal, exported_adapter, run_training
    from splitlora.errors import Interrupted

    cfg = make_config({"train.max_steps": 5, "train.checkpoint_interval": 100, "lora.dropout": 0.1})
    run_training(cfg, tmp_path / "full")
    before = signal.getsignal(signal.SIGINT)   # the default, or SIG_IGN in a background job

    def interrupt(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)   # delivered to this (main) thread's handler

    with pytest.raises(Interrupted) as info:
        run_training(cfg, tmp_path / "cut", on_step=interrupt)
    assert info.value.step == 2 and info.value.signal_name == "SIGINT"
    assert json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())["step"] == 2
    assert signal.getsignal(signal.SIGINT) == before                       # handlers restored
    run_training(cfg, tmp_path / "cut", resume=tmp_path / "cut")
    assert_states_equal(exported_adapter(tmp_path / "cut"), exported_adapter(tmp_path / "full"))
    assert [r["train_loss"] for r in read_metrics(tmp_path / "cut")] == \
        [r["train_loss"] for r in read_metrics(tmp_path / "full")]


def test_sigterm_to_a_training_process_prints_one_line_to_resume(tmp_path, e2e_file):
    config = write_config(tmp_path, e2e_file, {"train.max_steps": 100000, "train.log_interval": 1})
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli() + ["train", "--config", str(config), "--output", str(out), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not ((out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"splitlora: stopped \(SIGTERM\) after step (\d+); checkpoint in {re.escape(str(out))}/checkpoint; "
                        rf"continue with: splitlora train --resume {re.escape(str(out))} --output {re.escape(str(out))}",
                        last), last
    step = int(re.search(r"after step (\d+)", last).group(1))
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == step


def test_metrics_log_the_plain_cross_entropy_beside_the_smoothed_loss(make_config, tmp_path):
    from conftest import run_training

    run_training(make_config({"train.label_smoothing": 0.1}), tmp_path / "a")
    run_training(make_config({"train.label_smoothing": 0.0}), tmp_path / "b")
    smoothed = [r for r in read_metrics(tmp_path / "a") if r["train_loss"] is not None]
    plain = [r for r in read_metrics(tmp_path / "b") if r["train_loss"] is not None]
    assert all(r["train_ce"] < r["train_loss"] for r in smoothed)
    assert all(r["train_ce"] == r["train_loss"] for r in plain)
    assert read_metrics(tmp_path / "a")[0]["train_ce"] is None


# -- every command, a step or two on a tiny model ----------------------------------------------------------

@pytest.fixture
def tiny_config(tmp_path, e2e_file) -> Path:
    return write_config(tmp_path, e2e_file, {"train.max_steps": 2})


@pytest.fixture
def tiny_run(tiny_config, tmp_path) -> Path:
    assert main(["train", "--config", str(tiny_config), "--output", str(tmp_path / "run"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["step"] == 2 and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    return tmp_path / "run"


def test_generate(tmp_path, e2e_file, capsys):
    """`splitlora generate RUN_DIR --prompt ...` decodes each prompt (merged and split: the same text)."""
    config = write_config(tmp_path, e2e_file, {"train.max_steps": 2})
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "run"), "--no-progress"]) == 0
    capsys.readouterr()
    outputs = []
    for mode in ("merged", "split"):
        assert main(["generate", str(tmp_path / "run"), "--prompt", "name : Alimentum||", "--prompt",
                     "name : Cotto | food : French||", "--max-new-tokens", "5", "--mode", mode]) == 0
        lines = [json.loads(ln) for ln in capsys.readouterr().out.strip().splitlines()]
        assert [ln["prompt"] for ln in lines] == ["name : Alimentum||", "name : Cotto | food : French||"]
        outputs.append([ln["output"] for ln in lines])
    assert outputs[0] == outputs[1]
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x"]) == 2


def test_score(tmp_path, capsys):
    refs, preds = tmp_path / "refs.txt", tmp_path / "preds.txt"
    refs.write_text("The Eagle is a pub.\nThe Eagle serves food.\n\nA cafe near the river.\n")
    preds.write_text("The Eagle is a pub.\nA cafe by the river.\n")
    assert main(["score", str(refs), str(preds)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert 0 < scores["BLEU"] <= 1 and scores["ROUGE_L"] > 0.5 and "CIDEr" in scores


def test_certs(tmp_path):
    assert main(["certs", "--output", str(tmp_path / "certs"), "--clients", "2"]) == 0
    assert {p.name for p in (tmp_path / "certs").iterdir()} >= {"ca.pem", "server.pem", "server.key",
                                                                "client-0.pem", "client-1.key"}


def test_serve_and_client_processes(tmp_path, e2e_file):
    config = write_config(tmp_path, e2e_file, {"train.max_steps": 2, "deploy.join_timeout_s": 120,
                                               "deploy.timeout_s": 60})
    out = tmp_path / "deployed"
    server = subprocess.Popen(_cli() + ["serve", "--config", str(config), "--address", "127.0.0.1:0", "--insecure",
                                        "--output", str(out), "--no-progress"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = server.stderr.readline()
    port = re.search(r"serving on port (\d+)", line)
    assert port, line
    clients = [subprocess.Popen(_cli() + ["client", "--config", str(config), "--client-id", str(i), "--insecure",
                                          "--server", f"127.0.0.1:{port.group(1)}"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}) for i in range(2)]
    for c in clients:
        _, err = c.communicate(timeout=300)
        assert c.returncode == 0, err
        assert "step 1/2" in err and "step 2/2" in err and "training finished" in err   # progress is shown
    stdout, err = server.communicate(timeout=300)
    assert server.returncode == 0, err
    assert json.loads(stdout)["step"] == 2 and (out / "adapter" / "adapter_model.safetensors").exists()


def test_calibrate(tiny_config, tmp_path):
    profiles = tmp_path / "profiles.json"
    assert main(["calibrate", "--config", str(tiny_config), "--output", str(profiles), "--steps", "2"]) == 0
    written = json.loads(profiles.read_text())
    assert {"local-client", "local-server"} <= set(written)
    report = json.loads((tmp_path / "profiles.json.report.json").read_text())
    assert set(report["check"]) == {"sl", "fedlora"}


def test_compare(tiny_config, tmp_path):
    out = tmp_path / "compare"
    assert main(["compare", "--config", str(tiny_config), "--strategies", "cenlora,splitlora", "--samples", "8",
                 "--output", str(out), "--no-progress"]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert set(result["strategies"]) == {"cenlora", "splitlora"} and result["samples_budget"] == 8
    assert (out / "report.md").read_text().strip()


def test_attack(tiny_run, tmp_path):
    assert main(["attack", str(tiny_run), "--output", str(tmp_path / "attack"), "--depths", "1", "--noise", "0",
                 "--top-layers", "", "--victims", "4", "--public", "40"]) == 0
    result = json.loads((tmp_path / "attack" / "attack.json").read_text())
    assert [(r["channel"], r["depth"]) for r in result["results"]] == [("activations", 1)]
    assert (tmp_path / "attack" / "attack.png").stat().st_size > 0


def test_bench_overhead(tmp_path):
    out = tmp_path / "overhead.json"
    assert main(["bench", "overhead", "--output", str(out), "--model", "tiny-llama", "--steps", "2",
                 "--split-layer", "2"]) == 0
    result = json.loads(out.read_text())
    assert result["ratio"] > 0 and len(result["split_step_s"]) == 2 and result["bytes_up_per_step"] > 0
    assert result["client_trainable_params"] > 0 and result["server_trainable_params"] > 0


def test_bench_deploy(tmp_path, e2e_file):
    out = tmp_path / "deploy.json"
    assert main(["bench", "deploy", "--output", str(out), "--model", "tiny-llama", "--steps", "3",
                 "--split-layer", "2", "--precisions", "fp32", "--workdir", str(tmp_path / "work"),
                 *sets(f"data.train_file={e2e_file}", "data.max_length=256", "data.val_max_samples=4")]) == 0
    result = json.loads(out.read_text())
    assert set(result["precisions"]) == {"fp32"} and result["precisions"]["fp32"]["same_losses"]
    assert result["step_ratio"]["fp32"] > 0 and result["rss_ratio"] > 0


def test_bench_hetero(tmp_path, e2e_file):
    out = tmp_path / "hetero.json"
    args = ["bench", "hetero", "--output", str(out), "--workdir", str(tmp_path / "work"), "--seeds", "0,1",
            "--intervals", "2", "--partitions", "iid", "--weakest", "iid@2",
            *sets(*TINY_SETS, f"data.train_file={e2e_file}", "train.max_steps=4")]
    assert main(args) == 0
    result = json.loads(out.read_text())
    setting = result["settings"]["iid@2"]
    assert set(setting["runs"]) == {"stack_fold", "stack_svd", "stack_keep", "zero_pad", "splitlora_weakest"}
    assert [r["strategy"] for r in setting["runs"]["zero_pad"]] == ["hetlora", "hetlora"]
    assert all(len(rs) == 2 and all(r["final_val_loss"] > 0 and r["curve"] for r in rs) for rs in setting["runs"].values())
    summary = setting["summary"]
    final = summary["variants"]["stack_keep"]["final_val_loss"]
    assert final["n"] == 2 and final["sd"] >= 0 and final["mean"] == pytest.approx(sum(final["values"]) / 2)
    # a seed's target is its worst aggregation's final loss: every aggregation reaches it in every seed
    assert summary["target_val_loss"]["0"] == max(v["final_val_loss"]["values"][0] for k, v in summary["variants"].items()
                                                  if k != "splitlora_weakest")
    assert all(v["samples_to_target"]["reached"] == 2 for k, v in summary["variants"].items() if k != "splitlora_weakest")
    assert set(result["dlora"]["runs"]) == {"dlora", "splitlora"}
    # --reuse reads every finished run instead of training it again; a subset of aggregations, no dlora
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("summary.json")}
    out.unlink()
    assert main([*args, "--reuse", "--aggregations", "stack_keep,zero_pad", "--no-dlora"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("summary.json")} == before
    again = json.loads(out.read_text())
    assert set(again["settings"]["iid@2"]["runs"]) == {"stack_keep", "zero_pad", "splitlora_weakest"}
    assert "dlora" not in again
    assert again["settings"]["iid@2"]["runs"]["stack_keep"] == setting["runs"]["stack_keep"]


def test_bench_noise(tmp_path, e2e_file):
    out = tmp_path / "noise.json"
    config = write_config(tmp_path, e2e_file, {"train.max_steps": 2})
    assert main(["bench", "noise", "--output", str(out), "--config", str(config), "--noise", "0.5",
                 "--clip-norm", "100", "--workdir", str(tmp_path / "work")]) == 0
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"clean", "act-0.5"}
    assert result["runs"]["act-0.5"]["val_loss_noisy_split"] > 0


def test_bench_precision(tmp_path, e2e_file):
    out = tmp_path / "precision.json"
    config = write_config(tmp_path, e2e_file, {"train.max_steps": 2})
    assert main(["bench", "precision", "--output", str(out), "--config", str(config),
                 "--workdir", str(tmp_path / "work")]) == 0
    result = json.loads(out.read_text())
    assert set(result["final_val_loss"]) == {"fp32", "bf16-autocast", "bf16"}
    assert result["step_ratio_to_fp32"]["fp32"] == 1.0 and all(v > 0 for v in result["peak_rss_mib"].values())
    assert all(abs(v) < 0.05 for v in result["val_loss_relative_to_fp32"].values())


def test_bench_scale(tmp_path, e2e_file):
    out = tmp_path / "scale.json"
    assert main(["bench", "scale", "--output", str(out), "--clients", "1,2", "--steps", "3",
                 "--workdir", str(tmp_path / "work"), *sets(f"data.train_file={e2e_file}", "data.val_max_samples=4")]) == 0
    result = json.loads(out.read_text())
    assert result["all_completed"] and set(result["runs"]) == {"1", "2"}
    two = result["runs"]["2"]
    assert two["step_s"] > 0 and set(two["message_bytes_per_client_run"]) == {"0", "1"}
    assert all(b > 0 for b in two["message_bytes_per_client_run"].values()) and two["bytes_per_client_and_step"] > 0


def test_bench_memory(tmp_path):
    out = tmp_path / "memory.json"
    assert main(["bench", "memory", "--output", str(out), "--shapes", "tiny", "--variants", "bf16,nf4",
                 "--sides", "server"]) == 0
    cases = {c["variant"]: c for c in json.loads(out.read_text())["cases"]}
    assert set(cases) == {"bf16", "nf4"} and all(c["measured"] and c["step_s"] > 0 for c in cases.values())
    assert cases["nf4"]["frozen_bytes"] < cases["bf16"]["frozen_bytes"]


def test_bench_memory_estimates_fp32_from_a_later_bf16_case():
    """A part too large for fp32 is estimated from its bf16 case, measured after it in the run's order."""
    from splitlora.experiments.memory import estimate

    cases = [{"shape": "s", "side": "server", "variant": "fp32", "measured": False, "params": 10, "estimate": "."},
             {"shape": "s", "side": "client", "variant": "bf16", "measured": True, "peak_bytes": 7},
             {"shape": "s", "side": "server", "variant": "bf16", "measured": True, "peak_bytes": 100}]
    estimate(cases)
    assert cases[0]["peak_bytes"] == 120


def test_gpu_script_runs_its_steps(tmp_path):
    """benchmarks/gpu.sh, in its CPU smoke mode (shape:tiny): every step runs and writes its JSON."""
    import os
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"
    env = {**os.environ, "SPLITLORA_GPU_SMOKE": "1", "SPLITLORA_WHEELS": str(tmp_path / "none"),
           "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(script), str(tmp_path / "gpu")], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    overhead = json.loads((tmp_path / "gpu" / "overhead-tiny-bf16.json").read_text())
    assert overhead["runtime"]["dtype"] == "bfloat16" and overhead["mfu"]["split"] > 0
    memory = json.loads((tmp_path / "gpu" / "memory-tiny.json").read_text())
    assert [(c["side"], c["variant"], c["measured"]) for c in memory["cases"]] == [("server", "nf4", True)]
    assert "all done" in done.stdout


def test_every_command_and_bench_has_a_smoke_test():
    """A new command or bench without a test here fails this test."""
    from splitlora.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    commands = set(sub.choices)
    benches = set(next(a for a in sub.choices["bench"]._actions if a.dest == "which").choices)
    tested = {name[len("test_"):] for name in globals() if name.startswith("test_")}
    tested |= {"train"} if "test_train_refuses_an_existing_run_unless_resumed_or_overwritten" in globals() else set()
    tested |= {"eval"}   # tests/test_decode.py::test_eval_cli_writes_official_format_files
    tested |= {"serve", "client"} if "test_serve_and_client_processes" in globals() else set()
    assert commands - {"bench"} <= tested, sorted(commands - tested)
    assert {f"bench_{b}" for b in benches} <= tested, sorted({f"bench_{b}" for b in benches} - tested)
