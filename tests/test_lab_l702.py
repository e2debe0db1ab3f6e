"""L7.02 LangChain orchestration: the retriever / chat-model adapters, the step-metrics callback
handler, chain-vs-native identity on a small knowledge base, bad input, and the lab end to end."""

import json
import shutil

import pytest
import torch
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.messages import HumanMessage

from conftest import ROOT, SUPPORT, load_lab_module, run_script
from llmtech import labs, models
from llmtech.errors import ConfigError, DataError
from llmtech.rag import lc
from llmtech.rag.generate import Generator, build_prompt
from llmtech.rag.kb import KnowledgeBase

LAB = ROOT / "lessons/lesson7/02_langchain_orchestration/langchain_rag_pipeline.py"
DOCS = ["returns_zh.md", "returns_en.md", "warranty_zh.md", "warranty_en.md"]
QUESTIONS = [{"question": "How long is the warranty of the L3 smart lock?", "lang": "en"},
             {"question": "无理由退货期限是几天？", "lang": "zh"},
             {"question": "What is the battery warranty of the S1?", "lang": "en"}]


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    d = tmp_path_factory.mktemp("l702_docs")
    for name in DOCS:
        shutil.copy(SUPPORT / "kb" / name, d / name)
    return d


@pytest.fixture(scope="module")
def kb(docs, tmp_path_factory):
    kb = KnowledgeBase.build(tmp_path_factory.mktemp("l702_kb") / "kb", docs)
    yield kb
    kb.close()


@pytest.fixture(scope="module")
def gen():
    """A tiny random Llama with its own, larger output head (untied from the embeddings), so
    greedy decoding writes varied text (the default tiny model repeats one token)."""
    tok = models.load_tokenizer("tiny-llama")
    model = models.build_tiny_llama(tok, seed=1)
    weight = torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(1))
    model.lm_head.weight = torch.nn.Parameter(weight * 2)
    return Generator("tiny-llama", max_new_tokens=10, batch_size=1, model=model, tokenizer=tok)


class Tokens(BaseCallbackHandler):
    def __init__(self):
        self.tokens = []

    def on_llm_new_token(self, token, **kw):
        self.tokens.append(token)


def test_retriever_adapter_returns_documents_with_metadata(kb):
    r = lc.KBRetriever(kb=kb, mode="bm25", k=2)
    docs = r.invoke(QUESTIONS[0]["question"])
    native = kb.search(QUESTIONS[0]["question"], 2, "bm25")
    assert len(docs) == 2 and all(isinstance(d, Document) for d in docs)
    for d, p in zip(docs, native):
        assert d.page_content == p.text and d.id == p.id
        assert d.metadata["id"] == p.id and d.metadata["doc_id"] == p.doc_id
        assert d.metadata["score"] == pytest.approx(p.score) and d.metadata["title"] == p.title
        assert d.metadata["doc_id"] in DOCS and d.metadata["title"]
        assert lc.document_to_passage(d).id == p.id
    assert docs[0].metadata["doc_id"].startswith("warranty")
    assert r.busy_seconds > 0
    with pytest.raises(ConfigError, match="unknown 'sparse'"):
        lc.KBRetriever(kb=kb, mode="sparse")
    with pytest.raises(ConfigError, match="k"):
        lc.KBRetriever(kb=kb, k=0)
    with pytest.raises(DataError, match="empty"):
        r.invoke("   ")


def test_chat_model_adapter_matches_generator_and_reports_tokens(kb, gen):
    passages = kb.search(QUESTIONS[1]["question"], 2, "bm25")
    prompt = build_prompt(QUESTIONS[1]["question"], passages, "zh")
    text, n_prompt, n_out, _ = gen.generate_texts([gen.chat_text(prompt)])[0]
    assert text.strip()  # the scaled tiny model writes something
    llm = lc.GeneratorChatModel(generator=gen)
    assert llm.render([HumanMessage(prompt)]) == gen.chat_text(prompt)
    seen = Tokens()
    msg = llm.invoke([HumanMessage(prompt)], config={"callbacks": [seen]})
    assert msg.content == text
    assert msg.usage_metadata["input_tokens"] == n_prompt
    assert msg.usage_metadata["output_tokens"] == n_out
    assert msg.usage_metadata["total_tokens"] == n_prompt + n_out
    # the streamed deltas add up to the answer
    assert len(seen.tokens) > 1 and "".join(seen.tokens) == text
    result = llm.generate([[HumanMessage(prompt)]])
    assert result.llm_output["token_usage"]["input_tokens"] == n_prompt
    assert llm._llm_type == "llmtech-generator"


