# %% [markdown]
# # L3.03 训练加速技巧实测
# 问题：SDPA 注意力、梯度检查点、bf16 混合精度、packing、torch.compile、FlashAttention-2，
# 在这台机器上各自让训练快多少、省多少内存？叠加起来呢？损失曲线会不会因此改变？
# 做法：同一个短 SFT 训练（内置 135M 模型 + LoRA，真实客服数据，同一随机种子、同一数据顺序）
# 每个"分支"只改一个开关；基线 = fp32 + eager 注意力 + 不检查点 + padding + 不编译。
# 你将看到：每个分支的稳态吞吐（每秒真实 token，不含 padding）、峰值内存（相对基线），
# 逐步损失与基线的差距；两个组合："最快"（bf16+SDPA+packing）和"最省"（再加检查点）。

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from pydantic import Field, field_validator

from llmtech import labs, models
from llmtech.errors import ConfigError, LlmtechError
from llmtech.train import accel
from llmtech.train.sft import native_bf16

HEADLINE = ["speedup_bf16", "speedup_packing", "speedup_sdpa", "memory_ratio_checkpointing",
            "speedup_checkpointing", "speedup_combined", "memory_ratio_leanest",
            "speedup_leanest", "loss_max_rel_diff_bf16", "loss_max_rel_diff_sdpa",
            "loss_max_rel_diff_checkpointing", "heldout_rel_diff_packing",
            "heldout_rel_diff_fastest", "losses_agree_all", "status_compile",
            "status_flash_attention_2"]
COMBO = {"fastest": "只挑提速的技巧，收益相乘（不完全相乘：都在抢同样的两个核）。",
         "leanest": "在最快组合上再加检查点：用一部分速度换最低的内存。"}
# 每个技巧：(做了什么、为什么有效, 什么情况下没效果)
WHY = {
    "sdpa": ("把 softmax(QKᵀ/√d)·V 融合成一个算子（scaled_dot_product_attention），不把 B×H×L×L 的"
             "分数矩阵写回内存再读出来：省的是内存带宽和这块激活。",
             "序列只有一两百 token 时分数矩阵很小，注意力只占每层计算的一小部分（大头是 MLP 与 LoRA 的"
             "矩阵乘），CPU 上的融合内核也没有 GPU 片上 SRAM 分块那样的带宽优势，所以看不出差别；"
             "序列越长收益越大。"),
    "checkpointing": ("前向时每层只保存输入，反向时把该层前向重算一遍再求梯度：激活内存从"
                      "\"层数 × 每层全部中间结果\"降到\"层数 × 一份隐藏状态 + 一层的中间结果\"。",
                      "代价是每步多一次前向（约占一步计算的 1/3），变慢是预期之中：它用时间换内存，"
                      "放不下更大的 batch 或更长的序列时才用。"),
    "bf16": ("autocast 让矩阵乘以 bf16 运行（权重主副本仍是 fp32）：每个数 2 字节，搬运的字节减半；"
             "有 AVX-512 BF16 / AMX 指令的 CPU（及 GPU 的 Tensor Core）上 bf16 乘加吞吐是 fp32 的两倍以上。"
             "矩阵乘的输出（也是为反向保存的激活）是 bf16，内存略降；权重仍是 fp32，不会减半。"
             "bf16 只有 8 位有效位，损失会有微小差别。",
             "没有原生 bf16 指令的硬件要靠软件模拟，反而更慢；模型太小时矩阵乘占比低，收益也小。"),
    "packing": ("把多条短样本首尾相接拼进一行，不再补 padding：算力只花在真实 token 上。position_ids "
                "在每条样本开头归零，注意力掩码是块对角的，样本之间互不可见。",
                "样本长度接近时 padding 很少，packing 就没什么可省的。"),
    "compile": ("torch.compile 把一个个小算子追踪成图，由 Inductor 生成融合内核：少读写中间结果、"
                "少 Python 调度开销。",
                "第一次要追踪、生成并编译内核：2 核 CPU 上 30 层模型的前向+反向要几分钟，批形状一变"
                "（padding 到批内最长）还会再编译一次。训练足够长、编译开销能摊薄时才划算。"),
    "flash_attention_2": ("FlashAttention-2 在 GPU 片上 SRAM 里分块计算注意力，从不把 L×L 分数矩阵写到"
                          "显存：注意力显存从 O(L²) 降到 O(L)，长序列时也快得多；需要 fp16/bf16。",
                          "它只有 CUDA 内核：没有 CUDA GPU + flash-attn 包时只能给出状态，不能给数字。"),
}


