"""Lab registry and runner: the contract every lab script follows.

A lab script ends with ``labs.run(main, Config)``. The runner parses
``[--quick] [--config F.yaml] [--out DIR] [key=value ...]``, validates the config, seeds every
RNG, calls ``main(cfg, lab)`` and writes ``DIR/metrics.json`` (flat JSON) and ``DIR/report.md``.
Bad input ends in a one-line error and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import StrictModel, load_config
from .errors import LlmtechError
from .io import atomic_savefig, atomic_write_json, atomic_write_text
from .models import DEFAULT_LM

ROOT = Path(__file__).resolve().parents[2]  # repository root (src layout)
LESSONS = ROOT / "lessons"


@dataclass(frozen=True)
class Lab:
    id: str
    path: str  # relative to lessons/
    title: str

    @property
    def file(self) -> Path:
        return LESSONS / self.path

    @property
    def built(self) -> bool:
        return self.file.exists()

    @property
    def status(self) -> str:
        return "built" if self.built else "not built yet"


def _labs() -> list[Lab]:
    spec = {
        1: [("01_sft_basics/sft_theory_notebook.py", "SFT 与指令微调：损失掩码对比"),
            ("02_data_preprocess/data_pipeline.py", "数据工程：文档→指令→清洗去重"),
            ("03_hf_finetune/hf_finetune_scaffold.py", "Hugging Face Trainer/TRL 训练脚手架"),
            ("04_lora_theory/lora_parameter_viz.py", "LoRA 参数量与低秩结构可视化"),
            ("05_lora_finetune/lora_chatglm_demo.py", "LoRA 微调对话模型、合并与保存"),
            ("06_cpu_deploy/cpu_inference_case.py", "CPU 推理部署：精度/量化/GGUF 对比")],
        2: [("01_qlora_intro/qlora_theory.py", "QLoRA 理论：NF4、双重量化、分页优化器"),
            ("02_qlora_pipeline/qlora_trainer.py", "QLoRA 训练流程"),
            ("03_ptuning/ptuning_v2_demo.py", "P-Tuning v2 深层提示"),
            ("04_model_compression/compression_lab.py", "模型压缩：剪枝、蒸馏、量化"),
            ("05_deepspeek_quant/deepspeek_deploy.py", "DeepSpeed + bitsandbytes 量化部署"),
            ("06_method_selection/method_selector.py", "LoRA / QLoRA / P-Tuning 选型")],
        3: [("01_distributed_training/zero3_configurator.py", "ZeRO-3 配置生成与显存规划"),
            ("02_8gpu_config/ds_config_builder.py", "8 卡 671B 参考配置"),
            ("03_training_acceleration/acceleration_tricks.py", "训练加速技巧实测"),
            ("04_log_analysis/training_log_inspector.py", "训练日志诊断"),
            ("05_evaluation/evaluation_metrics.py", "评估指标体系"),
            ("06_vertical_case/domain_finetune_case.py", "垂直领域分布式微调")],
        4: [("01_alignment_overview/compare_methods.py", "RLHF / DPO / KTO 对比"),
            ("02_rlhf_pipeline/rlhf_pipeline.py", "SFT→奖励模型→PPO 流水线"),
            ("03_reward_model_training/train_reward_model.py", "奖励模型训练与评估"),
            ("04_dpo/dpo_train.py", "DPO 训练与目标函数推导"),
            ("05_incremental_learning/incremental_lora.py", "增量 LoRA 与模型合并"),
            ("06_dataset_curation/dataset_curation.py", "对齐数据构建与审查")],
        5: [("01_qwen_workflow/qwen_alignment_workflow.py", "对齐端到端工作流"),
            ("02_dpo_hf/dpo_hf_run.py", "Hugging Face 平台 DPO"),
            ("03_bias_detection/bias_scan.py", "偏差检测与安全审查"),
            ("04_model_versioning/version_tracking.py", "MLflow / W&B 模型版本管理"),
            ("05_customer_support_case/customer_alignment.py", "客服场景反馈闭环"),
            ("06_diversity_debug/diversity_evaluation.py", "回答多样性调试")],
        6: [("01_vector_store_selection/knowledge_base_selection.py", "向量库选型对比"),
            ("02_data_preprocessing/data_preprocess.py", "文档分块与向量化"),
            ("03_vector_db_build/build_vector_store.py", "FAISS 向量库构建与增量更新"),
            ("04_rag_architecture/rag_architecture_demo.py", "检索-重排-生成架构"),
            ("05_ragflow_deployment/ragflow_demo.py", "RAGFlow 部署与调试"),
            ("06_optimization/optimization_lab.py", "检索与生成质量监控")],
        7: [("01_hybrid_retrieval/hybrid_retrieval.py", "BM25 + 向量混合检索"),
            ("02_langchain_orchestration/langchain_rag_pipeline.py", "LangChain RAG 编排"),
            ("03_incremental_updates/update_strategy.py", "增量索引与审计日志"),
            ("04_enterprise_case/customer_service_case.py", "企业客服知识库案例"),
            ("05_hybrid_inference/hybrid_inference.py", "混合推理与故障回退"),
            ("06_performance_testing/performance_benchmark.py", "性能压测")],
    }
    out = []
    for lesson, items in spec.items():
        for i, (path, title) in enumerate(items, 1):
            out.append(Lab(f"L{lesson}.{i:02d}", f"lesson{lesson}/{path}", title))
    return out


LABS: list[Lab] = _labs()


def get_lab(lab_id: str) -> Lab:
    key = lab_id.upper()
    for lab in LABS:
        if lab.id == key:
            return lab
    raise LlmtechError(f"unknown lab '{lab_id}'; `llmtech lab list` shows the 42 lab ids")


def lab_for_file(path: str | os.PathLike) -> Lab | None:
    p = Path(path).resolve()
    for lab in LABS:
        if lab.file.resolve() == p:
            return lab
    return None


# --------------------------------------------------------------------------- config + context

class LabConfig(StrictModel):
    """Settings every lab has. Subclass it in the lab; defaults are the quick mode."""

    seed: int = 0
    model: str = DEFAULT_LM
    quick: bool = False


@dataclass
class LabContext:
    """What a lab's ``main`` gets besides its config: the output folder and a report builder."""

    out: Path
    lab_id: str
    title: str
    sections: list[str] = field(default_factory=list)

    def path(self, name: str) -> Path:
        return self.out / name

    def text(self, markdown: str) -> None:
        self.sections.append(markdown.strip() + "\n")

    def table(self, rows: list[dict[str, Any]], title: str | None = None, show: bool = True) -> str:
        md = markdown_table(rows)
        if title:
            md = f"### {title}\n\n{md}"
        self.sections.append(md)
        if show:
            print("\n" + md, flush=True)
        return md

    def figure(self, fig, name: str, caption: str = "") -> Path:
        """Save a matplotlib figure as PNG next to metrics.json and link it in report.md."""
        path = atomic_savefig(fig, self.out / name, dpi=110)
        self.sections.append(f"![{caption or name}]({name})\n")
        return path


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)\n"
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass


