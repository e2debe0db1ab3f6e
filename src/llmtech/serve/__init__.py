"""The knowledge-base QA service: OpenAI- and RAGFlow-compatible APIs and a web page.

``llmtech serve run --config configs/serve.yaml`` (``make serve``) starts it; ``create_app``
builds the FastAPI app for tests and embedding in other programs.
"""

from .config import Backend, Limits, ServeConfig

__all__ = ["Backend", "Limits", "ServeConfig", "create_app", "run"]


def create_app(config: ServeConfig, service=None):
    from .app import create_app as _create

    return _create(config, service)


def run(config: ServeConfig) -> None:
    """Serve until interrupted (uvicorn, one process: the model and the indexes live here)."""
    import uvicorn

    app = create_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info",
                timeout_graceful_shutdown=5)
