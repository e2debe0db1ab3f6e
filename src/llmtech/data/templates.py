"""Prompt templates: a small registry of named instruction templates (Chinese and English) and
the classic plain-text Alpaca prompt for non-chat models.

A template has an ``instruction`` and an optional ``input`` pattern with ``{placeholders}``.
``render`` fills them safely: only plain names are allowed (no ``{a.b}``/``{a[0]}`` access, no
format specs), a missing value raises ``DataError`` naming the template and the key, and the
values are inserted verbatim (braces inside a value are never re-interpreted).

Chat rendering lives in ``llmtech.models.render_chat`` (the model's own chat template).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from ..errors import DataError


@dataclass(frozen=True)
class Template:
    name: str
    lang: str
    instruction: str
    input: str = ""
    description: str = ""

    @property
    def fields(self) -> list[str]:
        """Placeholder names, in order of appearance (validates the syntax)."""
        out = _fields(self.instruction, self.key)
        return out + [f for f in _fields(self.input, self.key) if f not in out]

    @property
    def key(self) -> str:
        return f"{self.name}/{self.lang}"


def _fields(pattern: str, where: str) -> list[str]:
    out = []
    try:
        parsed = list(string.Formatter().parse(pattern))
    except ValueError as e:
        raise DataError(f"template '{where}': bad placeholder syntax ({e})") from None
    for _literal, name, spec, conv in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conv:
            raise DataError(f"template '{where}': placeholder '{{{name}}}' must be a plain name "
                            "(no attributes, indexes or format specs)")
        if name not in out:
            out.append(name)
    return out


def _fill(pattern: str, values: dict, where: str) -> str:
    out = []
    for literal, name, _spec, _conv in string.Formatter().parse(pattern):
        out.append(literal)
        if name is None:
            continue
        if name not in values or values[name] is None:
            raise DataError(f"template '{where}': missing value for placeholder '{name}'")
        out.append(str(values[name]))
    return "".join(out)


TEMPLATES: dict[str, Template] = {}


def register(name: str, lang: str, instruction: str, input: str = "", description: str = "",
             overwrite: bool = False) -> Template:
    """Add a template (checked now, so a bad placeholder fails at registration)."""
    t = Template(name, lang, instruction, input, description)
    if t.key in TEMPLATES and not overwrite:
        raise DataError(f"template '{t.key}' already exists (pass overwrite=True to replace it)")
    _ = t.fields  # validates the placeholders
    TEMPLATES[t.key] = t
    return t


def get(name: str, lang: str = "zh") -> Template:
    key = f"{name}/{lang}"
    if key not in TEMPLATES:
        names = sorted({t.name for t in TEMPLATES.values()})
        raise DataError(f"unknown template '{name}' for language '{lang}'; known: {', '.join(names)}")
    return TEMPLATES[key]


def names(lang: str | None = None) -> list[str]:
    return sorted({t.name for t in TEMPLATES.values() if lang is None or t.lang == lang})


def render(name: str, lang: str = "zh", **values) -> dict:
    """Fill a template -> ``{"instruction": ..., "input": ...}`` (an alpaca record without output)."""
    t = get(name, lang)
    return {"instruction": _fill(t.instruction, values, t.key), "input": _fill(t.input, values, t.key)}


# --------------------------------------------------------------------------- built-in templates
# Prompts for building instruction data from a passage (e.g. to ask a teacher model) ...
register("qa-from-passage", "zh", "根据给定资料回答问题：{question}", "{passage}",
         "阅读理解式问答：问题 + 资料")
register("qa-from-passage", "en", "Answer the question using the passage: {question}", "{passage}",
         "reading-comprehension QA: question + passage")
register("summarise", "zh", "请用简洁的语言概括下面这段内容的要点。", "{passage}", "摘要")
register("summarise", "en", "Summarise the main points of the following text concisely.", "{passage}",
         "summary")
register("extract-key-facts", "zh", "从下面的内容中提取关键事实（时间、数量、条件等），逐条列出。",
         "{passage}", "关键事实抽取")
register("extract-key-facts", "en", "Extract the key facts (dates, amounts, conditions) from the "
         "text below as a bulleted list.", "{passage}", "key-fact extraction")
# ... and templates whose answer *is* a document section (used by data.docs).
register("section-explain", "zh", "请介绍《{doc_title}》中「{heading}」的内容。", "",
         "文档小节 -> 介绍该小节")
register("section-explain", "en", 'What does "{doc_title}" say about {heading}?', "",
         "document section -> explain it")
register("section-points", "zh", "《{doc_title}》里关于「{heading}」有哪些要点？", "",
         "文档小节 -> 列出要点")
register("section-points", "en", 'List the key points of "{heading}" in "{doc_title}".', "",
         "document section -> key points")
register("doc-overview", "zh", "《{doc_title}》主要讲了什么？", "", "文档开头的概述段")
register("doc-overview", "en", 'What is "{doc_title}" about?', "", "a document's opening overview")
register("sentence-expand", "zh", "请围绕下面这句话展开说明：{first_sentence}", "",
         "无标题段落 -> 由首句展开")
register("sentence-expand", "en", "Explain in more detail: {first_sentence}", "",
         "untitled paragraph -> expand its first sentence")


# --------------------------------------------------------------------------- Alpaca plain text

ALPACA = {
    "alpaca": {
        "with_input": ("Below is an instruction that describes a task, paired with an input that "
                       "provides further context. Write a response that appropriately completes "
                       "the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                       "### Response:\n"),
        "no_input": ("Below is an instruction that describes a task. Write a response that "
                     "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                     "### Response:\n"),
    },
    "alpaca-zh": {
        "with_input": ("下面是一条描述任务的指令，以及一段提供更多上下文的输入。请写出恰当完成该请求的回答。"
                       "\n\n### 指令：\n{instruction}\n\n### 输入：\n{input}\n\n### 回答：\n"),
        "no_input": ("下面是一条描述任务的指令。请写出恰当完成该请求的回答。"
                     "\n\n### 指令：\n{instruction}\n\n### 回答：\n"),
    },
}


def alpaca_text(record: dict, template: str = "alpaca", with_response: bool = True) -> str:
    """The classic Stanford Alpaca plain-text prompt (``alpaca``) or its Chinese version
    (``alpaca-zh``) for base models without a chat template. With ``with_response`` and an
    ``output`` in the record, the answer follows the prompt."""
    if template not in ALPACA:
        raise DataError(f"unknown Alpaca template '{template}'; use one of {', '.join(ALPACA)}")
    if not record.get("instruction"):
        raise DataError(f"template '{template}': missing value for placeholder 'instruction'")
    pattern = ALPACA[template]["with_input" if record.get("input") else "no_input"]
    text = _fill(pattern, {"instruction": record["instruction"], "input": record.get("input", "")},
                 template)
    if with_response and record.get("output"):
        text += record["output"]
    return text
