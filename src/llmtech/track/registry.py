"""Model versioning: MLflow runs + Model Registry on a local SQLite store, W&B in offline mode.

* ``ModelRegistry(root, experiment, model_name)`` opens (or creates) an MLflow store at
  ``sqlite:///<root>/mlflow.db`` with artifacts under ``<root>/artifacts``. ``log_run`` records
  params, final metrics, per-step metrics, lineage tags and artifacts (adapter folder, files);
  ``register`` makes a run's artifact a new version of the registered model; ``versions`` reads
  everything back for a comparison table. A store that is not an SQLite file (garbage bytes), or
  an SQLite file that is not an MLflow store, is a ``DataError`` naming the file; such a file is
  never written to, moved or deleted.
* ``promote(registry, version, metric, margin)`` applies the promotion rule: the new version
  becomes the ``challenger``; it takes the ``champion`` alias only when its metric beats the
  champion's by at least ``margin`` (lower is better by default). The decision and its reason
  are written to the version's tags.
* ``lineage(...)`` hashes what a version was made from: dataset content, base model, adapter
  files, the training config, and the git commit of the code when there is one.
* ``log_wandb_offline`` logs the same run to W&B in offline mode with every W&B folder inside the
  given root (nothing under the user's home, no network); ``read_wandb_offline`` parses the
  resulting ``run-<id>.wandb`` file (its record framing + W&B's protobuf records), and
  ``wandb_sync_dry_run`` asks ``wandb sync --dry-run`` what it would upload.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sqlite3
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import ConfigError, DataError, LlmtechError

log = logging.getLogger(__name__)

SQLITE_MAGIC = b"SQLite format 3\x00"
CHAMPION, CHALLENGER = "champion", "challenger"
LINEAGE_PREFIX = "lineage."


def silence_outbound() -> None:
    """Environment that keeps MLflow off the network (telemetry). W&B's offline settings are
    applied only while a W&B run is open (``wandb_env``): a process-wide ``WANDB_MODE=offline``
    makes transformers print "[INFO] Running in WANDB offline mode" to stdout on import, in this
    process and in every child process (it broke the JSON output of ``llmtech rag``)."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ["DO_NOT_TRACK"] = "1"


# --------------------------------------------------------------------------- lineage

def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_sha256(root: str | os.PathLike) -> str:
    """Hash of a folder: every file's relative path and content, in sorted order."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    h = hashlib.sha256()
    for p in sorted(x for x in root.rglob("*") if x.is_file()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(file_sha256(p).encode())
    return h.hexdigest()


def config_sha256(config: Any) -> str:
    """Hash of a JSON-able config (keys sorted, so key order does not matter)."""
    text = json.dumps(config, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def git_commit(path: str | os.PathLike = ".") -> str | None:
    """``HEAD`` of the git checkout holding ``path`` (``+dirty`` when it has changes); None
    outside a checkout or without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def dataset_sha256(files: Iterable[str | os.PathLike]) -> str:
    """Hash of a dataset made of several files: each file's name and content hash, in order."""
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).name.encode() + b"\0" + file_sha256(f).encode() + b"\n")
    return h.hexdigest()


def lineage(data_files: Iterable[str | os.PathLike], base_model: str, adapter_dir=None,
            config: Any = None, code_dir: str | os.PathLike | None = ".") -> dict[str, str]:
    """Lineage tags (``lineage.*``): what a model version was made from, as content hashes."""
    tags = {"dataset_sha256": dataset_sha256(data_files), "base_model": base_model}
    if adapter_dir is not None:
        tags["adapter_sha256"] = tree_sha256(adapter_dir)
    if config is not None:
        tags["config_sha256"] = config_sha256(config)
    commit = git_commit(code_dir) if code_dir is not None else None
    tags["git_commit"] = commit or "unknown"
    return {LINEAGE_PREFIX + k: v for k, v in tags.items()}


# --------------------------------------------------------------------------- the MLflow store

