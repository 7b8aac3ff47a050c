"""E2E metrics (splitlora.metrics): hand-checked values, file formats, and equality with the official scorer.

The official numbers below come from a local reconstruction of the E2E challenge scorer
(tuetschek/e2e-metrics: measure_scores.py with its mteval/mteval-v13a-sig.pl, pycocoevalcap 1.2's
METEOR/ROUGE-L/CIDEr scorers and jars), run on files written from `realistic_sample()`.
"""

from __future__ import annotations

import csv
import math
import shutil
from itertools import groupby
from pathlib import Path

import pytest

import splitlora.metrics as M
from splitlora.metrics import MetricsError

E2E_TEST = Path(__file__).resolve().parents[1] / "data" / "e2e" / "testset_w_refs.csv"
JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not JAVA, reason="METEOR and the Stanford PTB tokenizer are Java programs; "
                                                 "`java` is not on PATH")


def realistic_sample() -> tuple[list[str], list[list[str]], list[str]]:
    """(predictions, references, MRs) for the first 50 MRs of the E2E test set.

    Prediction = the MR's first human reference, references = its other references (an MR with a
    single reference keeps it). A few predictions are edited so that every preprocessing step of the
    official scorer matters: an empty output, upper case, extra and non-breaking spaces, punctuation,
    currency, an accented letter, a contraction, and a short output (length penalties).
    """
    with E2E_TEST.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    groups = [(mr, [r["ref"] for r in g]) for mr, g in groupby(rows, key=lambda r: r["mr"])][:50]
    mrs = [mr for mr, _ in groups]
    preds = [refs[0] for _, refs in groups]
    refs = [refs[1:] or refs for _, refs in groups]
    preds[3] = ""                                                    # empty prediction
    preds[7] = preds[7].upper()                                      # both scorers lowercase
    preds[11] = "  " + "   ".join(preds[11].split()) + "  "          # extra spaces
    preds[15] = preds[15] + " (cheap), it's £20-25 at a Café-style place!"  # punctuation, £, é, 's
    preds[20] = " ".join(preds[20].split()[:5])                      # short output
    preds[30] = preds[30].replace(" ", "\u00a0")                     # non-breaking spaces
    return preds, refs, mrs


# The official scorer's output on realistic_sample(). Files written with M.write_predictions and
# M.write_references (one prediction per line; references one per line, a blank line between MRs) as
# predictions.txt and references.txt; command, in the reconstructed e2e-metrics directory:
#   python measure_scores.py references.txt predictions.txt
# which printed (BLEU, METEOR, ROUGE_L as fractions; mteval prints BLEU and NIST with 4 decimals):
#   BLEU: 0.6205  NIST: 6.8617  METEOR: 0.4566  ROUGE_L: 0.6962  CIDEr: 3.4817
# (full precision: BLEU 0.620469949381, NIST 6.861706290488, METEOR 0.4566154604472796,
#  ROUGE_L 0.6962000101435376, CIDEr 3.4816928584320856)
OFFICIAL_TXT = {"BLEU": 0.6205, "NIST": 6.8617, "METEOR": 0.4566, "ROUGE_L": 0.6962, "CIDEr": 3.4817}
# Same scorer, CSV input, as test_official_csv_input writes it: references.csv = header "mr","ref" +
# every test-set row of those 50 MRs (so each prediction's own source is among its references);
# predictions.csv = header "mr","output" + the 50 (MR, prediction) rows shuffled by random.Random(0);
# the scorer regroups the references by MR:
#   python measure_scores.py references.csv predictions.csv
#   BLEU: 0.9664  NIST: 9.7523  METEOR: 0.7878  ROUGE_L: 0.9630  CIDEr: 5.0585
OFFICIAL_CSV = {"BLEU": 0.9664, "NIST": 9.7523, "ROUGE_L": 0.9630, "CIDEr": 5.0585}


def assert_4dp(ours: dict, official: dict) -> None:
    for key, value in official.items():
        assert round(ours[key], 4) == round(value, 4), f"{key}: ours {ours[key]:.6f}, official {value:.6f}"


# ---------------------------------------------------------------------------------------------------
# Hand-checked values
# ---------------------------------------------------------------------------------------------------

