# %% [markdown]
# # L7.06 性能压测：检索延迟与生成速度
# 问题：知识库服务上线前，要知道"多快、能扛多少"。换向量库、加大 top-k、打开重排、增加并发客户端、
# 批量生成、量化模型——每个选择让 p50/p95/p99 延迟和吞吐量变了多少？
# 做法：闭环压测（N 个客户端线程，每个收到回答后立刻发下一个请求），先预热、预热的请求不计入统计；
# 检索在进程内对 FAISS / Chroma / pgvector 知识库压测，再通过 HTTP 压测真实启动的 `llmtech serve`
# （RAGFlow 兼容的 /api/v1/retrieval）；生成比较批大小 1 与 4、fp32 与 int8 量化模型的 tokens/s。
# 你将看到：每个配置一行的延迟分位数与吞吐量表、两张图，以及"哪个配置最快"的实测结论。
# 注意：这是测量，不是及格线——数字来自本机 2 核 CPU，换机器会变。

# %%
import shutil

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from llmtech import labs, models
from llmtech.compress.quantize import build_variant
from llmtech.errors import ConfigError
from llmtech.rag.beir import default_cache
from llmtech.rag.embed import Embedder
from llmtech.rag.generate import Generator
from llmtech.rag.kb import KBConfig, KnowledgeBase
from llmtech.rag.rerank import make_reranker
from llmtech.rag.stores.pgvector_store import local_postgres
from llmtech.serve import loadtest as lt

STORES = ("faiss", "chroma", "pgvector")


class Config(labs.LabConfig):
    kb_dir: str = "data/support/kb"                 # 客服知识库（44 篇中英文档）
    questions: str = "data/support/eval_qa.jsonl"   # 压测用的问题（循环使用）
    n_questions: int | None = 32
    embedder: str = "minilm-l6"
    stores: list[str] = list(STORES)                # 进程内检索压测的向量库
    top_ks: list[int] = [5, 20]                     # 第一个用于比较向量库，其余只在第一个库上测
    rerank: str = "llm"                             # 项目的重排器（none 关闭这一行）
    rerank_top: int = 5                             # 重排前几名
    clients: list[int] = [1, 4]                     # HTTP 检索的并发客户端数
    duration_s: float = 4.0                         # 每个检索配置的测量时长
    warmup_s: float = 1.0                           # 预热时长（不计入统计）
    gen_questions: int = 4                          # 每个生成配置回答多少个问题
    batch_sizes: list[int] = [1, 4]
    quant: str = "int8"                             # compress.quantize 的变体：int8 / bf16 / none
    max_new_tokens: int = 16
    gen_top_k: int = 2                              # 生成时放进提示词的段落数
    max_passage_chars: int = 300
    api_key: str = "sk-l706-bench"
    server_timeout_s: float = 180


FULL = {"n_questions": None, "duration_s": 20.0, "warmup_s": 3.0, "clients": [1, 2, 4, 8],
        "gen_questions": 24, "max_new_tokens": 64}


