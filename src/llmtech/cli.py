"""`llmtech` command line. Thin: parses arguments and calls the package; no logic here."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import LlmtechError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="llmtech: the LLM Tech course as runnable software.")
lab_app = typer.Typer(no_args_is_help=True, help="List and run the course's 42 labs.")
models_app = typer.Typer(no_args_is_help=True, help="Model registry and the offline model cache.")
data_app = typer.Typer(no_args_is_help=True, help="Validate, clean and convert datasets.")
train_app = typer.Typer(no_args_is_help=True, help="Training stages: sft, rm, dpo, kto, ppo, grpo.")
rag_app = typer.Typer(no_args_is_help=True, help="Knowledge bases: index, ask, evaluate retrieval.")
app.add_typer(lab_app, name="lab")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(rag_app, name="rag")
serve_app = typer.Typer(no_args_is_help=True,
                        help="The knowledge-base service: OpenAI/RAGFlow APIs and a web page.")
app.add_typer(serve_app, name="serve")
eval_app = typer.Typer(no_args_is_help=True,
                       help="Evaluate a model: multiple choice (CMMLU layout), perplexity.")
app.add_typer(eval_app, name="eval")

OverridesArg = typer.Argument(None, help="key=value overrides")


# --------------------------------------------------------------------------- labs

@lab_app.command("list")
def lab_list(json_out: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """All 42 labs with id, path and status (built / not built yet)."""
    from . import labs

    rows = [{"id": lab.id, "path": f"lessons/{lab.path}", "title": lab.title, "status": lab.status}
            for lab in labs.LABS]
    if json_out:
        typer.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    for r in rows:
        typer.echo(f"{r['id']:6}  {r['status']:13}  {r['path']}  {r['title']}")
    built = sum(r["status"] == "built" for r in rows)
    typer.echo(f"\n{len(rows)} labs, {built} built, {len(rows) - built} not built yet")


@lab_app.command("run", context_settings={"allow_extra_args": True})
def lab_run(lab_id: str, quick: bool = typer.Option(False, "--quick"),
            out: Optional[Path] = typer.Option(None, "--out"),
            overrides: Optional[List[str]] = OverridesArg) -> None:
    """Run one lab, e.g. `llmtech lab run L1.03 --quick`."""
    from . import labs

    lab = labs.get_lab(lab_id)
    rc = labs.run_lab_subprocess(lab, quick, out, overrides or [])
    raise typer.Exit(rc)


@lab_app.command("run-all")
def lab_run_all(quick: bool = typer.Option(False, "--quick"),
                lesson: Optional[int] = typer.Option(None, "--lesson", help="only this lesson"),
                out: Path = typer.Option(Path("runs"), "--out")) -> None:
    """Run every built lab in order; a failing lab does not stop the others."""
    from . import labs, report

    ids = [lab.id for lab in labs.LABS if not lesson or lab.id.startswith(f"L{lesson}.")]
    results = labs.run_labs(ids, quick, out)
    typer.echo("\n" + labs.markdown_table(results))
    report.build_report(out)
    if any(r["result"].startswith("FAILED") for r in results):
        raise typer.Exit(1)


@app.command("demo", context_settings={"allow_extra_args": True})
def demo(out: Path = typer.Option(Path("runs/demo"), "--out"),
         full: bool = typer.Option(False, "--full", help="full settings instead of the quick run"),
         config: Optional[Path] = typer.Option(None, "--config", help="YAML PipelineConfig"),
         overrides: Optional[List[str]] = OverridesArg) -> None:
    """The course end to end on the bundled model: SFT -> DPO -> index -> serve -> answer
    held-out questions through the OpenAI API -> results table (see llmtech.pipeline)."""
    from . import pipeline

    pipeline.main(out, full, config, overrides or [])


@app.command("workflow", context_settings={"allow_extra_args": True})
def workflow_cmd(out: Path = typer.Option(Path("runs/workflow"), "--out"),
                 config: Optional[Path] = typer.Option(None, "--config", help="YAML WorkflowConfig"),
                 overrides: Optional[List[str]] = OverridesArg) -> None:
    """Resumable alignment workflow: data -> SFT -> DPO -> eval -> export (safetensors + GGUF)
    -> index -> serve; unchanged stages are skipped on the next run (see llmtech.workflow)."""
    from .config import load_config
    from .workflow import WorkflowConfig, run_workflow

    m = run_workflow(load_config(WorkflowConfig, config, overrides or []), out)
    typer.echo(f"{m['stages_ran']} stages ran, {m['stages_skipped']} skipped; "
               f"report -> {Path(out) / 'report.md'}")


@app.command("report")
def report_cmd(runs: Path = typer.Option(Path("runs"), "--runs", help="folder of lab outputs")) -> None:
    """Gather every lab's metrics.json into runs/REPORT.md plus plots."""
    from . import report

    path = report.build_report(runs)
    typer.echo(f"report -> {path}")


