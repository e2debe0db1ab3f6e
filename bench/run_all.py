"""Run every benchmark one after another and print their ratios side by side (make bench)."""

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "runs" / "bench"
BENCHES = ["sft_vs_plain_loop", "packing_vs_padding", "bf16_vs_fp32", "qlora_vs_lora", "inference_ladder",
           "rag_beir", "bm25_speed", "embed_throughput", "hybrid_latency", "serve_load"]


def main():
    failed = []
    for name in BENCHES:
        print(f"\n===== {name} =====", flush=True)
        if subprocess.call([sys.executable, str(HERE / f"{name}.py")]) != 0:
            failed.append(name)
    print("\n===== summary =====")
    for name in BENCHES:
        f = OUT / f"{name}.json"
        if f.exists():
            r = json.loads(f.read_text())
            ratios = {k: v for k, v in r.items() if "ratio" in k}
            print(f"{name:22} {ratios}  pass={r.get('pass', r.get('curves_agree'))}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
