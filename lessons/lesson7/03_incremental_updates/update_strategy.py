# %% [markdown]
# # L7.03 知识库增量更新、记录管理、审计日志与崩溃演练
# 问题：知识库每天都有文档被修改、新增、删除。每次都全量重建太慢；增量更新又怕"更新到一半进程被杀"
# 把索引弄乱（丢文档、重复向量、向量库与 BM25 不一致）。怎样做到又快又稳，还能事后追责？
# 做法：记录管理器（每个来源一条记录：内容哈希、首次索引与最近更新时间、分块 id）+ 三种模式
# （incremental / scoped / full）+ 单写者文件锁 + 哈希链审计日志 + 在多个位置 SIGKILL 的崩溃演练。
# 你将看到：增量 vs 全量的耗时与嵌入次数、范围更新只动范围内的来源、第二个写者被拒绝、
# 每个杀点重跑后与从头构建完全一致、篡改审计日志的一行会被校验器指出行号。

# %%
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmtech import labs
from llmtech.rag import records as R
from llmtech.rag.audit import verify
from llmtech.rag.embed import Embedder
from llmtech.rag.kb import KBConfig, KnowledgeBase


class Config(labs.LabConfig):
    docs_dir: str = "data/support/kb"          # 44 篇客服知识库
    n_docs: int | None = None                  # 只取前 n 篇（测试用）；None = 全部
    embedder: str = "minilm-l6"
    n_queries: int = 20                        # 用 eval_qa.jsonl 前 n 个问题比较检索结果
    crash_points: list[str] = list(R.DEFAULT_POINTS)
    scope: str = "troubleshooting_"            # scoped 演示只看这个前缀下的来源