class Config(labs.LabConfig):
    arms: list[str] = accel.DEFAULT_ARMS  # 预设名、单个技巧，或用 + 连接的组合（如 bf16+packing）
    train_file: str = "data/support/sft_train.jsonl"
    eval_file: str = "data/support/sft_test.jsonl"  # 留出集：训练后在上面算损失
    max_eval_samples: int = Field(8, ge=1)
    batch_size: int = Field(4, ge=1)
    max_length: int = Field(256, ge=8)
    steps: int = Field(5, ge=2)    # 前 memory_steps 步量内存（含预热/编译），之后的步才计时
    memory_steps: int = Field(2, ge=1)  # 第 2 步是稳态：优化器状态在第 1 步的 step() 里才分配
    learning_rate: float = Field(2e-4, gt=0)
    # True：每个分支一个新进程，内存最干净（每个多花 10 s 左右的启动）；False：同一进程里逐个测，
    # 每个分支重置高水位，但前面分支留下的堆碎片、内核缓存会让读数偏离新进程的读数（本机见过 10% 上下）
    isolate: bool = False
    compile_timeout_s: float = Field(30, gt=0)  # torch.compile 分支（新进程 + 空编译缓存）的时限
    tolerance: float = Field(0.05, gt=0)        # 损失一致的标准：平均相对差 ≤ 5%

    @field_validator("arms")
    @classmethod
    def _arms(cls, v):
        for arm in v:
            try:
                accel.parse_arm(arm)  # 未知技巧名 -> ConfigError，报出名字
            except ConfigError as e:
                raise ConfigError(f"arms: {e}") from None
        return ["baseline", *[a for a in v if a != "baseline"]]  # 一切都和基线比


