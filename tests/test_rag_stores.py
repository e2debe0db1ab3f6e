"""One contract for every vector store, run on real embeddings (MiniLM on the support data).

pgvector runs against a real PostgreSQL 16 + pgvector server that pgserver starts in a temp
folder for this session. Elasticsearch has no server here: only its error path is tested.
"""

import time
import uuid

import numpy as np
import pytest

from conftest import SUPPORT
from llmtech.errors import ConfigError, DataError
from llmtech.rag import storebench
from llmtech.rag.stores import (FaissStore, Hit, VectorStore, es_reachable, load_store,
                                local_postgres, make_store)

DIM = 384
N_CORPUS, N_QUERIES = 2000, 100


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def vectors(tmp_path_factory):
    """(ids, corpus vectors, query vectors): real embeddings, computed once per session."""
    passages = storebench.support_passages(SUPPORT)
    queries = storebench.support_queries(SUPPORT)[:N_QUERIES]
    assert len(passages) >= N_CORPUS + 100, "the support data should give > 2,000 passages"
    _, corpus = storebench.embed_passages(passages, N_CORPUS, seed=0)
    cache = tmp_path_factory.mktemp("embeddings")
    np.save(cache / "corpus.npy", corpus)
    np.save(cache / "queries.npy", storebench.embed(queries))
    corpus, q = np.load(cache / "corpus.npy"), np.load(cache / "queries.npy")
    assert len(corpus) == N_CORPUS
    return [f"p{i}" for i in range(len(corpus))], corpus, q


@pytest.fixture(scope="session")
def pg_url(tmp_path_factory):
    server, url = local_postgres(tmp_path_factory.mktemp("pg") / "data", cleanup_mode="delete")
    yield url
    server.cleanup()


BACKENDS = ["faiss-flat", "faiss-hnsw", "faiss-ivf", "chroma", "pgvector"]


class Backend:
    """Creates and reopens one store of a backend in a place of its own."""

    def __init__(self, name, tmp_path, pg_url):
        self.name, self.place = name, tmp_path / uuid.uuid4().hex[:8]
        self.table = "t_" + uuid.uuid4().hex[:12]
        self.pg_url = pg_url

    def make(self, dim=DIM, **kw) -> VectorStore:
        if self.name.startswith("faiss"):
            index = self.name.split("-")[1]
            if index == "ivf":
                kw.setdefault("ivf_train_min", 150)  # small test stores get trained too
                kw.setdefault("nprobe", 16)
            return make_store("faiss", dim, index=index, path=self.place, **kw)
        if self.name == "chroma":
            return make_store("chroma", dim, path=self.place, **kw)
        return make_store("pgvector", dim, url=self.pg_url, table=self.table, **kw)

    def reopen(self) -> VectorStore:
        if self.name.startswith("faiss"):
            return load_store("faiss", self.place)
        if self.name == "chroma":
            return load_store("chroma", self.place)
        return load_store("pgvector", self.pg_url, table=self.table)


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    pg = request.getfixturevalue("pg_url") if request.param == "pgvector" else None
    return Backend(request.param, tmp_path, pg)


@pytest.fixture(scope="module", params=BACKENDS)
def built(request, tmp_path_factory, vectors):
    """A store of each backend holding all 2,000 corpus vectors (shared by read-only tests)."""
    pg = request.getfixturevalue("pg_url") if request.param == "pgvector" else None
    b = Backend(request.param, tmp_path_factory.mktemp(request.param), pg)
    ids, corpus, _ = vectors
    store = b.make()
    store.add(ids[:1000], corpus[:1000])  # two batches: IVF trains on the first
    store.add(ids[1000:], corpus[1000:])
    store.persist()
    yield b, store
    store.close()


def top_ids(hits: list[list[Hit]]) -> list[list[str]]:
    return [[h.id for h in row] for row in hits]


# --------------------------------------------------------------------------- contract (2,000 vectors)

def test_exact_neighbour_comes_first(built, vectors):
    _, store = built
    ids, corpus, _ = vectors
    assert len(store) == len(ids) and sorted(store.ids()) == sorted(ids)
    rows = np.arange(0, len(ids), 97)
    hits = store.search(corpus[rows], 5)
    for row, row_hits in zip(rows, hits):
        assert row_hits[0].id == ids[row]
        assert row_hits[0].score == pytest.approx(1.0, abs=1e-3)  # cosine of a vector with itself
        scores = [h.score for h in row_hits]
        assert scores == sorted(scores, reverse=True) and len(row_hits) == 5
        for h in row_hits:  # scores are inner products, in every backend
            assert h.score == pytest.approx(float(corpus[ids.index(h.id)] @ corpus[row]), abs=1e-3)


