# %% [markdown]
# # L3.05 评估指标体系
# 问题：一个微调后的模型"好不好"，要用哪几把尺子量？每把尺子量到的是什么、有多大误差？
# 1) 困惑度（语言建模能力，滑动窗口 + 步长）；2) 多选题准确率（CMMLU，按对数似然打分，
# 0-shot / 5-shot，"字母"与"完形填空"两种问法，带 n 与二项分布 95% 置信区间，对照 0.25 的随机线）；
# 3) BLEU / ROUGE-L（中文用 jieba 分词）；4) 人工评估表（CSV + HTML）与评分员一致性（Cohen's kappa）。
# 你将看到：内置 135M 模型在中文 CMMLU 上两种问法的准确率、n 与置信区间（是否显著高于随机）；
# 字母问法几乎总选同一个字母；步长越小困惑度越低；同一组回答换一种分词 BLEU 就变；
# 两位（模拟）评分员的 kappa 比原始一致率低多少。

# %%
import math
import random

import matplotlib.pyplot as plt
import torch

from llmtech import data, labs, models
from llmtech.errors import DataError
from llmtech.evals import human, lm, mcq, textgen


class Config(labs.LabConfig):
    cmmlu: str = "../shared/data/cmmlu"   # CMMLU 公开数据（原地读取；CC BY-NC-SA 4.0，不拷贝进项目）
    subjects: list[str] = ["elementary_commonsense", "chinese_food_culture", "high_school_geography",
                           "elementary_chinese"]
    limit: int = 25                        # 0-shot：每个科目取前 N 道题
    limit_fewshot: int = 10                # 5-shot 提示长约 6 倍，快速模式只取每科前 10 题（完整模式 60）
    shots: list[int] = [0, 5]
    modes: list[str] = ["letter", "cloze"]
    mcq_bf16: bool = True                  # 多选题打分用 bf16 自动混合精度（本机 CPU 约快 1.5–2 倍；False = 纯 fp32）
    ppl_glob: str = "data/support/kb/*_{lang}.md"
    ppl_window: int = 128
    ppl_strides: list[int] = [128, 32]     # 步长 = 窗口：不重叠；步长更小：每个 token 看到更多上文
    ppl_max_tokens: int = 2000
    gen_file: str = "data/support/sft_test.jsonl"
    gen_n: int = 6                          # 生成回答的条数（BLEU/ROUGE 与人工评估表共用）
    max_new_tokens: int = 40
    rater_noise: float = 0.3               # 模拟评分员 B 每个分数被 ±1 扰动的概率