def main(cfg: Config, ctx: labs.LabContext) -> dict:
    # %% 1. 机器：bf16 是否"原生"决定了它快不快（AVX-512 BF16 / AMX 指令，或 GPU 的 Tensor Core）
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text().split() if cpuinfo.exists() and not torch.cuda.is_available() else []
    hw = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
          "threads": torch.get_num_threads(), "native_bf16": native_bf16(),
          **{f: f in flags for f in ("avx512_bf16", "amx_bf16", "amx_tile")}}
    ctx.table([hw], title="硬件")
    s = accel.AccelSettings(model=cfg.model, train_file=cfg.train_file, eval_file=cfg.eval_file,
                            max_eval_samples=cfg.max_eval_samples, batch_size=cfg.batch_size,
                            max_length=cfg.max_length, steps=cfg.steps,
                            memory_steps=cfg.memory_steps, learning_rate=cfg.learning_rate,
                            seed=cfg.seed)

    # %% 2. 数据：样本长短不一，padding 到批内最长 = 白算的 token；packing 把几条样本拼成一行、
    # 不留空位（position_ids 在每条样本开头归零，注意力不会跨样本）。packing 的一步取约
    # batch_size × 平均长度个 token，和 padding 的一步所含真实 token 相当，两边可比。
    tok = models.load_tokenizer(cfg.model)
    lengths = accel.example_lengths(s, tok)
    pack_len = accel.pack_length_for(s, tok)
    ctx.text(f"训练样本 {len(lengths)} 条，长度 {min(lengths)}–{max(lengths)} token，平均 "
             f"{sum(lengths) / len(lengths):.0f}；padding 分支每步 {cfg.batch_size} 行，"
             f"packing 分支每步 1 行 × {pack_len} token。")

    # %% 3. 逐个分支实测。先用 tiny 模型把一次性开销（线程池、内存池、内核缓存）付掉。
    # 峰值内存 = 加载模型 + 前 memory_steps 步里 RSS 高水位 − 加载前的 RSS（每个分支重置高水位，
    # 这段时间让 glibc 立即归还释放的内存，RSS 才跟得上真实张量；这样做有缺页开销，所以不计时）；
    # 速度 = 之后各步"真实 token / 用时"的中位数（中位数不怕被同机其他进程偶尔拖慢的一步）。
    accel.warm_up()
    results = []
    for arm in cfg.arms:
        print(f"== 分支 {arm}: {'+'.join(accel.parse_arm(arm)) or '基线'}", flush=True)
        if "compile" in accel.parse_arm(arm):  # 编译可能很久：放进新进程并限时
            r = accel.run_arm_subprocess(arm, s, pack_len, timeout=cfg.compile_timeout_s)
        elif cfg.isolate:
            r = accel.run_arm_subprocess(arm, s, pack_len, timeout=1800)
        else:
            r = accel.run_arm(arm, s, pack_len)
        results.append(r)
        print("   " + "  ".join(f"{k}={v}" for k, v in accel.summary_row(r, results[0]).items()), flush=True)
    base = results[0]
    if not base.ok:
        raise LlmtechError(f"baseline arm {base.status}: {base.note} — nothing to compare with")
    rows = [accel.summary_row(r, base, cfg.tolerance) for r in results]
    ctx.table(rows, title=f"速度与内存（相对基线）；损失一致标准：平均相对差 ≤ {cfg.tolerance:.0%}")
    m = {"pack_length": pack_len, **accel.arm_metrics(results, cfg.tolerance)}
    m["speedup_combined"] = m.get("speedup_fastest")
    m["losses_agree_all"] = all(m[k] for k in m if k.startswith("losses_agree_"))

    # %% 4. 图：左边逐步训练损失（不含 packing 的分支与基线吃的是同一批数据，曲线应重合），
    # 右边速度与内存相对基线的倍数（>1 的速度、<1 的内存才是收益）
    ok = [r for r in results if r.ok]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in ok:
        a1.plot(range(1, len(r.losses) + 1), r.losses, marker="o", label=r.arm,
                linestyle="--" if "packing" in r.tricks else "-")
    a1.set(xlabel="step", ylabel="train loss", title="per-step loss (dashed: packed, other data)")
    a1.legend(fontsize=7)
    xs = range(len(ok))
    a2.bar([x - 0.2 for x in xs], [r.tokens_per_s / base.tokens_per_s for r in ok], 0.4, label="speed-up")
    a2.bar([x + 0.2 for x in xs], [r.peak_mb / base.peak_mb for r in ok], 0.4, label="memory ratio")
    a2.axhline(1, color="k", lw=0.8)
    a2.set_xticks(list(xs), [r.arm for r in ok], rotation=30, fontsize=8)
    a2.set(title="relative to baseline (fp32, eager, padding)")
    a2.legend()
    fig.tight_layout()
    ctx.figure(fig, "acceleration.png", "逐步损失；速度与内存相对基线")

    # %% 5. 检查点为什么省内存：数一数 autograd 为反向保存了多少字节（确定性的，不受系统噪声影响）。
    # 不检查点：每层的中间结果（注意力、MLP 的 3×intermediate 激活……）全部留到反向；
    # 检查点：只留每层的输入，反向时把这一层的前向重算一遍——用约 1/3 的额外计算换内存。
    model, _ = models.load_lm(cfg.model, seed=cfg.seed)
    ids = torch.randint(0, len(tok), (cfg.batch_size, min(cfg.max_length, 128)),
                        generator=torch.Generator().manual_seed(cfg.seed))
    full, ckpt = (accel.saved_activation_bytes(model, ids, c) / accel.MB for c in (False, True))
    m.update(saved_activation_mb=round(full, 1), saved_activation_mb_checkpointing=round(ckpt, 1))
    ctx.text(f"autograd 保存的激活（全参、batch {ids.shape[0]}×{ids.shape[1]}）：不检查点 "
             f"{full:.0f} MB，检查点 {ckpt:.0f} MB（剩下的主要是 logits 与损失的 fp32 张量）。")
    del model

    # %% 6. 读数：每个技巧为什么有效（或为什么在这台机器上没效果），代入实测数字
    lines = []
    for r, row in zip(results[1:], rows[1:]):
        one = r.tricks[0] if len(r.tricks) == 1 else None
        what = WHY[one][0] if one else f"组合 {' + '.join(r.tricks)}：{COMBO.get(r.arm, '收益与代价叠加。')}"
        if r.ok:
            said = (f"实测：速度 ×{row['speedup']}，峰值内存 ×{row['memory']}，"
                    f"{'逐步训练' if row['loss_check'] == 'per-step' else '留出集'}损失相对差 "
                    f"{row['loss_diff']:.2%}（{'一致' if row['agree'] else '超出容差'}）。")
            caveat = one and (one == "checkpointing" or row["speedup"] < 1.05)
        else:
            said, caveat = f"状态 {r.status}：{r.note}。", bool(one)
        lines.append(f"- **{r.arm}**：{what} {said} {WHY[one][1] if caveat else ''}".rstrip())
    ctx.text("### 每个技巧在做什么、为什么有效\n\n" + "\n".join(lines))
    print("\n" + "\n".join(lines))
    for h in HEADLINE:  # 没跑的分支在 metrics.json 里记为 null
        m.setdefault(h, None)
    return m


if __name__ == "__main__":
    labs.run(main, Config, full={"steps": 12, "max_eval_samples": 48, "isolate": True,
                                 "compile_timeout_s": 1200},
             headline=HEADLINE)
