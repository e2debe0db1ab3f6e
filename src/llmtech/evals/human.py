"""Human evaluation: rating sheets for raters (CSV + HTML) and inter-rater agreement.

``write_sheet`` writes one sheet per rater: every item with its prompt, the model's answer,
the reference answer and empty rating columns (one per ``Criterion``, plus a comment). Raters
fill the CSV (Excel or any editor; UTF-8 with BOM so Excel shows Chinese, GBK is read back
too); the HTML copy is for reading and printing. ``read_sheet`` reads a filled sheet back and
names the file, line and column of any missing or out-of-scale rating. ``agreement`` compares
two raters per criterion with Cohen's kappa (plain and quadratic-weighted) and raw agreement.
"""

from __future__ import annotations

import csv
import html
import io as _io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import DataError
from ..io import atomic_write_bytes, atomic_write_text, decode_bytes, existing_file


@dataclass(frozen=True)
class Criterion:
    name: str  # column name in the sheet
    label: str  # what raters see
    scale: tuple[int, ...] = (1, 2, 3, 4, 5)
    guide: str = ""


DEFAULT_CRITERIA: tuple[Criterion, ...] = (
    Criterion("correctness", "正确性", guide="与参考答案的事实是否一致：1 完全错误，3 部分正确，5 完全正确"),
    Criterion("helpfulness", "有用性", guide="是否回答了问题、能否直接帮到用户：1 没有帮助，5 非常有帮助"),
    Criterion("fluency", "流畅性", guide="语言是否通顺、无重复和乱码：1 难以阅读，5 自然流畅"),
)
ITEM_COLUMNS = ("id", "prompt", "answer", "reference")


def sheet_columns(criteria: Sequence[Criterion] = DEFAULT_CRITERIA) -> list[str]:
    return [*ITEM_COLUMNS, *(c.name for c in criteria), "comment"]


def _check_items(items: Sequence[dict]) -> None:
    if not items:
        raise DataError("a rating sheet needs at least one item")
    seen = set()
    for i, it in enumerate(items):
        miss = [k for k in ITEM_COLUMNS if k not in it]
        if miss:
            raise DataError(f"item {i}: missing key(s) {', '.join(miss)} (need {', '.join(ITEM_COLUMNS)})")
        if str(it["id"]) in seen:
            raise DataError(f"item {i}: duplicate id {it['id']!r}")
        seen.add(str(it["id"]))


def sheet_csv(rows: Iterable[dict], criteria: Sequence[Criterion] = DEFAULT_CRITERIA) -> str:
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=sheet_columns(criteria), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in sheet_columns(criteria)})
    return buf.getvalue()


def sheet_html(items: Sequence[dict], criteria: Sequence[Criterion] = DEFAULT_CRITERIA,
               title: str = "人工评估表", rater: str = "") -> str:
    """A self-contained page: instructions, the rubric, and one card per item with empty boxes."""
    e = html.escape
    rubric = "".join(f"<li><b>{e(c.label)}</b>（{e(c.name)}，{c.scale[0]}–{c.scale[-1]} 分）：{e(c.guide)}</li>"
                     for c in criteria)
    cards = []
    for it in items:
        boxes = "".join(f"<td>{e(c.label)}<br><span class='box'></span> / {c.scale[-1]}</td>" for c in criteria)
        cards.append(
            f"<section class='item' id='item-{e(str(it['id']))}'><h2>#{e(str(it['id']))}</h2>"
            f"<h3>问题</h3><pre>{e(str(it['prompt']))}</pre>"
            f"<h3>模型回答</h3><pre>{e(str(it['answer']))}</pre>"
            f"<h3>参考答案</h3><pre>{e(str(it['reference']))}</pre>"
            f"<table><tr>{boxes}<td>备注<br><span class='box wide'></span></td></tr></table></section>")
    who = f"<p>评分员：{e(rater)}</p>" if rater else "<p>评分员：__________</p>"
    return (
        "<!doctype html><html lang='zh-CN'><head><meta charset='utf-8'>"
        f"<title>{e(title)}</title><style>"
        "body{font-family:sans-serif;max-width:52em;margin:2em auto;line-height:1.5}"
        "pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em;margin:0}"
        ".item{border:1px solid #ccc;padding:0 1em 1em;margin:1em 0;page-break-inside:avoid}"
        "h3{font-size:1em;margin:.6em 0 .2em}td{padding:.3em 1em .3em 0;vertical-align:top}"
        ".box{display:inline-block;width:3em;height:1.4em;border:1px solid #888}.wide{width:14em}"
        f"</style></head><body><h1>{e(title)}</h1>{who}"
        f"<p>共 {len(items)} 条。请对照参考答案为每条模型回答打分（整数），在同名 CSV 文件的评分列中填写；"
        "不确定时写下备注。各评分员独立评分，不要互相讨论。</p>"
        f"<ul>{rubric}</ul>{''.join(cards)}</body></html>\n")


