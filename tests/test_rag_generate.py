"""RAG answer generation (prompts, citations, refusals) and rerankers."""

import pytest

from llmtech import models
from llmtech.errors import ModelNotAvailable
from llmtech.rag import generate as G
from llmtech.rag.rerank import CrossEncoderReranker, LLMReranker, make_reranker
from llmtech.rag.types import Hit, Passage

P = [Passage("warranty_zh.md#0", "warranty_zh.md", "智能门锁 L3：保修 36 个月，电池不在保修范围。", 3.0,
             "保修政策"),
     Passage("shipping_en.md#1", "shipping_en.md", "Orders over ¥99 ship free.", 2.0, "Shipping"),
     Passage("warranty_en.md#0", "warranty_en.md", "L3 Smart Lock: 36 months; batteries not covered.",
             1.0)]


class ScriptedGenerator(G.Generator):
    """A Generator whose 'model' returns fixed replies, to test everything around the model."""

    def __init__(self, replies, **kw):
        super().__init__(model=object(), tokenizer=object(), **kw)
        self.replies, self.prompts = list(replies), []

    def chat_text(self, user):
        return user

    def generate_texts(self, texts, streamer=None):
        self.prompts += texts
        return [(self.replies.pop(0), 100, 7, 0.5) for _ in texts]


# --------------------------------------------------------------------------- prompts

def test_prompt_zh_numbers_passages_and_asks_for_citations_and_refusal():
    p = G.build_prompt("智能门锁 L3 的保修期是多久？", P)
    assert G.question_lang("智能门锁 L3 的保修期是多久？") == "zh"
    assert "[1] (保修政策 · warranty_zh.md)\n智能门锁 L3：保修 36 个月" in p
    assert "[2] (Shipping · shipping_en.md)" in p and "[3] (warranty_en.md)" in p
    assert "问题：智能门锁 L3 的保修期是多久？" in p
    assert "只根据上面的资料" in p and "[1]" in p and G.REFUSAL["zh"] in p
    assert "Answer the question" not in p


def test_prompt_en_and_closed_book_variant():
    p = G.build_prompt("How long is the L3 warranty?", P)
    assert G.question_lang("How long is the L3 warranty?") == "en"
    assert p.startswith("Context:\n[1] (保修政策 · warranty_zh.md)")
    assert "ONLY the context" in p and G.REFUSAL["en"] in p and "Question: How long" in p
    closed = G.build_prompt("How long is the L3 warranty?", None, no_context=True)
    assert "Context" not in closed and "[1]" not in closed and G.CLOSED_BOOK_REFUSAL["en"] in closed
    closed_zh = G.build_prompt("L3 保修多久？", None, no_context=True)
    assert "资料" not in closed_zh and G.CLOSED_BOOK_REFUSAL["zh"] in closed_zh
    assert G.build_prompt("Q?", [P[0]], "en", max_passage_chars=5).count("…") == 1


def test_refusal_detection():
    assert G.is_refusal(G.REFUSAL["zh"]) and G.is_refusal(G.REFUSAL["en"])
    assert G.is_refusal("Sorry, I couldn’t find the answer in the documents.")
    assert G.is_refusal("我不知道。") and not G.is_refusal("保修 36 个月 [1]")


# --------------------------------------------------------------------------- answers

def test_citations_are_parsed_mapped_and_out_of_range_dropped():
    gen = ScriptedGenerator(["The L3 warranty is 36 months [3][7], see also [1] and [3]."])
    a = gen.answer("How long is the L3 warranty?", P)
    assert a.citations == [3, 1] and a.invalid_citations == [7]
    assert a.cited_doc_ids == ["warranty_en.md", "warranty_zh.md"]
    assert not a.refused and not a.echoed and a.reason == "model"
    assert (a.prompt_tokens, a.completion_tokens, a.seconds) == (100, 7, 0.5)
    assert a.attributed == []  # attribute=False: no guessing


