# %% [markdown]
# # L2.03 P-Tuning v2 深层提示
# 本实验要回答的问题：基座冻结、只训练极少量参数时，下面三种方法在**同一任务、同样步数、同一随机种子**下
# 各学到多少？
# - **P-Tuning v2**（PEFT 的 prefix tuning）：在**每一层**注意力的 K/V 前面拼上 n 个可学习的“虚拟位置”
#   （深层提示），每个真实 token 在每一层都能注意到它们；
# - **P-Tuning v1**：n 个虚拟 token 由一个小的提示编码器（MLP/LSTM）生成，只拼在**输入嵌入**上；
# - **LoRA**：在注意力的 q_proj / v_proj 上加低秩更新 B·A，作为参照。
#
# 任务：把客服问题分到 6 个主题（由 `data/support` 里每条样本的 `topic` 字段确定性得到），答案是一个词。
# 在留出测试集上，取答案位置上各候选标签的对数概率，argmax 即预测（不需要生成，快且无歧义）。
# 你将看到：可训练参数量及占总参数的比例（与解析公式核对）、训练前后的留出 loss 与准确率、训练耗时与
# tokens/s、各方法存盘的数值个数；最后把 P-Tuning v2 学到的前缀存盘、加载到一个新的基座上，
# logits 最大差 `ptv2_reload_max_abs_diff` 应为 0。

# %%
import gc

from llmtech import labs, models
from llmtech.data import load
from llmtech.errors import ConfigError
from llmtech.evals import lm
from llmtech.io import atomic_write_jsonl
from llmtech.train import prompt_tuning as pt
from llmtech.train.callbacks import loss_figure, read_log
from llmtech.train.prompt_tuning import PromptTuningSettings


class Config(labs.LabConfig):
    train_file: str = "data/support/sft_train.jsonl"
    test_file: str = "data/support/sft_test.jsonl"
    field: str = "topic"  # 标签取自样本的哪个字段；下面的映射决定类别（其他主题的样本不参与）
    labels: dict[str, str] = {"troubleshooting_l3": "lock", "troubleshooting_s1": "robot",
                              "payment": "payment", "shipping": "delivery", "returns": "return",
                              "membership": "member"}
    template: str = ("Which topic is this customer-service question about? "
                     "Answer with one word from: {labels}.\nQuestion: {question}")
    eval_samples: int | None = None  # None = 全部留出样本
    steps: int = 24                  # 三种方法相同的优化步数
    batch_size: int = 8
    max_length: int = 160
    bf16: bool | None = None         # 训练时 bf16 自动混合精度；None = 硬件原生支持时开启（评估始终 fp32）
    # P-Tuning v2：16 个虚拟位置 × 30 层 × (K + V)；前缀从一句真实文本在各层的 K/V 初始化（训练从一个
    # 真实的“硬提示”出发）。PEFT 默认是随机初始化，可用 ptv2.prefix_init=random 对比
    ptv2: PromptTuningSettings = PromptTuningSettings(
        method="ptv2", learning_rate=1e-2, num_virtual_tokens=16, prefix_init="text",
        prefix_init_text="You sort customer-service questions into topics and answer with a "
                         "single topic word.")
    # P-Tuning v1：16 个虚拟 token，MLP 提示编码器宽 128
    ptv1: PromptTuningSettings = PromptTuningSettings(
        method="ptv1", learning_rate=3e-3, num_virtual_tokens=16, encoder_hidden_size=128)
    lora: PromptTuningSettings = PromptTuningSettings(
        method="lora", learning_rate=2e-3, lora_r=8, lora_alpha=16,
        target_modules=["q_proj", "v_proj"])
    reload_check_inputs: int = 4
    reload_tol: float = 1e-6         # 存盘前后 logits 的最大允许差（同一台机器上应为 0）


