"""Data loading, federated partitioning, tokenization and batching.

Split-federated LoRA training needs every client to see a fixed, reproducible
shard of the data and to resume its batch stream exactly after a checkpoint.
This module keeps all of that in one place: E2E NLG / JSONL loading into
prompt/completion ``Example``s, group-aware validation splits (so no meaning
representation leaks between train and validation), IID / Dirichlet /
per-attribute client partitions, prompt-masked tokenization, padding, and a
resumable deterministic ``BatchStream``.
"""
from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .errors import DataError

IGNORE_INDEX = -100

# One "key[value]" item of an E2E meaning representation.
_MR_ITEM = re.compile(r"\s*([^\[\],]+?)\s*\[([^\[\]]*)\]\s*")


@dataclass(frozen=True)
class Example:
    prompt: str  # conditioning text, excluded from the loss
    completion: str  # target text, without eos (tokenize() appends it)
    attributes: dict[str, str] = field(default_factory=dict, hash=False, compare=True)
    group: str = ""  # E2E: raw MR string; JSONL: the prompt
    # a chat rendering as (text, in the loss) pieces (chat.py): the loss on the assistant's turns only;
    # empty: prompt + completion + eos, the loss on the completion and eos
    segments: tuple[tuple[str, bool], ...] = ()



def parse_mr(mr: str) -> dict[str, str]:
    """Parse ``"name[X], area[Y]"`` into ``{"name": "X", "area": "Y"}``."""
    attributes: dict[str, str] = {}
    pos = 0
    while True:
        match = _MR_ITEM.match(mr, pos)
        if match is None:
            raise DataError(f"malformed MR at character {pos}: {mr!r}")
        key, value = match.group(1), match.group(2).strip()
        if key in attributes:
            raise DataError(f"duplicate attribute {key!r} in MR: {mr!r}")
        attributes[key] = value
        pos = match.end()
        if pos == len(mr):
            return attributes
        if mr[pos] != ",":
            raise DataError(f"malformed MR at character {pos}: {mr!r}")
        pos += 1


def format_mr(attributes: dict[str, str]) -> str:
    """Official SplitLoRA/LoRA E2E prompt format: ``"name : X | area : Y||"``."""
    return " | ".join(f"{key} : {value}" for key, value in attributes.items()) + "||"


MAX_LINE_BYTES = 1 << 20   # one example (a CSV row, a JSONL line): longer is refused before it is held


