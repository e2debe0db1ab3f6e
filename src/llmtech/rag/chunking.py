"""Cut documents into chunks for indexing, three ways.

- ``tokens``: windows of ``size`` tokens of the embedder's own tokenizer with ``overlap`` tokens
  shared by neighbours. Nothing the embedder sees is truncated (MiniLM reads at most 256 word
  pieces), but a window may end mid-sentence.
- ``recursive``: LangChain's RecursiveCharacterTextSplitter, trying paragraph breaks first, then
  lines, then sentence ends (Chinese and English), then spaces, to stay under ``size`` characters.
- ``sentences``: whole sentences packed greedily up to ``size`` characters. Chinese sentences end
  at 。！？；…, English ones at . ! ? followed by a space; a sentence is never cut, and
  ``overlap`` > 0 repeats the previous chunk's last sentence.

Every chunk records its document, character offsets into the document text (so a citation can
point at the exact span) and the sha256 of its text.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import StrictModel

Strategy = Literal["tokens", "recursive", "sentences"]


class ChunkConfig(StrictModel):
    strategy: Strategy = "sentences"
    size: int = 400        # characters (recursive, sentences) or tokens (tokens)
    overlap: int = 50      # characters / tokens; sentences: >0 repeats one sentence
    min_chars: int = 1     # drop chunks shorter than this (after stripping)


@dataclass
class Chunk:
    id: str                # "<doc_id>#<n>"
    doc_id: str
    text: str
    start: int             # character offsets into the document text
    end: int
    hash: str
    meta: dict[str, Any] = field(default_factory=dict)


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- spans

_SENTENCE_END = re.compile(r"[。！？；…!?]+[”’」』）)]*|\.(?=\s|$)[”’\"')]*|\n{2,}|\n(?=#)")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence, whitespace between sentences excluded."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        spans.append((start, m.end()))
        start = m.end()
    spans.append((start, len(text)))
    out = []
    for s, e in spans:
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if e > s:
            out.append((s, e))
    return out


def _pack_sentences(text: str, size: int, overlap: int) -> list[tuple[int, int]]:
    spans = sentence_spans(text)
    chunks: list[tuple[int, int]] = []
    i = 0
    while i < len(spans):
        j, start = i, spans[i][0]
        while j + 1 < len(spans) and spans[j + 1][1] - start <= size:
            j += 1
        chunks.append((start, spans[j][1]))
        # repeat the last sentence in the next chunk when asked (and when it moves us forward)
        i = j if overlap > 0 and j > i else j + 1
    return chunks


def _recursive(text: str, size: int, overlap: int) -> list[tuple[int, int]]:
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    splitter = RecursiveCharacterTextSplitter(
        chunk_size=size, chunk_overlap=min(overlap, size // 2), add_start_index=True,
        separators=["\n\n", "\n", "。", "！", "？", "；", ". ", "! ", "? ", "，", ", ", " ", ""],
        keep_separator="end")
    out = []
    for d in splitter.create_documents([text]):
        s = d.metadata["start_index"]
        if s >= 0:
            out.append((s, s + len(d.page_content)))
    return out


def _token_windows(text: str, size: int, overlap: int, tokenizer) -> list[tuple[int, int]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [o for o in enc["offset_mapping"] if o[1] > o[0]]
    if not offsets:
        return [(0, len(text))] if text.strip() else []
    step = max(1, size - overlap)
    out = []
    for i in range(0, len(offsets), step):
        window = offsets[i:i + size]
        out.append((window[0][0], window[-1][1]))
        if i + size >= len(offsets):
            break
    return out


def chunk_text(doc_id: str, text: str, cfg: ChunkConfig | None = None, tokenizer=None,
               meta: dict[str, Any] | None = None) -> list[Chunk]:
    cfg = cfg or ChunkConfig()
    if cfg.size <= 0 or cfg.overlap < 0 or cfg.overlap >= cfg.size:
        from ..errors import ConfigError

        raise ConfigError(f"chunking: need size > overlap >= 0, got size={cfg.size} "
                          f"overlap={cfg.overlap}")
    if cfg.strategy == "tokens":
        if tokenizer is None:
            raise ValueError("the 'tokens' strategy needs the embedder's tokenizer")
        spans = _token_windows(text, cfg.size, cfg.overlap, tokenizer)
    elif cfg.strategy == "recursive":
        spans = _recursive(text, cfg.size, cfg.overlap)
    else:
        spans = _pack_sentences(text, cfg.size, cfg.overlap)
    chunks = []
    for s, e in spans:
        piece = text[s:e].strip()
        if len(piece) < cfg.min_chars:
            continue
        s = text.index(piece, s)
        chunks.append(Chunk(f"{doc_id}#{len(chunks)}", doc_id, piece, s, s + len(piece),
                            text_hash(piece), dict(meta or {})))
    return chunks
