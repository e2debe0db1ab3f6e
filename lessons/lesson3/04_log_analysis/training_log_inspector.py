# %% [markdown]
# # L3.04 训练日志诊断
# 问题：训练跑完（或跑崩）之后，怎样只看日志就判断出了什么问题？loss 尖峰、NaN、发散、平台期、
# 学习率调度配错、日志写坏——它们在 trainer_log.jsonl、trainer_state.json 和 TensorBoard 事件文件里
# 各是什么样子，检测规则该怎么定才不误报？
# 你将看到：一次真实的短训练写下的三种日志、从中算出的吞吐（tokens/s）与 loss / 梯度范数 / 学习率曲线，
# 以及它的诊断报告（健康的运行不应出现 error 级告警）；然后把 11 种故障逐一注入日志副本，
# 统计检测器找到几个：faults_injected / faults_found / false_alarms。

# %%
import shutil
from typing import Literal

from llmtech import labs
from llmtech.errors import DataError
from llmtech.track import logs
from llmtech.train import sft

# 每种故障注入到哪一种日志：三种格式的读取与检测都要经受检验
PLAN = [("spike", "jsonl"), ("nan", "trainer_state"), ("divergence", "tensorboard"),
        ("plateau", "jsonl"), ("lr_no_warmup", "tensorboard"), ("lr_no_decay", "trainer_state"),
        ("lr_restart", "jsonl"), ("lr_zero", "tensorboard"), ("malformed_lines", "jsonl"),
        ("truncated_file", "trainer_state"), ("truncated_file", "tensorboard")]


class Config(labs.LabConfig):
    train_file: str = "data/support/sft_train.jsonl"
    eval_file: str = "data/support/sft_test.jsonl"
    train_samples: int | None = 80
    eval_samples: int = 8
    steps: int = 20
    batch_size: int = 4
    finetuning: Literal["lora", "full"] = "lora"
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup: float = 4  # 预热步数：lr_no_warmup 故障正是把它"弄丢"
    logging_steps: int = 1  # 每步记一次；点越密，尖峰越容易定位
    eval_steps: int = 10
    max_length: int = 192
    fault_at: float = 0.5  # 故障注入位置（占记录步数的比例）
    thresholds: logs.InspectSettings = logs.InspectSettings()  # 检测阈值，如 thresholds.spike_ratio=2


