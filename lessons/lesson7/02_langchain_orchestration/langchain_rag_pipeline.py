# %% [markdown]
# # L7.02 LangChain 编排 RAG 流程
# 问题：用 LangChain（langchain-core 的 LCEL）把"检索 → 拼提示词 → 大模型 → 解析引用"编排成一条链，
# 答案会不会变？编排层本身要花多少时间？每一步的延迟和 token 怎样通过回调（callbacks）监控？
# 做法：项目自己的知识库检索器包装成 LangChain Retriever，生成器包装成 LangChain ChatModel，
# 提示词与答案后处理直接复用原生流水线的 build_prompt / finish_answer；同一批问题分别走
# LCEL 链和原生 Generator.answer，逐题比较答案文本与引用。
# 你将看到：答案一致率、引用一致率、各步骤延迟（均值/中位数）、LLM 占总耗时的比例、
# 回调统计的 token/s、链相对原生的额外开销（毫秒）、流式 token 回调的首 token 时间，
# 以及一个 CPU 上的坑：LCEL 的并行分支在线程池里跑模型会让生成变慢多少。

# %%
import json
import random
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnableParallel

from llmtech import labs, models
from llmtech.errors import ConfigError, DataError
from llmtech.rag import lc
from llmtech.rag.generate import Generator, evaluate_answers
from llmtech.rag.kb import KnowledgeBase


class Config(labs.LabConfig):
    kb_docs: str = "data/support/kb"              # 云杉智能家居示例知识库（44 篇中英文档）
    qa_file: str = "data/support/eval_qa.jsonl"   # 带金标准答案的评测题
    questions: int = 8             # 评测题数（中英各半，按种子抽取）
    retrieval: str = "hybrid"      # hybrid | dense | bm25
    k: int = 3                     # 每题送进提示词的段落数
    max_new_tokens: int = 32
    native_batch_size: int = 8     # 另跑一次批量（左填充）原生生成，看批处理是否改变答案；0 = 不跑


FULL = {"questions": 40, "max_new_tokens": 64}


