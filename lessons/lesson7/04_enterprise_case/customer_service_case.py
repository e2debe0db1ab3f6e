# %% [markdown]
# # L7.04 企业客服知识库案例
# 问题：把"云杉智能家居"的客服知识库做成一个能多轮对话的客服助手——文档入库、追问改写、意图路由、
# 低置信度或用户要求时转人工、带引用作答——每一环各贡献多少？哪些数字与语言模型无关？
# 你将看到：改写前后检索 hit@3、意图分类在留出集上的准确率、转人工的精确率/召回率/F1、
# 答案准确率与引用准确率，以及一段完整的对话记录。
# 注意：内置 SmolLM2-135M 很弱，答案准确率很低（前面的实验约 0–0.1）；检索、改写、意图、
# 转人工策略这些数字不依赖语言模型，是本实验真正要看的部分。

# %%
import random
from collections import Counter
from typing import Literal

from llmtech import labs, models
from llmtech.data import read_records
from llmtech.errors import DataError
from llmtech.rag import dialogue as dlg
from llmtech.rag.confidence import ConfidenceScorer, choose_threshold
from llmtech.rag.generate import Generator
from llmtech.rag.kb import KnowledgeBase

SUPPORT = labs.ROOT / "data/support"


class Config(labs.LabConfig):
    dialogues: str = str(SUPPORT / "dialogues.jsonl")
    kb_dir: str = str(SUPPORT / "kb")
    sft_train: str = str(SUPPORT / "sft_train.jsonl")   # 意图分类的训练集（topic 标签）
    sft_test: str = str(SUPPORT / "sft_test.jsonl")     # 意图分类的留出集
    dev_qa: str = str(SUPPORT / "eval_qa.jsonl")        # 选转人工阈值、选路由方式用的 dev 集
    n_dialogues: int | None = 14   # 抽多少段对话（None = 全部），按"是否应转人工 × 语言"分层抽
    min_answer_recall: float | None = 0.9   # 选阈值的服务规则：可回答题至少 90% 不转人工（None = 平衡准确率）
    k: int = 10                    # 检索候选段落数
    context_k: int = 3             # 送进提示词的段落数
    hit_k: int = 3
    rewrite: Literal["rules", "none", "concat", "llm"] = "rules"
    compare_llm_rewrite: bool = True   # 也测一遍让 135M 模型改写，和规则比
    route_mode: Literal["auto", "none", "boost", "filter"] = "auto"  # auto：在 dev 上选
    max_new_tokens: int = 40
    answer_all_turns: bool = False  # False：只为每段对话的最后一轮生成答案（前几轮只检索）
    transcript: str = "d08"         # 报告里完整展示哪段对话（每一轮都生成）


FULL = {"n_dialogues": None, "max_new_tokens": 64, "answer_all_turns": True}


def pick(dialogues: list, n: int | None, seed: int) -> list:
    if not n or n >= len(dialogues):
        return dialogues
    groups: dict = {}
    for d in dialogues:
        groups.setdefault((d.escalate, d.lang), []).append(d)
    rng, share = random.Random(seed), n / len(dialogues)
    out = [d for g in groups.values() for d in rng.sample(g, max(1, round(len(g) * share)))]
    return sorted(out, key=lambda d: d.id)


