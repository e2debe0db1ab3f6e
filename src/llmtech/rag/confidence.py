"""How sure is retrieval that the knowledge base holds the answer? A per-query confidence in [0, 1].

Fused hybrid scores are rank- or per-query-normalised, so they cannot be compared across queries
and say nothing absolute. Two signals that can:

- ``lexical``: IDF-weighted share of the query's content words (the BM25 tokens: jieba words
  for Chinese, stemmed words without stop words for English; question words such as "how many"
  or "多久" left out) that occur in the best passage.
  IDF comes from the knowledge base's own chunks, so rare, specific words ("E13", "滤芯")
  count more than common ones. Works in every language BM25 handles.
- ``dense``: cosine similarity between the query and the best passage, from the knowledge
  base's embedder; only where the embedder covers the query's language (the bundled MiniLM is
  English-only), otherwise ``None``.

``value`` is their mean where both exist, else ``lexical``. Where to cut is data-dependent:
``choose_threshold`` picks it on labelled dev queries (answerable vs not) and the caller
reports how it does on held-out ones.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import ConfigError, DataError

# How a question is asked, not what it is about: left out of the lexical share, so a chatty
# "how many days do I have to ..." is not marked down for words no passage would contain.
QUESTION_WORDS = (
    "what whats how many much when where which who whom whose why does do did can could would "
    "should will shall is are was were am i me my mine you your please tell know want need "
    "there any anything something get got have has had long soon "
    "什么 怎么 怎样 怎么样 如何 多少 多久 多长 多长时间 几天 几个 几 哪 哪里 哪些 哪个 为什么 吗 呢 吧 啊 "
    "请问 我 我的 我们 你 你们 可以 能 能不能 可不可以 是否 是不是 需要 要 想 有没有 一下 还 呀")
from .bm25 import tokenize, tokenize_many
from .retrieve import query_languages
from .types import Passage


@dataclass
class Confidence:
    value: float
    lexical: float
    dense: float | None
    matched: list[str]         # query words found in the best passage
    missing: list[str]         # query words it lacks

    def as_dict(self) -> dict:
        return {"value": round(self.value, 4), "lexical": round(self.lexical, 4),
                "dense": None if self.dense is None else round(self.dense, 4),
                "matched": self.matched, "missing": self.missing}


class ConfidenceScorer:
    """Scores queries against passages already retrieved from ``kb`` (a ``KnowledgeBase``)."""

    def __init__(self, kb, use_dense: bool = True, top: int = 1):
        rows = kb.chunk_rows()
        if not rows:
            raise DataError(f"{kb.path}: the knowledge base is empty, nothing to be confident about")
        params = kb.bm25.params if len(kb.bm25) else {"stem": True, "stopwords": True}
        self.stem, self.stopwords = params["stem"], params["stopwords"]
        df: Counter = Counter()
        for toks in tokenize_many([r[2] for r in rows], self.stem, self.stopwords):
            df.update(set(toks))
        n = len(rows)
        # BM25's (Lucene) idf, always positive; words never seen in the KB get the largest idf
        self.idf = {t: math.log(1 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items()}
        self.unseen_idf = math.log(1 + (n + 0.5) / 0.5)
        self.kb, self.use_dense, self.top = kb, use_dense, top
        self.ignore = {t for w in QUESTION_WORDS.split()
                       for t in tokenize(w, self.stem, stopwords=False)} | set(QUESTION_WORDS.split())

    def lexical(self, query: str, passages: Sequence[Passage]) -> tuple[float, list, list]:
        words = [t for t in dict.fromkeys(tokenize(query, self.stem, self.stopwords))
                 if t not in self.ignore]
        if not words or not passages:
            return 0.0, [], words
        best = (0.0, [], words)
        for p in passages[: self.top]:
            have = set(tokenize(p.title + "\n" + p.text, self.stem, self.stopwords))
            w = {t: self.idf.get(t, self.unseen_idf) for t in words}
            got = [t for t in words if t in have]
            share = sum(w[t] for t in got) / sum(w.values())
            if share > best[0]:
                best = (share, got, [t for t in words if t not in have])
        return best

    def score_many(self, queries: Sequence[str],
                   passages: Sequence[Sequence[Passage]]) -> list[Confidence]:
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries for {len(passages)} passage lists")
        dense: list[float | None] = [None] * len(queries)
        if self.use_dense:
            emb = self.kb.embedder
            todo = [i for i, (q, ps) in enumerate(zip(queries, passages))
                    if ps and all(emb.covers(lang) for lang in query_languages(q))]
            if todo:
                qv = emb.encode_queries([queries[i] for i in todo])
                for row, i in enumerate(todo):
                    pv = emb.encode([p.text for p in passages[i][: self.top]])
                    dense[i] = float(np.clip(np.max(pv @ qv[row]), 0.0, 1.0))
        out = []
        for q, ps, d in zip(queries, passages, dense):
            lex, got, missing = self.lexical(q, ps)
            value = lex if d is None else (lex + d) / 2
            out.append(Confidence(value, lex, d, got, missing))
        return out

    def score(self, query: str, passages: Sequence[Passage]) -> Confidence:
        return self.score_many([query], [passages])[0]


def choose_threshold(scores: Sequence[float], positive: Sequence[bool],
                     min_answer_recall: float | None = None) -> dict:
    """The cut that best separates answerable (``positive``) from unanswerable queries on dev
    data. By default it maximises balanced accuracy (mean of the two recalls), so a handful of
    unanswerable queries is not drowned by many answerable ones. ``min_answer_recall`` is a
    service-level rule instead: keep at least that share of answerable queries (e.g. 0.9: at
    most one in ten goes to a person needlessly) and, within it, refuse as many unanswerable
    ones as possible. Ties go to the lower cut (answer more)."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(positive, dtype=bool)
    if len(s) != len(y) or not len(s):
        raise DataError("choose_threshold needs as many labels as scores, and at least one")
    if y.all() or not y.any():
        raise DataError("choose_threshold needs both answerable and unanswerable dev queries")
    if min_answer_recall is not None and not 0 <= min_answer_recall <= 1:
        raise ConfigError(f"min_answer_recall must be within [0, 1], got {min_answer_recall}")
    cuts = np.unique(np.concatenate([[0.0], s]))
    best = None
    for c in cuts:
        keep = s >= c
        row = {"threshold": float(c), "answer_recall": float(keep[y].mean()),
               "refuse_recall": float((~keep[~y]).mean())}
        row["balanced_accuracy"] = (row["answer_recall"] + row["refuse_recall"]) / 2
        if min_answer_recall is not None:
            if row["answer_recall"] + 1e-12 < min_answer_recall:
                continue
            better = best is None or row["refuse_recall"] > best["refuse_recall"] + 1e-12
        else:
            better = best is None or row["balanced_accuracy"] > best["balanced_accuracy"] + 1e-12
        if better:
            best = row
    best["rule"] = ("balanced_accuracy" if min_answer_recall is None
                    else f"answer_recall>={min_answer_recall:g}")
    return best