def test_recall_at_10_against_exact_search(built, vectors):
    b, store = built
    ids, corpus, queries = vectors
    truth = [[ids[j] for j in row] for row in storebench.exact_top_k(corpus, queries, 10)]
    recall = storebench.recall_at_k(top_ids(store.search(queries, 10)), truth, 10)
    assert recall >= (0.999 if b.name == "faiss-flat" else 0.9), (b.name, recall)


def test_persist_and_reopen_give_identical_results(built, vectors):
    b, store = built
    _, _, queries = vectors
    before = store.search(queries[:30], 10)
    again = b.reopen()
    after = again.search(queries[:30], 10)
    assert len(again) == len(store) and again.dim == DIM
    assert top_ids(after) == top_ids(before)
    np.testing.assert_allclose([[h.score for h in r] for r in after],
                               [[h.score for h in r] for r in before], atol=1e-5)
    if b.name == "pgvector":  # its own connection; Chroma shares one client per folder
        again.close()


# --------------------------------------------------------------------------- contract (writes)

def test_add_existing_id_raises_and_changes_nothing(backend, vectors):
    ids, corpus, _ = vectors
    store = backend.make()
    store.add(ids[:200], corpus[:200], [{"n": i, "tags": ["a"]} for i in range(200)])
    with pytest.raises(ValueError, match="already stored"):
        store.add([ids[0], "new"], corpus[200:202])
    assert len(store) == 200 and "new" not in store.ids()
    with pytest.raises(ValueError, match="duplicate"):
        store.add(["x", "x"], corpus[:2])
    assert store.metadata(ids[3])["n"] == 3
    store.close()


def test_upsert_replaces_the_vector(backend, vectors):
    ids, corpus, queries = vectors
    store = backend.make()
    store.add(ids[:200], corpus[:200])
    store.upsert([ids[0], "fresh"], np.stack([queries[0], queries[1]]), [{"v": 2}, None])
    assert len(store) == 201
    assert store.search(queries[0:1], 1)[0][0] == Hit(ids[0], pytest.approx(1.0, abs=1e-3))
    assert store.search(queries[1:2], 1)[0][0].id == "fresh"
    old = store.search(corpus[0:1], 3)[0]  # the old vector of ids[0] is gone
    assert all(h.id != ids[0] or h.score < 0.999 for h in old)
    assert store.metadata(ids[0]) == {"v": 2}
    store.close()


def test_delete_removes_ids_from_every_search(backend, vectors):
    ids, corpus, queries = vectors
    store = backend.make()
    store.add(ids[:300], corpus[:300])
    gone = ids[:90]  # 30 %: FAISS HNSW rebuilds its graph past 20 % tombstones
    assert store.delete(gone[:10]) == 10  # first a few (HNSW: tombstones only)
    assert store.delete(gone + ["never-added"]) == 80
    assert store.delete(["never-added"]) == 0 and store.delete([]) == 0
    assert len(store) == 210 and not set(gone) & set(store.ids())
    found = {h.id for row in store.search(np.vstack([corpus[:90], queries]), 20) for h in row}
    assert found and not found & set(gone)
    # the nearest live vector still comes first for a deleted vector's query
    live = corpus[90:300]
    best = ids[90 + int(np.argmax(live @ corpus[5]))]
    assert store.search(corpus[5:6], 1)[0][0].id == best
    store.persist()
    again = backend.reopen()
    assert len(again) == 210 and not {h.id for r in again.search(corpus[:90], 10) for h in r} & set(gone)
    again.close()
    store.close()


def test_dimension_mismatch_is_a_config_error(backend, vectors):
    ids, corpus, _ = vectors
    store = backend.make()
    store.add(ids[:10], corpus[:10])
    with pytest.raises(ConfigError, match="384"):
        store.add(["short"], corpus[:1, :128])
    with pytest.raises(ConfigError, match="384"):
        store.upsert([ids[0]], corpus[:1, :128])
    assert len(store) == 10
    store.persist()
    store.close()
    if not backend.name.startswith("faiss"):
        # a server table / collection remembers its dimension: reopening with another fails
        with pytest.raises(ConfigError, match=r"384.*128|128.*384"):
            backend.make(dim=128)


