"""Model compression: lower precision and quantisation (``quantize``; bitsandbytes 4/8-bit loading
in ``bnb``; NF4 from its definition in ``nf4``), pruning (``prune``), knowledge distillation
(``distill``), and measuring variants side by side (``compare``). Each function takes a loaded
Hugging Face model and returns a smaller or faster one; ``quantize.build_variant`` builds the
named CPU deployment variants."""

from .quantize import (  # noqa: F401
    INT8_SKIP,
    VARIANTS,
    Deployment,
    GGUFModel,
    GGUFUnavailable,
    build_variant,
    eval_texts,
    gguf_path,
    gguf_status,
    perplexity,
    quantize_int8_dynamic,
    to_bf16,
)