def test_copied_context_is_not_a_citation_and_attribution_is_separate():
    echo = "[1] (保修政策 · warranty_zh.md) 智能门锁 L3：保修 36 个月"
    gen = ScriptedGenerator([echo, "Batteries are not covered; 36 months."], attribute=True)
    a, b = gen.answer_many(["L3 保修多久？", "How long is the L3 warranty?"], [P, P])
    assert a.echoed and a.citations == [] and a.cited_doc_ids == []
    assert a.attributed == [1] and a.attributed_doc_ids == ["warranty_zh.md"]
    assert b.citations == [] and b.attributed == [3] and b.attributed_doc_ids == ["warranty_en.md"]
    assert G.attribute_by_overlap("zzz", P) is None


def test_copied_context_cut_by_the_token_limit_is_not_a_citation():
    header = G.passage_header(P[0])
    for cut in (2, len(header) // 2, len(header)):
        a = G.finish_answer(G.Answer("q", f"保修 36 个月。[1] ({header[:cut]}", False, passages=P))
        assert a.echoed and a.citations == [], cut
    # a real citation followed by an unrelated parenthesis still counts
    a = G.finish_answer(G.Answer("q", "保修 36 个月 [1] (电池除外", False, passages=P))
    assert a.citations == [1] and not a.echoed


def test_refusal_without_passages_or_below_min_score_skips_the_model():
    gen = ScriptedGenerator(["36 months [1]"], min_score=1.5)
    empty, low, ok = gen.answer_many(["Q1?", "Q2?", "How long?"],
                                     [[], [P[2]], P])
    for a in (empty, low):
        assert a.refused and a.text == G.REFUSAL["en"] and a.completion_tokens == 0
        assert not a.called_model and a.citations == []
    assert (empty.reason, low.reason) == ("no_passages", "low_score")
    assert ok.reason == "model" and ok.citations == [1] and len(gen.prompts) == 1
    zh = ScriptedGenerator([]).answer("保修多久？", [])
    assert zh.refused and zh.text == G.REFUSAL["zh"]


def test_model_refusal_and_closed_book():
    gen = ScriptedGenerator([G.REFUSAL["en"], "I don't know.", "36 months [1]"])
    a = gen.answer("What is the CEO's name?", P)
    assert a.refused and a.reason == "model"
    closed = gen.answer("What is the CEO's name?", None)
    assert closed.reason == "closed_book" and closed.refused and closed.passages == []
    assert "Context" not in gen.prompts[-1]
    cb = gen.answer("L3?", None)
    assert cb.citations == [] and cb.invalid_citations == [1]  # nothing to cite without context


def test_evaluate_answers_counts_accuracy_refusals_and_citations_apart():
    gen = ScriptedGenerator(["36 个月 [1]", "It is ¥99 [2].", "36 months.", G.REFUSAL["en"]],
                            attribute=True)
    answers = gen.answer_many(["L3 保修多久？", "Free shipping?", "L3?", "CEO?"], [P] * 4)
    refs = ["36个月", "¥99", "36 months", ""]
    docs = [["warranty_zh.md"], ["warranty_zh.md"], ["warranty_en.md"], []]
    m = G.evaluate_answers(answers, refs, docs)
    assert m["acc"] == 1.0 and m["acc_zh"] == 1.0 and m["acc_en"] == 1.0
    assert m["refusal_acc"] == 1.0 and m["refused_unanswerable"] == 1.0 and m["false_refusal"] == 0
    assert m["cited_share"] == pytest.approx(2 / 3)
    assert m["citation_acc"] == 0.5  # [1] -> warranty_zh.md is right, [2] -> shipping_en.md is not
    assert m["attributed_share"] == pytest.approx(1 / 3) and m["attribution_acc"] == 1.0
    answers[0].refused = True  # a refusal of an answerable question scores 0 and is a false refusal
    m = G.evaluate_answers(answers, refs, docs)
    assert m["acc_zh"] == 0.0 and m["false_refusal"] == pytest.approx(1 / 3)
    assert m["refusal_acc"] == 0.75


def test_generator_runs_a_real_model_greedily(tiny):
    model, tok = tiny
    gen = G.Generator("tiny-llama", max_new_tokens=6, model=model, tokenizer=tok, batch_size=2)
    qs = ["How long is the L3 warranty?", "L3 保修多久？", "Free shipping?"]
    first = gen.answer_many(qs, [P, P[:1], None])
    again = gen.answer_many(qs, [P, P[:1], None])
    assert [a.text for a in first] == [a.text for a in again]  # greedy: deterministic
    for a in first:
        assert a.prompt_tokens > 20 and 1 <= a.completion_tokens <= 6 and a.seconds > 0
    assert first[0].prompt_tokens > first[2].prompt_tokens  # context makes the prompt longer
    assert first[2].reason == "closed_book"


# --------------------------------------------------------------------------- rerankers

@pytest.mark.parametrize("method", ["yes_no", "query_likelihood"])
def test_llm_reranker_batching_does_not_change_scores(tiny, method):
    model, tok = tiny
    texts = [p.text for p in P] + ["a much longer passage " * 12]
    batched = LLMReranker("tiny-llama", method, batch_size=4, model=model, tokenizer=tok)
    single = LLMReranker("tiny-llama", method, batch_size=1, model=model, tokenizer=tok)
    a, b = batched.score("L3 warranty?", texts), single.score("L3 warranty?", texts)
    assert a == pytest.approx(b, abs=1e-3)
    assert batched.stats["forward_passes"] == 1 and single.stats["forward_passes"] == 4
    assert batched.stats["pairs"] == 4 and batched.stats["tokens"] == single.stats["tokens"] > 0


@pytest.mark.slow
def test_llm_reranker_puts_the_obvious_passage_first(smol):
    model, tok = smol
    query = "How many months is the warranty of the L3 smart lock?"
    passages = [Passage("fruit", "fruit.md", "Bananas are yellow fruit rich in potassium."),
                Passage("lock", "warranty.md", "The L3 smart lock has a warranty of 36 months."),
                Passage("weather", "weather.md", "Tomorrow it will rain in the afternoon.")]
    for spec in ("llm", "llm-ql"):
        rr = make_reranker(spec, loaded={models.DEFAULT_LM: (model, tok)})
        out = rr.rerank(query, passages, top=2)
        assert [p.id for p in out][0] == "lock" and len(out) == 2
        assert out[0].score >= out[1].score and out[0].meta["retrieval_rank"] == 2
        cost = rr.cost()
        assert cost["pairs"] == 3 and cost["forward_passes"] == 1 and cost["seconds"] > 0
        hits = rr.rerank_hits(query, [Hit("fruit", 1.0), Hit("lock", 0.5)],
                              {"fruit": passages[0].text, "lock": passages[1].text})
        assert hits[0].id == "lock"


def test_make_reranker_specs_and_clear_errors():
    assert make_reranker(None) is None and make_reranker("none") is None
    with pytest.raises(ModelNotAvailable, match="--rerank llm"):
        make_reranker("no-such-reranker")
    with pytest.raises(ModelNotAvailable, match="--rerank llm"):  # conftest sets HF_HUB_OFFLINE
        make_reranker("hf:cross-encoder/ms-marco-MiniLM-L-6-v2")
    with pytest.raises(ValueError, match="method"):
        LLMReranker(method="pairwise", model=object(), tokenizer=object())


def _tiny_cross_encoder(folder):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab += list("保修期多久门锁个月电池")
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        num_labels=1)
    BertForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_cross_encoder_reranker_on_a_tiny_local_model(tmp_path):
    folder = _tiny_cross_encoder(tmp_path / "ce")
    rr = make_reranker(str(folder))
    assert isinstance(rr, CrossEncoderReranker)
    want = rr.model.predict([("L3 保修多久", p.text) for p in P])
    out = rr.rerank("L3 保修多久", P)
    assert [p.id for p in out] == [P[i].id for i in sorted(range(3), key=lambda i: -want[i])]
    assert [p.score for p in out] == pytest.approx(sorted(want, reverse=True), abs=1e-5)
    assert {p.meta["retrieval_score"] for p in out} == {3.0, 2.0, 1.0}
    assert rr.stats["pairs"] == 3 and rr.stats["tokens"] > 0 and rr.stats["queries"] == 1
    assert rr.rerank("q", []) == [] and len(rr.rerank("L3", P, top=1)) == 1
