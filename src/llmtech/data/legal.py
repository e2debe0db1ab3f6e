"""A legal Q&A domain built from a knowledge base of statute articles (PRC laws).

The knowledge base is a folder holding ``articles.jsonl``: one JSON object per article with
``id``, ``law``, ``article`` ("第二十一条"), ``text`` (starting with the article number) and
optionally ``chapter`` / ``section`` — the layout of ``../shared/data/zh_laws_kb``.

From it this module builds

* a deterministic split by *article* (``split_articles``): held-out articles are picked
  round-robin over the laws (so every law is represented) and never appear in training data;
* SFT records in alpaca format (``sft_records``, ``training_records``): "《law》第N条规定了什么？"
  -> the article body, and "下面这段条文出自哪部法律？<text>" -> "《law》";
* a four-way multiple-choice eval on held-out articles (``law_questions``): which law does this
  text come from, options = the true law + distractor laws drawn deterministically per question;
* log-likelihood scoring of those questions with the chat template the training used
  (``score_questions``): each option is scored as the assistant's answer, raw (summed
  log-probability) and calibrated (minus the option's log-probability when the article text is
  left out, which removes the model's prior for naming a law — a prior that drifts towards
  recently trained names during a short fine-tune); a model-free reference
  (``lexical_baseline``: character overlap of law name and text); and the held-out answer loss
  of the "规定了什么" records (``answer_loss``).

Texts are clipped to ``max_chars`` characters so that prompt + answer fit the training length.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import DataError
from .formats import read_records, to_messages

ARTICLES_FILE = "articles.jsonl"
CONTENT_TASK, SOURCE_TASK = "content", "source"
SOURCE_QUESTION = "下面这段条文出自哪部法律？"
_REQUIRED = ("id", "law", "article", "text")
_NUMBER_PREFIX = re.compile(r"^第[零〇一二三四五六七八九十百千0-9]+条(之[一二三四五六七八九十]+)?\s*")


@dataclass(frozen=True)
class Article:
    id: str
    law: str
    article: str  # "第二十一条"
    text: str  # as in the file: "第二十一条 劳动合同可以约定试用期。……"
    chapter: str = ""
    where: str = ""  # "file:line"

    @property
    def body(self) -> str:
        """The text without its leading "第N条 " number."""
        return _NUMBER_PREFIX.sub("", self.text, count=1).strip() or self.text


def find_kb(kb_dir: str | Path) -> Path:
    """``kb_dir/articles.jsonl``; a clear DataError when the folder or the file is missing."""
    d = Path(kb_dir)
    if not d.is_dir():
        raise DataError(f"{d}: law knowledge-base folder not found (expected a folder holding "
                        f"{ARTICLES_FILE}, e.g. the public dataset ../shared/data/zh_laws_kb next to "
                        "the repository; set kb_dir=... to point at it)")
    f = d / ARTICLES_FILE
    if not f.is_file():
        raise DataError(f"{f}: not found (the law knowledge-base folder must hold {ARTICLES_FILE})")
    return f


def load_articles(kb_dir: str | Path) -> list[Article]:
    """Every article of ``kb_dir/articles.jsonl``. A malformed line, a missing or empty field,
    or a repeated id is a DataError naming ``file:line``."""
    out: list[Article] = []
    seen: dict[str, str] = {}
    for where, rec in read_records(find_kb(kb_dir)):
        for key in _REQUIRED:
            v = rec.get(key)
            if not isinstance(v, str) or not v.strip():
                raise DataError(f"{where}: field '{key}' must be a non-empty string"
                                + ("" if key in rec else " (missing)"))
        if rec["id"] in seen:
            raise DataError(f"{where}: id {rec['id']!r} repeats the article at {seen[rec['id']]}")
        seen[rec["id"]] = where
        out.append(Article(id=rec["id"], law=rec["law"].strip(), article=rec["article"].strip(),
                           text=rec["text"].strip(), chapter=str(rec.get("chapter") or "").strip(),
                           where=where))
    return out


def laws_of(articles: Iterable[Article]) -> list[str]:
    """The distinct law names, sorted."""
    return sorted({a.law for a in articles})


def round_robin(articles: list[Article], n: int | None, seed: int) -> list[Article]:
    """Up to ``n`` articles (None = all) taken one law at a time in turn, each law's articles in
    an order shuffled by ``seed``: small samples cover every law instead of mirroring the
    corpus (where one law may hold a third of the articles)."""
    by_law: dict[str, list[Article]] = {}
    for a in sorted(articles, key=lambda a: a.id):
        by_law.setdefault(a.law, []).append(a)
    rng = random.Random(seed)
    queues = []
    for law in sorted(by_law):
        q = by_law[law][:]
        rng.shuffle(q)
        queues.append(q)
    limit = len(articles) if n is None else min(n, len(articles))
    out: list[Article] = []
    depth = 0
    while len(out) < limit:
        for q in queues:
            if depth < len(q) and len(out) < limit:
                out.append(q[depth])
        depth += 1
    return out


def split_articles(articles: list[Article], n_heldout: int, seed: int = 0) -> tuple[list[Article], list[Article]]:
    """``(train_pool, heldout)``: ``n_heldout`` articles chosen round-robin over the laws are held
    out; every other article may be used for training. The split is by article, so no held-out
    article (nor any question built from it) can leak into training."""
    if not 0 < n_heldout < len(articles):
        raise DataError(f"n_heldout must be between 1 and {len(articles) - 1} (got {n_heldout})")
    held = round_robin(articles, n_heldout, seed)
    held_ids = {a.id for a in held}
    return [a for a in articles if a.id not in held_ids], held


def clip(text: str, max_chars: int) -> str:
    """``text`` cut to ``max_chars`` characters, "……" marking a cut."""
    return text if len(text) <= max_chars else text[:max_chars] + "……"


def content_record(a: Article, max_chars: int) -> dict:
    return {"instruction": f"《{a.law}》{a.article}规定了什么？", "input": "",
            "output": clip(a.body, max_chars), "id": a.id, "task": CONTENT_TASK}


def source_record(a: Article, max_chars: int) -> dict:
    return {"instruction": SOURCE_QUESTION, "input": clip(a.body, max_chars),
            "output": f"《{a.law}》", "id": a.id, "task": SOURCE_TASK}


def sft_records(articles: list[Article], max_chars: int = 60, seed: int = 0,
                tasks: tuple[str, ...] = (CONTENT_TASK, SOURCE_TASK)) -> list[dict]:
    """Alpaca records (instruction / input / output, plus ``id`` and ``task``) for each article
    and task, shuffled by ``seed``."""
    build = {CONTENT_TASK: content_record, SOURCE_TASK: source_record}
    unknown = [t for t in tasks if t not in build]
    if unknown:
        raise DataError(f"unknown task(s) {unknown}; use {CONTENT_TASK!r} and/or {SOURCE_TASK!r}")
    rows = [build[t](a, max_chars) for a in articles for t in tasks]
    random.Random(seed).shuffle(rows)
    return rows


def training_records(pool: list[Article], n_source: int, n_content: int, max_chars: int = 60,
                     seed: int = 0) -> list[dict]:
    """``n_source`` "出自哪部法律" and ``n_content`` "规定了什么" records from ``pool``, each set
    drawn round-robin over the laws (the content articles are the first ``n_content`` of the
    same order, so they are a subset of the source articles when ``n_content <= n_source``),
    shuffled together by ``seed``."""
    order = round_robin(pool, max(n_source, n_content), seed)
    if len(order) < max(n_source, n_content):
        raise DataError(f"the training pool has {len(pool)} articles; asked for "
                        f"{max(n_source, n_content)}")
    rows = ([source_record(a, max_chars) for a in order[:n_source]]
            + [content_record(a, max_chars) for a in order[:n_content]])
    random.Random(seed).shuffle(rows)
    return rows


@dataclass(frozen=True)
class LawQuestion:
    id: str
    law: str
    record: dict  # the source_record: instruction + input (the clipped article text)
    options: tuple[str, ...]  # "《law》" strings
    answer: int  # index into options


def law_questions(heldout: list[Article], laws: list[str], seed: int = 0, n_options: int = 4,
                  max_chars: int = 60) -> list[LawQuestion]:
    """For each held-out article: which law is it from? The true law plus ``n_options - 1``
    distractor laws, drawn and ordered by a generator seeded with ``seed`` and the article id
    (so a question does not change when other questions are added or removed)."""
    others_needed = n_options - 1
    out = []
    for a in heldout:
        pool = sorted(law for law in set(laws) if law != a.law)
        if len(pool) < others_needed:
            raise DataError(f"{n_options} options need {n_options} distinct laws; the knowledge base "
                            f"has {len(pool) + 1}")
        rng = random.Random(f"{seed}:{a.id}")
        names = [a.law, *rng.sample(pool, others_needed)]
        rng.shuffle(names)
        out.append(LawQuestion(id=a.id, law=a.law, record=source_record(a, max_chars),
                               options=tuple(f"《{n}》" for n in names), answer=names.index(a.law)))
    return out


def option_logprobs(model, prompt_ids: list[int], options: list[list[int]]) -> list[float]:
    """Summed log-probability of each token sequence in ``options`` as the continuation of
    ``prompt_ids`` (the prompt runs once and its cache is shared: ``evals.mcq``)."""
    from ..evals.mcq import score_token_continuations

    return score_token_continuations(model, prompt_ids, options)


def score_questions(model, tokenizer, questions: list[LawQuestion], system: str | None = None) -> dict:
    """Choose, per question, the option with the highest log-likelihood as the assistant's reply
    (prompt rendered with the chat template, as in training; the option's tokens include the
    end-of-turn the template appends), two ways:

    * raw: the summed log-probability ``log p(option | question)``;
    * calibrated: ``log p(option | question) - log p(option | question without the article
      text)``, i.e. how much the text itself raises each law. The second term is the model's
      prior for naming that law at all (short names and recently trained names get more of
      it); subtracting it is the "domain-conditional PMI" of Holtzman et al. (2021) and costs
      one extra prompt for all questions.

    Returns ``{"accuracy", "accuracy_calibrated", "n", "chance", "prior", "rows"}``; each row
    has the question id, law, predicted (raw and calibrated) and true option, and the scores.
    """
    from ..evals.lm import encode_chat_example

    model.eval()

    def split(record: dict, options) -> tuple[list[int], list[list[int]]]:
        enc = [encode_chat_example(tokenizer, to_messages({**record, "output": o}, system), 10**9)
               for o in options]
        n_prompt = enc[0]["target_mask"].index(1)
        return enc[0]["input_ids"][:n_prompt], [e["input_ids"][n_prompt:] for e in enc]

    if not questions:
        raise ValueError("score_questions needs at least one question")
    names = sorted({o for q in questions for o in q.options})
    prompt, opts = split({**questions[0].record, "input": ""}, names)
    prior = dict(zip(names, option_logprobs(model, prompt, opts)))
    rows = []
    for q in questions:
        prompt, opts = split(q.record, q.options)
        lp = option_logprobs(model, prompt, opts)
        cal = [x - prior[o] for x, o in zip(lp, q.options)]
        pred = max(range(len(lp)), key=lp.__getitem__)
        pred_cal = max(range(len(cal)), key=cal.__getitem__)
        rows.append({"id": q.id, "law": q.law, "gold": q.options[q.answer],
                     "pred": q.options[pred], "correct": pred == q.answer,
                     "pred_calibrated": q.options[pred_cal], "correct_calibrated": pred_cal == q.answer,
                     "logprobs": lp, "calibrated": cal})
    n = len(rows)
    return {"accuracy": sum(r["correct"] for r in rows) / n,
            "accuracy_calibrated": sum(r["correct_calibrated"] for r in rows) / n,
            "n": n, "chance": 1 / len(questions[0].options), "prior": prior, "rows": rows}


def accuracy_by_law(rows: list[dict], key: str = "correct_calibrated") -> dict[str, tuple[int, int]]:
    """law -> (correct, n) over ``score_questions`` rows (``key``: which choice counts)."""
    out: dict[str, tuple[int, int]] = {}
    for r in rows:
        c, n = out.get(r["law"], (0, 0))
        out[r["law"]] = (c + int(r[key]), n + 1)
    return out


def short_name(option: str) -> str:
    """"《中华人民共和国食品安全法》" -> "食品安全": the part of a law's name that tells laws apart."""
    name = option.strip("《》").removeprefix("中华人民共和国")
    for suffix in ("条例", "法"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def lexical_baseline(questions: list[LawQuestion]) -> float:
    """Accuracy of a rule with no model at all: pick the option whose short name shares the
    largest fraction of its characters with the article text (ties: the first option). A
    reference point for how much of the task is plain word overlap."""
    right = 0
    for q in questions:
        text = q.record["input"]
        share = []
        for o in q.options:
            chars = set(short_name(o))
            share.append(sum(c in text for c in chars) / max(len(chars), 1))
        right += max(range(len(share)), key=share.__getitem__) == q.answer
    return right / max(len(questions), 1)


def answer_loss(model, tokenizer, records: list[dict], system: str | None = None,
                max_length: int = 512, batch_size: int = 8) -> float:
    """Mean per-token loss of the records' outputs (the assistant turn) given their prompts."""
    from ..evals.lm import response_loss

    return response_loss(model, tokenizer, [to_messages(r, system) for r in records],
                         max_length=max_length, batch_size=batch_size)
