# %% [markdown]
# # L4.01 三种对齐方法对比：RLHF（PPO）vs DPO vs KTO
# 问题：从**同一个 SFT 模型**、用**同一份偏好数据**出发，三种对齐方法各自换来了什么、花了什么？
# 你将看到的数字（都在留出数据上测）：
# 1. 偏好准确率 `pref_acc`：策略自己给 chosen 的每 token 平均对数似然高于 rejected 的比例（SFT 模型也能算，
#    可直接比较；用平均而不用总和，因为总和天然偏向短回答）；`reward_acc`：隐式奖励 β·log(π/π_SFT) 的
#    准确率（SFT 自己按定义是 0.5）；
# 2. RM 胜率 `win_rate_vs_sft`：同一个奖励模型给“该策略的回答”和“SFT 模型的回答”打分，前者更高的比例；
# 3. 离参考模型多远 `kl_to_sft`：在策略自己采样的回答上估计的整句 KL(π‖π_SFT)；
# 4. 代价：训练墙钟时间、训练期间进程内存峰值的增量。
#
# 三种方法的数据需求不同：
# - PPO 需要先训一个奖励模型，训练时在线采样（最贵，但能在任何 prompt 上学习）；
# - DPO 直接用成对偏好（chosen vs rejected），不采样、不需要奖励模型；
# - KTO 只要“好 / 不好”的单条标注（data/support/kto.jsonl，不成对、正负样本不平衡）。
# 三者都是 SFT 模型 + LoRA，参考模型 = 关掉适配器的同一个模型。
# 打包的 SmolLM2-135M-Instruct 本身就是 SFT 模型，所以直接从它出发；想从自己的 SFT 模型出发，
# 用 `model=<文件夹>`（比如 L4.02 产出的 sft_model/）。

# %%
import gc
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from llmtech import labs, models
from llmtech.data.preference import load_pairs
from llmtech.evals.speed import MemoryMeter
from llmtech.train import rollout
from llmtech.train.dpo import DPOSettings, preference_eval, run_dpo
from llmtech.train.kto import KTOSettings, run_kto
from llmtech.train.lora import LoraSettings
from llmtech.train.ppo import PPOSettings, run_ppo
from llmtech.train.reward import RewardScorer, RewardSettings, run_reward


class Config(labs.LabConfig):
    pref_file: str = "data/support/preference.jsonl"          # 成对偏好（RM、DPO）
    kto_file: str = "data/support/kto.jsonl"                  # 非成对标注（KTO）
    eval_pairs_file: str = "data/support/preference_test.jsonl"  # 留出偏好对（偏好准确率）
    eval_prompts_file: str = "data/support/preference_test.jsonl"  # 留出 prompt（生成 + RM 打分）
    eval_pairs: int | None = 40
    eval_prompts: int = 16
    beta: float = 0.1            # DPO / KTO 的 β
    lora_r: int = 16
    max_length: int = 160
    max_new_tokens: int = 40
    rm_steps: int = 30
    dpo_steps: int = 16
    kto_steps: int = 16
    ppo_steps: int = 12
    batch_size: int = 4
    rm_lr: float = 3e-4
    pref_lr: float = 5e-4        # DPO / KTO 的学习率
    ppo_lr: float = 5e-4
    kl_coef: float = 0.1         # PPO 每个 token 的 KL 惩罚系数
    rollout_batch: int = 8


def measure(policy, tok, cfg, pairs, prompts, scorer, sft_scores=None) -> dict:
    """一个策略在留出数据上的三项指标。policy 是 LoRA 模型时，参考模型 = 关掉适配器。"""
    pe = preference_eval(policy, tok, pairs, cfg.beta, cfg.max_length)
    ev = rollout.evaluate_policy(policy, tok, prompts, scorer, max_new_tokens=cfg.max_new_tokens,
                                 seed=cfg.seed)
    return {"pref_acc": pe["preference_accuracy_per_token"], "reward_acc": pe["reward_accuracy"],
            "rm_score": ev["score"],
            "win_rate_vs_sft": rollout.win_rate(ev["scores"], sft_scores or ev["scores"]),  # SFT 对自己：全平局 = 0.5
            "kl_to_sft": ev.get("kl", 0.0), "reply_tokens": ev["response_len"], "scores": ev["scores"]}


def timed(fn):
    """运行一个训练阶段，返回（结果, 墙钟秒数, 内存峰值增量 MiB）。"""
    gc.collect()
    t0 = time.time()
    with MemoryMeter() as mem:
        res = fn()
    return res, round(time.time() - t0, 1), round((mem.peak - mem.start) / 2**20, 1)


