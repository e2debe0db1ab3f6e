"""Text-generation metrics: ROUGE-L (character-level for Chinese), corpus BLEU (jieba words for
Chinese), exact match, token F1."""

from __future__ import annotations

import math
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


# --------------------------------------------------------------------------- BLEU

def bleu_tokens(text: str, tokenize: str = "jieba") -> list[str]:
    """Tokens for BLEU: ``jieba`` (Chinese words, other text as words), ``char`` (Chinese
    characters one by one, as ``tokens``) or ``space`` (whitespace split). NFKC + lower-case."""
    text = unicodedata.normalize("NFKC", text).lower()
    if tokenize == "jieba":
        import jieba

        return [t for t in jieba.lcut(text) if t.strip()]
    if tokenize == "char":
        return re.findall(r"[\u3400-\u9fff\uf900-\ufaff]|[a-z0-9]+|[^\sa-z0-9\u3400-\u9fff\uf900-\ufaff]", text)
    if tokenize == "space":
        return text.split()
    raise ValueError(f"tokenize must be 'jieba', 'char' or 'space' (got {tokenize!r})")


def corpus_bleu(hypotheses: list[list[str]], references: list[list[list[str]]], max_n: int = 4,
                smooth: bool = False) -> dict:
    """Corpus BLEU (Papineni et al. 2002) of tokenised ``hypotheses``, each with one or more
    tokenised ``references``.

    For each n = 1..max_n the clipped n-gram matches (a hypothesis n-gram counts at most as
    often as it occurs in any one reference) and the hypothesis n-gram totals are summed over
    the corpus; p_n = matches / totals. BLEU = BP · exp(mean log p_n), with the brevity penalty
    BP = exp(1 - r/c) when the hypotheses' total length c is below r (the sum over sentences of
    the reference length closest to each hypothesis; ties go to the shorter), else 1.
    ``smooth=True`` adds one to the matches and totals of n >= 2 (Lin & Och 2004), so a corpus
    with no 4-gram match still gets a non-zero score. Returns ``bleu``, ``precisions``, ``bp``,
    ``hyp_len``, ``ref_len``.
    """
    from collections import Counter

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    match, total = [0] * max_n, [0] * max_n
    c = r = 0
    for hyp, refs in zip(hypotheses, references):
        if not refs:
            raise ValueError("every hypothesis needs at least one reference")
        c += len(hyp)
        r += min((len(x) for x in refs), key=lambda L: (abs(L - len(hyp)), L))
        for n in range(1, max_n + 1):
            grams = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
            most = Counter()
            for ref in refs:
                most |= Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
            match[n - 1] += sum(min(k, most[g]) for g, k in grams.items())
            total[n - 1] += sum(grams.values())
    if smooth:
        match = [m + (i > 0) for i, m in enumerate(match)]
        total = [t + (i > 0) for i, t in enumerate(total)]
    prec = [m / t if t else 0.0 for m, t in zip(match, total)]
    bp = 1.0 if c > r else (math.exp(1 - r / c) if c else 0.0)
    score = bp * math.exp(sum(math.log(p) for p in prec) / max_n) if min(prec) > 0 else 0.0
    return {"bleu": score, "precisions": prec, "bp": bp, "hyp_len": c, "ref_len": r}


def bleu(predictions: list[str], references: list[str] | list[list[str]], tokenize: str = "jieba",
         max_n: int = 4, smooth: bool = False) -> dict:
    """Corpus BLEU of predicted strings against reference strings (one or several per
    prediction), tokenised with ``bleu_tokens`` (jieba words by default). See ``corpus_bleu``."""
    refs = [[x] if isinstance(x, str) else list(x) for x in references]
    return corpus_bleu([bleu_tokens(p, tokenize) for p in predictions],
                       [[bleu_tokens(x, tokenize) for x in rs] for rs in refs], max_n, smooth)
