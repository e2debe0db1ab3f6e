"""Dataset formats (alpaca, sharegpt, preference, kto): reading, validation, normalisation.

Sources: local ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` files (UTF-8 or GBK/GB18030),
``hf:org/name`` (``datasets.load_dataset``) and ``ms:org/name`` (ModelScope ``MsDataset``).
Every record keeps its location (``file:line``) so errors can point at it.
"""

from __future__ import annotations

import csv
import io as _io
import json
from pathlib import Path
from typing import Any, Iterable

from ..errors import DataError
from ..io import decode_bytes, existing_file

FORMATS: dict[str, dict[str, list[str]]] = {
    "alpaca": {"required": ["instruction", "output"], "optional": ["input", "system", "history"]},
    "sharegpt": {"required": ["messages"], "optional": ["system"]},
    "preference": {"required": ["prompt", "chosen", "rejected"], "optional": ["system"]},
    "kto": {"required": ["prompt", "completion", "label"], "optional": ["system"]},
}

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system", "bot": "assistant"}


# --------------------------------------------------------------------------- reading

def read_records(source: str | Path, split: str = "train") -> list[tuple[str, dict]]:
    """Read raw records as ``(location, dict)`` pairs from a file or hub id."""
    s = str(source)
    if s.startswith("hf:"):
        return _read_hub(s[3:], split, hub="hf")
    if s.startswith("ms:"):
        return _read_hub(s[3:], split, hub="ms")
    path = existing_file(s, "data file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: file is empty")
    text, _enc = decode_bytes(raw, str(path))
    if suffix == ".jsonl":
        return _read_jsonl(text, str(path))
    if suffix == ".json":
        try:
            json.loads(text)
        except json.JSONDecodeError:
            first = next((ln for ln in text.splitlines() if ln.strip()), "")
            try:
                json.loads(first)
            except json.JSONDecodeError:
                return _read_json(text, str(path))  # reports where the JSON is malformed
            return _read_jsonl(text, str(path))  # JSON Lines saved as .json
        return _read_json(text, str(path))
    if suffix in (".csv", ".tsv"):
        return _read_csv(text, str(path), delimiter="\t" if suffix == ".tsv" else ",")
    raise DataError(f"{path}: unsupported data file type '{suffix}' (use .json, .jsonl, .csv, .parquet)")


def _read_jsonl(text: str, name: str) -> list[tuple[str, dict]]:
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{i}: malformed JSON line ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{name}:{i}: expected a JSON object, got {type(obj).__name__}")
        out.append((f"{name}:{i}", obj))
    return out


def _read_json(text: str, name: str) -> list[tuple[str, dict]]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{name}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict):
        for key in ("data", "examples", "train"):
            if isinstance(obj.get(key), list):
                obj = obj[key]
                break
        else:
            obj = [obj]
    if not isinstance(obj, list):
        raise DataError(f"{name}: expected a JSON list of objects")
    # Line numbers of top-level items, so errors can point into the file.
    lines = _top_level_item_lines(text)
    out = []
    for i, item in enumerate(obj):
        where = f"{name}:{lines[i]}" if i < len(lines) else f"{name}[{i}]"
        if not isinstance(item, dict):
            raise DataError(f"{where}: item {i} is a {type(item).__name__}, expected an object")
        out.append((where, item))
    return out


def _top_level_item_lines(text: str) -> list[int]:
    """Line number where each item of a top-level JSON array starts (cheap scanner)."""
    lines, depth, line, in_str, esc = [], 0, 1, False, False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
            if depth == 1:
                lines.append(line)
        elif ch in "[{":
            if depth == 1:
                lines.append(line)
            depth += 1
        elif ch in "]}":
            depth -= 1
    return lines


def _read_csv(text: str, name: str, delimiter: str = ",") -> list[tuple[str, dict]]:
    reader = csv.DictReader(_io.StringIO(text), delimiter=delimiter)
    if not reader.fieldnames:
        raise DataError(f"{name}: CSV has no header row")
    out = []
    for row in reader:
        line = reader.line_num
        if None in row:
            raise DataError(f"{name}:{line}: more values than header columns")
        out.append((f"{name}:{line}", {k: _maybe_json(v) for k, v in row.items()}))
    return out


