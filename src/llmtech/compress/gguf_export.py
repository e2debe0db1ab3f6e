"""Export a Hugging Face model folder to a GGUF file with the ``gguf`` package (llama.cpp's own
Python writer), and check the file by loading it back with transformers.

llama.cpp's ``convert_hf_to_gguf.py`` lives in the llama.cpp source tree, not in a package, so
this module writes the same layout for the two architectures the course uses:

* ``llama`` (SmolLM2, LLaMA-2/3): query/key projections are stored with llama.cpp's rotary
  layout (rows of each head reordered from "first half / second half" to interleaved pairs,
  ``permute_qk``); transformers' GGUF loader undoes exactly this permutation;
* ``qwen2`` (Qwen2 / Qwen2.5): no permutation; q/k/v carry biases.

Tensor names come from ``gguf.get_tensor_name_map`` (HF name -> GGUF name). Weight matrices are
stored as ``q8_0`` (8-bit blocks of 32 with an fp16 scale, ``gguf.quants``), ``f16`` or
``f32``; norms and biases stay f32 as llama.cpp does. The tokenizer (GPT-2 style byte-level BPE:
tokens, token types, merges, special ids, chat template) is written with ``gguf.vocab``.

``verify_gguf`` reloads the file through transformers (``from_pretrained(..., gguf_file=...)``,
which dequantises to fp32) and compares next-token logits with the source model: a wrong name,
shape or permutation shows up as a large difference, quantisation as a small one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import ConfigError, DataError

QType = Literal["q8_0", "f16", "f32"]
ARCHS = ("llama", "qwen2")
# llama.cpp's pre-tokenizer names for the tokenizers the course ships (others: "default")
_PRE_BY_VOCAB = {("llama", 49152): "smollm", ("qwen2", 151936): "qwen2", ("qwen2", 152064): "qwen2"}


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary layout -> llama.cpp's (what ``convert_hf_to_gguf`` does for LLaMA models):
    within each head, rows [first half | second half] become interleaved pairs."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _load(model_dir: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise DataError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    cfg = AutoConfig.from_pretrained(model_dir)
    if cfg.model_type not in ARCHS:
        raise ConfigError(f"{cfg_file}: model_type {cfg.model_type!r} is not supported by the GGUF "
                          f"export (supported: {', '.join(ARCHS)}); use llama.cpp's "
                          "convert_hf_to_gguf.py for other architectures")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    return cfg, model


def export_gguf(model_dir: str | Path, out_file: str | Path, qtype: QType = "q8_0",
                name: str | None = None) -> dict:
    """Write ``model_dir`` (config.json + weights + tokenizer.json) as one GGUF file. Returns
    ``{"path", "bytes", "tensors", "qtype", "arch", "source_bytes"}``. The file is written to a
    temporary name and renamed, so a failed export leaves no half-written ``out_file``."""
    import gguf

    if qtype not in ("q8_0", "f16", "f32"):
        raise ConfigError(f"qtype {qtype!r}: use q8_0, f16 or f32")
    model_dir, out_file = Path(model_dir), Path(out_file)
    cfg, model = _load(model_dir)
    arch = gguf.MODEL_ARCH.LLAMA if cfg.model_type == "llama" else gguf.MODEL_ARCH.QWEN2
    n_layer, n_head = cfg.num_hidden_layers, cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    tmap = gguf.get_tensor_name_map(arch, n_layer)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    done = False
    try:
        w.add_name(name or model_dir.name)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        rope = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
        if rope:
            w.add_rope_freq_base(float(rope))
        w.add_rope_dimension_count(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head)
        w.add_vocab_size(cfg.vocab_size)
        ftype = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "f32": gguf.LlamaFileType.ALL_F32}[qtype]
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(w, model_dir, cfg)

        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        count = 0
        for hf_name, t in model.state_dict().items():
            if tied and hf_name == "lm_head.weight":
                continue  # llama.cpp reuses token_embd when there is no output.weight
            gname = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise ConfigError(f"{model_dir}: no GGUF name for tensor {hf_name!r}")
            data = t.detach().float().numpy()
            if cfg.model_type == "llama" and hf_name.endswith("q_proj.weight"):
                data = permute_qk(data, n_head)
            elif cfg.model_type == "llama" and hf_name.endswith("k_proj.weight"):
                data = permute_qk(data, n_kv)
            _add_tensor(w, gname, data, qtype)
            count += 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        done = True
    finally:
        w.close()
        if not done:  # a failed export leaves neither a half-written file nor its temp file
            tmp.unlink(missing_ok=True)
    tmp.replace(out_file)
    src = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    return {"path": str(out_file), "bytes": out_file.stat().st_size, "tensors": count,
            "qtype": qtype, "arch": cfg.model_type, "source_bytes": src}


def _add_tensor(w, name: str, data: np.ndarray, qtype: QType) -> None:
    import gguf

    if data.ndim < 2 or qtype == "f32":
        w.add_tensor(name, data.astype(np.float32))
    elif qtype == "f16":
        w.add_tensor(name, data.astype(np.float16))
    elif data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]:
        w.add_tensor(name, data.astype(np.float16))  # rows not a multiple of the block size
    else:
        q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)


def _add_tokenizer(w, model_dir: Path, cfg) -> None:
    import gguf

    try:
        vocab = gguf.BpeVocab(model_dir)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{model_dir}: the GGUF export needs a byte-level BPE tokenizer.json "
                        f"({e})") from None
    tokens, types = [], []
    for text, _score, ttype in vocab.all_tokens():
        tokens.append(text.encode("utf-8") if isinstance(text, str) else text)
        types.append(ttype)
    # tokens the tokenizer marks as special (e.g. <|im_start|>) are control tokens in llama.cpp
    tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    special = {a["id"] for a in tj.get("added_tokens", []) if a.get("special")}
    types = [gguf.TokenType.CONTROL if i in special else t for i, t in enumerate(types)]
    pad = cfg.vocab_size - len(tokens)
    for i in range(pad):  # embedding rows beyond the tokenizer (Qwen pads its vocabulary)
        tokens.append(f"[PAD{i}]".encode())
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_PRE_BY_VOCAB.get((cfg.model_type, cfg.vocab_size), "default"))
    w.add_token_list(tokens)
    w.add_token_types(types)
    sv = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    sv.add_to_gguf(w, quiet=True)


def verify_gguf(gguf_file: str | Path, model_dir: str | Path,
                text: str = "客服电话是多少？The warranty covers") -> dict:
    """Load the GGUF back with transformers (dequantised to fp32) and compare its logits on
    ``text`` with the source folder's: ``max_abs_diff``, ``same_argmax`` (share of positions
    whose top token agrees) and ``tokenizer_same`` (both tokenizers give the same ids)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, model_dir = Path(gguf_file), Path(model_dir)
    ref_tok = AutoTokenizer.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    back = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                dtype="float32").eval()
    ids = ref_tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = ref(ids).logits[0], back(ids).logits[0]
    return {"max_abs_diff": float((a - b).abs().max()),
            "same_argmax": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
            "tokenizer_same": tok(text)["input_ids"] == ids[0].tolist(), "tokens": ids.shape[1]}
