# %% [markdown]
# # L7.05 混合推理与故障回退
# 问题：对齐模型 + RAG 协同回答时，怎样按"检索有多可信"来分流？向量库宕机、模型超时、
# 检索为空时，服务还能不能保证每个请求都有结局——要么给出答案，要么明确转人工？
# 做法：检索置信度（rag.confidence）在 dev 半数问题上选阈值，在 held-out 半数上比较
# "按置信度分流"与"永远 RAG""永远只用模型"；再对同一服务注入故障（向量库宕机/变慢、
# 模型超时/报错、检索为空、向量库时好时坏、混合故障），统计每个场景的答复率、转人工率、
# 未处理率（必须为 0）、走过的路径与 p50 延迟，并画出熔断器状态时间线。
# 回退链：RAG 回答 → 仅模型回答 → 摘录式固定答复 → 转人工；每一步都可能因异常、超时
# （transformers generate 的 max_time，真实截断）或质量检查（空答案、拒答）失败。

# %%
import random
from pathlib import Path
from typing import Literal

import logging

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from pydantic import Field

from llmtech import labs
from llmtech.data import read_records
from llmtech.errors import DataError
from llmtech.io import atomic_write_json
from llmtech.rag.confidence import ConfidenceScorer, choose_threshold
from llmtech.rag.generate import Generator, evaluate_answers
from llmtech.rag.kb import KnowledgeBase
from llmtech.serve import resilience as rs

Scenario = Literal["store_down", "store_slow", "model_timeout", "model_error",
                   "empty_retrieval", "flapping_store", "mix"]


class Config(labs.LabConfig):
    kb_dir: str = "data/support/kb"
    eval_file: str = "data/support/eval_qa.jsonl"
    n_eval: int = Field(10, ge=0)          # held-out 中用于"无故障分流对比"的题数（0 = 全部）
    n_requests: int = Field(6, ge=1)       # 每个故障场景的请求数
    scenarios: list[Scenario] = list(Scenario.__args__)
    threshold: float | None = Field(None, ge=0.0, le=1.0)  # None = 在 dev 上自动选
    min_answer_recall: float | None = Field(0.9, ge=0.0, le=1.0)  # 选阈值：可回答题至少 90% 走 RAG（None = 平衡准确率）
    max_new_tokens: int = Field(24, ge=1)
    max_passage_chars: int = 300           # 每个段落送进提示词的字符上限（控制 CPU 时间）
    model_delay_s: float = Field(0.5, gt=0)  # "模型超时"故障：每次前向额外等待的秒数
    arrival_interval_s: float = Field(1.0, ge=0)  # 故障场景里请求到达的间隔（让冷却期真实流逝）
    resilience: rs.ResilienceSettings = rs.ResilienceSettings(
        rag_timeout_s=6.0, model_timeout_s=3.0, retrieval_timeout_s=2.0, cooldown_s=2.0)


FULL = {"n_eval": 0, "n_requests": 20, "max_new_tokens": 48,
        "resilience": {"rag_timeout_s": 12.0, "model_timeout_s": 6.0}}


def load_eval(path: Path) -> list[dict]:
    """评测题：每行需有 question / answer（"" = 不可回答）/ doc_ids / lang，缺了就指出是哪一行。"""
    rows = []
    for where, r in read_records(path):
        missing = [key for key in ("question", "answer", "doc_ids", "lang") if key not in r]
        if missing:
            raise DataError(f"{where}: missing key(s) {', '.join(missing)}")
        rows.append(r)
    if not any(r["answer"] for r in rows) or all(r["answer"] for r in rows):
        raise DataError(f"{path}: needs both answerable and unanswerable (answer \"\") questions")
    return rows


