# %% [markdown]
# # L6.02 文档分块与向量化
# 问题：同一批文档，按 token 窗口（tokens）、递归字符切分（recursive）、整句打包（sentences）
# 三种方式、不同块大小与重叠来切，检索效果差多少？Sentence-BERT 向量化每秒能处理多少段文本，
# 缓存能省多少？进索引之前，怎样自动发现乱码、重复块、空块这类坏数据？
# 你将看到：每种切块配置的块数、平均长度、被 MiniLM 截断的比例，以及在客服知识库问答集上的
# 文档级 hit@1 / hit@5 / MRR@10（BM25：全部可回答问题；MiniLM 向量检索：英文问题）；
# 完整模式再加 SciFact 科研摘要上的 nDCG@10；向量化吞吐 texts/s 与缓存命中的加速；
# 数据质量监控在干净数据和人为损坏副本上的报告。

# %%
import random
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from llmtech import labs, models
from llmtech.evals import speed
from llmtech.rag.beir import load_beir
from llmtech.rag.bm25 import BM25Index
from llmtech.rag.chunking import ChunkConfig, chunk_text
from llmtech.rag.embed import Embedder, EmbeddingCache
from llmtech.rag.loaders import scan
from llmtech.rag.metrics import evaluate_run, ranked_docs
from llmtech.rag.monitor import load_eval_set
from llmtech.rag.quality import QualityConfig, check_chunks

WHOLE = 100_000  # 比任何文档都长的块 = 不切块（整篇文档一个向量）
STRATEGIES = [ChunkConfig(strategy="tokens", size=64, overlap=16),
              ChunkConfig(strategy="tokens", size=128, overlap=32),
              ChunkConfig(strategy="tokens", size=256, overlap=0),
              ChunkConfig(strategy="recursive", size=200, overlap=40),
              ChunkConfig(strategy="recursive", size=500, overlap=50),
              ChunkConfig(strategy="sentences", size=200, overlap=0),
              ChunkConfig(strategy="sentences", size=500, overlap=1),
              ChunkConfig(strategy="sentences", size=WHOLE, overlap=0)]


class Config(labs.LabConfig):
    model: str = "minilm-l6"          # Sentence-BERT 向量模型（all-MiniLM-L6-v2，只懂英文）
    kb_dir: str = "data/support/kb"
    eval_file: str = "data/support/eval_qa.jsonl"
    samples_dir: str = "data/samples/docs"   # GBK txt、html、docx、pdf 各一份
    strategies: list[ChunkConfig] = STRATEGIES
    depth: int = 50                   # 每个问题取回的块数，再按文档合并（文档名次 = 其最好块的名次）
    cache: str = "user"               # user = ~/.cache/llmtech/embeddings/<模型>.sqlite；none = 不缓存
    throughput_texts: int = 192       # 测吞吐用的文本条数
    beir_dir: str = ""                # 完整模式：SciFact（BEIR 格式），"" = 跳过
    beir_split: str = "train"
    beir_docs: int = 0                # 0 = 全部 5183 篇；否则 = 全部相关文档 + 随机干扰文档凑满此数
    beir_strategies: list[str] = []   # 只在 SciFact 上跑这些配置（名字同上表）；空 = 全部
    quality: QualityConfig = QualityConfig()


def name_of(c: ChunkConfig) -> str:
    if c.size >= WHOLE:
        return "whole-doc"
    return f"{c.strategy}-{c.size}" + (f"/{c.overlap}" if c.overlap else "")


def bm25_run(chunks, queries: dict, depth: int) -> dict:
    # 块的排名 → 文档排名：一篇文档排在它最好的块的位置（max-pooling，metrics.ranked_docs）
    index = BM25Index().build([c.id for c in chunks], [c.text for c in chunks])
    chunk = {c.id: c for c in chunks}
    hits = index.search_many(list(queries.values()), depth)
    return {q: ranked_docs(chunk[h.id] for h in hs) for q, hs in zip(queries, hits)}


