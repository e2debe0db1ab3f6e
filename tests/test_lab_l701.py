"""L7.01 hybrid retrieval study: dev/held-out selection, fusion sweep by hand, subsampling,
bad input, and the lab end to end on a tiny subsample of both shared datasets."""

import json
import math

import pytest

from conftest import ROOT, load_lab_module, shared_or_skip
from llmtech.errors import ConfigError, DataError
from llmtech.rag import hybrid_study as hs
from llmtech.rag.beir import BeirData
from llmtech.rag.stores.base import Hit

LAB = ROOT / "lessons/lesson7/01_hybrid_retrieval/hybrid_retrieval.py"


def toy_lists():
    # q1: relevant "a". BM25 ranks it 2nd, dense ranks it 1st.
    # q2: relevant "x". BM25 ranks it 1st, dense does not find it.
    return {"bm25": {"q1": [Hit("b", 10.0), Hit("a", 8.0), Hit("c", 2.0)],
                     "q2": [Hit("x", 5.0), Hit("y", 1.0)]},
            "dense": {"q1": [Hit("a", 0.9), Hit("c", 0.5), Hit("b", 0.1)],
                      "q2": [Hit("y", 0.8), Hit("z", 0.7)]}}


QRELS = {"q1": {"a": 1}, "q2": {"x": 1}}


def test_fusion_sweep_on_a_toy_example_by_hand():
    lists = toy_lists()
    # RRF k=1, q1: a = 1/3 + 1/2 = .833, b = 1/2 + 1/4 = .75, c = 1/4 + 1/3 = .583 -> a, b, c
    assert hs.fuse(lists, hs.Setting("rrf", 1.0), ["q1"])["q1"] == ["a", "b", "c"]
    # q2 (x only in BM25 at 1, y at 2 in BM25 and 1 in dense): y = 1/3 + 1/2 beats x = 1/2
    assert hs.fuse(lists, hs.Setting("rrf", 1.0), ["q2"])["q2"] == ["y", "x", "z"]
    # min-max, w_dense = 0.5, q1: bm25 b 1, a 0.75, c 0; dense a 1, c 0.5, b 0
    # a = 0.875, b = 0.5, c = 0.25
    assert hs.fuse(lists, hs.Setting("minmax", 0.5), ["q1"])["q1"] == ["a", "b", "c"]
    # w_dense = 0.1: b = 0.9, a = 0.775 -> b first
    assert hs.fuse(lists, hs.Setting("minmax", 0.1), ["q1"])["q1"][0] == "b"
    # w = 0 and w = 1 reproduce the single retrievers
    assert hs.fuse(lists, hs.Setting("minmax", 0.0), ["q1"])["q1"] == ["b", "a", "c"]
    assert hs.fuse(lists, hs.Setting("zscore", 1.0), ["q1"])["q1"] == ["a", "c", "b"]
    grid = hs.settings_grid([1, 60], [0.0, 0.5, 1.0], ["minmax"])
    rows = hs.sweep(lists, QRELS, ["q1"], ["q2"], grid)
    by = {r["label"]: r for r in rows}
    assert list(by)[:2] == ["bm25", "dense"] and len(rows) == 2 + 2 + 3
    # dev (q1): bm25 puts a at rank 2 -> nDCG 1/log2(3); dense at rank 1 -> 1
    assert by["bm25"]["dev"] == pytest.approx(1 / math.log2(3))
    assert by["dense"]["dev"] == 1.0 and by["rrf k=1"]["dev"] == 1.0
    # held-out (q2): x is BM25's first; dense never finds it
    assert by["bm25"]["held_ndcg@10"] == 1.0 and by["dense"]["held_ndcg@10"] == 0.0
    assert by["minmax w_dense=1.0"]["held_ndcg@10"] == 0.0


def test_selection_uses_dev_only_never_held_out():
    s = hs.Setting
    rows = [{"setting": s("rrf", 1), "method": "rrf", "param": 1, "label": "a", "dev": 0.50, "held_ndcg@10": 0.99},
            {"setting": s("rrf", 60), "method": "rrf", "param": 60, "label": "b", "dev": 0.70, "held_ndcg@10": 0.10},
            {"setting": s("rrf", 100), "method": "rrf", "param": 100, "label": "c", "dev": 0.70, "held_ndcg@10": 0.20},
            {"setting": s("zscore", .3), "method": "zscore", "param": .3, "label": "d", "dev": 0.9, "held_ndcg@10": 0.0}]
    best = hs.select(rows, ["rrf"])
    assert best["label"] == "b"  # best dev; a tie keeps the first; the 0.99 held-out is ignored
    assert hs.select(rows, ["minmax", "zscore"])["label"] == "d"
    # same answer when held-out scores are scrambled: they are not read
    scrambled = [{**r, "held_ndcg@10": 1 - r["held_ndcg@10"]} for r in rows]
    assert hs.select(scrambled, ["rrf"])["label"] == "b"
    with pytest.raises(ConfigError):
        hs.select(rows, ["minmax"])


