# %% [markdown]
# # L1.04 LoRA 参数量与低秩结构可视化
# 本实验回答两个问题：
# 1. LoRA 到底新增多少可训练参数？对每个被适配的线性层 W（d_out×d_in），LoRA 增加
#    A（r×d_in）和 B（d_out×r），参数量为 r·(d_in+d_out)。我们用 PEFT 实际包装模型来数
#    requires_grad 参数，并与公式逐一对照（`count_mismatches` 必须为 0）。
# 2. 训练后学到的增量 ΔW = B·A·α/r 真的是低秩的吗？对 ΔW 与原始权重 W 做 SVD，比较
#    “占 90% 能量所需的奇异值个数”和基于熵的有效秩：ΔW 的秩 ≤ r，远小于满秩 min(d_in, d_out)。

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from llmtech import labs, models
from llmtech.train import lora
from llmtech.train.callbacks import read_log
from llmtech.train.sft import SFTSettings, run_sft

# 四组常见的注入位置（LLaMA 结构的模块名）
TARGET_SETS = {
    "attn_qv": ["q_proj", "v_proj"],                       # LoRA 论文的默认做法
    "attn_all": ["q_proj", "k_proj", "v_proj", "o_proj"],  # 全部注意力投影
    "mlp": ["gate_proj", "up_proj", "down_proj"],          # 只改前馈层
    "all_linear": "all-linear",                            # 除输出头外的全部 Linear（QLoRA 做法）
}


class Config(labs.LabConfig):
    ranks: list[int] = [1, 2, 4, 8, 16, 32, 64]
    train_file: str = "data/support/sft_train.jsonl"
    train_targets: str = "all_linear"  # TARGET_SETS 的键
    train_r: int = 16
    train_alpha: int = 32
    train_steps: int = 30
    learning_rate: float = 5e-4
    batch_size: int = 4
    max_length: int = 192


