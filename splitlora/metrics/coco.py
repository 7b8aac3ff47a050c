"""METEOR, ROUGE-L and CIDEr as the MS-COCO caption evaluation (pycocoevalcap) computes them, on text
tokenised by the Stanford PTBTokenizer (or, without Java, our pure-Python emulation of it)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from .common import LINE_BREAKS, MetricsError, check_inputs

# Tokens the COCO wrapper drops after PTB tokenisation. Note the bracket names are upper case here
# while the tokenizer runs with -lowerCase, so "-lrb-"/"-rrb-" survive: that is the official behaviour.
PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                             ".", "?", "!", ",", ":", "-", "--", "...", ";"])


def _pycocoevalcap_dir() -> Path:
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise MetricsError("METEOR/ROUGE-L/CIDEr need the pycocoevalcap package: pip install pycocoevalcap")
    return Path(next(iter(spec.submodule_search_locations)))


def _java() -> str | None:
    return shutil.which("java")


def ptb_tokenize(sentences: list[str]) -> list[str]:
    """Stanford PTBTokenizer (CoreNLP 3.4.1 from pycocoevalcap) as the COCO evaluation runs it.

    ``-preserveLines -lowerCase``, one sentence per line; PTB punctuation tokens are then dropped and
    the tokens joined by single spaces. Needs Java. One JVM tokenises all sentences (the tokenizer
    keeps no state across lines, so this equals the official two calls, one for references and one
    for predictions).
    """
    java = _java()
    if java is None:
        raise MetricsError("the Stanford PTB tokenizer needs Java, and `java` is not on PATH")
    jar = _pycocoevalcap_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    if not jar.exists():
        raise MetricsError(f"{jar} is missing: reinstall pycocoevalcap")
    lines = [LINE_BREAKS.sub(" ", s) for s in sentences]
    with tempfile.TemporaryDirectory(prefix="splitlora-ptb-") as tmp:
        path = Path(tmp) / "sentences.txt"
        path.write_bytes("\n".join(lines).encode("utf-8"))
        proc = subprocess.run([java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
                               "-preserveLines", "-lowerCase", str(path)],
                              capture_output=True, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise MetricsError(f"Stanford PTB tokenizer failed (exit {proc.returncode}): {err[-1] if err else ''}")
    out = proc.stdout.decode("utf-8").split("\n")
    if len(out) != len(lines):   # it read some character as a line break: alignment would be lost
        raise MetricsError(f"Stanford PTB tokenizer returned {len(out)} lines for {len(lines)} sentences")
    # .lower() is idempotent on -lowerCase output; it guards against a quirk we saw in some runs of
    # the jar started from a shell, where the first token of the file kept its capital letter.
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATION).lower()
            for line in out]


# ---- pure-Python emulation of the Stanford PTBTokenizer (used only without Java) ------------------
# A longest-match lexer over a subset of CoreNLP 3.4.1's PTBLexer rules: the ones English text of the
# E2E kind exercises (words, hyphenated words, numbers, fractions, currency, contractions, quotes,
# brackets, abbreviations, sentence-final periods). Letter case of the rule names follows PTBLexer.

_L = r"[^\W\d_]"                     # a letter
_A = r"[^\W_]"                       # a letter or digit
_APOS = "['\u2019\u0092]"
_APOSETC = "['\u2019\u0092`\u2018\u201b\u0091]"
_ABBREVIATIONS = (  # PTBLexer's ABBREV1/ABBREV2 lists; (?-i:X) = must be capitalised
    r"Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept?|Oct|Nov|Dec|Mon|Tues?|Wed|Thu|Thurs|Fri"
    r"|Ala|Ariz|(?-i:A)z|(?-i:A)rk|Calif|Colo|Conn|Ct|Dak|(?-i:D)el|Fla|Ga|(?-i:I)ll|Ind|Kans?|Ky|(?-i:L)a"
    r"|(?-i:M)ass|Md|Mich|Minn|(?-i:M)iss|Mo|Mont|Neb|Nev|Okla|(?-i:O)re|(?-i:P)a|Penn|Tenn|(?-i:T)ex|Va|Vt"
    r"|(?-i:W)ash|Wisc?|Wyo|Inc|Cos?|Corp|Pp?t[ye]s?|Ltd|Plc|Bancorp|Dept|Bhd|Assn|Univ|Intl|Sys"
    r"|Prop|Ph|tel|est|ext|sq|ft|Jr|Sr|Bros|(?:Ed|Ph)\.D|Blvd|Rd|Esq|etc|al|seq"
    r"|Mr|Mrs|Ms|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt|Cpl|Pvt|Capt|Ste?"
    r"|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft|Adj|Adv|Asst|Assoc|Ens|Insp|Mlle|Mme|Msgr|Sfc"
    r"|Invt|Elec|Natl|M[ft]g"
)
_PTB_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                    "wanna": ("wan", "na"), "lemme": ("lem", "me"), "gimme": ("gim", "me")}
_PTB_RENAME = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-",
               "£": "#", "€": "$", "¤": "$", "¢": "cents", "½": "1/2", "¼": "1/4", "¾": "3/4"}
# (pattern, kind); the lexer takes the longest match, the earlier rule on ties. A match's `emit`
# group, if any, is the token and the rest of the match is only trailing context (JFlex's A/B).
_PTB_RULES = [(re.compile(p, re.IGNORECASE), kind) for p, kind in [
    (r"</?[A-Za-z!?][^>\r\n]*>", "keep"),                                          # SGML tag
    (r"(?:cannot|gonna|gotta|wanna|lemme|gimme)(?![^\W_])", "split"),
    (rf"{_APOS}t(?=(?:is|was)(?![^\W_]))", "keep"),                                # 'tis 'twas
    (rf"(?P<emit>{_A}+){_APOS}(?:[msd]|re|ve|ll)(?![A-Za-z])", "keep"),          # it|'s  we|'re
    (rf"{_APOS}(?:[msd]|re|ve|ll)(?![A-Za-z])", "apos"),                           # 's 're 'll
    (rf"(?P<emit>[A-Za-z]*[a-mo-z])n{_APOSETC}t", "keep"),                          # do|n't  ca|n't
    (rf"n{_APOSETC}t(?![A-Za-z])", "nt"),                                          # n't
    (rf"{_APOS}n(?:{_APOS}|(?![A-Za-z]))|{_APOS}[2-9]0s|{_APOS}(?:till?|cause|em)(?![^\W_])", "apos"),
    (rf"y{_APOS}(?=[A-Za-z])", "apos"),                                            # y'all
    (rf"(?-i:[A-HJ-XZn]){_APOSETC}{_L}{{2}}{_L}*|{_L}+[aeiouy]{_APOSETC}(?:[aeiou]|(?-i:[A-Z])){_L}*", "keep"),
    (rf"(?:[dol]{_APOSETC}{_A})?{_A}+(?:[-_\u2010\u2011](?:[dol]{_APOSETC}{_A})?{_A}+)*", "keep"),  # THING
    (r"[A-Za-z0-9][A-Za-z0-9.,]*(?:-(?:[A-Za-z0-9]+|[A-Za-z](?:\.[A-Za-z])+\.))+", "keep"),  # HTHING
    (rf"{_L}{_A}*(?:[.!?]{_L}{_A}*)*", "keep"),                                    # WORD (centre.The)
    (rf"(?P<emit>{_A}*{_L}{_A}*(?:[-.!?]{_A}+)*\.)[,;:]", "keep"),                  # word. before , ; :
    (r"[-+]?(?:\d*(?:[.:,\u00ad\u066b\u066c]\d+)+|\d+)", "keep"),                  # NUMBER
    (r"(?:\d{1,4}[- \u00a0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}", "keep"),              # FRAC
    (r"[^\W_]+(?:-[^\W\d_]+){0,2}(?:\\?/[^\W_]+(?:-[^\W\d_]+){0,2}){1,2}", "keep"),  # THING3: x/y
    (r"(?-i:[A-Z]+(?:[+&][A-Z]+)+)", "keep"),                                      # AT&T (THINGA)
    (rf"(?:{_ABBREVIATIONS})\.", "keep"),                                          # abbreviations
    (r"Nos?\.(?=[ \t\u00a0]*\d|[,;:])", "keep"),                                  # No. 5
    (r"[A-Za-z](?:\.[A-Za-z])+\.", "keep"),                                        # acronyms: u.s.
    (r"(?P<emit>[A-Za-z]\.)(?![ \t\u00a0]+(?-i:[A-Z]))", "keep"),                  # initials, not before Upper
    (r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+|(?:https?|ftp)://\S+", "keep"),                 # e-mail, URL
    (r"(?-i:[A-Z]*)\$|#(?:[^\W\d_][^\W_]*)?|@[A-Za-z_]\w*", "keep"),                # US$ #tag @name
    (r"\.\.+|…", "drop"), (r"-{2,}|[–—―]", "drop"),                                 # ... and --
    (r"[?!]+", "keep"), (r"\*+", "keep"), (r"_+", "keep"),
    (r"[\"'`\u2018\u2019\u201a\u201b\u201c\u201d\u201e\u0091\u0092\u0093\u0094]", "drop"),
    (r"[\s\S]", "keep"),                                                           # anything else
]]
_PTB_SPACE = re.compile("[ \t\x1c-\x1f\u00a0\u1680\u2000-\u200b\u202f\u205f\u3000]+")


def ptb_tokenize_python(sentence: str) -> str:
    """Pure-Python emulation of :func:`ptb_tokenize` for one sentence (used when Java is missing).

    Reproduces what the Stanford tokenizer does to English text of the E2E kind: currency symbols
    normalised (``£`` becomes ``#``), brackets renamed (``(`` becomes ``-lrb-``), quotes and
    punctuation split off and dropped, ``n't``/``'s``/``'re``... split from their word, hyphenated
    words, numbers like ``20-25``/``5.0``/``3/5`` and abbreviations like ``st.`` kept whole, all
    lowercased. It gives the jar's tokens on every E2E reference; on unusual text it may differ.
    """
    text = LINE_BREAKS.sub(" ", sentence).replace("\u00ad", "")
    tokens: list[str] = []
    pos = 0
    while True:
        space = _PTB_SPACE.match(text, pos)
        if space:
            pos = space.end()
        if pos >= len(text):
            break
        best, best_len = None, 0
        for rule, kind in _PTB_RULES:
            m = rule.match(text, pos)
            if m and m.end() - pos > best_len:
                best, best_len = (m, kind), m.end() - pos
        m, kind = best
        word = m.group("emit") if "emit" in m.re.groupindex else m.group(0)
        pos += len(word)
        low = word.lower()
        if kind == "split":
            tokens.extend(_PTB_SPLIT_WORDS[low])
        elif kind == "drop":
            continue
        elif kind in ("apos", "nt"):
            tokens.append(re.sub(_APOSETC, "'", low))
        else:
            tokens.append(_PTB_RENAME.get(low, low).replace(" ", "\u00a0"))   # "3 1/2" is one token
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION)


def _meteor(gts: dict, res: dict) -> tuple[float | None, str | None]:
    """pycocoevalcap's METEOR 1.5 (corpus-level statistics aggregation); (None, reason) if it cannot run."""
    if _java() is None:
        return None, "METEOR unavailable: it runs the METEOR 1.5 jar and `java` is not on PATH (install a JRE)"
    try:
        from pycocoevalcap.meteor.meteor import Meteor
    except ImportError:
        return None, "METEOR unavailable: pip install pycocoevalcap"
    meteor = None
    try:
        meteor = Meteor()      # starts the jar: java -jar -Xmx2G meteor-1.5.jar - - -stdio -l en -norm
        value, _ = meteor.compute_score(gts, res)
        return float(value), None
    except (OSError, ValueError) as e:          # jar missing or dead: no number, a reason
        return None, f"METEOR unavailable: the METEOR jar failed ({type(e).__name__}: {e})"
    finally:
        if meteor is not None:
            if meteor.lock.locked():            # compute_score raised while holding it;
                meteor.lock.release()           # Meteor.__del__ (which stops the jar) would block
            del meteor


def coco_scores(predictions: list[str], references: list[list[str]], *, meteor: bool = True,
                tokenizer: str = "auto") -> dict:
    """METEOR, ROUGE_L and CIDEr as the E2E scorer computes them with pycocoevalcap.

    Returns ``{"METEOR": float | None, "ROUGE_L": float, "CIDEr": float, "tokenizer": str}``, plus
    ``"METEOR_unavailable": reason`` whenever METEOR is None: no Java, the jar failed, or
    ``meteor=False`` (it skips the METEOR jar, whose start-up takes several seconds).
    `tokenizer` picks the PTB tokenisation: ``"stanford"`` (the official jar, needs Java),
    ``"python"`` (:func:`ptb_tokenize_python`) or ``"auto"`` (the jar when Java is on PATH); the
    result's ``tokenizer`` field says which ran (``"stanford-ptb"`` or ``"python-ptb"``).
    """
    preds, groups = check_inputs(predictions, references)
    if tokenizer not in ("auto", "stanford", "python"):
        raise MetricsError(f"tokenizer: {tokenizer!r} is not one of auto, stanford, python")
    try:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as e:
        raise MetricsError(f"METEOR/ROUGE-L/CIDEr need the pycocoevalcap package ({e}): "
                           "pip install pycocoevalcap") from None
    sentences = [r for group in groups for r in group] + preds
    if tokenizer == "stanford" or (tokenizer == "auto" and _java() is not None):
        tokenized, used = ptb_tokenize(sentences), "stanford-ptb"
    else:
        tokenized, used = [ptb_tokenize_python(s) for s in sentences], "python-ptb"
    # the COCO scorers' input: {instance: [tokenized references]}, {instance: [tokenized prediction]}
    gts, res, pos = {}, {}, 0
    for i, group in enumerate(groups):
        gts[i] = tokenized[pos:pos + len(group)]
        pos += len(group)
    for i in range(len(preds)):
        res[i] = [tokenized[pos + i]]
    if not any(ref.split() for refs in gts.values() for ref in refs):
        raise MetricsError("the references contain no words after PTB tokenisation (only punctuation?)")

    result: dict = {}
    if meteor:
        result["METEOR"], unavailable = _meteor(gts, res)
    else:
        result["METEOR"], unavailable = None, "METEOR not computed (meteor=False)"
    if unavailable:
        result["METEOR_unavailable"] = unavailable
    result["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    result["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    result["tokenizer"] = used
    return result