def check_backend(root: str | os.PathLike) -> Path:
    """Validate (or create) an MLflow backend folder; returns the path of its ``mlflow.db``.

    A missing folder is created. An existing ``mlflow.db`` must be an SQLite file that is empty
    or holds MLflow's tables; anything else is a ``DataError`` and the file is left untouched.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: the MLflow backend must be a folder, but this is a file")
    root.mkdir(parents=True, exist_ok=True)
    db = root / "mlflow.db"
    if not db.exists():
        return db
    if not db.is_file():
        raise DataError(f"{db}: expected the MLflow SQLite file, found a folder")
    with open(db, "rb") as f:
        head = f.read(len(SQLITE_MAGIC))
    if not head:
        return db  # an empty file is a new SQLite database
    if head != SQLITE_MAGIC:
        raise DataError(f"{db}: not an SQLite database (starts with {head[:8]!r}); the MLflow "
                        "store is corrupt. The file was left untouched: move it away or point "
                        "the registry at another folder")
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
            bad = con.execute("pragma quick_check").fetchone()[0]
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise DataError(f"{db}: unreadable SQLite database ({e}); the file was left untouched") from None
    if bad != "ok":
        raise DataError(f"{db}: damaged SQLite database (quick_check: {bad}); the file was left "
                        "untouched")
    if tables and not {"experiments", "runs", "alembic_version"} <= tables:
        raise DataError(f"{db}: an SQLite database but not an MLflow store (tables: "
                        f"{', '.join(sorted(tables)[:6])}); it was left untouched")
    return db


@dataclass
class VersionInfo:
    """One registered model version with what its run recorded."""

    version: str
    run_id: str
    aliases: list[str]
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    source: str

    def row(self, metric_keys: Iterable[str] = (), param_keys: Iterable[str] = (),
            lineage_keys: Iterable[str] = ()) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "aliases": ",".join(self.aliases) or "-"}
        out.update({k: self.params.get(k, "") for k in param_keys})
        out.update({k: self.metrics.get(k) for k in metric_keys})
        out.update({k: self.tags.get(LINEAGE_PREFIX + k, "")[:12] for k in lineage_keys})
        return out


class ModelRegistry:
    """An MLflow tracking store + Model Registry in ``root`` (SQLite + local artifacts)."""

    def __init__(self, root: str | os.PathLike, experiment: str = "llmtech",
                 model_name: str = "llmtech-model"):
        silence_outbound()
        self.root = Path(root).resolve()
        self.db = check_backend(self.root)
        self.uri = f"sqlite:///{self.db}"
        self.artifact_root = (self.root / "artifacts").as_uri()
        self.model_name = model_name
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        with self._errors("open"):
            exp = self.client.get_experiment_by_name(experiment)
            self.experiment_id = (exp.experiment_id if exp is not None else
                                  self.client.create_experiment(experiment, self.artifact_root))

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """MLflow / SQLAlchemy failures -> LlmtechError naming the store file."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except LlmtechError:
            raise
        except (MlflowException, sqlite3.DatabaseError) as e:
            raise DataError(f"{self.db}: MLflow store failed to {what}: {str(e)[:300]}") from None
        except Exception as e:  # SQLAlchemy's errors (sqlalchemy is MLflow's dependency)
            if type(e).__module__.startswith("sqlalchemy"):
                raise DataError(f"{self.db}: MLflow store failed to {what}: {str(e)[:300]}") from None
            raise

    # ---- runs

    def log_run(self, name: str, params: dict[str, Any], metrics: dict[str, float],
                history: Iterable[dict[str, Any]] = (), tags: dict[str, str] | None = None,
                artifacts: dict[str, str | os.PathLike] | None = None) -> str:
        """One finished run: params, final metrics, per-step metrics (``history`` rows with a
        ``step`` key and numeric values), tags and artifacts (``{artifact_path: file or folder}``).
        Returns the run id."""
        from mlflow.entities import Metric, Param

        with self._errors("log a run"):
            run = self.client.create_run(self.experiment_id, run_name=name, tags=tags or {})
            rid = run.info.run_id
            ts = run.info.start_time
            ps = [Param(k, str(v)[:6000]) for k, v in params.items()]
            ms = [Metric(k, float(v), ts, 0) for k, v in metrics.items() if _finite(v)]
            for row in history:
                step = int(row["step"])
                ms += [Metric(k, float(v), ts, step) for k, v in row.items()
                       if k != "step" and _finite(v)]
            for i in range(0, len(ps), 100):  # MLflow's per-batch limits
                self.client.log_batch(rid, params=ps[i:i + 100])
            for i in range(0, len(ms), 1000):
                self.client.log_batch(rid, metrics=ms[i:i + 1000])
            for dest, src in (artifacts or {}).items():
                src = Path(src)
                if src.is_dir():
                    self.client.log_artifacts(rid, str(src), artifact_path=dest)
                elif src.is_file():
                    self.client.log_artifact(rid, str(src), artifact_path=dest or None)
                else:
                    raise DataError(f"{src}: artifact to log does not exist")
            self.client.set_terminated(rid)
        return rid

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        with self._errors("read metrics"):
            return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]

    # ---- registry

    def register(self, run_id: str, artifact_path: str, tags: dict[str, str] | None = None,
                 description: str | None = None) -> str:
        """A new version of the registered model from ``runs:/<run_id>/<artifact_path>``."""
        from mlflow.exceptions import MlflowException

        with self._errors("register a version"):
            try:
                self.client.get_registered_model(self.model_name)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                self.client.create_registered_model(self.model_name)
            mv = self.client.create_model_version(self.model_name, f"runs:/{run_id}/{artifact_path}",
                                                  run_id=run_id, tags=tags or {},
                                                  description=description)
        return str(mv.version)

    def alias(self, alias: str) -> str | None:
        """Version that holds ``alias``, or None (also before the model's first version)."""
        from mlflow.exceptions import MlflowException

        with self._errors("read an alias"):
            try:
                rm = self.client.get_registered_model(self.model_name)
            except MlflowException as e:
                if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return None
                raise
            v = (rm.aliases or {}).get(alias)
            return None if v is None else str(v)

    def set_alias(self, alias: str, version: str) -> None:
        with self._errors("set an alias"):
            self.client.set_registered_model_alias(self.model_name, alias, str(version))

    def delete_alias(self, alias: str) -> None:
        with self._errors("delete an alias"):
            self.client.delete_registered_model_alias(self.model_name, alias)

    def tag_version(self, version: str, tags: dict[str, str]) -> None:
        with self._errors("tag a version"):
            for k, v in tags.items():
                self.client.set_model_version_tag(self.model_name, str(version), k, str(v))

    def version(self, version: str) -> VersionInfo:
        with self._errors("read a version"):
            mv = self.client.get_model_version(self.model_name, str(version))
            run = self.client.get_run(mv.run_id)
        return VersionInfo(str(mv.version), mv.run_id, list(mv.aliases or []), dict(run.data.params),
                           dict(run.data.metrics), {**run.data.tags, **(mv.tags or {})}, mv.source)

    def versions(self) -> list[VersionInfo]:
        """Every version of the registered model, oldest first ([] before the first one)."""
        with self._errors("list versions"):
            found = self.client.search_model_versions(f"name = '{self.model_name}'")
        return [self.version(v) for v in sorted((int(m.version) for m in found))]

    def download(self, version: str, dest: str | os.PathLike) -> Path:
        """Copy a version's files (e.g. the adapter folder) out of the store."""
        from mlflow.artifacts import download_artifacts

        info = self.version(version)
        with self._errors("download a version"):
            return Path(download_artifacts(artifact_uri=info.source, dst_path=str(dest),
                                           tracking_uri=self.uri))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --------------------------------------------------------------------------- promotion rule

