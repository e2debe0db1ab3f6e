# %% [markdown]
# # L1.03 Hugging Face Trainer / TRL 训练脚手架
# 问题：一次标准的 Hugging Face 微调由哪些部件组成？哪些训练参数真正决定结果？
# 训练过程怎样被记录（trainer_log.jsonl、TensorBoard）、怎样边训边评估、怎样存检查点？
# 你将看到：本次实际使用的 SFTConfig 参数表；训练中每隔 eval_steps 步的留出集 eval loss
# （应当下降）；TensorBoard 事件文件与从中读回的数字；检查点目录里的文件；吞吐 tokens/s。

# %%
import time

import matplotlib.pyplot as plt

from llmtech import labs
from llmtech.train import sft
from llmtech.train.callbacks import read_log, read_tensorboard_scalars

# 要看的训练参数，及其含义（值取自训练器里真正生效的 SFTConfig）
ARGS = {
    "learning_rate": "峰值学习率（LoRA 常用 1e-4 ~ 1e-3，全参微调小一个数量级）",
    "lr_scheduler_type": "学习率调度：cosine = 预热后余弦衰减到 0",
    "warmup_steps": "预热步数（<1 表示占总步数的比例）：起步时学习率从 0 线性升到峰值",
    "per_device_train_batch_size": "每张卡每步的样本数",
    "gradient_accumulation_steps": "梯度累积：攒几步梯度再更新一次，等效放大 batch",
    "max_steps": "总优化步数（-1 = 按 num_train_epochs 算）",
    "num_train_epochs": "训练轮数（max_steps > 0 时被覆盖）",
    "max_grad_norm": "梯度裁剪阈值：防止个别大梯度把训练打飞",
    "logging_steps": "每隔几步记录一次 train loss / 学习率 / 梯度范数",
    "eval_strategy": "何时评估：steps = 每 eval_steps 步",
    "eval_steps": "评估间隔（步）",
    "eval_on_start": "训练开始前先评估一次，得到基线",
    "save_steps": "检查点间隔（步）：中断后可从这里续训",
    "save_total_limit": "最多保留几个检查点（旧的自动删除，省磁盘）",
    "seed": "随机种子：同种子、同机器，结果可复现",
    "max_length": "样本截断长度（token）",
    "completion_only_loss": "只对回答计损失（见 L1.01）",
    "report_to": "日志后端：tensorboard / wandb / mlflow / none",
}


class Config(labs.LabConfig):
    train_file: str = "data/support/sft_train.jsonl"
    eval_file: str = "data/support/sft_test.jsonl"  # 留出集：只用来评估，不参与训练
    train_samples: int | None = 64
    eval_samples: int | None = 16
    max_steps: int = 20
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 1e-3
    lr_scheduler: str = "cosine"
    warmup: float = 0.1
    logging_steps: int = 2
    eval_steps: int = 5
    save_steps: int = 10
    save_total_limit: int = 2
    max_length: int = 256


