"""Rerankers: re-score a short candidate list with a model that reads query and passage together.

A first-stage retriever (BM25, dense, hybrid) scores the query and each passage *separately*, so
it is fast enough for millions of chunks but blind to how they relate. A reranker reads each
(query, passage) pair jointly and re-orders the top few dozen candidates.

- ``CrossEncoderReranker``: a sentence-transformers ``CrossEncoder`` (``ms:BAAI/bge-reranker-base``,
  ``hf:cross-encoder/ms-marco-MiniLM-L-6-v2``, a local folder) — a BERT-style model trained for
  exactly this; one relevance number per pair.
- ``LLMReranker``: a pointwise reranker built from any chat LM (default: the bundled
  SmolLM2-135M-Instruct). For each pair it asks "does this passage answer the question? yes/no"
  and scores ``log P(yes) - log P(no)`` from the next-token logits: one batched forward pass per
  batch of pairs, no sampling. ``method="query_likelihood"`` scores log P(question | passage)
  instead (UPR), which small models do much better. It needs no extra model, but costs one LM
  forward over the whole passage per pair; ``stats`` records what it cost (pairs, forward
  passes, tokens, seconds).

``make_reranker(spec)`` builds one from a short spec: ``none``, ``llm``, ``llm:<model id>``,
``llm-ql[:<model id>]``, or a cross-encoder id. Every reranker has ``rerank(query, passages, top)`` (``Passage`` objects, new
scores in ``.score``, best first) and ``rerank_hits(query, hits, texts, top)`` for BEIR-style runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Mapping, Sequence

from .. import models
from ..errors import ModelNotAvailable
from .types import Hit, Passage

log = logging.getLogger(__name__)

# Short names for well-known cross-encoders (same code path as any other model id).
CROSS_ENCODERS: dict[str, str] = {
    "bge-reranker-base": "ms:BAAI/bge-reranker-base",
    "bge-reranker-large": "ms:BAAI/bge-reranker-large",
    "bge-reranker-v2-m3": "ms:BAAI/bge-reranker-v2-m3",
    "ms-marco-minilm": "hf:cross-encoder/ms-marco-MiniLM-L-6-v2",
}


class Reranker:
    """Common interface: subclasses implement ``score(query, texts) -> list[float]``."""

    name = "reranker"

    def __init__(self) -> None:
        self.stats = {"queries": 0, "pairs": 0, "forward_passes": 0, "tokens": 0, "seconds": 0.0}

    def score(self, query: str, texts: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def rerank(self, query: str, passages: Sequence[Passage], top: int | None = None) -> list[Passage]:
        """Passages re-ordered best first, with the reranker's score in ``.score`` (the first
        stage's score is kept in ``meta["retrieval_score"]``)."""
        if not passages:
            return []
        t0 = time.perf_counter()
        scores = self.score(query, [p.text for p in passages])
        self.stats["seconds"] += time.perf_counter() - t0
        self.stats["queries"] += 1
        out = [replace(p, score=float(s), meta={**p.meta, "retrieval_score": p.score,
                                                  "retrieval_rank": i + 1})
               for i, (p, s) in enumerate(zip(passages, scores))]
        out.sort(key=lambda p: -p.score)  # stable: ties keep the first stage's order
        return out[:top] if top else out

    def rerank_hits(self, query: str, hits: Sequence[Hit], texts: Mapping[str, str],
                    top: int | None = None) -> list[Hit]:
        """BEIR-style: ids + an id→text map in, re-ordered ``Hit`` list out."""
        passages = [Passage(h.id, h.id, texts.get(h.id, ""), h.score) for h in hits]
        return [Hit(p.id, p.score) for p in self.rerank(query, passages, top)]

    def cost(self) -> dict[str, float]:
        """What reranking has cost so far, per query and per pair."""
        s = self.stats
        q, n = max(s["queries"], 1), max(s["pairs"], 1)
        return {**s, "seconds_per_query": s["seconds"] / q, "ms_per_pair": 1000 * s["seconds"] / n,
                "tokens_per_pair": s["tokens"] / n}


