"""The official scorer's file formats: plain text (predictions one per line, reference groups
separated by blank lines) and CSV/TSV tables with an MR column and a text column."""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path

from .common import LINE_BREAKS, MetricsError, reference_group

# Header names the official scorer recognises (matched case-insensitively against the whole cell).
_HEADER_MR = r"(mr|src|source|meaning(?:[_ .-]rep(?:resentation)?)?|da|dial(?:ogue)?[_ .-]act)s?"
_HEADER_PRED = r"(out(?:put)?|ref(?:erence)?|sys(?:tem)?(?:[_ .-](?:out(?:put)?|ref(?:erence)?))?)s?"
_HEADER_REF = r"(trg|tgt|target|ref(?:erence)?|human(?:[_ .-](?:ref(?:erence)?))?)s?"
# Mojibake the official scorer repairs in CSV/TSV files.
_MOJIBAKE = (("Ł", "£"), ("Â£", "£"), ("Ã©", "é"), ("ã©", "é"))


def _is_table(path: str | Path) -> bool:
    return bool(re.search(r"\.[ct]sv$", str(path), re.IGNORECASE))


def _read_lines(path: str | Path) -> list[str]:
    """The file's lines, stripped, as the official scorer reads them (UTF-8, Unicode line breaks)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MetricsError(f"{path}: no such file") from None
    except OSError as e:
        raise MetricsError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise MetricsError(f"{path}:{line}: not valid UTF-8 (byte {data[e.start]:#04x})") from None
    text = text.removeprefix("\ufeff")
    return [line.strip() for line in text.splitlines()]


def read_table(path: str | Path, text_header: str = _HEADER_REF) -> tuple[list[str], list[str]]:
    """(MRs, texts) of a CSV/TSV file with an MR column and a text column, as the official scorer reads it.

    Tab-separated if the first line holds a tab, comma-separated (with CSV quoting) otherwise. A header
    row is recognised by its cell names (``mr``/``src``/``source``/``da``... and ``ref``/``target``/
    ``output``/``system``...); it picks the two columns. Without a header the file must have exactly
    two columns, MR first. Blank lines are skipped; the mojibake ``Â£``, ``Ł``, ``Ã©``, ``ã©`` is
    repaired as the official scorer does.
    """
    rows = _table_rows(path, text_header)
    return [mr for _, mr, _ in rows], [text for _, _, text in rows]


def _table_rows(path: str | Path, text_header: str) -> list[tuple[int, str, str]]:
    """(file line, MR, text) of every data row of a CSV/TSV file (see :func:`read_table`)."""
    numbered = [(i, line) for i, line in enumerate(_read_lines(path), start=1) if line]
    if not numbered:
        raise MetricsError(f"{path}: the file is empty")
    for bad, good in _MOJIBAKE:
        numbered = [(i, line.replace(bad, good)) for i, line in numbered]
    delimiter = "\t" if "\t" in numbered[0][1] else ","
    rows = []
    for i, line in numbered:
        try:
            row = next(csv.reader([line], delimiter=delimiter, strict=True))
        except csv.Error as e:
            kind = "TSV" if delimiter == "\t" else "CSV"
            raise MetricsError(f"{path}:{i}: malformed {kind} line ({e})") from None
        rows.append((i, row))
    header = [cell.strip() for cell in rows[0][1]]
    mr_cols = [c for c, cell in enumerate(header) if re.fullmatch(_HEADER_MR, cell, re.IGNORECASE)]
    text_cols = [c for c, cell in enumerate(header) if re.fullmatch(text_header, cell, re.IGNORECASE)]
    width = len(header)
    if len(mr_cols) == len(text_cols) == 1 and mr_cols != text_cols:
        mr_col, text_col = mr_cols[0], text_cols[0]
        rows = rows[1:]
    elif not mr_cols and not text_cols:
        if width != 2:
            raise MetricsError(f"{path}:{rows[0][0]}: no header row naming the MR and text columns, "
                               f"and {width} columns instead of 2")
        mr_col, text_col = 0, 1
    else:
        raise MetricsError(f"{path}:{rows[0][0]}: strange header {header}: need exactly one MR column "
                           "(mr/src/source/da...) and one text column")
    for i, row in rows:
        if len(row) != width:
            raise MetricsError(f"{path}:{i}: {len(row)} columns, expected {width} like the first line")
    return [(i, row[mr_col].strip(), row[text_col].strip()) for i, row in rows]


def _reference_rows(path: str | Path) -> list[tuple[int, str, str]]:
    rows = _table_rows(path, _HEADER_REF)
    for line, mr, text in rows:
        if not text:
            raise MetricsError(f"{path}:{line}: empty reference (MR {mr!r})")
    return rows


def _group_consecutive(mrs: list[str], texts: list[str]) -> list[list[str]]:
    groups: list[list[str]] = []
    previous = None
    for mr, text in zip(mrs, texts):
        if not groups or mr != previous:
            groups.append([])
            previous = mr
        groups[-1].append(text)
    return groups


def read_predictions(path: str | Path) -> list[str]:
    """One prediction per line (empty lines are empty predictions), or the text column of a CSV/TSV file."""
    if _is_table(path):
        return read_table(path, _HEADER_PRED)[1]
    return _read_lines(path)


def read_references(path: str | Path, num_predictions: int | None = None) -> list[list[str]]:
    """Reference groups: lines of one instance, instances separated by a blank line (CSV/TSV: rows
    grouped by consecutive equal MRs).

    As in the official scorer, a file without any blank line holds one reference per line and
    instance - unless `num_predictions` is 1, where it is read as the references of that one instance
    (the official scorer would fail there). Several blank lines in a row (an empty group) are an error.
    """
    if _is_table(path):
        rows = _reference_rows(path)
        return _group_consecutive([mr for _, mr, _ in rows], [text for _, _, text in rows])
    lines = _read_lines(path)
    while lines and not lines[-1]:
        lines.pop()
    groups: list[list[str]] = [[]]
    for number, line in enumerate(lines, start=1):
        if line:
            groups[-1].append(line)
        elif groups[-1]:
            groups.append([])
        else:
            raise MetricsError(f"{path}:{number}: empty reference group (blank line after "
                               f"{'a blank line' if number > 1 else 'nothing'})")
    if not groups[-1]:
        raise MetricsError(f"{path}: no references")
    if len(groups) == 1 and num_predictions != 1:
        groups = [[line] for line in groups[0]]
    return groups


def _check_line(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise MetricsError(f"{what}: expected a string, got {type(text).__name__}")
    if LINE_BREAKS.search(text):
        raise MetricsError(f"{what} contains a line break; the one-per-line format cannot hold it")
    return text.strip()


def write_predictions(path: str | Path, predictions: Sequence[str]) -> None:
    """Write one prediction per line (UTF-8): what :func:`read_predictions` and the official scorer read."""
    lines = [_check_line(p, f"prediction {i + 1}") for i, p in enumerate(predictions)]
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def write_references(path: str | Path, references: Sequence[Sequence[str]]) -> None:
    """Write reference groups, one reference per line and a blank line between instances (UTF-8)."""
    blocks = []
    for i, group in enumerate(references):
        refs = reference_group(i, group, _check_line, empty_reference=" (a blank line would end the group)")
        blocks.append("".join(r + "\n" for r in refs))
    Path(path).write_text("\n".join(blocks), encoding="utf-8")


def score_files(ref_path: str | Path, pred_path: str | Path, *, meteor: bool = True) -> dict:
    """Score a prediction file against a reference file, choosing the format like the official scorer.

    ``.csv``/``.tsv`` files (by extension) are read as tables, anything else as plain text. When the
    predictions come from a table with MRs and the references from a table, each prediction gets all
    reference rows of its MR (an MR without references is an error); otherwise references are grouped
    as :func:`read_references` does and matched to predictions by position.
    """
    pred_rows = _table_rows(pred_path, _HEADER_PRED) if _is_table(pred_path) else None
    predictions = [text for _, _, text in pred_rows] if pred_rows else read_predictions(pred_path)
    if _is_table(ref_path) and pred_rows and any(mr for _, mr, _ in pred_rows):
        by_mr: dict[str, list[str]] = {}
        for _, mr, text in _reference_rows(ref_path):
            by_mr.setdefault(mr, []).append(text)
        references = []
        for line, mr, _ in pred_rows:
            if mr not in by_mr:
                raise MetricsError(f"{pred_path}:{line}: MR {mr!r} has no reference in {ref_path}")
            references.append(by_mr[mr])
    else:
        references = read_references(ref_path, num_predictions=len(predictions))
    if len(predictions) != len(references):
        raise MetricsError(f"{pred_path} holds {len(predictions)} predictions but {ref_path} holds "
                           f"{len(references)} reference groups: the counts must be equal")
    from . import score

    return score(predictions, references, meteor=meteor)
