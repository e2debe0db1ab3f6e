# %% [markdown]
# # L2.01 QLoRA 理论：NF4、双重量化、分页优化器
# 问题：QLoRA 用哪几招把大模型微调塞进一张卡？每一招省多少字节、代价多大？逐个实测：
# (1) 按论文定义（正态分位数）算出的 NF4 码本与 bitsandbytes 内置表差多少；
# (2) 在真实 SmolLM2 全部 Linear 权重上，我们的 NF4 与 bitsandbytes 的 4-bit 码一致率；
# (3) NF4 / FP4 / int4 / int8 的量化误差（SQNR，dB 越高越好）；
# (4) 双重量化省下多少 bit/参数（本模型实测 + 推算 LLaMA-7B）；
# (5) AdamW 与 8-bit / 分页 AdamW 的优化器状态字节；(6) 梯度检查点的峰值内存之比与耗时之比。

# %%
from typing import Literal

import matplotlib.pyplot as plt
import torch
from scipy.stats import norm

from llmtech import compress, labs, models
from llmtech.compress import nf4

MB = 1024 * 1024


class Config(labs.LabConfig):
    # 每块多少个权重共用一个 absmax 缩放（QLoRA 默认 64；只能取 bitsandbytes 支持的值）
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = 64
    max_tensors: int | None = None   # 只取前 N 个 Linear 权重（None = 全部，约 1.06 亿个）
    opt_batch: int = 2               # 第 5 节：一次真实反向传播的 batch × 序列长度
    opt_seq: int = 128
    ckpt_batch: int = 4              # 第 6 节：梯度检查点对比用的同一个 batch
    ckpt_seq: int = 256
    ckpt_repeats: int = 1            # 计时重复次数（取中位数）；另有 1 次不计时的预热
    device: Literal["auto", "cpu", "cuda"] = "auto"  # 第 5、6 节的设备（auto：有 GPU 就用）
    text_glob: str = "data/support/kb/*_en.md"       # 训练步用的真实文本