def main(cfg: Config, ctx: labs.LabContext) -> dict:
    # %% 1. 配置 → 训练器：llmtech 的 SFTSettings 变成 TRL 的 SFTConfig（TrainingArguments 子类）
    out = ctx.path("run")
    s = sft.SFTSettings(
        model=cfg.model, train_file=str(labs.ROOT / cfg.train_file),
        eval_file=str(labs.ROOT / cfg.eval_file), max_train_samples=cfg.train_samples,
        max_eval_samples=cfg.eval_samples, output_dir=str(out), max_steps=cfg.max_steps,
        num_epochs=cfg.epochs, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
        learning_rate=cfg.learning_rate, lr_scheduler=cfg.lr_scheduler, warmup=cfg.warmup,
        logging_steps=cfg.logging_steps, eval_steps=cfg.eval_steps, save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, max_length=cfg.max_length, seed=cfg.seed,
        tensorboard=True)  # 同时写 trainer_log.jsonl 与 TensorBoard 事件文件
    trainer = sft.build_trainer(s)  # 模型 + LoRA + 分词后的数据集 + 回调，全部装好但还没训练
    trainer.args.eval_on_start = True  # 第 0 步也评估一次：eval loss 曲线有了起点
    a = trainer.args
    value = lambda k: getattr(getattr(a, k), "value", getattr(a, k))  # 枚举显示成 "cosine"
    ctx.table([{"参数": k, "值": str(value(k)), "含义": v} for k, v in ARGS.items()],
              "本次训练实际使用的 SFTConfig（节选）")
    effective = a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size
    ctx.text(f"训练集 {len(trainer.train_dataset)} 条，评估集 {len(trainer.eval_dataset)} 条；"
             f"等效 batch = {a.per_device_train_batch_size} × {a.gradient_accumulation_steps} × "
             f"{a.world_size} 卡 = {effective}。")

    # %% 2. 训练：Trainer 的循环 = 取 batch → 前向 → 反传 → (累积后) 更新 → 记日志/评估/存盘
    t0 = time.time()
    trainer.train()
    wall = time.time() - t0

    # %% 3. 日志：trainer_log.jsonl（每行一个事件）
    rows = read_log(out / "trainer_log.jsonl")
    eval_s = sum(r.get("eval_runtime", 0.0) for r in rows)  # 训练墙钟里包含了周期评估的时间
    m = {"train_tokens_per_s": trainer.state.num_input_tokens_seen / (wall - eval_s),
         "train_steps": trainer.state.global_step, "effective_batch": effective,
         "train_wall_s": wall, "eval_wall_s": eval_s}
    train = [(r["step"], r["loss"], r["learning_rate"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    ctx.table([{"step": st, "eval_loss": v} for st, v in evals], "训练中的周期评估（留出集）")
    m.update(eval_points=len(evals), eval_loss_first=evals[0][1], eval_loss_last=evals[-1][1],
             eval_loss_falls=evals[-1][1] < evals[0][1],
             train_loss_first=train[0][1], train_loss_last=train[-1][1])

    # %% 4. TensorBoard：事件文件在 run/tensorboard/ 下，`tensorboard --logdir <它>` 即可看曲线。
    # 这里用 TensorBoard 自己的 EventAccumulator 把数字读回来，确认与 jsonl 日志一致。
    tb = read_tensorboard_scalars(out / "tensorboard")
    tb_eval = [v for _, v in tb.get("eval/loss", [])]
    m.update(tensorboard_event_files=len(list((out / "tensorboard").rglob("events.out.tfevents.*"))),
             tensorboard_tags=len(tb), tensorboard_scalars=sum(len(v) for v in tb.values()),
             tensorboard_matches_jsonl=bool(tb_eval) and abs(tb_eval[-1] - evals[-1][1]) < 1e-5)
    ctx.text("TensorBoard 标量：" + ", ".join(f"`{k}`×{len(v)}" for k, v in sorted(tb.items())))

    # %% 5. 检查点：每 save_steps 步一个，只留最近 save_total_limit 个；里面是续训所需的全部状态
    ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    ctx.table([{"文件": f.name, "KB": f.stat().st_size / 1024} for f in sorted(ckpts[-1].iterdir())
               if f.is_file()], f"{ckpts[-1].name} 的内容（LoRA 适配器 + 优化器 + 调度器 + RNG + 进度）")
    m.update(checkpoints=len(ckpts), checkpoint_names=",".join(p.name for p in ckpts))

    # %% 6. 曲线：loss 与学习率调度
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax1.plot([t[0] for t in train], [t[1] for t in train], label="train loss")
    ax1.plot(*zip(*evals), "o--", label="eval loss (held-out)")
    ax1.set_xlabel("step"), ax1.set_title("loss"), ax1.legend()
    ax2.plot([t[0] for t in train], [t[2] for t in train], "g.-")
    ax2.set_xlabel("step"), ax2.set_title(f"learning rate ({value('lr_scheduler_type')})")
    ctx.figure(fig, "loss_eval.png", "训练 / 评估损失与学习率调度")
    return m


if __name__ == "__main__":
    labs.run(main, Config,
             full={"train_samples": None, "eval_samples": None, "max_steps": -1, "epochs": 2.0,
                   "learning_rate": 5e-4, "logging_steps": 10, "eval_steps": 40,
                   "save_steps": 80},
             headline=["eval_loss_first", "eval_loss_last", "eval_points", "tensorboard_scalars",
                       "checkpoints", "train_tokens_per_s"])
