"""Hybrid query latency without the LLM, one query at a time, on 5k documents (SciFact corpus):
query embedding (MiniLM) + BM25 + FAISS + fusion. Target: p95 <= 25 ms.

    .venv/bin/python bench/hybrid_latency.py [--queries 300]
"""

import argparse
import time

import numpy as np

from common import ROOT, save

from llmtech.rag.beir import default_cache, load_beir
from llmtech.rag.bm25 import BM25Index
from llmtech.rag.embed import Embedder
from llmtech.rag.retrieve import BM25Retriever, DenseRetriever, HybridRetriever
from llmtech.rag.stores import FaissStore


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--index", default="flat", help="faiss index: flat | hnsw | ivf")
    a = ap.parse_args()
    data = load_beir(ROOT.parent / "shared" / "data" / "beir_scifact_train", "train")
    ids = list(data.corpus)
    texts = [data.doc_text(i) for i in ids]
    emb = Embedder(cache=default_cache("minilm-l6"))
    store = FaissStore(emb.dim, index=a.index)
    store.add(ids, emb.encode(texts))
    emb.cache = None  # queries are embedded for real, never served from the cache
    hybrid = HybridRetriever(DenseRetriever(emb, store), BM25Retriever(BM25Index().build(ids, texts)))
    queries = list(data.queries.values())[:a.queries]
    for q in queries[:10]:  # warm-up (numba compile, torch first call)
        hybrid.search_many([q], 10)
    stages = {"total": [], "embed": [], "bm25": [], "dense": [], "fuse": []}
    for q in queries:
        t0 = time.perf_counter()
        v = emb.encode_queries([q])
        t1 = time.perf_counter()
        b = hybrid.bm25.search_many([q], hybrid.settings.depth)[0]
        t2 = time.perf_counter()
        d = hybrid.dense.search_many([q], hybrid.settings.depth, vectors=v)[0]
        t3 = time.perf_counter()
        hybrid.fuse(b, d, hybrid.dense_weight_for(q), 10)
        t4 = time.perf_counter()
        for key, s in zip(stages, (t4 - t0, t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            stages[key].append(s * 1000)
    out = {"n_docs": len(ids), "n_queries": len(queries), "faiss_index": a.index}
    print(f"{'stage':8} {'p50 ms':>8} {'p95 ms':>8}")
    for key, xs in stages.items():
        p50, p95 = np.percentile(xs, 50), np.percentile(xs, 95)
        out[f"{key}_p50_ms"], out[f"{key}_p95_ms"] = round(float(p50), 2), round(float(p95), 2)
        print(f"{key:8} {p50:8.2f} {p95:8.2f}")
    out["pass"] = out["total_p95_ms"] <= 25
    print(f"p95 total {out['total_p95_ms']} ms (target <= 25 ms)")
    save("hybrid_latency", out)


if __name__ == "__main__":
    main()
