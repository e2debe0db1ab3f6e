"""P-Tuning v2 (deep prompts), P-Tuning v1 (prompt encoder) and LoRA, built the same way with PEFT.

What the three methods train, with the base model frozen:

* **P-Tuning v2 / prefix tuning** (``method="ptv2"``, PEFT ``PrefixTuningConfig``): "deep prompts
  in every layer". For each of the ``L`` transformer layers it learns ``n`` key vectors and ``n``
  value vectors that are prepended to that layer's attention keys/values (PEFT hands them to the
  model as a pre-filled KV cache, ``past_key_values``). Every real token can attend to these
  ``n`` virtual positions in *every* layer, so the prompt steers the computation at all depths.
  Per layer the prefix has ``2 × n × num_key_value_heads × head_dim`` numbers (with grouped-query
  attention that is the K/V width, not the hidden size: PEFT sizes it from
  ``num_key_value_heads``), in total ``n × L × 2 × kv_dim`` — see ``analytic_prefix_params``.
  Optional reparameterisation (``prefix_projection=True``): train ``n`` small embeddings plus a
  two-layer MLP (``token_dim -> encoder_hidden_size -> L × 2 × kv_dim``) that *produces* the
  prefix; it can make optimisation smoother, and only the produced prefix is saved.
* **P-Tuning v1** (``method="ptv1"``, PEFT ``PromptEncoderConfig``): ``n`` virtual tokens whose
  embeddings come out of a small prompt encoder (MLP or LSTM+MLP) and are concatenated to the
  *input embeddings* only. Layer 0 sees them as extra tokens; deeper layers only see what
  attention carried forward. The model's logits therefore have ``n`` extra positions in front.
* **LoRA** (``method="lora"``): low-rank updates ``B·A`` on the linear layers
  (``llmtech.train.lora``) — the reference point.

Training goes through ``llmtech.train.sft.run_sft`` (TRL's SFTTrainer, response-only loss) with
the already-wrapped ``PeftModel``: checked on transformers 5 / TRL 1.16 / PEFT 0.21, the prefix
arrives as a ``DynamicCache`` that the Llama attention uses even with ``use_cache=False``, and
gradients reach the prefix (``tests/test_lab_l203.py``). Prefix tuning does not combine with
gradient checkpointing (PEFT refuses it).

Held-out evaluation is classification-as-generation: ``evaluate_labels`` runs each question with
its gold answer once, takes the mean per-token loss of the answer (as ``evals.lm.response_loss``)
and, at the answer's first position, picks the candidate label with the highest log-probability
(labels must start with distinct tokens; single-token labels make this the label's full
log-likelihood).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Literal

import torch

from ..config import StrictModel
from ..errors import ConfigError, LlmtechError
from .lora import LoraSettings, lora_config

log = logging.getLogger(__name__)

Method = Literal["ptv2", "ptv1", "lora"]
METHOD_TITLES = {"ptv2": "P-Tuning v2 (prefix)", "ptv1": "P-Tuning v1 (prompt encoder)",
                 "lora": "LoRA"}
_SHORT = {"ptv2": "P-Tuning v2\n(deep prefix)", "ptv1": "P-Tuning v1\n(input prompt)", "lora": "LoRA"}


class PromptTuningSettings(StrictModel):
    """One PEFT method and the settings it uses (the others' fields are ignored)."""

    method: Method = "ptv2"
    learning_rate: float = 1e-2
    # ptv2 + ptv1: how many virtual tokens (prefix length / prompt length)
    num_virtual_tokens: int = 16
    # ptv2: reparameterise the prefix through an MLP (P-Tuning v2's optional "projection")
    prefix_projection: bool = False
    # ptv2 with projection: MLP width; ptv1: prompt-encoder width (None = the model's token_dim)
    encoder_hidden_size: int | None = None
    # ptv2 start: "random" (PEFT's default, N(0,1)), "zero", or "text": the keys/values the frozen
    # model computes for the first num_virtual_tokens tokens of prefix_init_text in every layer
    # (Li & Liang's initialisation from real words: training starts from a real hard prompt)
    prefix_init: Literal["random", "zero", "text"] = "random"
    prefix_init_text: str = ""
    # ptv1: prompt encoder type
    encoder_type: Literal["MLP", "LSTM"] = "MLP"
    encoder_num_layers: int = 2  # ptv1 LSTM layers (PEFT's MLP always has 3 linear layers)
    # lora: rank, scale, dropout and which Linear layers (see llmtech.train.lora.LoraSettings)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"


def peft_config(s: PromptTuningSettings):
    """The PEFT config object for ``s.method``."""
    from peft import PrefixTuningConfig, PromptEncoderConfig

    if s.method in ("ptv2", "ptv1") and s.num_virtual_tokens < 1:
        raise ConfigError(f"num_virtual_tokens must be >= 1, got {s.num_virtual_tokens}")
    if s.method == "ptv2":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=s.num_virtual_tokens,
                                  prefix_projection=s.prefix_projection,
                                  encoder_hidden_size=s.encoder_hidden_size,
                                  init_weights="zero" if s.prefix_init == "zero" else None)
    if s.method == "ptv1":
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=s.num_virtual_tokens,
                                   encoder_reparameterization_type=s.encoder_type,
                                   encoder_hidden_size=s.encoder_hidden_size,
                                   encoder_num_layers=s.encoder_num_layers)
    return lora_config(LoraSettings(r=s.lora_r, alpha=s.lora_alpha, dropout=s.lora_dropout,
                                    target_modules=s.target_modules))


