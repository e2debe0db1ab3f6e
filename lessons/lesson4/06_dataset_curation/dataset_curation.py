# %% [markdown]
# # L4.06 对齐数据构建与审查
# 问题：一份偏好数据（DPO / 奖励模型用的 prompt + chosen + rejected）在进入训练之前，要查出哪些问题？
# 每类问题各有多少条，删掉或脱敏之后还剩多少？
# 你将看到的数字：
# 1. 一份故意"弄脏"的小文件（缺字段、空 prompt、chosen 与 rejected 相同、重复与近似重复、
#    混入别的格式、极端长度比、中英混杂、个人信息、辱骂性 chosen、抄了测试集的 prompt）——
#    每类埋点被找到几处（找到数 / 埋入数按另存的埋点清单计算），以及有没有误报；
# 2. 本项目自己的偏好数据 preference.jsonl 与 KTO 数据 kto.jsonl 的审查结果；
# 3. LLaMA-Factory 公开的 dpo_en_demo / dpo_zh_demo（各 300 条，原地读取）里真实存在的问题。
# 全部是规则与统计（MinHash、n-gram、词表），可复现，不调用任何模型；毒性检测可选接一个分类模型。

# %%
import collections
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from llmtech import labs
from llmtech.data import curation
from llmtech.data.curation import CATEGORIES, CurationConfig
from llmtech.data.preference import length_stats, load_pairs, load_unpaired, text_of
from llmtech.errors import DataError

ROOT = labs.ROOT


class Config(labs.LabConfig):
    dirty: str = "data/samples/dirty_preference.jsonl"             # 埋了问题的偏好数据
    planted: str = "data/samples/dirty_preference_planted.json"    # 埋点清单：行号 + 期望的问题类别
    project: str = "data/support/preference.jsonl"                 # 本项目的偏好数据（DPO）
    project_kto: str = "data/support/kto.jsonl"                    # 本项目的非成对数据（KTO）
    public: list[str] = ["../shared/data/llamafactory_sft/dpo_en_demo.json",   # 公开数据，原地读取
                         "../shared/data/llamafactory_sft/dpo_zh_demo.json"]
    # 客服数据：企业公开的客服邮箱不是个人信息；其余阈值见 CurationConfig
    curation: CurationConfig = CurationConfig(pii_allow=["@spruce-home.example"])
    # 公开的通用数据：只删重复、相同、辱骂、污染；长度比和语言只报告——翻译题、分类题的答案天然很短
    # 或换了语言（见下方样例）。个人信息也只报告：那里的"手机号/银行卡号"多是数学题里的大数字
    public_curation: CurationConfig = CurationConfig(
        pii_action="report", drop=["tie", "exact_dup", "near_dup", "toxic", "contaminated"])
    near_sweep: list[float] = [0.7]    # 近似重复阈值（完整模式扫描多个）
    examples: int = 1                  # 公开数据每类问题展示几条样例


def short(where: str) -> str:
    head, _, line = where.rpartition(":")
    return f"{Path(head).name}:{line}"


def clip(text: str, n: int = 60) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= n else text[:n] + "…"


def action(category: str, cfg: CurationConfig) -> str:
    """这一类问题的处理方式：格式问题的记录读不进来；其余按配置删除、脱敏或只报告。"""
    if category in curation.SCHEMA or category in cfg.drop:
        return "drop"
    return cfg.pii_action if category == "pii" else "report"


def audit_and_clean(path: Path, kind: str, cfg: CurationConfig, index, toxicity, lab, name: str):
    """读取（加载器报告格式问题）→ 审查 → 清洗 → 写出干净文件并重新加载验证。"""
    data = curation.load_for_audit(path, kind)
    kept, report = curation.curate(data, cfg, index, toxicity=toxicity)
    out = curation.write_clean(lab.path(f"clean/{name}.jsonl"), kept)
    again = (load_pairs if kind == "pairs" else load_unpaired)(out)
    if again.problems:
        raise DataError(f"{out}: the cleaned file still has problems: {again.problems[0]}")
    return data, kept, report


