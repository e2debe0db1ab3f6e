"""Audit and clean alignment data: preference pairs (DPO / reward model) and KTO rows.

Works on the canonical rows of ``llmtech.data.preference`` (``load_pairs`` / ``load_unpaired``).
Records the loader could not use are not re-checked here: its ``problems`` (with ``file:line``)
are taken over as flags, so a report lists every bad record of the file in one place.

Checks, each a *category* of flag (``CATEGORIES``):

* loader problems: ``missing_fields``, ``wrong_format``, ``mixed_formats``, ``invalid`` (e.g. an
  empty prompt), ``tie`` and ``exact_dup`` (the loader's exact checks);
* ``tie``: chosen == rejected after NFKC, case folding and removing whitespace/punctuation
  (stricter than the loader's exact comparison);
* ``exact_dup``: the same (prompt, chosen, rejected) — or (prompt, completion, label) — after the
  same normalisation; the first occurrence is kept;
* ``near_dup``: MinHash LSH (``dedup.near_dedup``) on prompt + chosen (KTO: prompt + completion)
  text, Jaccard of character n-gram sets >= ``near_threshold``, and the prompts alone at least
  ``near_prompt_min`` alike. Not near-duplicates: several pairs that share the very same prompt
  and chosen answer but have *different* rejected answers (a normal way to build pair data),
  two different questions that share one answer (paraphrase augmentation), and a desirable and
  an undesirable KTO completion that differ in one number (KTO rows are compared per label);
* ``length_ratio``: chars(chosen) / chars(rejected) outside ``[ratio_lo, ratio_hi]``;
* ``lang_mismatch``: the chosen / rejected / completion language (``clean.detect_lang``) differs
  from the prompt's (zh vs en); ``lang_other``: a text in a language outside ``langs``;
* ``pii``: phone, e-mail, ID-card, bank-card, IP found by ``clean.mask_pii`` (kinds reported);
* ``toxic``: insults/profanity in the answer that is taught as *good* (chosen, or a KTO
  completion labelled desirable). **Rule-based**: a short zh + en lexicon (``TOXIC_ZH``,
  ``TOXIC_EN``), no model. An optional classifier (``toxicity_model``, a transformers
  text-classification model) is used in addition only when configured and loadable;
* ``contaminated``: the prompt overlaps an eval question by n-grams (optionally also the chosen
  answer an eval answer: ``contam_fields``; off by default because a closed-domain FAQ's train
  and test answers state the same facts by design);
* ``label_conflict`` (KTO): the same prompt + completion labelled both desirable and undesirable.

Decontamination uses n-grams of a size that makes one shared n-gram a phrase, not a common
word pair: Chinese has no spaces, so **8 characters** (about 4-5 Chinese words) of the text
with whitespace and punctuation removed; English uses **5 words**. Both are shorter than the
13-gram rule used for web-scale corpora because customer questions are short (10-20 words):
a 13-gram would miss a copied question altogether. A training text is contaminated when the
*overlap coefficient* ``|A ∩ B| / min(|A|, |B|)`` of its n-gram set with one eval item's reaches
``contam_threshold``: a copied question scores 1.0, a question embedded in a longer prompt
too, while a paraphrase that shares a phrase or two stays low.

``curate`` drops rows with a flag listed in ``drop``, masks PII in kept rows
(``pii_action="mask"``), and returns ``(kept_rows, report)``; ``write_clean`` writes them back in
the plain ``{"prompt", "chosen", "rejected"}`` (or ``{"prompt", "completion", "label"}``) layout.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal

from pydantic import Field, model_validator

from ..config import StrictModel
from ..errors import DataError
from ..io import atomic_write_jsonl, read_text
from .clean import PII_TAGS, detect_lang, mask_pii
from .dedup import canonical_text, jaccard, near_dedup
from .formats import read_records
from .preference import PreferenceData, Problem, load_pairs, load_unpaired, prompt_text, text_of

log = logging.getLogger(__name__)

SCHEMA = ("missing_fields", "wrong_format", "mixed_formats", "invalid")
CATEGORIES = (*SCHEMA, "tie", "exact_dup", "near_dup", "length_ratio", "lang_mismatch",
              "lang_other", "pii", "toxic", "contaminated", "label_conflict")
Category = Literal[CATEGORIES]
# loader problem code -> category ("duplicate" is the loader's exact duplicate)
LOADER_CATEGORY = {"missing_fields": "missing_fields", "wrong_format": "wrong_format",
                   "mixed_formats": "mixed_formats", "invalid": "invalid", "tie": "tie",
                   "duplicate": "exact_dup"}
DEFAULT_EVAL_FILES = ["data/support/sft_test.jsonl", "data/support/eval_qa.jsonl",
                      "data/support/preference_test.jsonl"]

# --------------------------------------------------------------------------- toxicity lexicon
# A deliberately short, rule-based list of insults and profanity (not a classifier). Chinese
# terms match as substrings, so each is chosen not to occur inside ordinary words: no bare
# "滚" (滚刷, 滚动), "操" (操作), "垃圾" (倒垃圾), "妈的" (妈妈的) or "废物" (塑料废物 =
# plastic waste, a false hit found in dpo_zh_demo).
TOXIC_ZH = ("傻逼", "傻B", "傻X", "煞笔", "傻瓜", "笨蛋", "白痴", "蠢货", "蠢猪", "脑残", "弱智",
            "智障", "滚开", "滚蛋", "给我滚", "去死", "神经病", "你有病", "闭嘴", "他妈的",
            "操你", "狗东西", "猪脑子", "没脑子", "不要脸", "混蛋", "王八蛋", "活该")
# English terms match as whole words (case-insensitive); "*" covers f*ck-style spellings.
TOXIC_EN = ("idiot", "idiots", "idiotic", "stupid", "dumb", "dumbass", "moron", "morons", "imbecile",
            "shut up", "loser", "losers", "damn", "crap", "shit", "bullshit", "fuck", "fucking",
            "f*ck", "f**k", "wtf", "bitch", "bastard", "screw you", "get lost", "piss off",
            "pathetic", "retard", "retarded", "jerk")


def _en_pattern(terms: Iterable[str]) -> re.Pattern:
    alts = sorted({re.escape(t.lower()) for t in terms}, key=len, reverse=True)
    return re.compile(r"(?<![\w*])(?:" + "|".join(alts) + r")(?![\w*])", re.I)


_TOXIC_EN_RE = _en_pattern(TOXIC_EN)


def toxic_terms(text: str, extra: Iterable[str] = ()) -> list[str]:
    """Lexicon terms found in ``text`` (rule-based). ``extra`` adds terms: ones with a Chinese
    character match as substrings, others as whole words."""
    low = text.casefold()
    extra = list(extra)
    zh_terms = TOXIC_ZH + tuple(t for t in extra if re.search("[\u3400-\u9fff]", t))
    found = [t for t in zh_terms if t.casefold() in low]
    found += [m.group(0).lower() for m in _TOXIC_EN_RE.finditer(text)]
    en_extra = [t for t in extra if not re.search("[\u3400-\u9fff]", t)]
    if en_extra:
        found += [m.group(0).lower() for m in _en_pattern(en_extra).finditer(text)]
    return sorted(set(found))


ToxicityScorer = Callable[[str], float]
_NOT_TOXIC = ("non", "not", "neutral", "normal", "label_0", "ok", "clean", "safe")


def load_toxicity_classifier(model: str) -> ToxicityScorer | None:
    """An optional classifier hook: a transformers ``text-classification`` model id or local
    folder -> ``text -> toxicity score in [0, 1]`` (the highest score of a label that is not
    a "non-toxic"/"neutral" label). Returns None (and logs why) when it cannot be loaded —
    offline, not installed — so the rule-based lexicon alone is used."""
    if not model:
        return None
    try:
        from transformers import pipeline

        clf = pipeline("text-classification", model=model, top_k=None, truncation=True)
    except Exception as e:  # noqa: BLE001 - any failure means "not available"
        log.warning("toxicity classifier %r not available (%s: %s); using the lexicon only",
                    model, type(e).__name__, str(e)[:200])
        return None

    def score(text: str) -> float:
        out = clf(text[:2000])
        labels = out[0] if out and isinstance(out[0], list) else out
        return max((d["score"] for d in labels if not d["label"].lower().startswith(_NOT_TOXIC)),
                   default=0.0)

    return score


# --------------------------------------------------------------------------- config

class CurationConfig(StrictModel):
    """Thresholds and actions of ``audit`` / ``curate``."""

    # duplicates (MinHash LSH from llmtech.data.dedup on prompt + chosen text)
    near_threshold: float = Field(0.8, gt=0, le=1)   # Jaccard of character n-gram sets
    # ... and the two prompts themselves must be this similar (0 = off): two different
    # questions that share one answer (paraphrase augmentation) are not near-duplicates
    near_prompt_min: float = Field(0.5, ge=0, le=1)
    near_ngram: int = Field(3, ge=1)
    num_perm: int = Field(128, ge=16)
    minhash_seed: int = 1
    # chosen/rejected length ratio in characters: flagged outside [ratio_lo, ratio_hi]
    ratio_lo: float = Field(0.1, gt=0)
    ratio_hi: float = Field(10.0, gt=0)
    # languages a text may be in ([] = any) and whether answers must match the prompt's
    langs: list[Literal["zh", "en"]] = ["zh", "en"]
    lang_match: bool = True
    # PII: kinds looked for, values that are not personal (e.g. "@company.example"), action
    pii_types: list[Literal["email", "id", "card", "phone", "ip"]] = list(PII_TAGS)
    pii_allow: list[str] = []
    pii_action: Literal["mask", "drop", "report"] = "mask"
    # toxicity: rule-based lexicon (+ extra terms); optional classifier used only when set
    toxic_terms: list[str] = []
    toxicity_model: str = ""
    toxicity_threshold: float = Field(0.5, gt=0, le=1)
    # decontamination against eval sets (see the module docstring for the n-gram sizes)
    eval_files: list[str] = list(DEFAULT_EVAL_FILES)
    contam_zh_ngram: int = Field(8, ge=2)     # characters
    contam_en_ngram: int = Field(5, ge=2)     # words
    contam_threshold: float = Field(0.5, gt=0, le=1)
    contam_fields: list[Literal["prompt", "chosen"]] = ["prompt"]
    # which flags remove a row (the others are only reported); PII follows pii_action
    drop: list[Category] = ["tie", "exact_dup", "near_dup", "length_ratio", "lang_mismatch",
                            "lang_other", "toxic", "contaminated", "label_conflict"]

    @model_validator(mode="after")
    def _check(self):
        if self.ratio_lo >= self.ratio_hi:
            raise ValueError(f"ratio_lo ({self.ratio_lo}) must be below ratio_hi ({self.ratio_hi})")
        if "pii" in self.drop:
            raise ValueError("put PII handling in pii_action (mask | drop | report), not in drop")
        return self


# --------------------------------------------------------------------------- eval n-grams

@dataclass
class EvalText:
    where: str   # file:line of the eval item
    field: str   # "question" or "answer"
    text: str


_QUESTION_KEYS = ("question", "query", "instruction", "prompt", "conversations", "messages")
_ANSWER_KEYS = ("answer", "output", "chosen", "completion", "response")


def _flatten(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return str(value.get("content", value.get("value", "")))
    if isinstance(value, list):
        return "\n".join(_flatten(v) for v in value if not (isinstance(v, dict) and
                         v.get("role", v.get("from")) in ("assistant", "gpt", "system")))
    return ""


def load_eval_texts(files: Iterable[str | Path], root: str | Path | None = None) -> list[EvalText]:
    """Questions and answers of eval sets in any of the project's layouts (alpaca, eval_qa's
    question/answer, preference, KTO, sharegpt). Relative paths are taken from ``root``."""
    out: list[EvalText] = []
    for f in files:
        path = Path(f)
        if root is not None and not path.is_absolute():
            path = Path(root) / path
        prefix = f"{Path(root)}/" if root is not None else ""
        for where, rec in read_records(path):
            if prefix and where.startswith(prefix):
                where = where[len(prefix):]   # file:line relative to root, as the config named it
            qkey = next((k for k in _QUESTION_KEYS if rec.get(k)), None)
            if qkey is None:
                raise DataError(f"{where}: eval record has no question field (one of "
                                f"{', '.join(_QUESTION_KEYS)}); keys are {sorted(rec)}")
            q = _flatten(rec[qkey])
            if qkey == "instruction" and rec.get("input"):
                q += "\n" + str(rec["input"])
            out.append(EvalText(where, "question", q))
            akey = next((k for k in _ANSWER_KEYS if rec.get(k)), None)
            if akey is not None:
                a = rec[akey]
                a = a if isinstance(a, str) else "\n".join(
                    m.get("content", m.get("value", "")) if isinstance(m, dict) else str(m)
                    for m in (a if isinstance(a, list) else [a]))
                out.append(EvalText(where, "answer", a))
    return out


def ngrams(text: str, zh_n: int = 8, en_n: int = 5) -> set[str]:
    """Decontamination n-grams: character ``zh_n``-grams of the canonical text (no whitespace
    or punctuation) when the text is Chinese, else word ``en_n``-grams; a text shorter than n
    is one gram."""
    if detect_lang(text) == "zh":
        t = canonical_text(text)
        if len(t) <= zh_n:
            return {t} if t else set()
        return {t[i:i + zh_n] for i in range(len(t) - zh_n + 1)}
    words = re.findall(r"\w+", canonical_text_words(text))
    if len(words) <= en_n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + en_n]) for i in range(len(words) - en_n + 1)}


def canonical_text_words(text: str) -> str:
    """NFKC + case folding, keeping word boundaries (for word n-grams)."""
    return unicodedata.normalize("NFKC", text).casefold()


class EvalIndex:
    """Inverted index n-gram -> eval items, for the overlap of one text with every eval item."""

    def __init__(self, texts: list[EvalText], zh_n: int = 8, en_n: int = 5):
        self.texts, self.zh_n, self.en_n = texts, zh_n, en_n
        self.grams: list[set[str]] = [ngrams(t.text, zh_n, en_n) for t in texts]
        self.index: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, (t, gs) in enumerate(zip(texts, self.grams)):
            for g in gs:
                self.index[(t.field, g)].append(i)

    def best(self, text: str, field: str = "question") -> tuple[float, EvalText | None]:
        """Highest overlap coefficient of ``text`` with one eval item of the given field."""
        gs = ngrams(text, self.zh_n, self.en_n)
        if not gs:
            return 0.0, None
        hits: dict[int, int] = defaultdict(int)
        for g in gs:
            for i in self.index.get((field, g), ()):
                hits[i] += 1
        best, who = 0.0, None
        for i, h in sorted(hits.items()):
            ov = h / min(len(gs), len(self.grams[i]))
            if ov > best:
                best, who = ov, self.texts[i]
        return best, who


# --------------------------------------------------------------------------- report

_SHORT_PATH = re.compile(r"(?:[\w.~-]*/)+([\w.-]+:\d+)")  # a/b/file.jsonl:12 -> file.jsonl:12


@dataclass
class Flag:
    where: str         # file:line of the record
    category: str      # one of CATEGORIES
    detail: str
    index: int | None = None   # position in the rows passed to audit (None: the loader skipped it)


@dataclass
class CurationReport:
    source: str
    kind: str
    n_read: int
    n_rows: int                      # rows the loader accepted
    flags: list[Flag] = field(default_factory=list)
    n_kept: int | None = None        # set by curate
    dropped_by: dict[str, int] = field(default_factory=dict)
    pii_masked: int = 0
    toxicity_classifier: str = "lexicon"   # "lexicon + classifier" when a classifier was used

    def counts(self) -> dict[str, int]:
        """Records flagged per category (a record counts once per category)."""
        seen = {(f.where, f.category) for f in self.flags}
        out = {c: 0 for c in CATEGORIES}
        for _, c in seen:
            out[c] += 1
        return out

    def flagged_records(self) -> int:
        return len({f.where for f in self.flags})

    def by_where(self) -> dict[str, list[Flag]]:
        out: dict[str, list[Flag]] = defaultdict(list)
        for f in self.flags:
            out[f.where].append(f)
        return dict(out)

    def table(self, limit: int | None = None, short_paths: bool = True) -> list[dict]:
        """One row per flag (for a Markdown table): where, category, detail."""
        rows = []
        for f in self.flags[:limit]:
            where, detail = f.where, f.detail
            if short_paths:
                where, detail = _SHORT_PATH.sub(r"\1", where), _SHORT_PATH.sub(r"\1", detail)
            rows.append({"where": where, "category": f.category, "detail": detail})
        return rows

    def summary(self, prefix: str = "") -> dict:
        """Flat numbers (for metrics.json): read, loaded, flagged records, per-category counts,
        and after ``curate`` kept / dropped (of all records read) / PII items masked."""
        out = {f"{prefix}read": self.n_read, f"{prefix}loaded": self.n_rows,
               f"{prefix}flagged_records": self.flagged_records()}
        out.update({f"{prefix}flag_{c}": n for c, n in self.counts().items()})
        out[f"{prefix}loader_skipped"] = self.n_read - self.n_rows
        if self.n_kept is not None:
            out[f"{prefix}kept"] = self.n_kept
            out[f"{prefix}dropped"] = self.n_read - self.n_kept   # loader-skipped included
            out[f"{prefix}pii_masked"] = self.pii_masked
        return out


# --------------------------------------------------------------------------- audit

def _answers(row: dict) -> dict[str, str]:
    if "completion" in row:
        return {"completion": text_of(row["completion"])}
    return {"chosen": text_of(row["chosen"]), "rejected": text_of(row["rejected"])}


def _prompt_all(row: dict) -> str:
    """Every user turn of the prompt (what a question leak would copy)."""
    return "\n".join(m["content"] for m in row["prompt"] if m["role"] == "user")


def _is_messages(value) -> bool:
    return (isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in value))


def _key(*parts: str) -> str:
    return "\x1f".join(canonical_text(p) for p in parts)


def audit(rows: list[dict] | PreferenceData, cfg: CurationConfig | None = None,
          eval_texts: list[EvalText] | EvalIndex | None = None,
          problems: Iterable[Problem] = (), toxicity: ToxicityScorer | None = None,
          source: str = "") -> CurationReport:
    """Check canonical rows (pairs or KTO rows) and return every flag with its ``where``.

    ``rows`` may be a ``PreferenceData`` (its loader problems are included) or a list of rows
    (pass the loader's ``problems`` to include them). ``eval_texts`` (from
    ``load_eval_texts``) enables decontamination; ``toxicity`` is a classifier hook
    (``load_toxicity_classifier``), used next to the lexicon.
    """
    cfg = cfg or CurationConfig()
    if isinstance(rows, PreferenceData):
        problems = list(rows.problems) + list(problems)
        source, n_read, rows = source or rows.source, rows.n_read, rows.rows
    else:
        problems = list(problems)
        n_read = len(rows) + len(problems)
    kind = "unpaired" if rows and "completion" in rows[0] else "pairs"
    keys = ("prompt", "completion") if kind == "unpaired" else ("prompt", "chosen", "rejected")
    for i, r in enumerate(rows):
        if not (isinstance(r, dict) and ("completion" in r) == (kind == "unpaired")
                and all(_is_messages(r.get(k)) for k in keys)):
            where = r.get("where", f"row {i}") if isinstance(r, dict) else f"row {i}"
            what = "KTO row" if kind == "unpaired" else "preference pair"
            raise DataError(f"{where}: not a canonical {what} (message lists under "
                            f"{', '.join(keys)}); load the file with llmtech.data.preference first")
    rep = CurationReport(source, kind, n_read, len(rows),
                         toxicity_classifier="lexicon + classifier" if toxicity else "lexicon")
    flags = rep.flags
    for p in problems:
        flags.append(Flag(p.where, LOADER_CATEGORY.get(p.code, "invalid"), f"{p.reason} (loader)"))

    prompts = [_prompt_all(r) for r in rows]
    answers = [_answers(r) for r in rows]

    # exact duplicates, ties, KTO label conflicts (canonical text)
    seen: dict[str, int] = {}
    labels: dict[str, dict[bool, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, (r, p, a) in enumerate(zip(rows, prompts, answers)):
        if kind == "pairs":
            k = _key(p, a["chosen"], a["rejected"])
            if canonical_text(a["chosen"]) == canonical_text(a["rejected"]):
                flags.append(Flag(r["where"], "tie", "chosen == rejected after normalising "
                                  "case, whitespace and punctuation", i))
        else:
            k = _key(p, a["completion"]) + ("\x1eT" if r["label"] else "\x1eF")
            labels[_key(p, a["completion"])][bool(r["label"])].append(i)
        if k in seen:
            flags.append(Flag(r["where"], "exact_dup",
                              f"same text as {rows[seen[k]]['where']} after normalisation", i))
        else:
            seen[k] = i
    for by_label in labels.values():
        if len(by_label) == 2:
            both = sorted(by_label[True] + by_label[False])
            for i in both:
                others = ", ".join(rows[j]["where"] for j in both if j != i)
                flags.append(Flag(rows[i]["where"], "label_conflict",
                                  f"same prompt + completion labelled the other way at {others}", i))

    # near duplicates: MinHash on prompt + chosen (KTO: prompt + completion), confirmed on the
    # prompts; rows with the very same prompt + chosen (another rejected answer for the same
    # question) form one group and are compared once
    exact_dups = {f.index for f in flags if f.category == "exact_dup"}
    goods = [a.get("chosen", a.get("completion", "")) for a in answers]
    # KTO rows are compared within one label: a desirable answer and an undesirable one that
    # differs in a single number are a deliberate contrast, not a duplicate
    parts: dict[object, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        if i not in exact_dups:
            parts[r.get("label")].append(i)
    for part in parts.values():
        flags += _near_dups(rows, prompts, goods, part, cfg)

    index = eval_texts if isinstance(eval_texts, EvalIndex) else (
        EvalIndex(eval_texts, cfg.contam_zh_ngram, cfg.contam_en_ngram) if eval_texts else None)
    allowed = set(cfg.langs)
    for i, (r, p, a) in enumerate(zip(rows, prompts, answers)):
        w = r["where"]
        # length ratio
        if kind == "pairs":
            lc, lr = len(a["chosen"].strip()), len(a["rejected"].strip())
            ratio = lc / max(lr, 1)
            if not cfg.ratio_lo <= ratio <= cfg.ratio_hi:
                flags.append(Flag(w, "length_ratio", f"chosen/rejected = {lc}/{lr} chars = {ratio:.2f} "
                                  f"(outside [{cfg.ratio_lo}, {cfg.ratio_hi}])", i))
        # language
        langs = {"prompt": detect_lang(prompt_text(r["prompt"]))}
        langs.update({k: detect_lang(v) for k, v in a.items()})
        if allowed:
            bad = {k: v for k, v in langs.items() if v not in allowed and v != "unknown"}
            if bad:
                flags.append(Flag(w, "lang_other", ", ".join(f"{k} is {v}" for k, v in bad.items())
                                  + f" (allowed: {'+'.join(sorted(allowed))})", i))
        if cfg.lang_match and langs["prompt"] in ("zh", "en"):
            off = [k for k in a if langs[k] in ("zh", "en") and langs[k] != langs["prompt"]]
            if off:
                flags.append(Flag(w, "lang_mismatch", f"prompt is {langs['prompt']}, "
                                  + ", ".join(f"{k} is {langs[k]}" for k in off), i))
        # PII
        kinds: dict[str, list[str]] = defaultdict(list)
        for fld, text in (("prompt", "\n".join(m["content"] for m in r["prompt"])), *a.items()):
            _, counts = mask_pii(text, cfg.pii_types, cfg.pii_allow)
            for kd, n in counts.items():
                if n:
                    kinds[kd].append(fld)
        if kinds:
            flags.append(Flag(w, "pii", "; ".join(f"{kd} in {'/'.join(f)}" for kd, f in kinds.items()), i))
        # toxicity of the answer taught as good
        good = a.get("chosen") if kind == "pairs" else (a["completion"] if r["label"] else None)
        if good is not None:
            terms = toxic_terms(good, cfg.toxic_terms)
            detail = f"lexicon: {', '.join(terms)}" if terms else ""
            if toxicity is not None:
                s = toxicity(good)
                if s >= cfg.toxicity_threshold:
                    detail = (detail + "; " if detail else "") + f"classifier score {s:.2f}"
            if detail:
                fld = "chosen" if kind == "pairs" else "desirable completion"
                flags.append(Flag(w, "toxic", f"{fld}: {detail}", i))
        # decontamination
        if index is not None:
            for fld in cfg.contam_fields:
                text = p if fld == "prompt" else a.get("chosen", a.get("completion", ""))
                ov, hit = index.best(text, "question" if fld == "prompt" else "answer")
                if hit is not None and ov >= cfg.contam_threshold:
                    flags.append(Flag(w, "contaminated", f"{fld} overlaps eval {hit.field} "
                                      f"{hit.where} ({ov:.0%} of n-grams)", i))
    order = {c: n for n, c in enumerate(CATEGORIES)}
    flags.sort(key=lambda f: (_line_key(f.where), order[f.category]))
    return rep


def _near_dups(rows: list[dict], prompts: list[str], goods: list[str], part: list[int],
               cfg: CurationConfig) -> list[Flag]:
    """Near-duplicate flags among the rows ``part`` (MinHash LSH on prompt + good answer)."""
    groups: dict[str, list[int]] = {}   # same prompt + answer (another rejected) -> one group
    for i in part:
        groups.setdefault(_key(prompts[i], goods[i]), []).append(i)
    firsts = [g[0] for g in groups.values()]
    recs = [{"prompt": prompts[i], "chosen": goods[i]} for i in firsts]
    if len(recs) < 2:
        return []
    _, near = near_dedup(recs, cfg.near_threshold, cfg.num_perm, cfg.near_ngram, cfg.minhash_seed)
    out = []
    for a, b in near:
        i, j = firsts[a], firsts[b]
        if jaccard(prompts[i], prompts[j], cfg.near_ngram) < cfg.near_prompt_min:
            continue  # another question that has the same answer
        sim = jaccard(prompts[i] + "\n" + goods[i], prompts[j] + "\n" + goods[j], cfg.near_ngram)
        for k in groups[_key(prompts[i], goods[i])]:
            out.append(Flag(rows[k]["where"], "near_dup", f"prompt + answer near-duplicate of "
                            f"{rows[j]['where']} (Jaccard {sim:.2f})", k))
    return out


def _line_key(where: str) -> tuple:
    head, _, line = where.rpartition(":")
    return (head, int(line)) if line.isdigit() else (where, 0)


# --------------------------------------------------------------------------- curate + write

def _mask_messages(msgs: list[dict], cfg: CurationConfig) -> tuple[list[dict], int]:
    out, n = [], 0
    for m in msgs:
        text, counts = mask_pii(m["content"], cfg.pii_types, cfg.pii_allow)
        n += sum(counts.values())
        out.append({**m, "content": text})
    return out, n


def curate(rows: list[dict] | PreferenceData, cfg: CurationConfig | None = None,
           eval_texts: list[EvalText] | EvalIndex | None = None,
           problems: Iterable[Problem] = (), toxicity: ToxicityScorer | None = None,
           source: str = "") -> tuple[list[dict], CurationReport]:
    """``audit``, then drop the rows with a flag in ``cfg.drop`` (and PII rows when
    ``pii_action="drop"``) and mask PII in the kept rows (``pii_action="mask"``)."""
    cfg = cfg or CurationConfig()
    data_rows = rows.rows if isinstance(rows, PreferenceData) else rows
    rep = audit(rows, cfg, eval_texts, problems, toxicity, source)
    drop = set(cfg.drop) | ({"pii"} if cfg.pii_action == "drop" else set())
    by_index: dict[int, list[str]] = defaultdict(list)
    for f in rep.flags:
        if f.index is not None:
            by_index[f.index].append(f.category)
    for f in rep.flags:  # records the loader skipped never reach the output
        if f.index is None:
            rep.dropped_by[f.category] = rep.dropped_by.get(f.category, 0) + 1
    kept = []
    order = {c: n for n, c in enumerate(CATEGORIES)}
    for i, r in enumerate(data_rows):
        hit = sorted((c for c in by_index.get(i, ()) if c in drop), key=order.get)
        if hit:
            rep.dropped_by[hit[0]] = rep.dropped_by.get(hit[0], 0) + 1
            continue
        if cfg.pii_action == "mask" and "pii" in by_index.get(i, ()):
            r = dict(r)
            for k in ("prompt", "chosen", "rejected", "completion"):
                if k in r:
                    r[k], n = _mask_messages(r[k], cfg)
                    rep.pii_masked += n
        kept.append(r)
    rep.n_kept = len(kept)
    log.info("curated %s: %d rows -> %d kept", rep.source or "rows", rep.n_rows, rep.n_kept)
    return kept, rep


def _plain(msgs: list[dict], role: str):
    return msgs[0]["content"] if len(msgs) == 1 and msgs[0]["role"] == role else None


def plain_record(row: dict, keep_meta: bool = False) -> dict:
    """A canonical row -> ``{"prompt", "chosen", "rejected"}`` (or ``prompt/completion/label``):
    strings when every part is a single turn (prompt: one user message, no system prompt),
    message lists otherwise (TRL's conversational layout)."""
    keys = ("prompt", "completion") if "completion" in row else ("prompt", "chosen", "rejected")
    plain = {k: _plain(row[k], "user" if k == "prompt" else "assistant") for k in keys}
    out = plain if all(v is not None for v in plain.values()) else {k: row[k] for k in keys}
    if "completion" in row:
        out["label"] = bool(row["label"])
    if keep_meta:
        out.update({k: v for k, v in row.get("meta", {}).items() if k not in out})
    return out


def write_clean(path: str | Path, rows: list[dict], keep_meta: bool = False) -> Path:
    """Write curated rows as JSON Lines (atomic: temp file + rename)."""
    if not rows:
        raise DataError(f"{path}: nothing to write (every row was dropped)")
    return atomic_write_jsonl(path, [plain_record(r, keep_meta) for r in rows])


def load_for_audit(source: str | Path, kind: Literal["pairs", "unpaired"] = "pairs") -> PreferenceData:
    """``load_pairs`` / ``load_unpaired`` in skip mode: usable rows + every problem with file:line."""
    if kind not in ("pairs", "unpaired"):
        raise DataError(f"kind must be 'pairs' or 'unpaired', got {kind!r}")
    return load_pairs(source) if kind == "pairs" else load_unpaired(source)


def _line_of(where: str) -> int | None:
    _, _, line = where.rpartition(":")
    return int(line) if line.isdigit() else None


def load_planted(path: str | Path) -> list[dict]:
    """The ``planted`` list of a manifest file (``{"planted": [{"line", "expect", ...}]}``)."""
    try:
        obj = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("planted"), list):
        raise DataError(f"{path}: expected an object with a 'planted' list")
    return obj["planted"]