@dataclass
class Decision:
    """What the promotion rule decided for one challenger."""

    version: str
    promoted: bool
    metric: str
    challenger_value: float
    champion_version: str | None
    champion_value: float | None
    margin: float
    improvement: float | None  # champion - challenger (lower is better), or the reverse
    reason: str
    champion_after: str


def should_promote(challenger: float, champion: float | None, margin: float,
                   lower_is_better: bool = True) -> tuple[bool, float | None]:
    """(promote?, improvement). With no champion, any finite challenger is promoted; otherwise
    the improvement must be at least ``margin`` (a non-finite challenger never wins)."""
    if margin < 0:
        raise ConfigError(f"margin must be >= 0, got {margin}")
    if not _finite(challenger):
        return False, None
    if champion is None:
        return True, None
    gain = (champion - challenger) if lower_is_better else (challenger - champion)
    return gain >= margin, gain


def promote(reg: ModelRegistry, version: str, metric: str, margin: float,
            lower_is_better: bool = True) -> Decision:
    """Make ``version`` the challenger and apply the rule; moves ``champion`` when it wins and
    writes ``promotion`` / ``promotion_reason`` tags on the version."""
    version = str(version)
    info = reg.version(version)
    if metric not in info.metrics:
        raise DataError(f"version {version} of {reg.model_name} has no metric '{metric}' "
                        f"(it has: {', '.join(sorted(info.metrics)) or 'none'})")
    value = info.metrics[metric]
    champ = reg.alias(CHAMPION)
    champ_value = reg.version(champ).metrics.get(metric) if champ else None
    reg.set_alias(CHALLENGER, version)
    ok, gain = should_promote(value, champ_value, margin, lower_is_better)
    better = "更低" if lower_is_better else "更高"
    if champ is None:
        reason = f"尚无 champion：v{version}（{metric}={value:.4f}）直接成为 champion"
    elif ok:
        reason = (f"v{version} 的 {metric}={value:.4f} 比 champion v{champ} 的 {champ_value:.4f} "
                  f"{better} {gain:.4f} ≥ 门槛 {margin}：晋升")
    elif gain is None:
        reason = f"v{version} 的 {metric} 不是有限数：拒绝"
    else:
        reason = (f"v{version} 的 {metric}={value:.4f} 相对 champion v{champ} 的 {champ_value:.4f} "
                  f"只改善 {gain:.4f} < 门槛 {margin}：拒绝，champion 保持 v{champ}")
    if ok:
        reg.set_alias(CHAMPION, version)
        reg.delete_alias(CHALLENGER)  # the challenger is the champion now
    reg.tag_version(version, {"promotion": "promoted" if ok else "refused",
                              "promotion_reason": reason})
    log.info(reason)
    return Decision(version, ok, metric, value, champ, champ_value, margin, gain, reason,
                    version if ok else champ)


