"""A resumable alignment workflow (lab L5.01): data intake to a served model in one command.

    1 data    validate and curate: SFT records cleaned and de-duplicated (``data.dedup``),
              preference pairs audited and curated (``data.curation``, decontaminated against
              the held-out sets); bad records are counted per rule, never silently kept
    2 sft     LoRA SFT on the curated records, merged (``pipeline.stage_sft``)
    3 dpo     DPO from the SFT model, merged into the final model (``pipeline.stage_dpo``)
    4 eval    the starting model and the final model on the same held-out sets: response loss
              of the support answers, preference accuracy of the held-out pairs
    5 export  the final model as merged safetensors (stage 3's folder) and as GGUF
              (``compress.gguf_export``: written with the gguf package, reloaded and compared)
    6 index   the knowledge base indexed where the service opens it (``pipeline.stage_index``)
    7 serve   ``llmtech serve`` with the final model; held-out questions through the
              OpenAI-compatible API; the service stopped (``pipeline.serve_and_ask``)

Resuming: each stage has a key, the SHA-256 of the settings it reads, the content of its input
files and the keys of the stages it builds on. A finished stage is recorded in
``<out>/workflow_state.json`` (written atomically after the stage's outputs), with its key, its
outputs and its metrics. On the next run a stage whose key is unchanged and whose outputs still
exist is skipped and its recorded metrics reused; a changed setting or input re-runs that stage
and every stage after it that depends on it. A run killed in the middle of a stage leaves no
record for that stage, so the next run redoes exactly that stage (after clearing its half-written
folder) and skips the finished ones.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import Field

from . import pipeline
from .errors import DataError, LlmtechError
from .io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from .labs import markdown_table, seed_everything

STATE_FILE = "workflow_state.json"


class WorkflowConfig(pipeline.PipelineConfig):
    """The demo pipeline's settings plus the workflow's own; defaults = the quick lab run."""

    sft_steps: int = 24
    dpo_steps: int = 8
    sft_eval_samples: int | None = 16
    dpo_eval_samples: int | None = 16
    questions: int = 6
    unanswerable: int = 2
    compare_base: bool = False       # the eval stage compares with the starting model instead
    curate: bool = True              # False: stage 1 only validates (bad records still fail)
    eval_samples: int = Field(24, ge=1)  # held-out records / pairs in stage 4
    export_gguf: bool = True
    gguf_type: Literal["q8_0", "f16", "f32"] = "q8_0"


# stage -> (what it does, the settings it reads, its input files, the stages it builds on)
STAGES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "data": ("validate and curate the training data", ("curate", "seed"),
             ("sft_train_file", "pref_train_file", "sft_test_file", "pref_test_file", "qa_file"), ()),
    "sft": ("LoRA SFT, merged", ("model", "sft_steps", "sft_batch", "sft_lr", "sft_eval_samples",
                                 "lora_r", "lora_alpha", "max_length", "seed"),
            ("sft_test_file",), ("data",)),
    "dpo": ("DPO from the SFT model, merged", ("dpo_steps", "dpo_batch", "dpo_lr", "dpo_beta",
                                              "dpo_eval_samples", "lora_r", "lora_alpha",
                                              "max_length", "seed"),
            ("pref_test_file",), ("sft",)),
    "eval": ("starting vs final model on held-out data", ("model", "eval_samples", "max_length"),
             ("sft_test_file", "pref_test_file"), ("dpo",)),
    "export": ("merged safetensors + GGUF", ("export_gguf", "gguf_type"), (), ("dpo",)),
    "index": ("index the knowledge base", ("top_k",), ("kb_docs",), ()),
    "serve": ("serve the final model, ask held-out questions, stop",
              ("questions", "unanswerable", "max_tokens", "top_k", "seed"), ("qa_file",),
              ("dpo", "index")),
}


class WorkflowError(LlmtechError):
    """A stage failed; the message names the stage."""


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (relative names and contents)."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(str(f.relative_to(p)).encode() + b"\0")
            h.update(hashlib.sha256(f.read_bytes()).digest())
    elif p.is_file():
        h.update(p.read_bytes())
    else:
        raise DataError(f"{p}: input not found")
    return h.hexdigest()


def stage_key(name: str, cfg: WorkflowConfig, upstream: dict[str, str]) -> str:
    """The stage's key: its settings, its input files' contents, its upstream stages' keys."""
    _, settings, inputs, deps = STAGES[name]
    body = {"stage": name,
            "settings": {k: getattr(cfg, k) for k in settings},
            "inputs": {k: file_digest(getattr(cfg, k)) for k in inputs},
            "upstream": {d: upstream[d] for d in deps}}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


