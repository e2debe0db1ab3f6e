# %% [markdown]
# # L1.01 SFT 与指令微调：损失掩码对比
# 问题：监督微调（SFT）到底在学什么？"在原始文本上续写"和"按对话模板做指令微调"差在哪里？
# 训练时只对"回答"计损失（response-only），和对整段序列计损失（full-sequence）哪个更好？
# 你将看到：同一条样本三种形式的 token 数与"哪些 token 计损失"；两次从同一起点、同一数据、
# 同一随机种子出发的 LoRA SFT，在留出测试集上的"回答损失"训练前 / 后，以及计损失 token 占比。

# %%
from llmtech import data, labs, models
from llmtech.evals import lm
from llmtech.train import sft
from llmtech.train.callbacks import loss_figure


class Config(labs.LabConfig):
    train_file: str = "data/support/sft_train.jsonl"  # 虚构公司的中英文客服问答（alpaca 格式）
    test_file: str = "data/support/sft_test.jsonl"    # 留出测试集：训练中从不出现
    train_samples: int | None = 64   # None = 全部
    test_samples: int | None = 24
    max_steps: int = 16              # -1 = 按 epochs 训练
    epochs: float = 1.0
    batch_size: int = 4
    learning_rate: float = 1e-3
    max_length: int = 256
    answer_tokens: int = 32          # 展示一条测试问题的回答（贪心解码的 token 数，0 = 不展示）


