# %% [markdown]
# # L4.04 DPO：从目标函数推导到训练与核对
# 本实验回答三个问题：
# 1. DPO 的损失是怎么来的？下面先一步步推导，再用一个只有 4 个候选回答的小例子数值验证推导中的两个关键等式。
# 2. DPO 有没有用？在**留出**的偏好对上比较 SFT 参考模型与 DPO 策略：偏好准确率（模型自己给 chosen 的
#    每 token 平均对数似然是否高于 rejected；用平均而不用总和，是因为总和天然偏向短回答，而留出集里
#    chosen 多半更长）、隐式奖励的准确率与间隔（margin）。
# 3. β 起什么作用？做一个 β 扫描；并核对 TRL 记录的隐式奖励确实等于 β·(log πθ − log πref)
#    —— 用本项目自己的代码独立重算，逐批比较。
#
# ## 推导
# RLHF 的目标：在奖励 r(x, y) 高的同时，别离参考策略 πref（SFT 模型）太远：
#
#     max_π  E_{x, y~π}[ r(x, y) ]  −  β · KL( π(·|x) ‖ πref(·|x) )
#
# 第 1 步（最优解有闭式）：对每个 x，这是在概率单纯形上最大化 Σ_y π(y)·r(y) − β Σ_y π(y) log(π(y)/πref(y))。
#   用拉格朗日乘子处理 Σ_y π(y) = 1，求导置零得到
#
#     π*(y|x) = πref(y|x) · exp( r(x, y) / β ) / Z(x),   Z(x) = Σ_y πref(y|x) · exp( r(x, y) / β )
#
# 第 2 步（把奖励用策略表示）：两边取对数、移项：
#
#     r(x, y) = β · log( π*(y|x) / πref(y|x) ) + β · log Z(x)
#
#   Z(x) 要对所有回答求和，没法直接算——但它只和 x 有关。
# 第 3 步（Bradley–Terry 偏好模型）：人类偏好 y_c ≻ y_r 的概率 P = σ( r(x, y_c) − r(x, y_r) )。
#   把第 2 步代入，两个 β·log Z(x) 相减抵消：
#
#     P(y_c ≻ y_r | x) = σ( β·log(π*(y_c|x)/πref(y_c|x)) − β·log(π*(y_r|x)/πref(y_r|x)) )
#
# 第 4 步（最大似然）：用可训练的 πθ 代替 π*，对偏好数据做最大似然，就是 DPO 的损失：
#
#     L_DPO = − E[ log σ( β·log(πθ(y_c)/πref(y_c)) − β·log(πθ(y_r)/πref(y_r)) ) ]
#
#   其中 r̂(x, y) = β·log(πθ(y|x)/πref(y|x)) 称为“隐式奖励”：不需要单独训练奖励模型，也不需要在训练中采样。
#   IPO 把 −log σ(·) 换成 (长度平均的对数比间隔 − 1/(2β))²，hinge 换成 max(0, 1 − β·间隔)，都可用 loss_type 切换。

# %%
import math

import torch

from llmtech import labs
from llmtech.errors import ConfigError
from llmtech.train.callbacks import read_log
from llmtech.train.dpo import DPOSettings, preference_eval, run_dpo
from llmtech.train.lora import LoraSettings


class Config(labs.LabConfig):
    train_file: str = "data/support/preference.jsonl"
    eval_file: str = "data/support/preference_test.jsonl"
    max_eval_samples: int | None = 40
    loss_type: str = "sigmoid"
    betas: list[float] = [0.1, 0.5]  # β 扫描；main_beta 那一次就是主实验（完整版扫 6 个值）
    main_beta: float = 0.1
    steps: int = 20
    batch_size: int = 4
    learning_rate: float = 5e-4
    lora_r: int = 8
    max_length: int = 192
    sft_weight: float = 0.0
    check_tol: float = 2e-3  # TRL 记录值与独立重算值允许的最大差（float32 累加误差量级）


def toy_check(beta: float) -> dict:
    """在 4 个候选回答上验证第 1、2、3 步：π* 的闭式解、奖励的重参数化、Z(x) 在偏好概率中抵消。"""
    torch.manual_seed(0)
    ref = torch.softmax(torch.randn(4, dtype=torch.float64), 0)
    r = torch.randn(4, dtype=torch.float64)
    Z = (ref * torch.exp(r / beta)).sum()
    pi_star = ref * torch.exp(r / beta) / Z
    # 第 1 步：π* 确实是 E[r] − β·KL 的最大值点：随机扰动后的分布目标值都更低
    def objective(p):
        return float((p * r).sum() - beta * (p * (p / ref).log()).sum())
    best = objective(pi_star)
    perturbed = max(objective(torch.softmax((pi_star.log() + 0.3 * torch.randn(4, dtype=torch.float64)), 0))
                    for _ in range(200))
    # 第 2 步：r = β·log(π*/πref) + β·log Z
    recon = beta * (pi_star / ref).log() + beta * Z.log()
    # 第 3 步：用隐式奖励算出的偏好概率与用真实奖励算出的相同（Z 抵消）
    implicit = beta * (pi_star / ref).log()
    p_true = torch.sigmoid(r[0] - r[1])
    p_implicit = torch.sigmoid(implicit[0] - implicit[1])
    return {"toy_optimum_beats_perturbed": best > perturbed,
            "toy_reward_reconstruction_err": float((recon - r).abs().max()),
            "toy_bt_prob_err": float((p_true - p_implicit).abs())}


def batch_means(x: torch.Tensor, batch: int) -> torch.Tensor:
    """TRL 的评估日志是“每批均值的平均”，独立重算时按同样的批次切分。"""
    return torch.stack([x[i:i + batch].mean() for i in range(0, len(x), batch)]).mean()