def main(cfg: Config, ctx: labs.LabContext) -> dict:
    # %% 0. 先检查设置：错误的设置在任何耗时操作之前报错，并指出是哪个键
    for s in cfg.stores:
        if s not in STORES:
            raise ConfigError(f"stores: unknown store {s!r}; choose from {', '.join(STORES)}")
    for c in cfg.clients:
        lt.check_load_settings(c, cfg.duration_s, None, cfg.warmup_s)
    for key in ("top_ks", "batch_sizes"):
        if not getattr(cfg, key) or min(getattr(cfg, key)) < 1:
            raise ConfigError(f"{key}: needs at least one value, each >= 1")
    if cfg.quant not in ("int8", "bf16", "none"):
        raise ConfigError(f"quant: must be int8, bf16 or none, got {cfg.quant!r}")

    # %% 1. 数据：问题列表（固定种子打乱，请求 i 用第 i % n 个问题；缺 question 的行报错）
    qs = lt.read_questions(labs.ROOT / cfg.questions, cfg.n_questions, cfg.seed)
    bench = lt.Bench()  # 每个配置一行：表格、扁平指标、统计量
    record, m = bench.add, bench.metrics

    run = dict(duration_s=cfg.duration_s, warmup_s=cfg.warmup_s)
    # %% 2. 进程内检索：每种向量库建一个知识库（共享向量模型和嵌入缓存），混合检索 top-k
    emb = Embedder(cfg.embedder, cache=default_cache(cfg.embedder))
    kbs, pg_note = {}, ""
    for store in cfg.stores:  # 向量模型只加载一次；文档嵌入走磁盘缓存，第二个库起不必重算
        folder = ctx.path(f"kb_{store}")
        shutil.rmtree(folder, ignore_errors=True)
        opts = {}
        if store == "pgvector":
            try:  # 真实的 PostgreSQL + pgvector（pgserver 在临时目录里启动，约 1 秒）
                _, url = local_postgres(ctx.path("pgdata"), cleanup_mode="delete")
            except ConfigError as e:
                pg_note = f"pgvector 没有运行：{e}"
                print(pg_note, flush=True)
                continue
            opts = {"url": url, "table": "l706_chunks", "drop_existing": True}
        kbs[store] = KnowledgeBase.create(folder, KBConfig(embedder=cfg.embedder, store=store,
                                                           store_options=opts), embedder=emb)
        kbs[store].update(labs.ROOT / cfg.kb_dir)
    emb.cache.close()  # 压测时关掉嵌入缓存：否则循环的问题命中缓存，测到的不是向量化的真实耗时
    emb.cache, (first, k0) = None, (next(iter(kbs)), cfg.top_ks[0])
    print(f"\n== 检索（进程内，1 个客户端，每个配置 {cfg.duration_s:g} 秒 + 预热 {cfg.warmup_s:g} 秒）")
    for store, kb in kbs.items():
        record(f"{store} k={k0}", lt.run_load(lambda i, kb=kb: kb.search(qs[i % len(qs)], k0), **run), "检索")
    for k in cfg.top_ks[1:]:
        record(f"{first} k={k}", lt.run_load(lambda i, k=k: kbs[first].search(qs[i % len(qs)], k), **run), "检索")

    # %% 3. 重排：先检索 top-k，再用项目的重排器（LLM 读问题+段落打分）重排前 rerank_top 个
    model, tok = models.load_lm(cfg.model)
    reranker = make_reranker(cfg.rerank, default_lm=cfg.model, loaded={cfg.model: (model, tok)})
    if reranker is not None:
        def reranked(i):
            q = qs[i % len(qs)]
            return reranker.rerank(q, kbs[first].search(q, max(k0, cfg.rerank_top)), top=cfg.rerank_top)
        record(f"{first} k={k0} +rerank {cfg.rerank}", lt.run_load(reranked, **run), "检索")

    # %% 4. HTTP：启动真实的服务（子进程 + uvicorn），通过 API 建库上传解析，再用 N 个客户端压测
    data_dir = ctx.path("serve_data")
    shutil.rmtree(data_dir, ignore_errors=True)
    overrides = [f"generation.model={cfg.model}", f"data_dir={data_dir}", "kb_docs=null",
                 f"api_keys={{{cfg.api_key}: l706}}", f"limits.max_queued_generations={max(cfg.clients) + 4}"]
    with lt.start_server(overrides, timeout_s=cfg.server_timeout_s) as srv:
        files = sorted((labs.ROOT / cfg.kb_dir).glob("*.md"))
        ds, n_chunks = lt.upload_dataset(srv.url, cfg.api_key, "l706", files)
        # vary：问题加请求编号，服务端的查询向量 LRU 缓存命中不了；最后一行（cached）问题循环重复
        for c, vary in [(c, True) for c in cfg.clients] + [(max(cfg.clients), False)]:
            before = lt.query_counters(srv.url)
            target = lt.retrieval_target(srv.url, cfg.api_key, [ds], qs, top_k=k0, vary=vary)
            name = f"http retrieval c={c}" + ("" if vary else " cached")
            record(name, lt.run_load(target, clients=c, **run), "HTTP 检索")
            after = lt.query_counters(srv.url)
            m.update({f"{lt.slug(name)}_{k}": after.get(k, 0) - before.get(k, 0) for k in after})
        http_alive = srv.alive()
    shutil.rmtree(data_dir, ignore_errors=True)

    # %% 5. 生成：同一批 RAG 提示词（先检索好段落），批大小 × 模型精度；每个请求是一批问题
    ctx_passages = [kbs[first].search(q, cfg.gen_top_k) for q in qs]
    variants = {"fp32": (model, tok)}
    if cfg.quant != "none":
        d = build_variant(cfg.quant, cfg.model, seed=cfg.seed)
        variants[cfg.quant] = (d.model, d.tokenizer)
    print(f"\n== 生成（{cfg.gen_questions} 个问题，max_new_tokens={cfg.max_new_tokens}）")
    gen_stats = {}
    for vname, (mdl, tk) in variants.items():
        for b in cfg.batch_sizes:
            gen = Generator(cfg.model, max_new_tokens=cfg.max_new_tokens, batch_size=b, model=mdl,
                            tokenizer=tk, max_passage_chars=cfg.max_passage_chars)

            def ask(i, gen=gen, b=b):
                idx = [(i * b + j) % len(qs) for j in range(b)]
                ans = gen.answer_many([qs[x] for x in idx], [ctx_passages[x] for x in idx])
                return {"tokens": sum(a.completion_tokens for a in ans), "items": b}
            n_req = max(1, cfg.gen_questions // b)
            gen_stats[(vname, b)] = record(f"{vname} batch={b}",
                                           lt.run_load(ask, requests=n_req, warmup_requests=1), "生成")
    for kb in kbs.values():
        kb.close()

    # %% 6. 结果表与图
    ctx.table(bench.rows, title="全部配置（延迟只统计成功的请求；req/s = 成功请求数 / 测量阶段墙钟时间）")
    ctx.figure(lt.percentile_figure(bench.stats), "latency_percentiles.png", "每个配置的 p50 / p95 / p99 延迟（对数坐标）")
    http = [bench.stats[f"http retrieval c={c}"] for c in cfg.clients]
    ctx.figure(lt.clients_figure(cfg.clients, http, "HTTP retrieval: throughput vs clients"), "throughput_vs_clients.png", "HTTP 检索：吞吐量与 p95 延迟随并发客户端数的变化")
    plt.close("all")

    # %% 7. 结论（按实测写；"最佳检索配置"不算缓存命中的那一行）
    retr = {n: st for n, st in bench.stats.items()
            if bench.kinds[n] != "生成" and "cached" not in n and st["throughput"]}
    best = max(retr, key=lambda n: retr[n]["throughput"]) if retr else None
    rnd = lambda v: None if v is None else round(v, 2)  # noqa: E731
    ratio = lambda a, b: round(a / b, 3) if a and b else None  # noqa: E731
    (b1, b4), (c1, c4) = (min(cfg.batch_sizes), max(cfg.batch_sizes)), (min(cfg.clients), max(cfg.clients))
    fp, qv = gen_stats[("fp32", b1)], gen_stats.get((cfg.quant, b1))
    m.update({"n_configs": len(bench.stats), "n_questions": len(qs), "http_chunks": n_chunks,
              "server_alive_after": http_alive, "best_retrieval_config": best,
              "best_retrieval_throughput": rnd(retr[best]["throughput"]) if best else None,
              "fp32_tokens_per_s": rnd(fp["tokens_per_s"]), "quant": cfg.quant,
              "quant_tokens_per_s": rnd(qv["tokens_per_s"]) if qv else None,
              "quant_vs_fp32_tokens_per_s": ratio(qv and qv["tokens_per_s"], fp["tokens_per_s"]),
              "batch_sizes_compared": f"{b4} vs {b1}", "clients_compared": f"{c4} vs {c1}",
              # 批大小 b4 与 b1 每秒回答的问题数之比；HTTP 检索 c4 与 c1 个客户端的吞吐量之比
              "batch4_vs_batch1_throughput": ratio(gen_stats[("fp32", b4)]["items_per_s"], fp["items_per_s"]),
              "http_c4_vs_c1_throughput": ratio(http[-1]["throughput"], http[0]["throughput"]),
              "total_errors": sum(st["errors"] for st in bench.stats.values()), "pgvector_note": pg_note})
    hk = lt.slug(f"http retrieval c={c4}")
    ctx.text(f"测量环境：2 核 CPU，压测按设计独占运行、不与其他任务共享（有别的负载时数字会变差）；模型 {cfg.model}。"
             f"这是一次测量，不是及格线。\n\n吞吐量最高的检索配置：**{best}**（{m['best_retrieval_throughput']} req/s）。"
             f"生成：fp32 批大小 {b1} 为 {m['fp32_tokens_per_s']} tokens/s，批大小 {b4} 每秒回答的问题数是它的 "
             f"{m['batch4_vs_batch1_throughput']} 倍；{cfg.quant} 模型 {m['quant_tokens_per_s']} tokens/s"
             f"（fp32 的 {m['quant_vs_fp32_tokens_per_s']} 倍）。" + ("批处理没有变快：CPU 上长 RAG 提示词的预填充是计算"
             "密集的，合批省不下算力，左侧补齐还要多算。" if (m["batch4_vs_batch1_throughput"] or 0) < 1 else "")
             + f"\n\nHTTP 检索（真实服务，{n_chunks} 个块）：客户端从 "
             f"{c1} 增到 {c4}，吞吐量 × {m['http_c4_vs_c1_throughput']}；这期间服务端算了 {m.get(hk + '_computed')} "
             f"个查询向量、只用了 {m.get(hk + '_batches')} 次前向（并发的查询被合批）。问题重复时命中 LRU 缓存"
             f"（cached 行），快得多，但那测的是缓存不是检索。" + (f"\n\n{pg_note}" if pg_note else ""))
    return m


if __name__ == "__main__":
    labs.run(main, Config, full=FULL,
             headline=["n_configs", "best_retrieval_config", "best_retrieval_throughput",
                       "fp32_tokens_per_s", "quant_tokens_per_s", "batch4_vs_batch1_throughput",
                       "http_c4_vs_c1_throughput", "total_errors"])
