"""Read a retrieval benchmark in the standard BEIR layout.

    DIR/corpus.jsonl     {"_id": ..., "title": ..., "text": ...}
    DIR/queries.jsonl    {"_id": ..., "text": ...}
    DIR/qrels/<split>.tsv   query-id <tab> corpus-id <tab> score   (first line a header)

Errors name the file and line. Only queries that appear in the split's qrels are returned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..io import existing_file


@dataclass
class BeirData:
    name: str
    corpus: dict[str, dict]            # id -> {"title", "text"}
    queries: dict[str, str]            # id -> text (only those judged in the split)
    qrels: dict[str, dict[str, int]]   # query id -> {doc id: relevance}
    split: str

    def doc_text(self, doc_id: str) -> str:
        d = self.corpus[doc_id]
        return f"{d['title']}\n{d['text']}".strip() if d.get("title") else d["text"]


def _jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            missing = [k for k in required if k not in rec]
            if missing:
                raise DataError(f"{path}:{n}: missing field {missing[0]!r}")
            rows.append(rec)
    return rows


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if n == 1 and not parts[-1].lstrip("-").isdigit():
                continue  # header: query-id corpus-id score
            if not line.strip():
                continue
            if len(parts) != 3:
                raise DataError(f"{path}:{n}: expected 3 tab-separated columns, got {len(parts)}")
            try:
                score = int(parts[2])
            except ValueError:
                raise DataError(f"{path}:{n}: score {parts[2]!r} is not an integer") from None
            qrels.setdefault(parts[0], {})[parts[1]] = score
    return qrels


def load_beir(folder: str | Path, split: str = "test") -> BeirData:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: BEIR folder not found")
    qrels_file = folder / "qrels" / f"{split}.tsv"
    if not qrels_file.exists():
        have = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
        raise DataError(f"{qrels_file}: no qrels for split '{split}'"
                        + (f" (available: {', '.join(have)})" if have else ""))
    corpus = {str(r["_id"]): {"title": r.get("title") or "", "text": r.get("text") or ""}
              for r in _jsonl(existing_file(folder / "corpus.jsonl", "BEIR corpus"), ("_id",))}
    all_queries = {str(r["_id"]): r["text"] for r in
                   _jsonl(existing_file(folder / "queries.jsonl", "BEIR queries"), ("_id", "text"))}
    qrels = read_qrels(qrels_file)
    missing = [q for q in qrels if q not in all_queries]
    if missing:
        raise DataError(f"{qrels_file}: query id {missing[0]!r} is not in queries.jsonl "
                        f"({len(missing)} such ids)")
    if not corpus:
        raise DataError(f"{folder / 'corpus.jsonl'}: the corpus is empty")
    queries = {q: all_queries[q] for q in qrels}
    name = folder.name if folder.name not in ("retrieval", "beir", "data") else \
        f"{folder.parent.name}/{folder.name}"
    return BeirData(name, corpus, queries, qrels, split)


# --------------------------------------------------------------------------- evaluation

def default_cache(model_id: str) -> Path:
    from ..models import cache_dir

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id)
    return cache_dir() / "embeddings" / f"{safe}.sqlite"


def evaluate_beir(data: BeirData, retriever: str = "hybrid", embedder: str | None = None,
                  rerank: str | None = None, rerank_depth: int = 20, fusion=None,
                  cache: bool = True, batch_size: int = 64, k: int = 100,
                  quantize: str | None = None, passages: int | None = None) -> dict:
    """Index ``data.corpus``, answer every judged query and score the run.

    Returns ndcg@10, mrr@10, recall@k/hit@k, queries_per_s (search only: query embedding,
    search, fusion, rerank) and index_seconds (embedding the corpus + building the indexes).
    ``passages=N`` embeds each document as windows of N tokens (overlap N/8) and scores a
    document by its best window; None embeds whole documents (the model truncates them).
    """
    import time

    from ..models import DEFAULT_EMBEDDER
    from .bm25 import BM25Index
    from .metrics import evaluate_run
    from .retrieve import BM25Retriever, DenseRetriever, FusionSettings, HybridRetriever

    if retriever not in ("bm25", "dense", "hybrid"):
        from ..errors import ConfigError

        raise ConfigError(f"--retriever must be bm25, dense or hybrid (got '{retriever}')")
    ids = list(data.corpus)
    texts = [data.doc_text(i) for i in ids]
    qids = list(data.queries)
    queries = [data.queries[q] for q in qids]
    out: dict = {"dataset": data.name, "split": data.split, "retriever": retriever,
                 "rerank": rerank or "none", "n_docs": len(ids), "n_queries": len(qids)}

    t0 = time.perf_counter()
    sparse = dense = None
    if retriever in ("bm25", "hybrid"):
        sparse = BM25Retriever(BM25Index().build(ids, texts))
    if retriever in ("dense", "hybrid"):
        from .embed import Embedder
        from .stores import FaissStore

        model = embedder or DEFAULT_EMBEDDER
        emb = Embedder(model, batch_size=batch_size, quantize=quantize,
                       cache=default_cache(model) if cache else None)
        store = FaissStore(emb.dim)  # exact inner-product search: the reference numbers
        group_of = None
        if passages:
            from .chunking import ChunkConfig, chunk_text

            cfg = ChunkConfig(strategy="tokens", size=passages, overlap=passages // 8)
            chunks = [c for i, t in zip(ids, texts) for c in chunk_text(i, t, cfg, emb.st.tokenizer)]
            group_of = {c.id: c.doc_id for c in chunks}
            store.add([c.id for c in chunks], emb.encode([c.text for c in chunks]))
            out["passages"] = len(chunks)
        else:
            store.add(ids, emb.encode(texts))
        dense = DenseRetriever(emb, store, group_of)
        out["embedder"] = model + (f" ({quantize})" if quantize else "")
        out["embedded"], out["embed_cached"] = emb.stats["embedded"], emb.stats["cached"]
    out["index_seconds"] = round(time.perf_counter() - t0, 3)

    if retriever == "hybrid":
        search = HybridRetriever(dense, sparse, fusion or FusionSettings())
    else:
        search = sparse or dense
    reranker = None
    if rerank and rerank != "none":
        from .rerank import make_reranker

        reranker = make_reranker(rerank)
    t0 = time.perf_counter()
    results = search.search_many(queries, k)
    if reranker is not None:
        results = [reranker.rerank_hits(q, hits[:rerank_depth], data_texts(data, hits[:rerank_depth]))
                   + hits[rerank_depth:] for q, hits in zip(queries, results)]
    seconds = time.perf_counter() - t0
    out["queries_per_s"] = round(len(qids) / seconds, 1) if seconds > 0 else None
    run = {q: [h.id for h in hits] for q, hits in zip(qids, results)}
    scores = evaluate_run(run, data.qrels, ks=(1, 5, 10, k))
    for key in ("ndcg@10", "mrr@10", "recall@10", f"recall@{k}", "hit@1", "hit@10"):
        out[key] = round(scores[key], 4)
    return out


def data_texts(data: BeirData, hits) -> dict[str, str]:
    return {h.id: data.doc_text(h.id) for h in hits}
