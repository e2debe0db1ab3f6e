# %% [markdown]
# # L6.04 检索-重排-生成架构
# 问题：在云杉智能家居的示例知识库上，把"检索 → 重排 → 带引用生成"串起来，每一步到底带来多少？
# 你将看到：同一批评测问题在 (a) 不检索、(b) 检索、(c) 检索+重排 三种条件下的答案准确率、
# 拒答是否正确、引用是否指向真正含答案的文档；重排前后的 hit@k；每个阶段的耗时与重排的代价。
#
# 默认模型是随包附带的 SmolLM2-135M-Instruct（以英文为主、很弱）。有 GPU / 能联网时运行
# `python rag_architecture_demo.py model=ms:Qwen/Qwen3-0.6B`：同一条代码路径按 id 加载模型
# （离线且本地没有时会给出清楚的错误）。

# %%
import json
import random
import time
from typing import Literal

import matplotlib.pyplot as plt
from tqdm.auto import tqdm

from llmtech import labs, models
from llmtech.rag.generate import Generator, evaluate_answers
from llmtech.rag.metrics import evaluate_run
from llmtech.rag.kb import KnowledgeBase
from llmtech.rag.rerank import make_reranker

KB_DIR = labs.ROOT / "data/support/kb"
QA_FILE = labs.ROOT / "data/support/eval_qa.jsonl"


class Config(labs.LabConfig):
    questions: int = 16            # 评测题数（中英各半，含无答案题）；0 = 全部 128 题
    unanswerable: int = 2          # 其中"知识库里没有答案"的题数（考拒答）
    retrieval: Literal["hybrid", "bm25", "dense"] = "hybrid"
    k: int = 5                     # 第一阶段召回的候选段落数（重排在这 k 个里挑）
    rerank: str = "llm-ql"         # none | llm(是/否打分) | llm-ql(问题似然) | 交叉编码器 id
    compare_rerank: list[str] = ["llm"]     # 只比较检索指标的其他重排器
    rerank_top: int = 3            # 送进提示词的段落数（不重排时取检索的前 rerank_top 个）
    rerank_passage_tokens: int = 192  # LLM 重排时每个段落最多读多少 token（控制代价）
    max_new_tokens: int = 40
    attribute: bool = True         # 模型没写 [n] 时，按字符重叠猜出处（单独计数，不算引用）


