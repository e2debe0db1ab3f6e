"""A multi-turn customer-service assistant over a ``KnowledgeBase``: the enterprise case.

Each user turn goes through five steps, all kept visible in a ``Reply``:

1. **Query rewriting** (``RuleRewriter``): a follow-up such as "那门锁呢？" or "How many days do
   I have?" is turned into a self-contained question by carrying entities (product, error code,
   membership tier) and topic words from earlier turns. Rules, not a model: the bundled 135M
   LM is a poor rewriter (``llm_rewrite_many`` is there to measure exactly that).
2. **Intent routing** (``IntentRouter``): phrase rules catch explicit requests for a person
   (``human``); otherwise a TF-IDF (character n-grams, so Chinese needs no segmenter) +
   logistic-regression classifier trained on the SFT data's ``topic`` labels picks one of the
   12 topics, or ``decline`` (reported as ``out_of_scope``).
3. **Retrieval**: ``KnowledgeBase.search`` on the rewritten query; the routed topic may boost or
   filter passages of its own documents (named ``<topic>_<lang>.md``), see ``route_passages``.
4. **Escalation** (``EscalationPolicy``): hand over to a human on an explicit request, an
   out-of-scope intent, retrieval confidence (``confidence.ConfidenceScorer``) below a threshold
   chosen on dev data, or when the model refuses. The reply is then a fixed handoff message
   with the hotline read from the knowledge base's contact document.
5. **Answer with citations** through ``generate.Generator``.

``Assistant`` keeps one ``Conversation`` (history) per session id. ``load_dialogues`` reads the
labelled dialogue file (``data/support/dialogues.jsonl``) and ``evaluate_dialogues`` scores
replies against it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from ..data.formats import read_records
from ..errors import ConfigError, DataError
from .generate import Answer, evaluate_answers, question_lang
from .metrics import evaluate_run, ranked_docs
from .types import Passage

TOPICS = ("products", "returns", "warranty", "shipping", "membership", "invoice", "payment",
          "app_account", "troubleshooting_s1", "troubleshooting_l3", "privacy", "contact")
INTENTS = TOPICS + ("human", "out_of_scope")
RouteMode = Literal["none", "boost", "filter"]

# --------------------------------------------------------------------------- data


@dataclass
class Dialogue:
    """User turns of one conversation; the labels describe the LAST turn (the scored one)."""

    id: str
    lang: str
    turns: list[str]
    rewrite: str
    intent: str
    escalate: bool
    answer: str
    doc_ids: list[str]
    where: str = ""


_FIELDS: dict[str, type | tuple] = {"id": str, "lang": str, "turns": list, "rewrite": str,
                                    "intent": str, "escalate": bool, "answer": str,
                                    "doc_ids": list}


def load_dialogues(path: str | Path) -> list[Dialogue]:
    """Read and validate a dialogue file (JSONL, one dialogue per line). Every problem is a
    ``DataError`` naming ``file:line`` and the key."""
    rows = read_records(path)
    if not rows:
        raise DataError(f"{path}: no dialogues")
    out, seen = [], set()
    for where, r in rows:
        for key, typ in _FIELDS.items():
            if key not in r:
                raise DataError(f"{where}: missing key '{key}'")
            if not isinstance(r[key], typ):
                raise DataError(f"{where}: key '{key}' must be a {typ.__name__}, "
                                f"got {type(r[key]).__name__}")
        turns = r["turns"]
        if not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise DataError(f"{where}: key 'turns' must be a non-empty list of non-empty strings "
                            "(an empty dialogue has nothing to answer)")
        if r["intent"] not in INTENTS:
            raise DataError(f"{where}: key 'intent' has unknown label '{r['intent']}' "
                            f"(one of: {', '.join(INTENTS)})")
        if r["lang"] not in ("zh", "en"):
            raise DataError(f"{where}: key 'lang' must be 'zh' or 'en', got '{r['lang']}'")
        if r["escalate"] and r["answer"]:
            raise DataError(f"{where}: key 'answer' must be \"\" when 'escalate' is true")
        if not r["escalate"] and not (r["answer"] and r["doc_ids"]):
            raise DataError(f"{where}: an answerable dialogue needs a non-empty 'answer' "
                            "and 'doc_ids'")
        if r["id"] in seen:
            raise DataError(f"{where}: key 'id' repeats '{r['id']}'")
        seen.add(r["id"])
        out.append(Dialogue(r["id"], r["lang"], [t.strip() for t in turns], r["rewrite"],
                            r["intent"], r["escalate"], r["answer"], list(r["doc_ids"]), where))
    return out


# --------------------------------------------------------------------------- rewriting

@dataclass(frozen=True)
class Entity:
    kind: str            # product | code | tier
    key: str             # S1, E04, gold, ...
    start: int
    end: int


# product code -> (patterns that name it, canonical zh name, canonical en name)
PRODUCTS = {
    "S1": (r"扫地机器人|扫地机|robot vacuum|vacuum", "扫地机器人 S1", "S1 Robot Vacuum"),
    "A2": (r"空气净化器|净化器|air purifier|purifier", "空气净化器 A2", "A2 Air Purifier"),
    "L3": (r"智能门锁|门锁|smart lock|door lock|\block\b", "智能门锁 L3", "L3 Smart Lock"),
    "H1": (r"智能音箱|音箱|smart speaker|speaker", "智能音箱 H1", "H1 Smart Speaker"),
    "C5": (r"摄像头|摄像机|wi-?fi camera|camera", "摄像头 C5", "C5 Wi-Fi Camera"),
}
TIERS = {"silver": (r"银卡|\bsilver\b", "银卡", "Silver"), "gold": (r"金卡|\bgold\b", "金卡", "Gold")}
# topic words a follow-up may leave out: (pattern, display text or None = the matched words)
TOPIC_WORDS = {
    "zh": [(r"保修|质保", None), (r"退货|退款|换货|退", None), (r"发货|配送|快递|运费|安装", None),
           (r"发票|抬头", None), (r"积分|会员", None), (r"付款|支付|分期|取消订单", None),
           (r"隐私|注销|导出", None), (r"账号|验证码|绑定|密码", None), (r"错误代码|故障|报错|报警", None),
           (r"指纹|电池|电量", None), (r"配网|wi-?fi", None), (r"滤芯", None), (r"价格|多少钱", "价格")],
    "en": [(r"warrant(?:y|ies)|guarantee", None), (r"send (?:it |them )?back", "return"),
           (r"returns?|refunds?|exchanges?", None), (r"ship(?:ping)?|dispatch", "shipping"),
           (r"deliver(?:y)?", "delivery"),
           (r"install(?:ation)?", None), (r"invoices?|fapiao", None), (r"points?|membership", None),
           (r"installments?|payments?|\bpay\b|cancel", None), (r"privacy|personal data|export", None),
           (r"account|password|verification code|sms code", None), (r"error|fault", None),
           (r"passcodes?|fingerprints?|batter(?:y|ies)", None), (r"wi-?fi", None), (r"filters?", None),
           (r"\bapp\b", None), (r"price|cost", None)],
}
# topic words that do not depend on the product (membership, invoices, payment, account, ...)
GENERAL_TOPIC = {
    "zh": r"积分|会员|发票|抬头|付款|支付|分期|取消订单|隐私|注销|导出|账号|验证码|发货|配送|快递|运费|退",
    "en": (r"points?|membership|invoices?|fapiao|installments?|payments?|\bpay\b|cancel|privacy|"
           r"personal data|export|account|password|verification code|sms code|ship|dispatch|deliver|"
           r"return|refund|exchange|send (?:it |them )?back"),
}
PRONOUNS = {"zh": r"它的|它|这个|那个|这款|那款|这台|那台",
            "en": r"\bits\b|\bit\b|\bthis one\b|\bthat one\b|\bthem\b|\bthey\b"}
FOLLOW_UP = {"zh": r"^(那么|那|还有|另外|再问)|呢[？?。]*$", "en": r"^(and|what about|how about|also|then)\b"}
FILLER = {"zh": r"那么|那|还有|另外|呢|的|吗|和|跟|[，。？！?!,.\s]",
          "en": r"\b(and|what|about|how|the|a|an|for|with|then|one|also|of)\b|[,.?!\s]"}


def find_entities(text: str) -> list[Entity]:
    """Products (by model code or name), S1/A2 error codes and membership tiers in ``text``."""
    found: list[Entity] = []
    for code, (pat, _zh, _en) in PRODUCTS.items():
        for m in re.finditer(rf"\b{code}\b|{pat}", text, flags=re.I):
            found.append(Entity("product", code, m.start(), m.end()))
    for m in re.finditer(r"\bE\d{2}\b", text):
        found.append(Entity("code", m.group(0), m.start(), m.end()))
    for key, (pat, _zh, _en) in TIERS.items():
        for m in re.finditer(pat, text, flags=re.I):
            found.append(Entity("tier", key, m.start(), m.end()))
    return sorted(found, key=lambda e: e.start)


def canonical(e_kind: str, key: str, lang: str) -> str:
    if e_kind == "product":
        return PRODUCTS[key][1 if lang == "zh" else 2]
    if e_kind == "tier":
        return TIERS[key][1 if lang == "zh" else 2]
    return key


def _replace_entity(text: str, kind: str, new_key: str, lang: str) -> str | None:
    """``text`` with its mentions of the first ``kind`` entity replaced by ``new_key``; None when
    ``text`` has no such entity. Adjacent mentions ("扫地机器人 S1") merge into one."""
    ents = [e for e in find_entities(text) if e.kind == kind]
    if not ents:
        return None
    old = ents[0].key
    spans = sorted((e.start, e.end) for e in ents if e.key == old)
    merged = [list(spans[0])]
    for s, e in spans[1:]:
        if s <= merged[-1][1] or not text[merged[-1][1]:s].strip():
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    new = canonical(kind, new_key, lang)
    out, pos = [], 0
    for i, (s, e) in enumerate(merged):
        out += [text[pos:s], new if i == 0 else ("it" if lang == "en" else "它")]
        pos = e
    return "".join(out) + text[pos:]


def _topic_word(text: str, lang: str) -> str | None:
    """The last topic word in ``text`` (display form), or None."""
    best = None
    for pat, display in TOPIC_WORDS[lang]:
        for m in re.finditer(pat, text, flags=re.I):
            if best is None or m.start() >= best[0]:
                best = (m.start(), display or m.group(0).lower())
    return best[1] if best else None


class RuleRewriter:
    """Contextual rewriting of elliptical follow-ups by carrying entities and topic words.

    ``rewrite(history, text, lang, raw_history)``: ``history`` holds the conversation's earlier
    user turns as already rewritten (so entities carry across three or more turns);
    ``raw_history`` the same turns as typed (topic words are looked up there first).

    - Entity swap: the turn is little more than an entity ("那门锁呢？", "What about E07?"):
      the previous question is repeated with that entity swapped in.
    - Pronoun: a pronoun in a turn that names no product becomes the last product named
      earlier ("它的滤芯…" -> "空气净化器 A2 的滤芯…").
    - Carry: a follow-up (opener such as "那…"/"And…", or short) that names neither a product
      nor a topic word gets the last earlier product and/or topic word put in front
      ("摄像头 C5：…", "Installation for the L3 Smart Lock: …"); a turn with its own
      topic word keeps it and gets the product only where the topic depends on the product
      ("要换几节电池？" yes, "银卡拿积分是几倍？" no).
    - Anything else, and explicit requests for a person, are left as they are.
    """

    def __init__(self, short_zh: int = 12, short_en: int = 8):
        self.short_zh, self.short_en = short_zh, short_en

    def is_short(self, text: str, lang: str) -> bool:
        if lang == "zh":
            return len(re.findall(r"[\u4e00-\u9fff]", text)) <= self.short_zh
        return len(re.findall(r"[A-Za-z0-9]+", text)) <= self.short_en

    def rewrite(self, history: Sequence[str], text: str, lang: str | None = None,
                raw_history: Sequence[str] | None = None) -> str:
        text = text.strip()
        if not history or is_human_request(text):
            return text
        lang = lang or question_lang(text)
        ents = find_entities(text)
        residual = text
        for e in sorted(ents, key=lambda e: -e.start):
            residual = residual[:e.start] + residual[e.end:]
        residual = re.sub(FILLER[lang], "", residual, flags=re.I)
        if ents and not residual.strip():  # "那门锁呢？" / "And the camera?"
            e = ents[0]
            for prev in reversed(history):
                swapped = _replace_entity(prev, e.kind, e.key, lang)
                if swapped is not None:
                    return swapped
            return text
        pronoun = re.search(PRONOUNS[lang], text, flags=re.I)
        follow = (bool(pronoun) or bool(re.search(FOLLOW_UP[lang], text, flags=re.I))
                  or self.is_short(text, lang))
        if not follow:
            return text
        if any(e.kind == "product" for e in ents):
            return text  # names its own product: self-contained enough
        product = None
        for prev in reversed(history):
            prods = [e for e in find_entities(prev) if e.kind == "product"]
            if prods:
                product = canonical("product", prods[-1].key, lang)
                break
        if product and pronoun:
            name = product if lang == "zh" else f"the {product}"
            if pronoun.group(0).lower() in ("its", "它的"):
                name = f"{product}的" if lang == "zh" else f"the {product}'s"
            return text[:pronoun.start()] + name + text[pronoun.end():]
        topic = None
        if _topic_word(text, lang) is not None:  # keeps its own topic word
            if not product or re.search(GENERAL_TOPIC[lang], text, flags=re.I):
                return text  # a product-independent topic ("银卡拿积分…"): no product either
            product_only = True
        else:
            product_only = False
        for prev in [] if product_only else [*reversed(raw_history or []), *reversed(history)]:
            topic = _topic_word(prev, lang)
            if topic:
                break
        if topic and re.search(GENERAL_TOPIC[lang], topic, flags=re.I):
            product = None  # "About installments: …", not "… for the L3 Smart Lock"
        if not product and not topic:
            return text
        # "topic: question" without "关于"/"About": every added word should be a content word,
        # since retrieval confidence counts query words missing from the passage
        if lang == "zh":
            what = f"{product}的{topic}" if product and topic else (product or topic)
            return f"{what}：{text}"
        what = (f"{topic} for the {product}" if product and topic
                else f"the {product}" if product else topic)
        return f"{what[0].upper()}{what[1:]}: {text}"

    def rewrite_dialogue(self, turns: Sequence[str], lang: str | None = None) -> list[str]:
        """Every turn of a conversation rewritten in order, each seeing the earlier rewrites."""
        out: list[str] = []
        for i, t in enumerate(turns):
            out.append(self.rewrite(out, t, lang, turns[:i]))
        return out


def concat_history(history_raw: Sequence[str], text: str) -> str:
    """The naive baseline: all user turns so far joined into one query."""
    return " ".join([*history_raw, text])


REWRITE_SYSTEM = {
    "zh": "把对话中的最后一个问题改写成一个不看上下文也能看懂的完整问题。只输出改写后的问题。",
    "en": ("Rewrite the last question of the conversation as one complete question that can be "
           "understood without the conversation. Output only the rewritten question."),
}
REWRITE_EXAMPLE = {
    "zh": ("对话：\n用户：扫地机器人 S1 的保修期多长？\n最后一个问题：那音箱呢？",
           "智能音箱 H1 的保修期是多久？"),
    "en": ("Conversation:\nUser: How much is the A2 air purifier?\nLast question: How often do I "
           "change its filter?", "How often should I change the A2 air purifier's filter?"),
}


def rewrite_chat(history_raw: Sequence[str], text: str, lang: str) -> list[dict]:
    """A few-shot chat asking an LM to rewrite ``text`` given the earlier user turns."""
    user, last = ("用户：", "最后一个问题：") if lang == "zh" else ("User: ", "Last question: ")
    head = "对话：" if lang == "zh" else "Conversation:"
    ex_q, ex_a = REWRITE_EXAMPLE[lang]
    body = "\n".join([head, *[user + t for t in history_raw], last + text])
    return [{"role": "system", "content": REWRITE_SYSTEM[lang]},
            {"role": "user", "content": ex_q}, {"role": "assistant", "content": ex_a},
            {"role": "user", "content": body}]


def llm_rewrite_many(generator, histories_raw: Sequence[Sequence[str]], texts: Sequence[str],
                     langs: Sequence[str]) -> list[str]:
    """LM rewrites (first line of a greedy reply); the turn itself where the reply is empty or
    there is no history to resolve."""
    todo = [i for i, h in enumerate(histories_raw) if h]
    out = list(texts)
    if not todo:
        return out
    answers = generator.answer_chats([rewrite_chat(histories_raw[i], texts[i], langs[i]) for i in todo],
                                     [texts[i] for i in todo], [langs[i] for i in todo])
    for i, a in zip(todo, answers):
        line = next((ln.strip().strip('"“”') for ln in a.text.splitlines() if ln.strip()), "")
        line = re.sub(r"^(改写后的问题|rewritten question)[:：]\s*", "", line, flags=re.I)
        out[i] = line or texts[i]
    return out


# --------------------------------------------------------------------------- intent routing

HUMAN_REQUEST = {
    "zh": r"转人工|人工客服|人工服务|真人|客服人员|找个人|我要投诉|投诉专员",
    "en": (r"human agent|human being|real person|live agent|representative|operator|"
           r"(?:talk|speak) (?:to|with) (?:a |an )?(?:person|human|someone|agent)|"
           r"get me a (?:human|person)|file a complaint|want to complain"),
}
# asking ABOUT human service ("人工客服几点上班？", "How do I reach a human agent?") is not a request
ASKS_ABOUT = {"zh": r"几点|什么时候|怎么|如何|哪些|多久", "en": r"\b(?:how|when|what time|hours?)\b"}


QUESTION = {"zh": r"[？?]|吗|呢|什么|怎么|怎样|多少|几|哪|多久|是否|能否|可以|可不可以|有没有",
            "en": (r"\?|^(?:how|what|when|where|which|who|why|can|could|do|does|did|is|are|will|"
                   r"would|should|may)\b")}


def is_question(text: str) -> bool:
    """A question (or something asking for information), as opposed to a statement such as
    "我想买一台空气净化器 A2。" that only sets the context for the next turn."""
    return any(re.search(QUESTION[lang], text.strip(), flags=re.I) for lang in ("zh", "en"))


CLARIFY = {"zh": "好的，请问您想了解哪方面的问题？", "en": "Sure. What would you like to know?"}


def is_human_request(text: str) -> bool:
    for lang in ("zh", "en"):
        if re.search(HUMAN_REQUEST[lang], text, flags=re.I) and not re.search(
                ASKS_ABOUT[lang], text, flags=re.I):
            return True
    return False


@dataclass
class Route:
    intent: str          # a topic, human or out_of_scope
    source: str          # rule | model
    prob: float          # the classifier's probability of its label (1.0 for rules)


class IntentRouter:
    """Rules for explicit human requests, then TF-IDF + logistic regression over topics."""

    def __init__(self, C: float = 10.0, ngram: tuple[int, int] = (1, 3), seed: int = 0):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        self.model = make_pipeline(
            TfidfVectorizer(analyzer="char_wb", ngram_range=ngram, sublinear_tf=True, lowercase=True),
            LogisticRegression(C=C, max_iter=3000, random_state=seed))
        self.fitted = False

    @staticmethod
    def examples(path: str | Path) -> tuple[list[str], list[str]]:
        """(question, topic) pairs of an SFT file with a ``topic`` column (instruction + input)."""
        texts, labels = [], []
        for where, r in read_records(path):
            if "topic" not in r or "instruction" not in r:
                raise DataError(f"{where}: missing key '{'topic' if 'instruction' in r else 'instruction'}'")
            texts.append((r["instruction"] + " " + (r.get("input") or "")).strip())
            labels.append(r["topic"])
        return texts, labels

    def fit(self, texts: Sequence[str], labels: Sequence[str]) -> "IntentRouter":
        if len(set(labels)) < 2:
            raise DataError("intent training data needs at least two different topics")
        self.model.fit(list(texts), list(labels))
        self.fitted = True
        return self

    def predict_topics(self, texts: Sequence[str]) -> list[str]:
        return list(self.model.predict(list(texts)))

    def route_many(self, texts: Sequence[str]) -> list[Route]:
        if not self.fitted:
            raise ConfigError("IntentRouter: call fit() before routing")
        probs = self.model.predict_proba(list(texts))
        classes = list(self.model.classes_)
        out = []
        for t, p in zip(texts, probs):
            if is_human_request(t):
                out.append(Route("human", "rule", 1.0))
                continue
            j = int(p.argmax())
            label = classes[j]
            out.append(Route("out_of_scope" if label == "decline" else label, "model", float(p[j])))
        return out


def doc_topic(doc_id: str) -> str:
    """``returns_zh.md`` -> ``returns``."""
    return re.sub(r"_(zh|en)\.md$", "", Path(doc_id).name)


def route_passages(passages: Sequence[Passage], intent: str, mode: RouteMode) -> list[Passage]:
    """Use the routed topic in retrieval: ``boost`` moves passages of the topic's own documents
    to the front (order kept within each group), ``filter`` keeps only them (falling back to
    all passages when none match), ``none`` leaves the ranking alone."""
    if mode == "none" or intent not in TOPICS:
        return list(passages)
    mine = [p for p in passages if doc_topic(p.doc_id) == intent]
    if mode == "filter":
        return mine or list(passages)
    if mode == "boost":
        return mine + [p for p in passages if doc_topic(p.doc_id) != intent]
    raise ConfigError(f"route mode must be none, boost or filter, got '{mode}'")


# --------------------------------------------------------------------------- escalation

REASONS = {
    "requested": ("您要求人工服务", "You asked for a person."),
    "out_of_scope": ("这个问题超出了我们的客服范围", "This question is outside what our support covers."),
    "low_confidence": ("知识库中没有找到足够可靠的资料", "I could not find reliable information in our knowledge base."),
    "model_refused": ("助手无法根据资料作答", "The assistant could not answer from the documents."),
}


def handoff_contact(kb) -> dict[str, str]:
    """Hotline number and hours as written in the knowledge base's contact documents."""
    rows = [r for r in kb.chunk_rows() if doc_topic(r[1]) == "contact"]
    text = "\n".join(r[2] for r in rows)
    phone = re.search(r"\b\d{3}-\d{3}-\d{4}\b", text)
    hours = re.search(r"\d{1,2}:\d{2}\s*[–-]\s*\d{1,2}:\d{2}", text[phone.end():]) if phone else None
    return {"phone": phone.group(0) if phone else "", "hours": hours.group(0) if hours else ""}