def split_dev_held(rows: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """可回答 / 不可回答分别打乱后对半分，保证两半都有两类问题。"""
    rng, dev, held = random.Random(seed), [], []
    for group in ([r for r in rows if r["answer"]], [r for r in rows if not r["answer"]]):
        group = group[:]
        rng.shuffle(group)
        dev += group[: len(group) // 2]
        held += group[len(group) // 2:]
    return dev, held


def main(cfg: Config, ctx: labs.LabContext) -> dict:
    # %% 1. 知识库、评测题与模型（model= 可换成前面实验训练的 SFT/DPO 对齐模型目录）
    kb = KnowledgeBase.build(ctx.path("kb"), labs.ROOT / cfg.kb_dir)
    qa = load_eval(labs.ROOT / cfg.eval_file)
    dev, held = split_dev_held(qa, cfg.seed)
    gen = Generator(cfg.model, max_new_tokens=cfg.max_new_tokens, batch_size=1,
                    max_passage_chars=cfg.max_passage_chars)
    ctx.text(f"模型：`{cfg.model}`（默认为内置 SmolLM2-135M-Instruct；传 model=<目录> 换成对齐后的模型）。"
             f"知识库 {kb.stats()['documents']} 篇文档；评测题 dev {len(dev)} / held-out {len(held)}。")

    # %% 2. 在 dev 上选置信度阈值（平衡准确率：可回答题走 RAG、不可回答题转人工）
    k, scorer = cfg.resilience.k, ConfidenceScorer(kb)

    def confidences(rows):
        ps = kb.search_many([r["question"] for r in rows], k)
        return ps, [c.value for c in scorer.score_many([r["question"] for r in rows], ps)]

    _, dev_conf = confidences(dev)
    cut = choose_threshold(dev_conf, [bool(r["answer"]) for r in dev], cfg.min_answer_recall)
    threshold = cut["threshold"] if cfg.threshold is None else cfg.threshold
    held_ps, held_conf = confidences(held)
    pos = [bool(r["answer"]) for r in held]
    ans_rec = sum(c >= threshold for c, p in zip(held_conf, pos) if p) / max(1, sum(pos))
    ref_rec = sum(c < threshold for c, p in zip(held_conf, pos) if not p) / max(1, len(pos) - sum(pos))
    ctx.table([{"数据": f"dev（选阈值，规则 {cut['rule']}）", "阈值": threshold,
                "平衡准确率": cut["balanced_accuracy"], "可回答→RAG": cut["answer_recall"],
                "不可回答→转人工": cut["refuse_recall"]},
               {"数据": "held-out", "阈值": threshold, "平衡准确率": (ans_rec + ref_rec) / 2,
                "可回答→RAG": ans_rec, "不可回答→转人工": ref_rec}], "按检索置信度分流")

    # %% 3. 无故障：分流 vs 永远 RAG vs 永远只用模型（held-out 子集，含不可回答题）
    n_no = max(1, round(cfg.n_eval * 0.25)) if cfg.n_eval else len(held)
    sub = ([r for r in held if not r["answer"]][:n_no] + [r for r in held if r["answer"]]
           )[: cfg.n_eval or len(held)]
    qs, langs = [r["question"] for r in sub], [r["lang"] for r in sub]
    refs, docs = [r["answer"] for r in sub], [r["doc_ids"] for r in sub]
    settings = cfg.resilience.model_copy(update={"threshold": threshold})
    log_file = open(ctx.path("requests.jsonl"), "w", encoding="utf-8")
    logging.getLogger(rs.__name__ + ".requests").setLevel(logging.WARNING)  # 每请求一行 JSON 写到文件
    svc = rs.ResilientQA(kb, gen, scorer, settings, log_file=log_file)
    svc.warmup(qs[0])
    systems = {"永远 RAG": gen.answer_many(qs, kb.search_many(qs, k), langs),
               "永远只用模型": gen.answer_many(qs, None, langs)}
    routed = [svc.ask(q, f"route-{i:03d}", lang) for i, (q, lang) in enumerate(zip(qs, langs))]
    systems["按置信度分流 + 回退链"] = [r.answer for r in routed]
    scores = {name: evaluate_answers(a, refs, docs) for name, a in systems.items()}
    ctx.table([{"系统": name, "答案准确率": s["acc"], "拒答正确率": s["refusal_acc"],
                "误拒率": s["false_refusal"], "不可回答题拒答": s["refused_unanswerable"]}
               for name, s in scores.items()], f"无故障对比（{len(sub)} 题，其中不可回答 "
                                               f"{sum(not r for r in refs)} 题；转人工计为拒答）")
    route_paths = {p: sum(r.path == p for r in routed) for p in rs.PATHS}

    # %% 4. 故障注入：每个场景 n_requests 个请求，熔断器每个场景重新开始
    injector = rs.FaultInjector(svc, model_delay_s=cfg.model_delay_s)
    pool = held[:]
    random.Random(cfg.seed + 1).shuffle(pool)
    results = []
    for i, name in enumerate(dict.fromkeys(cfg.scenarios)):
        n = cfg.n_requests * (2 if name == "flapping_store" else 1)  # 时好时坏需要更长的时间窗
        questions = [pool[(i * cfg.n_requests + j) % len(pool)] for j in range(n)]
        results.append(rs.run_scenario(svc, injector, name, questions, seed=cfg.seed,
                                       interval_s=cfg.arrival_interval_s))
        s = results[-1]["summary"]
        print(f"  {name}: 答复 {s['answered']:.0%} 转人工 {s['handoff']:.0%} 未处理 {s['unhandled']}")
    injector.remove(), svc.close(), log_file.close()
    rows = [{"场景": r["scenario"], "请求": r["summary"]["n"], "答复%": 100 * r["summary"]["answered"],
             "转人工%": 100 * r["summary"]["handoff"],
             "未处理%": 100 * r["summary"]["unhandled"] / r["summary"]["n"],
             "路径": ", ".join(f"{p}×{n}" for p, n in r["summary"]["paths"].items() if n),
             "p50 延迟 s": r["summary"]["p50_s"],
             "熔断": "/".join(b for b, o in (("store", r["store_breaker_opened"]),
                                             ("model", r["model_breaker_opened"])) if o) or "-"}
            for r in results]
    ctx.table(rows, "故障注入：每个请求都必须以答案或转人工结束")

    # %% 5. 熔断器状态时间线：closed=0、half_open=1、open=2
    level = {"closed": 0, "half_open": 1, "open": 2}
    fig, axes = plt.subplots(len(results), 1, figsize=(8, 1.6 * len(results) + 0.5), squeeze=False)
    for ax, r in zip(axes[:, 0], results):
        end = r["seconds"]
        for name, hist in r["history"].items():
            ts = [t for t, _ in hist] + [max(end, hist[-1][0])]
            ys = [level[s] for _, s in hist] + [level[hist[-1][1]]]
            ax.step(ts, ys, where="post", label=name)
        ax.set(yticks=[0, 1, 2], yticklabels=["closed", "half", "open"], ylim=(-0.3, 2.3))
        ax.set_title(r["scenario"], fontsize=9)
    axes[0, 0].legend(fontsize=7), axes[-1, 0].set_xlabel("seconds since scenario start")
    fig.tight_layout(), ctx.figure(fig, "breaker_timeline.png", "熔断器状态时间线（每个故障场景）")
    plt.close(fig)

    # %% 6. 指标（全部实测：未处理数来自 run_scenario 的计数，不是代码里的断言）
    n_fault = sum(r["summary"]["n"] for r in results)
    unhandled = sum(r["summary"]["unhandled"] for r in results)
    m = {"model_used": cfg.model, "threshold": round(threshold, 4),
         "dev_balanced_accuracy": round(cut["balanced_accuracy"], 4),
         "held_route_balanced_accuracy": round((ans_rec + ref_rec) / 2, 4),
         "n_eval": len(sub), "fault_requests": n_fault, "unhandled": unhandled,
         "fault_handled_rate": round((n_fault - unhandled) / n_fault, 4) if n_fault else None,
         "breaker_opened": any(r["store_breaker_opened"] or r["model_breaker_opened"] for r in results),
         **{f"routed_path_{p}": n for p, n in route_paths.items()}}
    for key, name in (("routed", "按置信度分流 + 回退链"), ("rag", "永远 RAG"), ("model_only", "永远只用模型")):
        m.update({f"{key}_acc": round(scores[name]["acc"], 4),
                  f"{key}_refusal_acc": round(scores[name]["refusal_acc"], 4)})
    for r in results:
        s, n = r["summary"], r["scenario"]
        m.update({f"{n}_answered": round(s["answered"], 4), f"{n}_handoff": round(s["handoff"], 4),
                  f"{n}_unhandled": s["unhandled"], f"{n}_p50_s": round(s["p50_s"], 3)})
        if n == "flapping_store":
            m["flapping_breaker_states"] = "→".join(st for _, st in r["history"]["vector_store"])
    atomic_write_json(ctx.path("scenarios.json"),
                      [{**{k: v for k, v in r.items() if k != "responses"},
                        "responses": [x.as_dict() for x in r["responses"]]} for r in results])
    ctx.text("说明：转人工（handoff）计为拒答；'canned' 是直接摘录最相关段落（不经模型），只在检索置信度"
             "达到阈值时使用。低置信度问题默认直接转人工：知识库属于虚构公司，模型闭卷回答只是猜测"
             "（resilience.below=model_only 可改为先让模型闭卷回答）。每个请求的结构化日志见 requests.jsonl。")
    return m


if __name__ == "__main__":
    labs.run(main, Config, full=FULL,
             headline=["fault_requests", "fault_handled_rate", "unhandled", "breaker_opened",
                       "threshold", "routed_acc", "routed_refusal_acc", "rag_acc",
                       "rag_refusal_acc", "model_only_acc", "model_only_refusal_acc"])
