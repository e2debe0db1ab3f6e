# %% [markdown]
# # L4.02 RLHF 流水线：SFT → 奖励模型 → PPO
# 问题：InstructGPT 式的三段流水线能不能在一个小模型上真正跑通？PPO 之后，奖励模型（RM）给策略
# 回答打的分数是否高于 SFT 模型？代价是离 SFT 模型多远（KL）？
# 你将看到的数字：
# 1. 阶段一 SFT：LoRA 微调打包的对话模型，合并成“SFT 模型”；
# 2. 阶段二 RM：在 SFT 模型上接一个标量头，用偏好对（chosen/rejected）做 Bradley–Terry 训练，
#    报告**留出偏好对**上的成对准确率 `rm_pairwise_accuracy`；
# 3. 阶段三 PPO：策略 = SFT 模型 + LoRA，参考模型 = 同一模型关掉适配器；每个 token 的奖励为
#    −β·KL，RM 分数加在回答的最后一个 token 上；GAE 估计优势，裁剪目标做几轮小批量更新。
#    在**留出 prompt** 上用贪心解码比较：`score_sft`（SFT 模型的平均 RM 分数）vs `score_ppo`，
#    以及 `kl_to_sft`：PPO 策略相对 SFT 的整句 KL Σ_t(log π − log π_sft)，在同一批留出 prompt 上
#    以训练时的温度采样回答来估计（单位 nat/回答）。`ppo_beats_sft` 由这两个分数算出；
#    `score_gain_se` 是逐 prompt 分差均值的标准误，`win_rate_ppo_vs_sft` 是逐 prompt 的胜率。
# 曲线图 `ppo_curves.png`：每步的 RM 分数、KL、价值损失。
#
# 默认用打包的 SmolLM2-135M-Instruct，2 核 CPU 上 quick 模式约 5 分钟。有 GPU 时换大模型、多跑几步：
# `model=ms:Qwen/Qwen2.5-0.5B-Instruct`（完整版配置见文末 full={...}，代码不变）。

# %%
import gc
import time

from llmtech import labs
from llmtech.train.callbacks import read_log
from llmtech.train.lora import LoraSettings, merge_and_save
from llmtech.train.ppo import PPOSettings, ppo_figure, run_ppo
from llmtech.train.reward import RewardSettings, run_reward
from llmtech.train.sft import SFTSettings, run_sft


class Config(labs.LabConfig):
    sft_file: str = "data/support/sft_train.jsonl"           # 阶段一：指令数据
    pref_file: str = "data/support/preference.jsonl"         # 阶段二：RM 训练偏好对
    pref_test_file: str | None = "data/support/preference_test.jsonl"  # RM 留出偏好对
    rm_eval_fraction: float = 0.25       # pref_test_file 为 null 时，按 prompt 从训练对中留出这一比例
    ppo_prompts_file: str = "data/support/preference.jsonl"  # 阶段三：训练 prompt（来自训练数据）
    eval_prompts_file: str = "data/support/preference_test.jsonl"  # 留出 prompt（训练中从未出现）
    eval_prompts: int | None = 32        # None = 全部留出 prompt
    lora_r: int = 16
    lora_alpha: int = 32
    max_length: int = 160
    # 阶段一 SFT
    sft_steps: int = 24
    sft_batch: int = 4
    sft_lr: float = 1e-3
    # 阶段二 RM
    rm_steps: int = 30
    rm_batch: int = 4
    rm_lr: float = 3e-4
    # 阶段三 PPO
    ppo_steps: int = 12
    rollout_batch: int = 8
    mini_batch: int = 4
    ppo_epochs: int = 2
    max_new_tokens: int = 40
    temperature: float = 0.7
    ppo_lr: float = 5e-4
    kl_coef: float = 0.1                 # β：每个 token 的 KL 惩罚系数
    target_kl: float | None = None       # 设置后用 Ziegler 自适应 β，把整句 KL 拉向这个目标
    kl_horizon: int = 10000
    vf_coef: float = 0.1
    bf16: bool | None = None             # None = 硬件原生支持 bf16 时开启（本机 1.5 倍速）
    n_examples: int = 3