def write_sheet(items: Sequence[dict], out: str | Path, criteria: Sequence[Criterion] = DEFAULT_CRITERIA,
                rater: str = "", title: str = "人工评估表") -> dict[str, Path]:
    """Write ``out.csv`` (to fill in) and ``out.html`` (to read/print); returns both paths.

    ``items``: dicts with ``id, prompt, answer, reference``.
    """
    _check_items(items)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path = atomic_write_bytes(out.with_suffix(".csv"), sheet_csv(items, criteria).encode("utf-8-sig"))
    html_path = atomic_write_text(out.with_suffix(".html"), sheet_html(items, criteria, title, rater))
    return {"csv": csv_path, "html": html_path}


def read_sheet(path: str | Path, criteria: Sequence[Criterion] = DEFAULT_CRITERIA) -> dict[str, dict]:
    """A filled sheet as ``{item id: {criterion: int rating, "comment": str}}``; a missing column,
    an empty or out-of-scale rating, or a duplicate id is a DataError naming file and line."""
    path = existing_file(path, "rating sheet")
    text, _ = decode_bytes(path.read_bytes(), str(path))
    reader = csv.DictReader(_io.StringIO(text))
    need = ["id", *(c.name for c in criteria)]
    missing = [c for c in need if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}:1: missing column(s) {', '.join(missing)}")
    out: dict[str, dict] = {}
    for row in reader:
        line = reader.line_num
        key = (row.get("id") or "").strip()
        if not key:
            raise DataError(f"{path}:{line}: empty id")
        if key in out:
            raise DataError(f"{path}:{line}: duplicate id {key!r}")
        rec: dict = {"comment": (row.get("comment") or "").strip()}
        for c in criteria:
            raw = (row.get(c.name) or "").strip()
            if not raw:
                raise DataError(f"{path}:{line}: column '{c.name}' is not rated (item {key})")
            try:
                v = int(float(raw))
            except ValueError:
                v = None
            if v is None or v != float(raw) or v not in c.scale:
                raise DataError(f"{path}:{line}: column '{c.name}' = {raw!r} is not one of "
                                f"{', '.join(map(str, c.scale))} (item {key})")
            rec[c.name] = v
        out[key] = rec
    if not out:
        raise DataError(f"{path}: no rated items")
    return out


def fill_sheet(src: str | Path, dst: str | Path, ratings: dict[str, dict]) -> Path:
    """Copy the sheet ``src`` with ratings filled in (``{id: {column: value}}``), e.g. for
    simulated raters or for importing ratings collected elsewhere."""
    src = existing_file(src, "rating sheet")
    text, _ = decode_bytes(src.read_bytes(), str(src))
    reader = csv.DictReader(_io.StringIO(text))
    cols = list(reader.fieldnames or [])
    rows = []
    for row in reader:
        row.update({k: v for k, v in ratings.get(row["id"], {}).items() if k in cols})
        rows.append(row)
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return atomic_write_bytes(dst, buf.getvalue().encode("utf-8-sig"))


# --------------------------------------------------------------------------- agreement