def test_identical_prediction_gives_bleu_one():
    refs = [["The Eagle is a cheap coffee shop near Burger King."], ["Blue Spice is in the city centre."]]
    bleu, _ = M.bleu_nist([r[0] for r in refs], refs)
    assert bleu == 1.0
    coco = M.coco_scores([r[0] for r in refs], refs, meteor=False, tokenizer="python")
    assert coco["ROUGE_L"] == 1.0


def test_no_shared_ngram_bleu_is_mteval_smoothed_not_zero():
    # mteval-v13a (the official scorer) smooths BLEU: the k-th n-gram order without any match counts
    # 1/2^k matches. Hypothesis "a b c d e" (5 words) vs reference "v w x y z":
    #   p1 = 1/(2*5), p2 = 1/(4*4), p3 = 1/(8*3), p4 = 1/(16*2); brevity penalty 1 (5 vs 5 words)
    #   BLEU = (1/10 * 1/16 * 1/24 * 1/32) ** (1/4) = (1/122880) ** 0.25 = 0.053411
    bleu, nist = M.bleu_nist(["a b c d e"], [["v w x y z"]])
    assert bleu == pytest.approx((1 / 122880) ** 0.25, rel=1e-12)
    assert round(bleu, 4) == 0.0534
    assert nist == 0.0                                  # no match carries information
    # Only an output without any word scores BLEU 0 (the script's brevity term is 0 then).
    assert M.bleu_nist([""], [["v w x y z"]]) == (0.0, 0.0)


def test_hand_computed_bleu_nist_rouge_cider():
    preds = ["a b c", "d e"]
    refs = [["a b c"], ["d f"]]
    bleu, nist = M.bleu_nist(preds, refs)
    # BLEU: matches/candidates  1-grams a,b,c,d = 4/5;  2-grams ab,bc = 2/3;  3-grams abc = 1/1;
    # no 4-gram in the output: mteval counts that precision as 1. Closest reference lengths 3+2 = 5
    # words = output length, so no brevity penalty.  BLEU = (4/5 * 2/3 * 1 * 1) ** (1/4) = 0.854574
    assert bleu == pytest.approx((4 / 5 * 2 / 3) ** 0.25, rel=1e-12)
    # NIST: information of a reference n-gram = log2(count(prefix) / count(n-gram)) over all
    # references (prefix of a unigram = all 5 reference words): every unigram occurs once -> log2 5;
    # every longer n-gram occurs as often as its prefix -> 0. Matched unigrams a,b,c,d:
    #   4 * log2(5) / 5 output unigrams = 0.8 * 2.321928 = 1.857542
    # length penalty: 5 output words vs 5 reference words / 1 reference per MR -> ratio 1 -> 1.
    assert nist == pytest.approx(0.8 * math.log2(5), rel=1e-12)

    coco = M.coco_scores(preds, refs, meteor=False, tokenizer="python")
    # ROUGE-L (beta 1.2): MR 1 identical -> 1. MR 2: LCS("d e", "d f") = 1, P = R = 1/2,
    #   F = (1 + 1.44) * 0.5 * 0.5 / (0.5 + 1.44 * 0.5) = 0.61 / 1.22 = 0.5.  Mean 0.75.
    assert coco["ROUGE_L"] == pytest.approx(0.75, rel=1e-12)
    # CIDEr-D: idf = log(2 MRs) - log(df); every reference n-gram is in one MR only -> idf log 2, and
    # n-grams absent from the references also get weight log 2 (df counted as 1).
    # MR 1: prediction vector = reference vector -> cosine 1 for n = 1, 2, 3; no 4-grams -> 0;
    #   length term exp(-(2-2 bigrams)^2 / 72) = 1  ->  10 * mean(1, 1, 1, 0) = 7.5
    # MR 2: unigrams {d, e}.{d, f} = (log 2)^2 over norms sqrt(2)log 2 * sqrt(2)log 2 -> 1/2;
    #   bigram "d e" vs "d f" -> 0  ->  10 * mean(0.5, 0, 0, 0) = 1.25.   CIDEr = (7.5 + 1.25) / 2
    assert coco["CIDEr"] == pytest.approx(4.375, rel=1e-12)
    if JAVA:   # the official tokenizer agrees on this text
        assert M.coco_scores(preds, refs, meteor=False, tokenizer="stanford")["CIDEr"] == pytest.approx(4.375)


