"""The course end to end (``make demo`` = ``llmtech demo``): from a chat model to a served,
aligned knowledge-base assistant, measured at every step.

    1 sft       LoRA SFT on the support instructions; held-out response loss before/after;
                the adapter is merged into a plain model folder
    2 dpo       DPO (LoRA) from the SFT model on preference pairs; held-out preference
                accuracy before/after; merged -> the final model folder
    3 index     the knowledge base (data/support/kb) is chunked, embedded and indexed where
                the service looks for it, so the service does not index it again
    4 serve     ``llmtech serve`` starts in a child process with the final model
    5 answer    held-out customer questions (Chinese and English, answerable and not) go
                through the OpenAI-compatible API with the official ``openai`` client;
                answer / refusal / citation accuracy, latency, tokens/s
    6 stop      the service stops; its port must refuse connections afterwards
    7 baseline  (``compare_base``) stages 4-6 again with the starting model, same questions

Outputs in the run folder (``--out``, default ``runs/demo``): ``metrics.json`` (flat),
``report.md``, ``answers.jsonl`` (every answer), the stages' folders (``sft/``, ``dpo/``,
``serve/``) and the service logs. A failing stage ends the run with a one-line error that names
it (``PipelineError``); the full traceback, if any, is in ``error.log``.

The defaults are the quick run (446 s measured on 2 CPU cores with the bundled model, about
three minutes of it answering questions); ``FULL`` holds the settings of ``llmtech demo --full``.
"""

from __future__ import annotations

import gc
import logging
import random
import shutil
import socket
import statistics
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .config import StrictModel, load_config
from .errors import LlmtechError
from .io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from .labs import markdown_table, seed_everything
from .models import DEFAULT_LM


class PipelineConfig(StrictModel):
    """Settings of the pipeline; the defaults are the quick run (`make demo`)."""

    model: str = DEFAULT_LM            # 起点模型（也是对照组 baseline）
    seed: int = 0
    sft_train_file: str = "data/support/sft_train.jsonl"
    sft_test_file: str = "data/support/sft_test.jsonl"
    pref_train_file: str = "data/support/preference.jsonl"
    pref_test_file: str = "data/support/preference_test.jsonl"
    qa_file: str = "data/support/eval_qa.jsonl"     # 留出的客服问题：标准答案 + 含答案的文档
    kb_docs: str = "data/support/kb"
    # 1 SFT（LoRA）
    sft_steps: int = 48
    sft_batch: int = 4
    sft_lr: float = 1e-3
    sft_eval_samples: int | None = 32   # None = 全部留出样例
    # 2 DPO（LoRA，参考模型 = 关掉适配器的 SFT 模型）
    dpo_steps: int = 16
    dpo_batch: int = 2
    dpo_lr: float = 5e-4
    dpo_beta: float = 0.1
    dpo_eval_samples: int | None = 32
    lora_r: int = 16
    lora_alpha: int = 32
    max_length: int = 192
    # 4-7 服务与评测
    questions: int = 20                 # 评测题数（中英各半）；0 = 全部
    unanswerable: int = 4               # 其中知识库里没有答案的题数（考拒答）
    max_tokens: int = 64                # 每个回答最多生成的 token 数
    top_k: int = 4                      # 每个回答的上下文段落数
    compare_base: bool = True           # 同一批问题再问一遍起点模型，作为对照
    api_key: str = "sk-llmtech-pipeline"
    server_timeout_s: float = 300.0


# `llmtech demo --full`: the whole held-out sets, longer training (estimated ~40 min on 2 CPU cores)
FULL: dict[str, Any] = {"sft_steps": 366, "sft_lr": 5e-4, "sft_eval_samples": None,
                        "dpo_steps": 120, "dpo_eval_samples": None, "questions": 0}

WARMUP = "你好，请问客服电话是多少？"  # not one of the evaluation questions

STAGES = ["sft", "dpo", "index", "serve", "answer", "stop", "baseline"]


class PipelineError(LlmtechError):
    """A stage failed; the message names the stage."""


# --------------------------------------------------------------------------- running stages

def say(message: str) -> None:
    print(message, flush=True)