def resolve(p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() else labs.ROOT / path


def pick_questions(cfg: Config) -> list[dict]:
    """读评测题（坏行给出文件与行号），中英各半按种子抽 questions 道。"""
    rows = []
    for n, line in enumerate(resolve(cfg.qa_file).read_text(encoding="utf-8").splitlines(), 1):
        try:
            r = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as e:
            raise DataError(f"{cfg.qa_file}:{n}: not valid JSON ({e.msg})") from None
        if r is not None:
            if not str(r.get("question", "")).strip():
                raise DataError(f"{cfg.qa_file}:{n}: empty or missing 'question'")
            rows.append(r)
    rng = random.Random(cfg.seed)
    zh, en = [r for r in rows if r.get("lang") == "zh"], [r for r in rows if r.get("lang") != "zh"]
    n_zh = min(len(zh), (cfg.questions + 1) // 2)
    picked = rng.sample(zh, n_zh) + rng.sample(en, min(len(en), cfg.questions - n_zh))
    return sorted(picked, key=lambda r: r.get("id", ""))


def main(cfg: Config, ctx: labs.LabContext) -> dict:
    # %% 1. 数据、模型与知识库（知识库建在输出目录里，再次运行时增量更新）
    if cfg.retrieval not in lc.MODES:
        raise ConfigError(f"retrieval: unknown '{cfg.retrieval}' (choose {', '.join(lc.MODES)})")
    if not resolve(cfg.qa_file).is_file():
        raise DataError(f"qa_file: {resolve(cfg.qa_file)} does not exist")
    if not resolve(cfg.kb_docs).is_dir():
        raise DataError(f"kb_docs: knowledge-base folder {resolve(cfg.kb_docs)} does not exist")
    qa = pick_questions(cfg)
    inputs = [{"question": q["question"], "lang": q.get("lang")} for q in qa]
    model, tok = models.load_lm(cfg.model)
    kb = KnowledgeBase.build(ctx.path("kb"), resolve(cfg.kb_docs))
    ctx.text(f"知识库 {kb.stats()['documents']} 篇 / {kb.stats()['chunks']} 块；评测 {len(qa)} 题"
             f"（中文 {sum(q.get('lang') == 'zh' for q in qa)}）；模型 {cfg.model}，贪心解码。")

    # %% 2. 组件：LangChain 适配器 + LCEL 链 + 监控回调
    # batch_size=1：链每次只问一题，原生也逐题生成，两边输入模型的 token 完全相同
    gen = Generator(cfg.model, max_new_tokens=cfg.max_new_tokens, batch_size=1,
                    model=model, tokenizer=tok)
    retriever = lc.KBRetriever(kb=kb, mode=cfg.retrieval, k=cfg.k)
    llm = lc.GeneratorChatModel(generator=gen)
    chain = lc.build_rag_chain(retriever, llm)
    monitor = lc.StepMetrics()
    retriever.invoke(qa[0]["question"])   # 预热：jieba 词典、向量模型、第一次前向
    llm.invoke("Hi")

    # %% 3. 同一批问题：先走 LCEL 链（回调记录每一步），再走原生流水线
    chain_answers, chain_glue, chain_wall = [], [], []
    for x in inputs:
        busy0, t0 = retriever.busy_seconds + llm.busy_seconds, time.perf_counter()
        chain_answers.append(chain.invoke(x, config={"callbacks": [monitor]}))
        wall = time.perf_counter() - t0
        chain_wall.append(wall)
        chain_glue.append(wall - (retriever.busy_seconds + llm.busy_seconds - busy0))
    native_answers, native_glue, native_wall = [], [], []
    for x in inputs:
        t0 = time.perf_counter()
        passages = kb.search(x["question"], cfg.k, cfg.retrieval)
        t_search = time.perf_counter() - t0
        a = gen.answer(x["question"], passages, x["lang"])
        wall = time.perf_counter() - t0
        native_answers.append(a)
        native_wall.append(wall)
        native_glue.append(wall - t_search - a.seconds)

    # %% 4. 一致性：答案文本、引用、检索到的段落逐题比较
    same_text = [a.text == b.text for a, b in zip(chain_answers, native_answers)]
    same_cite = [(a.citations, a.cited_doc_ids) == (b.citations, b.cited_doc_ids)
                 for a, b in zip(chain_answers, native_answers)]
    same_ctx = [[p.id for p in a.passages] == [p.id for p in b.passages]
                for a, b in zip(chain_answers, native_answers)]
    refs, gold_docs = [q.get("answer", "") for q in qa], [q.get("doc_ids", []) for q in qa]
    s_chain = evaluate_answers(chain_answers, refs, gold_docs)
    s_native = evaluate_answers(native_answers, refs, gold_docs)
    ctx.table([{"题": q.get("id", i), "问题": q["question"][:30], "链": a.text[:50],
                "原生": b.text[:50], "相同": a.text == b.text, "引用": a.citations}
               for i, (q, a, b) in enumerate(zip(qa, chain_answers, native_answers))],
              "逐题对比：LCEL 链 vs 原生流水线")

    # %% 5. 回调给出的每步延迟；编排开销 = 总耗时 − 检索与生成本身的耗时（两边同样算）
    s = monitor.summary()
    ctx.table([{"步骤": step, "均值 ms": s[f"{step}_ms_mean"], "中位数 ms": s[f"{step}_ms_p50"]}
               for step in ("retrieve", "prompt", "llm", "parse", "chain")],
              f"每步延迟（回调统计，{s['n_chains']} 次链调用）")
    overhead_ms = (statistics.fmean(chain_glue) - statistics.fmean(native_glue)) * 1e3
    native_tps = (sum(a.completion_tokens for a in native_answers)
                  / max(sum(a.seconds for a in native_answers), 1e-9))

    # %% 6. 流式回调：模型每生成一段文字就触发 on_llm_new_token，界面可以边生成边显示
    # 首 token 时间（从链开始算）= 用户真正开始看到答案的时刻；对比整段答案的耗时
    firsts = [r["first_token_ms"] for r in monitor.per_chain() if r["first_token_ms"] is not None]
    first_ms = statistics.fmean(firsts) if firsts else None

    # %% 7. 对照：原生批量生成（左填充）会不会让答案与逐题生成不同？
    batched_same = None
    if cfg.native_batch_size > 1:
        gen.batch_size = cfg.native_batch_size
        batched = gen.answer_many([x["question"] for x in inputs],
                                  [a.passages for a in native_answers], [x["lang"] for x in inputs])
        gen.batch_size = 1
        batched_same = statistics.fmean(a.text == b.text for a, b in zip(batched, native_answers))

    # %% 8. 为什么链里不用 RunnableParallel 跑模型：LCEL 的并行分支（以及 .batch）在线程池里执行，
    # CPU 上第二个线程跑 torch 会让 OpenMP 线程数超过核数，libgomp 不再自旋等待，生成变慢。
    # 同一个提示词：主线程 → 线程池（RunnableParallel）→ 再回主线程，各生成一次
    probe, msgs, speeds = lc.StepMetrics(), [HumanMessage(chain_answers[0].question)], {}
    for where, runnable in (("main", llm), ("thread", RunnableParallel(reply=llm)), ("main_after", llm)):
        probe.reset()
        runnable.invoke(msgs, config={"callbacks": [probe]})
        speeds[where] = probe.summary()["tokens_per_s"]
    ctx.table([{"生成位置": k, "tokens/s": v} for k, v in speeds.items()],
              "同一提示词在主线程 / 线程池中的生成速度")

    # %% 9. 图与指标
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = ["retrieve", "prompt", "llm", "parse"]
    axes[0].bar(steps + ["glue"], [s[f"{x}_ms_mean"] for x in steps]
                + [s["chain_ms_mean"] - sum(s[f"{x}_ms_mean"] for x in steps)])
    axes[0].set(yscale="log", ylabel="mean ms per question", title="LCEL chain: step latency")
    axes[1].bar(["first token", "full answer"], [first_ms or 0, s["chain_ms_mean"]])
    axes[1].set(ylabel="mean ms from chain start", title="token callbacks: time to first token")
    ctx.figure(fig, "step_latency.png", "各步骤平均延迟（对数轴）与流式首 token 时间")
    plt.close(fig)
    ctx.text(f"说明：链与原生都逐题生成（batch=1）；批量生成的左填充会改变注意力计算的浮点顺序，"
             f"贪心解码可能因此分岔（批量 vs 逐题答案一致率 {batched_same}）。"
             f"线程实验：主线程 {speeds['main']:.1f} → 线程池 {speeds['thread']:.1f} → 回到主线程 "
             f"{speeds['main_after']:.1f} tokens/s。")
    return {"n_questions": len(qa), "retrieval": cfg.retrieval, "k": cfg.k,
            "answers_identical_rate": statistics.fmean(same_text),
            "citations_identical_rate": statistics.fmean(same_cite),
            "passages_identical_rate": statistics.fmean(same_ctx),
            **{f"{x}_ms_{w}": s[f"{x}_ms_{w}"] for x in ("chain", *steps) for w in ("mean", "p50")},
            "llm_share": s["llm_share"], "tokens_per_s": s["tokens_per_s"],
            "native_tokens_per_s": native_tps,
            "prompt_tokens_total": s["input_tokens"], "completion_tokens_total": s["output_tokens"],
            "chain_overhead_ms": overhead_ms,
            "chain_minus_native_ms": (statistics.fmean(chain_wall) - statistics.fmean(native_wall)) * 1e3,
            "first_token_ms": first_ms,
            "tokens_per_s_main_thread": speeds["main"], "tokens_per_s_worker_thread": speeds["thread"],
            "tokens_per_s_main_after_thread": speeds["main_after"],
            "batched_native_identical_rate": batched_same,
            "acc_chain": s_chain["acc"], "acc_native": s_native["acc"],
            "refusal_acc_chain": s_chain["refusal_acc"], "refusal_acc_native": s_native["refusal_acc"]}


if __name__ == "__main__":
    labs.run(main, Config, full=FULL,
             headline=["answers_identical_rate", "citations_identical_rate", "llm_share",
                       "chain_overhead_ms", "tokens_per_s", "first_token_ms",
                       "acc_chain", "acc_native"])
