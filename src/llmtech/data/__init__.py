"""Data for training and evaluation: formats, validation, templates, cleaning, dedup, documents."""

from . import templates
from .clean import CleanConfig, clean_records, detect_lang, mask_pii, normalize_text
from .dedup import CleanDedupConfig, DedupConfig, clean_and_dedup, dedup_records, exact_dedup, near_dedup
from .docs import document_to_instructions, load_document, load_documents
from .formats import FORMATS, detect_format, load, read_records, to_messages, to_prompt_completion
from .templates import alpaca_text

__all__ = ["FORMATS", "detect_format", "load", "read_records", "to_messages", "to_prompt_completion",
           "CleanConfig", "clean_records", "detect_lang", "mask_pii", "normalize_text",
           "CleanDedupConfig", "DedupConfig", "clean_and_dedup", "dedup_records", "exact_dedup",
           "near_dedup", "document_to_instructions", "load_document", "load_documents",
           "templates", "alpaca_text"]
