# %% [markdown]
# # L5.05 客服场景：提示策略与反馈闭环
# 问题 1：同一个小模型做"云杉智能家居"的客服，只换提示词能差多少？比较四种策略：
#   plain（只有问题）、system（加客服系统提示）、few_shot（系统提示 + 2 组示范问答，取自训练集）、
#   rag（系统提示 + 从知识库检索到的资料，提示由 rag.generate.build_prompt 生成）。
# 问题 2：把最好的策略"上线"，收集用户的 👍/👎 与纠正，变成偏好对做一轮 DPO，效果会怎样？
#   反馈题（训练用过）和留出题（从没用来收集反馈）分开报告 —— 后者才说明是否真的学到了东西。
# 你将看到：每种策略的答案准确率（答案包含标准短答案）、拒答率、平均长度（分中英文）；
# 反馈校验（保留多少、按原因拒收多少）；DPO 前后两个划分上的准确率对比。
# 注意：这里没有真实用户，反馈由标准答案**模拟**生成（规则见 llmtech.data.feedback.simulate_feedback）。

# %%
import json
import random
import shutil
import time
from typing import Literal

import matplotlib.pyplot as plt

from llmtech import labs, models
from llmtech.data import read_records
from llmtech.data import feedback as fb
from llmtech.data.preference import load_pairs
from llmtech.errors import ConfigError
from llmtech.io import atomic_write_jsonl, atomic_write_text
from llmtech.rag.generate import Generator, build_prompt, evaluate_answers, is_refusal
from llmtech.rag.kb import KBConfig, KnowledgeBase
from llmtech.rag.metrics import answer_scores
from llmtech.train.dpo import DPOSettings, run_dpo
from llmtech.train.lora import LoraSettings
from llmtech.train.sft import plain_forward

Strategy = Literal["plain", "system", "few_shot", "rag"]
STRATEGIES = ["plain", "system", "few_shot", "rag"]
SYSTEM = {"zh": "你是云杉智能家居的客服助手。请用中文简短、准确、礼貌地回答顾客关于云杉产品、订单、"
                "配送、退换货和保修的问题；不确定时请如实说明，并建议联系人工客服。",
          "en": "You are the customer-service assistant of Yunshan Smart Home (云杉智能家居). Answer "
                "customers' questions about Yunshan products, orders, shipping, returns and warranty "
                "briefly, accurately and politely; if you are not sure, say so and suggest human support."}


class Config(labs.LabConfig):
    eval_file: str = "data/support/eval_qa.jsonl"      # 128 道留出的客服问题（含标准短答案）
    sft_file: str = "data/support/sft_train.jsonl"     # few_shot 的示范问答只从这里取
    kb_dir: str = "data/support/kb"
    bad_feedback: str = "data/feedback/bad_feedback.jsonl"  # 混进反馈日志的坏记录（演示校验）
    questions: int = 12        # 反馈划分：可回答的问题，中英各半；策略比较也在这里做
    heldout: int = 8           # 留出划分：只在 DPO 前后各测一次，从不用于选策略或收集反馈
    strategies: list[Strategy] = list(STRATEGIES)
    deploy: Strategy | None = None  # 上线哪个策略；None = 反馈划分上准确率最高的
    few_shot_k: int = 2
    top_k: int = 2
    max_passage_chars: int = 200   # 中文在 SmolLM2 的词表里约 2 token/字：资料过长会让提示上千 token
    max_new_tokens: int = 48
    batch_size: int = 8
    dpo_steps: int = 4
    dpo_batch_size: int = 2
    dpo_lr: float = 5e-4
    dpo_beta: float = 0.1
    sft_weight: float = 1.0    # DPO 损失 + 这个权重 × 纠正答案上的 SFT 损失（只做 DPO 时贪心输出几乎不变）
    lora_r: int = 8
    max_length: int | None = None  # DPO 序列长度；None = 最长的 提示+回答（不截断：截掉回答就学不到东西）


