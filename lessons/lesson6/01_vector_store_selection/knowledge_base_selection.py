# %% [markdown]
# # L6.01 向量库选型对比
# 问题：同一批真实文本向量，放进 FAISS（flat / HNSW / IVF）、Chroma、PostgreSQL + pgvector
# （以及配置了地址时的 Elasticsearch），建库要多久？单条查询多快（p50/p95）？近似索引找回了
# 精确检索 top-10 中的多少（recall@10）？占多少内存和磁盘？
# 你将看到：每个向量库一行实测数字、一张"延迟-召回"图，以及选型建议。

# %%
import shutil
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter, ScalarFormatter

from pydantic import field_validator

from llmtech import labs
from llmtech.rag import storebench
from llmtech.rag.stores import es_reachable, local_postgres, make_store

STORES = ["faiss-flat", "faiss-hnsw", "faiss-ivf", "chroma", "pgvector", "elasticsearch"]


class Config(labs.LabConfig):
    model: str = "minilm-l6"          # 嵌入模型（384 维，英文模型；中文短句区分度较差）
    data: str = "support"             # support = 本项目的客服知识库；scifact = BEIR SciFact 摘要
    support_dir: str = "data/support"
    scifact_dir: str = "../shared/data/beir_scifact_train"
    max_passages: int | None = 2000   # None = 全部
    n_queries: int = 200              # 查询：不在库里的留出问题
    k: int = 10
    stores: list[str] = list(STORES)
    hnsw_m: int = 32                  # HNSW 每个节点的邻居数：大 → 召回高、内存多、建库慢
    ef_search: int = 64               # HNSW 查询时的候选队列长度：大 → 召回高、查询慢
    nprobe: int = 8                   # IVF 每次查询扫描的聚类数：大 → 召回高、查询慢
    pg_url: str | None = None         # None：用 pgserver 在临时目录启动本地 PostgreSQL
    es_url: str | None = None         # 例如 http://localhost:9200；不给或连不上就不测 ES

    @field_validator("stores")
    @classmethod
    def _known(cls, v):
        bad = [s for s in v if s not in STORES]
        if bad or not v:
            raise ValueError(f"stores must be a non-empty list from {STORES}")
        return v


def store_factories(cfg: Config, folder: Path, dim: int, pg_url: str) -> dict:
    """每个向量库一个"新建空库"的函数；同一参数下各库拿到完全相同的向量。"""
    faiss = dict(hnsw_m=cfg.hnsw_m, ef_search=cfg.ef_search, nprobe=cfg.nprobe)
    return {
        "faiss-flat": lambda: make_store("faiss", dim, index="flat", path=folder / "faiss-flat"),
        "faiss-hnsw": lambda: make_store("faiss", dim, index="hnsw", path=folder / "faiss-hnsw",
                                         **faiss),
        "faiss-ivf": lambda: make_store("faiss", dim, index="ivf", path=folder / "faiss-ivf",
                                        **faiss),
        "chroma": lambda: make_store("chroma", dim, path=folder / "chroma"),
        "pgvector": lambda: make_store("pgvector", dim, url=pg_url, table="l601_chunks",
                                       ef_search=cfg.ef_search, drop_existing=True),
        "elasticsearch": lambda: make_store("elasticsearch", dim, url=cfg.es_url,
                                            index="l601-chunks", drop_existing=True),
    }