def score_planted(report: CurationReport, planted: list[dict], name: str = "manifest"
                  ) -> tuple[list[dict], list[Flag]]:
    """Compare an audit of one file with a manifest of problems planted on known lines.

    ``planted`` holds ``{"line": 1-based line, "expect": category, ...}`` entries. Returns one
    row per entry with ``found`` (a flag of the expected category on that line), and the flags
    on lines where nothing was planted (false alarms).
    """
    lines: dict[int, set[str]] = defaultdict(set)
    for f in report.flags:
        n = _line_of(f.where)
        if n is not None:
            lines[n].add(f.category)
    rows = []
    for k, p in enumerate(planted):
        if not isinstance(p, dict) or not isinstance(p.get("line"), int) or p.get("expect") not in CATEGORIES:
            raise DataError(f"{name}: planted entry {k} needs an integer 'line' and an 'expect' "
                            f"category (one of {', '.join(CATEGORIES)}), got {p!r}")
        rows.append({**p, "found": p["expect"] in lines.get(p["line"], set()),
                     "flags": ", ".join(sorted(lines.get(p["line"], set()))) or "-"})
    planted_lines = {p["line"] for p in planted}
    extra = [f for f in report.flags if _line_of(f.where) not in planted_lines]
    return rows, extra


def summarise_planted(rows: list[dict]) -> list[dict]:
    """``score_planted`` rows grouped by their ``problem`` label: planted, found, the expected
    categories and the lines (a missed line is marked ``(missed)``)."""
    out: dict[str, dict] = {}
    for r in rows:
        key = r.get("problem", r["expect"])
        p = out.setdefault(key, {"problem": key, "category": [], "planted": 0, "found": 0, "lines": []})
        if r["expect"] not in p["category"]:
            p["category"].append(r["expect"])
        p["planted"] += 1
        p["found"] += bool(r["found"])
        p["lines"].append(f"{r['line']}{'' if r['found'] else ' (missed)'}")
    return [{**p, "category": " / ".join(p["category"]), "lines": ", ".join(p["lines"])}
            for p in out.values()]