def dense_run(emb: Embedder, chunks, queries: dict, depth: int) -> dict:
    # 向量已 L2 归一化：内积 = 余弦相似度；几千个块用 numpy 精确检索就够了
    C = emb.encode([c.text for c in chunks])
    Q = emb.encode_queries(list(queries.values()))
    S = Q @ C.T
    top = np.argsort(-S, axis=1)[:, :depth]
    return {q: ranked_docs(chunks[j] for j in row) for q, row in zip(queries, top)}


def main(cfg: Config, lab: labs.LabContext) -> dict:
    rng = random.Random(cfg.seed)
    cache = None if cfg.cache == "none" else (
        models.cache_dir() / "embeddings" / f"{cfg.model}.sqlite" if cfg.cache == "user" else cfg.cache)
    emb = Embedder(cfg.model, cache=cache)
    tok, max_len = emb.st.tokenizer, emb.st.max_seq_length

    # %% 1. 数据：客服知识库（中英双语 44 篇）+ 问答评测集（只用有答案的问题）
    docs, skipped = scan(labs.ROOT / cfg.kb_dir)
    items = [it for it in load_eval_set(labs.ROOT / cfg.eval_file) if it.answerable]
    qrels = {it.id: {d: 1 for d in it.doc_ids} for it in items}
    questions = {it.id: it.question for it in items}
    en_questions = {it.id: it.question for it in items if it.lang == "en"}
    en_qrels = {q: qrels[q] for q in en_questions}
    en_docs = {d.source for d in docs if d.lang == "en"}
    lab.text(f"知识库 {len(docs)} 篇文档（英文 {len(en_docs)} 篇），可回答问题 {len(items)} 个"
             f"（英文 {len(en_questions)} 个）。MiniLM 只懂英文，所以向量检索只在英文文档块上回答"
             "英文问题；BM25（jieba 分词）回答全部问题。指标是文档级的：命中任一相关文档即算命中。")

    # %% 2. 切块 + 检索对比：块越小越"准"还是越"碎"？
    # tokens：按向量模型自己的分词器切窗口，保证模型看到整块（MiniLM 最多读 256 个词片）；
    # recursive：LangChain 递归切分，先按段落、再按行、句、空格，保证不超过 size 个字符；
    # sentences：整句打包到 size 个字符，句子从不被切断；whole-doc：不切块，长文档会被截断。
    # 注意 tokens-256：窗口 256 个词片，再加上 [CLS]/[SEP] 两个特殊符号就超出 MiniLM 的 256，
    # 满窗的块末尾 2 个词片会被截掉——en_truncated 一列会如实显示出来。
    rows, m = [], {}
    for s in cfg.strategies:
        name = name_of(s)
        chunks = [c for d in docs for c in chunk_text(d.source, d.text, s, tok)]
        en_chunks = [c for c in chunks if c.doc_id in en_docs]
        n_tok = [len(tok(c.text, add_special_tokens=False)["input_ids"]) for c in en_chunks]
        rb = evaluate_run(bm25_run(chunks, questions, cfg.depth), qrels, ks=(1, 5))
        rd = evaluate_run(dense_run(emb, en_chunks, en_questions, cfg.depth), en_qrels, ks=(1, 5))
        row = {"strategy": name, "chunks": len(chunks),
               "mean_chars": float(np.mean([len(c.text) for c in chunks])),
               "en_truncated": float(np.mean([n > max_len - 2 for n in n_tok])),
               "bm25_hit@1": rb["hit@1"], "bm25_hit@5": rb["hit@5"], "bm25_mrr": rb["mrr@10"],
               "dense_hit@1": rd["hit@1"], "dense_hit@5": rd["hit@5"], "dense_mrr": rd["mrr@10"]}
        rows.append(row)
        m.update({f"{name}_{k}": v for k, v in row.items() if k != "strategy"})
    lab.table(rows, "切块策略对比：客服知识库（文档级，en_truncated = 超过 MiniLM 256 词片被截断的英文块比例）")
    score = lambda r: (r["bm25_hit@5"] + r["dense_hit@5"], r["bm25_mrr"] + r["dense_mrr"])  # noqa: E731
    best = max(rows, key=score)
    best_cfg = cfg.strategies[rows.index(best)]
    m.update(best_strategy=best["strategy"], best_bm25_hit5=best["bm25_hit@5"],
             best_dense_hit5=best["dense_hit@5"],
             best_hit5=(best["bm25_hit@5"] + best["dense_hit@5"]) / 2,
             best_mrr=(best["bm25_mrr"] + best["dense_mrr"]) / 2)

    # %% 3.（完整模式）长文档公开集：SciFact 科研摘要
    # 为什么选 SciFact：它有人工标注的相关性（809 个训练问题），摘要平均约 1500 字符、不少超过
    # MiniLM 的 256 词片，切与不切确有差别；zh_laws_kb 没有问题与相关性标注，无法量化检索质量。
    if cfg.beir_dir:
        data = load_beir(labs.ROOT / cfg.beir_dir, cfg.beir_split)
        ids = sorted(data.corpus)
        if cfg.beir_docs:
            relevant = {d for rel in data.qrels.values() for d in rel}
            others = [d for d in ids if d not in relevant]
            ids = sorted(relevant | set(rng.sample(others, max(0, cfg.beir_docs - len(relevant)))))
        beir_rows = []
        for s in [s for s in cfg.strategies if not cfg.beir_strategies or name_of(s) in cfg.beir_strategies]:
            chunks = [c for d in ids for c in chunk_text(d, data.doc_text(d), s, tok)]
            rb = evaluate_run(bm25_run(chunks, data.queries, cfg.depth), data.qrels, ks=(10,))
            rd = evaluate_run(dense_run(emb, chunks, data.queries, cfg.depth), data.qrels, ks=(10,))
            beir_rows.append({"strategy": name_of(s), "chunks": len(chunks),
                              "bm25_ndcg@10": rb["ndcg@10"], "dense_ndcg@10": rd["ndcg@10"],
                              "dense_recall@10": rd["recall@10"]})
            m[f"scifact_{name_of(s)}_dense_ndcg10"] = rd["ndcg@10"]
            m[f"scifact_{name_of(s)}_bm25_ndcg10"] = rb["ndcg@10"]
        lab.table(beir_rows, f"SciFact（{len(ids)} 篇摘要，{len(data.queries)} 个问题，"
                             "文档级 nDCG@10，文档得分 = 其最好块的得分）")
        m["scifact_best_dense"] = max(beir_rows, key=lambda r: r["dense_ndcg@10"])["strategy"]

    # %% 4. 向量化吞吐：Embedder（批处理 + 归一化 + 内容哈希缓存）与裸 SentenceTransformer.encode
    pool = sorted({c.text for s in cfg.strategies for d in docs
                   for c in chunk_text(d.source, d.text, s, tok)})
    rng.shuffle(pool)
    texts = pool[:cfg.throughput_texts]
    user_cache, emb.cache = emb.cache, None
    emb.encode(texts[:8])  # 预热：首批调用要分配内存、初始化线程池
    timings = []

    def timed(key, label, fn):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        timings.append({"key": key, "method": label, "texts": len(texts), "seconds": dt,
                        "texts_per_s": len(texts) / dt})
        return out

    raw = timed("raw ST", "SentenceTransformer.encode", lambda: emb.st.encode(
        texts, batch_size=emb.batch_size, normalize_embeddings=True, show_progress_bar=False))
    wrapped = timed("Embedder", "Embedder.encode（无缓存）", lambda: emb.encode(texts))
    with tempfile.TemporaryDirectory() as tmp:
        emb.cache = EmbeddingCache(Path(tmp) / "cache.sqlite")
        timed("cache cold", "Embedder + 缓存（首次，写缓存）", lambda: emb.encode(texts))
        before = dict(emb.stats)
        timed("cache warm", "Embedder + 缓存（重跑，全部命中）", lambda: emb.encode(texts))
        hits = emb.stats["cached"] - before["cached"]
        emb.cache.close()
    emb.cache = user_cache
    lab.table([{k: v for k, v in t.items() if k != "key"} for t in timings], f"向量化吞吐（{cfg.model}，batch {emb.batch_size}，{speed.threads()} 线程）")
    m.update(texts_per_s_raw=timings[0]["texts_per_s"], texts_per_s=timings[1]["texts_per_s"],
             texts_per_s_cache_cold=timings[2]["texts_per_s"],
             texts_per_s_cache_warm=timings[3]["texts_per_s"],
             cache_speedup=timings[3]["texts_per_s"] / timings[1]["texts_per_s"],
             cache_hit_rate=hits / len(texts),
             embedder_vs_raw_max_diff=float(np.abs(np.asarray(raw) - wrapped).max()))

    # %% 5. 数据质量监控：干净数据 vs 人为损坏的副本
    more, _ = scan(labs.ROOT / cfg.samples_dir)
    chunk_all = lambda ds: [c for d in ds for c in chunk_text(d.source, d.text, best_cfg, tok)]  # noqa: E731
    clean = chunk_all(docs + more)
    with tempfile.TemporaryDirectory() as tmp:
        intended = make_corrupted_copy(labs.ROOT / cfg.kb_dir, labs.ROOT / cfg.samples_dir, Path(tmp))
        bad_docs, _ = scan(tmp)
    bad = chunk_all(bad_docs)
    r_clean, r_bad = check_chunks(clean, cfg.quality), check_chunks(clean + bad, cfg.quality)
    lab.table([{"issue": k, "clean": r_clean.counts[k], "with_corrupted": r_bad.counts[k],
                "action": "skip" if k in cfg.quality.skip else "warn"} for k in r_clean.counts],
              f"质量监控：干净数据 {len(clean)} 块 vs 加入损坏副本后 {len(clean) + len(bad)} 块（{best['strategy']}）")
    detect = []
    for source, issue in intended.items():
        found = sorted({i for c in bad if c.doc_id == source for i in r_bad.by_chunk.get(c.id, [])})
        details = [f.detail for f in r_bad.findings if f.doc_id == source and f.issue == issue]
        ex = next((d for d in details if "(lost bytes)" not in d), details[0] if details else "")
        detect.append({"file": source, "corruption": issue, "flagged": ", ".join(found),
                       "detected": issue in found, "example": ex[:90]})
    lab.table(detect, "每个损坏文件是否被发现")
    m.update({f"quality_{k}": v for k, v in r_bad.counts.items()})
    m.update(quality_clean_chunks=len(clean), quality_clean_skipped=len(r_clean.bad_ids()),
             quality_corrupt_chunks=len(clean) + len(bad), quality_corrupt_skipped=len(r_bad.bad_ids()),
             quality_files_corrupted=len(detect),
             quality_files_detected=sum(r["detected"] for r in detect))

    # %% 6. 图：检索效果 / 吞吐 / 质量问题
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.2), gridspec_kw={"width_ratios": [3, 1.4, 1.6]})
    x, w = np.arange(len(rows)), 0.2
    for i, key in enumerate(["bm25_hit@5", "bm25_mrr", "dense_hit@5", "dense_mrr"]):
        ax[0].bar(x + (i - 1.5) * w, [r[key] for r in rows], w, label=key)
    ax[0].set_xticks(x, [f"{r['strategy']} ({r['chunks']})" for r in rows], fontsize=7, rotation=25, ha="right")
    ax[0].set_ylim(0, 1.05)
    ax[0].legend(fontsize=7, loc="lower left")
    ax[0].set_title("sample KB: doc-level retrieval (chunks)")
    ax[1].barh([t["key"] for t in timings], [t["texts_per_s"] for t in timings])
    ax[1].set_xscale("log")
    ax[1].set_title("texts / s (log)")
    ax[1].tick_params(labelsize=7)
    issues = [k for k in r_bad.counts if r_bad.counts[k] or r_clean.counts[k]]
    ax[2].bar(np.arange(len(issues)) - 0.2, [r_clean.counts[k] for k in issues], 0.4, label="clean")
    ax[2].bar(np.arange(len(issues)) + 0.2, [r_bad.counts[k] for k in issues], 0.4, label="+corrupted")
    ax[2].set_xticks(np.arange(len(issues)), issues, rotation=30, fontsize=7)
    ax[2].legend(fontsize=7)
    ax[2].set_title("quality issues (chunks)")
    lab.figure(fig, "chunking.png", "切块策略的检索效果、向量化吞吐与质量问题计数")
    m.update(eval_questions=len(items), eval_questions_en=len(en_questions), kb_docs=len(docs))
    return m


