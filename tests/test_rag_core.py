"""Retrieval core: tokenizer, BM25, metrics, fusion, chunking, BEIR reader."""

import json
import math

import numpy as np
import pytest

from llmtech.errors import ConfigError, DataError
from llmtech.rag import fusion
from llmtech.rag.beir import load_beir
from llmtech.rag.bm25 import BM25Index, tokenize
from llmtech.rag.chunking import ChunkConfig, chunk_text, sentence_spans
from llmtech.rag.metrics import (answer_scores, citation_accuracy, cited_numbers, evaluate_run,
                                 mrr_at_k, ndcg_at_k, recall_at_k)
from llmtech.rag.retrieve import query_languages
from llmtech.rag.types import Hit

# --------------------------------------------------------------------------- tokenizer / BM25


def test_tokenize_segments_chinese_and_stems_english():
    toks = tokenize("S1 扫地机器人的保修期是多久？Running the filters")
    assert "扫地" in toks and "机器人" in toks and "保修期" in toks
    assert "的" not in toks and "是" not in toks          # Chinese function words dropped
    assert "run" in toks and "filter" in toks and "the" not in toks   # stemmed, stopword dropped
    assert "s1" in toks


def test_jieba_beats_default_splitter_on_chinese():
    import bm25s

    docs = ["扫地机器人的电池保修十二个月", "空气净化器的滤芯每六个月更换", "智能门锁提供免费上门安装"]
    query = "门锁安装收费吗"
    ours = BM25Index().build(["a", "b", "c"], docs).search(query, 3)
    assert ours and ours[0].id == "c"
    # bm25s' own splitter keeps a whole Chinese run as one token, so the query matches nothing
    plain = bm25s.BM25()
    plain.index(bm25s.tokenize(docs, show_progress=False), show_progress=False)
    assert plain.get_scores(bm25s.tokenize([query], show_progress=False, return_ids=False)[0]).max() == 0


def test_bm25_matches_rank_bm25_scores():
    from rank_bm25 import BM25Okapi

    corpus = ["the cat sat on the mat", "dogs chase cats in the garden", "a bird sang",
              "cats and dogs are pets", "the garden has a pond", "fish swim in the pond"]
    index = BM25Index(k1=1.5, b=0.75, method="robertson").build([str(i) for i in range(6)], corpus)
    tokens = [tokenize(t) for t in corpus]
    ref = BM25Okapi(tokens, k1=1.5, b=0.75)
    q = tokenize("cat in garden pond")
    ours = index._bm25.get_scores(q)
    # rank_bm25 multiplies every score by (k1 + 1); the ranking is identical
    np.testing.assert_allclose(ref.get_scores(q), ours * 2.5, rtol=1e-5)


def test_bm25_unknown_or_empty_query_returns_nothing(tmp_path):
    index = BM25Index().build(["a", "b"], ["保修 政策", "return policy"])
    assert index.search_many(["zzz qqq", "", "的"], 5) == [[], [], []]   # no crash (bm25s bug)
    assert index.search("return", 5)[0].id == "b"
    index.save(tmp_path / "bm25")
    again = BM25Index.load(tmp_path / "bm25")
    assert again.search_many(["return policy", "保修"], 2) == index.search_many(["return policy", "保修"], 2)
    assert BM25Index().search("x") == []


# --------------------------------------------------------------------------- metrics