def test_split_is_deterministic_disjoint_and_order_free():
    ids = [f"q{i}" for i in range(21)]
    dev, held = hs.split_queries(ids, seed=3)
    assert (dev, held) == hs.split_queries(list(reversed(ids)), seed=3)
    assert not set(dev) & set(held) and set(dev) | set(held) == set(ids)
    assert abs(len(dev) - len(held)) <= 1
    assert hs.split_queries(ids, seed=4) != (dev, held)
    with pytest.raises(ConfigError):
        hs.split_queries(["only"])


def test_subsample_keeps_every_relevant_document():
    corpus = {f"d{i}": {"title": "", "text": f"doc {i}"} for i in range(50)}
    qrels = {f"q{i}": {f"d{i}": 1, f"d{i + 20}": 1} for i in range(20)}
    qrels["q_orphan"] = {"missing_doc": 1}
    data = BeirData("toy", corpus, {q: q for q in qrels}, qrels, "test")
    sub = hs.subsample(data, n_queries=5, n_docs=15, seed=0)
    assert len(sub.queries) == 5 and len(sub.corpus) == 15 and "q_orphan" not in sub.queries
    assert all(d in sub.corpus for rels in sub.qrels.values() for d in rels)
    again = hs.subsample(data, 5, 15, 0)
    assert (again.queries, sorted(again.corpus)) == (sub.queries, sorted(sub.corpus))


@pytest.mark.parametrize("ks, ws, norms, key", [
    ([], [0.5], ["minmax"], "rrf_ks"), ([60], [], ["minmax"], "weights"),
    ([60], [0.5], ["l2"], "norms"), ([60], [1.5], ["zscore"], "weights"),
])
def test_bad_sweeps_name_the_key(ks, ws, norms, key):
    with pytest.raises(ConfigError, match=key):
        hs.settings_grid(ks, ws, norms)


def test_lab_end_to_end_on_a_tiny_subsample(tmp_path):
    shared_or_skip("beir_scifact_train")
    shared_or_skip("cmrc2018/retrieval")
    r = run_lab(tmp_path, "n_queries=16", "n_docs=60", "rerank=llm-ql", "model=tiny-llama",
                "rerank_queries=3", "rerank_top=3", "rrf_ks=[1,60]", "weights=[0.0,0.5,1.0]",
                "embed_cache=false")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for ds in ("scifact", "cmrc2018"):
        assert m[f"{ds}_n_dev"] + m[f"{ds}_n_held"] == 16 and m[f"{ds}_n_docs"] == 60
        for k in ("bm25", "dense", "rrf", "weighted", "hybrid", "reranked"):
            assert 0.0 <= m[f"{ds}_{k}_ndcg10"] <= 1.0
        assert m[f"{ds}_rrf_k"] in (1, 60) and m[f"{ds}_weighted_norm"] in ("minmax", "zscore")
        assert m[f"hybrid_beats_both_{ds}"] == (
            m[f"{ds}_hybrid_ndcg10"] > max(m[f"{ds}_bm25_ndcg10"], m[f"{ds}_dense_ndcg10"]))
        assert (tmp_path / "out" / f"fusion_{ds}.png").stat().st_size > 5_000
    # the lexical CMRC task: BM25 with jieba finds almost everything; English MiniLM does not
    assert m["cmrc2018_bm25_ndcg10"] > m["cmrc2018_dense_ndcg10"]


def run_lab(tmp_path, *overrides):
    from conftest import run_script

    return run_script(LAB, "--quick", "--out", tmp_path / "out", *overrides, timeout=300)


def test_missing_dataset_and_bad_metric_are_clear_errors(tmp_path):
    r = run_lab(tmp_path, f"scifact_dir={tmp_path / 'nope'}")
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr
    lab = load_lab_module(LAB, "l701_lab")
    from llmtech.labs import LabContext

    ctx = LabContext(out=tmp_path, lab_id="L7.01", title="t")
    with pytest.raises(ConfigError, match="norms"):
        lab.main(lab.Config(norms=["max"]), ctx)
    with pytest.raises(ConfigError, match="metric"):
        lab.main(lab.Config(metric="map"), ctx)
    with pytest.raises(DataError, match="nope"):
        lab.main(lab.Config(cmrc_dir=str(tmp_path / "nope")), ctx)
