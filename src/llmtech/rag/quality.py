"""Chunk data-quality monitor: find the chunks a knowledge base should not index, and say why.

``check_chunks(chunks, cfg)`` looks at every chunk once and returns a ``QualityReport`` with the
number of chunks per issue, examples with chunk ids, and the language mix. ``filter_chunks``
also drops the chunks whose issues are listed in ``cfg.skip`` (what an indexer calls).

Issues (a chunk can have several):

- ``empty``: no letter or digit at all (whitespace, a Markdown rule ``---``, a lone ``#``).
- ``too_short`` / ``too_long``: fewer than ``min_chars`` / more than ``max_chars`` characters
  (after stripping). Short chunks carry little to match; long ones are cut by the embedder.
- ``exact_dup``: the same canonical text (NFKC, case-folded, whitespace and punctuation removed,
  ``llmtech.data.dedup.canonical_text``) as an earlier chunk.
- ``near_dup``: character 3-gram Jaccard >= ``near_threshold`` with an earlier chunk (MinHash
  LSH candidates confirmed exactly, ``llmtech.data.dedup.near_dedup``).
- ``mojibake``: text decoded with the wrong encoding. Detected patterns:
  U+FFFD replacement characters; ``锟斤拷`` (UTF-8 bytes of U+FFFD read as GBK) and ``烫烫烫`` /
  ``屯屯屯`` (uninitialised memory printed as GBK); UTF-8 read as Latin-1/cp1252 (``cafÃ©``,
  ``ä½ å¥½``): a run of Latin-1-range characters whose bytes are valid UTF-8; GBK read as
  Latin-1 (``ÔÆÉ¼``): such a run whose bytes are valid GBK Chinese; UTF-8 read as GBK
  (``浣犲ソ``): a run of Chinese characters whose GBK bytes are valid UTF-8; and, when a cleaner
  (NFKC, dropped C1 controls) already broke the byte round trip, a chunk that is 30 %+ Latin-1
  symbols and combining marks. Each finding shows the repaired text where one exists, so a
  human can confirm it at a glance.
- ``control_chars``: control (except tab/newline), private-use, surrogate or unassigned code
  points above ``control_max_ratio`` of the characters (binary junk, broken PDF fonts).
- ``mixed_lang``: two scripts (Chinese characters vs Latin words) each make up at least
  ``mixed_min_share`` of a chunk's language units — often two documents glued together, or a
  bilingual page that would serve both languages badly.
- ``unexpected_lang``: the chunk's language (``detect_lang``) is not in ``expected_langs``
  (only checked when that list is given).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

from pydantic import Field

from ..config import StrictModel
from ..data.clean import HAN, detect_lang, script_counts
from ..data.dedup import canonical_text, near_dedup

log = logging.getLogger(__name__)

Issue = Literal["empty", "too_short", "too_long", "exact_dup", "near_dup", "mojibake",
                "control_chars", "mixed_lang", "unexpected_lang"]
ISSUES: tuple[str, ...] = Issue.__args__  # type: ignore[attr-defined]


class QualityConfig(StrictModel):
    min_chars: int = Field(20, ge=0)          # shorter chunks are flagged too_short
    max_chars: int = Field(2000, ge=1)        # longer chunks are flagged too_long
    exact_dup: bool = True
    near_dup: bool = True
    near_threshold: float = Field(0.85, gt=0, le=1)  # Jaccard of character 3-gram sets
    mojibake_min_chars: int = Field(2, ge=1)  # garbled characters needed to flag a chunk
    control_max_ratio: float = Field(0.01, ge=0, le=1)
    mixed_min_share: float = Field(0.3, gt=0, le=0.5)
    mixed_min_units: int = Field(20, ge=1)    # shorter chunks are not judged for mixing
    expected_langs: list[str] = []            # e.g. ["zh", "en"]; empty = any language
    # issues that make ``filter_chunks`` drop a chunk; the others are warnings
    skip: list[Issue] = ["empty", "exact_dup", "near_dup", "mojibake", "control_chars"]


@dataclass
class Finding:
    chunk_id: str
    doc_id: str
    issue: str
    detail: str
    snippet: str


@dataclass
class QualityReport:
    n_chunks: int
    findings: list[Finding]
    lang_counts: dict[str, int]
    skip: tuple[str, ...]
    by_chunk: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self):
        for f in self.findings:
            self.by_chunk.setdefault(f.chunk_id, []).append(f.issue)

    @property
    def counts(self) -> dict[str, int]:
        """Chunks per issue (every issue present, 0 when none)."""
        c = Counter(f.issue for f in self.findings)
        return {i: c.get(i, 0) for i in ISSUES}

    def bad_ids(self) -> set[str]:
        """Chunks with at least one issue in ``skip``: the ones an indexer leaves out."""
        return {cid for cid, issues in self.by_chunk.items() if set(issues) & set(self.skip)}

    @property
    def n_flagged(self) -> int:
        return len(self.by_chunk)

    def examples(self, issue: str, n: int = 3) -> list[Finding]:
        return [f for f in self.findings if f.issue == issue][:n]

    def rows(self, n_examples: int = 1) -> list[dict[str, Any]]:
        """One table row per issue found: count, share, skipped or warned, an example."""
        rows = []
        for issue, count in self.counts.items():
            if not count:
                continue
            ex = self.examples(issue, n_examples)
            rows.append({"issue": issue, "chunks": count, "share": count / max(1, self.n_chunks),
                         "action": "skip" if issue in self.skip else "warn",
                         "example": "; ".join(f"{f.chunk_id}: {f.detail}" for f in ex)})
        return rows

    def summary(self) -> dict[str, Any]:
        """Flat numbers (for metrics.json or an index report)."""
        out: dict[str, Any] = {"chunks": self.n_chunks, "flagged": self.n_flagged,
                               "skipped": len(self.bad_ids())}
        out.update(self.counts)
        out.update({f"lang_{k}": v for k, v in sorted(self.lang_counts.items())})
        return out


# --------------------------------------------------------------------------- mojibake

# cp1252 puts printable characters where Latin-1 has C1 controls (0x80-0x9f): mojibake made by
# Windows software contains them ("â€™" is the UTF-8 of "’" read as cp1252).
_CP1252_EXTRA = "ŒœŠšŸŽžƒˆ˜–—‘’‚“”„†‡•…‰‹›€™"
_LATIN1_RUN = re.compile(f"[\u0080-\u00ff{_CP1252_EXTRA}]{{2,}}")
_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f\ufffd\s]{2,}")
_HAN_CHAR = re.compile(f"[{HAN}]")
# "锟斤拷": the UTF-8 bytes of U+FFFD (EF BF BD) read as GBK; "烫"/"屯": MSVC's fill bytes
# for uninitialised stack (0xCC) and heap (0xCD) memory printed as GBK.
_MARKERS = ("锟斤拷", "烫烫烫", "屯屯屯")
_SOUP = re.compile(f"[\u0080-\u00bf\u00c0-\u00ff\u0300-\u036f\u2044{_CP1252_EXTRA}]")
_SURE = ("marker", "replacement_char")  # one occurrence is enough to flag a chunk
_SHOW = 24  # characters of a garbled run shown in a finding


def _latin1_bytes(run: str) -> bytes | None:
    out = bytearray()
    for ch in run:
        try:
            out += ch.encode("cp1252")
        except UnicodeEncodeError:
            if ord(ch) > 0xFF:
                return None
            out.append(ord(ch))  # C1 control: Latin-1 maps it to the same byte
    return bytes(out)


def _mostly_decoded(decoded: str, max_bad: float) -> bool:
    bad = decoded.count("\ufffd")
    return bool(decoded) and bad <= max_bad * len(decoded)


def mojibake_spans(text: str) -> list[tuple[str, str, str]]:
    """``(kind, garbled, repaired)`` for each garbled run found in ``text``."""
    found: list[tuple[str, str, str]] = []
    for marker in _MARKERS:
        if marker in text:
            found.append(("marker", marker * text.count(marker), "(lost bytes)"))
    n_fffd = text.count("\ufffd")
    if n_fffd:
        found.append(("replacement_char", "\ufffd" * n_fffd, "(lost bytes)"))
    for m in _LATIN1_RUN.finditer(text):
        run = m.group()
        raw = _latin1_bytes(run)
        if raw is None:
            continue
        as_utf8 = raw.decode("utf-8", errors="replace")
        # bytes that decode to real non-ASCII characters; GBK text almost never does this, while
        # UTF-8 text still does after a cleaner removed a few bytes (C1 controls, NBSP)
        explained = sum(len(c.encode("utf-8")) for c in as_utf8 if ord(c) > 0x7F and c != "\ufffd")
        if explained >= 0.67 * len(raw):
            found.append(("utf8_as_latin1", run, as_utf8))
            continue
        as_gbk = raw.decode("gbk", errors="replace")
        if len(_HAN_CHAR.findall(as_gbk)) >= 2 and _mostly_decoded(as_gbk, 0.2):
            found.append(("gbk_as_latin1", run, as_gbk))
    for m in _NON_ASCII_RUN.finditer(text):
        run = m.group()
        if len(_HAN_CHAR.findall(run)) < 2 or any(mk in run for mk in _MARKERS):
            continue
        try:
            raw = run.encode("gbk")
        except UnicodeEncodeError:
            continue  # characters outside GBK were never produced by a GBK decoder
        as_utf8 = raw.decode("utf-8", errors="replace")
        # genuine Chinese in GBK is almost never valid UTF-8; allow a broken pair at the edges
        if len(_HAN_CHAR.findall(as_utf8)) >= 2 and _mostly_decoded(as_utf8, 0.25):
            found.append(("utf8_as_gbk", run, as_utf8))
    if not any(k in ("utf8_as_latin1", "gbk_as_latin1") for k, _, _ in found):
        # Latin-1 "soup" that no longer round-trips (NFKC turned "¾" into "3⁄4", a cleaner
        # dropped C1 controls): too many Latin-1 symbols and combining marks for a real language
        soup = _SOUP.findall(text)
        visible = sum(not c.isspace() for c in text)
        if len(soup) >= 4 and len(soup) >= 0.3 * visible:
            found.append(("latin1_soup", "".join(soup), "(not recoverable)"))
    return found


def _bad_codepoint(ch: str) -> bool:
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch) in ("Cc", "Co", "Cs", "Cn")


# --------------------------------------------------------------------------- checking

def _fields(chunk: Any) -> tuple[str, str, str]:
    """(id, doc_id, text) of a Chunk, a Passage, a dict or an (id, text) pair."""
    if isinstance(chunk, dict):
        return str(chunk["id"]), str(chunk.get("doc_id", "")), chunk["text"]
    if isinstance(chunk, (tuple, list)):
        return str(chunk[0]), "", chunk[1]
    return chunk.id, getattr(chunk, "doc_id", ""), chunk.text


def _snippet(text: str, n: int = 60) -> str:
    t = " ".join(text.split())
    return t if len(t) <= n else t[:n] + "…"


def check_chunks(chunks: Iterable[Any], cfg: QualityConfig | None = None) -> QualityReport:
    """Check every chunk (``Chunk``, ``Passage``, ``{"id", "text"}`` dict or ``(id, text)``)."""
    cfg = cfg or QualityConfig()
    items = [_fields(c) for c in chunks]
    findings: list[Finding] = []
    langs: Counter[str] = Counter()

    def flag(i: int, issue: str, detail: str) -> None:
        cid, doc, text = items[i]
        findings.append(Finding(cid, doc, issue, detail, _snippet(text)))

    dedup_candidates: list[int] = []
    seen: dict[str, int] = {}
    for i, (cid, doc, text) in enumerate(items):
        body = text.strip()
        if not any(ch.isalnum() for ch in body):
            flag(i, "empty", f"{len(body)} chars, no letter or digit")
            langs["unknown"] += 1
            continue
        if len(body) < cfg.min_chars:
            flag(i, "too_short", f"{len(body)} chars < {cfg.min_chars}")
        elif len(body) > cfg.max_chars:
            flag(i, "too_long", f"{len(body)} chars > {cfg.max_chars}")
        spans = mojibake_spans(body)
        garbled = sum(len(g) for _, g, _ in spans)
        if garbled >= cfg.mojibake_min_chars or any(k in _SURE for k, _, _ in spans):
            # show a repairable run first: it tells a reader which wrong decoding happened
            kind, g, fixed = min(spans, key=lambda s: s[2].startswith("("))
            flag(i, "mojibake", f"{kind}: {g[:_SHOW]!r} -> {fixed[:_SHOW]!r} "
                                f"({garbled} garbled chars)")
        bad = sum(_bad_codepoint(ch) for ch in body)
        if bad and bad / len(body) > cfg.control_max_ratio:
            flag(i, "control_chars", f"{bad} control/private-use chars ({bad / len(body):.1%})")
        lang = detect_lang(body)
        langs[lang] += 1
        c = script_counts(body)
        units = c["han"] + c["latin"]
        if units >= cfg.mixed_min_units and min(c["han"], c["latin"]) / units >= cfg.mixed_min_share:
            flag(i, "mixed_lang", f"Chinese chars {c['han']}, Latin words {c['latin']}")
        if cfg.expected_langs and lang not in cfg.expected_langs and lang != "unknown":
            flag(i, "unexpected_lang", f"language '{lang}' not in {cfg.expected_langs}")
        if cfg.exact_dup:
            key = canonical_text(body)
            if key in seen:
                flag(i, "exact_dup", f"same text as {items[seen[key]][0]}")
                continue
            seen[key] = i
        dedup_candidates.append(i)

    if cfg.near_dup and len(dedup_candidates) > 1:
        # near_dedup works on instruction records: wrap each chunk's text as one
        records = [{"output": items[i][2]} for i in dedup_candidates]
        _, pairs = near_dedup(records, threshold=cfg.near_threshold)
        for a, b in pairs:
            flag(dedup_candidates[a], "near_dup",
                 f"Jaccard >= {cfg.near_threshold} with {items[dedup_candidates[b]][0]}")

    order = {cid: n for n, (cid, _, _) in enumerate(items)}
    findings.sort(key=lambda f: (order[f.chunk_id], ISSUES.index(f.issue)))
    report = QualityReport(len(items), findings, dict(langs), tuple(cfg.skip))
    if report.findings:
        log.info("chunk quality: %d of %d chunks flagged (%s); %d to skip", report.n_flagged,
                 report.n_chunks, ", ".join(f"{k} {v}" for k, v in report.counts.items() if v),
                 len(report.bad_ids()))
    return report


def filter_chunks(chunks: Sequence[Any], cfg: QualityConfig | None = None
                  ) -> tuple[list[Any], QualityReport]:
    """Chunks without a skip-worthy issue, in order, and the report explaining the rest."""
    report = check_chunks(chunks, cfg)
    bad = report.bad_ids()
    return [c for c in chunks if _fields(c)[0] not in bad], report
