# %% [markdown]
# # L1.05 LoRA 微调对话模型、合并与保存
# 本实验用 LoRA 在客服指令数据上微调一个对话模型，并回答三个问题：
# 1. 微调有没有用？在**没见过的**测试问题上，比较训练前后生成回答的 ROUGE-L（中文按字切分）、
#    词级 F1，以及参考答案的 response loss（只算回答部分的交叉熵）。
# 2. 回答长什么样？报告中并排展示 3 条训练前/后的生成。
# 3. 合并后还是同一个模型吗？把 ΔW = B·A·α/r 加回 W（merge_and_unload）存成普通模型，从磁盘
#    重新加载，与带适配器的模型比较 logits：最大绝对误差 < 1e-4 即为等价（`merge_logits_equal`）。
#
# 模型：默认用打包的 SmolLM2-135M-Instruct，在 2 核 CPU 上几分钟跑完。课程原题用 ChatGLM3-6B：
# 有 GPU 的同学用 `--config configs/lessons/L1.05_chatglm_gpu.yaml`（即 model=chatglm3-6b，
# 注册表别名 → ms:ZhipuAI/chatglm3-6b；它的建模代码随权重发布，需要 trust_remote_code，
# 注册表已为它打开）。代码完全相同，只换配置。

# %%
from typing import Literal

import torch

from llmtech import labs, models
from llmtech.data import load, to_messages
from llmtech.evals import lm, textgen
from llmtech.train.lora import LoraSettings, merge_and_save
from llmtech.train.sft import SFTSettings, run_sft


class Config(labs.LabConfig):
    train_file: str = "data/support/sft_train.jsonl"
    test_file: str = "data/support/sft_test.jsonl"
    trust_remote_code: bool | None = None  # None = 按模型注册表（chatglm3-6b 为 True）
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # GPU 上可用 bfloat16
    bf16: bool | None = None               # 训练时 bf16 自动混合精度；None = 硬件原生支持时开启
    max_train_samples: int | None = None
    eval_samples: int | None = 24          # None = 全部测试集
    steps: int = 56
    batch_size: int = 4
    learning_rate: float = 1e-3
    lora_r: int = 16
    lora_alpha: int = 32
    target_modules: list[str] | str = "all-linear"
    max_length: int = 160
    max_new_tokens: int = 48
    gen_batch_size: int = 8
    merge_check_inputs: int = 4
    merge_check_dtype: Literal["float64", "float32"] = "float64"  # 合并前后 logits 比较用的精度
    merge_tol: float = 1e-4                # 合并前后 logits 的最大允许误差
    n_examples: int = 3


def evaluate(model, tok, cfg, convs):
    """生成回答并打分；再算参考答案的 response loss。"""
    gens = lm.generate(model, tok, [c[:-1] for c in convs], cfg.max_new_tokens, cfg.gen_batch_size)
    refs = [c[-1]["content"] for c in convs]
    return gens, {"rouge_l": textgen.mean(map(textgen.rouge_l, gens, refs)),
                  "f1": textgen.mean(map(textgen.token_f1, gens, refs)),
                  "response_loss": lm.response_loss(model, tok, convs, cfg.max_length)}


