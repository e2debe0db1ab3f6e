"""Packaging a training run for the Hugging Face Hub: repo ids, model cards, accelerate configs,
a hardware/cost plan for Hub GPU flavors, and ``push_folder`` (upload, or a local copy offline).

Upload decision (``decide_upload``)
===================================

An upload is attempted only when all of these hold, checked in this order (the first one that
fails is the reason reported):

1. ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` is not set (huggingface_hub refuses every HTTP
   request in offline mode anyway);
2. a token is available (argument, ``HF_TOKEN`` or the token ``hf auth login`` stored);
3. ``HfApi.whoami`` answers with that token (network reachable, token accepted).

Otherwise ``push_folder`` copies exactly the folder it would have uploaded to
``<out>/hub_upload/<repo_id>/`` and says why nothing was uploaded. Online it calls
``HfApi.create_repo(exist_ok=True)`` and ``HfApi.upload_folder``.

Hardware plan (``hardware_plan``)
=================================

Memory per GPU comes from ``llmtech.dist.memory.estimate`` (LoRA, bf16 base weights): a DPO step
runs the policy on the chosen and the rejected answer of each pair, i.e. on ``2 × batch``
sequences; the reference forward pass (adapter off, no gradients) finishes and is freed before the
policy's, so it does not raise the peak. Step time is an estimate: FLOPs per step
(``dpo_step_flops``: policy forward 2N + backward 2N — frozen weights need only the activation
gradients — plus the reference forward 2N, per token) divided by the GPU's dense bf16 peak times an
assumed model-FLOPs utilisation. Prices come from ``HfApi.list_jobs_hardware`` when online and from
``FALLBACK_USD_PER_HOUR`` (a dated reference list, marked as such) offline.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import ConfigError, LlmtechError
from ..io import atomic_write_text, staged_dir

log = logging.getLogger(__name__)


class HubError(LlmtechError):
    """Creating a repo or uploading to the Hub failed (the message names the repo)."""


# --------------------------------------------------------------------------- repo ids

def check_repo_id(repo_id: str, what: str = "repo_id") -> str:
    """``repo_id`` if huggingface_hub accepts it ('name' or 'namespace/name'), else ConfigError."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(f"config key '{what}': {repo_id!r} is not a valid Hugging Face repo id "
                          f"({e})") from None
    if not repo_id:
        raise ConfigError(f"config key '{what}': empty repo id")
    return repo_id


def full_repo_id(repo_id: str, user: str | None) -> str:
    """'name' -> 'user/name' when the user is known; ids with a namespace are kept."""
    return repo_id if "/" in repo_id or not user else f"{user}/{repo_id}"


# --------------------------------------------------------------------------- upload decision

def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline(env: dict | None = None) -> bool:
    """True when the environment puts huggingface_hub in offline mode."""
    from huggingface_hub import constants

    env = os.environ if env is None else env
    return (_truthy(env.get("HF_HUB_OFFLINE")) or _truthy(env.get("TRANSFORMERS_OFFLINE"))
            or (env is os.environ and constants.is_offline_mode()))


@dataclass
class UploadDecision:
    online: bool
    reason: str  # why (not) online, shown in reports
    user: str | None = None
    token: str | None = None

    def __repr__(self) -> str:  # never print the token
        return f"UploadDecision(online={self.online}, reason={self.reason!r}, user={self.user!r})"