class Stages:
    """Times each stage and turns any failure into one ``PipelineError`` line naming it."""

    def __init__(self, out: Path):
        self.out = out
        self.seconds: dict[str, float] = {}

    @contextmanager
    def run(self, name: str, what: str) -> Iterator[None]:
        number = STAGES.index(name) + 1
        say(f"\n== [{number}/{len(STAGES)}] {name}: {what}")
        t0 = time.perf_counter()
        try:
            yield
        except PipelineError:
            raise
        except Exception as e:
            # 完整信息（服务日志、traceback）写进 error.log；终端只打印一行
            detail = "".join(traceback.format_exception(e)) if not isinstance(e, LlmtechError) \
                else str(e)
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "error.log", f"stage {number} {name}\n{detail}\n")
            first = (str(e).strip().splitlines() or [""])[0]
            kind = "" if isinstance(e, LlmtechError) else f"{type(e).__name__}: "
            raise PipelineError(f"stage {number} ({name}) failed: {kind}{first} "
                                f"[details: {self.out / 'error.log'}]") from None
        took = time.perf_counter() - t0
        self.seconds[name] = self.seconds.get(name, 0.0) + took
        say(f"   done in {took:.1f}s")


def check_inputs(cfg: PipelineConfig) -> list[dict]:
    """Fail in seconds, not after ten minutes of training, when an input is missing or the
    questions cannot be read; returns the questions stage 5 will ask."""
    needs = [(cfg.sft_train_file, "sft"), (cfg.sft_test_file, "sft"), (cfg.pref_train_file, "dpo"),
             (cfg.pref_test_file, "dpo"), (cfg.qa_file, "answer")]
    for path, stage in needs:
        if not Path(path).is_file():
            number = STAGES.index(stage) + 1
            raise PipelineError(f"stage {number} ({stage}): input file {path} not found")
    if not Path(cfg.kb_docs).is_dir():
        raise PipelineError(f"stage 3 (index): knowledge-base folder {cfg.kb_docs} not found")
    if cfg.unanswerable > cfg.questions > 0:
        raise PipelineError(f"stage 5 (answer): unanswerable={cfg.unanswerable} is more than "
                            f"questions={cfg.questions}")
    try:
        return load_questions(cfg)
    except LlmtechError as e:
        raise PipelineError(f"stage 5 (answer): {e}") from None


# --------------------------------------------------------------------------- 1-2 training

def merge_and_release(res: dict, folder: Path) -> Path:
    """Fold the trained adapter into a plain model folder, then free the trainer's memory
    before the next stage loads its own model."""
    from .train.lora import merge_and_save

    trainer = res.pop("trainer")
    merged = merge_and_save(trainer.model, trainer.processing_class, folder)
    del trainer
    gc.collect()
    return merged


def stage_sft(cfg: PipelineConfig, out: Path) -> tuple[Path, dict]:
    """LoRA SFT; returns the merged model folder and the stage's metrics."""
    from .train.lora import LoraSettings
    from .train.sft import SFTSettings, run_sft

    s = SFTSettings(model=cfg.model, train_file=cfg.sft_train_file, eval_file=cfg.sft_test_file,
                    max_eval_samples=cfg.sft_eval_samples, output_dir=str(out / "sft"),
                    max_steps=cfg.sft_steps, batch_size=cfg.sft_batch, learning_rate=cfg.sft_lr,
                    warmup=0.1, max_length=cfg.max_length, logging_steps=4, save_steps=10**9,
                    seed=cfg.seed, lora=LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha))
    res = run_sft(s)  # eval_loss = 留出集上只算回答部分的交叉熵
    merged = merge_and_release(res, out / "sft" / "merged")
    return merged, {"sft_steps": res["global_step"], "sft_train_loss": res["train_loss"],
                    "sft_eval_loss_before": res["eval_loss_before"],
                    "sft_eval_loss_after": res["eval_loss_after"],
                    "sft_eval_examples": _count_lines(cfg.sft_test_file, cfg.sft_eval_samples),
                    "sft_tokens_per_s": res.get("tokens_per_s"),
                    "sft_trainable_params": res["trainable_params"]}