# --------------------------------------------------------------------------- models

@models_app.command("list")
def models_list() -> None:
    """Registry names and what they are."""
    from . import models

    for spec in models.REGISTRY.values():
        typer.echo(f"{spec.name:14} {spec.kind:9} {spec.source:32} {spec.description}")
    typer.echo("\nAlso: hf:org/name, ms:org/name, or a local folder.")


@models_app.command("prepare")
def models_prepare(model_id: str = typer.Argument("smollm2-135m")) -> None:
    """Resolve a model once (for the bundled LM: dequantise and cache it)."""
    from . import models

    typer.echo(str(models.resolve(model_id)))


# --------------------------------------------------------------------------- data

@data_app.command("validate")
def data_validate(path: str, fmt: str = typer.Option("auto", "--format",
                  help="alpaca | sharegpt | preference | kto | auto")) -> None:
    """Check a dataset file; errors name the file and line."""
    from . import data

    records = data.load(path, fmt=fmt)
    detected = fmt if fmt != "auto" else data.detect_format(records[0])
    typer.echo(json.dumps({"file": path, "format": detected, "records": len(records)},
                          ensure_ascii=False))


@data_app.command("clean", context_settings={"allow_extra_args": True})
def data_clean(src: str = typer.Argument(..., metavar="IN"), out: Path = typer.Argument(..., metavar="OUT"),
               config: Optional[Path] = typer.Option(None, "--config", help="YAML config"),
               fmt: str = typer.Option("auto", "--format", help="alpaca | sharegpt | preference | kto | auto"),
               overrides: Optional[List[str]] = OverridesArg) -> None:
    """Normalise, mask PII, filter by length/language, dedup (exact + MinHash); write JSONL."""
    from . import data
    from .config import load_config
    from .io import atomic_write_jsonl

    cfg = load_config(data.CleanDedupConfig, config, overrides or [])
    kept, report = data.clean_and_dedup(data.load(src, fmt=fmt), cfg)
    atomic_write_jsonl(out, kept)
    typer.echo(json.dumps({"in": src, "out": str(out), **report}, ensure_ascii=False, indent=2))


@data_app.command("convert", context_settings={"allow_extra_args": True})
def data_convert(docs: Path = typer.Argument(..., metavar="DOCS_DIR"), out: Path = typer.Argument(..., metavar="OUT"),
                 lang: Optional[str] = typer.Option(None, "--lang", help="zh | en | auto (default: per document)"),
                 config: Optional[Path] = typer.Option(None, "--config", help="YAML config"),
                 overrides: Optional[List[str]] = OverridesArg) -> None:
    """Documents (.md .txt .html .pdf .docx) -> alpaca instruction data, one record per section."""
    from .config import load_config
    from .data.docs import ConvertConfig, documents_to_instructions, load_documents
    from .io import atomic_write_jsonl

    cfg = load_config(ConvertConfig, config, list(overrides or []) + ([f"lang={lang}"] if lang else []))
    documents = load_documents(docs)
    records = documents_to_instructions(documents, cfg)
    atomic_write_jsonl(out, records)
    typer.echo(json.dumps({"documents": len(documents), "sections": sum(len(d.sections) for d in documents),
                           "records": len(records), "out": str(out)}, ensure_ascii=False))


# --------------------------------------------------------------------------- train

@train_app.command("sft", context_settings={"allow_extra_args": True})
def train_sft(config: Optional[Path] = typer.Option(None, "--config", help="YAML config"),
              deepspeed: Optional[str] = typer.Option(None, "--deepspeed", help="DeepSpeed JSON (GPU)"),
              overrides: Optional[List[str]] = OverridesArg) -> None:
    """Supervised fine-tuning (full or LoRA) on TRL's SFTTrainer."""
    from .config import load_config
    from .train.sft import SFTSettings, run_sft

    extra = list(overrides or []) + ([f"deepspeed={deepspeed}"] if deepspeed else [])
    settings = load_config(SFTSettings, config, extra)
    result = run_sft(settings)
    result.pop("trainer", None)
    typer.echo(json.dumps(result, ensure_ascii=False, indent=2))