def cohen_kappa(a: Sequence, b: Sequence, labels: Sequence | None = None,
                weights: str | None = None) -> float:
    """Cohen's kappa of two raters' labels for the same items.

    ``kappa = (p_o - p_e) / (1 - p_e)``: ``p_o`` the observed share of agreements, ``p_e`` the
    agreement expected if each rater kept their own label frequencies but rated at random.
    ``weights="linear"|"quadratic"`` (ordinal labels, in the order of ``labels``) counts a
    near miss as partial agreement: ``kappa_w = 1 - sum(w·O) / sum(w·E)`` with
    ``w_ij = |i-j|/(K-1)`` or its square. Returns NaN when ``p_e == 1`` (both raters used one
    and the same label throughout: kappa is undefined).
    """
    if len(a) != len(b):
        raise ValueError(f"raters labelled different numbers of items: {len(a)} vs {len(b)}")
    if not a:
        raise ValueError("cohen_kappa needs at least one item")
    labels = list(labels) if labels is not None else sorted(set(a) | set(b))
    idx = {x: i for i, x in enumerate(labels)}
    unknown = [x for x in (*a, *b) if x not in idx]
    if unknown:
        raise ValueError(f"label {unknown[0]!r} is not in labels {labels}")
    K, n = len(labels), len(a)
    obs = [[0.0] * K for _ in range(K)]
    for x, y in zip(a, b):
        obs[idx[x]][idx[y]] += 1 / n
    pa = [sum(row) for row in obs]
    pb = [sum(obs[i][j] for i in range(K)) for j in range(K)]
    exp = [[pa[i] * pb[j] for j in range(K)] for i in range(K)]
    if weights is None:
        w = [[0.0 if i == j else 1.0 for j in range(K)] for i in range(K)]
    elif weights in ("linear", "quadratic"):
        p = 1 if weights == "linear" else 2
        w = [[(abs(i - j) / max(K - 1, 1)) ** p for j in range(K)] for i in range(K)]
    else:
        raise ValueError(f"weights must be None, 'linear' or 'quadratic' (got {weights!r})")
    dis_obs = sum(w[i][j] * obs[i][j] for i in range(K) for j in range(K))
    dis_exp = sum(w[i][j] * exp[i][j] for i in range(K) for j in range(K))
    if dis_exp <= 1e-12:
        return float("nan")
    return 1.0 - dis_obs / dis_exp  # unweighted: 1 - (1-p_o)/(1-p_e) == (p_o-p_e)/(1-p_e)


def kappa_label(k: float) -> str:
    """Landis & Koch (1977) reading of a kappa value, in Chinese."""
    if k != k:
        return "无法定义"
    for hi, name in ((0.0, "差于随机"), (0.20, "轻微一致"), (0.40, "一般一致"), (0.60, "中等一致"),
                     (0.80, "较强一致")):
        if k <= hi:
            return name
    return "几乎完全一致"


def agreement(sheet_a: dict[str, dict], sheet_b: dict[str, dict],
              criteria: Sequence[Criterion] = DEFAULT_CRITERIA) -> list[dict]:
    """Per criterion: items ``n``, raw ``agreement``, ``kappa``, ``kappa_quadratic`` and its
    Landis–Koch reading, for two sheets from ``read_sheet`` (the same item ids)."""
    only_a, only_b = sorted(set(sheet_a) - set(sheet_b)), sorted(set(sheet_b) - set(sheet_a))
    if only_a or only_b:
        raise DataError(f"the two sheets rate different items: only in the first {only_a[:5]}, "
                        f"only in the second {only_b[:5]}")
    ids = sorted(sheet_a)
    rows = []
    for c in criteria:
        a = [sheet_a[i][c.name] for i in ids]
        b = [sheet_b[i][c.name] for i in ids]
        k = cohen_kappa(a, b, labels=c.scale)
        rows.append({"criterion": c.name, "label": c.label, "n": len(ids),
                     "agreement": sum(x == y for x, y in zip(a, b)) / len(ids),
                     "kappa": k, "kappa_quadratic": cohen_kappa(a, b, labels=c.scale, weights="quadratic"),
                     "reading": kappa_label(k)})
    return rows
