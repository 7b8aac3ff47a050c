"""Scores for any generation task (`splitlora eval` on a run not trained on E2E): exact match, BLEU and
ROUGE-L against every reference of a prompt.

BLEU is sacrebleu's corpus BLEU (its default 13a tokenizer; a prompt with fewer references than the most
has its first one repeated, which changes neither the clipped counts nor the closest reference length).
ROUGE-L is the E2E scorer's (pycocoevalcap's LCS F-measure, beta 1.2, on lower-cased text tokenized by
the project's Python port of the PTB tokenizer: `coco.py`). Exact match: the prediction equals one of the references, whitespace collapsed.
"""

from __future__ import annotations

import sacrebleu


def _norm(text: str) -> str:
    return " ".join(text.split())


def task_scores(predictions: list[str], references: list[list[str]]) -> dict:
    from .coco import coco_scores

    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference groups")
    width = max(len(r) for r in references)
    streams = [[r[i] if i < len(r) else r[0] for r in references] for i in range(width)]
    metric = sacrebleu.BLEU()
    bleu = metric.corpus_score(predictions, streams)
    rouge = coco_scores(predictions, references, meteor=False, tokenizer="python")["ROUGE_L"]
    exact = sum(_norm(p) in {_norm(r) for r in refs} for p, refs in zip(predictions, references, strict=True))
    return {"exact_match": exact / len(predictions), "BLEU": bleu.score / 100, "ROUGE_L": rouge,
            "bleu_signature": str(metric.get_signature())}
