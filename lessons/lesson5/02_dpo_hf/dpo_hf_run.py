# %% [markdown]
# # L5.02 在 Hugging Face 平台上跑 DPO：训练、资源配置、模型卡与上传
# 本实验回答：把一次 DPO 训练搬到 Hugging Face 平台（Jobs / Spaces 的 GPU）上，需要准备什么？
# 1. 训练本身：用项目的 DPO 训练器（TRL DPOTrainer + LoRA）在客服偏好对上训练，留出集上比较训练前后的
#    偏好准确率与隐式奖励间隔——这些数字会写进模型卡。
# 2. 资源配置：用 accelerate 自己的配置类写出 `accelerate launch` 的配置文件并读回校验；按项目的显存估算器
#    （llmtech.dist.memory）列出各种 GPU 规格能不能放下、每步大约多久、多少钱。
#    **显存和步时都是估算**；本机实测的只有 CPU 上的步时和 CPU 矩阵乘吞吐，表里分开标明。
# 3. 发布：用 huggingface_hub 的 ModelCard / ModelCardData 写带 YAML 元数据的模型卡（base_model、
#    library_name: peft、tags、datasets、license、model-index），再用 HfApi.create_repo + upload_folder 上传。
#    没有 token 或没有网络（本机就是这样）时不假装上传：把要上传的文件原样放到 <out>/hub_upload/<repo_id>/，
#    列出文件与大小，并写明没上传的原因。

# %%
import shutil

from llmtech import labs
from llmtech.data.preference import load_pairs
from llmtech.dist.memory import model_shape
from llmtech.io import atomic_write_json
from llmtech.train.dpo import DPOSettings, run_dpo
from llmtech.train.lora import LoraSettings
from llmtech.train.sft import peak_rss_per_rank
from llmtech.track import hub


class Config(labs.LabConfig):
    train_file: str = "data/support/preference.jsonl"
    eval_file: str = "data/support/preference_test.jsonl"
    max_eval_samples: int | None = 40
    steps: int = 12
    batch_size: int = 4
    learning_rate: float = 5e-4
    beta: float = 0.1
    lora_r: int = 8
    max_length: int = 192
    repo_id: str = "smollm2-135m-support-dpo"  # 不带命名空间时，联网上传会放到 token 所属用户名下
    dataset_repo_id: str = "support-preference-pairs"
    private: bool = True  # 联网上传时建私有仓库，确认无误后再在网页上公开
    push: bool = True  # false：只准备上传目录，不连 Hub
    license: str = "apache-2.0"
    num_gpus: int = 1  # accelerate 配置：1 = 单卡；>1 = 单机多卡 DDP
    mixed_precision: str = "bf16"  # T4 这类不支持 bf16 的卡用 fp16
    flavors: list[str] = ["t4-small", "l4x1", "a10g-small", "a100-large", "h200"]
    plan_models: list[str] = ["smollm2-135m", "qwen2.5-1.5b", "llama2-7b"]
    gpu_mfu: float = 0.3  # 假设 GPU 跑到峰值算力的 30%（估算步时用；小模型实际往往更低）