def main(cfg: Config, lab: labs.LabContext) -> dict:
    lora = LoraSettings(r=cfg.lora_r, alpha=2 * cfg.lora_r, dropout=0.0)
    pairs = load_pairs(cfg.eval_pairs_file, limit=cfg.eval_pairs).rows
    prompts = rollout.load_prompts(cfg.eval_prompts_file, limit=cfg.eval_prompts)
    common = dict(model=cfg.model, max_length=cfg.max_length, batch_size=cfg.batch_size, lora=lora,
                  seed=cfg.seed, logging_steps=2, save_steps=10**9, warmup=0.1, eval_file=None)

    # %% 1. 奖励模型：PPO 的训练信号，也是三种方法共同的“裁判”（它只见过训练偏好对）
    rm, rm_s, rm_mb = timed(lambda: run_reward(RewardSettings(
        **common, train_file=cfg.pref_file, max_steps=cfg.rm_steps, learning_rate=cfg.rm_lr,
        output_dir=str(lab.path("rm")))))
    scorer = RewardScorer.load(rm["merged_dir"], max_length=cfg.max_length)
    del rm
    print(f"奖励模型训练完成：{rm_s}s")

    # %% 2. SFT 参考：不训练，只测量
    sft, tok = models.load_lm(cfg.model, seed=cfg.seed)
    base = measure(sft, tok, cfg, pairs, prompts, scorer)
    rows = [{"method": "SFT (reference)", **{k: v for k, v in base.items() if k != "scores"},
             "train_s": 0.0, "peak_mem_mib": 0.0, "data": "—"}]
    del sft

    # %% 3. 三种方法，各自从 SFT 模型出发训练一个 LoRA 适配器
    def dpo():
        return run_dpo(DPOSettings(**common, train_file=cfg.pref_file, beta=cfg.beta, max_steps=cfg.dpo_steps,
                                   learning_rate=cfg.pref_lr, output_dir=str(lab.path("dpo"))))

    def kto():
        return run_kto(KTOSettings(**common, train_file=cfg.kto_file, beta=cfg.beta, max_steps=cfg.kto_steps,
                                   learning_rate=cfg.pref_lr, output_dir=str(lab.path("kto"))))

    def ppo():
        return run_ppo(PPOSettings(model=cfg.model, reward_model=str(lab.path("rm/final-merged")),
                                   prompts_file=cfg.pref_file, eval_prompts_file=None, steps=cfg.ppo_steps,
                                   rollout_batch=cfg.rollout_batch, mini_batch=cfg.rollout_batch // 2,
                                   max_new_tokens=cfg.max_new_tokens, learning_rate=cfg.ppo_lr, kl_coef=cfg.kl_coef, lora=lora,
                                   seed=cfg.seed, output_dir=str(lab.path("ppo")), save_steps=cfg.ppo_steps),
                       scorer=scorer)

    data_used = {"PPO": "prompts + RM (online sampling)", "DPO": "pairs", "KTO": "unpaired labels"}
    for name, fn in (("PPO", ppo), ("DPO", dpo), ("KTO", kto)):
        res, secs, mib = timed(fn)
        policy = res["policy"].lm if name == "PPO" else res["trainer"].model
        m = measure(policy, tok, cfg, pairs, prompts, scorer, base["scores"])
        rows.append({"method": name, **{k: v for k, v in m.items() if k != "scores"},
                     "train_s": secs, "peak_mem_mib": mib, "data": data_used[name]})
        del res, policy
        gc.collect()
    lab.table(rows, f"留出数据：{len(pairs)} 个偏好对，{len(prompts)} 个 prompt（贪心解码）")

    # %% 4. 取舍图：横轴 KL（离 SFT 多远），纵轴 RM 胜率；点的大小 ∝ 训练时间
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["kl_to_sft"], r["win_rate_vs_sft"], s=40 + 4 * r["train_s"])
        ax.annotate(f"{r['method']}\npref_acc={r['pref_acc']:.2f}", (r["kl_to_sft"], r["win_rate_vs_sft"]),
                    fontsize=8, xytext=(5, 5), textcoords="offset points")
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("KL to SFT (nats / reply)")
    ax.set_ylabel("RM win rate vs SFT")
    ax.set_title("alignment trade-off (size ~ training time)")
    fig.tight_layout()
    lab.figure(fig, "tradeoff.png", "对齐方法取舍：KL vs RM 胜率")

    out = {"eval_pairs": len(pairs), "eval_prompts": len(prompts), "rm_train_s": rm_s, "rm_peak_mem_mib": rm_mb}
    for r in rows:
        key = r["method"].split()[0].lower()
        for k in ("pref_acc", "rm_score", "win_rate_vs_sft", "kl_to_sft", "train_s", "peak_mem_mib"):
            out[f"{key}_{k}"] = r[k]
    out["dpo_raises_pref_acc"] = out["dpo_pref_acc"] > out["sft_pref_acc"]
    out["kto_raises_pref_acc"] = out["kto_pref_acc"] > out["sft_pref_acc"]
    out["ppo_raises_rm_score"] = out["ppo_rm_score"] > out["sft_rm_score"]
    return out


if __name__ == "__main__":
    # 完整版：各阶段多训几倍步数、全部留出数据（CPU 上约 40 分钟）；GPU 上可换 model=ms:Qwen/Qwen2.5-0.5B-Instruct
    labs.run(main, Config, full={"rm_steps": 120, "dpo_steps": 80, "kto_steps": 80, "ppo_steps": 30,
                                 "eval_pairs": None, "eval_prompts": 48},
             headline=["sft_pref_acc", "dpo_pref_acc", "kto_pref_acc", "ppo_win_rate_vs_sft",
                       "dpo_win_rate_vs_sft", "kto_win_rate_vs_sft"])
