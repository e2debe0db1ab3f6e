"""Small records shared by the RAG stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .stores.base import Hit

__all__ = ["Hit", "Passage"]


@dataclass
class Passage:
    """A retrieved chunk with everything a reranker, a prompt or a citation needs."""

    id: str                 # chunk id, "<doc_id>#<n>"
    doc_id: str             # the document (file name relative to the knowledge-base root)
    text: str
    score: float = 0.0
    title: str = ""
    start: int = 0          # character offsets of the chunk in its document
    end: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