def main(cfg: Config, lab: labs.LabContext) -> dict:
    methods = {"ptv2": cfg.ptv2, "ptv1": cfg.ptv1, "lora": cfg.lora}
    for key, s in methods.items():
        if s.method != key:
            raise ConfigError(f"{key}.method must be '{key}', got '{s.method}'")
    # %% 1. 数据：问题 -> 主题词；训练集与留出测试集来自两个不同的文件
    train = pt.label_records(load(cfg.train_file), cfg.field, cfg.labels, cfg.template, cfg.train_file)
    test = pt.label_records(load(cfg.test_file), cfg.field, cfg.labels, cfg.template, cfg.test_file)
    test = test[: cfg.eval_samples]
    train_file = atomic_write_jsonl(lab.path("task/train.jsonl"), train)
    atomic_write_jsonl(lab.path("task/test.jsonl"), test)
    words = list(dict.fromkeys(cfg.labels.values()))
    print(f"训练 {len(train)} 条，测试 {len(test)} 条，类别 {words}（随机猜 {1 / len(words):.3f}）")
    print("例：", train[0]["instruction"].replace("\n", " / "), "->", train[0]["output"])

    # %% 2. 训练前的基线：未经任何训练的基座模型
    base, tok = models.load_lm(cfg.model, seed=cfg.seed)
    _, single = pt.label_token_ids(tok, words)
    m0 = pt.evaluate_labels(base, tok, test, words, cfg.max_length)
    print(f"训练前：留出 loss {m0['loss']:.3f}，准确率 {m0['accuracy']:.3f}")
    del base
    check = [models.render_chat(tok, [{"role": "user", "content": r["instruction"]}],
                                add_generation_prompt=True) for r in test[: cfg.reload_check_inputs]]

    # %% 3. 三种方法：各自从一个新加载的基座开始，同样的数据顺序、步数和种子
    rows, out, evals = [], {}, {}
    for key, s in methods.items():
        labs.seed_everything(cfg.seed)
        base, _ = models.load_lm(cfg.model, seed=cfg.seed)
        # 解析公式：ptv2 = n × 层数 × 2 × (num_key_value_heads × head_dim)（GQA 下 K/V 比 hidden 窄）；
        # ptv1 = n × hidden 的虚拟 token 嵌入 + 提示编码器；LoRA = 每个被适配的 W 加 r × (d_in + d_out)
        analytic = pt.analytic_trainable(base, s)
        model = pt.wrap(base, s, tok)
        count = pt.trainable_report(model)
        res = pt.train(model, tok, s, train_file, lab.path(f"train_{key}"), cfg.steps,
                       cfg.batch_size, cfg.max_length, cfg.seed, bf16=cfg.bf16, model_id=cfg.model)
        m1 = evals[key] = pt.evaluate_labels(model, tok, test, words, cfg.max_length)
        saved = pt.save_prompt(model, lab.path(f"adapter_{key}"))
        step1 = next((r["loss"] for r in read_log(lab.path(f"train_{key}/trainer_log.jsonl"))
                      if "loss" in r), None)
        rows.append({"method": key, **count, "accuracy_after": m1["accuracy"]})
        out.update({f"{key}_trainable_params": count["trainable_params"],
                    f"{key}_trainable_share": count["trainable_share"],
                    f"{key}_params_match_analytic": analytic == count["trainable_params"],
                    f"{key}_train_loss_step1": step1, f"{key}_train_loss": res["train_loss"],
                    f"{key}_loss_after": m1["loss"], f"{key}_accuracy_after": m1["accuracy"],
                    f"{key}_train_s": res["train_runtime_s"], f"{key}_tokens_per_s": res["tokens_per_s"],
                    f"{key}_saved_values": saved["values"], f"{key}_saved_bytes": saved["bytes"]})
        if key == "ptv2":
            ptv2_model = model  # 第 4 步用它核对存盘前后的 logits
        del base, model, res
        gc.collect()

    # %% 4. P-Tuning v2：前缀存盘（PEFT save_pretrained）→ 加载到一个新的基座 → logits 应完全一致
    fresh, _ = models.load_lm(cfg.model, seed=cfg.seed)
    reloaded = pt.load_prompt(fresh, lab.path("adapter_ptv2"))
    diff = lm.max_abs_diff(pt.logits_of(ptv2_model, tok, check), pt.logits_of(reloaded, tok, check))
    print(f"P-Tuning v2 前缀：{out['ptv2_saved_values']} 个数，{out['ptv2_saved_bytes']} 字节；"
          f"重新加载后 logits 最大差 {diff:.2e}")

    # %% 5. 汇总：参数占比、留出 loss/准确率、速度，以及图
    lab.table([{"method": pt.METHOD_TITLES[k], "trainable": out[f"{k}_trainable_params"],
                "share_%": 100 * out[f"{k}_trainable_share"],
                "matches_formula": out[f"{k}_params_match_analytic"],
                "saved_values": out[f"{k}_saved_values"],
                "loss_before": m0["loss"], "loss_after": out[f"{k}_loss_after"],
                "acc_before": m0["accuracy"], "acc_after": out[f"{k}_accuracy_after"],
                "train_s": out[f"{k}_train_s"], "tokens/s": out[f"{k}_tokens_per_s"]}
               for k in methods], "同一任务、同样步数：三种方法对比（留出测试集）")
    lab.table([{"label": w, "before": m0["per_label_accuracy"][w],
                **{k: evals[k]["per_label_accuracy"][w] for k in methods}} for w in words],
              "各类别的留出准确率")
    lab.figure(pt.comparison_figure(rows, m0["accuracy"]), "comparison.png", "准确率与可训练参数占比")
    lab.figure(loss_figure({pt.METHOD_TITLES[k]: lab.path(f"train_{k}/trainer_log.jsonl")
                            for k in methods}, title="train loss"), "loss.png", "训练 loss 曲线")
    return {"train_examples": len(train), "eval_examples": len(test), "num_labels": len(words),
            "labels_single_token": single, "steps": cfg.steps, "loss_before": m0["loss"],
            "accuracy_before": m0["accuracy"], "chance_accuracy": 1 / len(words), **out,
            "ptv2_reload_max_abs_diff": diff, "ptv2_reload_logits_equal": diff <= cfg.reload_tol}


if __name__ == "__main__":
    # 完整版：每种方法 150 步（约 5 个 epoch）；按 quick 模式实测的 tokens/s 估算，2 核 CPU 上共约 13 分钟
    labs.run(main, Config, full={"steps": 150},
             headline=["ptv2_trainable_share", "ptv1_trainable_share", "lora_trainable_share",
                       "accuracy_before", "ptv2_accuracy_after", "ptv1_accuracy_after",
                       "lora_accuracy_after", "ptv2_reload_max_abs_diff"])
