"""Settings of the knowledge-base service (``llmtech serve --config configs/serve.yaml``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..config import StrictModel
from ..models import DEFAULT_EMBEDDER, DEFAULT_LM
from ..rag.kb import KBConfig


class Backend(StrictModel):
    """Where generation (or embedding) runs: in this process, or any OpenAI-compatible server
    (vLLM, TGI, a llama.cpp server, another llmtech) by its base URL."""

    kind: Literal["local", "openai"] = "local"
    model: str = ""             # local: a model id for llmtech.models; openai: the remote name
    base_url: str = ""          # openai: e.g. http://127.0.0.1:8001/v1
    api_key: str = "none"
    timeout_s: float = 120.0


class Limits(StrictModel):
    max_upload_bytes: int = 20 * 1024 * 1024
    upload_types: list[str] = [".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".docx",
                               ".csv", ".json", ".jsonl"]
    max_concurrent_generations: int = 1    # one model, one generation at a time on a CPU
    max_queued_generations: int = 8        # beyond this a chat request gets 429 at once
    queue_timeout_s: float = 120.0         # a queued request waiting longer gets 503
    max_new_tokens: int = 256              # cap on a request's max_tokens
    max_embedding_inputs: int = 256


class ServeConfig(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    data_dir: str = "runs/serve"            # SQLite metadata, uploaded files, indexes
    # API keys: key -> tenant. Each tenant sees only its own datasets, chats and sessions.
    # More keys: `llmtech serve add-key --tenant NAME` (stored hashed in the metadata database).
    api_keys: dict[str, str] = {}
    generation: Backend = Backend(model=DEFAULT_LM)
    embedding: Backend = Backend(model=DEFAULT_EMBEDDER)
    # the knowledge base the OpenAI-style assistant model answers from (read-only, all tenants)
    kb_docs: str | None = "data/support/kb"
    kb: KBConfig = KBConfig()
    assistant_model: str = "llmtech-kb"     # the /v1/models name of the RAG assistant
    top_k: int = 4                          # passages in an answer's context
    max_passage_chars: int | None = 600
    default_max_tokens: int = 96
    limits: Limits = Limits()
    parse_workers: int = 1
