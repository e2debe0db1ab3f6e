# %% [markdown]
# # L6.06 检索与生成质量监控
# 问题：知识库上线以后，文档同步出故障、某次更新删掉了一批文件时，怎样在用户投诉之前发现？
# 做法：按固定间隔把评测集（128 个问题）对知识库跑一遍，记录文档级 hit@1 / hit@5 / MRR@10 /
# recall@5、"答案在上下文中"的比例、以及小模型生成答案的准确率；每轮与之前几轮的中位数比较，
# 掉得超过阈值就告警。历史文件只追加、不改写，坏掉的一行会被指出（文件:行号）并跳过。
# 你将看到：一次模拟排程（正常 → 正常 → 同步故障丢了 1/3 文档 → 修复）每轮的指标，
# 告警只在故障那一轮触发，以及各指标的趋势图。

# %%
import shutil
from typing import Literal

from llmtech import labs
from llmtech.rag.generate import Generator
from llmtech.rag.kb import KBConfig, KnowledgeBase
from llmtech.rag.monitor import Monitor, MonitorConfig, load_eval_set, plot_trends


class Config(labs.LabConfig):
    kb_dir: str = "data/support/kb"
    eval_file: str = "data/support/eval_qa.jsonl"
    # 每一轮之前知识库发生了什么：good = 文档齐全（第一轮建库，之后增量同步）；
    # drop_docs = 同步故障，每 drop_every 篇文档丢一篇
    schedule: list[Literal["good", "drop_docs"]] = ["good", "good", "drop_docs", "good"]
    drop_every: int = 3
    interval_s: float = 1.0           # 排程间隔（真实部署里是小时或天，这里缩短成秒）
    monitor: MonitorConfig = MonitorConfig(generate=6)
    max_new_tokens: int = 48          # 生成答案的最大长度
    kb: KBConfig = KBConfig()
    corrupt_history: bool = True      # 演示：在第 2 轮后往历史里写入半行（模拟写到一半被杀掉）


def main(cfg: Config, lab: labs.LabContext) -> dict:
    # %% 1. 准备：评测集、一份"线上"文档目录（拷贝出来，方便模拟故障）、空的历史
    items = load_eval_set(labs.ROOT / cfg.eval_file)
    work = lab.path("monitor")
    shutil.rmtree(work, ignore_errors=True)  # 每次实验从空历史开始
    source, live = labs.ROOT / cfg.kb_dir, work / "docs"
    shutil.copytree(source, live)
    all_docs = sorted(p.name for p in source.iterdir() if p.is_file())
    dropped = all_docs[::cfg.drop_every]
    kb = KnowledgeBase.build(work / "kb", live, cfg.kb)
    gen = Generator(cfg.model, max_new_tokens=cfg.max_new_tokens) if cfg.monitor.generate else None
    monitor = Monitor(kb, items, work / "history.jsonl", work / "alerts.jsonl", cfg.monitor, gen,
                      config={"kb": cfg.kb.model_dump(mode="json"), "generator": cfg.model})
    lab.text(f"评测集 {len(items)} 题（可回答 {sum(it.answerable for it in items)} 题）；"
             f"知识库 {len(all_docs)} 篇；生成准确率只在均匀抽取的 {cfg.monitor.generate} 题上测"
             f"（{cfg.model} 在 2 核 CPU 上每题数秒；同一问题 + 同样的上下文会复用上次的答案）。")

    # %% 2. 排程：每轮之前按 schedule 改动文档目录，再增量同步知识库
    def before_each(i: int) -> str:
        step = cfg.schedule[i]
        if step == "drop_docs":
            for name in dropped:
                (live / name).unlink(missing_ok=True)
        else:
            for name in all_docs:
                if not (live / name).exists():
                    shutil.copy2(source / name, live / name)
        report = kb.update(live)
        if i == 2 and cfg.corrupt_history:  # 第 2 轮之后：一条写了一半的记录（没有换行）
            with open(work / "history.jsonl", "a", encoding="utf-8") as f:
                f.write('{"run": 99, "metrics": {"hit@1": 0.')
        return (f"{step}: {kb.stats()['documents']} docs (+{len(report.added)} "
                f"-{len(report.deleted)})")

    records = monitor.run_every(cfg.interval_s, len(cfg.schedule), before_each)
    kb.close()

    # %% 3. 结果：每轮指标、告警、历史文件里的坏行
    alerts, _ = monitor.alerts()
    history, problems = monitor.history()
    shown = ["hit@1", f"hit@{cfg.monitor.k}", "mrr@10", f"recall@{cfg.monitor.k}",
             "answer_in_context", "answer_accuracy"]
    lab.table([{"run": r["run"], "label": r["label"], "kb_hash": r["kb_hash"],
                **{k: r["metrics"].get(k) for k in shown},
                "generated": r["metrics"].get("answer_generated"),
                "seconds": r["seconds"], "alerts": ", ".join(r["alerts"]) or "-"} for r in records],
              f"每轮指标（{cfg.monitor.mode} 检索，k={cfg.monitor.k}；告警 = 比前 {cfg.monitor.window} 轮的"
              f"{'中位数' if cfg.monitor.baseline == 'median' else '最好值'}低 {cfg.monitor.threshold} 以上）")
    lab.table([{k: a[k] for k in ("run", "metric", "value", "baseline", "drop", "baseline_kind")}
               for a in alerts] or [{"alerts": "(none)"}], "告警记录（alerts.jsonl）")
    if monitor.last_answers:  # 最后一轮（知识库完整）的生成答案：准确率到底在量什么
        lab.table([{"id": it.id, "question": it.question, "gold": it.answer or "(应拒答)",
                    "answer": a.text[:80], "correct": bool(ok)}
                   for it, a, ok in monitor.last_answers], f"生成答案抽查（{cfg.model}）")
    lab.text("历史文件检查：" + ("；".join(p.replace(str(work) + "/", "") for p in problems)
                                if problems else "没有坏行。"))
    lab.figure(plot_trends(records, shown, alerts), "trends.png", "各指标随运行轮次的变化（红点 = 告警）")

    # %% 4. 指标：告警是否恰好落在故障轮
    bad_runs = {i + 1 for i, s in enumerate(cfg.schedule) if s != "good"}
    alert_runs = {a["run"] for a in alerts}
    first = records[0]["metrics"]
    m = {"runs": len(records), "alerts": len(alerts),
         "alert_runs": ",".join(map(str, sorted(alert_runs))),
         "degraded_runs_alerted": bool(bad_runs) and bad_runs <= alert_runs,
         "false_alerts": len(alert_runs - bad_runs), "dropped_docs": len(dropped),
         "history_lines_skipped": len(problems), "history_records": len(history)}
    for r in records:
        for k in shown:
            if k in r["metrics"]:
                m[f"run{r['run']}_{k}"] = r["metrics"][k]
    worst = min(records, key=lambda r: r["metrics"][f"hit@{cfg.monitor.k}"])["metrics"]
    m.update(good_hit5=first[f"hit@{cfg.monitor.k}"], degraded_hit5=worst[f"hit@{cfg.monitor.k}"],
             good_mrr=first["mrr@10"], degraded_mrr=worst["mrr@10"],
             answer_s_per_q=max(r["metrics"].get("answer_s_per_q", 0) for r in records))
    return m


if __name__ == "__main__":
    labs.run(main, Config,
             full={"monitor": {"generate": 24}, "schedule": ["good", "good", "drop_docs", "good", "good"]},
             headline=["good_hit5", "degraded_hit5", "alert_runs", "degraded_runs_alerted",
                       "false_alerts"])