def main(cfg: Config, lab: labs.LabContext) -> dict:
    # %% 1. 先检查输入：仓库名不合法、数据文件不存在，都在加载模型之前报错
    hub.check_repo_id(cfg.repo_id, "repo_id")
    hub.check_repo_id(cfg.dataset_repo_id, "dataset_repo_id")
    flavors = hub.check_flavors(cfg.flavors)
    train = load_pairs(cfg.train_file)
    test = load_pairs(cfg.eval_file, limit=cfg.max_eval_samples)
    print(f"训练 {len(train.rows)} 对，留出 {len(test.rows)} 对；示例：", train.rows[0]["prompt"][-1]["content"])

    # %% 2. DPO 训练：参考策略 = 关掉 LoRA 适配器的同一个模型；run_dpo 训练前后各测一次留出集
    s = DPOSettings(model=cfg.model, train_file=cfg.train_file, eval_file=cfg.eval_file,
                    max_eval_samples=cfg.max_eval_samples, beta=cfg.beta, max_steps=cfg.steps,
                    batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, warmup=0.1,
                    max_length=cfg.max_length, lora=LoraSettings(r=cfg.lora_r, alpha=2 * cfg.lora_r),
                    logging_steps=2, save_steps=10**9, seed=cfg.seed, output_dir=str(lab.path("dpo")))
    res = run_dpo(s)
    tok = res["trainer"].processing_class
    ev = {k: res[f"eval_{k}"] for k in ("preference_accuracy", "preference_accuracy_per_token",
                                         "reward_accuracy", "reward_margin")}
    before = {k: res[f"eval_{k}_before"] for k in ("preference_accuracy", "preference_accuracy_per_token")}
    lab.table([{"measure": k, "SFT（参考）": before.get(k, "—"), "DPO": v} for k, v in ev.items()],
              f"留出偏好对（{res['eval_pairs']} 对）：训练前后")

    # %% 3. 资源配置 (a)：accelerate 配置——用 accelerate 的 ClusterConfig 生成，再按 `accelerate launch` 的方式读回
    acc = hub.accelerate_config(cfg.num_gpus, cfg.mixed_precision)
    want = dict(acc.to_dict())
    acc_file = hub.write_accelerate_config(acc, lab.path("accelerate_config.yaml"),
                                           f"accelerate launch --config_file accelerate_config.yaml "
                                           f"lessons/lesson5/02_dpo_hf/dpo_hf_run.py")
    roundtrip = hub.load_accelerate_config(acc_file).to_dict() == want
    repo_cfg = hub.load_accelerate_config(labs.ROOT / "configs/lessons/L5.02_accelerate.yaml")

    # %% 3. 资源配置 (b)：每步的 token 数（本次数据实测）→ 每步算力；CPU 上实测步时与矩阵乘吞吐
    def n_tokens(conv):
        return min(len(tok(tok.apply_chat_template(conv, tokenize=False))["input_ids"]), cfg.max_length)
    per_pair = sum(n_tokens(r["prompt"] + r["chosen"]) + n_tokens(r["prompt"] + r["rejected"])
                   for r in train.rows) / len(train.rows)
    tokens_per_step = per_pair * cfg.batch_size
    params = model_shape(res["trainer"].model.get_base_model()).params  # N：模型参数量
    cpu_step_s = res["train_runtime_s"] / max(res["global_step"], 1)
    cpu_gflops = hub.cpu_matmul_gflops()
    cpu_mfu = hub.dpo_step_flops(params, tokens_per_step) / cpu_step_s / (cpu_gflops * 1e9)
    lab.table([{"item": "每步 token（chosen+rejected，实测）", "value": round(tokens_per_step, 1)},
               {"item": "每步算力 6·N·T（估算）", "value": f"{hub.dpo_step_flops(params, tokens_per_step):.3g} FLOP"},
               {"item": "CPU 每步时间（实测）", "value": round(cpu_step_s, 2)},
               {"item": "CPU fp32 矩阵乘吞吐 GFLOP/s（实测）", "value": round(cpu_gflops, 1)},
               {"item": "CPU 上的算力利用率（由上面三项算出）", "value": round(cpu_mfu, 3)}], "算力：实测与推算")

    # %% 3. 资源配置 (c)：GPU 规格表——显存用项目估算器（LoRA、bf16 权重、每步 2×batch 条序列），
    #     步时 = 每步算力 /（峰值 × gpu_mfu），价格联网时读 HfApi.list_jobs_hardware，离线用参考价
    decision = hub.decide_upload() if cfg.push else hub.UploadDecision(False, "配置 push=false")
    prices = hub.job_prices(decision, flavors)
    plan_models = list(dict.fromkeys([cfg.model, *cfg.plan_models]))  # 本次训练的模型排第一
    plan = hub.hardware_plan(plan_models, flavors, cfg.batch_size, cfg.max_length, tokens_per_step,
                             cfg.gpu_mfu, prices)
    lab.table(plan, "Hugging Face GPU 规格（显存、步时、费用均为估算；多卡按理想数据并行折算到每 batch）")
    lab.text(f"价格来源：{next(iter(prices.values()))[1]}。步时假设 GPU 利用率 {cfg.gpu_mfu}"
             f"（本机 CPU 实测利用率 {cpu_mfu:.2f}）；135M 这样的小模型在 GPU 上主要受 kernel 启动开销限制，实际步时更长。")

    # %% 4. 模型卡：ModelCardData 写 YAML 元数据，model-index 里是本次实测的留出指标
    repo_id = hub.full_repo_id(cfg.repo_id, decision.user)
    data_id = hub.full_repo_id(cfg.dataset_repo_id, decision.user)
    metrics = {"pa": ("accuracy", "preference accuracy (sum log-prob)", ev["preference_accuracy"]),
               "pt": ("accuracy", "preference accuracy (per-token log-prob)", ev["preference_accuracy_per_token"]),
               "ra": ("accuracy", "implicit reward accuracy", ev["reward_accuracy"]),
               "rm": ("reward_margin", "implicit reward margin", ev["reward_margin"])}
    body = (f"# {repo_id}\n\n{cfg.model} 上用 DPO（TRL DPOTrainer，sigmoid 损失，β={cfg.beta}）训练的 LoRA 适配器"
            f"（r={cfg.lora_r}），数据为 llmtech 项目自写的客服偏好对（{len(train.rows)} 对）。\n\n"
            "## 留出集结果（训练前 → 训练后）\n\n" + labs.markdown_table(
                [{"metric": k, "before": before.get(k, "—"), "after": v} for k, v in ev.items()])
            + f"\n训练 {res['global_step']} 步，batch {cfg.batch_size}，max_length {cfg.max_length}，"
            f"学习率 {cfg.learning_rate}，种子 {cfg.seed}。\n\n## 用法\n\n```python\nfrom peft import AutoPeftModelForCausalLM\n"
            f"model = AutoPeftModelForCausalLM.from_pretrained(\"{repo_id}\")\n```\n\n"
            "## 在 Hugging Face Jobs 上复现\n\n```bash\nhf jobs run --flavor a10g-small --secrets HF_TOKEN "
            "pytorch/pytorch:latest bash -c \"git clone <本项目仓库地址> llmtech && cd llmtech && pip install -e . && accelerate launch --config_file "
            "accelerate_config.yaml lessons/lesson5/02_dpo_hf/dpo_hf_run.py\"\n```\n")
    card = hub.build_model_card(model_name=repo_id.split("/")[-1], base_model=hub.hub_model_id(cfg.model),
                                datasets=[data_id], license=cfg.license, metrics=metrics,
                                dataset_name="llmtech support preference pairs (test)", body=body,
                                tags=["dpo", "trl", "lora", "llmtech"], language=["zh", "en"])
    model_dir = lab.path("hub_model")
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.copytree(res["final_dir"], model_dir)  # 适配器权重、adapter_config.json、分词器
    hub.write_card(card, model_dir)  # 替换 PEFT 自动生成的空白模型卡
    shutil.copy(acc_file, model_dir / "accelerate_config.yaml")
    atomic_write_json(model_dir / "eval_results.json", {"before": before, "after": ev})
    data_dir = lab.path("hub_dataset")
    shutil.rmtree(data_dir, ignore_errors=True)
    (data_dir / "data").mkdir(parents=True)
    shutil.copy(cfg.train_file, data_dir / "data/train.jsonl")
    shutil.copy(cfg.eval_file, data_dir / "data/test.jsonl")
    hub.write_card(hub.build_dataset_card(license=cfg.license, language=["zh", "en"],
                                          body="# 客服偏好对\n\nprompt / chosen / rejected 三列，llmtech 项目自写。"), data_dir)

    # %% 5. 上传（或离线时准备好上传目录）：先数据集、再模型，模型卡里的 datasets 指向这个数据集仓库
    pushed_data = hub.push_folder(data_dir, data_id, decision, lab.out, repo_type="dataset", private=cfg.private)
    pushed = hub.push_folder(model_dir, repo_id, decision, lab.out, private=cfg.private,
                             commit_message=f"DPO LoRA adapter ({res['global_step']} steps)")
    lab.table(pushed["files"], f"模型仓库 {pushed['repo_id']} 的文件")
    print(pushed["reason"])
    lab.text(pushed["reason"])

    mine = [r for r in plan if r["model"] == model_shape(cfg.model).name]
    return {"train_pairs": len(train.rows), "eval_pairs": res["eval_pairs"], "train_steps": res["global_step"],
            "train_loss": res["train_loss"],
            "pref_acc_before": before["preference_accuracy"], "pref_acc_after": ev["preference_accuracy"],
            "pref_acc_per_token_before": before["preference_accuracy_per_token"],
            "pref_acc_per_token_after": ev["preference_accuracy_per_token"],
            "reward_accuracy": ev["reward_accuracy"], "reward_margin": ev["reward_margin"],
            "cpu_step_s_measured": round(cpu_step_s, 3), "cpu_matmul_gflops_measured": round(cpu_gflops, 1),
            "cpu_mfu_measured": round(cpu_mfu, 4), "cpu_peak_rss_mb_measured": peak_rss_per_rank()[0],
            "tokens_per_step_measured": round(tokens_per_step, 1),
            "est_gpu_mem_gb_run_model": mine[0]["est_mem_gb"], "plan_rows_fit": sum(r["fits"] for r in plan),
            "accelerate_config_roundtrip": roundtrip,
            "accelerate_repo_config_processes": repo_cfg.num_processes,
            "uploaded": pushed["uploaded"], "upload_reason": pushed["reason"],
            "dataset_uploaded": pushed_data["uploaded"], "repo_id": pushed["repo_id"],
            "upload_dir": pushed.get("local_dir") or pushed.get("url", ""),
            "upload_file_count": len(pushed["files"]), "upload_total_bytes": pushed["total_bytes"],
            "upload_files": ",".join(f["path"] for f in pushed["files"])}


if __name__ == "__main__":
    # 完整版：更多步数、全部留出对。GPU 上：accelerate launch --config_file configs/lessons/L5.02_accelerate.yaml
    #   lessons/lesson5/02_dpo_hf/dpo_hf_run.py --config configs/lessons/L5.02_gpu.yaml
    labs.run(main, Config, full={"steps": 120, "max_eval_samples": None},
             headline=["pref_acc_per_token_before", "pref_acc_per_token_after", "reward_margin",
                       "uploaded", "upload_file_count"])