def handoff_message(reason: str, lang: str, contact: dict[str, str]) -> str:
    zh, en = REASONS[reason]
    phone, hours = contact.get("phone"), contact.get("hours")
    if lang == "zh":
        tail = f"您也可以拨打客服热线 {phone}" + (f"（每天 {hours}）" if hours else "") + "。" if phone else ""
        return f"{zh}，已为您转接人工客服，请稍候。{tail}"
    tail = (f" You can also call our hotline {phone}" + (f" (daily {hours})" if hours else "") + "."
            if phone else "")
    return f"{en} I am transferring you to a human agent, please hold on.{tail}"


@dataclass
class EscalationPolicy:
    """When to hand over to a person. ``threshold``: minimum retrieval confidence (pick it on
    dev data with ``confidence.choose_threshold``); None disables the confidence rule."""

    threshold: float | None = None
    out_of_scope: bool = True

    def decide(self, intent: str, confidence: float | None) -> str | None:
        if intent == "human":
            return "requested"
        if self.out_of_scope and intent == "out_of_scope":
            return "out_of_scope"
        if self.threshold is not None and confidence is not None and confidence < self.threshold:
            return "low_confidence"
        return None


# --------------------------------------------------------------------------- the assistant

@dataclass
class Reply:
    user: str
    query: str                      # the rewritten, self-contained question
    intent: str
    intent_source: str
    lang: str
    passages: list[Passage] = field(default_factory=list)   # after routing
    retrieved: list[Passage] = field(default_factory=list)  # before routing
    confidence: float | None = None
    kind: str = "answer"            # answer | escalate | clarify (a statement, not a question)
    policy_reason: str | None = None  # escalation decided before generation
    reason: str | None = None         # final escalation reason (also model_refused)
    text: str = ""
    answer: Answer | None = None
    generated: bool = False

    @property
    def escalated(self) -> bool:
        return self.reason is not None

    @property
    def cited_doc_ids(self) -> list[str]:
        return self.answer.cited_doc_ids if self.answer else []