def main(cfg: Config, ctx: labs.LabContext) -> dict:
    # %% 1. 对话数据（先读：坏行立即报错，指出 文件:行 + 键名）与文档流水线
    all_dialogues = dlg.load_dialogues(cfg.dialogues)  # 坏行 → DataError（文件:行 + 键名）
    ds = pick(all_dialogues, cfg.n_dialogues, cfg.seed)
    if cfg.transcript and cfg.transcript not in {d.id for d in all_dialogues}:
        raise DataError(f"transcript: no dialogue '{cfg.transcript}' in {cfg.dialogues}")
    if cfg.transcript and cfg.transcript not in {d.id for d in ds}:
        ds = sorted(ds + [d for d in all_dialogues if d.id == cfg.transcript], key=lambda d: d.id)
    print(f"对话 {len(ds)} 段（共 {len(all_dialogues)}），应转人工 {sum(d.escalate for d in ds)} 段")
    # 44 篇中英文档 → 分块 → 向量(FAISS) + BM25；再次运行时增量更新
    model, tok = models.load_lm(cfg.model)
    kb = KnowledgeBase.build(ctx.path("kb"), cfg.kb_dir)
    rep, st = kb.last_report, kb.stats()
    ctx.table([{"文档": st["documents"], "分块": st["chunks"], "新增": len(rep.added),
                "未变": len(rep.unchanged), "跳过": len(rep.skipped), "坏分块": len(rep.bad_chunks),
                "新嵌入": rep.embedded, "缓存命中": rep.embed_cached, "秒": round(rep.seconds, 1)}],
              "文档流水线")

    # %% 2. 意图路由：规则抓"转人工"，TF-IDF(字符 n-gram) + 逻辑回归分 12 个主题 + decline
    router = dlg.IntentRouter(seed=cfg.seed).fit(*dlg.IntentRouter.examples(cfg.sft_train))
    test_x, test_y = dlg.IntentRouter.examples(cfg.sft_test)
    pred = router.predict_topics(test_x)
    intent_test_acc = sum(p == y for p, y in zip(pred, test_y)) / len(test_y)
    majority = Counter(dlg.IntentRouter.examples(cfg.sft_train)[1]).most_common(1)[0][0]
    majority_acc = sum(y == majority for y in test_y) / len(test_y)
    human_flags = [dlg.is_human_request(x) for x in test_x]
    ctx.table([{"模型": "多数类基线", "sft_test 准确率": majority_acc},
               {"模型": "TF-IDF + 逻辑回归", "sft_test 准确率": intent_test_acc}],
              f"意图分类（留出 {len(test_y)} 条；'转人工'规则在其中命中 {sum(human_flags)} 条，"
              f"其中 decline 类 {sum(f and y == 'decline' for f, y in zip(human_flags, test_y))} 条）")

    # %% 3. 在 dev 集（eval_qa：可回答 vs 无答案）上选转人工的置信度阈值，并选路由方式
    qa = [r for _, r in read_records(cfg.dev_qa)]   # 坏行报 文件:行号，不抛 traceback
    qs = [q["question"] for q in qa]
    scorer = ConfidenceScorer(kb)
    dev_hits = kb.search_many(qs, cfg.k)
    cut = choose_threshold([c.value for c in scorer.score_many(qs, dev_hits)],
                           [bool(q["answer"]) for q in qa], cfg.min_answer_recall)
    dev_routes = router.route_many(qs)
    dev_route = {m: dlg.retrieval_hit([dlg.route_passages(ps, r.intent, m) for ps, r
                                       in zip(dev_hits, dev_routes)], [q["doc_ids"] for q in qa],
                                      cfg.hit_k)[f"hit@{cfg.hit_k}"] for m in ("none", "boost", "filter")}
    route_mode = max(dev_route, key=dev_route.get) if cfg.route_mode == "auto" else cfg.route_mode
    ctx.text(f"dev（eval_qa {len(qa)} 题）上按规则 {cut['rule']} 选出的置信度阈值 {cut['threshold']:.3f}"
             f"（可回答题不转人工 {cut['answer_recall']:.3f}，无答案题转人工 {cut['refuse_recall']:.3f}，"
             f"平衡准确率 {cut['balanced_accuracy']:.3f}）；路由方式 dev hit@{cfg.hit_k}："
             + "，".join(f"{m} {v:.3f}" for m, v in dev_route.items()) + f" → 用 {route_mode}。")

    # %% 4. 改写：最后一轮直接检索 / 拼接全部历史 / 规则改写 / 模型改写 / 人工改写（上限）
    gen = Generator(cfg.model, max_new_tokens=cfg.max_new_tokens, attribute=True,
                    model=model, tokenizer=tok)
    rw_gen = Generator(cfg.model, max_new_tokens=40, model=model, tokenizer=tok)
    policy = dlg.EscalationPolicy(threshold=cut["threshold"])
    bot = dlg.Assistant(kb, router, scorer, policy, gen, rewrite=cfg.rewrite,
                        route_mode=route_mode, k=cfg.k, context_k=cfg.context_k,
                        rewrite_generator=rw_gen)
    gold_docs = [d.doc_ids for d in ds]
    ways = ["none", "concat", "rules"] + (["llm"] if cfg.compare_llm_rewrite else [])
    # 历史：规则改写逐轮进行（前几轮用它自己的改写结果）；其他方式只看用户原话
    rules = dlg.RuleRewriter()
    convs = [dlg.Conversation(d.id, [dlg.Reply(t, q, "", "", d.lang) for t, q in
                                     zip(d.turns[:-1], rules.rewrite_dialogue(d.turns[:-1], d.lang))])
             for d in ds]
    rewrites = {w: bot.rewrite_many(convs, [d.turns[-1] for d in ds], [d.lang for d in ds], w)
                for w in ways}
    rewrites["gold"] = [d.rewrite for d in ds]
    hits, esc = {}, {}
    for w, q in rewrites.items():  # 同一个改写既决定检索，也决定置信度 → 转人工策略（都不用语言模型）
        found = kb.search_many(q, cfg.k)
        hits[w] = dlg.retrieval_hit(found, gold_docs, cfg.hit_k)
        decide = [policy.decide(r.intent, c.value) is not None for r, c in
                  zip(router.route_many(q), scorer.score_many(q, found))]
        esc[w] = dlg.prf(decide, [d.escalate for d in ds])
    names = {"none": "不改写（只用最后一轮）", "concat": "拼接全部历史", "rules": "规则改写",
             "llm": f"模型改写（{cfg.model}）", "gold": "人工改写（上限）"}
    ctx.table([{"改写": names[w], f"hit@{cfg.hit_k}": h[f"hit@{cfg.hit_k}"], "hit@1": h["hit@1"],
                "MRR@10": h["mrr@10"], "题数": h["n"], "转人工策略 P": esc[w]["precision"],
                "R": esc[w]["recall"], "F1": esc[w]["f1"]} for w, h in hits.items()],
              f"改写对检索与转人工策略的影响（{len(ds)} 段对话的最后一轮；hit 只算可回答的）")

    # %% 5. 逐轮跑完每段对话：改写 → 路由 → 检索 → 转人工或带引用作答
    replies = {}
    for t in range(max(len(d.turns) for d in ds)):
        live = [d for d in ds if t < len(d.turns)]
        gen_flags = [cfg.answer_all_turns or t == len(d.turns) - 1 or d.id == cfg.transcript for d in live]
        for d, r in zip(live, bot.respond_many([d.id for d in live], [d.turns[t] for d in live], gen_flags)):
            replies[d.id] = r  # 最后留下的就是最后一轮
    last = [replies[d.id] for d in ds]
    m = dlg.evaluate_dialogues(ds, last)
    routed_hit = {mode: dlg.retrieval_hit([dlg.route_passages(r.retrieved, r.intent, mode) for r in last],
                                          gold_docs, cfg.hit_k)[f"hit@{cfg.hit_k}"] for mode in ("none", "boost", "filter")}

    # %% 6. 结果
    ctx.table([{"指标": "转人工 精确率 / 召回率 / F1（最终）",
                "值": f"{m['escalation_precision']:.3f} / {m['escalation_recall']:.3f} / {m['escalation_f1']:.3f}"},
               {"指标": "转人工 精确率 / 召回率 / F1（只看策略，不含模型拒答）",
                "值": f"{m['policy_escalation_precision']:.3f} / {m['policy_escalation_recall']:.3f} / {m['policy_escalation_f1']:.3f}"},
               {"指标": "意图准确率（对话最后一轮）", "值": f"{m['intent_acc']:.3f}"},
               {"指标": f"路由对检索 hit@{cfg.hit_k}（none / boost / filter）",
                "值": " / ".join(f"{routed_hit[k]:.3f}" for k in ("none", "boost", "filter"))},
               {"指标": f"答案准确率（未转人工的可回答题 {m['n_answered']}/{m['n_answerable']}）",
                "值": m["answer_acc"]},
               {"指标": "引用准确率（引用的文档含答案）", "值": m["citation_acc"]},
               {"指标": "带 [n] 引用的比例", "值": m["cited_share"]}],
              f"对话评测（{len(ds)} 段，模型 {cfg.model}）")
    # 对照：事后在这些对话上挑的"最佳"阈值（用了测试标签，只说明 dev→对话 的阈值迁移差距，不作成绩）
    both = 0 < sum(d.escalate for d in ds) < len(ds)
    hindsight = choose_threshold([r.confidence for r in last], [not d.escalate for d in ds]) if both else None
    if hindsight:
        ctx.text(f"阈值迁移：dev 上选的 {cut['threshold']:.3f}；若事后在这些对话上挑（偷看了标签）会是 "
                 f"{hindsight['threshold']:.3f}（平衡准确率 {hindsight['balanced_accuracy']:.3f}）。"
                 "口语化的追问比 eval_qa 的书面问题置信度低，dev 阈值因此偏严、误转人工偏多。")
    reasons = Counter(r.reason or "answered" for r in last)
    ctx.table([{"对话": d.id, "最后一轮": d.turns[-1][:30], "改写": r.query[:40], "意图": r.intent,
                "金标意图": d.intent, "置信度": round(r.confidence, 3), "转人工": r.reason or "",
                "应转": d.escalate, "回复": r.text[:50]} for d, r in zip(ds, last)], "逐段结果", show=False)
    conv = bot.sessions.get(cfg.transcript)
    if conv:
        lines = [f"### 完整对话示例 {cfg.transcript}\n"]
        for r in conv.replies:
            lines.append(f"- **用户**：{r.user}\n  - 改写：{r.query}；意图：{r.intent}（{r.intent_source}）；"
                         f"置信度 {r.confidence:.3f}；引用文档：{', '.join(r.cited_doc_ids) or '无'}\n"
                         f"  - **助手**：{r.text.strip()}")
        ctx.text("\n".join(lines))
        print("\n".join(lines))
    ctx.text("说明：检索、改写、意图、转人工策略（policy_*）的数字不依赖语言模型；答案准确率、引用准确率"
             f"和最终转人工（含模型拒答）依赖 {cfg.model}。135M 小模型的答案准确率很低，"
             "换更强的模型（model=...）时同一条代码路径即可重测。")
    hk = cfg.hit_k
    out = {"kb_documents": st["documents"], "kb_chunks": st["chunks"], "kb_skipped": len(rep.skipped),
           "n_dialogues": len(ds), "hit_k": hk, "n_gold_escalate": m["n_gold_escalate"],
           "intent_test_acc": intent_test_acc, "intent_majority_acc": majority_acc,
           "intent_test_n": len(test_y), "intent_dialogue_acc": m["intent_acc"],
           "threshold": cut["threshold"], "threshold_rule": cut["rule"],
           "threshold_dev_balanced_acc": cut["balanced_accuracy"],
           "threshold_hindsight": hindsight["threshold"] if hindsight else None,
           "route_mode": route_mode, "rewrite": cfg.rewrite,
           **{f"route_{k}_hit": v for k, v in routed_hit.items()},
           **{f"dev_route_{k}_hit": v for k, v in dev_route.items()},
           **{f"rewrite_{w}_hit": h[f"hit@{hk}"] for w, h in hits.items()},
           "rewrite_hit_n": hits["none"]["n"],
           **{f"rewrite_{w}_policy_f1": e["f1"] for w, e in esc.items()},
           "rewrite_rules_beats_none": hits["rules"][f"hit@{hk}"] > hits["none"][f"hit@{hk}"],
           **{f"escalation_{k}": m[f"escalation_{k}"] for k in ("precision", "recall", "f1")},
           **{f"policy_escalation_{k}": m[f"policy_escalation_{k}"] for k in ("precision", "recall", "f1")},
           **{f"escalated_{k}": v for k, v in reasons.items()},
           **{k: m[k] for k in ("answer_acc", "answer_acc_all", "citation_acc", "cited_share",
                                "attribution_acc", "n_answerable", "n_answered")}}
    return out


if __name__ == "__main__":
    labs.run(main, Config, full=FULL,
             headline=["rewrite_none_hit", "rewrite_rules_hit", "intent_test_acc",
                       "policy_escalation_f1", "escalation_f1", "answer_acc", "citation_acc"])