def _run_stage(settings_path: str, run_path: str, config, overrides, deepspeed=None) -> None:
    """Load ``module:Settings`` from --config + overrides, call ``module:run``, print the result."""
    import importlib

    from .config import load_config

    mod_name, cls_name = settings_path.split(":")
    mod = importlib.import_module(f".train.{mod_name}", __package__)
    extra = list(overrides or []) + ([f"deepspeed={deepspeed}"] if deepspeed else [])
    settings = load_config(getattr(mod, cls_name), config, extra)
    result = getattr(mod, run_path)(settings)
    for live in ("trainer", "policy"):
        result.pop(live, None)
    typer.echo(json.dumps(result, ensure_ascii=False, indent=2, default=str))


@train_app.command("rm", context_settings={"allow_extra_args": True})
def train_rm(config: Optional[Path] = typer.Option(None, "--config", help="YAML config"),
             overrides: Optional[List[str]] = OverridesArg) -> None:
    """Reward model on preference pairs (TRL RewardTrainer): pairwise accuracy, calibration."""
    _run_stage("reward:RewardSettings", "run_reward", config, overrides)


@train_app.command("dpo", context_settings={"allow_extra_args": True})
def train_dpo(config: Optional[Path] = typer.Option(None, "--config", help="YAML config"),
              overrides: Optional[List[str]] = OverridesArg) -> None:
    """DPO (sigmoid / ipo / hinge, optional SFT term) on TRL's DPOTrainer."""
    _run_stage("dpo:DPOSettings", "run_dpo", config, overrides)


@train_app.command("kto", context_settings={"allow_extra_args": True})
def train_kto(config: Optional[Path] = typer.Option(None, "--config", help="YAML config"),
              overrides: Optional[List[str]] = OverridesArg) -> None:
    """KTO on unpaired desirable/undesirable data (a pair file is converted)."""
    _run_stage("kto:KTOSettings", "run_kto", config, overrides)


@train_app.command("ppo", context_settings={"allow_extra_args": True})
def train_ppo(config: Optional[Path] = typer.Option(None, "--config", help="YAML config"),
              overrides: Optional[List[str]] = OverridesArg) -> None:
    """RLHF with PPO against a trained reward model (llmtech's own implementation)."""
    _run_stage("ppo:PPOSettings", "run_ppo", config, overrides)


@train_app.command("grpo", context_settings={"allow_extra_args": True})
def train_grpo(config: Optional[Path] = typer.Option(None, "--config", help="YAML config"),
               overrides: Optional[List[str]] = OverridesArg) -> None:
    """GRPO (TRL) with the reward model as the reward function, for comparison with PPO."""
    _run_stage("online:GRPOSettings", "run_grpo", config, overrides)


# --------------------------------------------------------------------------- rag

def _kb_path(name: str) -> Path:
    """A bare name lives under $LLMTECH_KB_DIR (default ./kbs); anything path-like is a path."""
    if "/" in name or os.sep in name or name.startswith("."):
        return Path(name)
    return Path(os.environ.get("LLMTECH_KB_DIR", "kbs")) / name


@rag_app.command("index", context_settings={"allow_extra_args": True})
def rag_index(docs: Path = typer.Option(..., "--docs", help="folder of documents"),
              kb: str = typer.Option(..., "--kb", help="knowledge-base name or folder"),
              config: Optional[Path] = typer.Option(None, "--config", help="YAML KBConfig (new KB only)"),
              full: bool = typer.Option(False, "--full", help="re-chunk and re-embed everything"),
              overrides: Optional[List[str]] = OverridesArg) -> None:
    """Create or incrementally update a knowledge base from a folder of documents."""
    from .config import load_config
    from .rag.kb import KBConfig, KnowledgeBase

    path = _kb_path(kb)
    if (path / "kb.json").exists():
        if config or overrides:
            raise LlmtechError(f"{path} exists and keeps the config it was built with; "
                               "use a new --kb to change chunking, embedder or store")
        base = KnowledgeBase.open(path)
    else:
        base = KnowledgeBase.create(path, load_config(KBConfig, config, overrides or []))
    report = base.update(docs, mode="full" if full else "incremental")
    summary = report.summary()
    out = {"kb": str(path), **{k: summary[k] for k in ("n_added", "n_updated", "n_unchanged", "n_deleted")},
           "skipped": summary["skipped"], "bad_chunks": report.bad_chunks, "chunks": report.chunks_total,
           "embedded": report.embedded, "embed_cached": report.embed_cached,
           "seconds": round(report.seconds, 2), "consistent": base.consistent()}
    base.close()
    typer.echo(json.dumps(out, ensure_ascii=False, indent=2))


