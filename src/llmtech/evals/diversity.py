"""Answer diversity: lexical and semantic diversity metrics, decoding sweeps, the
quality–diversity trade-off and a stated rule for picking decoding settings.

Metrics (all on word tokens from ``textgen.bleu_tokens``: jieba words for Chinese, lower-cased
words and punctuation for other text):

- ``distinct_n``: unique n-grams / all n-grams of a set of texts (Li et al. 2016).
- ``self_bleu``: mean BLEU of each text against the other texts of the same set (Zhu et al.
  2018); 1 = every sample is the same, lower = more diverse.
- ``ngram_entropy``: Shannon entropy (bits) of the pooled n-gram frequency distribution.
- ``embedding_dispersion``: mean pairwise cosine distance of the sentence embeddings of the
  samples of one prompt (semantic diversity, blind to paraphrase).
- ``seq_repetition``: within one text, the share of n-grams that repeat an earlier one
  (Welleck et al. 2019, seq-rep-n): the degeneration check.

``sample_responses`` draws N samples per prompt with ``generate(do_sample=True,
num_return_sequences=N)`` under one seeded ``DecodingSetting``; ``score_setting`` turns them into
one row of metrics; ``pareto_front`` and ``recommend`` pick settings from the rows.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Callable, Iterable, Sequence

import numpy as np

from ..config import StrictModel
from ..errors import ConfigError
from . import textgen

log = logging.getLogger(__name__)

SWEEP_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")
QUALITY_KEYS = ("embed_sim", "rouge_l")
DIVERSITY_KEYS = ("distinct2_prompt", "distinct2_corpus", "one_minus_self_bleu", "dispersion",
                  "entropy2")


# --------------------------------------------------------------------------- n-gram metrics

def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """All contiguous n-grams of a token list (none when it is shorter than n)."""
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def _tok(texts: Iterable[str], tokenize: str) -> list[list[str]]:
    return [textgen.bleu_tokens(t, tokenize) for t in texts]


def distinct_n(texts: Sequence[str], n: int = 1, tokenize: str = "jieba") -> float:
    """distinct-n = (number of different n-grams) / (number of n-grams), counted over all
    ``texts`` together. 1.0 = no n-gram occurs twice; 0.0 when there are no n-grams at all."""
    grams = [g for toks in _tok(texts, tokenize) for g in ngrams(toks, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def mean_distinct_n(groups: Sequence[Sequence[str]], n: int = 1, tokenize: str = "jieba") -> float:
    """Mean over prompts of distinct-n of that prompt's samples (how different the answers a
    user sees when regenerating the same question are)."""
    return textgen.mean(distinct_n(g, n, tokenize) for g in groups)


def ngram_entropy(texts: Sequence[str], n: int = 1, tokenize: str = "jieba") -> float:
    """H = -sum_g p(g) log2 p(g), with p(g) the frequency of n-gram g among all n-grams of
    ``texts``. A uniform distribution over k n-grams gives log2(k); one repeated n-gram gives 0."""
    counts = Counter(g for toks in _tok(texts, tokenize) for g in ngrams(toks, n))
    total = sum(counts.values())
    if not total:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def self_bleu(texts: Sequence[str], tokenize: str = "jieba", max_n: int = 4) -> float:
    """Self-BLEU: for each text, sentence BLEU (``textgen.corpus_bleu`` on one hypothesis, add-one
    smoothing for n >= 2) with all OTHER texts as references; the mean over texts. Identical
    texts score 1.0 (empty ones too); an empty text among non-empty ones scores 0 (brevity
    penalty). Needs at least two texts."""
    if len(texts) < 2:
        raise ValueError("self-BLEU needs at least two texts")
    toks = _tok(texts, tokenize)
    scores = []
    for i, hyp in enumerate(toks):
        refs = toks[:i] + toks[i + 1:]
        if not hyp:  # an empty text copies an empty reference exactly, and nothing else
            scores.append(float(any(not r for r in refs)))
            continue
        scores.append(textgen.corpus_bleu([hyp], [refs], max_n=max_n, smooth=True)["bleu"])
    return textgen.mean(scores)


def seq_repetition(text: str, n: int = 3, tokenize: str = "jieba") -> float:
    """seq-rep-n of one text: 1 - (different n-grams / n-grams). 0 = no n-gram repeats; close
    to 1 = the text loops. Texts shorter than n score 0."""
    grams = ngrams(textgen.bleu_tokens(text, tokenize), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


# --------------------------------------------------------------------------- embeddings

def embedding_dispersion(vectors: np.ndarray) -> float:
    """Mean over all pairs i < j of the cosine distance 1 - cos(v_i, v_j) of the samples of one
    prompt. 0 = all samples mean the same thing (to the embedder); vectors need not be normalised."""
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2 or len(v) < 2:
        raise ValueError("embedding dispersion needs a (n >= 2, dim) array")
    v = v / np.clip(np.linalg.norm(v, axis=1, keepdims=True), 1e-12, None)
    sim = v @ v.T
    iu = np.triu_indices(len(v), k=1)
    return float(np.mean(np.clip(1.0 - sim[iu], 0.0, 2.0)))  # clip float noise of identical texts


# --------------------------------------------------------------------------- decoding settings

class DecodingSetting(StrictModel):
    """One decoding configuration. ``do_sample=False`` is greedy (the other fields unused);
    ``top_k=0`` and ``top_p=1`` switch those filters off."""

    name: str
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def generate_kwargs(self) -> dict:
        if not self.do_sample:
            return {"do_sample": False, "repetition_penalty": self.repetition_penalty}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "repetition_penalty": self.repetition_penalty}


def check_value(key: str, value, where: str = "sweep") -> float | int:
    """Validate one decoding value; a ConfigError names ``where.key`` and the value."""
    if key not in SWEEP_KEYS:
        raise ConfigError(f"{where}: unknown sweep key '{key}' (value {value!r}); "
                          f"known keys: {', '.join(SWEEP_KEYS)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}.{key}: value {value!r} is not a finite number")
    ok = {"temperature": (value > 0, "must be > 0"),
          "top_p": (0 < value <= 1, "must be in (0, 1]"),
          "top_k": (value >= 0 and float(value).is_integer(), "must be an integer >= 0 (0 = off)"),
          "repetition_penalty": (value > 0, "must be > 0 (1 = off)")}[key]
    if not ok[0]:
        raise ConfigError(f"{where}.{key}: value {value!r} {ok[1]}")
    return int(value) if key == "top_k" else float(value)


def check_sweep(sweep: dict, where: str = "sweep") -> dict[str, list]:
    """Validate ``{key: [values]}``: keys from SWEEP_KEYS, values in range (see check_value)."""
    if not isinstance(sweep, dict):
        raise ConfigError(f"{where}: expected a mapping of {{key: [values]}}, got {sweep!r}")
    out = {}
    for key, values in sweep.items():
        values = values if isinstance(values, (list, tuple)) else [values]
        out[key] = [check_value(key, v, where) for v in values]
    return out


def setting_name(key: str, value) -> str:
    short = {"temperature": "T", "top_p": "p", "top_k": "k", "repetition_penalty": "rp"}[key]
    return f"{short}{value:g}"


def expand_sweep(sweep: dict, base: dict | None = None, greedy: bool = True) -> list[DecodingSetting]:
    """One-factor-at-a-time sweep: each value of each key varied from ``base`` (default pure
    sampling: temperature 1, top_p 1, top_k 0, repetition_penalty 1), plus the base itself and
    (``greedy``) greedy decoding as the zero-diversity reference. Duplicates are dropped."""
    base = check_sweep(dict(base or {}), "base")
    base = {k: v[0] for k, v in base.items()}
    settings = [DecodingSetting(name="greedy", do_sample=False)] if greedy else []
    b = DecodingSetting(name="base", **base)
    seen = {(b.temperature, b.top_p, b.top_k, b.repetition_penalty)}
    settings.append(b.model_copy(update={"name": "base"}))
    for key, values in check_sweep(sweep).items():
        for v in values:
            s = b.model_copy(update={key: v, "name": setting_name(key, v)})
            sig = (s.temperature, s.top_p, s.top_k, s.repetition_penalty)
            if sig not in seen:
                seen.add(sig)
                settings.append(s)
    return settings


# --------------------------------------------------------------------------- sampling

def sample_responses(model, tokenizer, conversations: list[list[dict]], setting: DecodingSetting,
                     n: int = 4, max_new_tokens: int = 32, seed: int = 0,
                     batch_prompts: int = 4) -> list[list[str]]:
    """N replies per conversation under ``setting``: ``batch_prompts`` left-padded prompts per
    ``generate`` call, each with ``num_return_sequences=n``. The torch RNG is seeded with
    ``seed`` first, so a setting's samples do not depend on which settings ran before it.
    Greedy decoding returns the one greedy reply n times."""
    import torch

    from .lm import generate

    torch.manual_seed(seed)
    reps = n if setting.do_sample else 1
    replies = generate(model, tokenizer, conversations, max_new_tokens, batch_prompts,
                       num_return_sequences=reps, **setting.generate_kwargs())
    groups = [replies[j * reps:(j + 1) * reps] for j in range(len(conversations))]
    return [g * n if reps == 1 else g for g in groups]


# --------------------------------------------------------------------------- scoring

def score_setting(samples: list[list[str]], references: list[str],
                  embed: Callable[[list[str]], np.ndarray] | None = None,
                  tokenize: str = "jieba", rep_n: int = 3, degenerate_rep: float = 0.5) -> dict:
    """Diversity and per-sample quality of one setting's samples (``samples[i]`` = the N replies
    to prompt i, ``references[i]`` its reference answer).

    Diversity: ``distinct{1,2}_corpus`` (all samples pooled), ``distinct{1,2}_prompt`` (mean per
    prompt), ``self_bleu`` (mean per prompt) and ``one_minus_self_bleu``, ``entropy{1,2}`` (pooled,
    bits), ``dispersion`` (mean per-prompt embedding dispersion; needs ``embed``).
    Quality, averaged over every sample: ``rouge_l`` against the reference and ``embed_sim`` =
    cosine(sample, reference) (needs ``embed``: texts -> L2-normalised vectors).
    Degeneration: ``rep3`` = mean seq-rep-n, ``degenerate_rate`` = share of samples that are empty
    or have seq-rep-n >= ``degenerate_rep``; ``mean_words`` = mean tokens per sample.
    """
    if len(samples) != len(references):
        raise ValueError(f"{len(samples)} sample groups but {len(references)} references")
    flat = [s for g in samples for s in g]
    reps = [seq_repetition(s, rep_n, tokenize) for s in flat]
    row = {
        "distinct1_corpus": distinct_n(flat, 1, tokenize),
        "distinct2_corpus": distinct_n(flat, 2, tokenize),
        "distinct1_prompt": mean_distinct_n(samples, 1, tokenize),
        "distinct2_prompt": mean_distinct_n(samples, 2, tokenize),
        "self_bleu": textgen.mean(self_bleu(g, tokenize) for g in samples),
        "entropy1": ngram_entropy(flat, 1, tokenize),
        "entropy2": ngram_entropy(flat, 2, tokenize),
        "rouge_l": textgen.mean(textgen.rouge_l(s, ref) for g, ref in zip(samples, references) for s in g),
        f"rep{rep_n}": textgen.mean(reps),
        "degenerate_rate": textgen.mean(float(not s.strip() or r >= degenerate_rep)
                                        for s, r in zip(flat, reps)),
        "mean_words": textgen.mean(len(textgen.bleu_tokens(s, tokenize)) for s in flat),
    }
    row["one_minus_self_bleu"] = 1.0 - row["self_bleu"]
    if embed is not None:
        vec = np.asarray(embed(flat), dtype=np.float64)
        ref = np.asarray(embed(list(references)), dtype=np.float64)
        k = 0
        sims, disp = [], []
        for i, g in enumerate(samples):
            v = vec[k:k + len(g)]
            k += len(g)
            sims += list(v @ ref[i])
            disp.append(embedding_dispersion(v))
        row["embed_sim"] = float(np.mean(sims))
        row["dispersion"] = textgen.mean(disp)
    return {k: round(float(v), 4) for k, v in row.items()}


# --------------------------------------------------------------------------- choosing

def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (x, y) that no other point dominates when both are maximised
    (another point is >= on both and > on one), sorted by x."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(x2 >= x and y2 >= y and (x2 > x or y2 > y)
                        for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def recommend(rows: Sequence[dict], quality: str = "embed_sim", diversity: str = "distinct2_prompt",
              tolerance: float = 0.05, max_degenerate: float = 0.1) -> dict:
    """The stated rule: among sampled settings (``do_sample``) with
    ``quality >= best_quality - tolerance`` (best over all rows, greedy included) and
    ``degenerate_rate <= max_degenerate``, take the one with the highest ``diversity`` (ties:
    higher quality). If none qualifies, the sampled setting with the highest quality. Returns
    ``{"name", "row", "rule", "eligible", "best_quality", "best_quality_setting"}``."""
    if quality not in QUALITY_KEYS:
        raise ConfigError(f"quality metric '{quality}' unknown; use one of {', '.join(QUALITY_KEYS)}")
    if diversity not in DIVERSITY_KEYS:
        raise ConfigError(f"diversity metric '{diversity}' unknown; use one of {', '.join(DIVERSITY_KEYS)}")
    if not rows or any(quality not in r for r in rows):
        raise ValueError(f"every row needs the quality metric '{quality}'")
    best = max(rows, key=lambda r: r[quality])
    floor = best[quality] - tolerance
    sampled = [r for r in rows if r.get("do_sample", True)]
    if not sampled:
        raise ValueError("no sampled settings to choose from")
    ok = [r for r in sampled if r[quality] >= floor and r["degenerate_rate"] <= max_degenerate]
    chosen = (max(ok, key=lambda r: (r[diversity], r[quality])) if ok
              else max(sampled, key=lambda r: r[quality]))
    rule = (f"在 {quality} ≥ 最佳值 {best[quality]:.3f} − {tolerance:g} 且退化率 ≤ {max_degenerate:g} "
            f"的采样设置中，取 {diversity} 最高者")
    return {"name": chosen["name"], "row": chosen, "rule": rule, "eligible": [r["name"] for r in ok],
            "best_quality": best[quality], "best_quality_setting": best["name"]}


def tradeoff_figure(rows: Sequence[dict], quality: str, diversity: str, front: Sequence[int],
                    chosen: str, floor: float | None = None):
    """Scatter of quality vs diversity, one point per setting, Pareto front joined, the chosen
    setting starred; right panel: the temperature axis of the sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    xs = [r[diversity] for r in rows]
    ys = [r[quality] for r in rows]
    ax.scatter(xs, ys, c=["tab:red" if r["degenerate_rate"] > 0.1 else "tab:blue" for r in rows], zorder=3)
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="tab:green",
            label="Pareto front", zorder=2)
    c = next(r for r in rows if r["name"] == chosen)
    ax.scatter([c[diversity]], [c[quality]], marker="*", s=300, color="gold", edgecolor="k",
               label=f"recommended: {chosen}", zorder=4)
    if floor is not None:
        ax.axhline(floor, color="grey", lw=0.8, ls=":", label="quality floor")
    ax.set_xlabel(f"diversity ({diversity})")
    ax.set_ylabel(f"quality ({quality})")
    ax.set_title("quality vs diversity (red = degenerate > 10%)")
    ax.legend(fontsize=8)
    temp = sorted([r for r in rows if r["name"] == "base" or r["name"].startswith("T")],
                  key=lambda r: r["temperature"])
    if temp:
        t = [r["temperature"] for r in temp]
        for key in (quality, diversity, "self_bleu", "degenerate_rate"):
            ax2.plot(t, [r[key] for r in temp], marker="o", label=key)
        ax2.set_xlabel("temperature (top_p=1, top_k=off)")
        ax2.set_title("temperature sweep")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig
