"""llmtech: the LLM Tech course as runnable software."""

__version__ = "0.1.0"
