"""Documents -> text -> instruction data (rule-based, deterministic).

1. ``load_document(path)`` reads ``.txt``, ``.md``, ``.html``/``.htm``, ``.pdf`` and ``.docx`` into
   a ``Document`` whose ``text`` is Markdown-like: headings as ``#`` lines, paragraphs separated
   by blank lines. Text files may be UTF-8 or GBK/GB18030 (``llmtech.io.decode_bytes``).
   HTML loses ``<script>``/``<style>`` and page chrome (``<nav>``/``<header>``/``<footer>``/
   ``<aside>``) but keeps its headings; Word keeps its Heading styles, lists and tables; plain
   text and PDF get headings from simple patterns (``第一章``, ``一、``, ``1.``/``1.2``).
2. ``split_sections`` cuts the text at headings (or, without headings, into paragraph groups).
3. ``document_to_instructions`` turns each section into an alpaca record: the instruction
   comes from a template (``data.templates``) filled with the document title and the section
   heading (or its first sentence), the output is the section text itself, trimmed at a
   sentence boundary to ``max_output_chars``. No model is involved: every answer is text that
   the document really contains.

Unsupported or unreadable files raise ``DataError`` naming the file.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import StrictModel
from ..errors import DataError
from ..io import decode_bytes, existing_file
from . import templates as T
from .clean import HAN, detect_lang, normalize_text

log = logging.getLogger(__name__)

SUPPORTED = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".docx")

_MD_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
# Headings in plain text / PDF: 第一章 …, 一、…, 1. … / 1.2 …, Chapter 3 …
_TXT_HEADING = re.compile(
    r"^(第[一二三四五六七八九十百零\d]+[章节部分篇]\s*\S.*"
    r"|[一二三四五六七八九十]+[、.．]\s*\S.*"
    r"|\d+(\.\d+)*[.、．]?\s+\S.*"
    r"|(Chapter|Section|Part)\s+\d+\b.*)$")
_END_PUNCT = tuple("。！？!?；;：:，,.")
_SENT_END = re.compile(r"(?<=[。！？!?])|(?<=[.;；])(?=\s)|\n")


@dataclass
class Section:
    heading: str      # "" for text without a heading
    text: str
    level: int = 0


@dataclass
class Document:
    source: str       # the path as given
    title: str
    text: str         # Markdown-like text
    kind: str         # file suffix without the dot
    encoding: str = ""
    sections: list[Section] = field(default_factory=list)

    @property
    def lang(self) -> str:
        return detect_lang(self.text)


# --------------------------------------------------------------------------- loaders

def load_document(path: str | Path, relative_to: str | Path | None = None) -> Document:
    """Read one document; errors name the file. ``source`` is the path as given, or relative
    to ``relative_to``."""
    path = existing_file(path, "document file")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        raise DataError(f"{path}: unsupported document type '{suffix or '(none)'}' "
                        f"(supported: {', '.join(SUPPORTED)})")
    encoding = ""
    try:
        if suffix in (".txt", ".md", ".markdown", ".html", ".htm"):
            raw = path.read_bytes()
            text, encoding = decode_bytes(raw, str(path))
            if suffix in (".html", ".htm"):
                title, text = _html_to_markdown(text)
            elif suffix == ".txt":
                title, text = _plain_to_markdown(text)
            else:
                title = ""
        elif suffix == ".pdf":
            title, text = _pdf_to_markdown(path)
        else:
            title, text = _docx_to_markdown(path)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - parser libraries raise many kinds of errors
        raise DataError(f"{path}: cannot read {suffix[1:]} document ({type(e).__name__}: "
                        f"{str(e)[:200]})") from None
    text = normalize_text(text)
    if not text.strip():
        raise DataError(f"{path}: document has no extractable text"
                        + (" (a scanned PDF needs OCR first)" if suffix == ".pdf" else ""))
    sections = split_sections(text)
    if not title:
        h1 = re.search(r"^# (.+)$", text, re.M)
        title = h1.group(1).strip() if h1 else path.stem
    source = str(path)
    if relative_to is not None:
        try:
            source = path.resolve().relative_to(Path(relative_to).resolve()).as_posix()
        except ValueError:
            pass
    return Document(source, normalize_text(title), text, suffix[1:], encoding, sections)


def load_documents(source: str | Path, recursive: bool = True,
                   relative_to: str | Path | None = None) -> list[Document]:
    """All supported documents under a folder (sorted by path), or one file."""
    source = Path(source)
    if source.is_file():
        return [load_document(source, relative_to)]
    if not source.exists():
        raise DataError(f"{source}: folder not found")
    pattern = "**/*" if recursive else "*"
    files = sorted(p for p in source.glob(pattern)
                   if p.is_file() and p.suffix.lower() in SUPPORTED and not p.name.startswith("."))
    if not files:
        raise DataError(f"{source}: no documents found (supported: {', '.join(SUPPORTED)})")
    return [load_document(p, relative_to) for p in files]


def _html_to_markdown(html: str) -> tuple[str, str]:
    from bs4 import BeautifulSoup, NavigableString

    soup = BeautifulSoup(html, "lxml")
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    for tag in soup(["script", "style", "noscript", "template", "svg", "head",
                     "nav", "header", "footer", "aside", "form"]):
        tag.decompose()
    # Source-code line breaks inside a paragraph are just spaces.
    for s in list(soup.find_all(string=True)):
        if type(s) is NavigableString and s.find_parent("pre") is None:  # not comments/CDATA
            s.replace_with(re.sub(r"\s+", " ", str(s)))
    # <pre> blocks keep their layout: set aside now, put back as fenced code at the end.
    pres = []
    for i, pre in enumerate(soup.find_all("pre")):
        pres.append(pre.get_text().strip("\n"))
        pre.replace_with(f"\n\n\x00PRE{i}\x00\n\n")
    for br in soup.find_all("br"):
        br.replace_with("\n")
    for h in soup.find_all(re.compile(r"^h[1-6]$")):
        level = int(h.name[1])
        h.replace_with(f"\n\n{'#' * level} {h.get_text(' ', strip=True)}\n\n")
    for li in soup.find_all("li"):
        li.insert(0, "\n- ")
    for cell in soup.find_all(["td", "th"]):
        cell.insert_after(" | ")
    for block in soup.find_all(["p", "div", "section", "article", "main", "tr", "ul", "ol",
                                "table", "blockquote", "dl", "dt", "dd"]):
        block.insert_before("\n\n")
        block.insert_after("\n\n")
    body = soup.body or soup
    lines = [ln.strip() for ln in body.get_text().split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    text = re.sub(r"\x00PRE(\d+)\x00", lambda m: f"```\n{pres[int(m.group(1))]}\n```", text)
    h1 = re.search(r"^# (.+)$", text, re.M)
    return (h1.group(1) if h1 else title), text


def _is_plain_heading(line: str) -> bool:
    line = line.strip()
    return (0 < len(line) <= 40 and not line.endswith(_END_PUNCT)
            and bool(_TXT_HEADING.match(line)))


def _plain_to_markdown(text: str, join_lines: bool = False) -> tuple[str, str]:
    """Plain text -> Markdown: the first short line is the title, pattern headings become ``##``.

    With ``join_lines`` (PDF), wrapped lines of a paragraph are joined again.
    """
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    out: list[str] = []
    title = ""
    first = next((i for i, ln in enumerate(lines) if ln.strip()), None)
    if first is not None:
        cand = lines[first].strip()
        if len(cand) <= 60 and not cand.endswith(_END_PUNCT) and not _TXT_HEADING.match(cand):
            title = cand
            out.append(f"# {cand}")
            lines = lines[first + 1:]
    para: list[str] = []

    def flush():
        if para:
            out.append("")
            out.append(_join_wrapped(para) if join_lines else "\n".join(para))
            out.append("")
            para.clear()

    for ln in lines:
        if not ln.strip():
            flush()
        elif _is_plain_heading(ln):
            flush()
            out += ["", f"## {ln.strip()}", ""]
        else:
            para.append(ln.strip() if join_lines else ln)
    flush()
    return title, re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def _join_wrapped(lines: list[str]) -> str:
    text = lines[0]
    for ln in lines[1:]:
        cjk_edge = re.match(f"[{HAN}]", text[-1:]) and re.match(f"[{HAN}]", ln[:1])
        text += ("" if cjk_edge or text.endswith("-") else " ") + ln
    return text


def _pdf_to_markdown(path: Path) -> tuple[str, str]:
    from pypdf import PdfReader

    reader = PdfReader(str(path))
    if reader.is_encrypted:
        raise DataError(f"{path}: PDF is encrypted; decrypt it first")
    pages = [(p.extract_text() or "") for p in reader.pages]
    return _plain_to_markdown("\n\n".join(pages), join_lines=True)


def _docx_to_markdown(path: Path) -> tuple[str, str]:
    import docx

    d = docx.Document(str(path))
    out, title = [], ""
    for block in d.iter_inner_content():
        if hasattr(block, "rows"):  # table
            rows = [" | ".join(c.text.strip() for c in row.cells) for row in block.rows]
            out.append("\n".join(r for r in rows if r.strip(" |")))
            continue
        text = block.text.strip()
        if not text:
            continue
        style = (block.style.name if block.style is not None else "") or ""
        m = re.match(r"Heading (\d)", style)
        if style == "Title":
            title = title or text
            out.append(f"# {text}")
        elif m:
            out.append(f"{'#' * min(6, int(m.group(1)) + 1)} {text}")
        elif style.startswith("List"):
            if out and out[-1].startswith("- "):  # keep a list together
                out[-1] += f"\n- {text}"
            else:
                out.append(f"- {text}")
        else:
            out.append(text)
    return title, "\n\n".join(out)


# --------------------------------------------------------------------------- sections

def split_sections(text: str, max_chars: int = 1500) -> list[Section]:
    """Cut Markdown-like text at headings; text before the first heading is its own section.

    Without any heading, paragraphs are grouped into sections of at most ``max_chars``.
    Fenced code blocks are never split and ``#`` lines inside them are not headings.
    """
    sections: list[Section] = []
    heading, level, body = "", 0, []
    in_code = False
    saw_heading = False

    def flush():
        t = "\n".join(body).strip()
        if t:
            sections.append(Section(heading, t, level))

    for line in text.split("\n"):
        if line.strip().startswith("```"):
            in_code = not in_code
        m = None if in_code else _MD_HEADING.match(line)
        if m:
            flush()
            heading, level, body = m.group(2).strip(), len(m.group(1)), []
            saw_heading = True
        else:
            body.append(line)
    flush()
    if saw_heading:
        return sections
    # No headings: group paragraphs.
    out: list[Section] = []
    buf = ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if buf and len(buf) + len(para) + 2 > max_chars:
            out.append(Section("", buf))
            buf = ""
        buf = f"{buf}\n\n{para}" if buf else para
    if buf:
        out.append(Section("", buf))
    return out


def first_sentence(text: str, max_chars: int = 80) -> str:
    """First sentence of a text (list markers stripped), at most ``max_chars`` characters."""
    body = re.sub(r"^\s*(?:[-*+]|\d+[.)、])\s+", "", text.strip())
    parts = [p.strip() for p in _SENT_END.split(body) if p and p.strip()]
    s = parts[0] if parts else body
    return s if len(s) <= max_chars else s[:max_chars].rstrip() + "…"


def trim_text(text: str, max_chars: int) -> str:
    """Cut ``text`` to at most ``max_chars``, at the last sentence or line end before the limit."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    ends = [m.end() for m in re.finditer(r"[。！？!?]|[.;](?=\s)|\n", cut)]
    end = ends[-1] if ends and ends[-1] >= max_chars // 3 else max_chars
    return cut[:end].rstrip()


