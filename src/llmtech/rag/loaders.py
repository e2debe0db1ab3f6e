"""Files → documents for the knowledge base.

Text formats (txt, md, html, pdf, docx; UTF-8 or GBK/GB18030 detected) go through
``llmtech.data.docs.load_document``; tables and records (csv, json, jsonl) become one paragraph
per record, ``field: value`` per line, so a row of an FAQ sheet stays together in one chunk.

``scan`` never stops at a bad file: unsupported, oversized, empty or corrupt files are returned
with the reason, for the index report, while every good file is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.docs import SUPPORTED as TEXT_TYPES
from ..data.docs import Document, load_document
from ..errors import LlmtechError

RECORD_TYPES = (".csv", ".json", ".jsonl")
SUPPORTED = TEXT_TYPES + RECORD_TYPES
MAX_BYTES = 50 * 1024 * 1024


@dataclass
class Skipped:
    source: str
    reason: str


def _records_document(path: Path, source: str) -> Document:
    from ..data.formats import read_records

    paragraphs = []
    for _, rec in read_records(path):
        lines = [f"{k}: {v}" for k, v in rec.items() if v not in (None, "", [], {})]
        if lines:
            paragraphs.append("\n".join(lines))
    return Document(source, path.stem, "\n\n".join(paragraphs), path.suffix[1:].lower())


def load_file(path: str | Path, root: str | Path | None = None) -> Document:
    """One file as a Document whose ``source`` is its path relative to ``root``."""
    path = Path(path)
    source = path.name if root is None else path.resolve().relative_to(Path(root).resolve()).as_posix()
    if path.suffix.lower() in RECORD_TYPES:
        return _records_document(path, source)
    doc = load_document(path, relative_to=root)
    doc.source = source
    return doc


def scan(folder: str | Path, max_bytes: int = MAX_BYTES) -> tuple[list[Document], list[Skipped]]:
    """Load every file under ``folder`` (recursively, sorted), skipping bad ones with a reason."""
    folder = Path(folder)
    if not folder.is_dir():
        from ..errors import DataError

        raise DataError(f"{folder}: documents folder not found")
    docs: list[Document] = []
    skipped: list[Skipped] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.suffix.lower() not in SUPPORTED:
            skipped.append(Skipped(rel, f"unsupported type '{path.suffix or '(none)'}'"))
            continue
        try:
            size = path.stat().st_size
        except OSError as e:  # removed (or made unreadable) between listing and reading
            skipped.append(Skipped(rel, f"vanished or unreadable: {e.strerror or e}"))
            continue
        if size > max_bytes:
            skipped.append(Skipped(rel, f"file too large ({size} bytes > {max_bytes})"))
            continue
        try:
            doc = load_file(path, folder)
        except LlmtechError as e:
            skipped.append(Skipped(rel, str(e).replace(str(path), rel)))
            continue
        except Exception as e:  # noqa: BLE001 - a corrupt pdf/docx raises library-specific errors
            skipped.append(Skipped(rel, f"cannot read: {type(e).__name__}: {e}"))
            continue
        if not doc.text.strip():
            skipped.append(Skipped(rel, "empty document (no text)"))
            continue
        docs.append(doc)
    return docs, skipped