def _check_flat(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "item") and callable(v.item):  # numpy / torch scalars
            v = v.item()
        if v is not None and not isinstance(v, (int, float, str, bool)):
            raise TypeError(f"metrics.json must be flat: key {k!r} has a {type(v).__name__}")
        out[k] = v
    return out


def run(main: Callable[[Any, LabContext], dict[str, Any]], config_cls: type[LabConfig],
        full: dict[str, Any] | None = None, headline: list[str] | None = None,
        argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of every lab script (see module docstring).

    ``full`` holds the settings of the full (non-quick) run; ``headline`` names the metrics that
    show the lab's effect (they lead report.md and the course REPORT.md).
    """
    import __main__

    lab = lab_for_file(getattr(__main__, "__file__", "") or "")
    lab_id = lab.id if lab else Path(sys.argv[0]).stem
    title = lab.title if lab else lab_id
    parser = argparse.ArgumentParser(prog=Path(sys.argv[0]).name, description=f"{lab_id} {title}")
    parser.add_argument("--quick", action="store_true", help="quick mode (<= 5 min on 2 CPU cores)")
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--out", help="output folder (default runs/<lab id>)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        defaults = {} if args.quick else dict(full or {})
        defaults["quick"] = bool(args.quick)
        cfg = load_config(config_cls, args.config, args.overrides, defaults=defaults)
        out = Path(args.out or ROOT / "runs" / lab_id)
        out.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        ctx = LabContext(out=out, lab_id=lab_id, title=title)
        t0 = time.time()
        metrics = main(cfg, ctx) or {}
        wall = time.time() - t0
        record = {"lab": lab_id, "title": title, "quick": cfg.quick, "seed": cfg.seed,
                  "model": getattr(cfg, "model", ""), **_check_flat(metrics),
                  "wall_time_s": round(wall, 2)}
        if headline:
            missing = [h for h in headline if h not in record]
            if missing:
                raise TypeError(f"headline metrics missing from the lab's result: {missing}")
            record["headline"] = ",".join(headline)
        atomic_write_json(out / "metrics.json", record)
        head = [{"metric": h, "value": record[h]} for h in (headline or [])]
        report = [f"# {lab_id} {title}\n", f"配置：`{cfg.model_dump_json()}`\n"]
        if head:
            report.append("## 核心结果\n\n" + markdown_table(head))
        report += ctx.sections
        report.append("## 全部指标\n\n" + markdown_table(
            [{"metric": k, "value": v} for k, v in record.items()]))
        atomic_write_text(out / "report.md", "\n".join(report))
        print(f"\n[{lab_id}] metrics -> {out / 'metrics.json'}  ({wall:.1f}s)", flush=True)
        return record
    except LlmtechError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def run_lab_subprocess(lab: Lab, quick: bool, out: Path | None, overrides: list[str]) -> int:
    """Run a lab script in a fresh interpreter (how `llmtech lab run` and run-all call labs)."""
    if not lab.built:
        raise LlmtechError(f"{lab.id} ({lab.path}) is not built yet")
    cmd = [sys.executable, str(lab.file)]
    if quick:
        cmd.append("--quick")
    cmd += ["--out", str(out or ROOT / "runs" / lab.id)]
    cmd += list(overrides)
    return subprocess.call(cmd, cwd=str(ROOT))


DEMO_LABS = ["L1.02", "L1.05", "L1.06"]  # data pipeline -> LoRA SFT + held-out eval -> CPU deploy


def run_labs(ids: list[str], quick: bool, out: Path) -> list[dict]:
    """Run labs one after another (a failure does not stop the rest); one result row each."""
    rows = []
    for lab_id in ids:
        lab = get_lab(lab_id)
        if not lab.built:
            rows.append({"lab": lab.id, "result": "not built yet", "seconds": 0.0})
            continue
        t0 = time.time()
        rc = run_lab_subprocess(lab, quick, out / lab.id, [])
        rows.append({"lab": lab.id, "result": "ok" if rc == 0 else f"FAILED (exit {rc})",
                     "seconds": round(time.time() - t0, 1)})
    return rows


def headline_rows(out: Path, ids: list[str]) -> list[dict]:
    """One row per lab with its headline metrics, for the printed results table."""
    rows = []
    for lab_id in ids:
        m = load_metrics(out / lab_id)
        if not m:
            continue
        for h in [x for x in str(m.get("headline", "")).split(",") if x]:
            rows.append({"lab": lab_id, "metric": h, "value": m.get(h)})
    return rows


def load_metrics(run_dir: Path) -> dict[str, Any] | None:
    f = run_dir / "metrics.json"
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
