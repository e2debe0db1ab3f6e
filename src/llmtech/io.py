"""Safe file I/O: atomic writes and encoding-aware reads."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import DataError

# Encodings tried in order when a file is not valid UTF-8. GB18030 is a superset of GBK/GB2312.
FALLBACK_ENCODINGS = ("gb18030", "big5")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temp file in the same folder, then rename into place (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def atomic_savefig(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG via a temp file + rename, then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.png", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path


def decode_bytes(raw: bytes, source: str = "<bytes>") -> tuple[str, str]:
    """Decode bytes as UTF-8 (with or without BOM), else GB18030/GBK, else Big5.

    Returns ``(text, encoding)``. Raises DataError naming ``source`` when nothing fits.
    """
    if raw.startswith(b"\xef\xbb\xbf"):
        return raw[3:].decode("utf-8"), "utf-8-sig"
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as e:
        first_bad = e.start
    for enc in FALLBACK_ENCODINGS:
        try:
            return raw.decode(enc), enc
        except UnicodeDecodeError:
            continue
    # charset-normalizer as a last resort for other legacy encodings
    from charset_normalizer import from_bytes

    best = from_bytes(raw).best()
    if best is not None and best.encoding:
        return str(best), best.encoding
    line = raw[:first_bad].count(b"\n") + 1
    raise DataError(
        f"{source}: line {line}: cannot decode text (not UTF-8, GBK/GB18030 or Big5); "
        "re-save the file as UTF-8"
    )


def existing_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` as a Path if it is an existing file; otherwise a DataError that names it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: {what} not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a {what}")
    return path


def read_text(path: str | os.PathLike) -> str:
    """Read a text file whatever its common encoding; errors name the file."""
    path = existing_file(path)
    text, _ = decode_bytes(path.read_bytes(), str(path))
    return text


def replace_dir(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Put the finished folder ``src`` at ``dest``. An existing ``dest`` is first renamed aside
    and removed only after ``src`` is in place, so an interruption leaves the old or the new
    folder, never neither. ``src`` and ``dest`` must be on the same file system."""
    import shutil

    src, dest = Path(src), Path(dest)
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(src, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


class staged_dir:
    """``with staged_dir(dest) as tmp:`` write a folder into ``tmp``; on success it replaces
    ``dest`` (see ``replace_dir``); on an exception ``tmp`` is removed and ``dest`` is untouched."""

    def __init__(self, dest: str | os.PathLike):
        self.dest = Path(dest)
        self.tmp = self.dest.with_name(f".{self.dest.name}.tmp")

    def __enter__(self) -> Path:
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        import shutil

        if exc_type is None:
            replace_dir(self.tmp, self.dest)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False