def _maybe_json(v: Any) -> Any:
    """CSV cells holding JSON lists/objects (e.g. a conversation) are parsed."""
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: cannot read parquet ({e})") from None
    return [(f"{path}:row {i + 1}", r) for i, r in enumerate(rows)]


def _read_hub(dataset_id: str, split: str, hub: str) -> list[tuple[str, dict]]:
    name, _, subset = dataset_id.partition("@")  # "org/name@subset"
    try:
        if hub == "hf":
            from datasets import load_dataset

            ds = load_dataset(name, subset or None, split=split)
        else:
            from modelscope.msdatasets import MsDataset

            ds = MsDataset.load(name, subset_name=subset or None, split=split)
    except Exception as e:  # noqa: BLE001
        raise DataError(
            f"dataset '{hub}:{dataset_id}' (split {split}) cannot be loaded ({type(e).__name__}: "
            f"{str(e)[:200]}); offline, download it where there is network and pass the file "
            "path instead") from None
    return [(f"{hub}:{dataset_id}[{split}][{i}]", dict(r)) for i, r in enumerate(ds)]


# --------------------------------------------------------------------------- validation

def detect_format(record: dict) -> str:
    keys = set(record)
    has_prompt = bool(keys & {"prompt", "conversations", "messages"})
    if {"chosen", "rejected"} <= keys and has_prompt:
        return "preference"  # TRL style, or LLaMA-Factory's conversations + chosen/rejected turn
    if "label" in keys and ({"prompt", "completion"} <= keys or "messages" in keys
                            or "conversations" in keys):
        return "kto"  # prompt/completion/label, or LLaMA-Factory's messages + label
    if "messages" in keys or "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys or "output" in keys:
        return "alpaca"
    raise DataError(f"cannot tell the data format from keys {sorted(keys)}; expected one of "
                    f"{', '.join(FORMATS)} (e.g. alpaca needs instruction/output)")


def _text(where: str, rec: dict, key: str, allow_empty: bool = False) -> str:
    if key not in rec or rec[key] is None:
        raise DataError(f"{where}: missing field '{key}'")
    v = rec[key]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return v


