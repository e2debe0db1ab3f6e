# %% [markdown]
# # L2.04 模型压缩：剪枝、蒸馏、量化
# 问题：同一个模型，用非结构化剪枝（30%/50% 权重置零）、结构化剪枝（删去 25% 的 MLP 神经元）、
# 知识蒸馏（只保留 1/3 层的学生模型）和量化（int8 动态、NF4 4 bit、GGUF Q4_1）压缩后，
# 困惑度(ppl)、磁盘大小、内存、生成速度各变成多少？哪些方案在"更小/更快"与"更准"之间最划算？
# 你将看到：每个变体一行实测数字（同一批留出文本窗口上的 ppl、保存后的真实字节数、tokens/s），
# 以及两张帕累托图（ppl-大小、ppl-速度）：只有落在前沿上的方案才值得考虑。

# %%
import copy
from typing import Literal

import matplotlib.pyplot as plt
from pydantic import Field

from llmtech import compress, data, labs, models
from llmtech.compress import bnb, compare, distill, prune
from llmtech.evals import lm, speed
from llmtech.train.callbacks import plot_loss


class Config(labs.LabConfig):
    sparsities: list[float] = Field([0.3, 0.5], min_length=1)  # 非结构化剪枝：每个稀疏度一个变体
    prune_scope: Literal["global", "layer"] = "global"  # 全模型一个阈值 / 每个矩阵剪同样比例
    mlp_fraction: float = 0.25  # 结构化剪枝：每层删去的 MLP 中间神经元比例
    mlp_score: Literal["activation", "weight"] = "activation"  # 神经元重要性的算法
    calib_tokens: int = 512  # activation 分数用的校准 token 数（取自训练文本）
    student_layers: int = 10  # 学生模型的层数（教师 30 层）
    distill_steps: int = 20
    distill_batch: int = 4
    distill_block: int = 128
    distill_lr: float = 1e-3
    temperature: float = 2.0
    alpha: float = 0.5  # loss = α·KD + (1-α)·CE
    train_file: str = "data/support/sft_train.jsonl"  # 蒸馏/校准文本（只取英文记录）
    ppl_glob: str = "data/support/kb/*_en.md"  # 留出文本：去掉训练数据引用过的文档
    ppl_window: int = 256
    ppl_max_tokens: int | None = 512
    prompts: int = 1  # 计时提示条数
    max_new_tokens: int = 16  # 每条生成的 token 数（忽略 EOS）
    keep_models: bool = False  # True: 保留 out/models/ 下保存的各变体


