# %% [markdown]
# # L2.06 LoRA / QLoRA / P-Tuning 选型
# 问题：给定模型大小、显存、数据量、序列长度和目标，该选全参微调、LoRA、QLoRA 还是 P-Tuning v2？
# 训练显存到底花在哪——权重、梯度、优化器状态还是激活？按公式算出的估计准不准？
# 你将看到：内置 135M 模型四种方法"估计 vs 实测峰值内存"（比值、是否在 ±25% 内）与分解图；
# 一张场景推荐表（7B@24GB、70B@48GB、135M@笔记本……）；以及 70B@8GB 放不下时给出的数字理由。

# %%
import torch
from pydantic import field_validator

from llmtech import labs
from llmtech.dist import memory

MB, GB = memory.MB, memory.GB
# (场景, 模型, 显存 GB, 训练样本数, 序列长度, 目标) —— 目标见 memory.GOALS
SCENARIOS = [
    ("7B 指令微调，单卡 24GB（RTX 4090）", "7b", 24, 10_000, 512, "instruction"),
    ("7B 长文本指令微调，24GB，序列 2048", "7b", 24, 10_000, 2048, "instruction"),
    ("7B 领域适配，单卡 80GB（A100/H100）", "7b", 80, 100_000, 512, "domain"),
    ("13B 指令微调，单卡 24GB", "13b", 24, 10_000, 512, "instruction"),
    ("70B 指令微调，单卡 48GB（A6000）", "70b", 48, 10_000, 512, "instruction"),
    ("1.5B 领域适配，16GB，数据少", "1.5b", 16, 2_000, 1024, "domain"),
    ("135M 领域适配，80GB", "135m", 80, 100_000, 512, "domain"),
    ("135M 多任务，笔记本 8GB", "135m", 8, 2_000, 512, "multitask"),
]


class Config(labs.LabConfig):
    methods: list[str] = list(memory.METHODS)
    batch: int = 4                 # 实测用的 batch × 序列长度（无 padding 的真实文本）
    seq_len: int = 128
    steps: int = 2                 # 第 2 步是稳态：优化器状态在第 1 步的 step() 里才分配
    lora_r: int = 8
    lora_dropout: float = 0.05
    prefix_tokens: int = 16        # P-Tuning v2 每层的虚拟 token 数
    gradient_checkpointing: bool = False
    data: str = "data/support/sft_train.jsonl"
    tolerance: float = 0.25        # 估计 / 实测 在 1 ± 0.25 内算"准"
    mmap_threshold: int = memory.MMAP_THRESHOLD  # 0 = glibc 默认（空闲的堆内存也算进 RSS）
    impossible_model: str = "70b"
    impossible_gpu_gb: float = 8

    @field_validator("methods")
    @classmethod
    def _known(cls, v):
        bad = [m for m in v if m not in memory.METHODS]
        if bad or not v:
            raise ValueError(f"methods must be a non-empty subset of {list(memory.METHODS)}")
        return v


