# %% [markdown]
# # L1.06 CPU 推理部署：精度 / 量化 / GGUF 对比
# 问题：没有 GPU 时，同一个模型换成 bf16、int8 动态量化或 llama.cpp 的 GGUF(Q4_1)，
# 首 token 延迟、解码速度(tokens/s)、内存各变多少？代价是多少困惑度(ppl)？
# 你将看到：每个变体一行实测数字 + 一张图，以及"在质量损失可接受时最快"的变体。

# %%
from typing import Literal

import matplotlib.pyplot as plt
from pydantic import field_validator

from llmtech import compress, labs
from llmtech.evals import speed

MB = 1024 * 1024


class Config(labs.LabConfig):
    variants: list[str] = ["fp32", "bf16", "int8", "gguf"]  # fp32 是基线，必须在内
    prompts: int = 2               # 计时用的提示条数（quick 模式少一些）
    max_new_tokens: int = 32       # 每条固定生成的 token 数（忽略 EOS，保证各变体公平）
    warmup: int = 1                # 不计时的预热轮数：新形状首次调用要分配内存、JIT 生成 kernel
    ppl_glob: str = "data/support/kb/*_en.md"  # 困惑度评测文本（不存在时用内置英文段落）
    ppl_window: int = 256
    ppl_max_tokens: int | None = 768  # None = 全部文本
    # auto: 装了 torchao 用 torchao（按 token 量化激活），否则 torch.ao（已弃用但仍可用）
    int8_backend: Literal["auto", "torchao", "torch.ao"] = "auto"
    int8_skip: list[str] = list(compress.INT8_SKIP)  # 保持浮点的 Linear（见第 2 节注释）
    int8_per_channel: bool = False  # True: 每个输出通道一个权重缩放因子
    max_ppl_increase: float = 0.10  # "可接受"的质量损失：ppl 最多比 fp32 高 10%

    @field_validator("variants")
    @classmethod
    def _known(cls, v):
        bad = [x for x in v if x not in compress.VARIANTS]
        if bad or "fp32" not in v:
            raise ValueError(f"variants must include fp32 and come from {compress.VARIANTS}")
        return ["fp32"] + [x for x in v if x != "fp32"]


