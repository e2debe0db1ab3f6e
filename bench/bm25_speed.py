"""BM25 queries/s: llmtech's BM25Index (bm25s, numba backend) vs rank_bm25 on the same corpus
and the same tokens (SciFact: 5,183 abstracts, its 809 train claims as queries).

Target: >= 20x rank_bm25. Tokenisation is excluded from both sides (done once up front).

    .venv/bin/python bench/bm25_speed.py [--rank-bm25-queries 100]
"""

import argparse
import time

from common import ROOT, row, save

from llmtech.rag.beir import load_beir
from llmtech.rag.bm25 import BM25Index, tokenize_many


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank-bm25-queries", type=int, default=100,
                    help="rank_bm25 is slow: time it on the first N queries")
    a = ap.parse_args()
    from rank_bm25 import BM25Okapi

    data = load_beir(ROOT.parent / "shared" / "data" / "beir_scifact_train", "train")
    ids = list(data.corpus)
    doc_tokens = tokenize_many([data.doc_text(i) for i in ids])
    query_tokens = tokenize_many(list(data.queries.values()))

    ours = BM25Index().build_from_tokens(ids, doc_tokens)
    ours.search_tokens(query_tokens[:5], 10)  # numba compiles on first use: not timed
    t = time.perf_counter()
    ours.search_tokens(query_tokens, 10)
    ours_qps = len(query_tokens) / (time.perf_counter() - t)

    ref = BM25Okapi(doc_tokens)
    sample = query_tokens[:a.rank_bm25_queries]
    t = time.perf_counter()
    for q in sample:
        ref.get_top_n(q, ids, n=10)
    ref_qps = len(sample) / (time.perf_counter() - t)

    print(row("rank_bm25 (BM25Okapi)", ref_qps, ref_qps, "q/s"))
    print(row("llmtech BM25Index (bm25s, numba)", ours_qps, ref_qps, "q/s", "target >= 20x"))
    ratio = ours_qps / ref_qps
    save("bm25_speed", {"n_docs": len(ids), "bm25s_qps": round(ours_qps, 1),
                        "rank_bm25_qps": round(ref_qps, 1), "speedup_ratio": round(ratio, 1),
                        "pass": ratio >= 20})


if __name__ == "__main__":
    main()
