"""One config mechanism: ``--config FILE.yaml`` plus ``key=value`` overrides -> pydantic model.

Every command and lab validates its settings through a ``StrictModel`` subclass, so an unknown
or ill-typed key is an error that names the key (and the file it came from).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError
from .io import read_text

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for all configs: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
    return data


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """``["a=1", "b.c=x"]`` -> ``{"a": 1, "b": {"c": "x"}}``; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(
    cls: type[T],
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
) -> T:
    """Build ``cls`` from defaults, then the YAML file, then overrides (later wins)."""
    data: dict[str, Any] = dict(defaults or {})
    if config_file:
        data = deep_merge(data, read_yaml(config_file))
    over = parse_overrides(overrides)
    data = deep_merge(data, over)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, cls, config_file, over)) from None


def format_validation_error(e: ValidationError, cls, config_file, overrides: dict) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"])
        top = str(err["loc"][0]) if err["loc"] else ""
        origin = "override" if top in overrides else (str(config_file) if config_file else "defaults")
        if err["type"] == "extra_forbidden":
            known = ", ".join(sorted(cls.model_fields)) if len(err["loc"]) == 1 else ""
            msg = f"unknown config key '{key}' (from {origin})"
            if known:
                msg += f"; known keys: {known}"
        else:
            msg = f"config key '{key}' (from {origin}): {err['msg']}, got {err.get('input')!r}"
        lines.append(msg)
    return "; ".join(lines)