def test_callback_handler_records_every_step(kb, gen):
    chain = lc.build_rag_chain(lc.KBRetriever(kb=kb, mode="hybrid", k=2),
                               lc.GeneratorChatModel(generator=gen))
    m = lc.StepMetrics()
    for x in QUESTIONS[:2]:
        chain.invoke(x, config={"callbacks": [m]})
    rows = m.per_chain()
    assert len(rows) == 2
    for row in rows:
        for step in ("retrieve", "prompt", "llm", "parse", "chain"):
            assert row[f"{step}_ms"] > 0, step
        assert row["chain_ms"] >= row["retrieve_ms"] + row["llm_ms"] + row["prompt_ms"]
        assert row["llm_calls"] == 1 and row["errors"] == 0
        assert row["input_tokens"] > 100 and 0 < row["output_tokens"] <= 10
        assert 0 < row["first_token_ms"] < row["chain_ms"]
    steps = {r["step"] for r in m.runs.values()}
    assert {"retrieve", "prompt", "llm", "parse", "chain"} <= steps
    s = m.summary()
    assert s["n_chains"] == 2 and 0 < s["llm_share"] < 1 and s["tokens_per_s"] > 0


def test_chain_and_native_give_identical_answers(kb, gen):
    chain = lc.build_rag_chain(lc.KBRetriever(kb=kb, mode="hybrid", k=2),
                               lc.GeneratorChatModel(generator=gen))
    for x in QUESTIONS:
        a = chain.invoke(x)
        b = gen.answer(x["question"], kb.search(x["question"], 2, "hybrid"), x["lang"])
        assert a.text == b.text and a.text
        assert [p.id for p in a.passages] == [p.id for p in b.passages]
        assert (a.citations, a.cited_doc_ids, a.refused) == (b.citations, b.cited_doc_ids, b.refused)
        assert (a.prompt_tokens, a.completion_tokens, a.lang) == (b.prompt_tokens, b.completion_tokens, b.lang)
    # the retrieval-confidence gate: no model call, the same refusal as the native pipeline
    gated = lc.build_rag_chain(lc.KBRetriever(kb=kb, k=2), lc.GeneratorChatModel(generator=gen),
                               min_score=1e9)
    m = lc.StepMetrics()
    a = gated.invoke(QUESTIONS[1], config={"callbacks": [m]})
    gen.min_score = 1e9
    try:
        b = gen.answer(QUESTIONS[1]["question"], kb.search(QUESTIONS[1]["question"], 2), "zh")
    finally:
        gen.min_score = None
    assert (a.text, a.refused, a.reason) == (b.text, b.refused, b.reason) == (b.text, True, "low_score")
    assert m.per_chain()[0]["llm_calls"] == 0
    with pytest.raises(DataError, match="empty"):
        chain.invoke("")
    with pytest.raises(DataError, match="'question'"):
        chain.invoke({"q": "hello"})


def test_lab_missing_kb_folder_is_a_clear_error(tmp_path):
    mod = load_lab_module(LAB, "l702_lab")
    ctx = labs.LabContext(out=tmp_path, lab_id="L7.02", title="t")
    with pytest.raises(DataError, match="no_such_kb"):
        mod.main(mod.Config(kb_docs=str(tmp_path / "no_such_kb")), ctx)
    with pytest.raises(ConfigError, match="unknown 'vector'"):
        mod.main(mod.Config(model="tiny-llama", retrieval="vector", kb_docs=str(SUPPORT / "kb"),
                            questions=2), labs.LabContext(out=tmp_path, lab_id="L7.02", title="t"))


def test_lab_end_to_end_tiny(tmp_path, docs):
    r = run_script(LAB, "--quick", "--out", tmp_path / "out", "model=tiny-llama", "questions=2",
                   f"kb_docs={docs}", "max_new_tokens=6", "native_batch_size=2", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "out/metrics.json").read_text())
    assert m["lab"] == "L7.02" and m["n_questions"] == 2
    assert m["answers_identical_rate"] == 1.0 and m["citations_identical_rate"] == 1.0
    assert m["passages_identical_rate"] == 1.0
    for key in ("retrieve_ms_mean", "prompt_ms_mean", "llm_ms_mean", "parse_ms_mean",
                "tokens_per_s", "tokens_per_s_worker_thread"):
        assert m[key] > 0, key
    assert 0 < m["llm_share"] <= 1 and 0 <= m["acc_chain"] <= 1
    assert m["acc_chain"] == m["acc_native"]
    assert (tmp_path / "out/step_latency.png").stat().st_size > 5000
    assert "逐题对比" in (tmp_path / "out/report.md").read_text()