@rag_app.command("audit-verify")
def rag_audit_verify(kb: str = typer.Option(..., "--kb", help="knowledge-base name or folder")) -> None:
    """Check a knowledge base's hash-chained audit log; exit 1 naming the first bad line."""
    from .rag.records import audit_verify

    result = audit_verify(_kb_path(kb))
    typer.echo(json.dumps(result, ensure_ascii=False, indent=2))
    if not result["ok"]:
        raise typer.Exit(1)


@rag_app.command("ask")
def rag_ask(question: str = typer.Argument(...),
            kb: str = typer.Option(..., "--kb", help="knowledge-base name or folder"),
            k: int = typer.Option(4, "--k", help="passages given to the model"),
            mode: str = typer.Option("hybrid", "--mode", help="hybrid | dense | bm25"),
            rerank: Optional[str] = typer.Option(None, "--rerank", help="llm | llm-ql | llm:<model> | <cross-encoder id>"),
            model: Optional[str] = typer.Option(None, "--model", help="generator model id"),
            json_out: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Answer a question from a knowledge base, citing its sources as [n]."""
    from .models import DEFAULT_LM
    from .rag.generate import Generator
    from .rag.kb import KnowledgeBase
    from .rag.rerank import make_reranker

    base = KnowledgeBase.open(_kb_path(kb))
    reranker = make_reranker(rerank)
    passages = base.search(question, k=max(k, 10) if reranker else k, mode=mode)
    if reranker:
        passages = reranker.rerank(question, passages, top=k)
    answer = Generator(model or DEFAULT_LM).answer(question, passages)
    base.close()
    sources = [{"n": i, "doc_id": p.doc_id, "chunk_id": p.id, "score": round(p.score, 4),
                "text": p.text} for i, p in enumerate(passages, 1)]
    if json_out:
        typer.echo(json.dumps({"question": question, "answer": answer.text, "refused": answer.refused,
                               "citations": answer.citations, "sources": sources},
                              ensure_ascii=False, indent=2))
        return
    typer.echo(answer.text)
    for s in sources:
        mark = "*" if s["n"] in answer.citations else " "
        typer.echo(f"{mark}[{s['n']}] {s['doc_id']}  {s['text'][:80]!r}")


@rag_app.command("eval")
def rag_eval(beir: Path = typer.Option(..., "--beir", help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/"),
             retriever: str = typer.Option("hybrid", "--retriever", help="bm25 | dense | hybrid"),
             rerank: Optional[str] = typer.Option(None, "--rerank", help="llm | llm-ql | llm:<model> | <cross-encoder id>"),
             rerank_depth: int = typer.Option(20, "--rerank-depth"),
             split: str = typer.Option("test", "--split"),
             embedder: Optional[str] = typer.Option(None, "--embedder", help="embedder id (default minilm-l6)"),
             max_queries: Optional[int] = typer.Option(None, "--max-queries", help="first N judged queries"),
             passages: Optional[int] = typer.Option(None, "--passages", help="dense: N-token windows, doc = best window"),
             no_cache: bool = typer.Option(False, "--no-cache", help="do not use the embedding cache")) -> None:
    """Evaluate a retriever on a BEIR-format folder; prints JSON (ndcg@10, recall@100, mrr@10, ...)."""
    from .rag.beir import evaluate_beir, load_beir

    data = load_beir(beir, split)
    if max_queries:
        keep = list(data.queries)[:max_queries]
        data.queries = {q: data.queries[q] for q in keep}
        data.qrels = {q: data.qrels[q] for q in keep}
    result = evaluate_beir(data, retriever=retriever, embedder=embedder, rerank=rerank,
                           rerank_depth=rerank_depth, cache=not no_cache, passages=passages)
    typer.echo(json.dumps(result, ensure_ascii=False, indent=2))


# --------------------------------------------------------------------------- eval

@eval_app.command("mcq")
def eval_mcq(data: Path = typer.Option(..., "--data", help="CMMLU-layout folder (DIR/test/*.csv, DIR/dev/*.csv) or a folder of CSVs"),
             subjects: Optional[str] = typer.Option(None, "--subjects", help="comma-separated subjects (default: all)"),
             shots: int = typer.Option(0, "--shots", help="few-shot examples from dev/ (0 or 5)"),
             limit: Optional[int] = typer.Option(None, "--limit", help="first N questions per subject"),
             mode: str = typer.Option("letter", "--mode", help="letter | cloze"),
             model: Optional[str] = typer.Option(None, "--model", help="model id (default smollm2-135m)")) -> None:
    """Multiple-choice accuracy by log-likelihood; prints JSON (accuracy, n, by_subject, skipped)."""
    from .evals.mcq import run_mcq

    subs = [s.strip() for s in subjects.split(",") if s.strip()] if subjects else None
    result = run_mcq(data, model=model, subjects=subs, shots=shots, limit=limit, mode=mode)
    typer.echo(json.dumps(result, ensure_ascii=False, indent=2))


@eval_app.command("ppl")
def eval_ppl(data: Path = typer.Option(..., "--data", help=".txt file, or JSONL/JSON/CSV with a text field"),
             model: Optional[str] = typer.Option(None, "--model", help="model id (default smollm2-135m)"),
             window: int = typer.Option(256, "--window", help="tokens per window"),
             stride: Optional[int] = typer.Option(None, "--stride", help="window step (default: = window)"),
             field: str = typer.Option("text", "--field", help="text field of JSONL/JSON/CSV records"),
             max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="read at most N tokens")) -> None:
    """Perplexity of a text file (sliding window with stride); prints JSON (ppl, tokens)."""
    from .evals.lm import perplexity_file

    result = perplexity_file(data, model, window, stride, field, max_tokens)
    typer.echo(json.dumps(result, ensure_ascii=False, indent=2))


@eval_app.command("bias")
def eval_bias(pairs: Path = typer.Option(..., "--pairs", help="CrowS-Pairs-layout CSV (sent_more, sent_less, stereo_antistereo, bias_type)"),
              model: Optional[str] = typer.Option(None, "--model", help="model id (default smollm2-135m)"),
              limit: Optional[int] = typer.Option(None, "--limit", help="first N valid pairs"),
              variant: str = typer.Option("full", "--variant", help="full | shared (score only the tokens both sentences share)")) -> None:
    """Paired-sentence bias: share of pairs where the model prefers the more stereotyping
    sentence (0.5 = unbiased); prints JSON (metric_score, n, by_category, skipped)."""
    from .evals.bias import run_crows

    result = run_crows(pairs, model=model, limit=limit, variant=variant)
    typer.echo(json.dumps(result, ensure_ascii=False, indent=2))


# --------------------------------------------------------------------------- entry point

# --------------------------------------------------------------------------- serve

def _serve_config(config: Optional[Path], overrides: list[str]):
    from .config import load_config
    from .serve import ServeConfig

    return load_config(ServeConfig, config, overrides)


@serve_app.command("run", context_settings={"allow_extra_args": True})
def serve_run(config: Optional[Path] = typer.Option(None, "--config", help="YAML ServeConfig"),
              overrides: Optional[List[str]] = OverridesArg) -> None:
    """Start the service (e.g. `llmtech serve run --config configs/serve.yaml port=8080`)."""
    from . import serve

    cfg = _serve_config(config, overrides or [])
    if not cfg.api_keys:
        typer.echo("note: no api_keys in the config; add one with `llmtech serve add-key`",
                   err=True)
    serve.run(cfg)


@serve_app.command("add-key", context_settings={"allow_extra_args": True})
def serve_add_key(tenant: str = typer.Option(..., "--tenant", help="tenant the key acts for"),
                  config: Optional[Path] = typer.Option(None, "--config"),
                  overrides: Optional[List[str]] = OverridesArg) -> None:
    """Create an API key for a tenant (stored hashed in the service's metadata database)."""
    from .serve.meta import Meta

    cfg = _serve_config(config, overrides or [])
    meta = Meta(Path(cfg.data_dir) / "meta.sqlite")
    key = meta.add_key(tenant)
    meta.close()
    typer.echo(key)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("faiss.loader", "bm25s", "jieba", "httpx", "chromadb"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        rc = app(args=argv, standalone_mode=False)
        if isinstance(rc, int) and rc != 0:  # typer.Exit(code) comes back as a return value
            sys.exit(rc)
    except LlmtechError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