def main(cfg: Config, ctx: labs.LabContext) -> dict:
    model, tok = models.load_lm(cfg.model, seed=cfg.seed)
    m: dict = {}

    # %% 1. 困惑度：ppl = exp(平均每 token 负对数似然)。文本按窗口切块；步长 < 窗口时窗口互相重叠，
    # 但每个 token 只算一次（只算"新"进入窗口的 token），于是每个 token 至少有 窗口-步长 个上文。
    # 上文越多，预测越准：同一段文本，步长变小 ppl 就会下降——比较 ppl 时必须写明窗口与步长。
    # 注意：ppl 是"每个 token"的，不同语言、不同分词器之间不可比。SmolLM2 的分词器常把一个汉字切成
    # 多个字节级 token（见"token/字符"列），后面的字节几乎是确定的，于是中文"每 token"的 ppl 反而比英文低；
    # 折算成"每字符"的比特数（bits/字符 ≈ 每 token NLL × token/字符 ÷ ln2）才看得出真实难度。
    rows = []
    for lang in ("zh", "en"):
        texts = [p.read_text(encoding="utf-8") for p in sorted(labs.ROOT.glob(cfg.ppl_glob.format(lang=lang)))]
        tpc = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts) / sum(map(len, texts))
        for stride in cfg.ppl_strides:
            s = lm.perplexity_stats(model, tok, texts, cfg.ppl_window, stride, cfg.ppl_max_tokens)
            rows.append({"语言": lang, "窗口": cfg.ppl_window, "步长": stride, "ppl": round(s["ppl"], 2),
                         "token/字符": round(tpc, 2), "≈bits/字符": round(s["nll_per_token"] * tpc / math.log(2), 2),
                         "计分 token": s["tokens"], "窗口数": s["windows"]})
            m[f"ppl_{lang}_stride{stride}"] = round(s["ppl"], 3)
            m[f"bpc_{lang}_stride{stride}"] = rows[-1]["≈bits/字符"]
        m[f"ppl_{lang}"] = m[f"ppl_{lang}_stride{min(cfg.ppl_strides)}"]
    ctx.table(rows, title="知识库文档的困惑度（中文 / 英文，不同步长）")

    # %% 2. 多选题（CMMLU）：不让模型生成文字，而是比较它给每个选项的对数似然。
    # 字母问法：列出 A–D 四个选项，看"答案:"后面下一个 token 是 " A"/" B"/" C"/" D" 的概率哪个大。
    # 完形填空问法：只给题干，把每个选项的文字接在"答案："后面，比较（按字数归一化的）对数似然。
    # 为什么小模型字母问法≈随机？字母问法要求模型先"读懂"题目和四个选项，再把正确内容和一个任意的
    # 符号（A/B/C/D）对应起来——这种"选项-字母绑定"是大模型才涌现的能力，135M 模型做不到，于是它的
    # 选择几乎只由对某个字母的偏好决定（看"各字母被选次数"：准确率≈正确答案恰好是那个字母的比例）。
    # 完形填空只问"哪段文字更像这句话的自然延续"，正是预训练学的事，知识直接体现在概率里：本项目的
    # issue 记录了同一模型在 240 道英文 MMLU 题上字母 0.263、完形填空 0.338。但 SmolLM2 的预训练语料
    # 几乎全是英文，中文知识很少——在中文 CMMLU 上完形填空是否有信号，以下表实测为准。
    # 完形填空偏爱常见、短小的词，所以按字数归一化（表中同时给出不归一化的 accuracy_sum）；而"下列说法
    # 正确的是"这类题干不完整的题，比的只是四句话哪句更通顺，完形填空天然不擅长。
    # n 只有几十到一百题时，95% 置信区间宽约 ±0.1：区间包含 0.25 就不能说"高于随机"；若整个区间都在
    # 0.25 以下，模型并不是"知道错误答案"，而是打分方式有系统偏差——可能是它总偏向更常见、更"顺口"的
    # 说法，而出题人恰好常用这类说法做干扰项（开发时检查过：这里的偏差不是"偏爱长选项"）。
    mcq_rows, results = [], {}
    try:
        sets = {k: mcq.load_mcq(labs.ROOT / cfg.cmmlu, cfg.subjects, cfg.limit_fewshot if k else cfg.limit, k)
                for k in cfg.shots}
    except DataError as e:
        sets = {}
        ctx.text(f"CMMLU 不可用，跳过多选题评估：{e}")
    for shots, qset in sets.items():
        for mode in cfg.modes:
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=cfg.mcq_bf16):
                r = mcq.evaluate_mcq(model, tok, qset, mode, shots)
            results[(mode, shots)] = r
            key = f"mcq_{mode}_{shots}shot"
            m.update({f"{key}_acc": round(r["accuracy"], 4), f"{key}_ci_low": round(r["ci95_low"], 4),
                      f"{key}_ci_high": round(r["ci95_high"], 4), f"{key}_p": round(r["p_vs_chance"], 4),
                      f"{key}_s": r["seconds"]})
            mcq_rows.append({"问法": mode, "shots": shots, "accuracy": round(r["accuracy"], 3), "n": r["n"],
                             "95% CI": f"{r['ci95_low']:.3f}–{r['ci95_high']:.3f}",
                             "p(>0.25)": round(r["p_vs_chance"], 4),
                             "accuracy_sum": round(r["accuracy_sum"], 3) if "accuracy_sum" in r else "—",
                             "各字母被选次数": " ".join(f"{k}{v}" for k, v in r["predicted"].items()),
                             "正确答案分布": " ".join(f"{k}{v}" for k, v in r["gold"].items()),
                             "结论": ("显著高于随机" if r["ci95_low"] > mcq.CHANCE else "显著低于随机（打分方式有系统偏差）"
                                    if r["ci95_high"] < mcq.CHANCE else "与随机无显著差异"),
                             "秒": r["seconds"]})
    m["mcq_n"] = next(iter(results.values()))["n"] if results else 0
    m["mcq_n_fewshot"] = next((r["n"] for (md, k), r in results.items() if k), 0)
    for mode in ("letter", "cloze"):  # 报告用的标题数字（没有就记 None）
        m.setdefault(f"mcq_{mode}_0shot_acc", None)
    if mcq_rows:
        ctx.table(mcq_rows, title=f"CMMLU {len(cfg.subjects)} 个科目 × 前 {cfg.limit} 题（随机水平 0.25）")
        r0 = next(iter(results.values()))
        ctx.table([{"科目": s, **{f"{md}/{k}shot (n={results[(md, k)]['by_subject'][s]['n']})":
                                 round(results[(md, k)]["by_subject"][s]["accuracy"], 3) for (md, k) in results}}
                   for s in r0["by_subject"]], title="分科准确率")
        ctx.text(f"5-shot 的示例取自同科目 dev/，题目是 0-shot 题目的前 {cfg.limit_fewshot} 道/科（n 更小、区间更宽）。"
                 + ("快速模式的 5-shot 只是演示；n 更大的 5-shot 结果见完整模式。" if cfg.quick else ""))
        fig, ax = plt.subplots(figsize=(6, 3.2))
        names = [f"{md}\n{k}-shot" for (md, k) in results]
        accs = [r["accuracy"] for r in results.values()]
        err = [[a - r["ci95_low"] for a, r in zip(accs, results.values())],
               [r["ci95_high"] - a for a, r in zip(accs, results.values())]]
        ax.bar(names, accs, yerr=err, capsize=6, color="#4c78a8")
        ax.axhline(mcq.CHANCE, color="red", ls="--", label="chance 0.25")  # 图中用英文：本机 matplotlib 无中文字体
        ax.set_ylabel("accuracy"), ax.set_ylim(0, 1), ax.legend()
        ax.set_title(f"CMMLU, n={m['mcq_n']} per bar, error bars = 95% CI")
        ctx.figure(fig, "mcq_accuracy.png", "多选题准确率与 95% 置信区间")

    # %% 3. 生成质量：BLEU（n-gram 精确率的几何平均 × 简短惩罚）与 ROUGE-L（最长公共子序列的 F1）。
    # 中文没有空格，BLEU 先要分词：jieba 按词切、按字切，同一组回答的 BLEU 不同——报告 BLEU 必须写分词方式。
    recs = [r for r in data.load(labs.ROOT / cfg.gen_file) if r.get("lang") == "zh"][: cfg.gen_n]
    prompts = [(r["instruction"] + ("\n" + r["input"] if r.get("input") else "")) for r in recs]
    answers = lm.generate(model, tok, [[{"role": "user", "content": p}] for p in prompts], cfg.max_new_tokens)
    refs = [r["output"] for r in recs]
    b_j, b_c = textgen.bleu(answers, refs, "jieba"), textgen.bleu(answers, refs, "char")
    m.update({"bleu_jieba": round(b_j["bleu"], 4), "bleu_char": round(b_c["bleu"], 4),
              "bleu_jieba_p1": round(b_j["precisions"][0], 4), "bleu_bp": round(b_j["bp"], 4),
              "rouge_l": round(textgen.mean(textgen.rouge_l(a, r) for a, r in zip(answers, refs)), 4)})
    ctx.table([{"分词": t, "BLEU": round(b["bleu"], 4), **{f"p{i + 1}": round(p, 3) for i, p in enumerate(b["precisions"])},
                "BP": round(b["bp"], 3), "译文长度": b["hyp_len"], "参考长度": b["ref_len"]}
               for t, b in (("jieba", b_j), ("按字", b_c))], title=f"语料级 BLEU（{len(answers)} 条回答）")
    ctx.text(f"ROUGE-L（按字）平均 {m['rouge_l']:.3f}。例：问「{prompts[0][:40]}」\n\n模型：{answers[0][:120]}\n\n参考：{refs[0][:120]}")

    # %% 4. 人工评估表：每位评分员一份 CSV（填分）和一份 HTML（阅读/打印），列出问题、模型回答、参考答案和评分列。
    # 这里没有真人评分员。下面两位是【模拟评分员】，规则公开、可复现：
    #   评分员 A：正确性 = 1 + round(4 × ROUGE-L)；流畅性按重复程度（不同二元组占比 ≥0.9→5，≥0.7→4，≥0.5→3，否则 2）；
    #            有用性 = round((正确性 + 流畅性) / 2)。
    #   评分员 B：同样的规则，但每个分数以 rater_noise 的概率（按种子）随机 ±1（截断在 1–5）——一位不太仔细的评分员。
    # Cohen's kappa = (p_o − p_e) / (1 − p_e)：扣除"各自按自己的打分习惯随便打也会一致"的部分 p_e。
    items = [{"id": f"q{i + 1:02d}", "prompt": p, "answer": a, "reference": r}
             for i, (p, a, r) in enumerate(zip(prompts, answers, refs))]
    paths = {who: human.write_sheet(items, ctx.path(f"human_eval_{who}"), rater=who) for who in ("A", "B")}

    def rater_a(it):
        toks = textgen.tokens(it["answer"])
        bigrams = list(zip(toks, toks[1:]))
        distinct = len(set(bigrams)) / len(bigrams) if bigrams else 0.0
        corr = 1 + round(4 * textgen.rouge_l(it["answer"], it["reference"]))
        flu = 5 if distinct >= 0.9 else 4 if distinct >= 0.7 else 3 if distinct >= 0.5 else 2
        return {"correctness": corr, "fluency": flu, "helpfulness": round((corr + flu) / 2)}

    rng = random.Random(cfg.seed)
    fill_a = {it["id"]: rater_a(it) for it in items}
    fill_b = {k: {c: min(5, max(1, v + (rng.choice((-1, 1)) if rng.random() < cfg.rater_noise else 0)))
                  for c, v in sc.items()} for k, sc in fill_a.items()}
    for who, fill in (("A", fill_a), ("B", fill_b)):
        human.fill_sheet(paths[who]["csv"], ctx.path(f"human_eval_{who}_filled.csv"), fill)
    sheets = [human.read_sheet(ctx.path(f"human_eval_{w}_filled.csv")) for w in ("A", "B")]
    agree = human.agreement(*sheets)
    ctx.table([{**r, "agreement": round(r["agreement"], 3), "kappa": round(r["kappa"], 3),
                "kappa_quadratic": round(r["kappa_quadratic"], 3)} for r in agree],
              title="模拟评分员 A / B 的一致性（模拟数据，不是真人评分）")
    for r in agree:
        m[f"kappa_{r['criterion']}"] = None if r["kappa"] != r["kappa"] else round(r["kappa"], 4)  # NaN：无法定义
        m[f"agreement_{r['criterion']}"] = round(r["agreement"], 4)
    m.update({"human_items": len(items), "raters_simulated": True})
    ctx.text("评估表：" + "，".join(f"`{p.name}`" for d in paths.values() for p in d.values())
             + "。kappa 解读（Landis & Koch）：" + "；".join(f"{r['label']} {r['reading']}" for r in agree))
    return m


if __name__ == "__main__":
    labs.run(main, Config,
             full={"limit": 60, "limit_fewshot": 60, "gen_n": 12, "ppl_max_tokens": 6000,
                   "subjects": ["elementary_commonsense", "chinese_food_culture", "high_school_geography",
                                "elementary_chinese", "nutrition", "world_history", "computer_science",
                                "traditional_chinese_medicine"]},
             headline=["mcq_cloze_0shot_acc", "mcq_letter_0shot_acc", "mcq_n", "ppl_zh", "bleu_jieba",
                       "rouge_l", "kappa_correctness"])