def test_pgvector_dimension_error_names_table(pg_url):
    store = make_store("pgvector", 8, url=pg_url, table="dims_8")
    store.close()
    with pytest.raises(ConfigError, match="'dims_8'.*8-dimensional.*not 16"):
        make_store("pgvector", 16, url=pg_url, table="dims_8")


# --------------------------------------------------------------------------- backend details

def test_ivf_is_exact_before_training_and_never_returns_too_few(vectors):
    ids, corpus, queries = vectors
    exact = FaissStore(DIM)
    exact.add(ids[:200], corpus[:200])
    ivf = FaissStore(DIM, index="ivf", nprobe=1, ivf_train_min=300)
    ivf.add(ids[:200], corpus[:200])
    assert not ivf.ivf_trained  # too few vectors to train: exact flat search meanwhile
    assert top_ids(ivf.search(queries[:5], 10)) == top_ids(exact.search(queries[:5], 10))
    ivf.add(ids[200:400], corpus[200:400])
    exact.add(ids[200:400], corpus[200:400])
    assert ivf.ivf_trained and ivf._index.nlist == 400 // 39
    # nprobe=1 scans one cell (~40 vectors): asking for 100 falls back to scanning all cells
    hits = ivf.search(queries[:3], 100)
    assert all(len(r) == 100 for r in hits)
    assert top_ids(hits) == top_ids(exact.search(queries[:3], 100))


def test_hnsw_tombstones_then_rebuild(vectors):
    ids, corpus, _ = vectors
    store = FaissStore(DIM, index="hnsw")
    store.add(ids[:100], corpus[:100])
    store.delete(ids[:15])
    assert len(store._tombstones) == 15 and store._index.ntotal == 100
    store.delete(ids[15:25])  # 25 % > 20 %: rebuilt without the deleted vectors
    assert not store._tombstones and store._index.ntotal == 75
    assert all(len(r) == 10 for r in store.search(corpus[:25], 10))


def test_faiss_path_checks(tmp_path, vectors):
    ids, corpus, _ = vectors
    store = FaissStore(DIM, path=tmp_path / "s")
    store.add(ids[:5], corpus[:5], [{"a": 1}] * 5)
    store.persist()
    store.add(ids[5:8], corpus[5:8])
    store.persist()  # a second generation replaces the first index file
    assert [f.name for f in sorted((tmp_path / "s").glob("index-*.faiss"))] == ["index-000002.faiss"]
    assert len(FaissStore.load(tmp_path / "s")) == 8
    assert FaissStore.load(tmp_path / "s").metadata(ids[0]) == {"a": 1}
    with pytest.raises(ConfigError, match="already holds"):
        FaissStore(DIM, path=tmp_path / "s")
    with pytest.raises(DataError, match="no FAISS store"):
        FaissStore.load(tmp_path / "empty")
    with pytest.raises(ConfigError, match="no path"):
        FaissStore(DIM).persist()


def test_reopening_what_is_not_there_is_a_config_error(tmp_path, pg_url):
    with pytest.raises(ConfigError, match="no table 'nothing_here'"):
        load_store("pgvector", pg_url, table="nothing_here")
    with pytest.raises(ConfigError, match="no Chroma collection named 'llmtech'"):
        load_store("chroma", tmp_path / "chroma")
    with pytest.raises(DataError, match="no FAISS store"):
        load_store("faiss", tmp_path / "faiss")


def test_factory_rejects_unknown_kinds():
    with pytest.raises(ConfigError, match="faiss, chroma, pgvector, elasticsearch"):
        make_store("milvus", DIM)
    with pytest.raises(ConfigError, match="hnsw"):
        make_store("faiss", DIM, index="pq")


def test_unreachable_servers_are_config_errors_naming_the_url():
    t0 = time.time()
    url = "http://elastic:s3cret@127.0.0.1:9"  # port 9 (discard): nothing listens
    assert es_reachable(url) is False
    with pytest.raises(ConfigError) as e:
        make_store("elasticsearch", DIM, url=url, timeout=2)
    assert "127.0.0.1:9" in str(e.value) and "s3cret" not in str(e.value) and "***" in str(e.value)
    with pytest.raises(ConfigError) as e:
        make_store("pgvector", DIM, url="postgresql://me:s3cret@127.0.0.1:9/db", connect_timeout=2)
    assert "127.0.0.1:9" in str(e.value) and "s3cret" not in str(e.value)
    assert time.time() - t0 < 10
