# %% [markdown]
# # L6.03 FAISS 向量库构建与增量更新
# 问题：知识库文档天天在变，每次都把全部文档重新切块、重新编码吗？
# 做法：用内容哈希判断哪些文档新增 / 修改 / 删除，只处理变化的部分；FAISS 用 id 映射支持按 id
# 删除；文档库（SQLite）是唯一事实来源，向量库和 BM25 每次更新后都与它对齐。
# 你将看到：首次建库（分批写入）→ 持久化后重新加载、检索结果逐条一致 → 改 2 篇、删 1 篇、
# 增 1 篇后的增量更新 → 与"全部重建"比耗时和编码量，并验证两者结果完全相同。

# %%
import shutil
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from llmtech import labs
from llmtech.data.formats import read_records
from llmtech.rag.chunking import ChunkConfig
from llmtech.rag.kb import KBConfig, KnowledgeBase


class Config(labs.LabConfig):
    docs: str = "data/support/kb"           # 原始文档目录（会复制一份再修改，原文件不动）
    questions: str = "data/support/eval_qa.jsonl"
    index: str = "flat"                     # FAISS 索引：flat（精确）| hnsw | ivf
    chunk_size: int = 400                   # 每块最多多少字符（按句子打包，不切断句子）
    batch_size: int = 32                    # 编码批大小；每 8 批写一次向量库
    k: int = 5


def snapshot(kb: KnowledgeBase, questions: list[str], k: int) -> list[list[tuple[str, float]]]:
    """每个问题检索到的 (chunk id, 分数)，用来逐条比较两个索引是否一致。"""
    return [[(p.id, round(p.score, 5)) for p in ps] for ps in kb.search_many(questions, k)]


def edit_documents(docs):
    """模拟一次知识库变更：改 2 篇（改一个事实）、删 1 篇、新增 1 篇。"""
    returns = docs / "returns_zh.md"
    returns.write_text(returns.read_text(encoding="utf-8").replace("7 天", "10 天"), encoding="utf-8")
    ship = docs / "shipping_en.md"
    ship.write_text(ship.read_text(encoding="utf-8") + "\n\n## Holiday notice\n\nDuring the "
                    "Spring Festival (Jan 26 to Feb 4) orders ship within 96 hours.\n", encoding="utf-8")
    (docs / "recycling_environment_en.md").unlink()
    (docs / "gift_cards_zh.md").write_text(
        "# 礼品卡\n\n云杉礼品卡面额有 ¥200、¥500 和 ¥1000 三种，有效期 3 年，不可兑换现金。\n"
        "礼品卡可与优惠券同时使用，但不能用于购买礼品卡。\n", encoding="utf-8")


