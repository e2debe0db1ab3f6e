"""Model compression for deployment: lower precision and quantisation (pruning and distillation
join later lessons). Each function takes a loaded Hugging Face model and returns a smaller or
faster one; ``quantize.build_variant`` builds the named CPU deployment variants side by side."""

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