def main(cfg: Config, ctx: labs.LabContext) -> dict:
    # %% 1. 数据：读入 + 校验，看两条样本
    train_file, test_file = str(labs.ROOT / cfg.train_file), str(labs.ROOT / cfg.test_file)
    train_recs = data.load(train_file, limit=cfg.train_samples)
    test_convs = [data.to_messages(r) for r in data.load(test_file, limit=cfg.test_samples)]
    ctx.table([{"instruction": r["instruction"], "output": r["output"][:80]} for r in train_recs[:2]],
              f"训练样本（共 {len(train_recs)} 条；测试 {len(test_convs)} 条）")
    tok = models.load_tokenizer(cfg.model)

    # %% 2. 同一条样本的三种训练形式
    # (a) 原始文本续写：把问题和答案直接拼成一段文字，每个 token 都计损失——这就是预训练。
    #     （第一个 token 前面没有上文，永远不是预测目标，所以"全部计损失"= 总数 - 1。）
    #     模型学到的是"这类文字的分布"，却不知道哪里是问题、哪里该停。
    # (b) 对话模板 + 全序列损失：用模型自己的 chat template（<|im_start|>user … <|im_end|>）
    #     包好，角色边界和结束符都清楚了，但系统提示、问题也计损失，模型要花力气"背模板"。
    # (c) 对话模板 + 仅回答损失：提示部分的标签设为 -100（不计损失），梯度只来自回答——
    #     这就是通常说的"指令微调"。下面 ⟦…⟧ 括起来的就是计损失的 token。
    ex = train_recs[0]
    raw_ids = tok(f"{ex['instruction']}\n{ex['output']}", add_special_tokens=False)["input_ids"]
    chat = lm.encode_chat_example(tok, data.to_messages(ex), max_length=cfg.max_length)
    ids, resp = chat["input_ids"], chat["target_mask"]
    forms = [("(a) raw text", raw_ids, [0] + [1] * (len(raw_ids) - 1)),
             ("(b) chat + full-seq loss", ids, [0] + [1] * (len(ids) - 1)),
             ("(c) chat + response-only loss", ids, resp)]
    ctx.table([{"形式": name, "tokens": len(i), "计损失 tokens": sum(mk), "占比": sum(mk) / len(i)}
               for name, i, mk in forms], "同一条样本：token 数与计损失的 token")
    views = "\n\n".join(f"{name}:\n{sft.format_loss_mask(tok, i, mk)}" for name, i, mk in forms)
    print(views)
    ctx.text("计损失的片段（⟦…⟧ 内）：\n\n```\n" + views + "\n```")

    # %% 3. 训练前：基座模型在测试集上的回答损失（每个回答 token 的平均负对数似然）
    model, _ = models.load_lm(cfg.model, seed=cfg.seed)
    question = test_convs[0][:-1]
    m = {"response_loss_before": lm.response_loss(model, tok, test_convs, cfg.max_length)}
    answers = []
    if cfg.answer_tokens:
        answers.append({"模型": "基座（训练前）",
                        "回答": lm.generate(model, tok, [question], cfg.answer_tokens)[0]})
    del model

    # %% 4. 两次 LoRA SFT：只有 loss_on 不同，其余（起点、数据、顺序、种子）完全相同
    logs = {}
    for name, loss_on in [("response_only", "response"), ("full_seq", "full")]:
        labs.seed_everything(cfg.seed)  # LoRA 初始化与数据顺序都从同一个随机状态开始
        s = sft.SFTSettings(model=cfg.model, train_file=train_file, eval_file=None,
                            max_train_samples=cfg.train_samples, output_dir=str(ctx.path(name)),
                            loss_on=loss_on, max_steps=cfg.max_steps, num_epochs=cfg.epochs,
                            batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                            max_length=cfg.max_length, logging_steps=2, save_steps=10**6,
                            save_final=False, eval_before=False, seed=cfg.seed)
        r = sft.run_sft(s)
        trainer = r["trainer"]
        share = sft.loss_token_counts(trainer)  # 训练器真正喂给模型的 labels 里，计损失的占比
        m[f"response_loss_after_{name}"] = lm.response_loss(trainer.model, tok, test_convs,
                                                            cfg.max_length)
        m[f"loss_token_share_{name}"] = share["share"]
        m[f"loss_tokens_{name}"] = share["loss_tokens"]
        m[f"train_loss_{name}"] = r["train_loss"]
        m[f"train_tokens_per_s_{name}"] = r["tokens_per_s"]
        m["train_steps"] = r["global_step"]
        logs[name] = ctx.path(name) / "trainer_log.jsonl"
        if cfg.answer_tokens:
            answers.append({"模型": f"SFT loss_on={loss_on}",
                            "回答": lm.generate(trainer.model, tok, [question], cfg.answer_tokens)[0]})
        del trainer, r

    # %% 5. 结果：训练前后的回答损失 + 损失曲线
    # 看曲线要小心：两次的 train loss 是在不同的 token 集合上平均的，不能直接比。全序列训练
    # 一开始更高（用户问题很难预测），随后更低——每条样本都重复的模板和系统提示很快被"背"下来，
    # 这些容易的 token 拉低了平均值。衡量回答质量要看留出集上的"回答损失"。
    for name in ("response_only", "full_seq"):
        m[f"response_loss_drop_{name}"] = m["response_loss_before"] - m[f"response_loss_after_{name}"]
    m["response_only_beats_full_seq"] = (m["response_loss_after_response_only"]
                                         < m["response_loss_after_full_seq"])
    m.update(train_examples=len(train_recs), test_examples=len(test_convs),
             example_tokens_raw=len(raw_ids), example_tokens_chat=len(ids),
             example_loss_tokens_response_only=sum(resp))
    ctx.table([{"训练方式": name, "训练前": m["response_loss_before"],
                "训练后": m[f"response_loss_after_{name}"], "下降": m[f"response_loss_drop_{name}"],
                "计损失 token 占比": m[f"loss_token_share_{name}"],
                "最终 train loss": m[f"train_loss_{name}"]} for name in ("response_only", "full_seq")],
              "留出测试集上的回答损失（越低越好）")
    if answers:
        ctx.text(f"测试问题：{question[-1]['content']}\n\n参考回答：{test_convs[0][-1]['content']}")
        ctx.table(answers, "同一测试问题的回答（贪心解码）")
    ctx.figure(loss_figure({"response-only": logs["response_only"], "full-seq": logs["full_seq"]},
                           title=f"LoRA SFT on {cfg.model}: train loss"),
               "loss_curves.png", "两种损失掩码的训练损失曲线")
    return m


if __name__ == "__main__":
    labs.run(main, Config,
             full={"train_samples": None, "test_samples": None, "max_steps": -1, "epochs": 1.0,
                   "learning_rate": 5e-4},
             headline=["response_loss_before", "response_loss_after_response_only",
                       "response_loss_after_full_seq", "loss_token_share_response_only",
                       "loss_token_share_full_seq"])