class CrossEncoderReranker(Reranker):
    name = "cross-encoder"

    def __init__(self, model_id: str, max_length: int = 512, batch_size: int = 16,
                 device: str = "cpu"):
        super().__init__()
        from sentence_transformers import CrossEncoder

        self.model_id = model_id
        path = models.resolve(CROSS_ENCODERS.get(model_id, model_id))
        try:
            self.model = CrossEncoder(str(path), max_length=max_length, device=device,
                                      local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any loading failure becomes one clear message
            raise ModelNotAvailable(f"cannot load cross-encoder '{model_id}' from {path}: {e}") from None
        self.batch_size = batch_size

    def score(self, query: str, texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        pairs = [(query, t) for t in texts]
        scores = self.model.predict(pairs, batch_size=self.batch_size, show_progress_bar=False)
        self.stats["pairs"] += len(pairs)
        self.stats["forward_passes"] += -(-len(pairs) // self.batch_size)
        tok = self.model.tokenizer(pairs, truncation=True, max_length=self.model.max_length)
        self.stats["tokens"] += sum(len(ids) for ids in tok["input_ids"])
        return [float(s) for s in scores]


# --------------------------------------------------------------------------- LLM reranker

LLM_SYSTEM = "You judge search results. Answer only yes or no."
LLM_PROMPT = ("Question: {query}\n\nPassage: {passage}\n\n"
              "Does the passage contain the answer to the question? Answer yes or no.")
YES_WORDS = ("yes", "Yes", " yes", " Yes")
NO_WORDS = ("no", "No", " no", " No")
# Query likelihood (UPR, Sachan et al. 2022): plain LM text, no chat template.
QL_PROMPT = "Passage: {passage}\nPlease write a question based on this passage.\nQuestion:"
METHODS = ("yes_no", "query_likelihood")


class LLMReranker(Reranker):
    """Pointwise reranker from a causal LM, one batched forward pass per ``batch_size`` pairs.

    - ``method="yes_no"`` (default): the chat model is asked whether the passage answers the
      question; score = log P("yes") - log P("no") for the first answer token (upper/lower case
      and leading-space variants pooled with logsumexp).
    - ``method="query_likelihood"``: score = mean log P(query tokens | passage, "write a question
      about this passage") — the UPR reranker. It needs no instruction following, which suits
      small models: on this project's sample KB the 135M model's yes/no judgement is close to
      noise while its query likelihood is a usable relevance signal (see L6.04).

    ``max_passage_tokens`` truncates long passages (cross-encoders truncate at 512 tokens too),
    which bounds the cost per pair. ``model``/``tokenizer`` may be given to share an already
    loaded LM with the generator.
    """

    name = "llm"

    def __init__(self, model_id: str = models.DEFAULT_LM, method: str = "yes_no",
                 batch_size: int = 8, max_passage_tokens: int = 192, model=None, tokenizer=None):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"LLMReranker method must be one of {METHODS}, got {method!r}")
        self.model_id, self.method = model_id, method
        self.name = "llm" if method == "yes_no" else "llm-ql"
        if model is None or tokenizer is None:
            model, tokenizer = models.load_lm(model_id)
        self.model, self.tok = model, tokenizer
        self.model.eval()
        self.batch_size, self.max_passage_tokens = batch_size, max_passage_tokens
        self.yes_ids = self._first_token_ids(YES_WORDS)
        self.no_ids = self._first_token_ids(NO_WORDS)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _first_token_ids(self, words: Sequence[str]) -> list[int]:
        return sorted({self._ids(w)[0] for w in words})

    def _truncate(self, text: str) -> str:
        ids = self._ids(text)
        if len(ids) <= self.max_passage_tokens:
            return text
        return self.tok.decode(ids[: self.max_passage_tokens], skip_special_tokens=True)

    def prompt(self, query: str, passage: str) -> str:
        """The exact text the model reads for one pair (for yes_no: ends at the answer slot;
        for query_likelihood: ends before the query, whose tokens are then scored)."""
        passage = self._truncate(passage)
        if self.method == "query_likelihood":
            return QL_PROMPT.format(passage=passage)
        user = LLM_PROMPT.format(query=query, passage=passage)
        return models.render_chat(self.tok, models.chat_messages(user, system=LLM_SYSTEM),
                                  add_generation_prompt=True)

    def score(self, query: str, texts: Sequence[str]) -> list[float]:
        import torch

        target = self._ids(" " + query.strip()) if self.method == "query_likelihood" else []
        encoded = [self._ids(self.prompt(query, t)) + target for t in texts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # less padding
        scores = [0.0] * len(encoded)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        keep = len(target) + 1  # logits needed: the answer slot, or every query token
        with torch.no_grad():
            for b in range(0, len(order), self.batch_size):
                idx = order[b:b + self.batch_size]
                L = max(len(encoded[i]) for i in idx)
                ids = torch.full((len(idx), L), pad, dtype=torch.long)
                att = torch.zeros((len(idx), L), dtype=torch.long)
                for j, i in enumerate(idx):  # left padding: every row ends in the last column
                    ids[j, L - len(encoded[i]):] = torch.tensor(encoded[i])
                    att[j, L - len(encoded[i]):] = 1
                pos = (att.cumsum(-1) - 1).clamp(min=0)  # positions as if unpadded
                dev = self.model.device
                logits = self.model(input_ids=ids.to(dev), attention_mask=att.to(dev),
                                    position_ids=pos.to(dev), logits_to_keep=keep).logits
                logp = torch.log_softmax(logits.float(), -1)
                if self.method == "query_likelihood":
                    tgt = torch.tensor(target, device=logp.device)
                    got = logp[:, :-1].gather(-1, tgt.expand(len(idx), -1).unsqueeze(-1))
                    batch_scores = got.squeeze(-1).mean(-1)
                else:
                    nxt = logp[:, -1]
                    batch_scores = (torch.logsumexp(nxt[:, self.yes_ids], -1)
                                    - torch.logsumexp(nxt[:, self.no_ids], -1))
                for j, i in enumerate(idx):
                    scores[i] = float(batch_scores[j])
                self.stats["forward_passes"] += 1
                self.stats["tokens"] += int(att.sum())
        self.stats["pairs"] += len(texts)
        return scores


# --------------------------------------------------------------------------- factory

def make_reranker(spec: str | None, default_lm: str = models.DEFAULT_LM,
                  loaded: Mapping[str, tuple] | None = None, **kwargs) -> Reranker | None:
    """``None``/``"none"`` → no reranking; ``"llm"`` / ``"llm:<model id>"`` → ``LLMReranker``
    (yes/no), ``"llm-ql"`` / ``"llm-ql:<model id>"`` → ``LLMReranker`` (query likelihood);
    anything else → ``CrossEncoderReranker(spec)`` (a short name from ``CROSS_ENCODERS``,
    ``hf:…``, ``ms:…`` or a local folder).

    ``"llm"`` without a model id uses ``default_lm`` (the chat model the pipeline already runs);
    ``loaded`` maps model ids to already loaded ``(model, tokenizer)`` pairs to share.
    """
    if spec is None or spec.strip().lower() in ("", "none", "off", "false"):
        return None
    spec = spec.strip()
    kind, _, model_id = spec.partition(":")
    if kind in ("llm", "llm-ql"):
        method = "yes_no" if kind == "llm" else "query_likelihood"
        model_id = model_id.strip() or default_lm
        model, tok = (loaded or {}).get(model_id, (None, None))
        return LLMReranker(model_id, method=method, model=model, tokenizer=tok, **kwargs)
    try:
        return CrossEncoderReranker(spec, **kwargs)
    except ModelNotAvailable as e:
        raise ModelNotAvailable(
            f"reranker '{spec}' is not available: {e}\nWithout a downloaded cross-encoder, use "
            "the bundled chat model as a reranker (`--rerank llm`, or rerank=llm in a lab), or "
            "turn reranking off (`--rerank none`).") from None