def main(cfg: Config, lab: labs.LabContext) -> dict:
    lora = LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=0.0)
    walls = {}

    # %% 1. 阶段一 SFT：LoRA 微调，合并为一个普通模型文件夹（后两个阶段都从它出发）
    t0 = time.time()
    sft = run_sft(SFTSettings(model=cfg.model, train_file=cfg.sft_file, eval_file=None, seed=cfg.seed,
                              output_dir=str(lab.path("sft")), max_steps=cfg.sft_steps,
                              batch_size=cfg.sft_batch, learning_rate=cfg.sft_lr, warmup=0.1,
                              max_length=cfg.max_length, logging_steps=4, save_steps=10**9,
                              eval_before=False, save_final=False, lora=lora))
    sft_dir = merge_and_save(sft["trainer"].model, sft["trainer"].processing_class, lab.path("sft_model"))
    del sft
    gc.collect()
    walls["wall_sft_s"] = round(time.time() - t0, 1)

    # %% 2. 阶段二 奖励模型：SFT 模型 + 标量头，损失 −log σ(r_chosen − r_rejected)
    t0 = time.time()
    rm = run_reward(RewardSettings(model=str(sft_dir), train_file=cfg.pref_file, eval_file=cfg.pref_test_file,
                                   eval_fraction=0.0 if cfg.pref_test_file else cfg.rm_eval_fraction,
                                   output_dir=str(lab.path("rm")), max_steps=cfg.rm_steps,
                                   batch_size=cfg.rm_batch, learning_rate=cfg.rm_lr, max_length=cfg.max_length,
                                   logging_steps=5, save_steps=10**9, seed=cfg.seed, lora=lora, merge=True))
    rm_acc = rm.get("eval_pairwise_accuracy")
    lab.table([{"stage": "RM", "pairs_eval": rm["data"].get("eval", {}).get("kept", 0),
                "acc_before": rm.get("eval_pairwise_accuracy_before"), "acc_after": rm_acc,
                "margin_after": rm.get("eval_mean_margin")}], "奖励模型：留出偏好对上的成对准确率")
    rm_dir = rm["merged_dir"]
    del rm
    gc.collect()
    walls["wall_rm_s"] = round(time.time() - t0, 1)

    # %% 3. 阶段三 PPO：采样 → RM 打分 → 参考 log-prob → 逐 token 奖励 → GAE → 裁剪更新
    t0 = time.time()
    res = run_ppo(PPOSettings(model=str(sft_dir), reward_model=str(rm_dir), prompts_file=cfg.ppo_prompts_file,
                              eval_prompts_file=cfg.eval_prompts_file, max_eval_prompts=cfg.eval_prompts,
                              steps=cfg.ppo_steps, rollout_batch=cfg.rollout_batch, mini_batch=cfg.mini_batch,
                              ppo_epochs=cfg.ppo_epochs, max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature, learning_rate=cfg.ppo_lr, kl_coef=cfg.kl_coef,
                              target_kl=cfg.target_kl, kl_horizon=cfg.kl_horizon, vf_coef=cfg.vf_coef,
                              bf16=cfg.bf16, lora=lora, seed=cfg.seed,
                              output_dir=str(lab.path("ppo")), save_steps=cfg.ppo_steps, save_final=True))
    walls["wall_ppo_s"] = round(time.time() - t0, 1)

    # %% 4. 结果：留出 prompt 上 SFT vs PPO 的 RM 分数、KL，以及训练曲线和回答示例
    rows = read_log(lab.path("ppo/trainer_log.jsonl"))
    lab.figure(ppo_figure(rows, f"PPO on {cfg.model}"), "ppo_curves.png", "PPO：RM 分数 / KL / 价值损失")
    score_sft, score_ppo = res["eval_score_before"], res["eval_score_after"]
    lab.table([{"policy": "SFT", "rm_score": score_sft, "kl_to_sft": 0.0,
                "reply_tokens": res["eval_response_len_before"]},
               {"policy": "PPO", "rm_score": score_ppo, "kl_to_sft": res["eval_kl_after"],
                "reply_tokens": res["eval_response_len_after"]}],
              f"留出 prompt（{res['eval_prompts']} 条，贪心解码）")
    # 同一批 prompt 上的成对差值：均值的标准误告诉我们提升是否大于噪声
    samples = read_log(lab.path("ppo/eval_samples.jsonl"))  # 每行：prompt、两边的回答与分数
    diffs = [s["score_after"] - s["score_before"] for s in samples]
    mean_d = sum(diffs) / len(diffs)
    se = (sum((d - mean_d) ** 2 for d in diffs) / max(len(diffs) - 1, 1) / len(diffs)) ** 0.5
    lab.table([{"prompt": s["prompt"][:80], "SFT": s["before"], "score_SFT": s["score_before"],
                "PPO": s["after"], "score_PPO": s["score_after"]} for s in samples[: cfg.n_examples]],
              "回答示例")
    return {"rm_pairwise_accuracy": rm_acc, "score_sft": score_sft, "score_ppo": score_ppo,
            "score_gain": score_ppo - score_sft, "score_gain_se": se,
            "win_rate_ppo_vs_sft": res["eval_win_rate"],
            "kl_to_sft": res["eval_kl_after"], "ppo_steps": res["global_step"],
            "train_score_first": rows[0]["score_mean"], "train_score_last": rows[-1]["score_mean"],
            "train_kl_last": rows[-1]["kl"], "reply_tokens_sft": res["eval_response_len_before"],
            "reply_tokens_ppo": res["eval_response_len_after"], "eval_prompts": res["eval_prompts"],
            **walls, "ppo_beats_sft": bool(score_ppo > score_sft)}



if __name__ == "__main__":
    # 完整版：更多步数、更大的采样批、全部 74 条留出 prompt，学习率相应调低（CPU 上约 30–40 分钟）。
    # 有 GPU 时再加 model=ms:Qwen/Qwen2.5-0.5B-Instruct（bf16 自动开启；代码不变）。
    labs.run(main, Config, full={"sft_steps": 120, "rm_steps": 120, "ppo_steps": 40, "rollout_batch": 16,
                                 "mini_batch": 8, "ppo_lr": 2e-4, "eval_prompts": None, "max_new_tokens": 64},
             headline=["rm_pairwise_accuracy", "score_sft", "score_ppo", "kl_to_sft", "ppo_beats_sft"])
