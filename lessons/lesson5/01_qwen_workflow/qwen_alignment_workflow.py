# %% [markdown]
# # L5.01 对齐工作流：从数据接入到上线，一条命令
# 问题：真实业务里，对齐不是一次训练，而是一条流水线：数据校验与清洗 → SFT → DPO → 评测 → 导出 → 上线。
# 怎样让它"一条命令跑完"，又能在中途被打断、改了一个参数之后只重跑受影响的阶段？
# 做法：llmtech.workflow 把每个阶段的输入（配置项、输入文件内容、上游阶段）算成一个 SHA-256 键，
# 阶段完成后把键、产物和指标记进 workflow_state.json；再跑时键没变、产物还在的阶段直接跳过。
# 你将看到：
# 1. 第一次运行：七个阶段依次执行，每个阶段打印自己的指标，最后经 OpenAI 兼容接口回答留出问题；
# 2. 第二次运行（同样的配置）：全部跳过，几秒结束；
# 3. 改一个 DPO 参数（完整模式）：data、sft、index 跳过，dpo 及其下游重跑。
# 模型：离线用内置 SmolLM2-135M；有 GPU、能联网的同学把 model 换成 ms:Qwen/Qwen2.5-0.5B-Instruct
# （ModelScope）或 Qwen/Qwen2.5-0.5B-Instruct（Hugging Face），其余代码不变。

# %%
from pathlib import Path

from llmtech import labs
from llmtech.workflow import STAGES, WorkflowConfig, run_workflow


class Config(labs.LabConfig):
    sft_steps: int = 24
    dpo_steps: int = 8
    dpo_beta: float = 0.1
    questions: int = 6        # 经接口提问的留出问题数（其中 unanswerable 道知识库里没有答案）
    unanswerable: int = 2
    eval_samples: int = 24
    gguf_type: str = "q8_0"   # q8_0 / f16 / f32
    change_beta_to: float | None = None  # 第三次运行时把 dpo_beta 改成它（None = 不做这一步）


def main(cfg: Config, lab: labs.LabContext) -> dict:
    # %% 1. 配置：数据文件用仓库自带的客服数据（相对仓库根目录解析成绝对路径）
    root = labs.ROOT
    wf = WorkflowConfig(
        model=cfg.model, seed=cfg.seed, sft_steps=cfg.sft_steps, dpo_steps=cfg.dpo_steps,
        dpo_beta=cfg.dpo_beta, questions=cfg.questions, unanswerable=cfg.unanswerable,
        eval_samples=cfg.eval_samples, gguf_type=cfg.gguf_type,
        **{k: str(root / getattr(WorkflowConfig(), k)) for k in (
            "sft_train_file", "sft_test_file", "pref_train_file", "pref_test_file", "qa_file", "kb_docs")})
    out = lab.path("workflow")

    # %% 2. 第一次运行：每个阶段真实执行（除非 out 里已有同样键的记录——重复运行本实验时就会跳过）
    first = run_workflow(wf, out)
    lab.text((out / "report.md").read_text(encoding="utf-8"))
    for ex in first.get("serve_examples", []):
        print(f"问：{ex['question']}\n答：{ex['answer']}\n（标准答案：{ex['gold'] or '知识库里没有'}）\n")
    lab.table(first.get("serve_examples", []), "上线后的模型经 /v1/chat/completions 的回答（节选）")
    # 流水线通了，不等于模型好用：离线评测（response loss、偏好准确率）变好，经接口回答的准确率却可能仍是 0——
    # 135M 模型、几十步训练，中文回答常常只是复述提示词。上线前看的是端到端指标，而不只是训练曲线。
    lab.text(f"经接口回答：答案准确率 {first.get('serve_answer_acc')}、拒答准确率 {first.get('serve_refusal_acc')}"
             f"（{first.get('serve_questions')} 题）；离线评测 response loss {first.get('response_loss_start')} → "
             f"{first.get('response_loss_final')}。两者不一致时，以端到端指标决定能否上线。")

    # %% 3. 第二次运行，配置不变：所有阶段的键都没变 → 全部跳过
    second = run_workflow(wf, out)
    runs = [{"运行": "第 1 次", "执行": first["stages_ran"], "跳过": first["stages_skipped"],
             "秒": first["total_seconds"]},
            {"运行": "第 2 次（配置不变）", "执行": second["stages_ran"], "跳过": second["stages_skipped"],
             "秒": second["total_seconds"]}]
    m = {"stages": len(STAGES), "first_run_s": first["total_seconds"],
         "second_run_ran": second["stages_ran"], "second_run_skipped": second["stages_skipped"],
         "second_run_s": second["total_seconds"]}

    # %% 4. 改一个参数：只有依赖它的阶段重跑（dpo → eval、export、serve），上游的 data、sft 与无关的 index 跳过
    if cfg.change_beta_to is not None:
        third = run_workflow(wf.model_copy(update={"dpo_beta": cfg.change_beta_to}), out)
        runs.append({"运行": f"第 3 次（dpo_beta → {cfg.change_beta_to}）", "执行": third["stages_ran"],
                     "跳过": third["stages_skipped"], "秒": third["total_seconds"]})
        m.update(third_run_ran=third["stages_ran"], third_run_skipped=third["stages_skipped"],
                 third_run_reran=",".join(s for s in STAGES if third[f"stage_{s}"] == "ran"))
    lab.table(runs, "可续跑：哪些阶段真正执行了")

    # %% 5. 每个阶段的指标（来自第一次运行）
    keys = ["sft_records_in", "sft_records_out", "pref_pairs_in", "pref_pairs_out",
            "sft_eval_loss_before", "sft_eval_loss_after", "dpo_pref_acc_before", "dpo_pref_acc_after",
            "response_loss_start", "response_loss_final", "pref_acc_start", "pref_acc_final",
            "export_safetensors_mb", "export_gguf_mb", "gguf_max_abs_logit_diff", "gguf_same_top_token",
            "index_documents", "index_chunks", "serve_questions", "serve_answer_acc", "serve_refusal_acc",
            "serve_latency_p50_s", "serve_service_stopped"]
    m.update({k: first[k] for k in keys if k in first})
    m["state_file"] = str(out / "workflow_state.json")
    return m


if __name__ == "__main__":
    labs.run(main, Config, full={"sft_steps": 120, "dpo_steps": 40, "questions": 20, "unanswerable": 4,
                                 "eval_samples": 64, "change_beta_to": 0.2},
             headline=["sft_eval_loss_before", "sft_eval_loss_after", "dpo_pref_acc_before",
                       "dpo_pref_acc_after", "response_loss_start", "response_loss_final",
                       "export_gguf_mb", "gguf_max_abs_logit_diff", "serve_answer_acc",
                       "second_run_skipped", "second_run_s"])
