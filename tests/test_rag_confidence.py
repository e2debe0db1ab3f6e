"""Retrieval confidence: the lexical and dense signals and the dev-chosen threshold."""

import shutil

import pytest

from conftest import SUPPORT
from llmtech.errors import ConfigError, DataError
from llmtech.rag.confidence import ConfidenceScorer, choose_threshold
from llmtech.rag.kb import KnowledgeBase
from llmtech.rag.types import Passage


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    d = tmp_path_factory.mktemp("conf")
    docs = d / "docs"
    docs.mkdir()
    for name in ["warranty_zh.md", "warranty_en.md", "shipping_en.md", "manual_a2_zh.md"]:
        shutil.copy(SUPPORT / "kb" / name, docs / name)
    kb = KnowledgeBase.build(d / "kb", docs)
    yield kb
    kb.close()


def test_answerable_scores_above_unanswerable(kb):
    qs = ["How long is the warranty of the L3 smart lock?",
          "Who is the chief executive officer of the company?",
          "智能门锁 L3 的保修期是多久？",
          "公司总部设在哪个城市？"]
    conf = ConfidenceScorer(kb).score_many(qs, kb.search_many(qs, k=3))
    assert conf[0].value > conf[1].value and conf[2].value > conf[3].value
    # MiniLM is English-only: Chinese queries get no dense signal and lean on words alone
    assert conf[0].dense is not None and conf[2].dense is None
    assert conf[2].value == conf[2].lexical
    assert "保修期" in conf[2].matched and "公司总部" in conf[3].missing


def test_lexical_share_is_idf_weighted(kb):
    sc = ConfidenceScorer(kb, use_dense=False)
    p = Passage("x#0", "x.md", "The E13 code means the filter is missing.")
    full = sc.score("E13 filter", [p])
    assert full.value == pytest.approx(1.0) and full.dense is None
    half = sc.score("E13 banana", [p])
    # 'banana' never occurs in the knowledge base, so it weighs at least as much as 'e13'
    assert 0 < half.value <= 0.5 and half.missing == ["banana"]
    assert sc.score("E13 filter", []).value == 0.0


def test_choose_threshold_by_hand():
    scores = [0.9, 0.8, 0.7, 0.3, 0.6, 0.2]
    labels = [True, True, True, True, False, False]
    best = choose_threshold(scores, labels)
    # cut at 0.7 keeps 3 of 4 answerable and refuses both unanswerable: (0.75 + 1) / 2
    assert best["threshold"] == pytest.approx(0.7)
    assert best["balanced_accuracy"] == pytest.approx(0.875)
    # the service-level rule: keep every answerable query, then refuse what is left to refuse
    strict = choose_threshold(scores, labels, min_answer_recall=1.0)
    assert strict["threshold"] == pytest.approx(0.3) and strict["answer_recall"] == 1.0
    assert strict["refuse_recall"] == pytest.approx(0.5) and strict["rule"] == "answer_recall>=1"
    with pytest.raises(ConfigError, match="min_answer_recall"):
        choose_threshold(scores, labels, min_answer_recall=1.5)
    with pytest.raises(DataError, match="both"):
        choose_threshold([0.1, 0.2], [True, True])
    with pytest.raises(DataError):
        choose_threshold([0.1], [True, False])
