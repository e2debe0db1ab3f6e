"""Inference ladder on the bundled model: fp32 -> bf16 -> int8 (transformers) -> GGUF Q4_1
(llama.cpp) greedy decode tokens/s in one run, ratios vs fp32 side by side, and every rung's
tokens/s against its memory-bandwidth bound. Target: GGUF >= 100 tokens/s.

Why a bandwidth bound: decoding one token at batch 1 reads every weight once, so
tokens/s <= memory bandwidth / model bytes. Bandwidth is measured here with a numpy copy of a
buffer far larger than the caches, one slice per thread (as many threads as the models use),
and quoted the way memcpy benchmarks quote it: bytes copied per second (each byte is read once
and written once; a read-only stream such as decoding can go a little faster, so the bound is
approximate, not a hard ceiling). It is measured before and after the ladder and the higher value
is used (other processes on the machine lower it; the higher bound is the stricter one).

    .venv/bin/python bench/inference_ladder.py [--prompts 3] [--tokens 64] [--model smollm2-135m]

When llama-cpp-python is not installed (it is the optional extra `make gguf`), the GGUF rung says
so, the rest is reported, and `pass` is null.
"""

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from common import save

from llmtech.compress import quantize as q
from llmtech.evals import speed

TARGET = 100.0  # GGUF decode tokens/s


def copy_bandwidth(mib: int = 512, repeats: int = 5, threads: int | None = None) -> float:
    """Best-of-``repeats`` bytes copied per second with ``threads`` threads (numpy releases the
    GIL while copying), over a ``mib`` MiB buffer."""
    threads = threads or speed.threads()
    src = np.ones(mib * 1024 * 1024 // 8)
    dst = np.empty_like(src)
    bounds = np.linspace(0, len(src), threads + 1).astype(int)
    parts = [(dst[a:b], src[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats + 1):  # the first pass faults the pages in
            t0 = time.perf_counter()
            list(pool.map(lambda p: np.copyto(*p), parts))
            best = min(best, time.perf_counter() - t0)
    return src.nbytes / best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    a = ap.parse_args()
    prompts = speed.DEFAULT_PROMPTS[: a.prompts]
    bw_before = copy_bandwidth()
    print(f"memory copy bandwidth: {bw_before / 1e9:.1f} GB/s ({speed.threads()} threads)")
    speed.warm_runtime()
    ok, status = q.gguf_status(a.model)
    out = {"model": a.model, "threads": speed.threads(), "prompts": len(prompts),
           "max_new_tokens": a.tokens, "gguf_status": status}
    rungs = {}
    for name in q.VARIANTS:
        if name == "gguf" and not ok:
            print(f"{name:5} skipped: {status}")
            continue
        speed.release_memory()
        dep = q.build_variant(name, a.model)
        r = speed.measure_generation(dep.model, dep.tokenizer, prompts, a.tokens, warmup=a.warmup)
        rungs[name] = (r, dep.nbytes())
        dep.close()
        del dep
    bw = max(bw_before, copy_bandwidth())
    out.update(copy_bandwidth_gb_s=round(bw / 1e9, 2),
               copy_bandwidth_before_gb_s=round(bw_before / 1e9, 2))
    for name, (r, nbytes) in rungs.items():
        bound = bw / nbytes
        out.update({f"{name}_tokens_per_s": round(r.decode_tokens_per_s, 2),
                    f"{name}_first_token_ms": round(r.first_token_ms, 1),
                    f"{name}_model_mb": round(nbytes / speed.MB, 1),
                    f"{name}_bound_tokens_per_s": round(bound, 1),
                    f"{name}_of_bound": round(r.decode_tokens_per_s / bound, 3),
                    f"{name}_other_cpu_pct": round(r.other_cpu_pct, 1)})
    base = out["fp32_tokens_per_s"]
    print(f"\nbandwidth used for the bounds: {bw / 1e9:.1f} GB/s")
    print(f"\n{'rung':6} {'tok/s':>8} {'x fp32':>7} {'MB':>7} {'bound':>7} {'of bound':>9} "
          f"{'other CPU%':>10}")
    for name in q.VARIANTS:
        if f"{name}_tokens_per_s" not in out:
            print(f"{name:6} {'n/a':>8}  ({status})")
            continue
        out[f"{name}_ratio"] = round(out[f"{name}_tokens_per_s"] / base, 3)
        print(f"{name:6} {out[f'{name}_tokens_per_s']:8.1f} {out[f'{name}_ratio']:6.2f}x "
              f"{out[f'{name}_model_mb']:7.1f} {out[f'{name}_bound_tokens_per_s']:7.0f} "
              f"{out[f'{name}_of_bound']:9.0%} {out[f'{name}_other_cpu_pct']:10.0f}")
    gguf = out.get("gguf_tokens_per_s")
    out["pass"] = None if gguf is None else gguf >= TARGET
    print(f"\nGGUF target >= {TARGET:.0f} tokens/s: "
          + ("not measured (" + status + ")" if gguf is None else
             f"{gguf:.1f} -> {'PASS' if out['pass'] else 'FAIL'}"))
    save("inference_ladder", out)


if __name__ == "__main__":
    main()