def _messages(where: str, value: Any, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{key}' must be a non-empty list of messages")
    msgs = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {key}[{j}] must be an object")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role not in SHAREGPT_ROLES:
            raise DataError(f"{where}: {key}[{j}] has unknown role {role!r} "
                            f"(use one of {sorted(SHAREGPT_ROLES)})")
        if not isinstance(content, str):
            raise DataError(f"{where}: {key}[{j}] is missing its text ('content' or 'value')")
        msgs.append({"role": SHAREGPT_ROLES[role], "content": content})
    return msgs


def normalise(where: str, rec: dict, fmt: str) -> dict:
    """Validate one record and return it in canonical form (extra fields are kept)."""
    extra = {k: v for k, v in rec.items() if k not in ("conversations",)}
    if fmt == "alpaca":
        out = {**extra, "instruction": _text(where, rec, "instruction"),
               "input": _text(where, rec, "input", allow_empty=True) if rec.get("input") is not None else "",
               "output": _text(where, rec, "output")}
        hist = rec.get("history") or []
        if not isinstance(hist, list) or any(not isinstance(h, (list, tuple)) or len(h) != 2 for h in hist):
            raise DataError(f"{where}: field 'history' must be a list of [question, answer] pairs")
        out["history"] = [list(h) for h in hist]
        return out
    if fmt == "sharegpt":
        key = "messages" if "messages" in rec else "conversations"
        if key not in rec:
            raise DataError(f"{where}: missing field 'messages' (or 'conversations')")
        msgs = _messages(where, rec[key], key)
        if rec.get("system") and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": str(rec["system"])})
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message of '{key}' must be from the assistant")
        extra.pop("system", None)
        return {**extra, "messages": msgs}
    if fmt == "preference":
        out = {k: v for k, v in extra.items() if k != "messages"}
        if "prompt" not in rec:  # LLaMA-Factory: the dialogue so far is the prompt
            key = "messages" if "messages" in rec else "conversations"
            if key not in rec:
                raise DataError(f"{where}: missing field 'prompt' (or 'conversations')")
            out["prompt"] = _messages(where, rec[key], key)
        for key in ("prompt", "chosen", "rejected"):
            v = rec.get(key)
            if key == "prompt" and "prompt" not in rec:
                continue
            if isinstance(v, dict):  # one turn, e.g. {"from": "gpt", "value": "..."}
                out[key] = _messages(where, [v], key)
            elif isinstance(v, list):
                out[key] = _messages(where, v, key)
            else:
                out[key] = _text(where, rec, key)
        return out
    if fmt == "kto":
        if "completion" not in rec and ("messages" in rec or "conversations" in rec):
            key = "messages" if "messages" in rec else "conversations"
            msgs = _messages(where, rec[key], key)  # LLaMA-Factory: the last turn is judged
            if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
                raise DataError(f"{where}: '{key}' must end with the assistant turn that is labelled")
            rec = {**rec, "prompt": msgs[:-1], "completion": msgs[-1:]}
            extra.pop(key, None)
        out = {**extra, "prompt": rec.get("prompt"), "completion": rec.get("completion")}
        for key in ("prompt", "completion"):
            out[key] = (_messages(where, rec[key], key) if isinstance(rec.get(key), list)
                        else _text(where, rec, key))
        label = rec.get("label")
        if isinstance(label, str) and label.lower() in ("true", "false", "1", "0"):
            label = label.lower() in ("true", "1")
        if not isinstance(label, bool) and label not in (0, 1):
            raise DataError(f"{where}: field 'label' must be true/false, got {label!r}")
        out["label"] = bool(label)
        return out
    raise DataError(f"unknown data format '{fmt}'; use one of {', '.join(FORMATS)}")


def load(source: str | Path, fmt: str = "auto", split: str = "train",
         limit: int | None = None) -> list[dict]:
    """Read, validate and normalise a dataset. Errors name the file and line."""
    rows = read_records(source, split=split)
    if not rows:
        raise DataError(f"{source}: dataset is empty (no records)")
    if fmt == "auto":
        where0, first = rows[0]
        try:
            fmt = detect_format(first)
        except DataError as e:
            raise DataError(f"{where0}: {e}") from None
    if fmt not in FORMATS:
        raise DataError(f"unknown data format '{fmt}'; use one of {', '.join(FORMATS)}")
    out = [normalise(where, rec, fmt) for where, rec in rows[: limit or None]]
    return out


# --------------------------------------------------------------------------- conversions

def alpaca_prompt(rec: dict) -> str:
    """User turn of an alpaca record: instruction, then input on its own paragraph."""
    if rec.get("input"):
        return f"{rec['instruction']}\n\n{rec['input']}"
    return rec["instruction"]


def to_messages(rec: dict, system: str | None = None) -> list[dict]:
    """Any SFT record (alpaca or sharegpt) -> chat messages."""
    if "messages" in rec:
        msgs = list(rec["messages"])
        if system and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": system})
        return msgs
    msgs = []
    sys_prompt = rec.get("system") or system
    if sys_prompt:
        msgs.append({"role": "system", "content": sys_prompt})
    for q, a in rec.get("history") or []:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    msgs += [{"role": "user", "content": alpaca_prompt(rec)},
             {"role": "assistant", "content": rec["output"]}]
    return msgs


def to_prompt_completion(rec: dict, system: str | None = None) -> dict:
    """SFT record -> TRL conversational prompt/completion (the last assistant turn is the target)."""
    msgs = to_messages(rec, system)
    return {"prompt": msgs[:-1], "completion": msgs[-1:]}


def split_records(records: list[dict], eval_fraction: float, seed: int = 0) -> tuple[list, list]:
    import random

    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, int(round(len(records) * eval_fraction))) if eval_fraction > 0 else 0
    ev = sorted(idx[:n_eval])
    tr = sorted(idx[n_eval:])
    return [records[i] for i in tr], [records[i] for i in ev]


def iter_texts(records: Iterable[dict]) -> Iterable[str]:
    for r in records:
        if "messages" in r:
            yield "\n".join(m["content"] for m in r["messages"])
        else:
            yield "\n".join(str(r.get(k, "")) for k in ("instruction", "input", "output") if r.get(k))