def main(cfg: Config, ctx: labs.LabContext) -> dict:
    # %% 1. 估计：每种方法的 权重 / 梯度 / 优化器状态 / 激活（全 fp32，与实测同设置）
    # 峰值 = 权重 + 优化器状态 + max(激活, 梯度 + 优化器临时量)：反向时激活逐层释放、梯度逐层出现，
    # 两者不同时满额；把四项直接相加（naive_sum）会高估全参微调。激活里最大的一项常是 logits：
    # 词表 49152 时 batch×seq×V×4 字节，反向开始时还要再来两份（log-softmax 输出的梯度、logits 的梯度）。
    device = "cuda" if torch.cuda.is_available() else "cpu"  # 实测在哪，估计就按哪的规则
    est = {m: memory.estimate(cfg.model, m, cfg.batch, cfg.seq_len, **memory.measured_setup(m, device),
                              gradient_checkpointing=cfg.gradient_checkpointing, lora_r=cfg.lora_r,
                              lora_dropout=cfg.lora_dropout, prefix_tokens=cfg.prefix_tokens)
           for m in cfg.methods}
    ctx.table([{"method": memory.METHOD_NAMES[m], "trainable": e.params_trainable,
                **{k: round(getattr(e, k) / MB, 1) for k in
                   ("weights", "gradients", "optimizer", "activations", "step_temporaries", "total")},
                "naive_sum": round(e.naive_sum / MB, 1), "peak_phase": e.peak_phase}
               for m, e in est.items()], title=f"估计（MB）：{cfg.model}，batch {cfg.batch} × {cfg.seq_len}")
    # 每层为反向保存的张量（公式逐项写出，见 memory.layer_terms）。注意 LoRA 每层存得比全参还多：
    # 冻结的线性层不必存输入，但 LoRA 的 dropout 为每个适配层各存一份"dropout 输出 + mask"。
    terms = {x: est[x].settings["layer_terms"] for x in cfg.methods}
    names = sorted({k for t in terms.values() for k in t})
    ctx.table([{"每层保存的张量 (MB)": k, **{x: round(terms[x].get(k, 0) / MB, 2) for x in cfg.methods}}
               for k in names], title="每层激活的组成", show=False)

    # %% 2. 实测：每种方法一个新进程（RSS 峰值是按进程记录的），先 import + tiny 模型热身，
    # 再记基线 RSS，然后加载模型、跑 steps 个真实训练步（前向 + 反向 + AdamW）。实测 = 峰值 − 基线。
    m: dict = {}
    rows = []
    for meth in cfg.methods:
        print(f"实测 {meth} ...", flush=True)
        r = memory.measure_subprocess(
            meth, cfg.model, mmap_threshold=cfg.mmap_threshold, batch=cfg.batch,
            seq_len=cfg.seq_len, steps=cfg.steps, lora_r=cfg.lora_r, lora_dropout=cfg.lora_dropout,
            prefix_tokens=cfg.prefix_tokens, gradient_checkpointing=cfg.gradient_checkpointing,
            data=str(labs.ROOT / cfg.data), seed=cfg.seed)
        e_mb = est[meth].total / MB
        ratio = e_mb / r["measured_mb"]
        m.update({f"est_mb_{meth}": round(e_mb, 1), f"measured_mb_{meth}": r["measured_mb"],
                  f"ratio_{meth}": round(ratio, 3),
                  f"within_25pct_{meth}": abs(ratio - 1) <= cfg.tolerance,
                  f"baseline_mb_{meth}": r["baseline_mb"], f"peak_at_{meth}": r["peak_at"],
                  f"loss_step1_{meth}": r["losses"][0], f"step_s_{meth}": r["step_s"]})
        rows.append({"method": memory.METHOD_NAMES[meth], "estimate_MB": round(e_mb, 1),
                     "measured_MB": r["measured_mb"], "ratio": round(ratio, 3),
                     "within_25pct": m[f"within_25pct_{meth}"],
                     "naive_sum/measured": round(est[meth].naive_sum / MB / r["measured_mb"], 3),
                     "est_phase": est[meth].peak_phase, "measured_peak_at": r["peak_at"],
                     "baseline_MB": r["baseline_mb"], "loss_step1": r["losses"][0]})
    m["within_25pct_all"] = all(m[f"within_25pct_{x}"] for x in cfg.methods)
    if "full" in est:
        m["naive_ratio_full"] = round(est["full"].naive_sum / MB / m["measured_mb_full"], 3)
    # loss_step1：QLoRA 比 LoRA 高是 NF4 量化误差；P-Tuning 远高于其他是随机初始化的前缀在每层
    # 注入了噪声 K/V——训练开始前它比原模型还差，需要训练把前缀学出来。
    ctx.table(rows, title="估计 vs 实测峰值（MB，减去基线 RSS；ratio = 估计 / 实测）")
    ctx.text(f"基线 RSS（python + torch + transformers + peft，热身后）约 "
             f"{rows[0]['baseline_MB']:.0f} MB，已从实测中减去；glibc 的 mmap 阈值设为 "
             f"{cfg.mmap_threshold} 字节，使释放的张量立即还给系统（相当于 GPU 上的 max_memory_allocated；0 = glibc 默认）。")

    # %% 3. 图：左边每种方法的估计（峰值时同时存在的部分叠加）与实测；右边激活的组成
    fig = memory.estimate_figure(est, {x: m[f"measured_mb_{x}"] * MB for x in cfg.methods})
    ctx.figure(fig, "memory_estimate_vs_measured.png", "估计（叠加）与实测峰值；激活的组成")

    # %% 4. 选型：在 显存 × 0.9 内能放下的方法里，按目标的质量档次排序；同档里"不用折中
    # （梯度检查点 / 缩小 micro-batch）就能放下"的优先——显存紧张时 QLoRA 就是这样胜出的。
    srows = []
    for name, model, gpu, n, seq, goal in SCENARIOS:
        rec = memory.recommend(model, gpu, n, seq, goal, strict=False)
        best = rec.best
        srows.append({"场景": name, "目标": goal, "推荐": memory.METHOD_NAMES[best.method] if best else "无",
                      "配置": f"mb {best.micro_batch}" + (" + 检查点" if best.gradient_checkpointing else "")
                      if best else "-", "估计GB": round(best.estimate.total / GB, 1) if best else None,
                      "可行": ", ".join(memory.METHOD_NAMES[x] for x in rec.fitting),
                      "理由": best.reason if best else rec.options[0].reason})
        m[f"rec_{model.replace('.', '_')}_{gpu:g}gb_{seq}_{goal}"] = best.method if best else "none"
    ctx.table(srows, title="场景推荐（显存按 GPU、bf16 混合精度估计）")

    # %% 5. 放不下的例子：报错里给出最便宜方案需要多少、可用多少
    try:
        memory.recommend(cfg.impossible_model, cfg.impossible_gpu_gb, 10_000, 512)
        m.update(impossible_message="fits", impossible_needs_gb=None)
    except memory.DoesNotFit as err:
        m["impossible_message"] = str(err)
        m["impossible_needs_gb"] = round(err.cheapest.total / GB, 2)
        ctx.text(f"**{cfg.impossible_model} @ {cfg.impossible_gpu_gb:g} GB**：`{err}`")
    print("\n" + m["impossible_message"])
    return m


if __name__ == "__main__":
    labs.run(main, Config, full={"seq_len": 256},
             headline=["est_mb_full", "measured_mb_full", "ratio_full", "est_mb_lora",
                       "measured_mb_lora", "ratio_lora", "est_mb_qlora", "measured_mb_qlora",
                       "ratio_qlora", "est_mb_ptuning", "measured_mb_ptuning", "ratio_ptuning",
                       "within_25pct_all", "rec_7b_24gb_512_instruction", "impossible_needs_gb"])