def main(cfg: Config, lab: labs.LabContext) -> dict:
    # %% 1. 准备：复制一份文档，作为"会变化的知识库"
    work = lab.path("work")
    shutil.rmtree(work, ignore_errors=True)
    docs = work / "docs"
    shutil.copytree(labs.ROOT / cfg.docs, docs)
    questions = [r["question"] for _, r in read_records(labs.ROOT / cfg.questions)]
    if cfg.quick:
        questions = questions[::4]
    kb_cfg = KBConfig(store="faiss", store_options={"index": cfg.index}, batch_size=cfg.batch_size,
                      chunk=ChunkConfig(strategy="sentences", size=cfg.chunk_size, overlap=0))

    # %% 2. 首次建库：切块 → 分批编码、分批写入 FAISS → 持久化
    kb = KnowledgeBase.create(work / "kb", kb_cfg)
    first = kb.update(docs)
    lab.text(f"首次建库：{len(first.added)} 篇文档 → {first.chunks_total} 个块，编码 "
             f"{first.embedded} 个，用时 {first.seconds:.1f} s（含加载嵌入模型）。")
    before = snapshot(kb, questions, cfg.k)
    kb.close()

    # %% 3. 持久化后重新加载：检索结果必须与建库时逐条相同
    kb = KnowledgeBase.open(work / "kb")
    reloaded = snapshot(kb, questions, cfg.k)
    reload_identical = reloaded == before
    lab.text(f"从磁盘重新加载后，{len(questions)} 个问题的 top-{cfg.k}（块 id 和分数）"
             f"{'完全一致' if reload_identical else '出现差异！'}。")

    # %% 4. 文档变更 → 增量更新：只有变化的文档被重新切块、编码
    edit_documents(docs)
    t = time.perf_counter()
    inc = kb.update(docs)
    inc_s = time.perf_counter() - t
    lab.table([{"新增": ", ".join(inc.added), "修改": ", ".join(inc.updated),
                "删除": ", ".join(inc.deleted), "未变": len(inc.unchanged),
                "新编码块": inc.embedded, "删除块": inc.chunks_removed, "秒": inc_s}],
              "增量更新（内容哈希决定哪些文档变了）")
    after_inc = snapshot(kb, questions, cfg.k)
    new_fact = kb.search("礼品卡有效期多久？", k=1)[0]
    changed = kb.search("无理由退货期限是几天", k=1, mode="bm25")[0]
    gone = [p for ps in kb.search_many(questions, cfg.k) for p in ps
            if p.doc_id == "recycling_environment_en.md"]
    consistent = kb.consistent()
    kb.close()

    # %% 5. 对照：全部重建（不用嵌入缓存，所有块重新编码）
    t = time.perf_counter()
    full_kb = KnowledgeBase.create(work / "kb_full", kb_cfg)
    full = full_kb.update(docs, use_cache=False)
    full_s = time.perf_counter() - t
    same_as_full = snapshot(full_kb, questions, cfg.k) == after_inc
    full_kb.close()

    snippet = new_fact.text[:40].replace("\n", " ")
    rows = [{"方式": "增量更新", "秒": inc_s, "重新编码的块": inc.embedded},
            {"方式": "全部重建", "秒": full_s, "重新编码的块": full.embedded}]
    lab.table(rows, "增量更新 vs 全部重建（同一份变更后的文档）")
    lab.text(f"- 新文档立即可检索：「礼品卡有效期多久？」→ `{new_fact.doc_id}`：{snippet}…\n"
             f"- 修改生效：「无理由退货期限」的首条结果现在写的是 "
             f"{'10 天' if '10 天' in changed.text else '（未找到修改）'}（`{changed.doc_id}`）。\n"
             f"- 被删除的 recycling_environment_en.md 在 {len(questions)} 个问题的结果中出现 "
             f"{len(gone)} 次。\n"
             f"- 文档库、FAISS、BM25 三者的块 id 完全一致：{consistent}；增量更新后的检索结果"
             f"与全部重建{'逐条相同' if same_as_full else '不同！'}。")

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].bar(["incremental", "full rebuild"], [inc_s, full_s], color=["tab:green", "tab:gray"])
    ax[0].set(ylabel="seconds", title="update cost")
    ax[1].bar(["incremental", "full rebuild"], [inc.embedded, full.embedded],
              color=["tab:green", "tab:gray"])
    ax[1].set(ylabel="chunks embedded", title="embedding work")
    lab.figure(fig, "incremental_vs_full.png", "增量更新与全部重建的耗时和编码量")
    lab.text("要点：增量更新的代价只和变化量成正比；块 id 里带内容哈希（`文档#序号:哈希前12位`），"
             "所以"
             "\"哪些向量过期、哪些缺失\"是一次集合差运算。更新中途进程被杀也不怕：文档库的修改在一个"
             "SQLite 事务里，下次运行时向量库和 BM25 会与文档库重新对齐（见 tests/test_rag_kb.py 的"
             "断电演练）。")
    return {"n_docs": len(first.added), "n_chunks": first.chunks_total, "build_s": first.seconds,
            "reload_identical": reload_identical, "incremental_s": inc_s, "full_rebuild_s": full_s,
            "speedup_ratio": full_s / inc_s if inc_s else None,
            "embedded_incremental": inc.embedded, "embedded_full": full.embedded,
            "docs_added": len(inc.added), "docs_updated": len(inc.updated),
            "docs_deleted": len(inc.deleted), "deleted_doc_hits": len(gone),
            "index_consistent": consistent, "incremental_equals_full": same_as_full}


if __name__ == "__main__":
    labs.run(main, Config, full={},
             headline=["speedup_ratio", "embedded_incremental", "embedded_full", "reload_identical"])