def stage_dpo(cfg: PipelineConfig, sft_dir: Path, out: Path) -> tuple[Path, dict]:
    """DPO from the SFT model; returns the merged final model folder and the metrics."""
    from .train.dpo import DPOSettings, run_dpo
    from .train.lora import LoraSettings

    s = DPOSettings(model=str(sft_dir), train_file=cfg.pref_train_file,
                    eval_file=cfg.pref_test_file, max_eval_samples=cfg.dpo_eval_samples,
                    beta=cfg.dpo_beta, max_steps=cfg.dpo_steps, batch_size=cfg.dpo_batch,
                    learning_rate=cfg.dpo_lr, warmup=0.1, max_length=cfg.max_length,
                    logging_steps=2, save_steps=10**9, seed=cfg.seed, output_dir=str(out / "dpo"),
                    lora=LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha))
    res = run_dpo(s)
    # 先评估、后合并：参考模型 = 关掉适配器的同一个模型，合并之后就没有适配器可关了。
    # 所以不用 DPOSettings.merge（它在合并之后才做“训练后”评估），run_dpo 评估完再自己合并。
    final = merge_and_release(res, out / "dpo" / "merged")
    # 偏好准确率：模型自己给 chosen 的每 token 平均对数似然是否高于 rejected（L4.04 同一口径）
    return final, {"dpo_steps": res["global_step"], "dpo_train_loss": res["train_loss"],
                   "dpo_eval_pairs": res["eval_pairs"],
                   "dpo_pref_acc_before": res["eval_preference_accuracy_per_token_before"],
                   "dpo_pref_acc_after": res["eval_preference_accuracy_per_token"],
                   "dpo_reward_accuracy": res["eval_reward_accuracy"],
                   "dpo_reward_margin": res["eval_reward_margin"]}


# --------------------------------------------------------------------------- 3 index

def serve_overrides(cfg: PipelineConfig, model: str, data_dir: Path) -> list[str]:
    """``llmtech serve run`` settings for one server of this run."""
    return [f"generation.model={model}", f"data_dir={data_dir}",
            f"kb_docs={Path(cfg.kb_docs).resolve()}", f"top_k={cfg.top_k}",
            f"api_keys={{{cfg.api_key}: pipeline}}"]


def stage_index(cfg: PipelineConfig, serve_dir: Path) -> dict:
    """Build the assistant's knowledge base where the service opens it (``<data_dir>/
    assistant_kb``, with the service's own KB settings): at start the service then finds every
    document unchanged and indexes nothing."""
    from .rag.kb import KnowledgeBase
    from .serve.config import ServeConfig

    serve_cfg = load_config(ServeConfig, None, serve_overrides(cfg, cfg.model, serve_dir))
    kb_cfg = serve_cfg.kb.model_copy(update={"embedder": serve_cfg.embedding.model})
    kb = KnowledgeBase.create(serve_dir / "assistant_kb", kb_cfg)
    try:
        report = kb.update(cfg.kb_docs)
        stats = kb.stats()
    finally:
        kb.close()
    if report.skipped:
        say(f"   skipped: {[f'{s.source}: {s.reason}' for s in report.skipped]}")
    return {"index_documents": stats["documents"], "index_chunks": stats["chunks"],
            "index_skipped": len(report.skipped), "index_embedded": report.embedded,
            "index_seconds": round(report.seconds, 2)}


def index_fingerprint(serve_dir: Path) -> tuple:
    """Every knowledge base under ``serve_dir`` with its documents' index times: equal before
    and after a server run means the service reused stage 3's index and indexed nothing."""
    import sqlite3

    found = []
    for db in sorted(serve_dir.rglob("docstore.sqlite")):
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            found.append((str(db), tuple(con.execute(
                "SELECT doc_id, updated_at FROM docs ORDER BY doc_id"))))
        finally:
            con.close()
    return tuple(found)


# --------------------------------------------------------------------------- 4-6 serve, ask, stop