class ConvertConfig(StrictModel):
    """Settings of ``llmtech data convert`` (documents -> instruction data)."""

    lang: Literal["auto", "zh", "en"] = "auto"
    templates: list[str] = ["section-explain", "section-points"]
    max_output_chars: int = 800
    min_section_chars: int = 15


def documents_to_instructions(docs: list[Document], cfg: ConvertConfig | None = None) -> list[dict]:
    """``document_to_instructions`` over several documents with one config."""
    cfg = cfg or ConvertConfig()
    return [r for d in docs for r in document_to_instructions(
        d, cfg.templates, cfg.lang, cfg.max_output_chars, cfg.min_section_chars)]


def document_to_instructions(doc: Document, templates: list[str] | tuple[str, ...] = (
        "section-explain", "section-points"), lang: str = "auto", max_output_chars: int = 800,
        min_section_chars: int = 15) -> list[dict]:
    """One alpaca record per section: instruction from a template, output = the section text.

    Sections with a heading use the heading templates in turn (section i gets
    ``templates[i % len(templates)]``); the introduction under the title uses ``doc-overview``;
    text without headings uses ``sentence-expand`` with its first sentence. ``lang="auto"``
    picks the template language from the document's text.
    Each record carries ``source`` (``path#heading``).
    """
    if lang == "auto":
        lang = "en" if doc.lang == "en" else "zh"
    if lang not in ("zh", "en"):
        raise DataError(f"lang must be zh, en or auto, got '{lang}'")
    if not templates:
        raise DataError("document_to_instructions needs at least one template name")
    records = []
    k = 0
    for sec in doc.sections:
        if len(sec.text) < min_section_chars:
            continue
        if sec.heading and sec.heading != doc.title:
            name = templates[k % len(templates)]
            k += 1
            values = {"doc_title": doc.title, "heading": sec.heading}
        elif sec.heading:  # the title's own introduction
            name = "doc-overview"
            values = {"doc_title": doc.title, "heading": sec.heading}
        else:  # text without headings
            name = "sentence-expand"
            values = {"doc_title": doc.title, "heading": doc.title}
        values["first_sentence"] = first_sentence(sec.text)
        prompt = T.render(name, lang, **values)
        records.append({"instruction": prompt["instruction"], "input": prompt["input"],
                        "output": trim_text(sec.text, max_output_chars),
                        "source": f"{doc.source}#{sec.heading or doc.title}"})
    return records