def decide_upload(token: str | None = None, offline: bool | None = None,
                  probe: Callable[[str], dict] | None = None,
                  endpoint: str | None = None) -> UploadDecision:
    """Whether ``push_folder`` uploads (see the module docstring for the three checks).

    ``probe(token) -> whoami dict`` defaults to ``HfApi(endpoint).whoami``; its exceptions mean
    "no network" (or "token rejected" for HTTP 401/403).
    """
    if offline is None:
        offline = hub_offline()
    if offline:
        return UploadDecision(False, "离线模式：设置了 HF_HUB_OFFLINE=1（或 TRANSFORMERS_OFFLINE=1），"
                                     "huggingface_hub 不发任何网络请求")
    if token is None:
        from huggingface_hub import get_token

        token = get_token()
    if not token:
        return UploadDecision(False, "没有 Hugging Face token：先 `hf auth login` 或设置环境变量 HF_TOKEN")
    if probe is None:
        from huggingface_hub import HfApi

        def probe(tok):
            return HfApi(endpoint=endpoint, token=tok).whoami()
    try:
        who = probe(token)
    except Exception as e:  # network down, DNS, proxy, HTTP errors
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return UploadDecision(False, f"token 被 Hub 拒绝（HTTP {status}）：检查 HF_TOKEN 的权限（需要 write）")
        return UploadDecision(False, f"连不上 Hugging Face Hub（{type(e).__name__}: {str(e)[:160]}）")
    user = (who or {}).get("name")
    return UploadDecision(True, f"已联网，token 属于 {user}", user=user, token=token)


# --------------------------------------------------------------------------- folders + upload

def list_files(folder: str | Path) -> list[dict[str, Any]]:
    """Every file under ``folder``: relative path and size in bytes, sorted by path."""
    folder = Path(folder)
    return [{"path": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file()]


def push_folder(folder: str | Path, repo_id: str, decision: UploadDecision, out_dir: str | Path,
                repo_type: str = "model", private: bool = True,
                commit_message: str = "Upload from llmtech", api=None) -> dict[str, Any]:
    """Upload ``folder`` to ``repo_id`` when ``decision.online``; otherwise copy it to
    ``out_dir/hub_upload/<repo_id>/`` (exactly the files an upload would send).

    Returns ``uploaded``, ``reason``, ``repo_id``, ``files`` (path + bytes), ``total_bytes`` and
    ``url`` (online) or ``local_dir`` (offline).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LlmtechError(f"{folder}: folder to upload not found")
    check_repo_id(repo_id)
    files = list_files(folder)
    result: dict[str, Any] = {"repo_id": repo_id, "repo_type": repo_type, "files": files,
                              "total_bytes": sum(f["bytes"] for f in files)}
    if decision.online:
        from huggingface_hub import HfApi

        api = api or HfApi(token=decision.token)
        full = full_repo_id(repo_id, decision.user)
        try:
            url = api.create_repo(full, repo_type=repo_type, private=private, exist_ok=True)
            commit = api.upload_folder(repo_id=url.repo_id, repo_type=repo_type, folder_path=str(folder),
                                       commit_message=commit_message)
        except Exception as e:
            raise HubError(f"upload of {folder} to {repo_type} repo '{full}' failed: "
                           f"{type(e).__name__}: {e}") from None
        result.update(uploaded=True, reason=decision.reason, repo_id=url.repo_id, url=str(url),
                      commit_url=getattr(commit, "commit_url", str(commit)))
        log.info("uploaded %d files to %s", len(files), url)
        return result
    dest = Path(out_dir) / "hub_upload" / repo_id
    dest.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(dest) as tmp:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
    result.update(uploaded=False, local_dir=str(dest),
                  reason=f"没有上传：{decision.reason}。要上传的文件原样放在 {dest}")
    return result


# --------------------------------------------------------------------------- cards

def build_model_card(*, model_name: str, base_model: str | None, datasets: list[str],
                     license: str, metrics: dict[str, tuple[str, str, float]],
                     dataset_name: str, body: str, tags: Iterable[str] = ("dpo", "trl", "lora"),
                     language: list[str] | None = None):
    """A ``huggingface_hub.ModelCard`` for a PEFT adapter; ``metrics`` maps a metric id to
    ``(metric_type, pretty name, value)`` and becomes the card's model-index."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    evals = [EvalResult(task_type="text-generation", task_name="Preference alignment (DPO)",
                        dataset_type=datasets[0], dataset_name=dataset_name, dataset_split="test",
                        metric_type=mtype, metric_name=name, metric_value=round(float(value), 6))
             for mtype, name, value in metrics.values()]
    data = ModelCardData(base_model=base_model, library_name="peft", license=license,
                         datasets=list(datasets), tags=list(dict.fromkeys(tags)), language=language,
                         pipeline_tag="text-generation", model_name=model_name, eval_results=evals)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n")


