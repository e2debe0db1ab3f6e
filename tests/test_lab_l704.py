"""L7.04 enterprise customer-service case: rule rewriting, intent routing, escalation policy,
the dialogue file (schema + facts against the KB), and the lab end to end on a tiny setting."""

import json
import re
import shutil

import pytest

from conftest import ROOT, SUPPORT, run_script
from llmtech.errors import DataError
from llmtech.rag import dialogue as dlg

LAB = ROOT / "lessons/lesson7/04_enterprise_case/customer_service_case.py"
KB_DOCS = ["warranty_en.md", "warranty_zh.md", "returns_en.md", "returns_zh.md", "contact_en.md",
           "contact_zh.md", "products_en.md", "products_zh.md"]


# --------------------------------------------------------------------------- rewriting

@pytest.mark.parametrize("history,turn,expected", [
    # entity swap: the follow-up is only a product / an error code / a tier
    (["扫地机器人 S1 的保修期多长？"], "那音箱呢？", "智能音箱 H1 的保修期多长？"),
    (["How long is the warranty on the H1 speaker?"], "And the camera?",
     "How long is the warranty on the C5 Wi-Fi Camera?"),
    (["What does E02 mean on the robot vacuum?"], "What about E05?", "What does E05 mean on the robot vacuum?"),
    (["银卡拿积分是几倍？"], "那金卡呢？", "金卡拿积分是几倍？"),
    # pronouns become the product named earlier
    (["How much is the A2 air purifier?"], "How often do I replace its filter?",
     "How often do I replace the A2 Air Purifier's filter?"),
    (["摄像头 C5 多少钱？"], "它防水吗？", "摄像头 C5防水吗？"),
    # a short follow-up gets the product (product-specific topic) or the topic word carried
    (["我家的门锁是 L3。"], "要换几节电池？", "智能门锁 L3：要换几节电池？"),
    (["Can I pay for the lock in installments?"], "Which plans are interest-free?",
     "Installments: Which plans are interest-free?"),
    (["我想开发票。"], "签收多久以后就不能申请了？", "发票：签收多久以后就不能申请了？"),
    # left alone: self-contained, a general topic of its own, an explicit request for a person
    (["扫地机器人多少钱？"], "发票在哪里下载？", "发票在哪里下载？"),
    (["What does E02 mean on the robot vacuum?"], "How heavy is the H1 speaker?", "How heavy is the H1 speaker?"),
    (["门锁一直报警。"], "帮我转人工。", "帮我转人工。"),
    ([], "那门锁呢？", "那门锁呢？"),
])
def test_rule_rewrites_follow_ups(history, turn, expected):
    assert dlg.RuleRewriter().rewrite(history, turn, None, history) == expected


def test_rewrite_chains_over_three_turns_and_baselines():
    turns = ["I got the robot vacuum last week.", "Can I send it back if I don't like it?",
             "How many days do I have?"]
    out = dlg.RuleRewriter().rewrite_dialogue(turns, "en")
    assert out[0] == turns[0]
    assert out[1] == "Can I send the S1 Robot Vacuum back if I don't like it?"
    assert out[2] == "Return: How many days do I have?"   # "send it back" is a return
    assert dlg.concat_history(turns[:2], turns[2]) == " ".join(turns)


# --------------------------------------------------------------------------- routing

def test_intent_router_beats_majority_and_human_rules():
    router = dlg.IntentRouter().fit(*dlg.IntentRouter.examples(SUPPORT / "sft_train.jsonl"))
    x, y = dlg.IntentRouter.examples(SUPPORT / "sft_test.jsonl")
    acc = sum(p == t for p, t in zip(router.predict_topics(x), y)) / len(y)
    majority = max(y.count(t) for t in set(y)) / len(y)
    assert acc > majority + 0.3 and acc > 0.5
    assert dlg.is_human_request("你说的我都试过了，帮我转人工")
    assert dlg.is_human_request("This is ridiculous, get me a human agent now.")
    assert not dlg.is_human_request("人工客服几点上班？")      # asks ABOUT the service
    assert not dlg.is_human_request("How do I reach a human agent?")
    routes = router.route_many(["Let me talk to a real person.", "What is the L3 warranty period?"])
    assert (routes[0].intent, routes[0].source) == ("human", "rule")
    assert (routes[1].intent, routes[1].source) == ("warranty", "model")
    with pytest.raises(DataError):
        dlg.IntentRouter().fit(["a", "b"], ["x", "x"])