def test_nist_length_penalty_uses_mean_references_per_mr():
    # 2 MRs with 2 and 1 references of 4 words each -> 12 reference words, 1.5 references per MR:
    # the script's reference length is 12 / 1.5 = 8; outputs total 4 words -> ratio 0.5 ->
    # penalty exp(-beta * ln(0.5)^2), beta = -ln(0.5) / ln(1.5)^2 = 4.216
    preds, refs = ["p q", "r s"], [["p q x y", "p q z w"], ["r s t u"]]
    _, nist = M.bleu_nist(preds, refs)
    beta = -math.log(0.5) / math.log(1.5) ** 2
    penalty = math.exp(-beta * math.log(0.5) ** 2)
    # information: p, q: count 2 of 12 words -> log2(6); r, s: log2(12); bigrams "p q" (2 of p's 2) and
    # "r s" -> 0. Output unigrams 4: (2 log2 6 + 2 log2 12) / 4
    assert nist == pytest.approx((2 * math.log2(6) + 2 * math.log2(12)) / 4 * penalty, rel=1e-12)


# ---------------------------------------------------------------------------------------------------
# Preprocessing: empty outputs, Unicode, whitespace, counts
# ---------------------------------------------------------------------------------------------------

def test_empty_predictions_score_zero():
    refs = [["The Eagle is a pub."], ["Blue Spice is a coffee shop."]]
    assert M.bleu_nist(["", ""], refs) == (0.0, 0.0)
    coco = M.coco_scores(["", "   "], refs, meteor=False, tokenizer="python")
    assert coco["ROUGE_L"] == 0.0 and coco["CIDEr"] == 0.0
    # one empty output among others is simply a zero-length output
    assert M.bleu_nist(["", "Blue Spice is a coffee shop."], refs)[0] > 0


def test_mteval_tokenization_unicode_and_case():
    # ASCII letters are lowercased, other letters keep their case (Perl tr/[A-Z]/[a-z]/); £ and é are
    # word characters; ( ) ! are split off; "," and "." stay inside numbers; "-" after a digit splits.
    assert M.mteval_tokenize("CAFÉ Café £20-25, (cheap) it's 5.0!") == \
        ["cafÉ", "café", "£20", "-", "25", ",", "(", "cheap", ")", "it's", "5.0", "!"]
    # every Unicode space separates words (Perl's \s on UTF-8 text), zero-width space does not
    assert M.mteval_tokenize("a\u00a0b\u3000c  d\u200be") == ["a", "b", "c", "d\u200be"]
    assert M.mteval_tokenize("x &amp; y <skipped>") == ["x", "&", "y"]


def test_ptb_tokenization_as_coco_does():
    # £ becomes "#", brackets -lrb-/-rrb- (kept: the COCO drop list has them upper case), quotes and
    # punctuation dropped, contractions split, hyphenated words and numbers kept whole.
    sentence = "It's \"The Eagle\" (cheap): £20-25, 5.0 out of 5, family-friendly. Don't!"
    expected = "it 's the eagle -lrb- cheap -rrb- # 20-25 5.0 out of 5 family-friendly do n't"
    assert M.ptb_tokenize_python(sentence) == expected
    if JAVA:
        assert M.ptb_tokenize([sentence]) == [expected]


def test_extra_whitespace_and_line_breaks_do_not_change_scores():
    refs = [["The Eagle is a cheap pub near the river."]]
    plain = M.bleu_nist(["The Eagle is a pub near the river."], refs)
    assert M.bleu_nist(["  The  Eagle is\ta pub\u00a0near the\nriver.  "], refs) == plain
    def coco(p):
        return M.coco_scores(p, refs, meteor=False, tokenizer="python")
    messy = "  The  Eagle is\ta pub\u00a0near the\nriver.  "
    assert coco([messy]) == coco(["The Eagle is a pub near the river."])


