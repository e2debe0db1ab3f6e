"""BM25 keyword retrieval on bm25s, with a tokenizer that understands Chinese.

bm25s' own splitter is a regex for words of two or more "word" characters, so a run of
Chinese characters with no spaces ("云杉扫地机器人的保修期") becomes ONE token and almost never
matches a query. ``tokenize`` therefore cuts every Chinese run with jieba and treats everything
else as English: lower-cased words, stopwords dropped, Snowball-stemmed (PyStemmer). Mixed text
("S1 扫地机的 E03 错误") works without choosing a language first.

``BM25Index`` keeps the string ids of its documents next to the bm25s index; it is rebuilt from
scratch when the corpus changes (indexing 5k abstracts takes about a second).
"""

from __future__ import annotations

import json
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConfigError
from ..io import atomic_write_json
from .stores.base import Hit

log = logging.getLogger(__name__)

_CJK_RUN = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+)")
_WORD = re.compile(r"[0-9a-z]+(?:[._-][0-9a-z]+)*")  # keeps model codes like "e03", "2.4", "wi-fi"

# Function words that carry no topic in a Chinese question. Kept short on purpose: a single
# character such as "锁" or "包" is often the key term, so only grammatical words are listed.
ZH_STOPWORDS = frozenset(
    "的 了 是 吗 呢 吧 啊 呀 和 与 及 或 在 把 被 给 对 都 也 就 还 又 而 并 等 之 其 这 那 这个 那个 "
    "什么 怎么 怎样 如何 哪 哪些 哪个 多少 几 为什么 是否 可以 能 能否 会 要 需要 请问 请 我 你 他 她 "
    "它 我们 你们 他们 有 没有 一个 吗？".split())


@lru_cache(maxsize=1)
def _english_stopwords() -> frozenset[str]:
    # bm25s ships the usual English list (the same one scikit-learn and Lucene use).
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


@lru_cache(maxsize=1)
def _stemmer():
    import Stemmer

    return Stemmer.Stemmer("english")


@lru_cache(maxsize=1)
def _jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba


def tokenize(text: str, stem: bool = True, stopwords: bool = True) -> list[str]:
    """Tokens for BM25: jieba words for Chinese runs, stemmed lower-case words otherwise."""
    out: list[str] = []
    en_stop = _english_stopwords() if stopwords else frozenset()
    stemmer = _stemmer() if stem else None
    for i, part in enumerate(_CJK_RUN.split(text.lower())):
        if not part:
            continue
        if i % 2 == 1:  # a Chinese run (re.split keeps the captured runs at odd positions)
            words = _jieba().lcut(part)
            out.extend(w for w in words if not (stopwords and w in ZH_STOPWORDS))
        else:
            words = [w for w in _WORD.findall(part) if w not in en_stop]
            out.extend(stemmer.stemWords(words) if stemmer else words)
    return out


def tokenize_many(texts: Sequence[str], stem: bool = True, stopwords: bool = True) -> list[list[str]]:
    return [tokenize(t, stem=stem, stopwords=stopwords) for t in texts]


class BM25Index:
    """String-id BM25 index. ``k1``/``b`` are the usual BM25 parameters (Lucene scoring)."""

    def __init__(self, k1: float = 1.2, b: float = 0.75, method: str = "lucene",
                 stem: bool = True, stopwords: bool = True, backend: str = "numba"):
        self.params = dict(k1=k1, b=b, method=method, stem=stem, stopwords=stopwords)
        self.backend = backend
        self.doc_ids: list[str] = []
        self._bm25 = None

    # -- building
    def build(self, ids: Sequence[str], texts: Sequence[str]) -> "BM25Index":
        if len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids for {len(texts)} texts")
        tokens = tokenize_many(texts, self.params["stem"], self.params["stopwords"])
        return self.build_from_tokens(ids, tokens)

    def build_from_tokens(self, ids: Sequence[str], tokens: list[list[str]]) -> "BM25Index":
        import bm25s

        self.doc_ids = list(ids)
        if not self.doc_ids:
            self._bm25 = None
            return self
        p = self.params
        self._bm25 = bm25s.BM25(k1=p["k1"], b=p["b"], method=p["method"], backend=self._backend())
        self._bm25.index(tokens, show_progress=False)
        return self

    def _backend(self) -> str:
        if self.backend == "numba":
            from importlib.util import find_spec

            if find_spec("numba") is None:
                log.warning("numba is not installed: BM25 falls back to the slower numpy backend")
                return "numpy"
        return self.backend

    def __len__(self) -> int:
        return len(self.doc_ids)

    # -- searching
    def search(self, query: str, k: int = 10) -> list[Hit]:
        return self.search_many([query], k)[0]

    def search_many(self, queries: Sequence[str], k: int = 10) -> list[list[Hit]]:
        tokens = tokenize_many(queries, self.params["stem"], self.params["stopwords"])
        return self.search_tokens(tokens, k)

    def search_tokens(self, query_tokens: list[list[str]], k: int = 10) -> list[list[Hit]]:
        """Top-k per query; documents sharing no term with the query are not returned."""
        if self._bm25 is None:
            return [[] for _ in query_tokens]
        vocab = self._bm25.vocab_dict
        ids = [[vocab[t] for t in q if t in vocab and t] for q in query_tokens]
        # A query with no known term matches nothing. It must not reach bm25s: its placeholder
        # "empty token" lies outside the score matrix and crashes the numba scorer.
        asked = [i for i, q in enumerate(ids) if q]
        out: list[list[Hit]] = [[] for _ in ids]
        if not asked:
            return out
        k = min(k, len(self.doc_ids))
        docs, scores = self._bm25.retrieve([ids[i] for i in asked], k=k, show_progress=False,
                                           n_threads=1)
        for i, row_d, row_s in zip(asked, np.asarray(docs), np.asarray(scores)):
            out[i] = [Hit(self.doc_ids[int(d)], float(s)) for d, s in zip(row_d, row_s) if s > 0]
        return out

    # -- persistence
    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self._bm25 is not None:
            self._bm25.save(str(path / "bm25s"))
        atomic_write_json(path / "bm25_meta.json", {"params": self.params, "doc_ids": self.doc_ids})

    @classmethod
    def load(cls, path: str | Path) -> "BM25Index":
        import bm25s

        path = Path(path)
        meta_file = path / "bm25_meta.json"
        if not meta_file.exists():
            raise ConfigError(f"{path}: no BM25 index here (missing bm25_meta.json)")
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        index = cls(**meta["params"])
        index.doc_ids = meta["doc_ids"]
        if index.doc_ids:
            index._bm25 = bm25s.BM25.load(str(path / "bm25s"), load_corpus=False)
        return index
