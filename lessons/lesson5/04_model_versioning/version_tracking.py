# %% [markdown]
# # L5.04 MLflow / W&B 模型版本管理
# 问题：同一个客服模型训练了好几版（学习率、步数不同），哪一版该上线？凭什么？出了问题能不能
# 查到它是用哪份数据、哪个基座、哪套配置、哪次代码提交训练出来的？
# 做法：用项目自己的 LoRA SFT 训练器真实训练几版适配器，在留出测试集上测 response loss（越低越好），
# 然后：
# 1. MLflow（本地 SQLite 后端 `mlflow.db` + `artifacts/` 目录）记录每次运行的参数、逐步损失、
#    最终指标和产物（适配器目录、配置、指标文件），并把适配器登记为模型注册表里的一个版本；
# 2. 血缘标签：数据内容哈希、基座模型、适配器哈希、配置哈希、git 提交；
# 3. 晋升规则：新版本先挂 `challenger` 别名，只有测试损失比 `champion` 低出 margin 以上才接管
#    `champion`——本实验故意放进一个很差的配置（学习率极小），展示一次"拒绝"；
# 4. W&B 离线模式记录同样的运行（配置、逐步指标、适配器 artifact），离线目录可以日后
#    `wandb sync` 上传（这里只做 `--dry-run`，不联网）。
# 你将看到：版本对比表（参数 / 指标 / 血缘）、每次晋升或拒绝的理由、当前 champion 版本号。

# %%
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt

from llmtech import labs, models
from llmtech.config import StrictModel
from llmtech.data import load, to_messages
from llmtech.evals import lm
from llmtech.io import atomic_write_json
from llmtech.track import registry as R
from llmtech.train.callbacks import read_log
from llmtech.train.lora import LoraSettings
from llmtech.train.sft import SFTSettings, run_sft


class Candidate(StrictModel):
    name: str
    learning_rate: float
    steps: int
    lora_r: int = 8


class Config(labs.LabConfig):
    train_file: str = "data/support/sft_train.jsonl"
    test_file: str = "data/support/sft_test.jsonl"
    max_train_samples: int | None = 64
    eval_samples: int | None = 32          # None = 整个留出测试集
    max_length: int = 160
    batch_size: int = 4
    # 依次训练、登记、按规则决定是否晋升；第三个是故意很差的配置（学习率太小，几乎没学）
    candidates: list[Candidate] = [Candidate(name="baseline", learning_rate=2e-4, steps=4),
                                   Candidate(name="lr1e-3-8steps", learning_rate=1e-3, steps=8),
                                   Candidate(name="tiny-lr", learning_rate=1e-6, steps=4)]
    margin: float = 0.02                   # 测试损失至少降低这么多（nats/token）才晋升
    model_name: str = "support-sft-lora"   # 注册表里的模型名
    experiment: str = "L5.04-versioning"
    registry_dir: str | None = None        # None = <out>/mlflow
    wandb_dir: str | None = None           # None = <out>/wandb
    fresh: bool = True                     # 输出目录里已有注册表时：True = 改名存档后从空表开始


