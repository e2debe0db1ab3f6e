# %% [markdown]
# # L1.02 数据工程：文档 → 指令 → 清洗 → 去重
# 问题：把企业的原始文档和一份"脏"指令数据变成可用于 SFT 的干净数据，每条规则各处理了多少条？
# 你将看到的数字：解析出的文档与小节数、由模板生成的指令数、每条清洗规则删除/修改的记录数、
# 精确去重与近似去重（MinHash LSH）各删除多少条；最后在真实公开数据 alpaca_zh_demo 上复现一遍。
# 全部是规则，可复现，不调用任何模型。

# %%
import collections
import json

from llmtech import data, labs
from llmtech.data.clean import record_text
from llmtech.data.dedup import CleanDedupConfig, jaccard
from llmtech.data.docs import ConvertConfig, documents_to_instructions, load_documents
from llmtech.io import atomic_write_jsonl

ROOT = labs.ROOT


class Config(labs.LabConfig):
    kb_dir: str = "data/support/kb"                        # 云杉智能家居知识库（Markdown，中英文）
    extra_docs: str = "data/samples/docs"                  # HTML、GBK 编码的 TXT、DOCX、PDF 各一份
    dirty: str = "data/samples/dirty_instructions.jsonl"   # 故意埋了重复、隐私、长度、语言问题
    public: str = "../shared/data/llamafactory_sft/alpaca_zh_demo.json"  # 真实公开数据（原地读取）
    convert: ConvertConfig = ConvertConfig()
    # 客服数据是中英双语：只保留中文或英文，问答语言必须一致；企业公开的客服邮箱不是个人信息
    clean: CleanDedupConfig = CleanDedupConfig(
        lang="zh+en", lang_match=True, min_chars=5, max_chars=1000, pii_allow=["@spruce-home.example"])
    public_clean: CleanDedupConfig = CleanDedupConfig(lang="zh")  # 中文数据集：只留中文