def main(cfg: Config, ctx: labs.LabContext) -> dict:
    # %% 1. 真实训练：LoRA SFT，同时写 trainer_log.jsonl、检查点里的 trainer_state.json 和 TensorBoard 事件
    run = ctx.path("run")
    shutil.rmtree(run, ignore_errors=True)  # 旧运行留下的 TensorBoard 事件会混进来（诊断会报"步数倒退"）
    s = sft.SFTSettings(
        model=cfg.model, train_file=str(labs.ROOT / cfg.train_file),
        eval_file=str(labs.ROOT / cfg.eval_file), max_train_samples=cfg.train_samples,
        max_eval_samples=cfg.eval_samples, output_dir=str(run), max_steps=cfg.steps,
        batch_size=cfg.batch_size, finetuning=cfg.finetuning, learning_rate=cfg.learning_rate,
        lr_scheduler=cfg.lr_scheduler, warmup=cfg.warmup, logging_steps=cfg.logging_steps,
        eval_steps=cfg.eval_steps, save_steps=cfg.steps, save_total_limit=1, max_length=cfg.max_length,
        seed=cfg.seed, tensorboard=True, eval_before=False, save_final=False)
    result = sft.run_sft(s)
    m = {"train_steps": result["global_step"], "tokens_per_s_run": result.get("tokens_per_s")}

    # %% 2. 诊断健康的运行：三种来源合并（每个指标取点最多的来源），吞吐来自每行日志里的 train_runtime
    healthy = logs.inspect(run, cfg.thresholds)
    logs.write_outputs(healthy, ctx.path("healthy"))  # diagnosis.md / findings.json / log_inspection.png
    ctx.table([{"文件": src.path.relative_to(ctx.out), "类型": src.kind, "记录": src.records,
                "问题": len(src.problems)} for src in healthy.sources], "读到的日志")
    ctx.figure(logs.figure(healthy), "healthy_logs.png", "健康运行：loss、梯度范数、学习率与吞吐")
    t, sm = healthy.throughput, healthy.summary
    m.update(tokens_per_s=t.get("tokens_per_s"), steps_per_s=t.get("steps_per_s"),
             tokens_per_step=t.get("tokens_per_step"), loss_first=sm.get("loss_first"),
             loss_last=sm.get("loss_last"), lr_peak=sm.get("lr_peak"),
             healthy_errors=healthy.counts()["error"], healthy_warnings=healthy.counts()["warning"],
             healthy_findings=",".join(sorted(healthy.kinds())) or "none")
    ctx.table([{"严重度": f.severity, "问题": logs.TITLES[f.kind], "步": f.steps, "说明": f.message}
               for f in healthy.findings] or [{"结果": "未发现问题"}], "健康运行的诊断")

    # %% 3. 注入故障：每种故障写一份日志副本，再用同一个检测器去找。
    # "找到" = 出现了对应类型的发现，且步范围与注入位置重叠（坏行类故障还要求每个坏行号都被报出）。
    # 误报 = 副本里出现了既不是注入故障、也不是健康日志本来就有的发现。
    sources = {src.kind: src.path for src in healthy.sources}
    names = {"jsonl": "trainer_log.jsonl", "trainer_state": "trainer_state.json", "tensorboard": "tb"}
    rows, found, false_alarms = [], 0, healthy.counts()["error"]
    for i, (fault, kind) in enumerate(PLAN):
        dest = ctx.path(f"faults/{i:02d}_{fault}_{kind}") / names[kind]
        if fault == "truncated_file" and kind == "tensorboard":
            dest = dest.with_name("events.out.tfevents.truncated")
        inj = logs.inject_fault(fault, sources[kind], dest, at=cfg.fault_at, warmup_steps=cfg.warmup,
                                seed=cfg.seed)
        got = logs.inspect(dest, cfg.thresholds)
        logs.write_outputs(got, dest.parent / "report")
        hits = logs.detected(got, inj)
        extra = [f for f in got.findings if f.kind not in inj.expect and f.kind not in healthy.kinds()]
        found += bool(hits)
        false_alarms += len(extra)
        m[f"found_{fault}_{kind}"] = bool(hits)
        rows.append({"故障": fault, "日志": kind, "注入": inj.note, "找到": bool(hits),
                     "发现": "; ".join(f"{f.kind}({f.metric})@{f.steps}" for f in hits) or "-",
                     "证据": hits[0].message if hits else "-",
                     "误报": "; ".join(f"{f.kind}@{f.steps}" for f in extra) or "-"})
    ctx.table(rows, "注入的故障与检测结果")
    m.update(faults_injected=len(PLAN), faults_found=found, false_alarms=false_alarms,
             all_faults_found=found == len(PLAN))

    # %% 4. 坏输入：空文件、不存在的文件给出点名文件的错误，而不是崩溃
    empty = ctx.path("faults/empty/trainer_log.jsonl")
    empty.parent.mkdir(parents=True, exist_ok=True)
    empty.write_text("", encoding="utf-8")
    errors = []
    for bad in (empty, ctx.path("faults/missing/trainer_state.json")):
        try:
            logs.inspect(bad)
            errors.append(f"{bad}: (no error)")
        except DataError as e:
            errors.append(str(e))
    m["bad_input_errors_name_the_file"] = all(str(p) in e for p, e in zip(
        (empty, ctx.path("faults/missing/trainer_state.json")), errors))
    ctx.text("坏输入的报错：\n\n" + "\n".join(f"- `{e}`" for e in errors))
    ctx.text(f"命令行：`python -m llmtech.track.logs {run} --out 诊断输出目录` 以 JSON 打印同样的发现；"
             "阈值可用 key=value 覆盖（如 `spike_ratio=2`）。每个故障副本旁的 report/diagnosis.md 是完整的中文诊断报告。")
    return m


if __name__ == "__main__":
    labs.run(main, Config,
             full={"train_samples": None, "eval_samples": 32, "steps": 120, "warmup": 12,
                   "logging_steps": 2, "eval_steps": 30, "max_length": 256},
             headline=["faults_injected", "faults_found", "false_alarms", "healthy_errors",
                       "tokens_per_s", "loss_first", "loss_last"])