@dataclass
class Conversation:
    session_id: str
    replies: list[Reply] = field(default_factory=list)

    @property
    def user_turns(self) -> list[str]:
        return [r.user for r in self.replies]

    @property
    def queries(self) -> list[str]:
        return [r.query for r in self.replies]


class Assistant:
    """Rewrite → route → retrieve → escalate or answer, one ``Conversation`` per session.

    ``generator`` may be None: replies then stop after the escalation decision (no LM), which is
    how the LM-free parts are measured.
    """

    def __init__(self, kb, router: IntentRouter, scorer, policy: EscalationPolicy,
                 generator=None, rewrite: Literal["rules", "none", "concat", "llm"] = "rules",
                 route_mode: RouteMode = "none", k: int = 10, context_k: int = 3,
                 rewrite_generator=None):
        if rewrite == "llm" and (rewrite_generator or generator) is None:
            raise ConfigError("rewrite=llm needs a generator")
        self.kb, self.router, self.scorer, self.policy = kb, router, scorer, policy
        self.generator, self.rewrite_generator = generator, rewrite_generator or generator
        self.rewrite, self.route_mode, self.k, self.context_k = rewrite, route_mode, k, context_k
        self.rules = RuleRewriter()
        self.contact = handoff_contact(kb)
        self.sessions: dict[str, Conversation] = {}

    def session(self, session_id: str) -> Conversation:
        return self.sessions.setdefault(session_id, Conversation(session_id))

    def rewrite_many(self, convs: Sequence[Conversation], texts: Sequence[str],
                     langs: Sequence[str], how: str | None = None) -> list[str]:
        how = how or self.rewrite
        if how == "none":
            return [t.strip() for t in texts]
        if how == "concat":
            return [concat_history(c.user_turns, t) for c, t in zip(convs, texts)]
        if how == "rules":
            return [self.rules.rewrite(c.queries, t, lang, c.user_turns)
                    for c, t, lang in zip(convs, texts, langs)]
        if how == "llm":
            return llm_rewrite_many(self.rewrite_generator, [c.user_turns for c in convs], texts, langs)
        raise ConfigError(f"rewrite must be rules, none, concat or llm, got '{how}'")

    def respond_many(self, session_ids: Sequence[str], texts: Sequence[str],
                     generate: Sequence[bool] | bool = True) -> list[Reply]:
        """One turn for each of several sessions (batched retrieval and generation)."""
        if len(session_ids) != len(texts):
            raise ValueError("one text per session id")
        for t in texts:
            if not t or not t.strip():
                raise DataError("an empty user turn: nothing to answer")
        gen_flags = [generate] * len(texts) if isinstance(generate, bool) else list(generate)
        convs = [self.session(s) for s in session_ids]
        langs = [question_lang(t) for t in texts]
        queries = self.rewrite_many(convs, texts, langs)
        routes = self.router.route_many(queries)
        retrieved = self.kb.search_many(queries, self.k)
        conf = self.scorer.score_many(queries, retrieved)
        replies = []
        for t, q, lang, r, ps, c in zip(texts, queries, langs, routes, retrieved, conf):
            routed = route_passages(ps, r.intent, self.route_mode)
            reply = Reply(t.strip(), q, r.intent, r.source, lang, routed, ps, c.value)
            reply.policy_reason = reply.reason = self.policy.decide(r.intent, c.value)
            if reply.reason == "requested" or (reply.reason and is_question(t)):
                reply.kind, reply.text = "escalate", handoff_message(reply.reason, lang, self.contact)
            elif not is_question(t):  # context only ("I just bought the L3."): ask, don't escalate
                reply.policy_reason = reply.reason = None
                reply.kind, reply.text = "clarify", CLARIFY[lang]
            replies.append(reply)
        todo = [i for i, rep in enumerate(replies)
                if rep.kind == "answer" and gen_flags[i] and self.generator is not None]
        if todo:
            answers = self.generator.answer_many([replies[i].query for i in todo],
                                                 [replies[i].passages[:self.context_k] for i in todo],
                                                 [replies[i].lang for i in todo])
            for i, a in zip(todo, answers):
                rep = replies[i]
                rep.answer, rep.generated = a, True
                if a.refused:
                    rep.reason, rep.kind = "model_refused", "escalate"
                    rep.text = handoff_message("model_refused", rep.lang, self.contact)
                else:
                    rep.text = a.text
        for conv, rep in zip(convs, replies):
            conv.replies.append(rep)
        return replies

    def respond(self, session_id: str, text: str) -> Reply:
        return self.respond_many([session_id], [text])[0]

    def reset(self, session_id: str | None = None) -> None:
        if session_id is None:
            self.sessions.clear()
        else:
            self.sessions.pop(session_id, None)


