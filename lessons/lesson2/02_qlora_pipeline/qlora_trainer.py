# %% [markdown]
# # L2.02 QLoRA 训练流程
# 问题：把基座的线性层压到 4 bit（NF4 + 双重量化）再训练 LoRA，流程上比普通 LoRA 多了哪几步？
# 在这台 2 核 CPU 上它真的能训练吗（loss 会不会降）？省了多少内存、慢了多少？
# 你将看到：
# 1. 给 GPU 用户的 LLaMA-7B QLoRA 配置（configs/lessons/L2.02_llama7b_gpu.yaml，论文的超参），
#    以及按公式估算的 7B 训练显存：QLoRA / LoRA / 全参 各要多少 GB；
# 2. 内置 SmolLM2-135M 的真实 QLoRA 训练：bitsandbytes 4 bit 基座 + PEFT k-bit 预处理 + 全部线性层
#    LoRA，留出集 loss 训练前 → 训练后；
# 3. 保存的适配器重新加载到新的 4 bit 基座上，logits 与训练结束时逐位一致；装到别的基座上会报错；
# 4. 与普通 LoRA（fp32 基座）同 batch、同长度、同秩下的峰值内存与 tokens/s 之比（各在新进程里测）。
#
# 在 GPU 上运行完整配方：
#   python lessons/lesson2/02_qlora_pipeline/qlora_trainer.py --config configs/lessons/L2.02_llama7b_gpu.yaml

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from llmtech import labs
from llmtech.dist import memory
from llmtech.errors import ConfigError
from llmtech.evals.lm import logits_per_text, max_abs_diff
from llmtech.train import peft_methods as qlora
from llmtech.train.callbacks import read_log
from llmtech.train.lora import LoraSettings

GB, MB = memory.GB, memory.MB


class Config(labs.LabConfig):
    train_file: str = "data/support/sft_train.jsonl"
    eval_file: str = "data/support/sft_test.jsonl"
    max_eval_samples: int | None = 24
    # 量化：4 bit NF4，双重量化（scale 再量化成 8 bit），矩阵乘在 bf16 里做
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    # LoRA：QLoRA 论文的做法是"所有线性层都加 LoRA"；小模型用 r=16、alpha=32
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    optim: str = "paged_adamw_32bit"   # CPU 上没有分页内存，会换成同一更新规则的 adamw_torch
    gradient_checkpointing: bool = True
    steps: int = 30
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 128
    learning_rate: float = 5e-4
    lr_scheduler: str = "cosine"
    warmup: float = 0.0
    max_grad_norm: float = 1.0
    # 与普通 LoRA 对比峰值内存与速度（两个新进程，各训练 compare_steps 步）
    compare: bool = True
    compare_steps: int = 3
    compare_seq_len: int = 128
    # 第 1 节的显存估算：哪个模型、多大的卡
    gpu_model: str = "llama2-7b"
    gpu_memory_gb: float = 24
    gpu_seq_len: int = 512
    wrong_base: str = "tiny-llama"     # 故意把适配器装到这个基座上，看错误信息