def main(cfg: Config, ctx: labs.LabContext) -> dict:
    # %% 1. NF4 码本：N(0,1) 的 8 个正分位数 + 7 个负分位数 + 精确的 0，再除以最大值。
    #    最外侧概率 offset = (1-1/30 + 1-1/32)/2：ppf(1) 是无穷大，只能取略小于 1 的概率
    ours, bnb_table = nf4.nf4_codebook(), nf4.bnb_codebook("nf4")
    fp4, int4 = nf4.fp4_codebook(), nf4.int4_codebook()
    m = {"nf4_offset": nf4.nf4_offset(),
         "nf4_codebook_max_abs_diff_vs_bnb": float((ours - bnb_table).abs().max())}
    ctx.table([{"码": i, "NF4(定义)": float(ours[i]), "NF4(bnb)": float(bnb_table[i]),
                "FP4(bnb)": float(fp4[i]), "int4": float(int4[i]) if i < 15 else "-"}
               for i in range(16)], "16 个 4-bit 量化级（升序，归一化到 [-1,1]）")
    model, tok = models.load_lm(cfg.model, seed=cfg.seed)
    weights = nf4.linear_weights(model, limit=cfg.max_tensors)
    sample = nf4.block_normalised(list(weights.values())[len(weights) // 2], cfg.blocksize)
    fig, ax = plt.subplots(1, 2, figsize=(12, 3.6))
    xs, edge = torch.linspace(-3, 3, 301), norm.ppf(m["nf4_offset"])
    ax[0].plot(xs, norm.pdf(xs), color="gray")
    ax[0].vlines(ours * edge, 0, norm.pdf(ours * edge), color="tab:blue")
    ax[0].set_title("NF4 levels (in σ units) = quantiles of N(0,1)")
    ax[1].hist(sample.numpy(), bins=120, density=True, color="lightgray")
    ax[1].set_title("real weights / block absmax, and the 4-bit levels")
    for y, (name, c) in zip((1.6, 1.3, 1.0), [("NF4", ours), ("FP4", fp4), ("int4", int4)]):
        ax[1].plot(c, [y] * len(c), "|", ms=14)
        ax[1].text(1.06, y, name, va="center")
    ctx.figure(fig, "nf4_levels.png", "NF4 量化级与正态密度；真实权重（块内归一化后）的分布")

    # %% 2. 同一批真实权重：我们的 NF4 与 bitsandbytes.functional.quantize_4bit 逐个比较
    rows = []
    for key, label, kw in [("nf4_vs_bnb", "NF4(定义码本) vs bnb", {}),
                           ("bnbtable_vs_bnb", "我们的量化器+bnb码本 vs bnb", {"code": bnb_table}),
                           ("nf4dq_vs_bnb", "NF4+双重量化 vs bnb", {"double_quant": True})]:
        r = nf4.bnb_agreement(weights, "nf4", cfg.blocksize, **kw)
        m.update({f"{key}_{k}": v for k, v in r.items() if k not in ("numel", "scales")})
        rows.append({"比较": label, "不同的4-bit码": f"{r['code_mismatches']:,}/{r['numel']:,}",
                     "不同码离中点最远": r["mismatch_max_midpoint_distance"],
                     "反量化最大差(码相同)": r["dequant_max_abs_diff_same_codes"],
                     "反量化最大差(全部)": r["dequant_max_abs_diff"],
                     "不同的8-bit缩放码": f"{r['scale_code_mismatches']:,}/{r['scales']:,}"
                     if "scales" in r else "-"})
    m["quantized_params"] = r["numel"]
    ctx.table(rows, f"{len(weights)} 个 Linear 权重上的一致性")
    ctx.text("不同的 4-bit 码都紧贴两级的中点：两张表第 7 位小数的差别让它们舍入到相邻级（换成 bnb "
             "的表则逐位相同）。8-bit 缩放码偶有不同：bnb 的 CPU 内核不总取最近的级，而我们的从不更远"
             f"（scale_ours_never_farther = {m['nf4dq_vs_bnb_scale_ours_never_farther']}）。")

    # %% 3. 量化误差：同样的块大小，NF4 / FP4 / 均匀 int4 / int8(absmax)，外加 NF4+双重量化
    errs = nf4.error_table(weights, blocksize=cfg.blocksize)
    ctx.table([{"方法": k, **v} for k, v in errs.items()], "反量化误差（SQNR 越高越好）")
    m.update({f"{k}_{name.replace('+', '_')}": v[k] for name, v in errs.items()
              for k in ("sqnr_db", "rel_error", "mse", "bits_per_param")})
    fig, a = plt.subplots(figsize=(7, 3.2))
    a.barh([f"{k} ({v['bits_per_param']:.2f} bit/weight)" for k, v in errs.items()],
           [v["sqnr_db"] for v in errs.values()], color="tab:green")
    a.set(xlabel="SQNR (dB), higher = closer to the fp32 weights")
    ctx.figure(fig, "quant_error.png", "真实权重上各方法的 SQNR 与每个权重的存储位数")

    # %% 4. 双重量化：每 64 个权重一个 fp32 缩放 = 0.5 bit/参数；缩放再量化成 8 bit（每 256 个
    #    缩放一个 fp32，每个张量一个 fp32 均值）≈ 8/64 + 32/(64×256) ≈ 0.127 bit/参数
    sb = nf4.scale_bytes_report(weights, cfg.blocksize)
    n7 = nf4.linear_numels(nf4.llama7b_config())
    plain7 = sum(nf4.scale_storage_bytes(n, cfg.blocksize) for n in n7)
    dq7 = sum(nf4.scale_storage_bytes(n, cfg.blocksize, double_quant=True) for n in n7)
    m.update(double_quant_bits_per_param=sb["bits_per_param_dq"],
             scale_bits_per_param=sb["bits_per_param"], scale_formula_matches=sb["formula_matches"],
             double_quant_bits_per_param_saved=sb["bits_per_param"] - sb["bits_per_param_dq"],
             llama7b_linear_params=sum(n7), llama7b_scale_mb=plain7 / MB,
             llama7b_scale_mb_dq=dq7 / MB, llama7b_double_quant_saved_mb=(plain7 - dq7) / MB)
    b, N = cfg.blocksize, sum(n7)
    ctx.text(f"本模型缩放：{sb['bits_per_param']:.3f} → {sb['bits_per_param_dq']:.3f} bit/参数。"
             f"LLaMA-7B（{len(n7)} 个 Linear，N = {N:,}）：N/{b} × 4 字节 = {plain7 / MB:.1f} MB；"
             f"双重量化 N/{b} × 1 + N/({b}×256) × 4 字节 = {dq7 / MB:.1f} MB，省 "
             f"{(plain7 - dq7) / MB:.1f} MB（4-bit 权重本身 N/2 字节 = {N / 2 / MB:.0f} MB）。")

    # %% 5. 优化器状态：同一份梯度，各做一次真实 step()，数 state 里所有张量的字节。
    #    "分页"：状态放进 CUDA 统一内存，显存吃紧时由驱动按页换出到 CPU 内存、用到时再换回，
    #    长序列带来的显存尖峰不会直接 OOM。纯 CPU 机器上状态本就在内存里，没有可换出的地方。
    dev = nf4.train_device(cfg.device)
    model.to(dev).train()
    texts, _ = compress.eval_texts(str(labs.ROOT / cfg.text_glob))
    ids = nf4.text_batch(tok, texts, cfg.opt_batch, cfg.opt_seq).to(dev)
    model(input_ids=ids, labels=ids).loss.backward()
    res = {r.name: r for r in nf4.measure_optimizers(list(model.parameters()))}
    model.zero_grad(set_to_none=True)
    n_params = sum(p.numel() for p in model.parameters())
    ctx.table([{"优化器": r.name, "状态 MB": r.state_bytes / MB,
                "字节/参数": r.state_bytes / n_params, "step 秒": r.step_s,
                "分页张量数": r.paged_tensors, "状态": r.status} for r in res.values()],
              f"{n_params:,} 个可训练参数（{dev}）上的优化器状态")
    paged = res["bnb.PagedAdamW8bit"]
    m.update({f"{k.replace('.', '_').lower()}_state_bytes": r.state_bytes for k, r in res.items()},
             adamw8bit_state_bytes_ratio=res["torch.AdamW"].state_bytes
             / res["bnb.AdamW8bit"].state_bytes,
             paged_state_tensors=paged.paged_tensors, paged_optimizer_status=paged.paging(dev))

    # %% 6. 梯度检查点：前向只留每层的输入，反向时重算层内激活 —— 用算力换内存
    ids = nf4.text_batch(tok, texts, cfg.ckpt_batch, cfg.ckpt_seq).to(dev)
    off, on = costs = nf4.measure_grad_checkpointing(model, ids, cfg.ckpt_repeats)
    ctx.table([{"梯度检查点": c.checkpointing, "峰值增量 MB": c.peak_bytes / MB,
                "前向+反向 秒": c.step_s, "loss": c.loss} for c in costs],
              f"同一 batch（{cfg.ckpt_batch}×{cfg.ckpt_seq} tokens；两次峰值都含梯度与 logits，"
              "差别来自层内激活）")
    m.update(grad_ckpt_peak_mb_off=off.peak_bytes / MB, grad_ckpt_peak_mb_on=on.peak_bytes / MB,
             grad_ckpt_step_s_off=off.step_s, grad_ckpt_step_s_on=on.step_s,
             grad_ckpt_peak_memory_ratio=on.peak_bytes / off.peak_bytes,
             grad_ckpt_step_time_ratio=on.step_s / off.step_s, train_device=dev)
    return m


if __name__ == "__main__":
    labs.run(main, Config, full={"ckpt_repeats": 3, "ckpt_seq": 512},
             headline=["nf4_codebook_max_abs_diff_vs_bnb", "nf4_vs_bnb_code_mismatches",
                       "nf4_vs_bnb_dequant_max_abs_diff_same_codes",
                       "bnbtable_vs_bnb_dequant_max_abs_diff", "sqnr_db_nf4", "sqnr_db_fp4",
                       "sqnr_db_int4", "sqnr_db_int8", "double_quant_bits_per_param_saved",
                       "adamw8bit_state_bytes_ratio", "paged_optimizer_status",
                       "grad_ckpt_peak_memory_ratio", "grad_ckpt_step_time_ratio"])