# --------------------------------------------------------------------------- evaluation

def retrieval_hit(passage_lists: Sequence[Sequence[Passage]], gold: Sequence[Sequence[str]],
                  k: int = 3) -> dict[str, Any]:
    """Document-level hit@k and MRR@10 over the queries that have gold documents."""
    run = {str(i): ranked_docs(ps) for i, ps in enumerate(passage_lists)}
    qrels = {str(i): dict.fromkeys(g, 1) for i, g in enumerate(gold) if g}
    r = evaluate_run(run, qrels, ks=(1, k))
    return {f"hit@{k}": r.get(f"hit@{k}"), "hit@1": r.get("hit@1"), "mrr@10": r.get("mrr@10"),
            "n": int(r.get("n_queries", 0))}


def prf(predicted: Sequence[bool], gold: Sequence[bool]) -> dict[str, float | int]:
    tp = sum(p and g for p, g in zip(predicted, gold))
    fp = sum(p and not g for p, g in zip(predicted, gold))
    fn = sum(g and not p for p, g in zip(predicted, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def evaluate_dialogues(dialogues: Sequence[Dialogue], replies: Sequence[Reply]) -> dict[str, Any]:
    """Scores of the last-turn replies against the dialogue labels.

    - escalation P/R/F1 of the final decision (``escalation_*``) and of the LM-free policy alone
      (``policy_escalation_*``: request, out of scope, low confidence);
    - ``intent_acc``: routed intent == label;
    - answers (``answer_acc``, ``citation_acc``, ...): ``generate.evaluate_answers`` over turns that
      should be answered and were answered (not escalated); ``answer_acc_all`` counts every
      answerable turn, an escalated one scoring 0.
    """
    if len(dialogues) != len(replies):
        raise ValueError("one reply per dialogue")
    gold = [d.escalate for d in dialogues]
    final = prf([r.escalated for r in replies], gold)
    policy = prf([r.policy_reason is not None for r in replies], gold)
    m: dict[str, Any] = {"n_dialogues": len(dialogues), "n_gold_escalate": sum(gold)}
    m.update({f"escalation_{k}": v for k, v in final.items()})
    m.update({f"policy_escalation_{k}": v for k, v in policy.items()})
    m["intent_acc"] = sum(r.intent == d.intent for d, r in zip(dialogues, replies)) / len(dialogues)
    pairs = [(d, r) for d, r in zip(dialogues, replies) if not d.escalate]
    answered = [(d, r) for d, r in pairs if r.answer is not None and not r.escalated]
    m["n_answerable"], m["n_answered"] = len(pairs), len(answered)
    if answered:
        s = evaluate_answers([r.answer for _, r in answered], [d.answer for d, _ in answered],
                             [d.doc_ids for d, _ in answered])
        m.update({"answer_acc": s["acc"], "citation_acc": s["citation_acc"],
                  "cited_share": s["cited_share"], "attribution_acc": s["attribution_acc"],
                  "answer_f1": s["f1"]})
        m["answer_acc_all"] = s["acc"] * len(answered) / len(pairs)
    else:
        m.update(dict.fromkeys(["answer_acc", "citation_acc", "cited_share", "attribution_acc",
                                "answer_f1", "answer_acc_all"]))
    return m
