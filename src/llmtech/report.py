"""Gather every lab's metrics.json into one course report (Markdown table + PNG plots)."""

from __future__ import annotations

import logging
from pathlib import Path

from .io import atomic_savefig, atomic_write_text
from .labs import LABS, load_metrics, markdown_table

log = logging.getLogger(__name__)


def collect(runs: Path) -> list[dict]:
    rows = []
    for lab in LABS:
        m = load_metrics(runs / lab.id)
        if m is None:
            continue
        rows.append(m)
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def build_report(runs: Path | str = "runs") -> Path:
    runs = Path(runs)
    runs.mkdir(parents=True, exist_ok=True)
    rows = collect(runs)
    done = {r["lab"] for r in rows}
    table = []
    for lab in LABS:
        m = next((r for r in rows if r.get("lab") == lab.id), None)
        if m is None:
            table.append({"lab": lab.id, "title": lab.title,
                          "mode": "—", "headline results": "not built yet" if not lab.built else "not run",
                          "time (s)": ""})
            continue
        heads = [h for h in str(m.get("headline", "")).split(",") if h]
        table.append({"lab": lab.id, "title": lab.title, "mode": "quick" if m.get("quick") else "full",
                      "headline results": "; ".join(f"{h} = {_fmt(m.get(h))}" for h in heads),
                      "time (s)": _fmt(m.get("wall_time_s", ""))})
    md = ["# llmtech 课程实验结果汇总 (Results)\n",
          f"已运行 {len(done)} / {len(LABS)} 个实验。每行的数字来自该实验输出目录中的 metrics.json。\n",
          markdown_table(table)]
    plot = _plot(rows, runs)
    if plot:
        md.append(f"\n![headline metrics]({plot.name})\n")
    path = runs / "REPORT.md"
    atomic_write_text(path, "\n".join(md))
    return path


def _plot(rows: list[dict], runs: Path) -> Path | None:
    """One small bar chart per lab of its numeric headline metrics."""
    numeric = []
    for m in rows:
        heads = [h for h in str(m.get("headline", "")).split(",") if h]
        vals = [(h, m[h]) for h in heads if isinstance(m.get(h), (int, float)) and not isinstance(m.get(h), bool)]
        if vals:
            numeric.append((m["lab"], vals))
    if not numeric:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(numeric)
    cols = min(3, n)
    rows_n = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.2 * rows_n), squeeze=False)
    for ax, (lab_id, vals) in zip(axes.flat, numeric):
        ax.bar(range(len(vals)), [v for _, v in vals], color="#4C72B0")
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels([h for h, _ in vals], rotation=30, ha="right", fontsize=7)
        ax.set_title(lab_id, fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return atomic_savefig(fig, runs / "report_headlines.png")
