"""Data for training and evaluation: formats, validation, templates, cleaning, dedup, documents."""

from .formats import FORMATS, detect_format, load, read_records, to_messages, to_prompt_completion

__all__ = ["FORMATS", "detect_format", "load", "read_records", "to_messages", "to_prompt_completion"]