def test_input_errors_are_clear():
    with pytest.raises(MetricsError, match="3 predictions but 2 reference groups"):
        M.score(["a", "b", "c"], [["a"], ["b"]])
    with pytest.raises(MetricsError, match="reference group 2 is empty"):
        M.bleu_nist(["a", "b"], [["a"], []])
    with pytest.raises(MetricsError, match="reference group 1, reference 2 is empty"):
        M.bleu_nist(["a"], [["a", "  "]])
    with pytest.raises(MetricsError, match="not a string"):
        M.bleu_nist("abc", [["abc"]])
    with pytest.raises(MetricsError, match="tokenizer"):
        M.coco_scores(["a"], [["a"]], tokenizer="nltk")


def test_meteor_reported_unavailable_without_java(monkeypatch):
    monkeypatch.setattr(M.coco, "_java", lambda: None)
    result = M.score(["The Eagle is a pub."], [["The Eagle is a pub."]])
    assert result["METEOR"] is None
    assert "java" in result["METEOR_unavailable"]
    assert result["tokenizer"] == "python-ptb"
    assert result["BLEU"] == 1.0 and result["ROUGE_L"] == 1.0
    with pytest.raises(MetricsError, match="Java"):
        M.ptb_tokenize(["x"])


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------

def test_plain_text_round_trip(tmp_path):
    preds = ["The Eagle is cheap.", "", "Café Sicilia serves £20-25 meals."]
    refs = [["Ref one.", "Ref two."], ["Single ref."], ["Café ref", "b", "c"]]
    M.write_predictions(tmp_path / "p.txt", preds)
    M.write_references(tmp_path / "r.txt", refs)
    assert (tmp_path / "r.txt").read_text(encoding="utf-8") == \
        "Ref one.\nRef two.\n\nSingle ref.\n\nCafé ref\nb\nc\n"
    assert M.read_predictions(tmp_path / "p.txt") == preds
    assert M.read_references(tmp_path / "r.txt") == refs


def test_reference_file_conventions(tmp_path):
    path = tmp_path / "r.txt"
    # no blank line at all: one reference per instance (official), unless one prediction is scored
    path.write_text("a\nb\nc\n", encoding="utf-8")
    assert M.read_references(path) == [["a"], ["b"], ["c"]]
    assert M.read_references(path, num_predictions=1) == [["a", "b", "c"]]
    # BOM, CRLF, surrounding spaces and trailing blank lines are tolerated
    path.write_bytes("\ufeff a \r\nb\r\n\r\nc\r\n\r\n\r\n".encode())
    assert M.read_references(path) == [["a", "b"], ["c"]]
    path.write_text("a\n\n\nb\n", encoding="utf-8")
    with pytest.raises(MetricsError, match=r"r\.txt:3: empty reference group"):
        M.read_references(path)
    path.write_bytes(b"ok\n\xff\n")
    with pytest.raises(MetricsError, match=r"r\.txt:2: not valid UTF-8"):
        M.read_references(path)
    with pytest.raises(MetricsError, match="no such file"):
        M.read_predictions(tmp_path / "missing.txt")
    with pytest.raises(MetricsError, match="prediction 2 contains a line break"):
        M.write_predictions(tmp_path / "p.txt", ["a", "b\nc"])
    with pytest.raises(MetricsError, match="reference group 1, reference 1 is empty"):
        M.write_references(tmp_path / "r2.txt", [[""]])


def test_score_files_count_mismatch_names_both_files(tmp_path):
    (tmp_path / "p.txt").write_text("a\nb\nc\n", encoding="utf-8")
    (tmp_path / "r.txt").write_text("a\n\nb\n", encoding="utf-8")
    with pytest.raises(MetricsError, match=r"p\.txt holds 3 predictions but .*r\.txt holds 2 reference groups"):
        M.score_files(tmp_path / "r.txt", tmp_path / "p.txt", meteor=False)