# --------------------------------------------------------------------------- W&B offline

@dataclass
class WandbOfflineRun:
    run_id: str
    run_dir: Path  # .../wandb/offline-run-<time>-<id>
    run_file: Path  # run_dir/run-<id>.wandb
    sync_command: str


def wandb_env(root: str | os.PathLike) -> dict[str, str]:
    """W&B settings that put every W&B folder (runs, cache, config, staged artifacts) in
    ``root`` and keep it offline."""
    root = Path(root).resolve()
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(root),
            "WANDB_CACHE_DIR": str(root / ".cache"), "WANDB_CONFIG_DIR": str(root / ".config"),
            "WANDB_DATA_DIR": str(root / ".data"), "WANDB_ARTIFACT_DIR": str(root / ".artifacts"),
            "DO_NOT_TRACK": "1"}


def log_wandb_offline(root: str | os.PathLike, project: str, name: str, config: dict[str, Any],
                      history: Iterable[dict[str, Any]] = (), summary: dict[str, Any] | None = None,
                      artifact_dir: str | os.PathLike | None = None, artifact_name: str = "model",
                      artifact_type: str = "model", artifact_metadata: dict | None = None,
                      tags: Iterable[str] = ()) -> WandbOfflineRun:
    """Log one finished run to W&B in offline mode under ``root``: config, per-step metrics
    (``history`` rows with a ``step`` key), summary metrics and an artifact (a folder)."""
    silence_outbound()
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    import wandb

    settings = wandb.Settings(mode="offline", x_disable_stats=True, x_disable_meta=True,
                              console="off", save_code=False, silent=True)
    with _env(wandb_env(root)):  # W&B reads these while the run is open; restored afterwards
        run = wandb.init(project=project, name=name, dir=str(root), config=config,
                         tags=list(tags), settings=settings, reinit="finish_previous")
        try:
            for row in history:
                vals = {k: v for k, v in row.items() if k != "step" and _finite(v)}
                if vals:
                    run.log(vals, step=int(row["step"]))
            for k, v in (summary or {}).items():
                run.summary[k] = v
            if artifact_dir is not None:
                art = wandb.Artifact(artifact_name, type=artifact_type,
                                     metadata=artifact_metadata or {})
                art.add_dir(str(artifact_dir))
                run.log_artifact(art)
            run_dir = Path(run.dir).parent
            rid = run.id
        finally:
            run.finish()
    return WandbOfflineRun(rid, run_dir, run_dir / f"run-{rid}.wandb", f"wandb sync {run_dir}")


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_BLOCK = 32 * 1024
_HEADER = 7  # ":W&B" + 2-byte magic + 1-byte version; each record: crc32c(4) len(2) type(1)