def main(cfg: Config, ctx: labs.LabContext) -> dict:
    # %% 1. 文档 → 文本：每种格式有自己的解析器，统一输出带 # 标题的 Markdown 文本
    docs = (load_documents(ROOT / cfg.kb_dir, relative_to=ROOT)
            + load_documents(ROOT / cfg.extra_docs, relative_to=ROOT))
    by_kind = collections.defaultdict(lambda: {"files": 0, "chars": 0, "sections": 0})
    for d in docs:
        row = by_kind[f"{d.kind} ({d.encoding})" if d.encoding not in ("", "utf-8") else d.kind]
        row["files"] += 1
        row["chars"] += len(d.text)
        row["sections"] += len(d.sections)
    ctx.table([{"type": k, **v} for k, v in by_kind.items()], "1. 文档解析（gb18030 即 GBK 文件被正确识别）")

    # %% 2. 文本 → 指令：模板用"文档标题 + 小节标题"生成问题，答案就是小节原文（不编造）
    doc_records = documents_to_instructions(docs, cfg.convert)
    zh = next(r for r in doc_records if data.detect_lang(r["output"]) == "zh")
    en = next(r for r in doc_records if data.detect_lang(r["output"]) == "en")
    ctx.text("### 2. 模板生成的指令示例\n\n```json\n"
             + json.dumps([zh, en], ensure_ascii=False, indent=2) + "\n```\n\n"
             + "非对话模型（base model）用经典 Alpaca 纯文本格式训练：\n\n```text\n"
             + data.alpaca_text(zh, "alpaca-zh") + "\n```")

    # %% 3. 清洗 + 去重：规范化 → 隐私脱敏 → 长度 → 语言 → 精确去重 → 近似去重
    dirty = data.load(ROOT / cfg.dirty)
    pool = doc_records + dirty
    trace: list = []
    kept, report = data.clean_and_dedup(pool, cfg.clean, trace=trace)
    atomic_write_jsonl(ctx.path("clean.jsonl"), kept)
    notes = {"normalized": "规范化（NFKC、空白、控制字符、中文标点）", "pii_masked": "隐私项被替换为 [PHONE] 等标签",
             "removed_too_short": "答案过短", "removed_too_long": "答案过长",
             "removed_language": "非中/英文", "removed_lang_mismatch": "问答语言不一致",
             "removed_exact_dup": "精确重复（规范化后哈希相同）", "removed_near_dup": "近似重复（Jaccard ≥ 阈值）"}
    ctx.table([{"rule": k, "count": report[k], "说明": v} for k, v in notes.items()], "3. 质量报告：每条规则的作用")
    ctx.table([{"kind": k[4:], "masked": report[k]} for k in report
               if k.startswith("pii_") and k not in ("pii_masked", "pii_records")], "隐私脱敏明细")
    # 近似重复对：Jaccard 相似度是在字符 3-gram 集合上算的，中文无需分词
    near = [{"removed": record_text(pool[i])[:40].replace("\n", " "),
             "duplicate_of": record_text(pool[j])[:40].replace("\n", " "),
             "jaccard": round(jaccard(record_text(pool[i]), record_text(pool[j]), cfg.clean.ngram), 3)}
            for i, rule, j in trace if rule == "removed_near_dup"]
    ctx.table(near, f"近似重复（阈值 {cfg.clean.near_threshold}）")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(list(notes)[::-1], [report[k] for k in notes][::-1],  # 绿色=修改，红色=删除
            color=["#c44" if k.startswith("removed") else "#3a7" for k in notes][::-1])
    ax.set_xlabel("records (pii_masked: items)")
    ax.set_title(f"L1.02 cleaning report: {report['records_in']} -> {report['records_out']} records")
    ctx.figure(fig, "quality_report.png", "每条规则删除/修改的数量")

    metrics = {"documents": len(docs), "sections": sum(len(d.sections) for d in docs),
               "instructions_from_docs": len(doc_records), "dirty_records": len(dirty),
               "records_in": report["records_in"], "records_out": report["records_out"],
               "normalized": report["normalized"], "pii_masked": report["pii_masked"],
               "removed_length": report["removed_too_short"] + report["removed_too_long"],
               "removed_language": report["removed_language"] + report["removed_lang_mismatch"],
               "removed_exact_dup": report["removed_exact_dup"],
               "removed_near_dup": report["removed_near_dup"]}

    # %% 4. 真实数据：LLaMA-Factory 的 alpaca_zh_demo（1000 条），同一套规则看看能发现什么
    public = (ROOT / cfg.public).resolve()
    if not public.exists():
        print(f"[skip] 公开数据 {public} 不存在，跳过第 4 步")
        return {**metrics, "public_skipped": True}
    pub_records = data.load(public)
    pub_trace: list = []
    _, pub = data.clean_and_dedup(pub_records, cfg.public_clean, trace=pub_trace)
    ctx.table([{"rule": k, "count": v} for k, v in pub.items() if v], f"4. {public.name} 的质量报告")
    # 真实数据里的问题：中文指令配英文答案（机器翻译残留）、完全重复的样本
    ctx.table([{"rule": rule, "record": record_text(pub_records[i])[:70].replace("\n", " ")}
               for i, rule, _ in pub_trace[:6]], "被删除的真实样本（前 6 条）")
    return {**metrics, "public_skipped": False, "public_records_in": pub["records_in"],
            "public_records_out": pub["records_out"], "public_removed_exact_dup": pub["removed_exact_dup"],
            "public_removed_near_dup": pub["removed_near_dup"], "public_removed_language": pub["removed_language"],
            "public_normalized": pub["normalized"], "public_pii_masked": pub["pii_masked"]}


if __name__ == "__main__":
    labs.run(main, Config, headline=["instructions_from_docs", "records_in", "records_out",
                                     "removed_exact_dup", "removed_near_dup", "pii_masked"])
