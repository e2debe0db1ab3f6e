"""Retrieval and answer metrics, written from their definitions.

A *run* maps each query id to its ranked document ids (best first); *qrels* map each query id to
``{doc_id: relevance}`` (relevance > 0 means relevant; graded values count in nDCG).

- recall@k: relevant documents found in the top k / all relevant documents;
- hit rate@k: 1 when at least one relevant document is in the top k;
- MRR@k: 1 / rank of the first relevant document (0 when none in the top k);
- nDCG@k: sum over the top k of (2^rel - 1) / log2(rank + 1), divided by the same sum for the
  ideal ordering (the BEIR / trec_eval definition; with 0/1 relevance 2^rel - 1 = rel).

Queries without any relevant document are skipped, as trec_eval does.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Mapping, Sequence

from ..evals.textgen import exact_match, mean, rouge_l, token_f1

Run = Mapping[str, Sequence[str]]
Qrels = Mapping[str, Mapping[str, int]]


def _relevant(rels: Mapping[str, int]) -> set[str]:
    return {d for d, r in rels.items() if r > 0}


def recall_at_k(ranked: Sequence[str], rels: Mapping[str, int], k: int) -> float:
    relevant = _relevant(rels)
    return len(relevant & set(ranked[:k])) / len(relevant) if relevant else 0.0


def hit_at_k(ranked: Sequence[str], rels: Mapping[str, int], k: int) -> float:
    relevant = _relevant(rels)
    return float(any(d in relevant for d in ranked[:k]))


def mrr_at_k(ranked: Sequence[str], rels: Mapping[str, int], k: int = 10) -> float:
    relevant = _relevant(rels)
    for rank, d in enumerate(ranked[:k], 1):
        if d in relevant:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranked: Sequence[str], rels: Mapping[str, int], k: int = 10) -> float:
    def gain(r: int) -> float:
        return (2 ** r - 1) if r > 0 else 0.0

    dcg = sum(gain(rels.get(d, 0)) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    idcg = sum(gain(r) / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def ranked_docs(passages: Iterable) -> list[str]:
    """Chunk ranking -> document ranking: a document takes the rank of its best chunk
    (max-pooling over a document's chunks). Accepts anything with a ``doc_id``."""
    return list(dict.fromkeys(p.doc_id for p in passages))


def evaluate_run(run: Run, qrels: Qrels, ks: Iterable[int] = (1, 5, 10, 100)) -> dict[str, float]:
    """Mean metrics over the judged queries: ndcg@10, mrr@10, recall@k and hit@k for each k."""
    judged = [q for q, rels in qrels.items() if _relevant(rels)]
    if not judged:
        return {"n_queries": 0}
    out: dict[str, float] = {"n_queries": len(judged)}
    out["ndcg@10"] = mean(ndcg_at_k(run.get(q, []), qrels[q], 10) for q in judged)
    out["mrr@10"] = mean(mrr_at_k(run.get(q, []), qrels[q], 10) for q in judged)
    for k in ks:
        out[f"recall@{k}"] = mean(recall_at_k(run.get(q, []), qrels[q], k) for q in judged)
        out[f"hit@{k}"] = mean(hit_at_k(run.get(q, []), qrels[q], k) for q in judged)
    return out


# --------------------------------------------------------------------------- answers

_CITATION = re.compile(r"\[(\d+)\]")


def cited_numbers(answer: str) -> list[int]:
    """The ``[n]`` markers in an answer, in order of first appearance."""
    seen: list[int] = []
    for m in _CITATION.finditer(answer):
        n = int(m.group(1))
        if n not in seen:
            seen.append(n)
    return seen


def citation_accuracy(cited_doc_ids: Sequence[str], gold_doc_ids: Iterable[str]) -> float | None:
    """Share of cited sources that really hold the answer (None when nothing was cited)."""
    if not cited_doc_ids:
        return None
    gold = set(gold_doc_ids)
    return sum(d in gold for d in cited_doc_ids) / len(cited_doc_ids)


def answer_scores(prediction: str, reference: str) -> dict[str, float]:
    """EM, token F1 and ROUGE-L (character level for Chinese), plus *contains*: the short gold
    answer appears inside the (usually longer) generated answer."""
    pred = _CITATION.sub("", prediction).strip()
    norm = lambda s: re.sub(r"\s+", "", s).lower()  # noqa: E731
    return {"em": exact_match(pred, reference), "f1": token_f1(pred, reference),
            "rouge_l": rouge_l(pred, reference),
            "contains": float(bool(reference) and norm(reference) in norm(pred))}