def main(cfg: Config, lab: labs.LabContext) -> dict:
    # %% 1. 数据：真实文本 → 向量（所有库共用同一批向量）
    scifact = labs.ROOT / cfg.scifact_dir
    if cfg.data == "scifact" and (scifact / "corpus.jsonl").exists():
        passages, queries = storebench.beir_texts(scifact, cfg.n_queries)
        source = f"BEIR SciFact（{scifact.name}）：标题 + 摘要"
    else:
        if cfg.data == "scifact":
            lab.text(f"未找到 {scifact}/corpus.jsonl，改用本项目的客服数据。")
        support = labs.ROOT / cfg.support_dir
        passages = storebench.support_passages(support)
        queries = storebench.support_queries(support)[: cfg.n_queries]
        source = "data/support：知识库行/句/相邻行窗口 + SFT 问答 + 偏好数据回答"
    # 随机抽样后编码；英文模型会把一些中文短句编成同一个向量，去掉这些重复向量
    texts, corpus = storebench.embed_passages(passages, cfg.max_passages, cfg.seed, cfg.model,
                                              progress=True)
    query_vecs = storebench.embed(queries, cfg.model)
    ids = [f"doc{i}" for i in range(len(texts))]
    n, dim = corpus.shape
    lab.text(f"数据：{source}；{n} 条段落、{len(queries)} 条留出查询，{cfg.model} 编码为 "
             f"{dim} 维单位向量（内积 = 余弦相似度）。示例段落：「{texts[0][:80]}」")

    # %% 2. 真值：暴力计算每条查询的精确 top-k，近似索引的 recall@k 都和它比
    truth = [[ids[j] for j in row] for row in storebench.exact_top_k(corpus, query_vecs, cfg.k)]

    # %% 3. 逐个向量库：建库（分批写入 + 持久化）→ 逐条查询计时 → 召回 / 内存 / 磁盘
    folder = lab.path("stores")
    shutil.rmtree(folder, ignore_errors=True)  # 每次从空库开始
    pg_server, pg_url = None, cfg.pg_url
    if "pgvector" in cfg.stores and pg_url is None:  # 没给服务器地址：临时起一个本地 PostgreSQL
        pg_dir = Path(tempfile.mkdtemp(prefix="l601-pg-"))
        pg_server, pg_url = local_postgres(pg_dir / "data", cleanup_mode="delete")
    es_ok = "elasticsearch" in cfg.stores and es_reachable(cfg.es_url)
    factories = store_factories(cfg, folder, dim, pg_url)
    storebench.preload_clients()  # 先导入各客户端库：内存增量只算数据和索引
    results, m = [], {"n_vectors": n, "dim": dim, "n_queries": len(queries), "k": cfg.k}
    for name in cfg.stores:
        if name == "elasticsearch" and not es_ok:
            continue
        result, store = storebench.bench_store(name, factories[name], ids, corpus, query_vecs,
                                               truth, k=cfg.k)
        store.close()
        results.append(result)
        key = name.replace("-", "_")
        m.update({f"{key}_build_s": result.build_s, f"{key}_p50_ms": result.p50_ms,
                  f"{key}_p95_ms": result.p95_ms, f"{key}_recall_at_{cfg.k}": result.recall_at_k,
                  f"{key}_rss_mb": result.rss_mb, f"{key}_disk_bytes": result.disk_bytes})
    if pg_server is not None:
        pg_server.cleanup()  # 停止服务器并删除它的数据目录
        shutil.rmtree(pg_dir, ignore_errors=True)

    # %% 4. 结果：表格 + 图 + 选型建议
    rows = [{"向量库": r.store, "建库 s": r.build_s, "p50 ms": r.p50_ms, "p95 ms": r.p95_ms,
             f"recall@{cfg.k}": r.recall_at_k, "内存增量 MB": r.rss_mb,
             "磁盘 MB": r.disk_bytes / 2**20} for r in results]
    lab.table(rows, f"{n} 条 {dim} 维向量、{len(queries)} 条查询（单条查询计时，k={cfg.k}）")
    lab.text("说明：延迟含客户端调用开销——FAISS 在进程内直接算；Chroma 经过它的 Rust 内核；"
             "pgvector 每次查询都经 socket 走一次 SQL 往返。内存增量只算本进程：pgvector 和 "
             "Elasticsearch 的索引在服务器进程里，看「磁盘 MB」（表 + 索引的大小）更有意义。")
    if "elasticsearch" in cfg.stores and not es_ok:
        lab.text(f"Elasticsearch：没有可连接的 ES 服务器（es_url={cfg.es_url or '未设置'}），"
                 "因此没有测量 ES。有集群时加 `es_url=http://主机:9200` 重跑即可。")
    m["es_measured"] = es_ok
    good = [r for r in results if r.recall_at_k >= 0.95] or results
    fastest = min(good, key=lambda r: r.p50_ms)
    m.update(fastest_store=fastest.store, fastest_p50_ms=fastest.p50_ms)

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for i, r in enumerate(results):
        ax[0].scatter(r.p50_ms, r.recall_at_k, s=60)
        ax[0].annotate(r.store, (r.p50_ms, r.recall_at_k), textcoords="offset points",
                       xytext=(6, 6 if i % 2 == 0 else -14))  # 上下交错，避免标签重叠
    ax[0].set(xscale="log", xlabel="p50 latency per query (ms, log)",
              ylabel=f"recall@{cfg.k} vs exact", title="latency vs recall")
    ax[0].xaxis.set_major_formatter(ScalarFormatter())  # 0.1、1 而不是 10^-1
    ax[0].xaxis.set_minor_formatter(NullFormatter())
    names = [r.store for r in results]
    ax[1].bar(names, [r.build_s for r in results])
    ax[1].set(yscale="log", ylabel="seconds (log)", title=f"build time ({n} vectors)")
    ax[2].bar(names, [r.disk_bytes / 2**20 for r in results])
    ax[2].set(ylabel="MB", title="persisted size on disk")
    for a in ax[1:]:
        a.tick_params(axis="x", rotation=30)
    lab.figure(fig, "store_selection.png", "各向量库的查询延迟-召回、建库时间与磁盘占用")

    lab.text("""### 选型建议（生态与适用场景）

- **FAISS**：一个库而不是一个服务，进程内调用最快，索引种类最全（Flat / HNSW / IVF / PQ，
  还有 GPU 版）。没有服务器、没有元数据过滤和事务，删除和持久化要自己管（本项目用 id 映射 +
  墓碑 + 原子写入封装了）。适合单机应用、离线批量建库、研究与评测。
- **Chroma**：嵌入式向量数据库，自动持久化、带元数据过滤，API 最简单；适合原型和中小规模
  知识库。规模和并发上来后需要换成它的服务器模式或别的系统。
- **PostgreSQL + pgvector**：已经在用 PostgreSQL 时的首选——向量和业务数据同在一张表，
  有事务、权限、备份、SQL 过滤和 JOIN；HNSW / IVFFlat 索引在百万到千万级表现良好。
- **Elasticsearch**：已有 ES 检索平台、需要 BM25 全文检索与向量检索混合、需要分布式横向
  扩展时选它；运维成本最高。
- 规模决定要不要近似索引：几千条向量时精确检索（flat）也只要零点几毫秒，HNSW / IVF 的优势
  要到几十万、上百万条才明显；先用 flat 起步，变慢了再换。
- 近似索引的参数决定"快"与"准"的交换：HNSW 调 `ef_search`、`hnsw_m`，IVF 调 `nprobe`；
  先用 flat（精确）算出真值，再按目标召回率调参——试试 `nprobe=2` 或 `ef_search=16`。""")
    return m


if __name__ == "__main__":
    labs.run(main, Config,
             full={"data": "scifact", "max_passages": None},
             headline=["n_vectors", "fastest_store", "fastest_p50_ms"])