def pick_questions(cfg: Config) -> list[dict]:
    """quick 模式：按种子抽题，中英各半，其中 unanswerable 道是知识库里没有答案的题。"""
    qa = [json.loads(line) for line in QA_FILE.read_text(encoding="utf-8").splitlines() if line]
    if not cfg.questions or cfg.questions >= len(qa):
        return qa
    pools: dict[tuple, list] = {}
    for q in qa:
        pools.setdefault((q["lang"], bool(q["answer"])), []).append(q)
    n_no = min(cfg.unanswerable, cfg.questions)
    n_yes = cfg.questions - n_no
    counts = {("zh", False): (n_no + 1) // 2, ("en", False): n_no // 2,
              ("zh", True): (n_yes + 1) // 2, ("en", True): n_yes // 2}
    rng = random.Random(cfg.seed)
    return sorted((q for key, n in counts.items() for q in rng.sample(pools[key], n)),
                  key=lambda q: q["id"])


def retrieval_scores(runs, qa, top) -> dict:
    """hit@1、hit@top（送进提示词的 top 个段落里有含答案的文档）与 MRR，只统计可回答题。"""
    run = {q["id"]: [p.doc_id for p in ps] for q, ps in zip(qa, runs)}
    qrels = {q["id"]: dict.fromkeys(q["doc_ids"], 1) for q in qa}
    r = evaluate_run(run, qrels, ks=(1, top))
    return {"hit@1": r["hit@1"], f"hit@{top}": r[f"hit@{top}"], "mrr": r["mrr@10"]}


def main(cfg: Config, ctx: labs.LabContext) -> dict:
    # %% 1. 模型（先加载：离线又没有这个模型时立即报错）、知识库与评测题
    # 知识库：44 篇中英文档 → 分块 → 向量(FAISS) + BM25，存放在输出目录，再次运行时增量更新
    model, tok = models.load_lm(cfg.model)
    kb = KnowledgeBase.build(ctx.path("kb"), KB_DIR)
    qa = pick_questions(cfg)
    questions, langs = [q["question"] for q in qa], [q["lang"] for q in qa]
    ctx.text(f"知识库：{kb.stats()['documents']} 篇文档、{kb.stats()['chunks']} 个分块；"
             f"评测 {len(qa)} 题（中文 {langs.count('zh')}，无答案 "
             f"{sum(not q['answer'] for q in qa)}）。")

    # %% 2. 检索：每题召回 k 个候选段落
    t0 = time.perf_counter()
    candidates = kb.search_many(questions, cfg.k, cfg.retrieval)
    retrieve_s = (time.perf_counter() - t0) / len(qa)
    base = retrieval_scores(candidates, qa, cfg.rerank_top)
    rows = [{"排序": f"{cfg.retrieval} 检索", **base, "秒/题": retrieve_s}]

    # %% 3. 重排：把 (问题, 段落) 放在一起读，重新打分，取前 rerank_top 个
    # 检索器分别编码问题与段落（快，但看不到两者的关系）；重排器把两者放在一起读（慢，但可能更准——
    # 前提是重排模型比检索器强。135M 小模型是否做得到，下面的数字会回答）。
    # llm：问模型"这段话能回答问题吗？"，分数 = log P(yes) - log P(no)；
    # llm-ql：分数 = 读完段落后"写出这个问题"的平均对数概率（问题似然，不需要模型会听指令）。
    reranked, cost = {}, {}
    for spec in dict.fromkeys([cfg.rerank, *cfg.compare_rerank]):
        llm = spec.split(":")[0] in ("llm", "llm-ql")
        rr = make_reranker(spec, default_lm=cfg.model, loaded={cfg.model: (model, tok)},
                           **({"max_passage_tokens": cfg.rerank_passage_tokens} if llm else {}))
        if rr is None:
            continue
        reranked[spec] = [rr.rerank(q, ps) for q, ps in
                          tqdm(zip(questions, candidates), total=len(qa), desc=f"rerank {spec}")]
        cost[spec] = rr.cost()
        rows.append({"排序": f"+ 重排 {spec}", **retrieval_scores(reranked[spec], qa, cfg.rerank_top),
                     "秒/题": cost[spec]["seconds_per_query"],
                     "token/对": cost[spec]["tokens_per_pair"]})
    ctx.table(rows, f"检索与重排（{len(qa)} 题，候选 k={cfg.k}，"
                    f"hit@{cfg.rerank_top} = 送进提示词的段落里有含答案的文档）")

    # %% 4. 生成：同一个模型、同样的贪心解码，只换上下文
    gen = Generator(cfg.model, max_new_tokens=cfg.max_new_tokens, attribute=cfg.attribute,
                    progress=True, model=model, tokenizer=tok)
    contexts = {"no_rag": None, "rag": [ps[:cfg.rerank_top] for ps in candidates]}
    if cfg.rerank in reranked:
        contexts["rag_rerank"] = [ps[:cfg.rerank_top] for ps in reranked[cfg.rerank]]
    answers = {n: gen.answer_many(questions, c, langs) for n, c in contexts.items()}
    scores = {n: evaluate_answers(a, [q["answer"] for q in qa], [q["doc_ids"] for q in qa])
              for n, a in answers.items()}

    # %% 5. 结果：表格、图、指标
    rerank_cost = cost.get(cfg.rerank, {})
    stage_s = {"no_rag": 0.0, "rag": retrieve_s,
               "rag_rerank": retrieve_s + rerank_cost.get("seconds_per_query", 0.0)}
    labels = {"no_rag": "(a) 不检索", "rag": "(b) 检索", "rag_rerank": f"(c) 检索+重排 {cfg.rerank}"}
    ctx.table([{"条件": labels[n], "准确率(含金标准)": s["acc"], "中文": s["acc_zh"],
                "英文": s["acc_en"], "EM": s["em"], "F1": s["f1"], "ROUGE-L": s["rouge_l"],
                "拒答正确率": s["refusal_acc"], "误拒率": s["false_refusal"],
                "带[n]引用": s["cited_share"], "引用准确率": s["citation_acc"],
                "重叠归因准确率": s["attribution_acc"], "照抄上下文": s["echo_share"],
                "检索+重排 s/题": stage_s[n], "生成 s/题": s["seconds"],
                "提示 token": s["prompt_tokens"]} for n, s in scores.items()],
              f"答案质量与耗时（模型 {cfg.model}，贪心解码，最多 {cfg.max_new_tokens} token）")
    ctx.table([{"题": q["id"], "问题": q["question"][:40], "金标准": q["answer"] or "(无答案)",
                **{labels[n]: answers[n][i].text[:70] for n in answers}}
               for i, q in enumerate(qa[:6])], "答案示例（前 6 题）", show=False)
    plot(ctx, scores, stage_s)

    final = "rag_rerank" if "rag_rerank" in scores else "rag"
    m = {"questions": len(qa), "kb_chunks": kb.stats()["chunks"], "k": cfg.k,
         "context_k": cfg.rerank_top, "retrieval_mode": cfg.retrieval, "reranker": cfg.rerank,
         "acc_rag_rerank": None, "hit_at_k_rerank": None,  # 不重排时为空
         "hit_at_1_retrieval": base["hit@1"], "hit_at_k_retrieval": base[f"hit@{cfg.rerank_top}"],
         "mrr_retrieval": base["mrr"], "retrieve_seconds_per_query": retrieve_s}
    for n, s in scores.items():
        m.update({f"{key}_{n}": s[key] for key in ("acc_zh", "acc_en", "em", "f1", "rouge_l",
                                                     "false_refusal", "echo_share")})
        m.update({f"acc_{n}": s["acc"], f"refusal_accuracy_{n}": s["refusal_acc"],
                  f"generate_seconds_per_query_{n}": s["seconds"]})
    for spec, runs in reranked.items():
        key = "".join(c if c.isalnum() else "_" for c in spec)
        r = retrieval_scores(runs, qa, cfg.rerank_top)
        m.update({f"hit_at_1_rerank_{key}": r["hit@1"],
                  f"hit_at_k_rerank_{key}": r[f"hit@{cfg.rerank_top}"],
                  f"rerank_seconds_per_query_{key}": cost[spec]["seconds_per_query"]})
        if spec == cfg.rerank:
            m["hit_at_1_rerank"], m["hit_at_k_rerank"] = r["hit@1"], r[f"hit@{cfg.rerank_top}"]
    s = scores[final]
    m.update({"citation_accuracy": s["citation_acc"], "cited_share": s["cited_share"],
              "attribution_accuracy": s["attribution_acc"],
              "attributed_share": s["attributed_share"], "echo_share": s["echo_share"],
              "refusal_accuracy": s["refusal_acc"],
              "refused_unanswerable": s["refused_unanswerable"],
              "rerank_seconds_per_query": rerank_cost.get("seconds_per_query"),
              "rerank_pairs": rerank_cost.get("pairs"),
              "rerank_forward_passes": rerank_cost.get("forward_passes"),
              "rerank_tokens": rerank_cost.get("tokens"),
              "rerank_ms_per_pair": rerank_cost.get("ms_per_pair")})

    # %% 6. 讨论：每一句都引用本次运行的数字
    ctx.text(discussion(cfg, m, rows))
    kb.close()
    return m


def plot(ctx: labs.LabContext, scores: dict, stage_s: dict) -> None:
    names = list(scores)
    fig, ax = plt.subplots(1, 2, figsize=(12, 3.8))
    for j, (key, label) in enumerate([("acc", "accuracy (contains gold)"),
                                      ("refusal_acc", "refusal correct"), ("f1", "token F1")]):
        ax[0].bar([i + 0.27 * (j - 1) for i in range(len(names))],
                  [scores[n][key] for n in names], width=0.27, label=label)
    ax[0].set_xticks(range(len(names)), names)
    ax[0].set(ylim=(0, 1), title="answer quality")
    ax[0].legend(fontsize=8)
    ax[1].bar(names, [stage_s[n] for n in names], label="retrieve + rerank")
    ax[1].bar(names, [scores[n]["seconds"] for n in names],
              bottom=[stage_s[n] for n in names], label="generate")
    ax[1].set(ylabel="seconds / question", title="latency per stage")
    ax[1].legend(fontsize=8)
    ctx.figure(fig, "rag_stages.png", "三种条件的答案质量与每阶段耗时")


def discussion(cfg: Config, m: dict, retrieval_rows: list[dict]) -> str:
    f = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    top = f"hit@{cfg.rerank_top}"
    final = "rag_rerank" if m.get("acc_rag_rerank") is not None else "rag"
    base, reranks = retrieval_rows[0], retrieval_rows[1:]
    rr_lines = "；".join(f"{r['排序'].removeprefix('+ 重排 ')}：hit@1 {f(r['hit@1'])}、"
                        f"{top} {f(r[top])}" for r in reranks) or "未启用重排"
    better = [r for r in reranks if r[top] > base[top] or (r[top] == base[top]
                                                          and r["hit@1"] > base["hit@1"])]
    verdict = ("" if not reranks else "有重排器超过了检索排序。" if better else
               "本次没有一个重排器超过检索本身的排序：重排模型必须比第一阶段检索器更懂\"相关\"才有用；"
               "实际系统用专门训练的交叉编码器（如 `rerank=ms:BAAI/bge-reranker-base`，需下载）。")
    cost = (f"重排器 `{cfg.rerank}` 共打分 {m['rerank_pairs']} 对（每题 {cfg.k} 个候选），"
            f"{m['rerank_forward_passes']} 次批量前向、{m['rerank_tokens']} 个 token，"
            f"平均 {f(m['rerank_seconds_per_query'])} 秒/题、{f(m['rerank_ms_per_pair'])} ms/对；"
            f"检索只要 {f(m['retrieve_seconds_per_query'])} 秒/题。" if m["rerank_pairs"]
            else "未启用重排。")
    return f"""## 讨论

- **检索与重排**：{cfg.retrieval} 检索 hit@1 {f(base['hit@1'])}、{top} {f(base[top])}；{rr_lines}。
  {verdict}
- **重排的代价**：{cost}
- **生成**（"含金标准"= 简短的金标准答案出现在模型答案里，只统计可回答题）：不检索
  {f(m['acc_no_rag'])}，检索 {f(m['acc_rag'])}，检索+重排 {f(m['acc_rag_rerank'])}。
  分语言看（检索+重排/检索）：中文题 {f(m.get('acc_zh_' + final))}，英文题 {f(m.get('acc_en_' + final))}。
  默认的 SmolLM2-135M 以英文为主且很小，常常复述问题或照抄上下文（最终条件下照抄
  "[n] (来源)" 的比例 {f(m['echo_share'])}）。照抄的上下文可能恰好含金标准而"蒙对"，所以同时给出
  EM/F1/ROUGE-L，并且照抄带出的 "[n] (来源)" 不算作引用。
- **引用**：最终条件下 {f(m['cited_share'])} 的可回答题带有效的 [n] 引用，引用准确率
  {f(m['citation_accuracy'])}（所引文档确实含答案的比例）；没写 [n] 时按字符重叠猜出处，单独计数、
  不冒充引用：归因比例 {f(m['attributed_share'])}，归因准确率 {f(m['attribution_accuracy'])}。
- **拒答**：最终条件的拒答正确率 {f(m['refusal_accuracy'])}（无答案题应拒答、可回答题不应拒答）。
  `Generator(min_score=...)` 可在最高检索/重排分数过低时直接拒答、不调用模型。
- 本次 {m['questions']} 题：题少时一题就是好几个百分点，看趋势，不看小数点后第二位。
  要得到像样的答案，请在 GPU 上运行 `model=ms:Qwen/Qwen3-0.6B`（或更大的模型）——同一脚本、同一指标。
"""


if __name__ == "__main__":
    labs.run(main, Config, full={"questions": 0, "k": 10, "compare_rerank": ["llm-ql"]},
             headline=["acc_no_rag", "acc_rag", "acc_rag_rerank", "hit_at_k_retrieval",
                       "hit_at_k_rerank", "citation_accuracy", "refusal_accuracy",
                       "rerank_seconds_per_query"])