def build_dataset_card(*, license: str, body: str, language: list[str] | None = None,
                       tags: Iterable[str] = ("dpo", "preference")):
    from huggingface_hub import DatasetCard, DatasetCardData

    data = DatasetCardData(license=license, language=language, tags=list(tags),
                           task_categories=["text-generation"], size_categories=["n<1K"])
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n")


def write_card(card, folder: str | Path) -> Path:
    """Write a card as ``folder/README.md`` (atomic); it replaces any card already there."""
    return atomic_write_text(Path(folder) / "README.md", str(card))


def hub_model_id(model: str) -> str | None:
    """The Hub id of a registry model or ``hf:``/``ms:`` id (None for local or test models)."""
    from .. import models

    known = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    if model in known:
        return known[model]
    spec = models.REGISTRY.get(model)
    src = spec.source if spec else model
    for prefix in ("hf:", "ms:"):
        if src.startswith(prefix):
            return src[len(prefix):]
    return None


# --------------------------------------------------------------------------- accelerate config

def accelerate_config(num_gpus: int = 1, mixed_precision: str = "bf16"):
    """An ``accelerate`` ClusterConfig for one machine with ``num_gpus`` GPUs (DDP when > 1)."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import ComputeEnvironment, DistributedType

    if num_gpus < 1:
        raise ConfigError(f"num_gpus must be >= 1, got {num_gpus}")
    if mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"mixed_precision must be no / fp16 / bf16, got {mixed_precision!r}")
    return ClusterConfig(
        compute_environment=ComputeEnvironment.LOCAL_MACHINE,
        distributed_type=DistributedType.MULTI_GPU if num_gpus > 1 else DistributedType.NO,
        mixed_precision=mixed_precision, use_cpu=False, debug=False, num_processes=num_gpus,
        num_machines=1, machine_rank=0, gpu_ids="all", rdzv_backend="static", same_network=True,
        main_training_function="main", enable_cpu_affinity=False, downcast_bf16=False)


def write_accelerate_config(cfg, path: str | Path, header: str = "") -> Path:
    """Write an accelerate config as YAML (atomic), with an optional comment header."""
    import yaml

    text = yaml.safe_dump(cfg.to_dict(), sort_keys=True)
    if header:
        text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + text
    return atomic_write_text(path, text)


def load_accelerate_config(path: str | Path):
    """Load a config file the way ``accelerate launch --config_file`` does; ConfigError if it
    would be refused."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: accelerate config file not found")
    try:
        return load_config_from_file(str(path))
    except Exception as e:  # unknown keys (ValueError), bad enum values, bad YAML
        raise ConfigError(f"{path}: accelerate refuses this config: {type(e).__name__}: {e}") from None


# --------------------------------------------------------------------------- hardware plan

@dataclass(frozen=True)
class GpuFlavor:
    flavor: str  # huggingface_hub JobHardware / SpaceHardware value
    gpu: str
    count: int
    memory_gb: float  # per GPU
    peak_tflops: float  # dense bf16 (T4: fp16) tensor-core peak per GPU, from the vendor datasheet
    bf16: bool = True


# Vendor datasheet numbers (dense, no sparsity). A10G: AWS's variant of the A10, datasheet of the A10.
FLAVORS: dict[str, GpuFlavor] = {f.flavor: f for f in [
    GpuFlavor("t4-small", "T4", 1, 16, 65, bf16=False),
    GpuFlavor("l4x1", "L4", 1, 24, 121),
    GpuFlavor("a10g-small", "A10G", 1, 24, 125),
    GpuFlavor("l40sx1", "L40S", 1, 48, 362),
    GpuFlavor("a100-large", "A100 80GB", 1, 80, 312),
    GpuFlavor("a100x4", "A100 80GB", 4, 80, 312),
    GpuFlavor("h200", "H200", 1, 141, 989),
]}
# Offline reference prices (USD per hour, Hugging Face Jobs/Spaces price list as the author knew it
# in 2025; online, ``job_prices`` reads the live list instead). Treat as an assumption.
FALLBACK_USD_PER_HOUR = {"t4-small": 0.40, "l4x1": 0.80, "a10g-small": 1.00, "l40sx1": 1.80,
                         "a100-large": 2.50, "a100x4": 10.00, "h200": 5.00}


