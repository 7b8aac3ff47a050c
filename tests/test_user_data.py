"""Users' own data: local datasets through `datasets` in every format, chat templates with the loss on the
assistant's turns only, partitions over any column, evaluation of any task, `splitlora generate`, and
TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import read_metrics, write_config

import splitlora.data as D
from splitlora.chat import Chat
from splitlora.cli import main
from splitlora.config import ConfigError, load_config
from splitlora.errors import DataError
from splitlora.hfdata import load_hf
from splitlora.models import byte_tokenizer
from splitlora.train import load_examples, train

EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "examples"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def data_section(**kw):
    return load_config(None, [f"data.{k}={json.dumps(v) if not isinstance(v, str) else v}"
                              for k, v in {"name": "hf", **kw}.items()]).data


def chat_tokenizer():
    tok = byte_tokenizer()
    tok.chat_template = CHATML
    return tok


def trained_text(feature: dict, tok) -> list[str]:
    """The runs of label tokens in the loss, decoded."""
    runs, current = [], []
    for label in feature["labels"]:
        if label == D.IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    if current:
        runs.append(current)
    return [tok.decode(r) for r in runs]


# -- formats and files ----------------------------------------------------------------------------------

def test_each_example_file_loads_in_its_format():
    tok = byte_tokenizer()
    alpaca = load_hf(data_section(path=str(EXAMPLES / "alpaca.jsonl"), format="alpaca"), tok)
    assert len(alpaca) == 300 and alpaca[0].prompt.startswith("Below is an instruction")
    assert "### Input:\nname: " in alpaca[0].prompt and alpaca[0].prompt.endswith("### Response:\n")
    assert alpaca[0].attributes["eatType"] and "output" not in alpaca[0].attributes
    family = load_hf(data_section(path=str(EXAMPLES / "family.csv"), fields={"prompt": "question",
                                                                            "completion": "answer"}), tok)
    assert {ex.completion for ex in family} == {" yes", " no"} and "area" in family[0].attributes
    text = load_hf(data_section(path=str(EXAMPLES / "text.parquet"), format="text"), tok)
    assert len(text) == 300 and text[0].prompt == "" and text[0].completion
    chat = load_hf(data_section(path=str(EXAMPLES / "chat.jsonl"), format="messages"), tok)
    assert len(chat) == 200 and chat[0].segments and chat[0].completion.endswith("food.")


def test_a_saved_dataset_directory_with_splits_and_slices(tmp_path):
    import datasets

    rows = [{"prompt": f"Q{i}:", "completion": f" A{i}"} for i in range(20)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:16]),
                          "validation": datasets.Dataset.from_list(rows[16:])}).save_to_disk(tmp_path / "saved")
    tok = byte_tokenizer()
    d = data_section(path=str(tmp_path / "saved"))
    assert [ex.prompt for ex in load_hf(d, tok)] == [f"Q{i}:" for i in range(16)]
    assert [ex.prompt for ex in load_hf(d, tok, "validation")] == ["Q16:", "Q17:", "Q18:", "Q19:"]
    assert [ex.prompt for ex in load_hf(d, tok, "train[:25%]")] == ["Q0:", "Q1:", "Q2:", "Q3:"]
    assert [ex.prompt for ex in load_hf(d, tok, "train[14:]")] == ["Q14:", "Q15:"]
    with pytest.raises(DataError, match="has splits train, validation, not 'test'"):
        load_hf(d, tok, "test")
    # a file takes datasets' own split syntax
    (tmp_path / "f.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert len(load_hf(data_section(path=str(tmp_path / "f.jsonl"), split="train[:50%]"), tok)) == 10


def test_only_the_rows_kept_become_examples(tmp_path, monkeypatch):
    """A large file stays in memory-mapped Arrow: max_samples rows are converted, the rest never are."""
    import splitlora.formats.prompt_completion as pc

    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f" c{i}"}) + "\n" for i in range(20_000)))
    converted = []
    real = pc.example
    monkeypatch.setattr(pc, "example", lambda *a: converted.append(1) or real(*a))
    examples = load_hf(data_section(path=str(path), max_samples=50), byte_tokenizer())
    assert len(examples) == len(converted) == 50
    from splitlora.hfdata import open_split
    assert open_split(path, "train").cache_files    # Arrow files on disk, memory-mapped


def test_bad_data_names_the_field_row_or_file(tmp_path):
    tok = byte_tokenizer()
    with pytest.raises(DataError, match=r"row 0: no column 'prompt' .*data.fields.prompt.*question"):
        load_hf(data_section(path=str(EXAMPLES / "family.csv")), tok)
    with pytest.raises(DataError, match="data.fields: answer not a key of format 'prompt_completion'"):
        load_hf(data_section(path=str(EXAMPLES / "family.csv"), fields={"answer": "x"}), tok)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="row 0: no assistant turn"):
        load_hf(data_section(path=str(tmp_path / "bad.jsonl"), format="messages"), tok)
    with pytest.raises(DataError, match="data.path"):
        load_hf(data_section(path=str(tmp_path / "missing.jsonl")), tok)
    with pytest.raises(ConfigError, match="data.path"):
        load_config(None, ["data.name=hf"])
    with pytest.raises(ConfigError, match="unknown data format 'sharegpt'"):
        load_config(None, ["data.name=hf", "data.path=x", "data.format=sharegpt"])


# -- chat templates -----------------------------------------------------------------------------------------

def test_the_loss_falls_on_exactly_the_assistant_turns_multi_turn_included():
    tok = chat_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Food?"},
                {"role": "assistant", "content": "French."}]
    ex = load_hf_rows([{"messages": messages}], tok, format="messages", chat_template="auto")[0]
    feature = D.tokenize([ex], tok, 512)[0]
    assert trained_text(feature, tok) == ["Hello.<|im_end|>\n", "French.<|im_end|>\n"]
    # the tokens are the whole conversation as the template renders it, tokenized at once
    assert tok.decode(feature["input_ids"]) == tok.apply_chat_template(messages, tokenize=False)
    # decoding starts from everything before the last assistant turn and the generation prompt
    assert ex.prompt.endswith("<|im_start|>user\nFood?<|im_end|>\n<|im_start|>assistant\n")
    assert ex.completion == "French."


def test_prompt_completion_and_alpaca_with_a_template_are_a_user_turn_and_the_answer():
    tok = chat_tokenizer()
    ex = load_hf_rows([{"instruction": "Add.", "input": "2 and 3", "output": "5"}], tok, format="alpaca",
                      chat_template="auto")[0]
    assert trained_text(D.tokenize([ex], tok, 512)[0], tok) == ["5<|im_end|>\n"]
    assert ex.prompt == "<|im_start|>user\nAdd.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n"
    # no template (none, or a tokenizer without one): the plain texts, as before
    plain = load_hf_rows([{"prompt": "Q:", "completion": " A"}], tok, chat_template="none")[0]
    assert (plain.prompt, plain.completion, plain.segments) == ("Q:", " A", ())


def test_messages_without_a_template_render_plainly_and_stop_at_end_of_text():
    tok = byte_tokenizer()
    ex = load_hf_rows([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}],
                      tok, format="messages", chat_template="auto")[0]
    assert trained_text(D.tokenize([ex], tok, 512)[0], tok) == ["Yo<|endoftext|>\n"]
    assert ex.prompt == "user: Hi\nassistant: "


def test_a_template_that_rewrites_earlier_turns_is_refused():
    tok = byte_tokenizer()   # renders the last message differently from the same message earlier
    tok.chat_template = ("{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]{% else %}"
                         "{{ m['content'] }}{% endif %}{% endfor %}")
    with pytest.raises(DataError, match="chat template"):
        Chat(tok).segments([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}])


def load_hf_rows(rows: list[dict], tok, tmp=None, **kw):
    import tempfile

    path = Path(tmp or tempfile.mkdtemp()) / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_hf(data_section(path=str(path), **kw), tok)


# -- partitions -------------------------------------------------------------------------------------------------

def test_partitions_over_any_column_and_quantity_skew():
    examples = [D.Example(f"p{i}", " c", {"label": "ab"[i % 2], "source": "xyz"[i % 3]}, f"p{i}") for i in range(60)]
    per_value = D.partition(examples, 3, "attribute", 0, attribute="source")
    assert [{ex.attributes["source"] for ex in p} for p in per_value] == [{"x"}, {"y"}, {"z"}]
    skewed = D.partition(examples, 2, "dirichlet", 0, attribute="label", alpha=0.1)
    assert sum(len(p) for p in skewed) == 60
    given = D.partition(examples, 3, "quantity", 0, sizes=[1, 2, 3])
    assert [len(p) for p in given] == [10, 20, 30]
    drawn = D.partition(examples, 4, "quantity", 0, power_law=1.0)
    assert sum(len(p) for p in drawn) == 60 and min(len(p) for p in drawn) >= 1 and len({len(p) for p in drawn}) > 1
    assert drawn == D.partition(examples, 4, "quantity", 0, power_law=1.0)     # seeded
    summary = D.partition_summary(per_value, "source")
    assert summary[0] == {"client": 0, "examples": 20, "source": {"x": 20}}
    with pytest.raises(DataError, match="client_sizes"):
        D.partition(examples, 3, "quantity", 0, sizes=[1, 2])


# -- shipped configs, evaluation, generate, TensorBoard ----------------------------------------------------------

def tiny(path: str, e2e_file, tmp_path, **extra) -> Path:
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / path, [
        "model.name=tiny-llama", "data.max_length=512", "data.val_max_samples=4", "train.max_steps=2",
        "train.warmup_steps=0", "train.eval_interval=2", "train.checkpoint_interval=2",
        "strategy.aggregation_interval=2", *[f"{k}={v}" for k, v in extra.items()]])
    run = tmp_path / Path(path).stem
    train(cfg, run, progress=False)
    return run


def test_a_classification_run_writes_its_partition_evaluates_exact_match_and_generates(e2e_file, tmp_path,
                                                                                       capsys):
    run = tiny("data-family.yaml", e2e_file, tmp_path)
    partition = json.loads((run / "partition.json").read_text())
    assert [sorted(p["area"]) for p in partition] == [["city centre"], ["none"], ["riverside"]]
    assert sum(p["examples"] for p in partition) == 270      # 300 rows less the 10 % held out
    out = tmp_path / "eval"
    assert main(["eval", str(run), "--split", "validation", "--output", str(out), "--limit", "3", "--greedy",
                 "--max-new-tokens", "3", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"exact_match", "BLEU", "ROUGE_L", "perplexity", "bleu_signature"} <= set(metrics)
    assert "NIST" not in metrics and 0 <= metrics["exact_match"] <= 1 and metrics["perplexity"] > 1
    assert "exact_match" in capsys.readouterr().out
    assert main(["eval", str(run), "--output", str(out)]) == 2          # no E2E test set for this run
    assert main(["generate", str(run), "--prompt", "Is this place family friendly? Yes.\nAnswer:",
                 "--max-new-tokens", "3"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompt"].startswith("Is this place") and isinstance(line["output"], str)


def test_a_chat_run_trains_on_its_template_and_generate_renders_the_prompt_the_same_way(e2e_file, tmp_path,
                                                                                       monkeypatch, capsys):
    import splitlora.decode as dec
    import splitlora.models as M

    real = M.tiny_model

    def with_template(*a, **kw):
        lm = real(*a, **kw)
        lm.tokenizer.chat_template = CHATML
        return lm

    monkeypatch.setattr(M, "tiny_model", with_template)
    run = tiny("data-chat.yaml", e2e_file, tmp_path)
    assert json.loads((run / "partition.json").read_text())[0]["food"]
    seen = []
    monkeypatch.setattr(dec, "generate", lambda model, tok, prompts, cfg, progress=None:
                        (seen.extend(prompts) or ["x"] * len(prompts), {}))
    assert main(["generate", str(run), "--prompt", "What food?"]) == 0
    assert seen == ["<|im_start|>user\nWhat food?<|im_end|>\n<|im_start|>assistant\n"]


def test_a_text_run_evaluates_perplexity_and_writes_tensorboard_scalars(e2e_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tiny("data-text.yaml", e2e_file, tmp_path)
    sizes = [p["examples"] for p in json.loads((run / "partition.json").read_text())]
    assert sum(sizes) == 270 and len(set(sizes)) > 1          # a power-law quantity skew
    from splitlora.evaluate import evaluate

    result = evaluate(run, tmp_path / "eval", None, split="validation", limit=5, progress=False)
    assert set(result) >= {"perplexity", "num_examples"} and result["num_examples"] == 5
    events = EventAccumulator(str(run / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "val_loss", "bytes_up", "sim_time_s", "client_compute_s", "live_clients"} <= tags
    steps = [e.step for e in events.Scalars("val_loss")]
    assert steps == [r["step"] for r in read_metrics(run) if r["val_loss"] is not None]


def test_e2e_and_jsonl_data_can_be_rendered_with_a_chat_template(make_config, monkeypatch):
    cfg = make_config({"data.chat_template": "auto"})
    tok = chat_tokenizer()
    train_ex, val_ex = load_examples(cfg, tok)
    assert train_ex[0].prompt.startswith("<|im_start|>user\nname : ") and train_ex[0].segments
    assert trained_text(D.tokenize(train_ex[:1], tok, 512)[0], tok) == [train_ex[0].completion + "<|im_end|>\n"]
    plain, _ = load_examples(make_config(), tok)
    assert plain[0].segments == () and plain[0].group == train_ex[0].group


def test_compare_writes_one_tensorboard_run_per_strategy(make_config, tmp_path):
    from splitlora.experiments.compare import compare

    cfg = make_config({"train.max_steps": 2, "train.eval_interval": 1, "train.tensorboard": True})
    compare(cfg, ["cenlora", "splitlora"], tmp_path / "cmp", target=10.0, progress=False)
    for name in ("cenlora", "splitlora"):
        assert list((tmp_path / "cmp" / name / "tb").glob("events.out.tfevents.*")), name


def test_write_config_accepts_hf_data(tmp_path, e2e_file):
    path = write_config(tmp_path, e2e_file, {"data.name": "hf", "data.path": str(EXAMPLES / "alpaca.jsonl"),
                                             "data.format": "alpaca"})
    assert load_config(path).data.format == "alpaca"
