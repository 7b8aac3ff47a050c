"""A user's own dataset, read through Hugging Face `datasets` from local files only: JSON/JSONL, CSV or
Parquet files (a file, a directory of them, or a glob), or a directory written by `save_to_disk`.

The rows stay in memory-mapped Arrow; only the rows kept (`data.max_samples`) become examples. Each row
becomes an Example through its format (formats/); its other scalar columns (a label, a category, a
source) become the example's attributes, which partitions can split on.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

from . import formats
from .chat import Chat
from .data import Example
from .errors import DataError

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def open_split(path: str | Path, split: str):
    """The `split` of the dataset at `path` as a `datasets.Dataset` (memory-mapped, nothing downloaded)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")       # local files only: never the hub
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    path = Path(path)
    try:
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            found = datasets.load_from_disk(str(path))
            name, rows = _split_spec(split)
            if isinstance(found, datasets.DatasetDict):
                if name not in found:
                    raise DataError(f"data.split: {path} has splits {', '.join(found)}, not {name!r}")
                found = found[name]
            return found.select(rows(len(found))) if rows else found
        files = sorted(p for p in path.iterdir() if p.suffix in BUILDERS) if path.is_dir() else [path]
        if not files or not all(f.exists() for f in files):
            raise DataError(f"data.path: {path} holds no JSON/JSONL/CSV/Parquet file or saved dataset")
        kinds = {BUILDERS.get(f.suffix) for f in files}
        if None in kinds or len(kinds) > 1:
            raise DataError(f"data.path: {path}: expected files of one kind ({', '.join(BUILDERS)}), got "
                            f"{', '.join(sorted(f.suffix or f.name for f in files))}")
        return datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split=split)
    except DataError:
        raise
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise DataError(f"data.path / data.split: {path} [{split}]: {e}") from None
    except Exception as e:   # a parse error of the file's own format (pyarrow, csv)
        raise DataError(f"data.path: {path} could not be read as a dataset: {type(e).__name__}: {e}") from None


def _split_spec(split: str):
    """(name, rows) of `train`, `train[10:20]` or `train[:90%]` (a saved dataset; files get datasets' own
    split syntax); rows: None (all) or n -> the range of rows."""
    m = re.fullmatch(r"([\w.-]+)(?:\[(-?\d*)(%?):(-?\d*)(%?)\])?", split)
    if m is None:
        raise DataError(f"data.split: {split!r} is not NAME or NAME[start:stop] (rows or %)")
    name, a, pa, b, pb = m.groups()
    if a is None:
        return name, None

    def at(v: str, pct: str, n: int, default: int) -> int:
        if not v:
            return default
        i = round(int(v) * n / 100) if pct else int(v)
        return max(0, min(n, i + n if i < 0 else i))

    return name, lambda n: range(at(a, pa, n, 0), at(b, pb, n, n))


def load_hf(data, tokenizer, split: str | None = None) -> list[Example]:
    """The examples of `data` (the config's data section) at `split` (default data.split)."""
    split = split or data.split
    fmt = formats.get(data.format)
    unknown = set(data.fields) - set(fmt.FIELDS)
    if unknown:
        raise DataError(f"data.fields: {', '.join(sorted(unknown))} not a key of format {data.format!r} "
                        f"(its keys: {', '.join(fmt.FIELDS)})")
    fields = {**fmt.FIELDS, **data.fields}
    rows = open_split(data.path, split)
    if data.max_samples is not None:
        rows = rows.select(range(min(data.max_samples, len(rows))))
    chat = Chat(tokenizer, data.chat_template)
    used = set(fields.values())
    examples = []
    for i, row in enumerate(rows):
        ex = fmt.example(row, fields, chat, f"{data.path} [{split}] row {i}")
        attributes = {k: str(v) for k, v in row.items() if k not in used and isinstance(v, (str, int, float, bool))}
        examples.append(replace(ex, attributes=attributes))
    if not examples:
        raise DataError(f"data.path: {data.path} [{split}] has no rows")
    return examples