def main(cfg: Config, lab: labs.LabContext) -> dict:
    m: dict = {}
    # %% 1. GPU 配方与 7B 显存估算（公式见 llmtech.dist.memory，L2.06 用实测核对过）
    # QLoRA：NF4 权重约 0.5 字节/参数，LoRA 参数 + 其 AdamW 状态只占一小块；LoRA 要 bf16 全量权重
    # （2 字节/参数）；全参微调还要梯度、fp32 主权重和两份 Adam 状态（约 16 字节/参数）。
    rows = []
    for method in ("qlora", "lora", "full"):
        e = memory.estimate(cfg.gpu_model, method, batch=1, seq_len=cfg.gpu_seq_len, device="cuda",
                            gradient_checkpointing=True, lora_r=64)
        fits = e.total <= cfg.gpu_memory_gb * GB
        rows.append({"method": memory.METHOD_NAMES[method], "estimate": e.breakdown(GB),
                     f"fits {cfg.gpu_memory_gb:g} GB": fits})
        m[f"gpu_est_{method}_gb"] = round(e.total / GB, 2)
        m[f"gpu_fits_{method}"] = fits
    lab.table(rows, f"{cfg.gpu_model} 训练显存估算（batch 1 × {cfg.gpu_seq_len}，梯度检查点，LoRA r=64）")

    # %% 2. 真实 QLoRA 训练：4 bit 基座 → prepare_model_for_kbit_training → LoRA(all-linear)
    s = qlora.QLoRASettings(
        model=cfg.model, train_file=cfg.train_file, eval_file=cfg.eval_file,
        max_eval_samples=cfg.max_eval_samples, output_dir=str(lab.path("qlora")), seed=cfg.seed,
        quant_type=cfg.quant_type, double_quant=cfg.double_quant, compute_dtype=cfg.compute_dtype,
        lora=LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout),
        optim=cfg.optim, gradient_checkpointing=cfg.gradient_checkpointing, max_steps=cfg.steps,
        batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, max_length=cfg.max_length,
        learning_rate=cfg.learning_rate, lr_scheduler=cfg.lr_scheduler, warmup=cfg.warmup,
        max_grad_norm=cfg.max_grad_norm, logging_steps=5, save_steps=10**9)
    res = qlora.run_qlora(s)
    model, tok = res["trainer"].model, res["trainer"].processing_class
    fp32_bytes = memory.model_shape(model.config).params * 4
    if res["optim_note"]:
        print("注意：" + res["optim_note"])
    m.update(quantized_linears=res["quantized_linears"], base_mb=round(res["base_bytes"] / MB, 1),
             fp32_mb=round(fp32_bytes / MB, 1), trainable_params=res["trainable_params"],
             trainable_pct=round(100 * res["trainable_params"] / res["total_params"], 3),
             optim=res["optim"], eval_loss_before=round(res["eval_loss_before"], 4),
             eval_loss_after=round(res["eval_loss_after"], 4),
             train_tokens_per_s=res["tokens_per_s"], steps=res["global_step"])
    m["loss_fell"] = m["eval_loss_after"] < m["eval_loss_before"]
    lab.table([{"基座线性层": f"{m['quantized_linears']} 个 Linear4bit ({cfg.quant_type})",
                "基座大小 MB": m["base_mb"], "fp32 时 MB": m["fp32_mb"],
                "可训练参数": f"{m['trainable_params']:,} ({m['trainable_pct']}%)",
                "优化器": m["optim"], "留出 loss 前→后": f"{m['eval_loss_before']} → {m['eval_loss_after']}",
                "tokens/s": m["train_tokens_per_s"]}], "QLoRA 训练")
    log = [x for x in read_log(lab.path("qlora/trainer_log.jsonl")) if "loss" in x]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([x["step"] for x in log], [x["loss"] for x in log], "o-", label="train loss")
    ax.axhline(m["eval_loss_before"], ls="--", c="gray", label="held-out before")
    ax.axhline(m["eval_loss_after"], ls="--", c="green", label="held-out after")
    ax.set(xlabel="step", ylabel="loss", title=f"QLoRA ({cfg.quant_type}, r={cfg.lora_r}) on {cfg.model}")
    ax.legend()
    lab.figure(fig, "qlora_loss.png", "QLoRA 训练 loss 与留出集 loss")

    # %% 3. 保存 → 重新加载：适配器只有几 MB，装回新的 4 bit 基座，输出必须与训练结束时一致
    probe = ["退货需要什么条件？", "How do I reset my password?"]
    model.eval()
    before = logits_per_text(model, tok, probe)
    reloaded, _ = qlora.load_qlora(s, res["final_dir"])
    m["reload_max_abs_diff"] = max_abs_diff(before, logits_per_text(reloaded, tok, probe))
    m["adapter_mb"] = round(sum(f.stat().st_size for f in lab.path("qlora/final").glob("adapter_model.*")) / MB, 2)
    del reloaded
    # 装到别的基座：在加载前按层名与形状核对，给出清楚的错误
    from llmtech import models

    other, _ = models.load_lm(cfg.wrong_base, seed=cfg.seed)
    try:
        qlora.check_adapter_base(other, res["final_dir"])
        m["wrong_base_error"] = ""
    except ConfigError as e:
        m["wrong_base_error"] = str(e)
        print(f"装到 {cfg.wrong_base} 上：{e}")
    del other

    # %% 4. 与普通 LoRA 比：同一模型、batch、长度、秩、梯度检查点，各在一个新进程里测峰值内存
    if cfg.compare:
        c = qlora.compare_with_lora(cfg.model, batch=cfg.batch_size, seq_len=cfg.compare_seq_len,
                                    steps=cfg.compare_steps, lora_r=cfg.lora_r,
                                    gradient_checkpointing=cfg.gradient_checkpointing,
                                    data=cfg.train_file, seed=cfg.seed)
        runs = c.pop("runs")
        m.update(c)
        lab.table([{"method": k.upper(), "权重 MB": c[f"{k}_weights_mb"], "峰值 MB": c[f"{k}_peak_mb"],
                    "tokens/s": c[f"{k}_tokens_per_s"], "峰值出现在": runs[k]["peak_at"]}
                   for k in ("lora", "qlora")],
                  f"QLoRA / LoRA：峰值内存 ×{c['peak_ratio']}，权重 ×{c['weights_ratio']}，速度 ×{c['speed_ratio']}")
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
        for ax, key, unit in ((axes[0], "peak_mb", "peak memory (MB)"), (axes[1], "tokens_per_s", "tokens/s")):
            ax.bar(["LoRA (fp32 base)", "QLoRA (NF4 base)"], [c[f"lora_{key}"], c[f"qlora_{key}"]],
                   color=["tab:blue", "tab:orange"])
            ax.set(ylabel=unit)
        fig.suptitle(f"{cfg.model}: batch {cfg.batch_size} x {cfg.compare_seq_len}, r={cfg.lora_r}")
        lab.figure(fig, "qlora_vs_lora.png", "QLoRA 与 LoRA 的峰值内存和速度")
    else:
        print("compare=false：没有测 LoRA 对照")
    return m


if __name__ == "__main__":
    labs.run(main, Config, full={"steps": 120, "max_eval_samples": None, "compare_steps": 5},
             headline=["eval_loss_before", "eval_loss_after", "base_mb", "fp32_mb",
                       "reload_max_abs_diff", "trainable_pct"])