def main(cfg: Config, ctx: labs.LabContext) -> dict:
    # %% 1. 数据：计时提示 + 固定的困惑度文本（所有变体用完全相同的 token 窗口）
    prompts = speed.DEFAULT_PROMPTS[: cfg.prompts]
    int8_backend = compress.quantize.int8_backend(cfg.int8_backend)  # 缺 torchao 时立即报错
    texts, source = compress.eval_texts(str(labs.ROOT / cfg.ppl_glob))
    ctx.text(f"困惑度文本：{source}；窗口 {cfg.ppl_window} tokens，"
             f"共取 {cfg.ppl_max_tokens or '全部'} tokens。")

    # %% 2. 逐个变体：构建 → 测速度/内存 → 测困惑度
    # fp32：训练时的原始精度，每个参数 4 字节。CPU 解码是"内存带宽受限"——每生成一个 token
    #       都要把全部权重从内存读一遍，所以字节数越少，通常越快。
    # bf16：每个参数 2 字节，指数位与 fp32 相同（不易溢出），尾数只有 8 位（精度略降）。
    #       本机 CPU 支持 AVX-512 BF16，矩阵乘可直接用 bf16 指令；不支持的 CPU 反而会变慢。
    # int8（动态量化）：Linear 权重离线量化成 int8（默认每层一个缩放因子），激活在每次调用时
    #       按当前数值范围临时量化成 8 bit，再用 int8 GEMM 计算；这些权重字节约为 fp32 的 1/4。
    #       词嵌入与共享它的 lm_head 保持 fp32（量化它不省字节，且直接影响每个 token 的 logits）；
    #       down_proj 也保持 fp32：它的输入里有少数极大的"巨量激活"，整个输入共用一个缩放因子时
    #       其余数值几乎都被量化成 0（试试 int8_skip=[lm_head]，ppl 约变成 4 倍）。
    #       注意 ppl 是整段窗口一次前向算的（像 prefill），整段共用一个激活缩放因子；
    #       逐 token 解码时每步只有一个 token，误差比 ppl 显示的小。
    # GGUF(Q4_1)：llama.cpp 的 4 bit 分组量化（每 32 个权重一组，带缩放和偏移），加上手写的
    #       C/SIMD kernel 与更小的框架开销——通常是 CPU 上最快、最省内存的方案。
    speed.warm_runtime()  # 首次 generate 要导入模块、建线程池：这些一次性开销不记在 fp32 头上
    rows, replies, m = [], [], {}
    for name in cfg.variants:
        speed.release_memory()
        base = speed.rss_bytes()
        try:
            dep = compress.build_variant(name, cfg.model, int8=int8_backend,
                                         int8_skip=cfg.int8_skip,
                                         int8_per_channel=cfg.int8_per_channel, seed=cfg.seed)
        except compress.GGUFUnavailable as e:
            rows.append({"variant": name, "backend": f"不可用：{e}"})
            m[f"{name}_status"] = str(e)
            continue
        res = speed.measure_generation(dep.model, dep.tokenizer, prompts, cfg.max_new_tokens,
                                       warmup=cfg.warmup)
        resident_mb = (speed.rss_bytes() - base) / MB  # 跑过生成后，权重页都已载入
        ppl = compress.perplexity(dep.model, dep.tokenizer, texts, cfg.ppl_window,
                                  cfg.ppl_max_tokens)
        m.update({f"{name}_tokens_per_s": res.decode_tokens_per_s,
                  f"{name}_total_tokens_per_s": res.total_tokens_per_s,
                  f"{name}_first_token_ms": res.first_token_ms,
                  f"{name}_model_mb": dep.nbytes() / MB,
                  f"{name}_rss_mb": resident_mb,  # 常驻内存增量（相对加载前）
                  f"{name}_peak_mb": (res.peak_rss_mb * MB - base) / MB,  # 生成时峰值增量
                  f"{name}_ppl": ppl, f"{name}_ppl_rel": ppl / m.get("fp32_ppl", ppl),
                  f"{name}_other_cpu_pct": res.other_cpu_pct})  # 计时期间别的进程占用的 CPU
        rows.append({"variant": name, "backend": dep.backend,
                     "首token ms": res.first_token_ms, "解码 tok/s": res.decode_tokens_per_s,
                     "模型 MB": m[f"{name}_model_mb"], "常驻 MB": resident_mb,
                     "峰值 MB": m[f"{name}_peak_mb"], "ppl": ppl,
                     "ppl/fp32": m[f"{name}_ppl_rel"], "他人占CPU%": res.other_cpu_pct})
        replies.append({"variant": name, "回复(第1条提示)": res.texts[0][:100]})
        if name == "int8":
            m["int8_backend"] = dep.backend
        dep.close()
        del dep, res

    # %% 3. 结果：表格 + 图，选出"质量损失可接受时最快"的变体
    done = [r["variant"] for r in rows if "ppl" in r]
    ok = [v for v in done if m[f"{v}_ppl_rel"] <= 1 + cfg.max_ppl_increase]
    best = max(ok, key=lambda v: m[f"{v}_tokens_per_s"])
    m.update(gguf_available="gguf" in done, best_variant=best,
             best_speedup=m[f"{best}_tokens_per_s"] / m["fp32_tokens_per_s"],
             best_ppl_rel=m[f"{best}_ppl_rel"],
             prompts=len(prompts), max_new_tokens=cfg.max_new_tokens,
             threads=speed.threads())
    ctx.table(rows, f"CPU 部署变体对比（{speed.threads()} 线程，{len(prompts)} 条提示 × "
                    f"{cfg.max_new_tokens} token，贪心解码）")
    ctx.text("「他人占CPU%」是计时期间别的进程占用的 CPU 比例：超过约 10% 时，"
             "那一行的速度偏低、不可比，请在空闲时重跑。")
    ctx.table(replies, f"同一提示「{prompts[0]}」下各变体的回复（肉眼看质量）")
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    for a, key, label in zip(ax, ["tokens_per_s", "ppl", "model_mb"],
                             ["decode tokens/s", "perplexity", "model MB"]):
        a.bar(done, [m[f"{v}_{key}"] for v in done], color="tab:blue")
        a.set_title(label)
    ax[1].axhline(m["fp32_ppl"] * (1 + cfg.max_ppl_increase), color="red", ls="--",
                  label=f"fp32 +{cfg.max_ppl_increase:.0%}")
    ax[1].legend()
    ctx.figure(fig, "cpu_variants.png", "各变体的解码速度、困惑度与模型字节")
    return m


if __name__ == "__main__":
    labs.run(main, Config,
             full={"prompts": 6, "max_new_tokens": 64, "ppl_max_tokens": None},
             headline=["fp32_tokens_per_s", "best_variant", "best_speedup", "best_ppl_rel",
                       "gguf_available"])