def main(cfg: Config, lab: labs.LabContext) -> dict:
    if cfg.main_beta not in cfg.betas:
        raise ConfigError(f"main_beta={cfg.main_beta} must be one of betas={cfg.betas}")
    # %% 1. 先在玩具例子上数值验证推导
    toy = toy_check(cfg.main_beta)
    lab.table([{"check": k, "value": v} for k, v in toy.items()], "推导的数值验证（4 个候选回答）")

    # %% 2. β 扫描：每个 β 从同一个 SFT 模型出发，用同样的数据和步数训练一个 LoRA 适配器
    #     （打包的 SmolLM2-135M-Instruct 本身就是 SFT 模型；参考策略 = 关掉适配器的同一个模型）
    rows, logs, main_res = [], {}, None
    for beta in cfg.betas:
        s = DPOSettings(model=cfg.model, train_file=cfg.train_file, eval_file=cfg.eval_file,
                        max_eval_samples=cfg.max_eval_samples, loss_type=cfg.loss_type, beta=beta,
                        sft_weight=cfg.sft_weight, max_steps=cfg.steps, batch_size=cfg.batch_size,
                        learning_rate=cfg.learning_rate, warmup=0.1, max_length=cfg.max_length,
                        lora=LoraSettings(r=cfg.lora_r, alpha=2 * cfg.lora_r), logging_steps=2,
                        save_steps=10**9, seed=cfg.seed, output_dir=str(lab.path(f"dpo_beta{beta:g}")))
        res = run_dpo(s)
        logs[beta] = read_log(lab.path(f"dpo_beta{beta:g}") / "trainer_log.jsonl")
        rows.append({"beta": beta, "pref_acc_ref": res["eval_preference_accuracy_per_token_before"],
                     "pref_acc_dpo": res["eval_preference_accuracy_per_token"],
                     "sum_logp_acc_ref": res["eval_preference_accuracy_before"],
                     "sum_logp_acc_dpo": res["eval_preference_accuracy"],
                     "reward_acc": res["eval_reward_accuracy"], "reward_margin": res["eval_reward_margin"],
                     "logp_chosen_shift": res["eval_logp_chosen"] - res["eval_logp_chosen_before"],
                     "logp_rejected_shift": res["eval_logp_rejected"] - res["eval_logp_rejected_before"],
                     "train_s": res["train_runtime_s"]})
        if beta == cfg.main_beta:
            main_res = res
        else:
            del res["trainer"]
    lab.table(rows, f"留出偏好对（{main_res['eval_pairs']} 对）：β 扫描")

    # %% 3. 核对：TRL 在评估时记录的隐式奖励 = β·(log πθ − log πref)，用本项目的代码独立重算
    trainer = main_res["trainer"]
    logged = trainer.evaluate()
    ours = preference_eval(trainer.model, trainer.processing_class, trainer.llmtech_data["eval"],
                           cfg.main_beta, cfg.max_length)
    bs = trainer.args.per_device_eval_batch_size
    check = {"chosen": (logged["eval_rewards/chosen"], float(batch_means(ours["rewards_chosen"], bs))),
             "rejected": (logged["eval_rewards/rejected"], float(batch_means(ours["rewards_rejected"], bs)))}
    lab.table([{"reward": k, "TRL_logged": a, "recomputed": b, "abs_diff": abs(a - b)}
               for k, (a, b) in check.items()], "隐式奖励核对（主实验 β）")
    max_diff = max(abs(a - b) for a, b in check.values())

    # %% 4. 曲线：每个 β 训练过程中的奖励间隔（rewards/margins）与准确率
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for beta, log in logs.items():
        pts = [(r["step"], r["rewards/margins"], r["rewards/accuracies"]) for r in log if "rewards/margins" in r]
        if pts:
            steps, margins, accs = zip(*pts)
            axes[0].plot(steps, margins, label=f"β={beta:g}")
            axes[1].plot(steps, accs, label=f"β={beta:g}")
    axes[0].set_title("train rewards/margins")
    axes[1].set_title("train rewards/accuracies")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    lab.figure(fig, "dpo_beta_sweep.png", "β 扫描：训练中的隐式奖励间隔与准确率")

    main_row = next(r for r in rows if r["beta"] == cfg.main_beta)
    out = {**toy, "eval_pairs": main_res["eval_pairs"], "beta": cfg.main_beta, "loss_type": cfg.loss_type,
           "train_steps": main_res["global_step"], "train_loss": main_res["train_loss"],
           "pref_acc_sft": main_row["pref_acc_ref"], "pref_acc_dpo": main_row["pref_acc_dpo"],
           "dpo_raises_pref_acc": main_row["pref_acc_dpo"] > main_row["pref_acc_ref"],
           "reward_accuracy": main_row["reward_acc"], "reward_margin": main_row["reward_margin"],
           "implicit_reward_max_abs_diff": max_diff, "implicit_reward_check": max_diff <= cfg.check_tol}
    for r in rows:
        for k in ("pref_acc_dpo", "reward_acc", "reward_margin"):
            out[f"beta{r['beta']:g}_{k}"] = r[k]
    assert all(math.isfinite(v) for v in out.values() if isinstance(v, float)), "non-finite metric"
    return out


if __name__ == "__main__":
    # 完整版：更多步数、全部留出对；有 GPU 时可换 model=ms:Qwen/Qwen2.5-0.5B-Instruct、max_length=512
    labs.run(main, Config, full={"steps": 120, "max_eval_samples": None, "betas": [0.02, 0.05, 0.1, 0.3, 0.5, 1.0]},
             headline=["pref_acc_sft", "pref_acc_dpo", "reward_accuracy", "reward_margin",
                       "implicit_reward_check"])