def main(cfg: Config, ctx: labs.LabContext) -> dict:
    # %% 1. 数据：训练文本（蒸馏 + 剪枝校准）与留出文本（困惑度）严格分开
    recs = [r for r in data.load(labs.ROOT / cfg.train_file) if r.get("lang", "en") == "en"]
    train_texts = [f"{data.formats.alpaca_prompt(r)}\n{r['output']}" for r in recs]
    held = [p for p in sorted(labs.ROOT.glob(cfg.ppl_glob))
            if p.name not in {r.get("source") for r in recs}]
    texts, source = (([p.read_text(encoding="utf-8") for p in held], f"{len(held)} 篇训练数据"
                      "未引用的知识库文档") if held else compress.eval_texts(None))
    ctx.text(f"蒸馏/校准文本：{len(train_texts)} 条英文问答；困惑度文本：{source}，"
             f"窗口 {cfg.ppl_window}，共 {cfg.ppl_max_tokens or '全部'} tokens。")
    speed.warm_runtime()
    teacher, tok = models.load_lm(cfg.model, seed=cfg.seed)
    compress.quantize.own_weights(teacher.eval())
    rows, m = [], {}

    def evaluate(name, model, how, fmt="safetensors"):  # 同一把尺子量每个变体
        r = compare.measure_variant(name, model, tok, texts, speed.DEFAULT_PROMPTS[: cfg.prompts],
                                  ctx.path("models"), fmt, None, cfg.ppl_window, cfg.ppl_max_tokens,
                                  cfg.max_new_tokens, keep=cfg.keep_models)
        m.update(r)  # ppl、磁盘 MB、内存中的模型 MB、解码 tok/s、计时期间别的进程占用的 CPU%
        rows.append({"variant": name, "做法": how, "ppl/fp32": r[f"ppl_{name}"] / m["ppl_fp32"],
                     **{k.removesuffix(f"_{name}"): v for k, v in r.items()}})

    # %% 2. 基线 + 非结构化剪枝：把 |w| 最小的权重置零。形状不变、仍按稠密矩阵存储和计算，
    #    所以磁盘大小与速度都不变——要兑现稀疏，需要稀疏存储格式和稀疏算子（见 CSR 估算）。
    evaluate("fp32", teacher, "原模型 fp32")
    sparse = [f"sparse{round(100 * s)}" for s in cfg.sparsities]
    for name, s in zip(sparse, cfg.sparsities):
        model = copy.deepcopy(teacher)  # 每个变体都从原模型的拷贝开始
        rep = prune.magnitude_prune(model, s, cfg.prune_scope)
        m[f"sparsity_{name}"], m[f"csr_mb_{name}"] = rep.sparsity, prune.csr_bytes(model) / speed.MB
        evaluate(name, model, f"{cfg.prune_scope} 幅值剪枝，实测稀疏度 {rep.sparsity:.1%}")

    # %% 3. 结构化剪枝：按重要性删掉每层 MLP 的一部分中间神经元（gate/up 的行、down 的列），
    #    矩阵真的变小、config.intermediate_size 同步更新——文件变小，计算也变少。activation 分数 =
    #    校准文本上该神经元输出的平均幅值 × down_proj 对应列的范数；只看权重范数（mlp_score=weight）
    #    会剪掉少数"巨量激活"通道，模型随即崩坏——试试看。
    model = copy.deepcopy(teacher)
    calib = lm.token_windows(tok, train_texts, cfg.ppl_window, cfg.calib_tokens)
    scores = prune.mlp_channel_scores(model, cfg.mlp_score, calib)
    rep = prune.prune_mlp_channels(model, cfg.mlp_fraction, scores, method=cfg.mlp_score)
    m.update(mlp_intermediate=rep.intermediate_after, mlp_params_ratio=rep.params_ratio)
    evaluate("mlp", model, f"MLP {rep.intermediate_before}→{rep.intermediate_after} 神经元"
                           f"（{cfg.mlp_score} 分数）")

    # %% 4. 知识蒸馏：学生 = 教师的配置但只有 student_layers 层，用均匀抽取的教师层（含首尾）
    #    初始化；先量"未训练的学生"，再用 α·T²·KL(p_T‖q_T) + (1-α)·CE 训练，量"蒸馏后的学生"。
    student = distill.build_student(teacher, cfg.student_layers, seed=cfg.seed)
    ids = student.config.distilled_from_layers
    evaluate("student_init", student, f"{len(ids)} 层学生（教师第 {ids} 层），未训练")
    res = distill.distill(teacher, student, tok, train_texts, distill.DistillSettings(
        steps=cfg.distill_steps, batch_size=cfg.distill_batch, block_size=cfg.distill_block,
        lr=cfg.distill_lr, temperature=cfg.temperature, alpha=cfg.alpha, seed=cfg.seed),
        log_file=ctx.path("distill_log.jsonl"))
    m.update(student_layers=len(ids), distill_tokens_per_s=res.tokens_per_s,
             distill_kd_first=res.first("kd"), distill_kd_last=res.last("kd"))
    evaluate("student_kd", student, f"同一学生蒸馏 {res.steps} 步（{res.tokens} tokens，"
                                    f"T={cfg.temperature}, α={cfg.alpha}）")

    # %% 5. 量化：int8 动态（torch.ao，见 L1.06）、NF4 4 bit（bitsandbytes，QLoRA 的存储格式）、
    #    GGUF Q4_1（llama.cpp；没装 llama-cpp-python 时如实给出一行"未安装"）。注意：内置的 fp32
    #    模型本身就是从这个 Q4_1 文件反量化来的，所以这里 GGUF 的 ppl 与 fp32 几乎相同，看不出它的量化损失。
    model, backend = compress.quantize_int8_dynamic(copy.deepcopy(teacher))
    evaluate("int8", model, f"dynamic int8, {backend}", "torch")
    model, _ = bnb.load_quantized(cfg.model, bits=4, seed=cfg.seed)
    evaluate("nf4", model, "bitsandbytes NF4 + 双重量化，bf16 计算")
    ok, m["gguf_status"] = compress.gguf_status(cfg.model)
    if ok:
        dep = compress.build_variant("gguf", cfg.model, seed=cfg.seed)
        evaluate("gguf", dep.model, dep.backend, "gguf")
        dep.close()
    else:
        m.update({k.replace("_fp32", "_gguf"): None for k in list(m) if k.endswith("_fp32")})
        rows.append({"variant": "gguf", "做法": f"不可用：{m['gguf_status']}"})

    # %% 6. 结果：表格 + 帕累托图（没有别的变体同时更小/更快且 ppl 更低的点，才在前沿上）
    done = [r["variant"] for r in rows if "ppl" in r]
    for key, sign in (("size_mb", 1), ("tokens_per_s", -1)):  # 大小越小越好，速度越大越好
        m[f"pareto_{key}"] = ",".join(compare.pareto_front(
            {v: (m[f"ppl_{v}"], sign * m[f"{key}_{v}"]) for v in done}))
    top = sparse[cfg.sparsities.index(max(cfg.sparsities))]
    m.update(ppl_sparse_max=m[f"ppl_{top}"], sparse_size_ratio=m[f"size_mb_{top}"] / m["size_mb_fp32"],
             size_ratio_mlp=m["size_mb_mlp"] / m["size_mb_fp32"], threads=speed.threads())
    ctx.table(rows, f"压缩变体对比（{cfg.prompts} 条提示 × {cfg.max_new_tokens} token 计时）")
    ctx.text("非结构化稀疏若改存 CSR（值 + int32 列号）：" + "，".join(
        f"{v} {m[f'csr_mb_{v}']:.0f} MB" for v in sparse) + f"，稠密 fp32 {m['size_mb_fp32']:.0f} MB"
        f"。帕累托前沿（ppl-大小）：{m['pareto_size_mb']}；（ppl-速度）：{m['pareto_tokens_per_s']}。")
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    for a, key, label in ((ax[0], "size_mb", "size on disk (MB)"),
                          (ax[1], "tokens_per_s", "decode tokens/s")):
        front = m[f"pareto_{key}"].split(",")
        for v in done:
            a.scatter(m[f"{key}_{v}"], m[f"ppl_{v}"], color="tab:red" if v in front else "tab:gray")
            a.annotate(v, (m[f"{key}_{v}"], m[f"ppl_{v}"]), fontsize=8)
        a.plot(*zip(*sorted((m[f"{key}_{v}"], m[f"ppl_{v}"]) for v in front)), "r--", lw=1)
        a.set(xlabel=label, ylabel="held-out perplexity (log)", yscale="log")
    ctx.figure(fig, "compression_pareto.png", "帕累托图：ppl-磁盘大小、ppl-解码速度（红色 = 前沿）")
    plot_loss(ctx.path("distill_log.jsonl"), ctx.path("distill_loss.png"), "distillation loss")
    ctx.text("![蒸馏损失 α·KD+(1-α)·CE](distill_loss.png)")
    return m


if __name__ == "__main__":
    labs.run(main, Config,
             full={"ppl_max_tokens": None, "distill_steps": 200, "calib_tokens": 2048,
                   "prompts": 3, "max_new_tokens": 48},
             headline=["ppl_fp32", "ppl_sparse_max", "sparse_size_ratio", "ppl_mlp",
                       "size_ratio_mlp", "ppl_student_init", "ppl_student_kd", "ppl_nf4",
                       "size_mb_nf4", "tokens_per_s_gguf", "gguf_status"])