def test_metrics_against_hand_computed_values():
    rels = {"d1": 1, "d3": 1}
    ranked = ["d2", "d1", "d4", "d3"]
    assert recall_at_k(ranked, rels, 2) == 0.5
    assert mrr_at_k(ranked, rels, 10) == 0.5
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3)
    assert ndcg_at_k(ranked, rels, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(["d1", "d3"], rels, 10) == pytest.approx(1.0)
    graded = {"a": 2, "b": 1}
    assert ndcg_at_k(["b", "a"], graded, 10) == pytest.approx((1 + 3 / math.log2(3)) / (3 + 1 / math.log2(3)))
    m = evaluate_run({"q1": ranked, "q2": []}, {"q1": rels, "q2": {"x": 1}, "q3": {"y": 0}})
    assert m["n_queries"] == 2 and m["hit@1"] == 0 and m["recall@5"] == 0.5


def test_answer_and_citation_metrics():
    assert cited_numbers("保修 36 个月[2]，见[1][2]") == [2, 1]
    assert citation_accuracy(["a.md", "b.md"], ["a.md"]) == 0.5
    assert citation_accuracy([], ["a.md"]) is None
    s = answer_scores("L3 门锁保修 36个月 [1]", "36个月")
    assert s["contains"] == 1.0 and s["em"] == 0.0 and 0 < s["rouge_l"] < 1


# --------------------------------------------------------------------------- fusion


def test_rrf_formula():
    a = [Hit("x", 9.0), Hit("y", 5.0)]
    b = [Hit("y", 0.9), Hit("z", 0.8)]
    fused = {h.id: h.score for h in fusion.rrf([a, b], k=60)}
    assert fused["y"] == pytest.approx(1 / 62 + 1 / 61)
    assert fused["x"] == pytest.approx(1 / 61)
    assert [h.id for h in fusion.rrf([a, b], k=60)][0] == "y"


def test_weighted_fusion_and_zero_weight_guard():
    a = [Hit("x", 10.0), Hit("y", 6.0), Hit("w", 2.0)]
    b = [Hit("z", 0.9), Hit("w", 0.8), Hit("y", 0.1)]
    mm = {h.id: h.score for h in fusion.weighted([a, b], [0.5, 0.5], "minmax")}
    assert mm["w"] == pytest.approx(0.5 * 0 + 0.5 * (0.7 / 0.8))
    assert mm["x"] == pytest.approx(0.5 * 1 + 0.5 * 0)     # absent from b: b's floor (0)
    # weight 0 = the list is ignored entirely: the ranking is exactly the other list's
    only_a = fusion.weighted([a, b], [1.0, 0.0], "zscore")
    assert [h.id for h in only_a] == ["x", "y", "w"]
    single = fusion.weighted([[Hit("x", 3.0)], b], [1.0, 0.0], "zscore")
    assert [h.id for h in single] == ["x"]


def test_query_languages():
    assert query_languages("门锁安装收费吗") == {"zh"}
    assert query_languages("How long is the warranty?") == {"en"}
    assert query_languages("S1 robot vacuum 电池保修多久") == {"en", "zh"}


# --------------------------------------------------------------------------- chunking


def test_sentence_chunks_keep_offsets_and_whole_sentences():
    text = "# 退货\n\n签收后7天内可无理由退货。商品需完好！运费由买家承担。\n\nRefunds take 3 days. Contact us."
    cfg = ChunkConfig(strategy="sentences", size=30, overlap=0)
    chunks = chunk_text("r.md", text, cfg)
    assert chunks and all(text[c.start:c.end] == c.text for c in chunks)
    ends = {text[s:e] for s, e in sentence_spans(text)}
    for c in chunks:  # every chunk is made of whole sentences
        assert any(c.text.endswith(s) for s in ends)
    with_overlap = chunk_text("r.md", text, ChunkConfig(strategy="sentences", size=30, overlap=1))
    assert len(with_overlap) >= len(chunks)
    assert len({c.id for c in chunks}) == len(chunks) and all(len(c.hash) == 64 for c in chunks)


def test_recursive_and_token_chunks():
    from llmtech import models

    text = open("data/support/kb/returns_en.md", encoding="utf-8").read()
    rec = chunk_text("r", text, ChunkConfig(strategy="recursive", size=200, overlap=20))
    assert all(len(c.text) <= 200 and text[c.start:c.end] == c.text for c in rec)
    tok = models.load_embedder().tokenizer
    win = chunk_text("r", text, ChunkConfig(strategy="tokens", size=64, overlap=16), tokenizer=tok)
    assert len(win) > 2 and all(len(tok(c.text, add_special_tokens=False)["input_ids"]) <= 70 for c in win)
    with pytest.raises(ConfigError, match="overlap"):
        chunk_text("r", text, ChunkConfig(size=10, overlap=10))


# --------------------------------------------------------------------------- BEIR reader


def _beir(tmp_path, qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\n"):
    (tmp_path / "qrels").mkdir(parents=True, exist_ok=True)
    (tmp_path / "corpus.jsonl").write_text(
        json.dumps({"_id": "d1", "title": "Cats", "text": "cats purr"}) + "\n"
        + json.dumps({"_id": "d2", "title": "", "text": "dogs bark"}) + "\n", encoding="utf-8")
    (tmp_path / "queries.jsonl").write_text(
        json.dumps({"_id": "q1", "text": "why do cats purr"}) + "\n"
        + json.dumps({"_id": "q2", "text": "unjudged"}) + "\n", encoding="utf-8")
    (tmp_path / "qrels" / "test.tsv").write_text(qrels, encoding="utf-8")
    return tmp_path


def test_beir_reader_and_errors(tmp_path):
    d = load_beir(_beir(tmp_path), "test")
    assert list(d.queries) == ["q1"] and d.qrels == {"q1": {"d1": 1}}
    assert d.doc_text("d1") == "Cats\ncats purr" and d.doc_text("d2") == "dogs bark"
    with pytest.raises(DataError, match=r"no qrels for split 'dev' \(available: test\)"):
        load_beir(tmp_path, "dev")
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"queries.jsonl:2: not valid JSON"):
        load_beir(tmp_path, "test")
    _beir(tmp_path, qrels="query-id\tcorpus-id\tscore\nq1\td1\tx\n")
    with pytest.raises(DataError, match=r"test.tsv:2: score 'x' is not an integer"):
        load_beir(tmp_path, "test")