def main(cfg: Config, lab: labs.LabContext) -> dict:
    # %% 0. 测试集 n-gram 索引（去污染用）和可选的毒性分类器
    # 中文按 8 个字符切 n-gram（约 4–5 个词），英文按 5 个词：客服问题很短，13-gram 会漏掉整句抄袭
    index = curation.EvalIndex(curation.load_eval_texts(cfg.curation.eval_files, root=ROOT),
                               cfg.curation.contam_zh_ngram, cfg.curation.contam_en_ngram)
    toxicity = curation.load_toxicity_classifier(cfg.curation.toxicity_model)
    tox_mode = f"词表 + 分类器 {cfg.curation.toxicity_model}" if toxicity else "规则词表（未配置/无法加载分类模型）"
    lab.text(f"去污染参照：{', '.join(cfg.curation.eval_files)}，共 {len(index.texts)} 段文本。"
             f"毒性检测：{tox_mode}。")
    metrics: dict = {"eval_texts": len(index.texts), "toxicity_classifier": bool(toxicity),
                     "public_en_flag_exact_dup": None, "public_zh_flag_exact_dup": None}

    # %% 1. 脏数据：逐条列出问题（file:line），再与埋点清单对照
    data, kept, rep = audit_and_clean(ROOT / cfg.dirty, "pairs", cfg.curation, index, toxicity, lab, "dirty")
    lab.table(rep.table(), f"1. {Path(cfg.dirty).name} 的全部问题（{len(rep.flags)} 条）")
    rows, extra = curation.score_planted(rep, curation.load_planted(ROOT / cfg.planted), cfg.planted)
    lab.table(curation.summarise_planted(rows), "埋点对照：每类埋了几处、找到几处")
    found, total = sum(r["found"] for r in rows), len(rows)
    print(f"埋点找到 {found}/{total}，清单以外的误报 {len(extra)} 条")
    masked = next((r for r in kept if "[PHONE]" in text_of(r["prompt"])), None)
    if masked:
        lab.text(f"脱敏后保留的样本：`{clip(text_of(masked['prompt']), 80)}`")
    metrics.update(rep.summary("dirty_"))
    metrics.update({"planted_total": total, "planted_found": found, "false_alarms": len(extra),
                    "dirty_dropped_by": ", ".join(f"{k}={v}" for k, v in rep.dropped_by.items())})

    # %% 2. 本项目的数据：偏好对 + KTO（理应干净；顺便看长度偏差和 KTO 的正负比例）
    results = {"dirty": rep}
    for name, path, kind in (("project", cfg.project, "pairs"), ("project_kto", cfg.project_kto, "unpaired")):
        d, k, r = audit_and_clean(ROOT / path, kind, cfg.curation, index, toxicity, lab, name)
        results[name] = r
        metrics.update(r.summary(f"{name}_"))
        if kind == "pairs":
            ls = length_stats(d.rows)   # chosen 总是更长的话，模型会学到"越长越好"
            metrics[f"{name}_chosen_longer_share"] = round(ls["chosen_longer_share"], 3)
        else:
            metrics[f"{name}_desirable_share"] = round(sum(x["label"] for x in d.rows) / len(d.rows), 3)
            labels = collections.defaultdict(set)   # 非成对：很多 prompt 只有好或只有坏的回答
            for x in d.rows:
                labels[text_of(x["prompt"])].add(x["label"])
            metrics[f"{name}_prompts_one_label_only"] = sum(len(v) == 1 for v in labels.values())
    lab.table([{"dataset": n, "read": r.n_read, "flagged": r.flagged_records(), "kept": r.n_kept,
                **{c: v for c, v in r.counts().items() if v}} for n, r in results.items() if n != "dirty"],
              "2. 本项目数据的审查结果")

    # %% 3. 公开数据：LLaMA-Factory 的 DPO 示例集（原地读取，不复制进仓库）
    for path in cfg.public:
        p = (ROOT / path).resolve()
        name = "public_" + ("zh" if "_zh" in p.name else "en" if "_en" in p.name else p.stem)
        if not p.exists():
            print(f"[skip] 公开数据 {p} 不存在，跳过这一部分")
            metrics.update({f"{name}_skipped": True, f"{name}_flag_exact_dup": None})
            continue
        d, k, r = audit_and_clean(p, "pairs", cfg.public_curation, index, toxicity, lab, name)
        results[name] = r
        metrics.update(r.summary(f"{name}_"))
        metrics[f"{name}_skipped"] = False
        counts = {c: v for c, v in r.counts().items() if v}
        lab.table([{"category": c, "records": v, "action": action(c, cfg.public_curation)}
                   for c, v in counts.items()], f"3. {p.name}：读取 {r.n_read} 条，保留 {r.n_kept} 条")
        rows_by_where = {x["where"]: x for x in d.rows}
        shown = []
        for c in counts:   # 每类问题看几条真实样例，判断规则是否合理
            for f in [f for f in r.flags if f.category == c][:cfg.examples]:
                x = rows_by_where.get(f.where)
                shown.append({"where": short(f.where), "category": c,
                              "detail": clip(curation._SHORT_PATH.sub(r"\1", f.detail), 70),
                              "prompt": clip(text_of(x["prompt"]), 40) if x else "（加载器已跳过）",
                              "chosen": clip(text_of(x["chosen"]), 40) if x else "-"})
        lab.table(shown, f"{p.name} 的样例")

    # %% 4. 近似重复的阈值：prompt + chosen 的 Jaccard 阈值，以及"两个 prompt 本身也要相似"这条约束
    # 本项目每个知识点有两种问法、同一个答案：不加 prompt 约束时，它们会被当成近似重复
    sweep = []
    for t in cfg.near_sweep:
        row = {"threshold": t}
        for name, path, kind in (("dirty", cfg.dirty, "pairs"), ("project", cfg.project, "pairs"),
                                 ("project_kto", cfg.project_kto, "unpaired")):
            d = curation.load_for_audit(ROOT / path, kind)
            for suffix, prompt_min in (("", cfg.curation.near_prompt_min), ("_no_prompt_check", 0.0)):
                c = cfg.curation.model_copy(update={"near_threshold": t, "near_prompt_min": prompt_min})
                n = curation.audit(d, c).counts()["near_dup"]
                row[name + suffix] = metrics[f"{name}_near_dup_at_{t:g}{suffix}"] = n
        sweep.append(row)
    lab.table(sweep, "4. 近似重复条数随阈值变化（_no_prompt_check：不要求两个 prompt 相似）")

    # %% 5. 图：每个数据集每类问题的条数
    fig, ax = plt.subplots(figsize=(9, 4))
    cats = [c for c in CATEGORIES if any(r.counts()[c] for r in results.values())]
    width = 0.8 / len(results)
    for i, (n, r) in enumerate(results.items()):
        ax.bar([j + i * width for j in range(len(cats))], [r.counts()[c] for c in cats], width, label=n)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cats))], cats, rotation=35, ha="right")
    ax.set_ylabel("flagged records")
    ax.set_title(f"L4.06 audit: planted problems found {found}/{total}")
    ax.legend()
    lab.figure(fig, "flags_by_category.png", "每个数据集每类问题的条数")
    return metrics


if __name__ == "__main__":
    labs.run(main, Config, full={"near_sweep": [0.5, 0.6, 0.7, 0.8, 0.9], "examples": 3},
             headline=["planted_found", "planted_total", "false_alarms", "dirty_kept",
                       "project_flagged_records", "public_en_flag_exact_dup", "public_zh_flag_exact_dup"])