def check_flavors(flavors: Iterable[str]) -> list[str]:
    """The flavors, checked against huggingface_hub's JobHardware list and this module's specs."""
    from huggingface_hub import JobHardware

    known = {h.value for h in JobHardware}
    out = []
    for f in flavors:
        if f not in known:
            raise ConfigError(f"config key 'flavors': unknown Hugging Face hardware flavor {f!r}; "
                              f"huggingface_hub knows: {', '.join(sorted(known))}")
        if f not in FLAVORS:
            raise ConfigError(f"config key 'flavors': no GPU spec for {f!r} in llmtech.track.hub.FLAVORS "
                              f"(known: {', '.join(FLAVORS)})")
        out.append(f)
    return out


def job_prices(decision: UploadDecision, flavors: Iterable[str]) -> dict[str, tuple[float | None, str]]:
    """USD per hour per flavor and where it came from (live list online, fallback offline)."""
    flavors = list(flavors)
    if decision.online:
        try:
            from huggingface_hub import HfApi

            live = {h.name: h for h in HfApi(token=decision.token).list_jobs_hardware()}
            per = {"minute": 60, "hour": 1, "second": 3600}
            return {f: ((live[f].unit_cost_usd * per.get(live[f].unit_label, 60), "HfApi.list_jobs_hardware")
                        if f in live else (FALLBACK_USD_PER_HOUR.get(f), "参考价（在线列表里没有）"))
                    for f in flavors}
        except Exception as e:  # keep the plan even if the price list fails
            log.warning("list_jobs_hardware failed (%s): using reference prices", e)
    return {f: (FALLBACK_USD_PER_HOUR.get(f), "离线参考价（2025，以 hf.co/pricing 为准）") for f in flavors}


def dpo_step_flops(params: int, tokens_per_step: float) -> float:
    """FLOPs of one LoRA-DPO step: (policy fwd 2N + bwd 2N + reference fwd 2N) per token."""
    return 6.0 * params * tokens_per_step


def cpu_matmul_gflops(n: int = 1024, reps: int = 8) -> float:
    """Measured fp32 matmul throughput of this machine (GFLOP/s), the CPU's practical peak."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def _sig(x: float, digits: int = 3) -> float:
    return float(f"{x:.{digits}g}")


def hardware_plan(models: Iterable[str], flavors: Iterable[str], batch: int, seq_len: int,
                  tokens_per_step: float, mfu: float, prices: dict[str, tuple[float | None, str]],
                  headroom: float = 0.9) -> list[dict[str, Any]]:
    """One row per (model, flavor): estimated peak memory per GPU (LoRA DPO, bf16), whether it
    fits, estimated step time at ``mfu`` of the GPU's peak, and cost per 1000 steps."""
    from ..dist.memory import GB, estimate, model_shape

    rows = []
    for m in models:
        shape = model_shape(m)
        for f in flavors:
            g = FLAVORS[f]
            # data parallel: each GPU runs the full micro-batch; memory per GPU is the same
            est = estimate(shape, "lora", batch=2 * batch, seq_len=seq_len, device="cuda",
                           weight_dtype="bf16" if g.bf16 else "fp16",
                           activation_dtype="bf16" if g.bf16 else "fp16")
            fits = est.total <= g.memory_gb * GB * headroom
            step_s = dpo_step_flops(shape.params, tokens_per_step) / (g.peak_tflops * 1e12 * mfu)
            usd, _ = prices.get(f, (None, ""))
            rows.append({"model": shape.name, "flavor": f, "gpu": f"{g.count}×{g.gpu}",
                         "gpu_mem_gb": g.memory_gb, "est_mem_gb": round(est.total / GB, 2),
                         "fits": fits, "est_step_s": _sig(step_s / g.count), "usd_per_hour": usd,
                         "est_usd_per_1k_steps": (_sig(usd * step_s / g.count * 1000 / 3600)
                                                  if usd is not None else None)})
    return rows
