"""Text-generation metrics: ROUGE-L (character-level for Chinese), exact match, token F1."""

from __future__ import annotations

import re
import unicodedata

from rouge_score import rouge_scorer

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


class _MixedTokenizer:
    """Chinese characters one by one, other text as lower-cased words (for rouge_score)."""

    def tokenize(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFKC", text).lower()
        return re.findall(r"[\u3400-\u9fff\uf900-\ufaff]|[a-z0-9]+", text)


_scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_MixedTokenizer())


def tokens(text: str) -> list[str]:
    return _MixedTokenizer().tokenize(text)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 with mixed Chinese/English tokenisation."""
    return _scorer.score(reference, prediction)["rougeL"].fmeasure


def exact_match(prediction: str, reference: str) -> float:
    return float(tokens(prediction) == tokens(reference))


def token_f1(prediction: str, reference: str) -> float:
    from collections import Counter

    p, r = tokens(prediction), tokens(reference)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0