def main(cfg: Config, ctx: labs.LabContext) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="l703-"))
    try:
        return run(cfg, ctx, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(cfg: Config, ctx: labs.LabContext, tmp: Path) -> dict:
    # %% 1. 初始构建：把知识库复制到临时目录，用记录管理器建索引
    docs, kb_dir = tmp / "docs", tmp / "kb"
    docs.mkdir()
    for f in sorted((labs.ROOT / cfg.docs_dir).glob("*.md"))[: cfg.n_docs]:
        shutil.copy(f, docs / f.name)
    qa = [json.loads(line) for line in (labs.ROOT / "data/support/eval_qa.jsonl").open(encoding="utf-8")]
    queries = [q["question"] for q in qa[: cfg.n_queries]]
    emb = Embedder(cfg.embedder)            # 不用嵌入缓存：嵌入次数就是真实计算量
    kb = KnowledgeBase.create(kb_dir, KBConfig(embedder=cfg.embedder), emb)
    first = R.RecordManager(kb, actor="lab-initial").index(docs)
    kb.close()
    baseline = tmp / "baseline"             # 变更前的快照：崩溃演练从这里开始
    shutil.copytree(kb_dir, baseline)

    # %% 2. 模拟一天的变更：改 3 篇、加 2 篇、删 1 篇、1 篇只 touch 不改内容
    names = sorted(p.name for p in docs.iterdir())
    for name in names[1:4]:
        p = docs / name
        p.write_text(p.read_text(encoding="utf-8") + "\n\n## 更新\n\n自 12 月起，本条政策的客服热线服务时间延长到 22:00。\n",
                     encoding="utf-8")
    (docs / "holiday_notice_zh.md").write_text("# 春节服务安排\n\n春节期间（除夕至初三）暂停发货，客服热线 10:00–18:00 值班。\n", encoding="utf-8")
    (docs / "holiday_notice_en.md").write_text("# Spring Festival service\n\nNo shipping from New Year's Eve to day 3; the hotline is staffed 10:00–18:00.\n", encoding="utf-8")
    (docs / names[4]).unlink()
    os.utime(docs / names[5])               # 修改时间变了，内容没变：哈希相同 → 不重嵌
    kb = KnowledgeBase.open(kb_dir, emb)
    inc = R.RecordManager(kb, actor="lab-daily").index(docs)
    kb.close()

    # %% 3. 全量重建：在旁边的新目录里建完整索引 → 校验 → 原子切换（symlink + os.replace）
    full = R.rebuild(kb_dir, docs, embedder=emb, actor="lab-nightly")
    ctx.table([{"运行": n, "新增": len(r.added), "更新": len(r.updated), "未变": len(r.unchanged),
                "删除": len(r.deleted), "嵌入块数": r.embedded, "秒": round(r.seconds, 2), "一致": r.consistent}
               for n, r in (("初始构建", first), ("增量（一天的变更）", inc), ("全量重建", full))],
              title="增量 vs 全量：只有改动过的块被重新嵌入")
    kb = KnowledgeBase.open(kb_dir, emb)
    print("当前索引目录：", kb.path)

    # %% 4. 崩溃演练：每个杀点在子进程里 SIGKILL，重跑后与从头构建逐项比较
    drill = R.crash_drill(baseline, docs, tmp / "drill", cfg.crash_points, embedder=emb,
                          embedder_spec=None, queries=queries)
    ctx.table([{k: r[k] for k in ("point", "mode", "killed", "old_index_served", "documents", "vectors",
                                  "bm25", "no_duplicates", "same_search", "audit_ok", "passed")}
               for r in drill], title="崩溃演练：被杀 → 重跑 → 与从头构建一致")

    # %% 5. 范围（scoped）更新：只看 scope 前缀下的来源；范围外被删的文件不受影响
    ts = sorted(p for p in docs.glob(f"{cfg.scope}*"))
    outside = next(p.name for p in sorted(docs.glob("*.md")) if not p.name.startswith(cfg.scope))
    scoped = None
    if ts:
        ts[0].write_text(ts[0].read_text(encoding="utf-8") + "\n\n补充：本节内容于 12 月复核。\n", encoding="utf-8")
        (docs / outside).unlink()
        if len(ts) > 1:
            ts[-1].unlink()                  # 范围内被删的来源会在 scoped 运行里删除
        scoped = R.RecordManager(kb, actor="lab-scoped").index(docs, mode="scoped", scope=cfg.scope)
        outside_kept = outside in kb.doc_hashes()
        later = R.RecordManager(kb, actor="lab-daily").index(docs)   # 之后的普通增量才删除它
        ctx.table([{"运行": f"scoped {cfg.scope}", "更新": len(scoped.updated), "删除": len(scoped.deleted),
                    f"范围外已删的 {outside} 仍在索引": outside_kept},
                   {"运行": "随后 incremental", "更新": len(later.updated), "删除": len(later.deleted)}],
                  title="范围更新")

    # %% 6. 坏输入：已索引的文件变得无法读取 → 跳过并保留索引中的旧副本（不误删）
    (docs / "faq.jsonl").write_text('{"q": "发票抬头能改吗", "a": "开票后 30 天内可改一次"}\n', encoding="utf-8")
    R.RecordManager(kb, actor="lab").index(docs)
    (docs / "faq.jsonl").write_text('{"q": "发票抬头能改吗", "a": \n', encoding="utf-8")  # 写坏了
    bad = R.RecordManager(kb, actor="lab").index(docs)
    kept = "faq.jsonl" in bad.kept and "faq.jsonl" in kb.doc_hashes()
    print("跳过：", [f"{s.source}: {s.reason}" for s in bad.skipped])

    # %% 7. 单写者锁：本进程持有写锁时，另一个进程想写会被拒绝；读者不受影响
    code = ("import sys\nfrom llmtech.rag.kb import KnowledgeBase\nfrom llmtech.rag.records import KBLocked, RecordManager\n"
            f"kb = KnowledgeBase.open({str(kb_dir)!r})\ntry:\n    RecordManager(kb).index({str(docs)!r})\n"
            "except KBLocked as e:\n    print(e)\n    sys.exit(3)\n")
    with kb.writing():
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        reader = KnowledgeBase.open(kb_dir, emb)
        reader_ok = len(reader.search(queries[0], k=3)) == 3
        reader.close()
    refused = p.returncode == 3 and "pid" in p.stdout
    print("第二个写者：", p.stdout.strip() or p.stderr[-500:])

    # %% 8. 审计日志：校验整条哈希链；改一行 → 校验器指出行号
    log = kb.path / "audit.jsonl"
    ok = verify(log)
    tampered = tmp / "tampered.jsonl"
    lines = log.read_text(encoding="utf-8").splitlines(keepends=True)
    target = min(5, len(lines))
    edited = json.loads(lines[target - 1])
    edited["actor"] = "someone-else"          # 冒名：把操作者改成别人（哈希不重算）
    lines[target - 1] = json.dumps(edited, ensure_ascii=False, separators=(",", ":")) + "\n"
    tampered.write_text("".join(lines), encoding="utf-8")
    shutil.copy(log.with_name("audit.jsonl.head"), tmp / "tampered.jsonl.head")
    bad_v = verify(tampered)
    ctx.table([{"日志": "原始", "ok": ok["ok"], "条目": ok["entries"], "坏行": ok["bad_line"], "原因": ok["reason"]},
               {"日志": f"第 {target} 行被改", "ok": bad_v["ok"], "条目": bad_v["entries"],
                "坏行": bad_v["bad_line"], "原因": bad_v["reason"]}], title="审计日志校验")
    consistent = kb.consistent()
    kb.close()
    ctx.text("规则：只有本次运行开始时的文件列表里**没有**的来源才会被删除；列出来却读不了的文件"
             "（中途消失、损坏、为空、过大）只跳过并保留旧副本。写锁是 `<kb>/write.lock` 上的非阻塞 flock。")
    return {"n_docs": len(names), "initial_embedded": first.embedded,
            "incremental_embedded": inc.embedded, "full_embedded": full.embedded,
            "incremental_s": round(inc.seconds, 3), "full_s": round(full.seconds, 3),
            "speedup": round(full.seconds / max(inc.seconds, 1e-9), 2),
            "incremental_added": len(inc.added), "incremental_updated": len(inc.updated),
            "incremental_unchanged": len(inc.unchanged), "incremental_deleted": len(inc.deleted),
            "crash_drill_passed": all(r["passed"] for r in drill), "crash_points": len(drill),
            "scoped_updated": len(scoped.updated) if scoped else None,
            "scoped_deleted": len(scoped.deleted) if scoped else None,
            "scoped_outside_untouched": outside_kept if scoped else None,
            "unreadable_kept": kept, "second_writer_refused": refused, "reader_not_blocked": reader_ok,
            "audit_entries": ok["entries"], "audit_ok": ok["ok"],
            "audit_tamper_detected": bool(not bad_v["ok"] and bad_v["bad_line"] == target),
            "final_consistent": consistent}


if __name__ == "__main__":
    labs.run(main, Config,
             headline=["incremental_embedded", "full_embedded", "incremental_s", "full_s", "speedup",
                       "crash_drill_passed", "crash_points", "second_writer_refused",
                       "audit_tamper_detected"])