def wrap(model, s: PromptTuningSettings, tokenizer=None):
    """``get_peft_model(model, peft_config(s))``: base weights frozen, only the method's new
    parameters trainable. The base model is modified in place for LoRA (layers are wrapped);
    for prompt learning it is only frozen. ``tokenizer`` is needed for ``prefix_init=text``."""
    from peft import get_peft_model

    if s.method == "ptv2" and s.prefix_init == "text" and s.prefix_projection:
        raise ConfigError("prefix_init=text sets the prefix itself; it cannot be combined with "
                          "prefix_projection=true (the MLP produces the prefix)")
    if s.method == "ptv2" and s.prefix_init == "text" and not s.prefix_init_text.strip():
        raise ConfigError("prefix_init=text needs prefix_init_text")
    pm = get_peft_model(model, peft_config(s))
    if s.method == "ptv2" and s.prefix_init == "text":
        if tokenizer is None:
            raise ValueError("wrap: prefix_init=text needs the tokenizer")
        init_prefix_from_text(pm, tokenizer, s.prefix_init_text)
    return pm


@torch.no_grad()
def prefix_from_text(model, input_ids: list[int]) -> torch.Tensor:
    """Every layer's keys and values of the frozen model on ``input_ids``, laid out as PEFT's
    prefix embedding (``n × (L·2·kv_heads·head_dim)``: per position, layer by layer, key then
    value). Keys carry the rotary encoding of positions 0..n-1 — exactly where the real tokens
    of a prefixed sequence start counting (at n), so this prefix acts like the text itself."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ids = torch.tensor([input_ids], device=next(base.parameters()).device)
    was_training = base.training
    base.eval()
    out = base(input_ids=ids, use_cache=True)
    base.train(was_training)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values  # transformers 5 / 4
    parts = []
    for layer in cache.layers:  # keys/values: (1, kv_heads, n, head_dim)
        parts += [layer.keys[0], layer.values[0]]
    kv = torch.stack(parts)  # (L·2, kv_heads, n, head_dim)
    return kv.permute(2, 0, 1, 3).reshape(len(input_ids), -1)


def init_prefix_from_text(peft_model, tokenizer, text: str) -> None:
    """Set a prefix-tuning model's prefix to ``prefix_from_text`` of the first
    ``num_virtual_tokens`` tokens of ``text``."""
    n = peft_model.active_peft_config.num_virtual_tokens
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n:
        raise ConfigError(f"prefix_init_text has {len(ids)} tokens; num_virtual_tokens={n} "
                          "needs at least that many")
    emb = peft_model.prompt_encoder[peft_model.active_adapter].embedding
    with torch.no_grad():
        emb.weight.copy_(prefix_from_text(peft_model, ids[:n]).to(emb.weight.dtype))


def trainable_report(model) -> dict:
    """Trainable parameters, all parameters (base + method) and the trainable share."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total,
            "trainable_share": trainable / max(total, 1)}