def main(cfg: Config, lab: labs.LabContext) -> dict:
    # %% 1. 数参数：PEFT 实数 vs 公式 r·(d_in+d_out)
    model, _ = models.load_lm(cfg.model, seed=cfg.seed)
    _, base = models.count_parameters(model)
    counts, mismatches, m = {}, 0, {"base_params": base}
    for name, targets in TARGET_SETS.items():
        expected_layers = lora.target_linears(model, targets)  # 不经 PEFT，按名字规则自己找
        for r in cfg.ranks:
            s = lora.LoraSettings(r=r, alpha=2 * r, target_modules=targets)
            n_peft, peft_layers = lora.peft_count(model, s)  # get_peft_model 后数 requires_grad
            n_formula = lora.analytic_lora_params(expected_layers, r)
            mismatches += int(n_peft != n_formula or set(peft_layers) != set(expected_layers))
            counts[name, r] = n_peft
    table = [{"r": r, **{f"{n} (占基座%)": f"{counts[n, r]:,} ({100 * counts[n, r] / base:.3f}%)"
                         for n in TARGET_SETS}} for r in cfg.ranks]
    lab.table(table, f"LoRA 可训练参数（基座 {base:,} 参数；PEFT 实数 = 公式）")
    for n in TARGET_SETS:
        m[f"params_r8_{n}"] = lora.analytic_lora_params(lora.target_linears(model, TARGET_SETS[n]), 8)
        m[f"pct_r8_{n}"] = round(100 * m[f"params_r8_{n}"] / base, 4)
    m.update(count_mismatches=mismatches, configs_checked=len(counts))
    # LoRA 注入在哪里：all-linear 覆盖全部四组，按模块名模式汇总
    lab.table(lora.injection_table(lora.target_linears(model, "all-linear"), 8), "LoRA 注入位置（r=8）")

    fig, ax = plt.subplots(figsize=(6, 4))
    for n in TARGET_SETS:
        ax.plot(cfg.ranks, [counts[n, r] for r in cfg.ranks], "o-", label=n)
    ax.axhline(base, ls="--", c="gray", label="full model")
    ax.set(xscale="log", yscale="log", xlabel="rank r", ylabel="trainable params",
           title="LoRA parameters vs rank")
    ax.legend()
    lab.figure(fig, "params_vs_rank.png", "LoRA 参数量随秩增长（对数坐标）")

    # %% 2. 真实训练一小段 LoRA（客服数据），得到学到的 ΔW
    s = SFTSettings(model=cfg.model, train_file=cfg.train_file, eval_file=None, seed=cfg.seed,
                    output_dir=str(lab.path("sft")), max_steps=cfg.train_steps,
                    learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, max_length=cfg.max_length, logging_steps=5,
                    save_steps=10**9, save_final=False, eval_before=False,
                    lora=lora.LoraSettings(r=cfg.train_r, alpha=cfg.train_alpha,
                                           target_modules=TARGET_SETS[cfg.train_targets]))
    peft_model = run_sft(s)["trainer"].model
    losses = [x["loss"] for x in read_log(lab.path("sft/trainer_log.jsonl")) if "loss" in x]
    m.update(train_r=cfg.train_r, train_loss_first=losses[0], train_loss_last=losses[-1])

    # %% 3. SVD：ΔW 与原始 W 的奇异值谱
    rows, curves, mods = [], {}, dict(peft_model.named_modules())
    for name, (d_in, d_out) in lora.adapted_linears(peft_model).items():
        dw = lora.delta_weight(peft_model, name).float().cpu()
        w = mods[name].base_layer.weight.detach().float().cpu()
        sv_dw, sv_w = torch.linalg.svdvals(dw), torch.linalg.svdvals(w)
        st_dw, st_w = lora.rank_stats(sv_dw, dw.shape), lora.rank_stats(sv_w, w.shape)
        short = name.split("layers.")[-1]
        rows.append({"layer": short, "shape": f"{d_out}x{d_in}", "full_rank": min(d_in, d_out),
                     "dW_rank": st_dw["numerical_rank"], "dW_rank90": st_dw["rank_energy"],
                     "dW_eff_rank": round(st_dw["effective_rank"], 2),
                     "W_rank90": st_w["rank_energy"], "W_eff_rank": round(st_w["effective_rank"], 1)})
        curves[short] = (sv_dw, sv_w)
    n_layers = peft_model.config.num_hidden_layers
    picks = [f"{i}.{p}" for i in (0, n_layers // 2, n_layers - 1)
             for p in ("self_attn.q_proj", "mlp.down_proj")]
    lab.table([r for r in rows if r["layer"] in picks], f"ΔW vs W 的秩（训练 r={cfg.train_r}，节选）")

    def mean(key):
        return round(sum(r[key] for r in rows) / len(rows), 3)

    m.update(layers_analyzed=len(rows), delta_w_max_rank=max(r["dW_rank"] for r in rows),
             delta_w_rank90_mean=mean("dW_rank90"), delta_w_eff_rank_mean=mean("dW_eff_rank"),
             w_rank90_mean=mean("W_rank90"), w_eff_rank_mean=mean("W_eff_rank"),
             full_rank_mean=mean("full_rank"))

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for k in [p for p in picks if p in curves]:
        sv_dw, sv_w = curves[k]
        n = min(2 * cfg.train_r, len(sv_dw))
        (line,) = a1.semilogy(range(1, n + 1), (sv_dw / sv_dw[0])[:n], ".-", label=k)
        for sv, ls in ((sv_dw, "-"), (sv_w, "--")):  # 同一层同一颜色
            a2.plot(range(1, len(sv) + 1), (sv ** 2).cumsum(0) / (sv ** 2).sum(), ls, c=line.get_color())
    a1.axvline(cfg.train_r, c="gray", ls=":")
    a1.set(xlabel="index i", ylabel="sigma_i / sigma_1", title=f"learned dW spectrum (r={cfg.train_r})")
    a1.legend(fontsize=7)
    a2.axhline(0.9, c="gray", ls=":")
    a2.set(xscale="log", xlabel="k", ylabel="energy in top-k",
           title="cumulative energy: dW (solid) vs W (dashed)")
    lab.figure(fig, "svd_spectra.png", "ΔW 与 W 的奇异值谱")
    return m


if __name__ == "__main__":
    labs.run(main, Config, full={"train_steps": 120, "ranks": [1, 2, 4, 8, 16, 32, 64, 128, 256]},
             headline=["count_mismatches", "pct_r8_all_linear", "delta_w_max_rank",
                       "delta_w_rank90_mean", "w_rank90_mean", "train_loss_first", "train_loss_last"])