def main(cfg: Config, ctx: labs.LabContext) -> dict:
    # %% 1. 数据：训练集 + 留出测试集；数据内容哈希是血缘的第一项
    train_file, test_file = labs.ROOT / cfg.train_file, labs.ROOT / cfg.test_file
    test = load(test_file)[: cfg.eval_samples]
    convs = [to_messages(r) for r in test]
    print(f"测试样例 {len(convs)} 条，例：{test[0]['instruction'][:60]} -> {test[0]['output'][:60]}")

    # %% 2. 打开 MLflow 存储：目录不存在就创建；mlflow.db 损坏则报错并原样保留（绝不覆盖或删除）
    root = Path(cfg.registry_dir) if cfg.registry_dir else ctx.path("mlflow")
    db = R.check_backend(root)
    if cfg.fresh and db.exists():  # 上一次实验留下的注册表：改名存档，本次从空表开始，结果可复现
        archived = root.with_name(f"{root.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}")
        root.rename(archived)
        print(f"已有注册表存档到 {archived}")
    reg = R.ModelRegistry(root, cfg.experiment, cfg.model_name)
    wandb_root = Path(cfg.wandb_dir) if cfg.wandb_dir else ctx.path("wandb")

    # %% 3. 基座模型在测试集上的损失：每个版本都要和它比
    base, tok = models.load_lm(cfg.model, seed=cfg.seed)
    base_loss = lm.response_loss(base, tok, convs, cfg.max_length)
    del base
    print(f"基座模型 response loss = {base_loss:.4f}")

    # %% 4. 逐个训练候选版本 → MLflow 运行 + 注册版本 + W&B 离线运行 → 晋升规则
    decisions, wandb_runs, rows = [], {}, []
    for cand in cfg.candidates:
        run_dir = ctx.path(f"sft/{cand.name}")
        s = SFTSettings(model=cfg.model, train_file=str(train_file), eval_file=None, seed=cfg.seed,
                        max_train_samples=cfg.max_train_samples, output_dir=str(run_dir),
                        max_steps=cand.steps, batch_size=cfg.batch_size,
                        learning_rate=cand.learning_rate, max_length=cfg.max_length,
                        logging_steps=1, save_steps=10**9, eval_before=False,
                        lora=LoraSettings(r=cand.lora_r, alpha=2 * cand.lora_r))
        model, tok = models.load_lm(cfg.model, seed=cfg.seed)  # 每个版本都从同一个基座出发
        res = run_sft(s, model=model, tokenizer=tok)
        eval_loss = lm.response_loss(res["trainer"].model, tok, convs, cfg.max_length)
        adapter = Path(res["final_dir"])
        metrics = {"eval_response_loss": eval_loss, "base_response_loss": base_loss,
                   "train_loss": res["train_loss"], "train_runtime_s": res["train_runtime_s"],
                   "tokens_per_s": res.get("tokens_per_s", 0.0), "global_step": res["global_step"]}
        atomic_write_json(run_dir / "config.json", s.model_dump(mode="json"))
        atomic_write_json(run_dir / "metrics.json", metrics)
        history = [{"step": r["step"], **{k: r[k] for k in ("loss", "grad_norm", "learning_rate")
                                          if k in r}} for r in read_log(run_dir / "trainer_log.jsonl")]
        history = [h for h in history if "loss" in h]
        tags = R.lineage([train_file, test_file], cfg.model, adapter, s.model_dump(mode="json"),
                         labs.ROOT)
        params = {"candidate": cand.name, "learning_rate": cand.learning_rate, "max_steps": cand.steps,
                  "lora_r": cand.lora_r, "batch_size": cfg.batch_size, "max_length": cfg.max_length,
                  "max_train_samples": cfg.max_train_samples, "eval_samples": len(convs),
                  "seed": cfg.seed, "base_model": cfg.model}
        run_id = reg.log_run(cand.name, params, metrics, history, tags=tags,
                             artifacts={"adapter": adapter, "config": run_dir / "config.json",
                                        "metrics": run_dir / "metrics.json"})
        version = reg.register(run_id, "adapter", tags=tags, description=f"LoRA 候选 {cand.name}")
        # 同一次运行也记到 W&B（离线）：配置、逐步损失、最终指标、适配器 artifact
        wb = R.log_wandb_offline(wandb_root, cfg.experiment, f"v{version}-{cand.name}",
                                 {**params, **tags}, history, metrics, adapter,
                                 f"{cfg.model_name}-adapter", artifact_metadata={"mlflow_version": version})
        wandb_runs[version] = wb
        reg.tag_version(version, {"wandb_run_id": wb.run_id, "wandb_offline_dir": str(wb.run_dir)})
        d = R.promote(reg, version, "eval_response_loss", cfg.margin)
        decisions.append(d)
        print(d.reason, flush=True)
        rows.append({"version": version, "candidate": cand.name, "eval_loss": eval_loss,
                     "champion_before": d.champion_version or "-", "决定": "晋升" if d.promoted else "拒绝",
                     "理由": d.reason})
    ctx.table(rows, title=f"晋升决策（margin = {cfg.margin}，基座 loss = {base_loss:.4f}）")

    # %% 5. 从 SQLite 存储读回所有版本：参数 + 指标 + 血缘（对比表就是注册表的内容）
    versions = reg.versions()
    ctx.table([v.row(["eval_response_loss", "train_loss"], ["candidate", "learning_rate", "max_steps"],
                     ["dataset_sha256", "adapter_sha256", "config_sha256", "git_commit"])
               for v in versions], title=f"模型注册表 {cfg.model_name}（MLflow，{db}）")
    champion = reg.alias(R.CHAMPION)
    # 图中文字用英文：默认字体没有中文字形
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for v in versions:
        hist = reg.metric_history(v.run_id, "loss")
        a1.plot([h[0] for h in hist], [h[1] for h in hist], marker="o",
                label=f"v{v.version} {v.params['candidate']}")
    a1.set(xlabel="step", ylabel="train loss", title="train loss per step (read back from MLflow)")
    a1.legend()
    a2.bar([f"v{v.version}" for v in versions], [v.metrics["eval_response_loss"] for v in versions],
           color=["tab:green" if v.version == champion else "tab:gray" for v in versions])
    a2.axhline(base_loss, color="tab:red", ls="--", label="base model")
    lows = [v.metrics["eval_response_loss"] for v in versions] + [base_loss]
    pad = 0.15 * (max(lows) - min(lows)) + 1e-3  # 纵轴只框住数据范围，差别才看得见
    a2.set_ylim(min(lows) - pad, max(lows) + pad)
    a2.set(ylabel="held-out response loss", title=f"champion = v{champion} (green)")
    a2.legend()
    ctx.figure(fig, "versions.png", "逐步训练损失与各版本测试损失")

    # %% 6. W&B 离线目录：读回 run-*.wandb 文件核对指标；`wandb sync --dry-run` 只列出将上传什么
    wb_rows, wb_match = [], True
    for v in versions:
        wb = wandb_runs[v.version]
        back = R.read_wandb_offline(wb.run_file)
        same = abs(back["summary"].get("eval_response_loss", float("nan"))
                   - v.metrics["eval_response_loss"]) < 1e-9
        wb_match &= same
        wb_rows.append({"version": v.version, "wandb_run": wb.run_id, "history_rows": len(back["history"]),
                        "artifact": ",".join(a["name"] for a in back["artifacts"]),
                        "eval_loss_in_wandb": back["summary"].get("eval_response_loss"),
                        "与 MLflow 一致": same, "离线目录": wb.run_dir.name})
    ctx.table(wb_rows, title="W&B 离线运行（未联网）")
    dry = R.wandb_sync_dry_run(wandb_runs[versions[-1].version].run_dir, wandb_root)
    ctx.text(f"上传命令（需要联网和 API key，本实验不执行）：`{wandb_runs[versions[-1].version].sync_command}`"
             f"\n\n`wandb sync --dry-run` 的输出：\n\n```\n{dry}\n```")
    print(dry)

    # %% 7. 指标
    m = {"versions_registered": len(decisions), "versions_total": len(versions),
         "champion_version": int(champion or 0), "base_eval_loss": base_loss,
         "champion_eval_loss": reg.version(champion).metrics["eval_response_loss"] if champion else None,
         "promotions": sum(d.promoted for d in decisions),
         "refusals": sum(not d.promoted for d in decisions), "margin": cfg.margin,
         "wandb_runs": len(wandb_runs), "wandb_matches_mlflow": wb_match,
         "wandb_sync_dry_run_ok": "Would sync 1 run" in dry,
         "git_commit": versions[-1].tags.get("lineage.git_commit", "unknown"),
         "mlflow_db": str(db)}
    for d in decisions:
        m[f"eval_loss_v{d.version}"] = d.challenger_value
        m[f"promoted_v{d.version}"] = d.promoted
    return m


if __name__ == "__main__":
    labs.run(main, Config,
             full={"max_train_samples": None, "eval_samples": None,
                   "candidates": [{"name": "baseline", "learning_rate": 2e-4, "steps": 30},
                                  {"name": "lr1e-3-60steps", "learning_rate": 1e-3, "steps": 60},
                                  {"name": "tiny-lr", "learning_rate": 1e-6, "steps": 30}]},
             headline=["versions_registered", "champion_version", "champion_eval_loss",
                       "base_eval_loss", "promotions", "refusals"])