def kv_dim(config) -> int:
    """Width of one layer's keys (= values): ``num_key_value_heads × head_dim``."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads * head_dim


def analytic_prefix_params(config, num_virtual_tokens: int, prefix_projection: bool = False,
                           encoder_hidden_size: int | None = None) -> int:
    """Trainable parameters of P-Tuning v2 on a model with ``config``.

    Without projection: the prefix itself, ``n × L × 2 × kv_dim`` (a key and a value vector per
    virtual token and layer). With projection: ``n × kv_dim`` embeddings + Linear(kv_dim→h) +
    Linear(h→L·2·kv_dim) with biases (PEFT uses the K/V width as the token size here).
    """
    L, d = config.num_hidden_layers, kv_dim(config)
    out = 2 * L * d
    if not prefix_projection:
        return num_virtual_tokens * out
    h = encoder_hidden_size or d
    return num_virtual_tokens * d + (d * h + h) + (h * out + out)


def analytic_prompt_encoder_params(config, num_virtual_tokens: int,
                                   encoder_hidden_size: int | None = None,
                                   encoder_type: str = "MLP", encoder_num_layers: int = 2) -> int:
    """Trainable parameters of P-Tuning v1: ``n × d`` virtual-token embeddings plus the encoder.

    MLP (PEFT): Linear(d→h), ReLU, Linear(h→h), ReLU, Linear(h→d), all with biases.
    LSTM: a bidirectional LSTM (d→h, ``encoder_num_layers`` layers) then Linear(2h→2h), ReLU,
    Linear(2h→d).
    """
    d = config.hidden_size
    h = encoder_hidden_size or d
    emb = num_virtual_tokens * d
    if encoder_type == "MLP":
        return emb + (d * h + h) + (h * h + h) + (h * d + d)
    lstm = 0
    for layer in range(encoder_num_layers):
        d_in = d if layer == 0 else 2 * h
        lstm += 2 * (4 * h * d_in + 4 * h * h + 8 * h)  # two directions, W_ih, W_hh, b_ih, b_hh
    return emb + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)


def analytic_trainable(base_model, s: PromptTuningSettings) -> int:
    """The parameter count ``wrap(base_model, s)`` should make trainable, from the formulas
    (call it on the plain model, before wrapping: LoRA changes the model in place)."""
    from .lora import analytic_lora_params, target_linears

    cfg = base_model.config
    if s.method == "ptv2":
        return analytic_prefix_params(cfg, s.num_virtual_tokens, s.prefix_projection,
                                      s.encoder_hidden_size)
    if s.method == "ptv1":
        return analytic_prompt_encoder_params(cfg, s.num_virtual_tokens, s.encoder_hidden_size,
                                              s.encoder_type, s.encoder_num_layers)
    return analytic_lora_params(target_linears(base_model, s.target_modules), s.lora_r)


def virtual_positions(model) -> int:
    """How many positions a model's logits carry in front of the real tokens (P-Tuning v1 and
    prompt tuning prepend virtual tokens to the input; prefix tuning and LoRA do not)."""
    from peft import PeftType

    cfg = getattr(model, "active_peft_config", None)
    if cfg is None or not cfg.is_prompt_learning or cfg.peft_type == PeftType.PREFIX_TUNING:
        return 0
    return int(cfg.num_virtual_tokens)


# --------------------------------------------------------------------------- the task

def question_text(record: dict) -> str:
    """The user's question of an SFT record (instruction, plus input when there is one)."""
    q = str(record.get("instruction", "")).strip()
    extra = str(record.get("input", "") or "").strip()
    return f"{q}\n{extra}" if extra else q