def test_route_passages_boost_and_filter():
    P = dlg.Passage
    ps = [P("a#0", "products_en.md", "x"), P("b#0", "warranty_en.md", "y"), P("c#0", "warranty_zh.md", "z")]
    ids = lambda xs: [p.doc_id for p in xs]  # noqa: E731
    assert ids(dlg.route_passages(ps, "warranty", "boost")) == ["warranty_en.md", "warranty_zh.md", "products_en.md"]
    assert ids(dlg.route_passages(ps, "warranty", "filter")) == ["warranty_en.md", "warranty_zh.md"]
    assert ids(dlg.route_passages(ps, "privacy", "filter")) == ids(ps)   # nothing matches: keep all
    assert ids(dlg.route_passages(ps, "human", "boost")) == ids(ps)


# --------------------------------------------------------------------------- escalation

@pytest.fixture(scope="module")
def tiny_kb(tmp_path_factory):
    from llmtech.rag.kb import KnowledgeBase

    docs = tmp_path_factory.mktemp("docs")
    for name in KB_DOCS:
        shutil.copy(SUPPORT / "kb" / name, docs / name)
    kb = KnowledgeBase.build(tmp_path_factory.mktemp("kb") / "kb", docs)
    yield kb
    kb.close()


def test_escalation_on_request_low_confidence_and_history_per_session(tiny_kb):
    from llmtech.rag.confidence import ConfidenceScorer

    router = dlg.IntentRouter().fit(*dlg.IntentRouter.examples(SUPPORT / "sft_train.jsonl"))
    policy = dlg.EscalationPolicy(threshold=0.5)
    bot = dlg.Assistant(tiny_kb, router, ConfidenceScorer(tiny_kb), policy, generator=None)
    assert bot.contact == {"phone": "400-820-7316", "hours": "9:00–21:00"}  # read from the KB
    assert policy.decide("human", 0.99) == "requested"
    assert policy.decide("out_of_scope", 0.99) == "out_of_scope"
    assert policy.decide("warranty", 0.49) == "low_confidence"
    assert policy.decide("warranty", 0.5) is None
    assert dlg.EscalationPolicy(threshold=None).decide("warranty", 0.0) is None

    ok = bot.respond("a", "What is the warranty period of the L3 smart lock?")
    assert not ok.escalated and ok.kind == "answer" and ok.confidence >= 0.5
    assert "warranty_en.md" in [p.doc_id for p in ok.passages[:3]]
    follow = bot.respond("a", "And the camera?")           # rewritten from session a's history
    assert follow.query == "What is the warranty period of the C5 Wi-Fi Camera?"
    assert not follow.escalated and follow.intent == "warranty"
    other = bot.respond("b", "And the camera?")             # session b has no history
    assert other.query == "And the camera?"
    asked = bot.respond("b", "I want to talk to a real person.")
    assert asked.reason == "requested" and "400-820-7316" in asked.text
    low = bot.respond("c", "Does the H1 speaker support Zigbee mesh pairing with thermostats?")
    assert low.reason == "low_confidence" and low.confidence < 0.5
    zh = bot.respond("d", "帮我转人工客服")
    assert zh.reason == "requested" and "热线 400-820-7316" in zh.text
    said = bot.respond("e", "I just bought the L3 smart lock.")  # a statement: ask, do not escalate
    assert said.kind == "clarify" and not said.escalated
    assert [len(bot.session(s).replies) for s in "abcde"] == [2, 2, 1, 1, 1]
    with pytest.raises(DataError):
        bot.respond("a", "   ")


def test_evaluate_dialogues_counts_by_hand():
    d = [dlg.Dialogue("1", "en", ["q"], "q", "warranty", False, "12 months", ["warranty_en.md"]),
         dlg.Dialogue("2", "en", ["q"], "q", "human", True, "", []),
         dlg.Dialogue("3", "en", ["q"], "q", "products", True, "", [])]
    r = [dlg.Reply("q", "q", "warranty", "model", "en"), dlg.Reply("q", "q", "human", "rule", "en"),
         dlg.Reply("q", "q", "warranty", "model", "en")]
    r[1].reason = r[1].policy_reason = "requested"
    m = dlg.evaluate_dialogues(d, r)
    # escalated 1 of 2 that should be, no false alarm
    assert (m["escalation_precision"], m["escalation_recall"]) == (1.0, 0.5)
    assert m["intent_acc"] == pytest.approx(2 / 3)
    assert m["n_answerable"] == 1 and m["n_answered"] == 0 and m["answer_acc"] is None