class _BoundedLines:
    """Text lines of a file, each at most MAX_LINE_BYTES (read with a bounded readline, so a huge line
    costs no more memory than the bound), with errors that name the file and line."""

    def __init__(self, path: Path, encoding: str):
        self.path, self.encoding, self.line_no = path, encoding, 0

    def __iter__(self):
        with self.path.open("rb") as handle:
            while line := handle.readline(MAX_LINE_BYTES + 1):
                self.line_no += 1
                if len(line) > MAX_LINE_BYTES:
                    raise DataError(f"{self.path}:{self.line_no}: a line longer than {MAX_LINE_BYTES >> 20} MiB "
                                    "(is this the right file?)")
                try:
                    yield line.decode(self.encoding if self.line_no == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{self.path}:{self.line_no}: not UTF-8 text (a binary file?)") from None


def load_e2e(path: str | Path) -> list[Example]:
    """Load an E2E NLG csv (columns ``mr``, ``ref``); one Example per row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    examples = []
    reader = csv.DictReader(_BoundedLines(path, "utf-8-sig"))
    try:
        missing = {"mr", "ref"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
        for row in reader:
            mr, ref = row["mr"], row["ref"]
            if mr is None or ref is None:
                raise DataError(f"{path}:{reader.line_num}: row has too few fields")
            try:
                attributes = parse_mr(mr)
            except DataError as err:
                raise DataError(f"{path}:{reader.line_num}: field 'mr': {err}") from None
            examples.append(Example(format_mr(attributes), " " + ref.strip(), attributes, mr))
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: not a CSV row ({err})") from None
    return examples


def load_jsonl(path: str | Path) -> list[Example]:
    """Load ``{"prompt": str, "completion": str}`` lines; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    examples = []
    for line_no, line in enumerate(_BoundedLines(path, "utf-8"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                problem = "missing" if key not in record else f"not a string ({type(record[key]).__name__})"
                raise DataError(f"{path}:{line_no}: field {key!r} {problem}")
        examples.append(Example(record["prompt"], record["completion"], {}, record["prompt"]))
    return examples


def group_references(examples: Iterable[Example]) -> dict[str, list[str]]:
    """Map each group to its stripped completions (for multi-reference scoring)."""
    references: dict[str, list[str]] = {}
    for ex in examples:
        references.setdefault(ex.group, []).append(ex.completion.strip())
    return references


def split_by_group(
    examples: Sequence[Example], val_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out ~``val_fraction`` of the groups; no group lands on both sides."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups = list(dict.fromkeys(ex.group for ex in examples))
    if val_fraction == 0.0 or not groups:
        return list(examples), []
    num_val = max(1, round(val_fraction * len(groups)))
    if num_val >= len(groups):
        raise DataError(f"cannot hold out {num_val} of {len(groups)} group(s) and keep a training set")
    held_out = set(random.Random(seed).sample(groups, num_val))
    train = [ex for ex in examples if ex.group not in held_out]
    val = [ex for ex in examples if ex.group in held_out]
    return train, val


def _attribute_value(ex: Example, attribute: str) -> str:
    return ex.attributes.get(attribute, "none")


def partition(
    examples: Sequence[Example],
    num_clients: int,
    scheme: str,
    seed: int,
    attribute: str = "eatType",
    alpha: float = 0.5,
    sizes: Sequence[float] | None = None,
    power_law: float = 1.5,
) -> list[list[Example]]:
    """Split examples across clients by ``scheme`` ("iid", "dirichlet", "attribute", "quantity").

    Deterministic for a given seed; every example lands in exactly one client.
    Within a client, examples keep their input order for "dirichlet" and
    "attribute"; "iid" clients hold slices of a seeded shuffle; "quantity" too, of
    sizes proportional to ``sizes`` (relative) or to weights drawn from a power law
    (Pareto, exponent ``power_law``), each client at least one example.
    """
    if scheme not in ("iid", "dirichlet", "attribute", "quantity"):
        raise DataError(f"unknown partition scheme {scheme!r}; expected 'iid', 'dirichlet', 'attribute' or "
                        "'quantity'")
    if not 1 <= num_clients <= len(examples):
        raise DataError(
            f"partition scheme {scheme!r}: num_clients must be in [1, {len(examples)}], got {num_clients}"
        )
    n = len(examples)

    if scheme in ("iid", "quantity"):
        order = list(range(n))
        random.Random(seed).shuffle(order)
        counts = _quantities(n, num_clients, sizes, power_law, seed) if scheme == "quantity" else \
            [n // num_clients + (1 if c < n % num_clients else 0) for c in range(num_clients)]
        parts, start = [], 0
        for size in counts:
            parts.append([examples[i] for i in order[start:start + size]])
            start += size
        return parts

    by_value: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_value.setdefault(_attribute_value(ex, attribute), []).append(i)
    values = sorted(by_value)

    if scheme == "attribute":
        if num_clients != len(values):
            raise DataError(
                f"partition scheme 'attribute' on {attribute!r} needs num_clients={len(values)} "
                f"(one per value: {', '.join(values)}), got {num_clients}"
            )
        return [[examples[i] for i in by_value[value]] for value in values]

    if alpha <= 0:
        raise DataError(f"partition scheme 'dirichlet': alpha must be > 0, got {alpha}")
    return [[examples[i] for i in sorted(indices)] for indices in _dirichlet(by_value, num_clients, alpha, seed)]


def _dirichlet(by_value: dict[str, list[int]], num_clients: int, alpha: float, seed: int) -> list[list[int]]:
    """Each value's examples spread over the clients by proportions drawn from Dirichlet(alpha); a client
    left empty takes one example from the largest."""
    rng = np.random.default_rng(seed)
    assigned: list[list[int]] = [[] for _ in range(num_clients)]
    for value in sorted(by_value):
        indices = rng.permutation(by_value[value])
        proportions = rng.dirichlet([alpha] * num_clients)
        cuts = (np.cumsum(proportions)[:-1] * len(indices)).astype(int)
        for client, chunk in enumerate(np.split(indices, cuts)):
            assigned[client].extend(int(i) for i in chunk)
    for client in range(num_clients):
        if not assigned[client]:
            largest = max(range(num_clients), key=lambda c: (len(assigned[c]), -c))
            assigned[client].append(assigned[largest].pop())
    return assigned


def _quantities(n: int, num_clients: int, sizes, power_law: float, seed: int) -> list[int]:
    """Client sizes summing to n, proportional to `sizes` or to seeded Pareto weights; each at least 1."""
    if sizes is not None:
        if len(sizes) != num_clients or any(s <= 0 for s in sizes):
            raise DataError(f"client_sizes: {num_clients} positive weights needed, got {list(sizes)}")
        weights = np.asarray(sizes, dtype=float)
    else:
        weights = np.random.default_rng(seed).pareto(power_law, num_clients) + 1.0
    counts = np.maximum(1, np.floor(weights / weights.sum() * (n - num_clients)).astype(int) + 1)
    counts[int(np.argmax(counts))] += n - int(counts.sum())
    return [int(c) for c in counts]


def partition_summary(parts: Sequence[Sequence[Example]], attribute: str) -> list[dict]:
    """Each client's number of examples and histogram of `attribute` values (written to the run)."""
    return [{"client": c, "examples": len(part),
             attribute: dict(sorted(_histogram(_attribute_value(ex, attribute) for ex in part).items()))}
            for c, part in enumerate(parts)]


def _histogram(values: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


def tokenize(examples: Iterable[Example], tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    """Tokenize prompt + completion + eos, masking the prompt out of the labels.

    Sequences are truncated from the right to ``max_length``; an example whose
    completion is entirely truncated away (no supervised token) is dropped.
    """
    if max_length < 1:
        raise DataError(f"max_length must be >= 1, got {max_length}")
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer has no eos_token_id")
    features = []
    for ex in examples:
        if ex.segments:
            input_ids, labels = _tokenize_segments(ex.segments, tokenizer)
            input_ids, labels = input_ids[:max_length], labels[:max_length]
            if any(label != IGNORE_INDEX for label in labels):
                features.append({"input_ids": input_ids, "labels": labels})
            continue
        prompt_ids = tokenizer(ex.prompt, add_special_tokens=False).input_ids
        completion_ids = tokenizer(ex.completion, add_special_tokens=False).input_ids
        completion_ids = completion_ids + [tokenizer.eos_token_id]
        input_ids = (prompt_ids + completion_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            continue
        features.append({"input_ids": input_ids, "labels": labels})
    return features


def _tokenize_segments(segments, tokenizer) -> tuple[list[int], list[int]]:
    """The whole rendering tokenized at once (as it is at inference), each token in the loss iff it
    starts inside a trained piece (the fast tokenizer's character offsets say where)."""
    text, trained, at = "", [], 0
    for piece, in_loss in segments:
        if in_loss:
            trained.append((at, at + len(piece)))
        text, at = text + piece, at + len(piece)
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("chat examples need a fast tokenizer (character offsets mark the assistant's tokens)")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [t if any(a <= start < b for a, b in trained) else IGNORE_INDEX
              for t, (start, _) in zip(enc.input_ids, enc.offset_mapping)]
    return list(enc.input_ids), labels


def collate(features: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest sequence."""
    if not features:
        raise DataError("cannot collate an empty batch")
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    for row, feature in enumerate(features):
        length = len(feature["input_ids"])
        input_ids[row, :length] = torch.tensor(feature["input_ids"], dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(feature["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class BatchStream:
    """Endless deterministic stream of batches over one client's tokenized features.

    Epoch ``e`` visits the features in the permutation drawn from
    ``random.Random(f"{seed}:{e}")``. Batches never straddle epochs: the last
    batch of an epoch may be smaller. ``state_dict()`` / ``load_state_dict()``
    capture (epoch, position) so a restored stream continues exactly.
    """

    @property
    def features(self) -> list[dict[str, list[int]]]:
        return self._features

    def __init__(self, features: Sequence[dict[str, list[int]]], batch_size: int, seed: int, pad_token_id: int):
        if not features:
            raise DataError("BatchStream needs at least one feature")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self._features = list(features)
        self._batch_size = batch_size
        self._seed = seed
        self._pad_token_id = pad_token_id
        self._epoch = 0
        self._position = 0
        self._order = self._permutation(0)

    @property
    def num_samples(self) -> int:
        return len(self._features)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self._features)))
        random.Random(f"{self._seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._position >= len(self._features):
            self._epoch += 1
            self._position = 0
            self._order = self._permutation(self._epoch)
        chosen = self._order[self._position:self._position + self._batch_size]
        self._position += len(chosen)
        return collate([self._features[i] for i in chosen], self._pad_token_id)

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self._features):
            raise DataError(f"invalid BatchStream state {state!r} for {len(self._features)} feature(s)")
        self._epoch, self._position = epoch, position
        self._order = self._permutation(epoch)
