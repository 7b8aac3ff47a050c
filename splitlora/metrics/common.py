"""Text handling shared by the E2E metrics: errors, one-line cleaning, input validation."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import MetricsError


# Characters at which str.splitlines (and so the official scorer's line reader) breaks a line.
LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")



def clean(text: str, what: str) -> str:
    """What writing `text` on one line of a file and reading it back gives: the official scorer's view.

    Line breaks become spaces (a file line cannot hold them) and surrounding whitespace is stripped.
    """
    if not isinstance(text, str):
        raise MetricsError(f"{what}: expected a string, got {type(text).__name__}")
    return LINE_BREAKS.sub(" ", text).strip()


def check_inputs(predictions: Sequence[str],
                  references: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    """Validated, cleaned copies: equal counts, a non-empty group of non-empty references per prediction."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise MetricsError("predictions and references must be lists (of strings / of lists of strings), "
                           "not a string")
    if len(predictions) != len(references):
        raise MetricsError(f"{len(predictions)} predictions but {len(references)} reference groups: "
                           "the counts must be equal (one group of references per prediction)")
    if not predictions:
        raise MetricsError("no predictions to score")
    preds = [clean(p, f"prediction {i + 1}") for i, p in enumerate(predictions)]
    groups = [reference_group(i, group, clean, ": every prediction needs a reference")
              for i, group in enumerate(references)]
    return preds, groups


def reference_group(i: int, group, check, empty_group: str = "", empty_reference: str = "") -> list[str]:
    """Reference group i (0-based) checked line by line with `check(text, where)`: a list of non-empty
    strings, at least one; the hints end the messages for an empty group or reference."""
    if isinstance(group, str):
        raise MetricsError(f"reference group {i + 1}: expected a list of strings, got a string")
    refs = [check(r, f"reference group {i + 1}, reference {j + 1}") for j, r in enumerate(group)]
    if not refs:
        raise MetricsError(f"reference group {i + 1} is empty{empty_group}")
    for j, r in enumerate(refs):
        if not r:
            raise MetricsError(f"reference group {i + 1}, reference {j + 1} is empty{empty_reference}")
    return refs


