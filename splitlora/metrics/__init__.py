"""E2E NLG Challenge metrics: BLEU, NIST, METEOR, ROUGE-L and CIDEr, as the official scorer computes them.

Why this module exists: papers on E2E report the numbers of the challenge's scorer (github
tuetschek/e2e-metrics, ``measure_scores.py``), and other BLEU/ROUGE implementations give different
numbers on the same text (other tokenisation, casing, smoothing, reference handling). To compare our
runs with published results without installing that Python-2-era repository, we reimplement its
semantics here and check them against a local reconstruction of the official scorer
(tests/test_metrics.py holds the official numbers and says how they were produced). For the same
predictions and references every value agrees with the official one to 4 decimal places.

What the official scorer does, and so what we do:

* Input. Predictions are one per line; references are groups of lines separated by blank lines (a
  file with no blank line at all holds one reference per instance). Lines are read as UTF-8, split at
  every Unicode line boundary (``str.splitlines``) and stripped of surrounding whitespace. CSV/TSV
  files (by extension ``.csv``/``.tsv``) have an MR column and a text column; references are grouped
  by MR (consecutive equal MRs, or, when the predictions come with MRs, all rows of each prediction's
  MR in prediction order). No lowercasing or other change happens at this stage.
* BLEU and NIST: MT-Eval ``mteval-v13a.pl`` as edited for the challenge (``mteval-v13a-sig.pl``):
  its default tokenisation (ASCII-only lowercasing; punctuation split off except ``'`` and ``-``;
  ``.``/``,`` kept inside numbers), BLEU-4 with closest-reference brevity penalty and the script's
  smoothing of zero n-gram matches, NIST-5 with n-gram information weights estimated from all
  references. A variable number of references is handled as the edited script does: the padding
  references are ignored for the BLEU reference length, and the NIST length penalty compares the
  output length with the reference length divided by the mean number of references per instance
  (the script's current version; an older one divided by the largest number of references, which
  gives other NIST values whenever the outputs are shorter than the references). BLEU is a fraction
  (0..1), NIST is unbounded.
* METEOR 1.5 (``-l en -norm``), ROUGE-L (LCS F-measure with beta 1.2) and CIDEr (CIDEr-D, sigma 6,
  x10) are pycocoevalcap's scorers, run on text tokenised by the Stanford PTBTokenizer (CoreNLP
  3.4.1, ``-preserveLines -lowerCase``) with PTB punctuation tokens removed, exactly as the MS-COCO
  caption evaluation does. The Stanford tokenizer and METEOR are Java programs shipped in the
  ``pycocoevalcap`` package, so the official semantics need Java for all three metrics. Without Java,
  METEOR is reported as unavailable (``None`` plus a ``METEOR_unavailable`` message, never a number)
  and ROUGE-L/CIDEr are computed on text tokenised by :func:`ptb_tokenize_python`, our pure-Python
  emulation of the Stanford tokenizer, which gives the same tokens on all E2E references and is
  reported in the result's ``tokenizer`` field.

Differences from the official scorer, all on inputs it cannot score or scores by accident: a leading
byte-order mark in a plain-text file is dropped (the official scorer keeps it as part of the first
word); a single-group reference file is read as one multi-reference instance when exactly one
prediction is scored (the official scorer then fails on the count mismatch); CSV files without a
header row are accepted when they have exactly two columns (the official scorer fails on them);
malformed CSV quoting, empty references and empty reference groups are errors (with the file and
line); header cells must match a known name exactly, not just start with one; line breaks inside
strings passed to :func:`score` count as spaces. Text containing the SGML tags ``</seg>``,
``</doc>`` or ``</p>`` would break MT-Eval's parser; we score it as the text it is.

An empty prediction is scored as the official scorer scores it: a zero-length output (no n-gram
matches, counted in the length penalties), so a corpus of empty predictions scores 0 on every
metric.

Modules: `mteval` (BLEU, NIST), `coco` (METEOR, ROUGE-L, CIDEr and the PTB tokenizers), `files`
(the official file formats), `common` (validation shared by all).
"""

from __future__ import annotations

from .coco import coco_scores, ptb_tokenize, ptb_tokenize_python
from .common import MetricsError
from .files import (read_predictions, read_references, read_table, score_files, write_predictions,
                    write_references)
from .mteval import bleu_nist, mteval_tokenize

__all__ = [
    "MetricsError", "bleu_nist", "coco_scores", "mteval_tokenize", "ptb_tokenize",
    "ptb_tokenize_python", "read_predictions", "read_references", "read_table", "score",
    "score_files", "write_predictions", "write_references",
]


def score(predictions: list[str], references: list[list[str]], *, meteor: bool = True) -> dict:
    """All five E2E metrics of `predictions` against `references` (``references[i]`` holds the
    references of ``predictions[i]``; groups may differ in size).

    Returns ``{"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", "tokenizer"}``: BLEU, METEOR and ROUGE-L
    as fractions (0..1), NIST and CIDEr as is, all Python floats except METEOR, which is None (with
    a ``METEOR_unavailable`` reason) when Java is missing or ``meteor=False``. Raises
    :class:`MetricsError` on mismatched counts, an empty reference group or an empty reference.
    """
    bleu, nist = bleu_nist(predictions, references)
    coco = coco_scores(predictions, references, meteor=meteor)
    result = {"BLEU": bleu, "NIST": nist, "METEOR": coco.pop("METEOR"), "ROUGE_L": coco.pop("ROUGE_L"),
              "CIDEr": coco.pop("CIDEr")}
    result.update(coco)
    return result
