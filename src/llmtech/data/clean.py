"""Rule-based cleaning of instruction data: normalisation, PII masking, length and language filters.

Every rule is small, deterministic and counted: ``clean_records`` returns the kept records and a
report ``{rule: count}`` so a lab can print what each rule removed or changed.

Order of the rules for each record:

1. ``normalize_text`` on every text field (NFKC, control/zero-width characters, whitespace,
   Chinese punctuation next to Chinese characters)            -> ``normalized``
2. ``mask_pii`` (mobile/landline phones, e-mail, 18-digit ID with check digit, bank card with
   Luhn check, public IPv4)                                     -> ``pii_<kind>``, ``pii_masked``
3. length of the answer in characters (``min_chars``/``max_chars``)
                                                    -> ``removed_too_short`` / ``removed_too_long``
4. language of the whole record (``lang``) and, optionally, prompt/answer language agreement
   (``lang_match``)                                -> ``removed_language`` / ``removed_lang_mismatch``

A removed record is counted once, under the first rule it fails.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import unicodedata
from typing import Any, Iterable, Literal

from pydantic import Field

from ..config import StrictModel
from ..errors import DataError

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- character classes

HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs (ext. A, unified, compatibility)
_HAN_RE = re.compile(f"[{HAN}]")
_KANA_HANGUL_RE = re.compile("[\u3040-\u30ff\u31f0-\u31ff\uac00-\ud7af\u1100-\u11ff]")
LATIN = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f"  # ASCII letters + accented Latin
_LATIN_WORD_RE = re.compile(f"[{LATIN}]+")
_OTHER_WORD_RE = re.compile(r"[^\W\d_" + LATIN + HAN + "\u3040-\u30ff\u31f0-\u31ff\uac00-\ud7af\u1100-\u11ff]+")

# zero-width and direction marks that survive NFKC and break matching
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200e\u200f\u2060\ufeff\u00ad\u202a\u202b\u202c\u202d\u202e"))

# Chinese full-width punctuation and their ASCII forms. NFKC would turn all of them half-width;
# they are protected from NFKC and then set by the language of the line instead.
_ZH_PUNCT = {",": "，", ":": "：", ";": "；", "!": "！", "?": "？", "(": "（", ")": "）"}
_EN_PUNCT = {v: k for k, v in _ZH_PUNCT.items()}
# Characters NFKC would change in a way that loses meaning: "……" -> "......", "m²" -> "m2",
# "①" -> "1", "H₂O" -> "H2O".
_NFKC_KEEP = set(_EN_PUNCT) | set("…⋯²³¹⁰⁴⁵⁶⁷⁸⁹₀₁₂₃₄₅₆₇₈₉") | {chr(c) for c in range(0x2460, 0x2474)}
_CJK_PUNCT = "，。、；：！？「」『』（）《》【】〈〉…"
_SPACE_BETWEEN_CJK = re.compile(f"(?<=[{HAN}{_CJK_PUNCT}]) +(?=[{HAN}{_CJK_PUNCT}])")


def _nfkc(text: str) -> str:
    """NFKC everything except the characters in ``_NFKC_KEEP``."""
    out, run = [], []
    for ch in text:
        if ch in _NFKC_KEEP:
            if run:
                out.append(unicodedata.normalize("NFKC", "".join(run)))
                run = []
            out.append(ch)
        else:
            run.append(ch)
    if run:
        out.append(unicodedata.normalize("NFKC", "".join(run)))
    return "".join(out)


def normalize_text(text: str, zh_punct: bool = True) -> str:
    """Normalise one string for training data.

    - NFKC: full-width letters/digits -> ASCII (``ＡＢＣ１２３`` -> ``ABC123``), ideographic
      space -> space, compatibility forms -> canonical; but ``……``, ``m²``, ``①`` and Chinese
      punctuation are kept;
    - removes control characters (except newline and tab) and zero-width/direction marks;
    - ``\r\n`` and ``\r`` -> ``\n``; trailing spaces on a line removed; runs of spaces inside a
      line collapsed to one (leading indentation kept, so code survives); 3+ newlines -> 2;
      spaces between Chinese characters/punctuation removed (``你 好`` -> ``你好``);
    - with ``zh_punct``, punctuation follows the language of its line: in a line with Chinese
      characters, ``, : ; ! ?`` next to a Chinese character, ``(``/``)`` touching one and a
      sentence-final ``.`` after one become ``，：；！？（）。`` (``价格,包邮`` -> ``价格，包邮``;
      ``1,000``, ``9:00``, ``f(x)`` and ``a.txt`` stay); in a line
      without Chinese characters ``，：；！？（）`` become ASCII (``Hello，world`` -> ``Hello, world``).
    """
    if not text:
        return text
    t = _nfkc(text)
    t = t.replace("\r\n", "\n").replace("\r", "\n").translate(_INVISIBLE)
    t = "".join(ch for ch in t if ch in "\n\t" or unicodedata.category(ch) != "Cc")
    lines = []
    for line in t.split("\n"):
        indent = re.match(r"[ \t]*", line).group(0)
        body = re.sub(r"[ \t\u00a0]+", " ", line[len(indent):]).rstrip()
        body = _SPACE_BETWEEN_CJK.sub("", body)
        if zh_punct:
            body = _line_punctuation(body)
        lines.append(indent + body if body else "")
    t = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", t).strip()


def _line_punctuation(line: str) -> str:
    if not _HAN_RE.search(line):
        out = re.sub("[，：；！？](?=[A-Za-z0-9])", lambda m: _EN_PUNCT[m.group(0)] + " ", line)
        return out.translate(str.maketrans(_EN_PUNCT))
    chars = list(line)
    for i, ch in enumerate(chars):
        if ch not in _ZH_PUNCT:
            continue
        prev = chars[i - 1] if i > 0 else ""
        nxt = chars[i + 1] if i + 1 < len(chars) else ""
        if ch == "(":
            touch = bool(_HAN_RE.match(nxt))
        elif ch == ")":
            touch = bool(_HAN_RE.match(prev))
        else:  # , : ; ! ? between a Chinese character and anything (1,000 and 9:00 stay)
            touch = bool(_HAN_RE.match(prev) or _HAN_RE.match(nxt))
        if touch:
            chars[i] = _ZH_PUNCT[ch]
    # a full stop right after a Chinese character, ending the sentence: "设备." -> "设备。"
    return re.sub(f"(?<=[{HAN}])\\.(?=$|\\s|[{HAN}])", "。", "".join(chars))


# --------------------------------------------------------------------------- language

def script_counts(text: str) -> dict[str, int]:
    """Count language units: each Chinese character, each Latin word, each kana/hangul
    character, each word in another script (Cyrillic, Greek, Arabic, ...).

    A Chinese character and an English word carry roughly the same information, so each
    counts one. Digits and punctuation are ignored.
    """
    text = unicodedata.normalize("NFKC", text)
    return {"han": len(_HAN_RE.findall(text)), "latin": len(_LATIN_WORD_RE.findall(text)),
            "kana": len(_KANA_HANGUL_RE.findall(text)), "other": len(_OTHER_WORD_RE.findall(text))}


def cjk_ratio(text: str) -> float | None:
    """Share of Chinese characters among language units (None when the text has no letters)."""
    c = script_counts(text)
    total = sum(c.values())
    return c["han"] / total if total else None


_CODE_FENCE = re.compile(r"```.*?(```|$)", re.S)


def detect_lang(text: str, zh_min_ratio: float = 0.5, en_min_ratio: float = 0.5) -> str:
    """``zh`` | ``en`` | ``other`` | ``unknown`` by the CJK-ratio rule.

    - ``unknown``: no letters at all (numbers, symbols);
    - ``other``: kana/hangul make up 10 % or more of the units (Japanese/Korean, even when
      written with many Chinese characters);
    - ``zh``: Chinese characters are at least ``zh_min_ratio`` of the units;
    - ``en``: Latin words are at least ``en_min_ratio`` of the units;
    - ``other`` otherwise (Russian, Arabic, ... or a mixture where nothing dominates).

    Fenced code blocks (```...```) are ignored: code is English-looking in any language.
    """
    c = script_counts(_CODE_FENCE.sub(" ", text))
    total = sum(c.values())
    if total == 0:
        return "unknown"
    if c["kana"] / total >= 0.1:
        return "other"
    if c["han"] / total >= zh_min_ratio:
        return "zh"
    if c["latin"] / total >= en_min_ratio:
        return "en"
    return "other"


# --------------------------------------------------------------------------- PII

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def id_check_digit(first17: str) -> str:
    """Check digit of a Chinese resident ID number (GB 11643-1999, ISO 7064 MOD 11-2)."""
    return _ID_CHECK[sum(int(d) * w for d, w in zip(first17, _ID_WEIGHTS)) % 11]


def valid_cn_id(s: str) -> bool:
    s = s.upper()
    if not re.fullmatch(r"[1-9]\d{5}(18|19|20)\d{2}(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])\d{3}[\dX]", s):
        return False
    return id_check_digit(s[:17]) == s[17]


def luhn_valid(digits: str) -> bool:
    """Luhn (mod 10) checksum used by bank card numbers."""
    if not digits.isdigit():
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d)
        if i % 2 == 1:
            n *= 2
            if n > 9:
                n -= 9
        total += n
    return total % 10 == 0


_EMAIL_RE = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_ID_RE = re.compile(r"(?<![0-9A-Za-z])\d{17}[\dXx](?![0-9A-Za-z])")
_CARD_RE = re.compile(r"(?<![\d-])(?:\d{4}[ -]?){3}\d{4}(?:[ -]?\d{1,3})?(?![\d-])")
_MOBILE_RE = re.compile(r"(?<![\d+])(?:(?:\+|00)?86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?!\d)")
_LANDLINE_RE = re.compile(r"(?<![\d-])(?:\(0\d{2,3}\)[ -]?|0\d{2,3}-)[2-9]\d{6,7}(?:-\d{1,5})?(?![\d-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4_RE = re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)")

PII_TAGS = {"email": "[EMAIL]", "id": "[ID]", "card": "[CARD]", "phone": "[PHONE]", "ip": "[IP]"}


def _allowed(value: str, allow: Iterable[str]) -> bool:
    for a in allow:
        if a.startswith("@") and value.lower().endswith(a.lower()):
            return True
        if value == a:
            return True
    return False


def mask_pii(text: str, kinds: Iterable[str] = tuple(PII_TAGS),
             allow: Iterable[str] = ()) -> tuple[str, dict[str, int]]:
    """Replace personal data with tags; returns ``(text, {kind: count})``.

    - ``email``: ``name@host.tld`` -> ``[EMAIL]``
    - ``id``: 18-digit Chinese resident ID whose birth date and check digit are valid -> ``[ID]``
      (an 18-digit number with a wrong check digit is left alone: it is not an ID)
    - ``card``: 16-19 digits (groups of 4 may be separated by spaces or dashes) passing the
      Luhn check -> ``[CARD]`` (order numbers that fail Luhn are kept)
    - ``phone``: mainland mobile numbers (``1[3-9]`` + 9 digits, optional ``+86``/separators)
      and landlines written with an area code (``010-12345678``, ``(0755)1234567``)
      -> ``[PHONE]``. Company service numbers ``400-``/``800-`` are not personal and are kept.
    - ``ip``: public IPv4 addresses -> ``[IP]`` (private/loopback ones such as a router's
      ``192.168.1.1`` identify nobody and are kept)

    ``allow`` lists values to keep (e.g. a company's public support address); an entry
    starting with ``@`` keeps every e-mail of that domain.
    """
    kinds = set(kinds)
    unknown = kinds - set(PII_TAGS)
    if unknown:
        raise DataError(f"unknown PII kind(s) {sorted(unknown)}; use {sorted(PII_TAGS)}")
    allow = list(allow)
    counts = {k: 0 for k in PII_TAGS}

    def sub(pattern: re.Pattern, kind: str, check=None):
        nonlocal text

        def repl(m: re.Match) -> str:
            value = m.group(0)
            if _allowed(value, allow) or (check is not None and not check(value)):
                return value
            counts[kind] += 1
            return PII_TAGS[kind]

        text = pattern.sub(repl, text)

    if "email" in kinds:
        sub(_EMAIL_RE, "email")
    if "id" in kinds:
        sub(_ID_RE, "id", valid_cn_id)
    if "card" in kinds:
        sub(_CARD_RE, "card", lambda v: 16 <= len(re.sub(r"\D", "", v)) <= 19
            and luhn_valid(re.sub(r"\D", "", v)))
    if "phone" in kinds:
        sub(_MOBILE_RE, "phone")
        sub(_LANDLINE_RE, "phone")
    if "ip" in kinds:
        sub(_IPV4_RE, "ip", lambda v: ipaddress.ip_address(v).is_global)
    return text, {k: v for k, v in counts.items() if k in kinds}


# --------------------------------------------------------------------------- records

class CleanConfig(StrictModel):
    """Settings of ``clean_records`` (also the keys of ``llmtech data clean``)."""

    normalize: bool = True
    zh_punct: bool = True          # punctuation follows the language of its line (，vs ,)
    mask_pii: bool = True
    pii_types: list[Literal["email", "id", "card", "phone", "ip"]] = list(PII_TAGS)
    pii_allow: list[str] = []      # values kept as-is; "@domain" keeps a whole e-mail domain
    min_chars: int = Field(2, ge=0)        # answer length bounds, in characters
    max_chars: int = Field(4096, ge=1)
    lang: Literal["zh", "en", "zh+en", "any"] = "any"
    zh_min_ratio: float = Field(0.5, ge=0, le=1)   # Chinese characters / language units for "zh"
    en_min_ratio: float = Field(0.5, ge=0, le=1)   # Latin words / language units for "en"
    lang_match: bool = False       # drop records whose answer is zh and prompt en (or vice versa)


# Fields holding text, by format; everything else in a record (source, id, label...) is kept as-is.
TEXT_KEYS = ("system", "instruction", "input", "output", "history", "messages",
             "prompt", "chosen", "rejected", "completion")


def _map_text(value: Any, fn) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_map_text(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: (_map_text(v, fn) if k == "content" else v) for k, v in value.items()}
    return value


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return _strings(value.get("content", ""))
    return []


def record_text(rec: dict) -> str:
    """All text of a record (any format), joined with newlines: what dedup compares."""
    return "\n".join(s for k in TEXT_KEYS if k in rec for s in _strings(rec[k]) if s)


def prompt_text(rec: dict) -> str:
    """The question side of a record (everything but the final answer)."""
    if "messages" in rec:
        return "\n".join(m["content"] for m in rec["messages"][:-1])
    if "prompt" in rec:
        return "\n".join(_strings(rec["prompt"]))
    return "\n".join(s for k in ("system", "instruction", "input") if rec.get(k) for s in _strings(rec[k]))


def response_text(rec: dict) -> str:
    """The answer of a record: alpaca ``output``, the last assistant message, ``chosen`` or
    ``completion``."""
    if "messages" in rec:
        return rec["messages"][-1]["content"] if rec["messages"] else ""
    for key in ("output", "chosen", "completion"):
        if key in rec:
            return "\n".join(_strings(rec[key]))
    raise DataError(f"record has no answer field (output / messages / chosen / completion): "
                    f"keys {sorted(rec)}")


def clean_record(rec: dict, cfg: CleanConfig) -> tuple[dict | None, dict[str, int], str | None]:
    """Clean one record. Returns ``(record or None, change counts, rule that removed it)``."""
    changes: dict[str, int] = {}
    out = dict(rec)
    if cfg.normalize:
        norm = {k: _map_text(out[k], lambda s: normalize_text(s, cfg.zh_punct))
                for k in TEXT_KEYS if k in out}
        if any(norm[k] != out[k] for k in norm):
            changes["normalized"] = 1
        out.update(norm)
    if cfg.mask_pii:
        found: dict[str, int] = {}

        def mask(s: str) -> str:
            masked, counts = mask_pii(s, cfg.pii_types, cfg.pii_allow)
            for k, v in counts.items():
                found[k] = found.get(k, 0) + v
            return masked

        out.update({k: _map_text(out[k], mask) for k in TEXT_KEYS if k in out})
        for k, v in found.items():
            if v:
                changes[f"pii_{k}"] = v
    answer = response_text(out).strip()
    n = len(answer)
    if n < cfg.min_chars:
        return None, changes, "removed_too_short"
    if n > cfg.max_chars:
        return None, changes, "removed_too_long"
    if cfg.lang != "any":
        lang = detect_lang(record_text(out), cfg.zh_min_ratio, cfg.en_min_ratio)
        wanted = {"zh": {"zh"}, "en": {"en"}, "zh+en": {"zh", "en"}}[cfg.lang]
        if lang not in wanted and lang != "unknown":
            return None, changes, "removed_language"
    if cfg.lang_match:
        q = detect_lang(prompt_text(out), cfg.zh_min_ratio, cfg.en_min_ratio)
        a = detect_lang(answer, cfg.zh_min_ratio, cfg.en_min_ratio)
        if {q, a} == {"zh", "en"}:
            return None, changes, "removed_lang_mismatch"
    return out, changes, None


REPORT_KEYS = ("records_in", "normalized", "pii_masked", "pii_records", "pii_phone", "pii_email",
               "pii_id", "pii_card", "pii_ip", "removed_too_short", "removed_too_long",
               "removed_language", "removed_lang_mismatch")


def clean_records(records: list[dict], cfg: CleanConfig | None = None,
                  trace: list | None = None) -> tuple[list[dict], dict[str, int]]:
    """Clean normalised records (see ``data.load``); returns ``(kept, report)``.

    ``report`` maps each rule to a count: ``normalized`` (records changed by normalisation),
    ``pii_<kind>`` (items masked), ``pii_masked`` (all items), ``pii_records`` (records with
    at least one mask), ``removed_<rule>`` (records dropped), ``records_in``/``records_out``.
    Pass a list as ``trace`` to receive ``(index, rule)`` for every removed record.
    """
    cfg = cfg or CleanConfig()
    report = {k: 0 for k in REPORT_KEYS}
    report["records_in"] = len(records)
    kept = []
    for i, rec in enumerate(records):
        out, changes, removed_by = clean_record(rec, cfg)
        for k, v in changes.items():
            report[k] += v
        pii = sum(v for k, v in changes.items() if k.startswith("pii_"))
        report["pii_masked"] += pii
        report["pii_records"] += bool(pii)
        if removed_by:
            report[removed_by] += 1
            if trace is not None:
                trace.append((i, removed_by))
            continue
        kept.append(out)
    report["records_out"] = len(kept)
    log.info("cleaned %d -> %d records", len(records), len(kept))
    return kept, report