def label_records(records: list[dict], field: str, labels: dict[str, str], template: str,
                  source: str = "data") -> list[dict]:
    """Turn SFT records into a classification-as-generation set (alpaca records).

    ``labels`` maps a value of ``record[field]`` to its answer word; records with other values
    are left out (the mapping chooses the classes). ``template`` has ``{question}`` and
    ``{labels}`` (the answer words joined by ", "). A mapped value that no record has is an
    error naming it, so a typo in the mapping cannot silently drop a class.
    """
    if "{question}" not in template:
        raise ConfigError("template must contain {question}")
    if not labels:
        raise ConfigError("the label mapping is empty")
    seen = {r.get(field) for r in records}
    missing = [k for k in labels if k not in seen]
    if missing:
        raise LlmtechError(f"{source}: no record has {field} = {', '.join(map(repr, missing))} "
                           f"(values present: {', '.join(sorted(map(str, seen)))})")
    words = ", ".join(dict.fromkeys(labels.values()))
    return [{"instruction": template.format(question=question_text(r), labels=words),
             "input": "", "output": labels[r[field]]}
            for r in records if r.get(field) in labels]


def label_token_ids(tokenizer, labels: list[str]) -> tuple[list[int], bool]:
    """First token id of each answer word (as the assistant's reply starts with it), and
    whether every label is exactly one token. First tokens must differ."""
    firsts, single = [], True
    for w in labels:
        ids = tokenizer(w, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError(f"label {w!r} tokenises to nothing")
        firsts.append(ids[0])
        single = single and len(ids) == 1
    dup = {tokenizer.decode([t]) for t in firsts if firsts.count(t) > 1}
    if dup:
        raise ConfigError(f"labels must start with different tokens; these share a first token: "
                          f"{sorted(dup)} — pick other answer words")
    return firsts, single


@torch.no_grad()
def evaluate_labels(model, tokenizer, records: list[dict], labels: list[str],
                    max_length: int = 256, batch_size: int = 16) -> dict:
    """Held-out loss and accuracy of a classification-as-generation set (alpaca records whose
    ``output`` is one of ``labels``).

    One forward pass per record (its prompt + gold answer, right padding): ``loss`` is the mean
    per-token NLL of the answer tokens (label + end of turn); ``accuracy`` compares the argmax
    over the candidate labels' first-token log-probabilities at the answer position with the
    gold label. Works for LoRA, prefix tuning and P-Tuning v1 (whose extra leading logit
    positions are dropped).
    """
    from ..data import to_messages
    from ..evals.lm import encode_chat_example, pad_examples

    if not records:
        raise LlmtechError("evaluate_labels: no records")
    cand, _ = label_token_ids(tokenizer, labels)
    cand_t = torch.tensor(cand)
    index = {w: i for i, w in enumerate(labels)}
    gold = []
    for r in records:
        if r["output"] not in index:
            raise LlmtechError(f"gold answer {r['output']!r} is not one of the labels {labels}")
        gold.append(index[r["output"]])
    ex = [encode_chat_example(tokenizer, to_messages(r), max_length) for r in records]
    offset = virtual_positions(model)
    was_training = model.training
    model.eval()
    nll, n_tok, preds, t0 = 0.0, 0, [], time.time()
    pad = tokenizer.pad_token_id
    dev = next(model.parameters()).device
    for i in range(0, len(ex), batch_size):
        chunk = ex[i:i + batch_size]
        ids, att, tgt = pad_examples(chunk, pad)
        logits = model(input_ids=ids.to(dev), attention_mask=att.to(dev)).logits[:, offset:]
        logp = torch.log_softmax(logits.float().cpu()[:, :-1], dim=-1)
        tok_logp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        m = tgt[:, 1:]
        nll -= float((tok_logp * m).sum())
        n_tok += int(m.sum())
        first = m.float().argmax(dim=1)  # position whose next token is the answer's first
        at = logp[torch.arange(len(chunk)), first]  # (batch, vocab)
        preds += at[:, cand_t].argmax(dim=1).tolist()
    if was_training:
        model.train()
    correct = sum(int(p == g) for p, g in zip(preds, gold))
    per_label = {}
    for i, w in enumerate(labels):
        hits = [int(p == g) for p, g in zip(preds, gold) if g == i]
        per_label[w] = sum(hits) / len(hits) if hits else None
    return {"loss": nll / max(n_tok, 1), "accuracy": correct / len(records),
            "predictions": [labels[p] for p in preds], "per_label_accuracy": per_label,
            "eval_s": time.time() - t0}


# --------------------------------------------------------------------------- training + saving

def train(peft_model, tokenizer, s: PromptTuningSettings, train_file: str | Path,
          output_dir: str | Path, steps: int, batch_size: int = 8, max_length: int = 256,
          seed: int = 0, warmup: float = 0.1, bf16: bool | None = None,
          model_id: str = "", logging_steps: int = 2) -> dict:
    """Train an already-wrapped PEFT model with TRL's SFTTrainer (``llmtech.train.sft``):
    response-only loss, ``steps`` optimizer steps at ``s.learning_rate``. Returns run_sft's flat
    result (train loss, tokens/s, trainer_log.jsonl in ``output_dir``...) plus ``trainer``."""
    from .sft import SFTSettings, run_sft

    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    sft = SFTSettings(model=model_id or "(given)", train_file=str(train_file), eval_file=None,
                      output_dir=str(output_dir), finetuning="full",  # the model is wrapped already
                      max_steps=steps, batch_size=batch_size, learning_rate=s.learning_rate,
                      warmup=warmup, max_length=max_length, seed=seed, bf16=bf16,
                      logging_steps=logging_steps, save_steps=10**9, save_final=False,
                      eval_before=False)
    return run_sft(sft, model=peft_model, tokenizer=tokenizer)


def save_prompt(peft_model, path: str | Path) -> dict:
    """Save the learned method (prefix / prompt encoder / LoRA weights) with PEFT's
    ``save_pretrained``; returns the folder and the bytes and numbers of values stored.

    For prefix tuning PEFT stores the *prefix itself* (``n × L·2·kv_dim`` values), also when it
    was trained through the projection MLP, which is then no longer needed.
    """
    from safetensors import safe_open

    from ..io import staged_dir

    with staged_dir(path) as tmp:
        peft_model.save_pretrained(str(tmp))
    path = Path(path)
    weights = path / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        values = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return {"dir": str(path), "bytes": weights.stat().st_size, "values": values}


def load_prompt(base_model, path: str | Path):
    """A fresh base model + the saved method from ``path`` (inference mode)."""
    from peft import PeftModel

    if not (Path(path) / "adapter_config.json").exists():
        raise LlmtechError(f"{path}: no adapter_config.json — not a saved PEFT adapter folder")
    return PeftModel.from_pretrained(base_model, str(path))


@torch.no_grad()
def logits_of(model, tokenizer, texts: list[str], max_length: int = 256) -> list[torch.Tensor]:
    """Logits of each text on its own (float32, CPU), the virtual positions of P-Tuning v1
    removed — for checking a reloaded prompt computes the same function."""
    model.eval()
    offset = virtual_positions(model)
    dev = next(model.parameters()).device
    out = []
    for t in texts:
        ids = tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :max_length]
        out.append(model(input_ids=ids.to(dev)).logits[0, offset:].float().cpu())
    return out


def comparison_figure(rows: list[dict], before: float):
    """Bar chart of the methods side by side: held-out accuracy after training (with the
    untrained model's accuracy as a dashed line) and the trainable share of parameters.
    ``rows``: dicts with ``method``, ``accuracy_after``, ``trainable_share``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [_SHORT.get(r["method"], r["method"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    bars = ax1.bar(names, [r["accuracy_after"] for r in rows], color=["C0", "C1", "C2"][:len(rows)])
    ax1.axhline(before, ls="--", color="gray", label=f"before training ({before:.2f})")
    ax1.bar_label(bars, fmt="%.2f")
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("held-out accuracy")
    ax1.legend(loc="upper left")
    bars = ax2.bar(names, [100 * r["trainable_share"] for r in rows], color=["C0", "C1", "C2"][:len(rows)])
    ax2.bar_label(bars, fmt="%.3f%%")
    ax2.set_ylabel("trainable parameters (% of total)")
    ax2.set_ylim(0, 1.2 * max(100 * r["trainable_share"] for r in rows))
    fig.tight_layout()
    return fig