class State:
    """``workflow_state.json``: one record per finished stage. A file that is not valid JSON
    is an error naming it (never silently replaced: it records what earlier runs did)."""

    def __init__(self, out: Path):
        self.path = out / STATE_FILE
        self.stages: dict[str, dict] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self.stages = dict(data["stages"])
            except (ValueError, KeyError, TypeError) as e:
                raise WorkflowError(f"{self.path}: not a workflow state file ({e}); move it away "
                                    "to start the workflow from scratch") from None

    def done(self, name: str, key: str) -> dict | None:
        rec = self.stages.get(name)
        if rec and rec.get("key") == key and all(Path(p).exists() for p in rec.get("outputs", [])):
            return rec
        return None

    def record(self, name: str, key: str, outputs: list[str], metrics: dict, seconds: float):
        self.stages[name] = {"key": key, "outputs": outputs, "metrics": metrics,
                             "seconds": round(seconds, 1),
                             "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(self.path, {"stages": self.stages})


class _QuietStages(pipeline.Stages):
    """``pipeline.serve_and_ask`` times its sub-steps through a Stages object; inside the
    workflow they are parts of the one serve stage."""

    @contextmanager
    def run(self, name: str, what: str) -> Iterator[None]:
        pipeline.say(f"   - {name}: {what}")
        t0 = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


# --------------------------------------------------------------------------- stages

def stage_data(cfg: WorkflowConfig, folder: Path) -> tuple[dict, WorkflowConfig]:
    """Validate (every record must parse) and curate; the curated files go to ``folder``."""
    from .data import load
    from .data.curation import CurationConfig, curate, load_eval_texts, load_for_audit, write_clean
    from .data.dedup import clean_and_dedup

    sft = load(cfg.sft_train_file)  # a malformed line is a DataError naming file:line
    pairs = load_for_audit(cfg.pref_train_file)
    if pairs.problems:
        raise DataError("; ".join(f"{p.where}: {p.reason}" for p in pairs.problems[:5]))
    m: dict[str, Any] = {"sft_records_in": len(sft), "pref_pairs_in": len(pairs.rows)}
    if cfg.curate:
        kept, rep = clean_and_dedup(sft)
        evals = load_eval_texts([cfg.sft_test_file, cfg.pref_test_file, cfg.qa_file])
        pref, prep = curate(pairs, CurationConfig(), eval_texts=evals, source=cfg.pref_train_file)
        m.update({f"sft_{k}": v for k, v in rep.items() if k.startswith("removed_") and v},
                 **{f"pref_dropped_{k}": v for k, v in prep.dropped_by.items()})
    else:
        kept, pref = sft, pairs.rows
    if not kept or not pref:
        raise DataError(f"nothing left to train on after curation ({len(kept)} SFT records, "
                        f"{len(pref)} pairs)")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(folder / "sft_train.jsonl", kept)
    write_clean(folder / "preference.jsonl", pref)
    m.update(sft_records_out=len(kept), pref_pairs_out=len(pref))
    return m, cfg.model_copy(update={"sft_train_file": str(folder / "sft_train.jsonl"),
                                     "pref_train_file": str(folder / "preference.jsonl")})


def stage_eval(cfg: WorkflowConfig, final_dir: str) -> dict:
    """The starting model and the final model, same held-out data, same scoring."""
    from . import models
    from .data import load, to_messages
    from .data.preference import load_pairs
    from .evals.lm import response_loss
    from .evals.speed import release_memory
    from .train.dpo import preference_eval

    convs = [to_messages(r) for r in load(cfg.sft_test_file, limit=cfg.eval_samples)]
    pairs = load_pairs(cfg.pref_test_file, limit=cfg.eval_samples).rows
    m: dict[str, Any] = {"eval_records": len(convs), "eval_pairs": len(pairs)}
    for label, path in (("start", cfg.model), ("final", final_dir)):
        model, tok = models.load_lm(path, seed=cfg.seed)
        m[f"response_loss_{label}"] = round(response_loss(model, tok, convs, cfg.max_length), 4)
        pe = preference_eval(model, tok, pairs, max_length=cfg.max_length)
        m[f"pref_acc_{label}"] = round(pe["preference_accuracy_per_token"], 4)
        del model
        release_memory()
    return m


def stage_export(cfg: WorkflowConfig, final_dir: str, folder: Path) -> tuple[dict, list[str]]:
    from .compress.gguf_export import export_gguf, verify_gguf

    m: dict[str, Any] = {"export_safetensors": final_dir,
                         "export_safetensors_mb": round(sum(
                             p.stat().st_size for p in Path(final_dir).glob("*.safetensors")) / 2**20, 1)}
    if not cfg.export_gguf:
        return m, []
    r = export_gguf(final_dir, folder / f"model-{cfg.gguf_type}.gguf", cfg.gguf_type)
    v = verify_gguf(r["path"], final_dir)
    m.update(export_gguf=r["path"], export_gguf_mb=round(r["bytes"] / 2**20, 1),
             export_gguf_tensors=r["tensors"], gguf_max_abs_logit_diff=round(v["max_abs_diff"], 4),
             gguf_same_top_token=v["same_argmax"], gguf_tokenizer_same=v["tokenizer_same"])
    return m, [r["path"]]


# --------------------------------------------------------------------------- the run

def run_workflow(cfg: WorkflowConfig, out: str | Path,
                 on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) every stage; writes ``metrics.json``, ``report.md``, the settings
    (``workflow_config.json``) and the state file into ``out``; returns the flat metrics (``stage_<name>``: ran / skipped).
    ``on_stage(name)`` is called as each stage starts running (not when it is skipped)."""
    import logging

    for noisy in ("httpx", "httpx2", "openai"):  # one log line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    questions = pipeline.check_inputs(cfg)
    state = State(out)
    atomic_write_json(out / "workflow_config.json", cfg.model_dump())  # what this run used
    seed_everything(cfg.seed)
    keys: dict[str, str] = {}
    m: dict[str, Any] = {"model": cfg.model}
    outputs: dict[str, dict] = {}
    t_start = time.perf_counter()
    work = cfg
    for i, name in enumerate(STAGES, 1):
        what = STAGES[name][0]
        keys[name] = key = stage_key(name, work, keys)
        rec = state.done(name, key)
        if rec:
            pipeline.say(f"== [{i}/{len(STAGES)}] {name}: skipped (unchanged since {rec['finished_at']})")
            m[f"stage_{name}"] = "skipped"
        else:
            pipeline.say(f"\n== [{i}/{len(STAGES)}] {name}: {what}")
            if on_stage:
                on_stage(name)
            folder = out / name
            if folder.exists():  # a half-written folder from an interrupted run
                shutil.rmtree(folder)
            t0 = time.perf_counter()
            try:
                metrics, outs = _run_stage(name, work, outputs, folder, questions, out)
            except LlmtechError as e:
                raise WorkflowError(f"stage {i} ({name}) failed: {e}") from None
            state.record(name, key, outs, metrics, time.perf_counter() - t0)
            rec = state.stages[name]
            m[f"stage_{name}"] = "ran"
            pipeline.say(f"   done in {rec['seconds']:.1f}s")
        outputs[name] = rec
        m.update(rec["metrics"])
        m[f"seconds_{name}"] = rec["seconds"]
        if name == "data" and "sft_train_file" in rec["metrics"]:
            work = cfg.model_copy(update={k: rec["metrics"][k]
                                          for k in ("sft_train_file", "pref_train_file")})
    m["stages_ran"] = sum(v == "ran" for k, v in m.items() if k.startswith("stage_"))
    m["stages_skipped"] = sum(v == "skipped" for k, v in m.items() if k.startswith("stage_"))
    m["total_seconds"] = round(time.perf_counter() - t_start, 1)
    atomic_write_json(out / "metrics.json", m)
    atomic_write_text(out / "report.md", report_markdown(m))
    return m


def _run_stage(name: str, cfg: WorkflowConfig, done: dict[str, dict], folder: Path,
               questions: list[dict], out: Path) -> tuple[dict, list[str]]:
    if name == "data":
        m, curated = stage_data(cfg, folder)
        m.update(sft_train_file=curated.sft_train_file, pref_train_file=curated.pref_train_file)
        return m, [curated.sft_train_file, curated.pref_train_file]
    if name == "sft":
        merged, m = pipeline.stage_sft(cfg, out)  # writes <out>/sft
        return {**m, "sft_model": str(merged)}, [str(merged)]
    if name == "dpo":
        final, m = pipeline.stage_dpo(cfg.model_copy(), Path(done["sft"]["metrics"]["sft_model"]), out)
        return {**m, "final_model": str(final)}, [str(final)]
    final = done["dpo"]["metrics"]["final_model"]
    if name == "eval":
        return stage_eval(cfg, final), []
    if name == "export":
        return stage_export(cfg, final, folder)
    if name == "index":
        return pipeline.stage_index(cfg, folder), [str(folder / "assistant_kb")]
    if name == "serve":
        folder.mkdir(parents=True, exist_ok=True)
        # the service opens the knowledge base the index stage built (<out>/index)
        metrics, rows = pipeline.serve_and_ask(cfg, _QuietStages(out), "final", final, folder,
                                               questions, data_dir=out / "index")
        atomic_write_jsonl(folder / "answers.jsonl", rows)
        keep = ("answer_acc", "refusal_acc", "citation_acc", "latency_p50_s", "tokens_per_s",
                "service_stopped", "index_reused")
        m = {f"serve_{k}": metrics[k] for k in keep if k in metrics}
        m["serve_questions"] = len(rows)
        m["serve_examples"] = [{"question": r["question"], "answer": r["answer"][:200],
                                "gold": r["gold"], "correct": r["correct"]} for r in rows[:3]]
        return m, [str(folder / "answers.jsonl")]
    raise KeyError(name)


def report_markdown(m: dict[str, Any]) -> str:
    rows = []
    show = {"data": ("SFT 记录 / 偏好对（清洗后）", lambda: f"{m['sft_records_out']} / {m['pref_pairs_out']}"),
            "sft": ("留出 response loss", lambda: f"{m['sft_eval_loss_before']:.3f} → {m['sft_eval_loss_after']:.3f}"),
            "dpo": ("留出偏好准确率", lambda: f"{m['dpo_pref_acc_before']:.3f} → {m['dpo_pref_acc_after']:.3f}"),
            "eval": ("起点 → 最终：response loss / 偏好准确率",
                     lambda: f"{m['response_loss_start']:.3f} → {m['response_loss_final']:.3f} / "
                             f"{m['pref_acc_start']:.3f} → {m['pref_acc_final']:.3f}"),
            "export": ("GGUF MB / 回读 logits 最大差", lambda: f"{m.get('export_gguf_mb', '—')} / "
                                                       f"{m.get('gguf_max_abs_logit_diff', '—')}"),
            "index": ("文档 / 分块", lambda: f"{m['index_documents']} / {m['index_chunks']}"),
            "serve": ("经 API 回答：答案准确率 / 拒答准确率",
                      lambda: f"{m.get('serve_answer_acc')} / {m.get('serve_refusal_acc')}")}
    for name, (label, value) in show.items():
        try:
            v = value()
        except (KeyError, TypeError, ValueError):
            v = "—"
        rows.append({"阶段": name, "本次": m.get(f"stage_{name}"), "秒": m.get(f"seconds_{name}"),
                     "指标": label, "结果": v})
    return "\n".join(["# 对齐工作流：数据 → SFT → DPO → 评测 → 导出 → 服务\n", markdown_table(rows)])