def _wandb_chunks(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    if len(data) < _HEADER or data[:4] != b":W&B":
        raise DataError(f"{path}: not a W&B run file (missing the ':W&B' header)")
    pos, pending = _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding to the end of a block
            pos += left
            continue
        if pos + 7 + length > len(data):
            raise DataError(f"{path}: record at byte {pos} runs past the end of the file (truncated)")
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # full
            yield chunk
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            yield pending + chunk
            pending = b""
        else:
            raise DataError(f"{path}: unknown record type {kind} at byte {pos - 7 - length}")


def read_wandb_offline(run_file: str | os.PathLike) -> dict[str, Any]:
    """What an offline ``run-<id>.wandb`` file holds: run id, project, config, per-step history,
    summary and logged artifacts (name, type, file names)."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(run_file)
    out: dict[str, Any] = {"run_id": None, "project": None, "config": {}, "history": [],
                           "summary": {}, "artifacts": []}

    def value(item) -> Any:
        key = ".".join(item.nested_key) if item.nested_key else item.key
        return key, json.loads(item.value_json) if item.value_json else None

    for i, chunk in enumerate(_wandb_chunks(path)):
        rec = pb.Record()
        try:
            rec.ParseFromString(chunk)
        except DecodeError:
            raise DataError(f"{path}: record {i} is not a W&B record (corrupt file)") from None
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run_id"], out["project"] = rec.run.run_id, rec.run.project
            out["config"].update(dict(value(x) for x in rec.run.config.update))
        elif kind == "config":
            out["config"].update(dict(value(x) for x in rec.config.update))
        elif kind == "history":
            out["history"].append(dict(value(x) for x in rec.history.item))
        elif kind == "summary":
            out["summary"].update(dict(value(x) for x in rec.summary.update))
        elif kind == "artifact":
            files = [e.path for e in rec.artifact.manifest.contents]
            out["artifacts"].append({"name": rec.artifact.name, "type": rec.artifact.type,
                                     "files": sorted(files)})
    out["config"] = {k: v.get("value", v) if isinstance(v, dict) else v
                     for k, v in out["config"].items() if k != "_wandb"}
    return out


def wandb_sync_dry_run(run_dir: str | os.PathLike, root: str | os.PathLike) -> str:
    """``wandb sync --dry-run RUN_DIR``: what ``wandb sync`` would upload (nothing is sent)."""
    exe = Path(sys.executable).with_name("wandb")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "wandb"]
    env = {**os.environ, **wandb_env(root)}
    r = subprocess.run([*cmd, "sync", "--dry-run", str(run_dir)], capture_output=True, text=True,
                       timeout=120, env=env)
    text = (r.stdout + r.stderr).strip()
    if r.returncode != 0:
        raise LlmtechError(f"wandb sync --dry-run {run_dir} failed: {text[-500:]}")
    return text


__all__ = ["ModelRegistry", "VersionInfo", "Decision", "WandbOfflineRun", "check_backend",
           "promote", "should_promote", "lineage", "file_sha256", "tree_sha256", "config_sha256",
           "dataset_sha256", "git_commit", "log_wandb_offline", "read_wandb_offline",
           "wandb_sync_dry_run", "wandb_env", "silence_outbound", "CHAMPION", "CHALLENGER",
           "LINEAGE_PREFIX"]