# --------------------------------------------------------------------------- data file

def test_dialogue_file_errors_name_file_line_and_key(tmp_path):
    good = {"id": "x1", "lang": "zh", "turns": ["门锁保修多久？"], "rewrite": "门锁保修多久？",
            "intent": "warranty", "escalate": False, "answer": "36个月", "doc_ids": ["warranty_zh.md"]}
    cases = [
        ("{not json", r"bad\.jsonl:2: malformed JSON"),
        (json.dumps({k: v for k, v in good.items() if k != "intent"}), r"bad\.jsonl:2: missing key 'intent'"),
        (json.dumps({**good, "id": "x2", "turns": []}), r"bad\.jsonl:2: key 'turns'.*empty dialogue"),
        (json.dumps({**good, "id": "x2", "intent": "weather"}), r"bad\.jsonl:2: key 'intent'.*'weather'"),
        (json.dumps({**good, "id": "x2", "escalate": "yes"}), r"bad\.jsonl:2: key 'escalate' must be a bool"),
        (json.dumps(good), r"bad\.jsonl:2: key 'id' repeats"),
    ]
    for line, pattern in cases:
        f = tmp_path / "bad.jsonl"
        f.write_text(json.dumps(good, ensure_ascii=False) + "\n" + line + "\n", encoding="utf-8")
        with pytest.raises(DataError, match=pattern):
            dlg.load_dialogues(f)
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError):
        dlg.load_dialogues(tmp_path / "empty.jsonl")


def test_shipped_dialogues_agree_with_the_knowledge_base():
    ds = dlg.load_dialogues(SUPPORT / "dialogues.jsonl")
    assert 36 <= len(ds) <= 48
    assert abs(sum(d.lang == "zh" for d in ds) - sum(d.lang == "en" for d in ds)) <= 2
    assert 0.2 <= sum(d.escalate for d in ds) / len(ds) <= 0.35
    assert all(2 <= len(d.turns) <= 4 for d in ds)
    assert {"human", "out_of_scope"} <= {d.intent for d in ds}
    norm = lambda s: re.sub(r"\s+", "", s).lower()  # noqa: E731
    kb = SUPPORT / "kb"
    for d in ds:
        for doc in d.doc_ids:
            assert (kb / doc).exists(), f"{d.id}: {doc} is not a KB file"
        if not d.escalate:  # the gold answer is written in the same-language gold document
            assert d.doc_ids[0].endswith(f"_{d.lang}.md"), d.id
            assert norm(d.answer) in norm((kb / d.doc_ids[0]).read_text(encoding="utf-8")), d.id


# --------------------------------------------------------------------------- the lab

def test_lab_end_to_end_tiny(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in KB_DOCS:
        shutil.copy(SUPPORT / "kb" / name, docs / name)
    keep = {"d01", "e15", "e01"}
    rows = [line for line in (SUPPORT / "dialogues.jsonl").read_text(encoding="utf-8").splitlines()
            if json.loads(line)["id"] in keep]
    (tmp_path / "dialogues.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    r = run_script(LAB, "--quick", "--out", out, "model=tiny-llama", f"kb_dir={docs}",
                   f"dialogues={tmp_path / 'dialogues.jsonl'}", "n_dialogues=0", "transcript=e01",
                   "max_new_tokens=4", "compare_llm_rewrite=false", "hit_k=1", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert m["n_dialogues"] == 3 and m["kb_documents"] == len(KB_DOCS)
    assert m["n_gold_escalate"] == 1 and m["escalation_recall"] == 1.0   # e15 asks for a person
    assert m["intent_test_acc"] > m["intent_majority_acc"]
    # both follow-ups ("那门锁呢？", "And the camera?") need their history to rank the warranty doc first
    assert m["rewrite_rules_hit"] == 1.0 and m["rewrite_gold_hit"] == 1.0
    assert m["rewrite_none_hit"] < m["rewrite_rules_hit"]
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "完整对话示例 e01" in report and "And the camera?" in report
    bad = tmp_path / "bad.jsonl"
    bad.write_text(rows[0] + "\n{oops\n", encoding="utf-8")
    r = run_script(LAB, "--quick", "--out", tmp_path / "o2", "model=tiny-llama", f"dialogues={bad}",
                   f"kb_dir={docs}", timeout=120)
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr and "Traceback" not in r.stderr
