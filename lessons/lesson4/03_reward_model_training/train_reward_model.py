# %% [markdown]
# # L4.03 奖励模型训练与评估
# 奖励模型（RM）给一条 (问题, 回答) 打一个分数，RLHF 的 PPO 阶段就靠这个分数学习。本实验回答：
# 1. 偏好数据干净吗？逐条校验（缺字段、空 prompt、chosen 与 rejected 相同、重复对都会带着 文件:行号
#    被剔除），并统计**长度偏置**：chosen 比 rejected 长的比例——如果太高，RM 可能只学会“越长越好”。
# 2. 训练后 RM 在**留出**偏好对上的成对准确率（pairwise accuracy）有多高？和“选更长的那个”这个
#    纯长度基线相比呢？
# 3. RM 的分数可信吗？看校准（把 σ(r_c − r_r) 当作“chosen 胜出的概率”，画可靠性图、算 ECE），
#    以及分数与回答长度的相关系数。
#
# 模型结构：在 SFT 模型（这里是打包的 SmolLM2-135M-Instruct）上加一个输出 1 维的线性头（score），
# 读最后一个 token 的隐状态；主体用 LoRA 微调，头全量训练。损失是 Bradley–Terry：
#     L = −log σ( r(x, y_c) − r(x, y_r) )  （外加一个很小的 (r_c + r_r)² 项让分数以 0 为中心）

# %%
from llmtech import labs
from llmtech.data.preference import length_stats, load_pairs, text_of
from llmtech.train.lora import LoraSettings
from llmtech.train.reward import (RewardScorer, RewardSettings, evaluate_pairs, reliability, run_reward,
                                  score_pairs)


class Config(labs.LabConfig):
    train_file: str = "data/support/preference.jsonl"
    eval_file: str = "data/support/preference_test.jsonl"
    steps: int = 40
    batch_size: int = 4
    learning_rate: float = 3e-4
    lora_r: int = 8
    max_length: int = 192
    bins: int = 5  # 可靠性图的分箱数（留出集只有几十对，分箱不宜多）


def main(cfg: Config, lab: labs.LabContext) -> dict:
    # %% 1. 数据：校验、剔除问题记录、长度偏置统计
    train, test = load_pairs(cfg.train_file), load_pairs(cfg.eval_file)
    lab.table([{"file": d.source, **{k: v for k, v in d.summary().items() if k != "source"}}
               for d in (train, test)], "数据校验（被剔除的记录带 文件:行号 记在日志里）")
    for p in (train.problems + test.problems)[:10]:
        print("  剔除", p)
    bias = {name: length_stats(d.rows) for name, d in (("train", train), ("test", test))}
    lab.table([{"split": k, **v} for k, v in bias.items()], "长度偏置：chosen 更长的比例、平均字符数")
    # 纯长度基线：总是选更长的回答，在留出集上能对多少？
    longer = [len(text_of(r["chosen"])) > len(text_of(r["rejected"])) for r in test.rows]
    length_baseline = sum(longer) / len(longer)

    # %% 2. 训练奖励模型（TRL RewardTrainer；LoRA + 新的 score 头）
    s = RewardSettings(model=cfg.model, train_file=cfg.train_file, eval_file=cfg.eval_file,
                       max_steps=cfg.steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                       warmup=0.1, max_length=cfg.max_length, logging_steps=5, save_steps=10**9,
                       lora=LoraSettings(r=cfg.lora_r, alpha=2 * cfg.lora_r), seed=cfg.seed,
                       output_dir=str(lab.path("rm")))
    res = run_reward(s)
    lab.table([{"metric": k, "before": res[f"eval_{k}_before"], "after": res[f"eval_{k}"]}
               for k in ("pairwise_accuracy", "mean_margin", "ece", "brier", "reward_length_corr")],
              f"留出偏好对（{len(test.rows)} 对）：训练前（随机初始化的头）vs 训练后")

    # %% 3. 从磁盘重新加载合并后的 RM（PPO 用的就是它），再评估一次：结果应与训练中的模型一致
    scorer = RewardScorer.load(res["merged_dir"], max_length=cfg.max_length)
    ev = evaluate_pairs(scorer, test.rows)
    lab.table(reliability(ev["margins"], cfg.bins), "可靠性图数据：预测概率 vs 实际胜率")
    by_reason = {}
    for r, m in zip(test.rows, ev["margins"].tolist()):
        by_reason.setdefault(r["meta"].get("reject_reason", "?"), []).append(m > 0)
    lab.table([{"reject_reason": k, "pairs": len(v), "accuracy": sum(v) / len(v)}
               for k, v in sorted(by_reason.items())], "按 rejected 的缺陷类型分组的准确率")

    # %% 4. 图：可靠性图 + 分数与长度的散点
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rc, rr = score_pairs(scorer, test.rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    rel = reliability(ev["margins"], cfg.bins)  # 每对按两种顺序各算一次：(p, 胜) 与 (1−p, 负)
    axes[0].plot([0, 1], [0, 1], "k--", lw=1)
    axes[0].plot([r["mean_p"] for r in rel], [r["win_rate"] for r in rel], "o-")
    axes[0].set_xlabel("predicted P(chosen wins)")
    axes[0].set_ylabel("observed win rate")
    axes[0].set_title(f"reliability (ECE={ev['ece']:.3f})")
    axes[1].scatter([len(text_of(r["chosen"])) for r in test.rows], rc, s=12, label="chosen")
    axes[1].scatter([len(text_of(r["rejected"])) for r in test.rows], rr, s=12, label="rejected")
    axes[1].set_xlabel("response length (chars)")
    axes[1].set_ylabel("reward")
    axes[1].set_title(f"reward vs length (r={ev['reward_length_corr']:.2f})")
    axes[1].legend()
    fig.tight_layout()
    lab.figure(fig, "reward_model.png", "可靠性图与分数-长度散点")

    return {"train_pairs": len(train.rows), "eval_pairs": len(test.rows),
            "skipped_records": len(train.problems) + len(test.problems),
            "dropped_over_max_length": res["data"]["train"]["dropped_over_max_length"],
            "chosen_longer_share_train": bias["train"]["chosen_longer_share"],
            "length_baseline_accuracy": length_baseline,
            "pairwise_accuracy_before": res["eval_pairwise_accuracy_before"],
            "pairwise_accuracy": ev["pairwise_accuracy"],
            "beats_length_baseline": ev["pairwise_accuracy"] > length_baseline,
            "reload_matches": abs(ev["pairwise_accuracy"] - res["eval_pairwise_accuracy"]) < 1e-6,
            "mean_margin": ev["mean_margin"], "ece": ev["ece"], "brier": ev["brier"],
            "best_temperature": ev["temperature"], "reward_length_corr": ev["reward_length_corr"],
            "train_steps": res["global_step"], "train_runtime_s": res["train_runtime_s"],
            "rm_dir": res["merged_dir"]}


if __name__ == "__main__":
    # 完整版：约 3 个 epoch；GPU 上可用 model=ms:Qwen/Qwen2.5-0.5B-Instruct、max_length=512
    labs.run(main, Config, full={"steps": 150},
             headline=["pairwise_accuracy", "length_baseline_accuracy", "ece", "reward_length_corr"])
