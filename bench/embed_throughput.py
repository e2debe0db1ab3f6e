"""Indexing throughput: llmtech's Embedder vs raw sentence-transformers ``encode`` on the same
texts, plus the optional int8 path (PyTorch dynamic quantisation) and its retrieval cost.

Targets: Embedder within 10% of raw encode (ratio >= 0.9); int8's nDCG@10 cost on SciFact-train
reported (dense retrieval, full corpus).

    .venv/bin/python bench/embed_throughput.py [--texts 600]
"""

import argparse
import tempfile
import time
from pathlib import Path

from common import ROOT, row, save

from llmtech.rag.beir import evaluate_beir, load_beir
from llmtech.rag.embed import Embedder


def timed(fn, texts):
    t = time.perf_counter()
    fn(texts)
    return len(texts) / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=600)
    a = ap.parse_args()
    data = load_beir(ROOT.parent / "shared" / "data" / "beir_scifact_train", "train")
    texts = [data.doc_text(i) for i in list(data.corpus)[:a.texts]]

    with tempfile.TemporaryDirectory() as d:
        emb = Embedder(cache=Path(d) / "cache.sqlite")       # the indexing path: hash + cache write
        raw = emb.st
        raw.encode(texts[:16])                                # warm-up
        raw_tps = timed(lambda t: raw.encode(t, batch_size=64, normalize_embeddings=True), texts)
        ours_tps = timed(emb.encode, texts)
        cached_tps = timed(emb.encode, texts)                 # second pass: every text cached
        int8 = Embedder(quantize="int8")
        int8.encode(texts[:16])
        int8_tps = timed(int8.encode, texts)

    print(row("raw SentenceTransformer.encode", raw_tps, raw_tps, "texts/s"))
    print(row("llmtech Embedder (fresh cache)", ours_tps, raw_tps, "texts/s", "target >= 0.90x"))
    print(row("llmtech Embedder (all cached)", cached_tps, raw_tps, "texts/s"))
    print(row("llmtech Embedder int8", int8_tps, raw_tps, "texts/s"))

    fp32 = evaluate_beir(data, retriever="dense")
    q8 = evaluate_beir(data, retriever="dense", embedder=None, fusion=None, cache=True,
                       quantize="int8")
    print(f"SciFact-train dense nDCG@10: fp32 {fp32['ndcg@10']:.4f}  int8 {q8['ndcg@10']:.4f}")
    save("embed_throughput", {
        "n_texts": len(texts), "raw_texts_per_s": round(raw_tps, 1),
        "embedder_texts_per_s": round(ours_tps, 1), "embedder_ratio": round(ours_tps / raw_tps, 3),
        "cached_texts_per_s": round(cached_tps, 1),
        "int8_texts_per_s": round(int8_tps, 1), "int8_speedup_ratio": round(int8_tps / raw_tps, 3),
        "fp32_ndcg@10": fp32["ndcg@10"], "int8_ndcg@10": q8["ndcg@10"],
        "int8_ndcg_cost": round(fp32["ndcg@10"] - q8["ndcg@10"], 4),
        "pass": ours_tps / raw_tps >= 0.9})


if __name__ == "__main__":
    main()