def load_questions(cfg: PipelineConfig) -> list[dict]:
    """Held-out questions, balanced: half Chinese, half English; ``unanswerable`` of them have
    no answer in the knowledge base. ``questions=0``: all of them."""
    from .data.formats import read_records
    from .errors import DataError

    rows = []
    for where, r in read_records(cfg.qa_file):
        missing = [k for k in ("id", "question", "answer", "doc_ids", "lang") if k not in r]
        if missing:
            raise DataError(f"{where}: missing field(s) {missing}")
        rows.append(r)
    if not cfg.questions or cfg.questions >= len(rows):
        return rows
    pools: dict[tuple[str, bool], list[dict]] = {}
    for r in rows:
        pools.setdefault((r["lang"], bool(r["answer"])), []).append(r)
    n_yes = cfg.questions - cfg.unanswerable
    want = {("zh", False): (cfg.unanswerable + 1) // 2, ("en", False): cfg.unanswerable // 2,
            ("zh", True): (n_yes + 1) // 2, ("en", True): n_yes // 2}
    rng = random.Random(cfg.seed)
    picked = []
    for key, n in want.items():
        pool = pools.get(key, [])
        if n > len(pool):
            raise DataError(f"{cfg.qa_file}: wanted {n} {key[0]} "
                            f"{'answerable' if key[1] else 'unanswerable'} questions, "
                            f"the file has {len(pool)}")
        picked += rng.sample(pool, n)
    return sorted(picked, key=lambda r: r["id"])


def ask(client, question: dict, cfg: PipelineConfig) -> dict:
    """One question through ``/v1/chat/completions`` (streamed): the text, the ``references``
    of the final chunk, token usage and timings as the client sees them."""
    t0 = time.perf_counter()
    first = None
    text, refs, usage = "", [], None
    stream = client.chat.completions.create(
        model="llmtech-kb", messages=[{"role": "user", "content": question["question"]}],
        max_tokens=cfg.max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text += chunk.choices[0].delta.content
        refs = (chunk.model_extra or {}).get("references") or refs  # 最后一个数据块带 references
        usage = chunk.usage or usage
    end = time.perf_counter()
    return {"text": text.strip(), "references": refs, "latency_s": end - t0,
            "ttft_s": (first or end) - t0, "decode_s": end - (first or end),
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "completion_tokens": usage.completion_tokens if usage else 0}


def to_answer(question: dict, reply: dict):
    """A service reply as a ``rag.generate.Answer``: refusal and ``[n]`` citations are read
    from the text exactly as for local answers; ``[n]`` is reference n of the reply."""
    from .rag.generate import Answer, finish_answer
    from .rag.types import Passage

    passages = [Passage(id=r["id"], doc_id=r["document_id"], text=r["content"],
                        score=float(r.get("similarity") or 0.0), title=r["document_name"])
                for r in reply["references"]]
    a = Answer(question["question"], reply["text"], False, passages=passages,
               lang=question["lang"], prompt_tokens=reply["prompt_tokens"],
               completion_tokens=reply["completion_tokens"], seconds=reply["latency_s"])
    return finish_answer(a)


def percentile(xs: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(xs, q)) if xs else float("nan")


def score(questions: list[dict], replies: list[dict], top_k: int) -> tuple[dict, list]:
    """Answer, refusal and citation accuracy (``rag.generate.evaluate_answers``), retrieval hit
    rate (a gold document among the references) and the service's speed."""
    from .rag.generate import evaluate_answers

    answers = [to_answer(q, r) for q, r in zip(questions, replies)]
    m = evaluate_answers(answers, [q["answer"] for q in questions],
                         [q["doc_ids"] for q in questions])
    answerable = [(q, r) for q, r in zip(questions, replies) if q["answer"]]
    hits = [any(ref["document_id"] in q["doc_ids"] for ref in r["references"])
            for q, r in answerable]
    # API 的 cited 标记应当与回答正文里的 [n] 一致
    flags_agree = all(sorted(ref["n"] for ref in r["references"] if ref.get("cited"))
                      == sorted(a.citations) for r, a in zip(replies, answers))
    lat = [r["latency_s"] for r in replies]
    generated = [r for r in replies if r["completion_tokens"] > 1 and r["decode_s"] > 0]
    # 生成速度：首个 token 之后的 token 数 / 首个 token 之后的时间
    decode_s = sum(r["decode_s"] for r in generated)
    tps = sum(r["completion_tokens"] - 1 for r in generated) / decode_s if generated else 0.0
    return {"answer_acc": m["acc"], "answer_acc_zh": m["acc_zh"], "answer_acc_en": m["acc_en"],
            "refusal_acc": m["refusal_acc"], "refused_unanswerable": m["refused_unanswerable"],
            "false_refusal": m["false_refusal"], "cited_share": m["cited_share"],
            "citation_acc": m["citation_acc"], "cited_flags_agree": flags_agree,
            f"retrieval_hit_at_{top_k}": sum(hits) / len(hits) if hits else None,
            "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
            "ttft_p50_s": percentile([r["ttft_s"] for r in replies], 50),
            "tokens_per_s": tps, "completion_tokens_mean": statistics.mean(
                r["completion_tokens"] for r in replies)}, answers


def port_refuses(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


def serve_and_ask(cfg: PipelineConfig, stages: Stages, label: str, model: str, out: Path,
                  questions: list[dict], baseline: bool = False,
                  data_dir: Path | None = None) -> tuple[dict, list[dict]]:
    """Stages 4-6 for one model: start the service, ask every question, stop the service.
    ``baseline``: all three are timed as the one ``baseline`` stage. The service's data
    (knowledge base) is ``data_dir`` (default ``out/serve``); its log is copied into ``out``."""
    from openai import OpenAI

    from .serve.launch import Server

    data_dir = data_dir or out / "serve"
    srv = Server(serve_overrides(cfg, model, data_dir), timeout_s=cfg.server_timeout_s)
    metrics: dict[str, Any] = {"service_url": srv.url}
    index_before = index_fingerprint(data_dir)
    replies: list[dict] = []
    # 对照组的启动、提问、停止合起来记作一个阶段 baseline
    name = {n: "baseline" if baseline else n for n in ("serve", "answer", "stop")}
    try:
        with stages.run(name["serve"], f"start the service with {label} = {model}"):
            t0 = time.perf_counter()
            srv.start()
            metrics["serve_start_s"] = time.perf_counter() - t0
            client = OpenAI(base_url=srv.url + "/v1", api_key=cfg.api_key, max_retries=0,
                            timeout=cfg.server_timeout_s)
            served = [m.id for m in client.models.list().data]
            if "llmtech-kb" not in served:
                raise LlmtechError(f"/v1/models lists {served}, not the assistant llmtech-kb")
            metrics["served_models"] = ", ".join(served)
            say(f"   {srv.url} is up in {metrics['serve_start_s']:.1f}s; models: {served}")
            # 预热：第一个请求要加载嵌入模型、jieba 词典，第一次长提示词也更慢；不计入延迟统计
            t0 = time.perf_counter()
            client.chat.completions.create(model="llmtech-kb", max_tokens=2, temperature=0,
                                           messages=[{"role": "user", "content": WARMUP}])
            metrics["serve_warmup_s"] = time.perf_counter() - t0
        with stages.run(name["answer"], f"{len(questions)} held-out questions via the OpenAI API"):
            for i, q in enumerate(questions, 1):
                r = ask(client, q, cfg)
                replies.append(r)
                say(f"   {i:>3}/{len(questions)} {q['id']} {q['lang']} {r['latency_s']:5.1f}s  "
                    f"gold={q['answer'] or '(none)'!r:<12.40} {r['text'][:70]!r}")
            scores, answers = score(questions, replies, cfg.top_k)
            metrics.update(scores)
    finally:
        with stages.run(name["stop"], "stop the service"):
            srv.stop()
            shutil.copyfile(srv.log, out / f"serve_{label}.log")
            srv.log.unlink(missing_ok=True)
            metrics["service_stopped"] = (not srv.alive()) and port_refuses(srv.port)
            if not metrics["service_stopped"]:
                raise LlmtechError(f"the service on port {srv.port} is still answering")
            metrics["index_reused"] = index_fingerprint(data_dir) == index_before
    rows = [{"model": label, "id": q["id"], "lang": q["lang"], "question": q["question"],
             "gold": q["answer"], "answer": a.text, "refused": a.refused,
             "correct": bool(q["answer"]) and not a.refused
             and _contains(a.text, q["answer"]),
             "citations": a.citations, "cited_docs": a.cited_doc_ids,
             "retrieved_docs": [ref["document_id"] for ref in r["references"]],
             "latency_s": round(r["latency_s"], 3), "ttft_s": round(r["ttft_s"], 3),
             "completion_tokens": r["completion_tokens"]}
            for q, r, a in zip(questions, replies, answers)]
    return metrics, rows


def _contains(text: str, gold: str) -> bool:
    from .rag.metrics import answer_scores

    return answer_scores(text, gold)["contains"] > 0


def _count_lines(path: str, limit: int | None) -> int:
    n = sum(1 for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())
    return min(n, limit) if limit else n


# --------------------------------------------------------------------------- the whole run

def run_pipeline(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    """Run every stage; write ``metrics.json``, ``report.md``, ``answers.jsonl`` into ``out``;
    return the flat metrics."""
    t_start = time.perf_counter()
    questions = check_inputs(cfg)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in ("sft", "dpo", "serve", "error.log"):  # 每次运行都从头开始
        p = out / old
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    seed_everything(cfg.seed)
    stages = Stages(out)
    m: dict[str, Any] = {"model": cfg.model, "seed": cfg.seed}

    with stages.run("sft", f"LoRA SFT of {cfg.model}, {cfg.sft_steps} steps"):
        sft_dir, sft_metrics = stage_sft(cfg, out)
        m.update(sft_metrics)
        say(f"   held-out response loss {m['sft_eval_loss_before']:.3f} -> "
            f"{m['sft_eval_loss_after']:.3f}; merged model -> {sft_dir}")

    with stages.run("dpo", f"DPO from the SFT model, {cfg.dpo_steps} steps"):
        final_dir, dpo_metrics = stage_dpo(cfg, sft_dir, out)
        m.update(dpo_metrics)
        say(f"   held-out preference accuracy {m['dpo_pref_acc_before']:.3f} -> "
            f"{m['dpo_pref_acc_after']:.3f}; final model -> {final_dir}")
    m["final_model"] = str(final_dir)

    with stages.run("index", f"index {cfg.kb_docs}"):
        m.update(stage_index(cfg, out / "serve"))
        say(f"   {m['index_documents']} documents, {m['index_chunks']} chunks, "
            f"{m['index_seconds']:.1f}s")

    m["questions"] = len(questions)
    m["questions_unanswerable"] = sum(not q["answer"] for q in questions)
    m["questions_zh"] = sum(q["lang"] == "zh" for q in questions)
    aligned, rows = serve_and_ask(cfg, stages, "aligned", str(final_dir), out, questions)
    m.update({f"aligned_{k}": v for k, v in aligned.items()})

    if cfg.compare_base:
        base, base_rows = serve_and_ask(cfg, stages, "base", cfg.model, out, questions,
                                        baseline=True)
        m.update({f"base_{k}": v for k, v in base.items()})
        rows += base_rows
        m["compared"] = (f"同样的 {len(questions)} 道题、同一个服务和知识库，"
                         f"起点模型 {cfg.model} vs SFT+DPO 之后的模型")
    else:
        m["compared"] = "只评测对齐后的模型（compare_base=false）"

    for name, secs in stages.seconds.items():
        m[f"seconds_{name}"] = round(secs, 1)
    m["total_seconds"] = round(time.perf_counter() - t_start, 1)
    m = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}
    atomic_write_jsonl(out / "answers.jsonl", rows)
    atomic_write_json(out / "metrics.json", m)
    atomic_write_text(out / "report.md", report_markdown(cfg, m, rows))
    return m


# --------------------------------------------------------------------------- tables

def stage_rows(m: dict[str, Any]) -> list[dict]:
    """One row per stage: its seconds and the number that shows what it did."""
    def arrow(a, b):
        return f"{a:.3f} → {b:.3f}"

    rows = [
        ("1 sft", "sft", f"留出集 response loss（{m['sft_eval_examples']} 条）",
         arrow(m["sft_eval_loss_before"], m["sft_eval_loss_after"])),
        ("2 dpo", "dpo", f"留出偏好对的偏好准确率（{m['dpo_eval_pairs']} 对）",
         arrow(m["dpo_pref_acc_before"], m["dpo_pref_acc_after"])),
        ("3 index", "index", "文档 / 分块", f"{m['index_documents']} / {m['index_chunks']}"),
        ("4 serve", "serve", "服务启动（秒）/ 复用第 3 步的索引",
         f"{m['aligned_serve_start_s']:.1f} / {m['aligned_index_reused']}"),
        ("5 answer", "answer", "问题数（其中无答案 / 中文）",
         f"{m['questions']}（{m['questions_unanswerable']} / {m['questions_zh']}）"),
        ("6 stop", "stop", "服务已停止（端口拒绝连接）", m["aligned_service_stopped"]),
    ]
    if "seconds_baseline" in m:
        rows.append(("7 baseline", "baseline", "起点模型重复第 4–6 步；服务已停止",
                     m["base_service_stopped"]))
    out = [{"阶段": label, "秒": m.get(f"seconds_{key}"), "指标": metric, "结果": result}
           for label, key, metric, result in rows]
    out.append({"阶段": "合计", "秒": m["total_seconds"], "指标": "", "结果": ""})
    return out


ANSWER_ROWS = [("answer_acc", "答案准确率（可回答题，回答包含标准答案）"),
               ("answer_acc_zh", "　中文"), ("answer_acc_en", "　英文"),
               ("refusal_acc", "拒答准确率（拒答 ⇔ 无答案）"),
               ("refused_unanswerable", "　无答案题被拒答"),
               ("false_refusal", "　可回答题被拒答"),
               ("cited_share", "带 [n] 引用的回答占比"),
               ("citation_acc", "引用准确率（被引文档确含答案）"),
               ("retrieval_hit_at_{k}", "检索命中率 hit@{k}（references 含标准文档）"),
               ("latency_p50_s", "延迟 p50（秒）"), ("latency_p95_s", "延迟 p95（秒）"),
               ("ttft_p50_s", "首 token 延迟 p50（秒）"),
               ("tokens_per_s", "生成速度（token/秒）"),
               ("completion_tokens_mean", "每个回答的 token 数")]


def answer_rows(m: dict[str, Any], top_k: int) -> list[dict]:
    """Base vs aligned, one row per answer metric ("—": not defined, e.g. nothing cited)."""
    def cell(v):
        if v is None:
            return "—"
        return f"{v:.3f}" if isinstance(v, float) else v

    rows = []
    for key, label in ANSWER_ROWS:
        key, label = key.format(k=top_k), label.format(k=top_k)
        row = {"指标": label}
        if "base_answer_acc" in m:
            row[f"起点模型 {m['model']}"] = cell(m.get(f"base_{key}"))
        row["对齐后 SFT+DPO"] = cell(m.get(f"aligned_{key}"))
        rows.append(row)
    return rows


def results_markdown(m: dict[str, Any], top_k: int) -> str:
    return (f"### 各阶段\n\n{markdown_table(stage_rows(m))}\n"
            f"### 经 OpenAI 兼容接口回答留出问题\n\n对比：{m['compared']}\n\n"
            f"{markdown_table(answer_rows(m, top_k))}")


def report_markdown(cfg: PipelineConfig, m: dict[str, Any], rows: list[dict]) -> str:
    def short(text: str) -> str:
        return text if len(text) <= 120 else text[:120] + "…"

    aligned = [r for r in rows if r["model"] == "aligned"]
    base = {r["id"]: r for r in rows if r["model"] == "base"}
    examples = []
    for r in (aligned[:2] + aligned[-2:]) if len(aligned) > 4 else aligned:
        ex = {"id": r["id"], "问题": r["question"], "标准答案": r["gold"] or "（无答案）"}
        if r["id"] in base:
            ex["起点模型"] = short(base[r["id"]]["answer"])
        ex["对齐后"] = short(r["answer"])
        examples.append(ex)
    return "\n".join([
        "# llmtech demo：SFT → DPO → 建索引 → 启动服务 → 回答留出问题\n",
        f"配置：`{cfg.model_dump_json()}`\n",
        results_markdown(m, cfg.top_k),
        "### 回答示例\n", markdown_table(examples),
        "全部回答见 `answers.jsonl`，服务日志见 `serve_*.log`。\n",
        "### 全部指标\n", markdown_table([{"metric": k, "value": v} for k, v in m.items()])])


def settings(full: bool = False, config: str | Path | None = None,
             overrides: list[str] | None = None) -> PipelineConfig:
    """Defaults (quick), or ``FULL`` with ``--full``; then the YAML file, then key=value."""
    return load_config(PipelineConfig, config, overrides or [],
                       defaults=dict(FULL) if full else None)


def main(out: Path, full: bool = False, config: str | Path | None = None,
         overrides: list[str] | None = None) -> dict[str, Any]:
    """What ``llmtech demo`` runs: settings, every stage, then the results table."""
    cfg = settings(full, config, overrides)
    for noisy in ("httpx", "httpx2", "openai"):  # one log line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    say(f"llmtech demo ({'full' if full else 'quick'}): {cfg.model}, out -> {out}")
    m = run_pipeline(cfg, out)
    say("\n== llmtech demo: results ==\n")
    say(results_markdown(m, cfg.top_k))
    say(f"total {m['total_seconds']:.0f}s; metrics -> {Path(out) / 'metrics.json'}, "
        f"report -> {Path(out) / 'report.md'}")
    return m