def pick_splits(cfg: Config) -> tuple[list[dict], list[dict]]:
    """可回答的问题按语言打乱，前一段做反馈划分，后一段做留出划分（两者不重叠）。"""
    rows = [r for _, r in read_records(labs.ROOT / cfg.eval_file) if r.get("answer")]
    rng = random.Random(cfg.seed)
    feedback, heldout = [], []
    for lang, nf, nh in (("zh", (cfg.questions + 1) // 2, (cfg.heldout + 1) // 2),
                         ("en", cfg.questions // 2, cfg.heldout // 2)):
        pool = [r for r in rows if r["lang"] == lang]
        if nf + nh > len(pool):
            raise ConfigError(f"questions + heldout need {nf + nh} {lang} questions; "
                              f"{cfg.eval_file} has {len(pool)} answerable ones")
        rng.shuffle(pool)
        feedback += pool[:nf]
        heldout += pool[nf:nf + nh]
    return feedback, heldout


def main(cfg: Config, lab: labs.LabContext) -> dict:
    if cfg.deploy and cfg.deploy not in cfg.strategies:
        raise ConfigError(f"deploy={cfg.deploy} is not one of strategies={cfg.strategies}")
    # %% 1. 数据：两个互不重叠的问题划分；few_shot 示范取自 SFT 训练集（与评测集无重复问题）
    fb_qs, held_qs = pick_splits(cfg)
    eval_questions = {r["question"] for _, r in read_records(labs.ROOT / cfg.eval_file)}
    shots = {lang: [r for _, r in read_records(labs.ROOT / cfg.sft_file)
                    if r.get("lang") == lang and not r.get("input")
                    and r["instruction"] not in eval_questions][:cfg.few_shot_k] for lang in ("zh", "en")}
    print(f"反馈划分 {len(fb_qs)} 题，留出划分 {len(held_qs)} 题；示例：{fb_qs[0]['question']} → {fb_qs[0]['answer']}")

    # %% 2. 知识库（rag 策略用）：与服务相同的 KnowledgeBase，混合检索（BM25+jieba / 向量）
    kb = KnowledgeBase.build(lab.path("kb"), labs.ROOT / cfg.kb_dir, KBConfig()) if "rag" in cfg.strategies else None

    def chat(strategy: str, q: dict) -> list[dict]:
        """一个问题在某策略下模型看到的完整对话（消息列表）。"""
        lang, msgs = q["lang"], []
        if strategy != "plain":
            msgs.append({"role": "system", "content": SYSTEM[lang]})
        if strategy == "few_shot":
            for s in shots[lang]:
                msgs += [{"role": "user", "content": s["instruction"]},
                         {"role": "assistant", "content": s["output"]}]
        if strategy == "rag":
            user = build_prompt(q["question"], kb.search(q["question"], cfg.top_k), lang,
                                max_passage_chars=cfg.max_passage_chars)
        else:
            user = q["question"]
        return msgs + [{"role": "user", "content": user}]

    # %% 3. 生成与评分：贪心解码、按长度分批（复用 rag.generate.Generator）
    gen = Generator(cfg.model, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, progress=True)

    def ask(strategy: str, qs: list[dict]) -> tuple[list[dict], dict]:
        chats = [chat(strategy, q) for q in qs]
        answers = gen.answer_chats(chats, [q["question"] for q in qs], [q["lang"] for q in qs])
        m = evaluate_answers(answers, [q["answer"] for q in qs], [q["doc_ids"] for q in qs])
        m["refusal"] = sum(a.refused for a in answers) / len(answers)
        m["length"] = sum(len(a.text) for a in answers) / len(answers)
        log = [{"question": q["question"], "prompt": c, "answer": a.text, "strategy": strategy,
                "lang": q["lang"], "qid": q["id"]} for q, c, a in zip(qs, chats, answers)]
        return log, m

    t0 = time.perf_counter()
    results = {s: ask(s, fb_qs) for s in cfg.strategies}
    secs = {"seconds_strategies": time.perf_counter() - t0}
    rows = [{"strategy": s, "acc": m["acc"], "acc_zh": m["acc_zh"], "acc_en": m["acc_en"],
             "refusal": m["refusal"], "mean_chars": m["length"]} for s, (_, m) in results.items()]
    lab.table(rows, f"提示策略对比（反馈划分 {len(fb_qs)} 题，{cfg.model}）")
    deploy = cfg.deploy or max(cfg.strategies, key=lambda s: results[s][1]["acc"])  # 并列取先列出的

    # %% 4. 上线 + 反馈：消息日志 → 模拟反馈（+ 混进来的坏记录）→ 校验 → 偏好对
    log, before_fb = results[deploy]
    messages = [{"message_id": f"msg-{i:04d}", **r} for i, r in enumerate(log, 1)]
    atomic_write_jsonl(lab.path("messages.jsonl"), messages)
    gold = {m["message_id"]: q["answer"] for m, q in zip(messages, fb_qs)}
    judge = lambda ans, ref: answer_scores(ans, ref)["contains"] > 0 and not is_refusal(ans)  # noqa: E731
    simulated = fb.simulate_feedback(messages, gold, judge)
    bad_lines = (labs.ROOT / cfg.bad_feedback).read_text(encoding="utf-8").splitlines()
    atomic_write_text(lab.path("feedback.jsonl"), "".join(
        json.dumps(r, ensure_ascii=False) + "\n" for r in simulated) + "".join(x + "\n" for x in bad_lines))
    msg_index = fb.load_messages(lab.path("messages.jsonl"))
    data = fb.load_feedback(lab.path("feedback.jsonl"), msg_index)
    pairs, summary = fb.to_pairs(data, msg_index), data.summary()
    print("\n".join("拒收 " + str(r).replace(str(lab.out) + "/", "") for r in data.rejected))
    lab.text(f"**反馈是模拟的**：没有真实用户，答案包含标准短答案记 👍，否则记 👎 并按固定模板写纠正"
             f"（{fb.CORRECTION_TEMPLATE['zh']}）。上线策略：`{deploy}`；反馈 {summary['read']} 条，"
             f"保留 {summary['kept']}（👍 {summary['up']} / 👎 {summary['down']}），拒收 {summary['rejected']}："
             f"{summary['rejected_by_reason']}；偏好对 {len(pairs)} 个。")

    # %% 5. 一轮 DPO（LoRA），用同一策略重测两个划分
    t0 = time.perf_counter()
    _, before_held = ask(deploy, held_qs)
    res, after_fb, after_held, longest = {}, before_fb, before_held, 0
    if pairs:
        fb.write_pairs(lab.path("pairs.jsonl"), pairs)
        n_pairs = len(load_pairs(lab.path("pairs.jsonl")).rows)  # 偏好对能被项目的加载器读回
        shutil.rmtree(lab.path("dpo"), ignore_errors=True)
        longest = max(len(gen.tok(models.render_chat(gen.tok, p["prompt"] + [
            {"role": "assistant", "content": p[k]}]))["input_ids"]) for p in pairs for k in ("chosen", "rejected"))
        secs["dpo_max_length"] = cfg.max_length or longest
        s = DPOSettings(model=cfg.model, train_file=str(lab.path("pairs.jsonl")), eval_file=None,
                        beta=cfg.dpo_beta, sft_weight=cfg.sft_weight, max_steps=cfg.dpo_steps, batch_size=cfg.dpo_batch_size,
                        learning_rate=cfg.dpo_lr, max_length=secs["dpo_max_length"], logging_steps=1,
                        lora=LoraSettings(r=cfg.lora_r, alpha=2 * cfg.lora_r), save_steps=10**9,
                        seed=cfg.seed, output_dir=str(lab.path("dpo")))
        res = run_dpo(s, gen.model, gen.tok)
        secs["seconds_dpo"] = res["train_runtime_s"]
        # 适配器已存进 dpo/final；评测时把 LoRA 合并进权重，生成更快（结果相同）
        gen.model = plain_forward(res["trainer"].model).merge_and_unload().eval()
        _, after_fb = ask(deploy, fb_qs)
        _, after_held = ask(deploy, held_qs)
    else:
        n_pairs = 0
        lab.text("没有 👎+纠正，就没有偏好对：跳过 DPO，前后准确率相同。")
    secs["seconds_round"] = time.perf_counter() - t0  # 留出划分 DPO 前 + DPO + 两个划分重测
    if kb:
        kb.close()

    # %% 6. 结果：表格、柱状图、扁平指标
    cmp_rows = [{"split": name, "questions": len(qs), **{f"{k}_{when}": d[k] for k in ("acc", "acc_zh", "acc_en")
                                                         for when, d in (("before", b), ("after", a))}}
                for name, qs, b, a in (("feedback", fb_qs, before_fb, after_fb),
                                       ("heldout", held_qs, before_held, after_held))]
    lab.table(cmp_rows, f"DPO 前后（策略 {deploy}，{res.get('global_step', 0)} 步，{n_pairs} 个偏好对）")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, table, keys, title in ((axes[0], rows, ("acc", "acc_zh", "acc_en", "refusal"), "prompt strategies"),
                                   (axes[1], cmp_rows, ("acc_before", "acc_after"), f"DPO round ({deploy})")):
        w = 0.8 / len(keys)
        for j, key in enumerate(keys):
            ax.bar([i + w * (j - (len(keys) - 1) / 2) for i in range(len(table))], [r[key] or 0 for r in table], w, label=key)
        ax.set_xticks(range(len(table)), [r.get("strategy") or r.get("split") for r in table])
        ax.set_title(title)
        ax.legend()
    lab.figure(fig, "strategies_and_dpo.png", "左：提示策略对比；右：DPO 前后两个划分的准确率")

    m = {"questions": len(fb_qs), "heldout_questions": len(held_qs), "deployed_strategy": deploy, "feedback_simulated": True}
    for s in STRATEGIES:  # 没跑的策略记 None
        r = next((row for row in rows if row["strategy"] == s), {})
        m.update({f"{k}_{s}": r.get(k) for k in ("acc", "acc_zh", "acc_en", "refusal", "mean_chars")})
    m.update(feedback_read=summary["read"], feedback_kept=summary["kept"], feedback_up=summary["up"],
             feedback_down=summary["down"], feedback_rejected=summary["rejected"],
             **{f"rejected_{c}": data.by_reason().get(c, 0) for c in fb.REASONS},
             pairs=n_pairs, dpo_steps=res.get("global_step", 0), dpo_train_loss=res.get("train_loss"),
             acc_feedback_before=before_fb["acc"], acc_feedback_after=after_fb["acc"],
             acc_heldout_before=before_held["acc"], acc_heldout_after=after_held["acc"],
             longest_pair_tokens=longest, **{k: round(v, 1) for k, v in secs.items()})
    return m


if __name__ == "__main__":
    labs.run(main, Config, full={"questions": 40, "heldout": 40, "dpo_steps": 40},
             headline=["acc_plain", "acc_system", "acc_few_shot", "acc_rag", "deployed_strategy",
                       "feedback_kept", "feedback_rejected", "pairs", "acc_feedback_before",
                       "acc_feedback_after", "acc_heldout_before", "acc_heldout_after"])
