"""BLEU and NIST as MT-Eval v13a computes them, as edited for the E2E challenge (see the package
docstring for the semantics)."""

from __future__ import annotations

import math
import re
from collections import Counter

from .common import MetricsError, check_inputs

# Perl's \s on Unicode strings (the script reads its files in :utf8 mode): Unicode White_Space.
# Python's \s would also match \x1c-\x1f, which Perl keeps as word characters.
_PERL_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_PERL_SPACES = re.compile(f"[{_PERL_SPACE}]+")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# [\{-\~\[-\` -\&\(-\+\:-\@\/]: ASCII punctuation and symbols except ' , - . (and the space itself)
_MTEVAL_PUNCT = re.compile(r"([\x7b-\x7e\x5b-\x60\x20-\x26\x28-\x2b\x3a-\x40/])")
_MAX_NGRAM = 9          # MT-Eval collects n-grams up to 9; BLEU uses 4 of them, NIST 5
_BLEU_N, _NIST_N = 4, 5
_NIST_BETA = -math.log(0.5) / math.log(1.5) / math.log(1.5)


def mteval_tokenize(text: str) -> list[str]:
    """MT-Eval v13a's default ("western") tokenisation of one segment, lowercased as the E2E scorer runs it.

    The segment first goes through what the official scorer's SGML round trip does to it (every
    whitespace run becomes one space), then the script's normalisation: ``<skipped>`` removed, the
    four SGML entities decoded, ASCII letters lowercased (other letters keep their case), every
    ASCII punctuation/symbol character except ``'``, ``,``, ``-`` and ``.`` split off, ``.`` and ``,``
    split off unless between digits, ``-`` split off after a digit.
    """
    t = _PERL_SPACES.sub(" ", text)
    t = t.replace("<skipped>", "")
    t = t.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    t = f" {t} ".translate(_ASCII_LOWER)
    t = _MTEVAL_PUNCT.sub(r" \1 ", t)
    t = re.sub(r"([^0-9])([.,])", r"\1 \2 ", t)
    t = re.sub(r"([.,])([^0-9])", r" \1 \2", t)
    t = re.sub(r"([0-9])(-)", r"\1 \2 ", t)
    t = _PERL_SPACES.sub(" ", t).strip(" ")
    return t.split(" ") if t else []


def _ngram_counts(words: list[str]) -> Counter:
    """Counts of all n-grams, n = 1.._MAX_NGRAM, as tuples (MT-Eval's Words2Ngrams)."""
    counts: Counter = Counter()
    for i in range(len(words)):
        for n in range(1, min(_MAX_NGRAM, len(words) - i) + 1):
            counts[tuple(words[i:i + n])] += 1
    return counts


def _closest_ref_length(hyp_len: int, ref_lens: list[int]) -> int:
    """mteval's closest reference length (ties: the shorter); as edited for E2E, zero-length
    (padding) references after the first are skipped."""
    best = ref_lens[0]
    for r in ref_lens[1:]:
        if r == 0:
            continue
        if abs(hyp_len - r) < abs(hyp_len - best) or (abs(hyp_len - r) == abs(hyp_len - best) and r < best):
            best = r
    return best


def _nist_info(ref_ngrams: Counter, total_words: int) -> dict[tuple, float]:
    """Information weight of every reference n-gram: log2(count(prefix) / count(n-gram)).

    For unigrams the prefix count is the total number of reference words. Perl quirk kept: the
    script tests the prefix string for truth, and the string "0" is false in Perl, so bigrams
    starting with the word "0" are also weighted against the total word count.
    """
    info = {}
    for ngram, count in ref_ngrams.items():
        prefix = ngram[:-1]
        denominator = total_words if (not prefix or prefix == ("0",)) else ref_ngrams[prefix]
        info[ngram] = -math.log(count / denominator) / math.log(2)
    return info


def bleu_nist(predictions: list[str], references: list[list[str]]) -> tuple[float, float]:
    """Corpus BLEU (a fraction, 0..1) and NIST of `predictions` against groups of `references`.

    Semantics of the E2E challenge's ``mteval-v13a-sig.pl`` run on the official scorer's SGML files
    (see the module docstring); the groups may hold different numbers of references.
    """
    preds, groups = check_inputs(predictions, references)
    hyp_words = [mteval_tokenize(p) for p in preds]
    ref_words = [[mteval_tokenize(r) for r in group] for group in groups]

    # NIST information weights come from the n-gram counts of all references of the corpus.
    all_ref_ngrams: Counter = Counter()
    total_ref_words = 0
    for group in ref_words:
        for words in group:
            all_ref_ngrams.update(_ngram_counts(words))
            total_ref_words += len(words)
    info = _nist_info(all_ref_ngrams, total_ref_words)

    hyp_len = ref_len = 0          # BLEU: output words, closest reference words
    matches = [0] * (_MAX_NGRAM + 1)
    hyp_ngrams = [0] * (_MAX_NGRAM + 1)
    match_info = [0.0] * (_MAX_NGRAM + 1)
    ref_unigrams = 0               # NIST: all reference words
    nonempty_refs = 0
    for hyp, refs in zip(hyp_words, ref_words):
        hyp_counts = _ngram_counts(hyp)
        max_ref_counts: dict[tuple, int] = {}
        for words in refs:
            for ngram, count in _ngram_counts(words).items():
                if count > max_ref_counts.get(ngram, 0):
                    max_ref_counts[ngram] = count
        for ngram, count in hyp_counts.items():
            if ngram in max_ref_counts:
                clipped = min(count, max_ref_counts[ngram])
                matches[len(ngram)] += clipped
                match_info[len(ngram)] += info[ngram] * clipped
        for n in range(1, _MAX_NGRAM + 1):
            hyp_ngrams[n] += max(len(hyp) - n + 1, 0)
        hyp_len += len(hyp)
        ref_len += _closest_ref_length(len(hyp), [len(words) for words in refs])
        ref_unigrams += sum(len(words) for words in refs)
        nonempty_refs += sum(1 for words in refs if words)

    # BLEU-4 with the script's smoothing: the k-th n-gram order without any match counts 1/2^k matches.
    log_precision, smooth = 0.0, 1
    for n in range(1, _BLEU_N + 1):
        if hyp_ngrams[n] == 0:
            continue                                    # the script counts this precision as 1
        if matches[n] == 0:
            smooth *= 2
            log_precision += math.log(1 / (smooth * hyp_ngrams[n]))
        else:
            log_precision += math.log(matches[n] / hyp_ngrams[n])
    brevity = math.exp(min(0.0, 1 - ref_len / hyp_len)) if hyp_len > 0 else 0.0
    bleu = math.exp(log_precision / _BLEU_N) * brevity

    # NIST-5: information-weighted precisions, length penalty against the mean reference length.
    if ref_unigrams == 0:
        raise MetricsError("the references contain no words after MT-Eval tokenisation")
    nist = sum(match_info[n] / max(hyp_ngrams[n], 1) for n in range(1, _NIST_N + 1))
    refs_per_instance = nonempty_refs / len(hyp_words)
    ratio = hyp_ngrams[1] / (ref_unigrams / refs_per_instance)
    if ratio <= 0:
        penalty = 0.0
    elif ratio >= 1:
        penalty = 1.0
    else:
        penalty = math.exp(-_NIST_BETA * math.log(ratio) ** 2)
    return bleu, nist * penalty