def main(cfg: Config, lab: labs.LabContext) -> dict:
    # %% 1. 数据：训练集 + 留出的测试集（测试问题不出现在训练集中）
    test = load(cfg.test_file)[: cfg.eval_samples]
    convs = [to_messages(r) for r in test]
    print(f"测试样例 {len(test)} 条，例：{test[0]['instruction']} -> {test[0]['output']}")

    # %% 2. 模型 + 训练前的基线
    model, tok = models.load_lm(cfg.model, cfg.dtype, cfg.seed, cfg.trust_remote_code)
    before, m0 = evaluate(model, tok, cfg, convs)
    check_texts = [models.render_chat(tok, c) for c in convs[: cfg.merge_check_inputs]]
    base_logits = lm.logits_per_text(model, tok, check_texts)

    # %% 3. LoRA 训练：只训练 A、B 两个小矩阵，基座权重冻结
    s = SFTSettings(model=cfg.model, train_file=cfg.train_file, eval_file=None, seed=cfg.seed,
                    max_train_samples=cfg.max_train_samples, output_dir=str(lab.path("sft")),
                    max_steps=cfg.steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                    warmup=0.1, max_length=cfg.max_length, bf16=cfg.bf16, logging_steps=4,
                    save_steps=10**9, eval_before=False,  # 最终适配器保存在 sft/final
                    lora=LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha,
                                      target_modules=cfg.target_modules))
    res = run_sft(s, model=model, tokenizer=tok)
    peft_model = res["trainer"].model

    # %% 4. 训练后在同一批测试问题上重新评估
    after, m1 = evaluate(peft_model, tok, cfg, convs)
    lab.table([{"metric": k, "before": m0[k], "after": m1[k]} for k in m0], "留出测试集：训练前 vs 训练后")
    by_lang = {}  # 示例：中英文交替各取几条
    for i, r in enumerate(test):
        by_lang.setdefault(r.get("lang", ""), []).append(i)
    picks = [i for group in zip(*by_lang.values()) for i in group][: cfg.n_examples]
    lab.table([{"question": convs[i][-2]["content"][:120], "reference": convs[i][-1]["content"],
                "before": before[i], "after": after[i]} for i in picks], "生成示例（训练前/后）")

    # %% 5. 合并适配器并保存，再从磁盘加载，核对 logits 是否一致
    # 比较时两边都转成 float64 计算：fp32 下“先合并再乘”与“分开乘再相加”的舍入顺序不同，
    # 30 层累积下来有 1e-5 量级的噪声；float64 下剩下的只是合并权重存成 fp32 的舍入误差。
    check = getattr(torch, cfg.merge_check_dtype)
    device, dtype = peft_model.device, peft_model.dtype
    adapter_logits = lm.logits_per_text(peft_model.to(check), tok, check_texts)
    peft_model.to(dtype)  # fp32 -> fp64 -> fp32 是无损的
    merged_dir = merge_and_save(peft_model, tok, lab.path("merged"))  # W ← W + B·A·α/r
    remote = models.trust_remote_code_for(cfg.model, cfg.trust_remote_code)
    reloaded, _ = models.load_lm(str(merged_dir), cfg.dtype, cfg.seed, remote)
    merged_logits = lm.logits_per_text(reloaded.to(device, check), tok, check_texts)
    diff = lm.max_abs_diff(adapter_logits, merged_logits)
    print(f"合并模型已保存到 {merged_dir}；与适配器模型的 logits 最大差 {diff:.2e}"
          f"（对照：训练前后 logits 最大差 {lm.max_abs_diff(base_logits, adapter_logits):.2f}）")
    return {"eval_examples": len(test), "train_steps": res["global_step"],
            "trainable_params": res["trainable_params"], "total_params": res["total_params"],
            **{f"{k}_before": v for k, v in m0.items()}, **{f"{k}_after": v for k, v in m1.items()},
            "train_loss": res["train_loss"], "train_tokens_per_s": res.get("tokens_per_s"),
            "adapter_vs_base_max_abs_logit_diff": lm.max_abs_diff(base_logits, adapter_logits),
            "merge_max_abs_logit_diff": diff, "merge_logits_equal": diff < cfg.merge_tol}


if __name__ == "__main__":
    # 完整版：全部测试集，训练约 3 个 epoch（CPU 上约 20 分钟）
    labs.run(main, Config, full={"eval_samples": None, "steps": 366, "learning_rate": 5e-4},
             headline=["rouge_l_before", "rouge_l_after", "response_loss_before",
                       "response_loss_after", "merge_logits_equal", "train_tokens_per_s"])