def test_csv_and_tsv_input(tmp_path):
    refs_csv = tmp_path / "refs.csv"
    refs_csv.write_text('"mr","ref"\n"name[A]","A is good."\n"name[A]","A is fine."\n\n'
                        '"name[B]","B, a pub."\n"name[A]","A again."\n', encoding="utf-8")
    # consecutive equal MRs form a group (as the official scorer reads a reference CSV on its own)
    assert M.read_references(refs_csv) == [["A is good.", "A is fine."], ["B, a pub."], ["A again."]]
    preds_tsv = tmp_path / "preds.tsv"
    preds_tsv.write_text("MR\tsystem output\nname[B]\tB is a pub.\nname[A]\tA is good.\n", encoding="utf-8")
    assert M.read_table(preds_tsv, M.files._HEADER_PRED) == (["name[B]", "name[A]"], ["B is a pub.", "A is good."])
    # predictions with MRs: each gets all reference rows of its MR, in the predictions' order
    ours = M.score_files(refs_csv, preds_tsv, meteor=False)
    direct = M.score(["B is a pub.", "A is good."], [["B, a pub."], ["A is good.", "A is fine.", "A again."]],
                     meteor=False)
    assert ours == direct
    # headerless two-column files work; the official scorer's mojibake repair applies
    plain = tmp_path / "p.csv"
    plain.write_text('name[A],"Price Â£20, cafÃ©"\n', encoding="utf-8")
    assert M.read_table(plain) == (["name[A]"], ["Price £20, café"])
    bad = tmp_path / "bad.csv"
    bad.write_text('"mr","ref"\n"name[A]","x"\n"name[B]","y","z"\n', encoding="utf-8")
    with pytest.raises(MetricsError, match=r"bad\.csv:3: 3 columns, expected 2"):
        M.read_references(bad)
    (tmp_path / "missing.tsv").write_text("MR\toutput\nname[C]\tC.\n", encoding="utf-8")
    with pytest.raises(MetricsError, match=r"missing\.tsv:2: MR 'name\[C\]' has no reference"):
        M.score_files(refs_csv, tmp_path / "missing.tsv", meteor=False)
    bad.write_text('"mr","ref"\n"name[A]","x"\n\n"name[B]",""\n', encoding="utf-8")
    with pytest.raises(MetricsError, match=r"bad\.csv:4: empty reference \(MR 'name\[B\]'\)"):
        M.read_references(bad)


# ---------------------------------------------------------------------------------------------------
# Equality with the official scorer
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample():
    return realistic_sample()


def test_official_bleu_nist(sample):
    preds, refs, _ = sample
    bleu, nist = M.bleu_nist(preds, refs)
    assert_4dp({"BLEU": bleu, "NIST": nist}, {k: OFFICIAL_TXT[k] for k in ("BLEU", "NIST")})


def test_official_rouge_cider_without_java(sample):
    preds, refs, _ = sample
    coco = M.coco_scores(preds, refs, meteor=False, tokenizer="python")
    assert_4dp(coco, {k: OFFICIAL_TXT[k] for k in ("ROUGE_L", "CIDEr")})


@needs_java
def test_official_all_metrics_from_files(sample, tmp_path):
    preds, refs, _ = sample
    M.write_predictions(tmp_path / "predictions.txt", preds)
    M.write_references(tmp_path / "references.txt", refs)
    result = M.score_files(tmp_path / "references.txt", tmp_path / "predictions.txt")
    assert result["tokenizer"] == "stanford-ptb"
    assert "METEOR_unavailable" not in result
    assert_4dp(result, OFFICIAL_TXT)


def test_official_csv_input(sample, tmp_path):
    preds, _, mrs = sample
    with E2E_TEST.open(encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["mr"] in set(mrs)]
    with (tmp_path / "references.csv").open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(["mr", "ref"])
        w.writerows([r["mr"], r["ref"]] for r in rows)
    import random
    order = list(range(len(preds)))
    random.Random(0).shuffle(order)
    with (tmp_path / "predictions.csv").open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(["mr", "output"])
        w.writerows([mrs[i], preds[i]] for i in order)
    result = M.score_files(tmp_path / "references.csv", tmp_path / "predictions.csv", meteor=False)
    assert_4dp(result, OFFICIAL_CSV)


@needs_java
def test_python_ptb_emulation_matches_the_jar_on_e2e_references():
    with E2E_TEST.open(encoding="utf-8") as f:
        sentences = sorted({r["ref"].strip() for r in csv.DictReader(f)})
    jar = M.ptb_tokenize(sentences)
    differ = [s for s, j in zip(sentences, jar, strict=True) if M.ptb_tokenize_python(s) != j]
    assert not differ, differ[:5]
