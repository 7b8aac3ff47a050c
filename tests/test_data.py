"""Tests for splitlora.data: loading, splitting, partitioning, tokenizing, batching."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from splitlora.data import (
    BatchStream,
    DataError,
    Example,
    collate,
    format_mr,
    group_references,
    load_e2e,
    load_jsonl,
    parse_mr,
    partition,
    split_by_group,
    tokenize,
)

E2E_DIR = Path(__file__).resolve().parents[1] / "data" / "e2e"
DEV_MR = "name[Alimentum], area[city centre], familyFriendly[no]"


@pytest.fixture(scope="module")
def dev() -> list[Example]:
    return load_e2e(E2E_DIR / "devset.csv")


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE with no merges: one token per byte, built in memory.
    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab["<eos>"] = len(vocab)
    vocab["<pad>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


# --- MR parsing / formatting ----------------------------------------------------


def test_parse_and_format_real_row():
    attrs = parse_mr(DEV_MR)
    assert attrs == {"name": "Alimentum", "area": "city centre", "familyFriendly": "no"}
    assert list(attrs) == ["name", "area", "familyFriendly"]
    assert format_mr(attrs) == "name : Alimentum | area : city centre | familyFriendly : no||"
    assert parse_mr("customer rating[5 out of 5],near[Café Rouge]") == {
        "customer rating": "5 out of 5",
        "near": "Café Rouge",
    }


@pytest.mark.parametrize("bad", ["", "name[X", "name[X] area[Y]", "name[X],", "[X]", "name[X], name[Y]"])
def test_parse_mr_rejects_malformed(bad):
    with pytest.raises(DataError):
        parse_mr(bad)


# --- loading ---------------------------------------------------------------------


def test_load_e2e_counts_and_fields(dev):
    assert len(dev) == 4672
    assert len({ex.group for ex in dev}) == 547
    first = dev[0]
    assert first.group == DEV_MR
    assert first.prompt == "name : Alimentum | area : city centre | familyFriendly : no||"
    assert first.completion == " There is a place in the city centre, Alimentum, that is not family-friendly."
    assert first.attributes["familyFriendly"] == "no"
    keys = {key for ex in dev for key in ex.attributes}
    assert keys == {"name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near"}


def test_load_e2e_testset_counts():
    test = load_e2e(E2E_DIR / "testset_w_refs.csv")
    assert len(test) == 4693
    refs = group_references(test)
    assert len(refs) == 630
    assert sum(len(r) for r in refs.values()) == 4693
    assert all(not r.startswith(" ") for rs in refs.values() for r in rs)


def test_load_e2e_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError, match="nope.csv"):
        load_e2e(missing)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("meaning,text\na,b\n")
    with pytest.raises(DataError, match=r"wrong\.csv.*ref"):
        load_e2e(wrong)
    bad_mr = tmp_path / "badmr.csv"
    bad_mr.write_text('mr,ref\n"name[A]",ok\n"name[B",broken\n')
    with pytest.raises(DataError, match=r"badmr\.csv:3"):
        load_e2e(bad_mr)


def test_group_references_order():
    exs = [Example("p", " a ", group="g1"), Example("q", " b", group="g2"), Example("p", "c", group="g1")]
    assert group_references(exs) == {"g1": ["a", "c"], "g2": ["b"]}
    assert list(group_references(exs)) == ["g1", "g2"]


def test_load_jsonl_ok_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "Q1", "completion": " A1"}\n\n{"prompt": "Q2", "completion": " A2", "x": 1}\n')
    exs = load_jsonl(path)
    assert [(e.prompt, e.completion, e.group) for e in exs] == [("Q1", " A1", "Q1"), ("Q2", " A2", "Q2")]
    assert exs[0].attributes == {}


@pytest.mark.parametrize(
    "bad_line, pattern",
    [
        ("{not json", r"d\.jsonl:3: invalid JSON"),
        ('{"prompt": "Q"}', r"d\.jsonl:3: field 'completion' missing"),
        ('{"prompt": 5, "completion": "A"}', r"d\.jsonl:3: field 'prompt' not a string"),
        ('["prompt", "completion"]', r"d\.jsonl:3: expected a JSON object"),
    ],
)
def test_load_jsonl_errors_name_line(tmp_path, bad_line, pattern):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"prompt": "Q", "completion": "A"})
    path.write_text(f"{good}\n\n{bad_line}\n{good}\n")
    with pytest.raises(DataError, match=pattern) as info:
        load_jsonl(path)
    assert "\n" not in str(info.value)


# --- splitting / partitioning ------------------------------------------------------


def test_split_by_group_disjoint_and_deterministic(dev):
    train, val = split_by_group(dev, 0.1, seed=3)
    assert len(train) + len(val) == len(dev)
    train_groups, val_groups = {e.group for e in train}, {e.group for e in val}
    assert not train_groups & val_groups
    assert len(val_groups) == round(0.1 * 547)
    # input order preserved on each side
    positions = {id(e): i for i, e in enumerate(dev)}
    assert [positions[id(e)] for e in train] == sorted(positions[id(e)] for e in train)
    assert [positions[id(e)] for e in val] == sorted(positions[id(e)] for e in val)
    assert split_by_group(dev, 0.1, seed=3) == (train, val)
    assert {e.group for e in split_by_group(dev, 0.1, seed=4)[1]} != val_groups


def test_split_by_group_holds_out_at_least_one_group():
    exs = [Example("p", "c", group=g) for g in "abcde"]
    train, val = split_by_group(exs, 0.01, seed=0)
    assert len(val) == 1 and len(train) == 4
    assert split_by_group(exs, 0.0, seed=0) == (exs, [])


def _assert_exact_cover(parts, examples):
    flat = [id(e) for part in parts for e in part]
    assert sorted(flat) == sorted(id(e) for e in examples)
    assert len(set(flat)) == len(flat)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_covers_once_and_is_deterministic(dev, scheme):
    parts = partition(dev, 5, scheme, seed=11, alpha=0.3)
    assert len(parts) == 5 and all(parts)
    _assert_exact_cover(parts, dev)
    assert partition(dev, 5, scheme, seed=11, alpha=0.3) == parts
    assert partition(dev, 5, scheme, seed=12, alpha=0.3) != parts


def test_partition_iid_near_equal(dev):
    sizes = [len(p) for p in partition(dev, 7, "iid", seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_partition_dirichlet_small_alpha_is_skewed(dev):
    def shares(parts):
        out = []
        for part in parts:
            counts = Counter(e.attributes.get("food", "none") for e in part)
            out.append({v: counts[v] / len(part) for v in ("Chinese", "English", "none")})
        return out

    skewed = shares(partition(dev, 4, "dirichlet", seed=0, attribute="food", alpha=0.05))
    iid = shares(partition(dev, 4, "iid", seed=0))

    def spread(share_list):
        return max(max(s[v] for s in share_list) - min(s[v] for s in share_list) for v in share_list[0])

    assert spread(skewed) > 0.5
    assert spread(iid) < 0.1


def test_partition_dirichlet_no_empty_client():
    exs = [Example("p", "c", {"eatType": "pub"}, group=str(i)) for i in range(6)]
    for seed in range(20):
        parts = partition(exs, 6, "dirichlet", seed=seed, alpha=0.01)
        assert [len(p) for p in parts] == [1] * 6


def test_partition_attribute(dev):
    parts = partition(dev, 3, "attribute", seed=0, attribute="food")
    _assert_exact_cover(parts, dev)
    values = [{e.attributes.get("food", "none") for e in part} for part in parts]
    assert values == [{"Chinese"}, {"English"}, {"none"}]  # sorted value order, missing -> "none"
    # devset eatType only has "coffee shop" or is absent
    assert [len(p) for p in partition(dev, 2, "attribute", seed=0)] == [3481, 1191]
    with pytest.raises(DataError) as info:
        partition(dev, 4, "attribute", seed=0, attribute="food")
    msg = str(info.value)
    assert "Chinese, English, none" in msg and "num_clients=3" in msg


def test_partition_argument_errors(dev):
    with pytest.raises(DataError, match="bogus"):
        partition(dev, 2, "bogus", seed=0)
    with pytest.raises(DataError, match="iid"):
        partition(dev, 0, "iid", seed=0)
    with pytest.raises(DataError, match="dirichlet"):
        partition(dev[:3], 4, "dirichlet", seed=0)


# --- tokenization / batching -------------------------------------------------------


def test_tokenize_masks_prompt(tokenizer):
    ex = Example("ab||", " cd")
    (feat,) = tokenize([ex], tokenizer, max_length=64)
    eos = tokenizer.eos_token_id
    prompt_ids = tokenizer("ab||", add_special_tokens=False).input_ids
    completion_ids = tokenizer(" cd", add_special_tokens=False).input_ids
    assert len(prompt_ids) == 4 and len(completion_ids) == 3  # byte-level, no merges
    assert feat["input_ids"] == prompt_ids + completion_ids + [eos]
    assert feat["labels"] == [-100] * 4 + completion_ids + [eos]
    assert tokenizer.decode(feat["input_ids"][4:7]) == " cd"


def test_tokenize_truncates_and_drops(tokenizer):
    exs = [Example("abcd", " xy"), Example("abcdefgh", " z")]
    feats = tokenize(exs, tokenizer, max_length=6)
    assert len(feats) == 1  # second example's completion is truncated away entirely
    assert len(feats[0]["input_ids"]) == len(feats[0]["labels"]) == 6
    assert feats[0]["labels"] == [-100] * 4 + tokenizer(" xy", add_special_tokens=False).input_ids[:2]
    assert tokenize(exs[:1], tokenizer, max_length=4) == []


def test_collate_pads_right():
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(feats, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def _features(n):
    return [{"input_ids": [i] * (1 + i % 3), "labels": [i] * (1 + i % 3)} for i in range(n)]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batch_stream_resume_is_exact():
    feats = _features(10)
    stream = BatchStream(feats, batch_size=3, seed=7, pad_token_id=-1)
    for _ in range(3):
        stream.next_batch()
    state = json.loads(json.dumps(stream.state_dict()))
    assert state == {"epoch": 0, "position": 9}
    expected = [stream.next_batch() for _ in range(2)]  # crosses into epoch 1
    assert [len(b["input_ids"]) for b in expected] == [1, 3]

    fresh = BatchStream(feats, batch_size=3, seed=7, pad_token_id=-1)
    fresh.load_state_dict(state)
    got = [fresh.next_batch() for _ in range(2)]
    assert all(_same(a, b) for a, b in zip(expected, got))
    # and differs from what an un-restored stream would yield
    assert not _same(BatchStream(feats, 3, 7, -1).next_batch(), got[1])


def test_batch_stream_epoch_coverage_and_reshuffle():
    feats = _features(10)
    stream = BatchStream(feats, batch_size=4, seed=1, pad_token_id=-1)
    assert stream.num_samples == 10
    epochs = []
    for _ in range(3):
        batches = [stream.next_batch() for _ in range(3)]
        assert [len(b["input_ids"]) for b in batches] == [4, 4, 2]  # no straddling
        epochs.append([int(row[0]) for b in batches for row in b["input_ids"]])
    assert all(sorted(ids) == list(range(10)) for ids in epochs)
    assert len({tuple(ids) for ids in epochs}) == 3
    same_seed = BatchStream(feats, batch_size=4, seed=1, pad_token_id=-1)
    assert [int(r[0]) for _ in range(3) for r in same_seed.next_batch()["input_ids"]] == epochs[0]