def make_corrupted_copy(kb: Path, samples: Path, out: Path) -> dict[str, str]:
    """写出一组"坏文件"，每个对应一种真实世界里常见的数据问题；返回 {文件名: 该被发现的问题}。"""
    zh = (kb / "returns_zh.md").read_text(encoding="utf-8")
    files = {
        # GBK 文件被当成 Latin-1 读入又存成 UTF-8：「空气净化器」→「¿ÕÆø¾»»¯Æ÷」
        "a2_filter_care_latin1.txt": ((samples / "a2_filter_care.txt").read_bytes().decode("latin-1"), "mojibake"),
        # UTF-8 文件被当成 GBK 读入：「退货」→「閫€璐�」，还夹着 U+FFFD
        "returns_zh_as_gbk.md": (zh.encode("utf-8").decode("gbk", errors="replace"), "mojibake"),
        # 同一文件上传了两次
        "warranty_en (1).md": ((kb / "warranty_en.md").read_text(encoding="utf-8"), "exact_dup"),
        # 旧版本页面：只有数字不同
        "shipping_en_old.md": ("".join(str((int(ch) + 1) % 10) if ch.isdigit() else ch for ch in
                                       (kb / "shipping_en.md").read_text(encoding="utf-8")), "near_dup"),
        # PDF 自定义字体没有 Unicode 映射：部分汉字被抽成私有区字符
        "products_zh_pdf.md": ("".join(chr(0xE000 + i % 64) if i % 4 == 0 and "\u4e00" <= ch <= "\u9fff"
                                       else ch for i, ch in enumerate(
                                           (kb / "products_zh.md").read_text(encoding="utf-8"))), "control_chars"),
        # 中英两篇被拼成一篇：每段中文后紧跟对应英文
        "products_bilingual.md": ("\n\n".join(f"{a} {b}" for a, b in zip(
            (kb / "products_zh.md").read_text(encoding="utf-8").split("\n\n"),
            (kb / "products_en.md").read_text(encoding="utf-8").split("\n\n"))), "mixed_lang"),
        # 只有分隔线的"文档"（网页模板残留）
        "separator.md": ("---\n\n***\n\n* * *\n\n———", "empty"),
    }
    for name, (text, _) in files.items():
        (out / name).write_text(text, encoding="utf-8")
    return {name: issue for name, (_, issue) in files.items()}


if __name__ == "__main__":
    labs.run(main, Config,
             full={"beir_dir": "../shared/data/beir_scifact_train", "beir_docs": 1000,
                   "beir_strategies": ["tokens-128/32", "tokens-256", "recursive-500/50",
                                       "sentences-500/1", "whole-doc"],
                   "throughput_texts": 512},
             headline=["best_strategy", "best_hit5", "best_mrr", "texts_per_s", "cache_speedup",
                       "quality_files_detected"])
