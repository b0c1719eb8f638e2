"""Every index kind against brute-force numpy max-sim: exact scores, recall, deletes, training, files."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.errors import UsageError
from retrieval.index import MaxSimIndex
from retrieval.index_types import IndexSpec, choose_spec

Q, D = 32, 16
IMAGES = 1200  # 38,400 vectors: enough to train every kind at its automatic size
KINDS = ["flat-fp32", "flat-fp16", "sq8", "ivf-flat", "ivf-pq:m=8", "ivf-pq:m=8,opq=1,nlist=64", "hnsw"]
MIN_RECALL = {"ivf-flat": 0.85, "ivf-pq": 0.8, "hnsw": 0.95, "sq8": 0.95}  # measured: 0.88, 0.87, 1, 1


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def collection():
    """Images whose 32 vectors gather around a few of 60 topics, as BLIP-2's query vectors do."""
    rng = np.random.default_rng(0)
    topics = unit(rng.standard_normal((60, D)))
    vectors = unit(topics[rng.integers(0, 60, (IMAGES, 1))] + 0.6 * rng.standard_normal((IMAGES, Q, D)))
    queries = unit(topics[rng.integers(0, 60, 30)] + 0.3 * rng.standard_normal((30, D)))
    return np.arange(IMAGES, dtype=np.int64) * 7, vectors, queries


def source(keys_all, vectors):
    position = {int(k): i for i, k in enumerate(keys_all)}

    def exact(keys):
        kept = np.array([k for k in keys if int(k) in position], np.int64)
        return kept, vectors[[position[int(k)] for k in kept]].reshape(len(kept), Q, D)

    return exact


def built(spec: str, keys, vectors) -> MaxSimIndex:
    """Filled in two batches, then trained from its own staging copy, as the store does."""
    index = MaxSimIndex(D, Q, spec)
    half = len(keys) // 2
    index.add(keys[:half], vectors[:half])
    index.add(keys[half:], vectors[half:])
    if index.needs_rebuild():
        rng = np.random.default_rng(1)
        want = min(index.train_size(index.spec, index.ntotal), 12_000)  # a smaller sample: faster tests
        sample = vectors.reshape(-1, D)[rng.choice(index.ntotal, min(want, index.ntotal), replace=False)]
        index.rebuild(lambda: [(keys, vectors)], len(keys) * Q, sample)
    return index


def recall_and_check_scores(index, keys, vectors, queries, n=10) -> float:
    found = []
    exact = source(keys, vectors)
    for query in queries:
        hits = index.search(query, n, exact=exact)[0]
        best = (vectors @ query).max(axis=1)
        truth = set(keys[np.argsort(-best)[:n]].tolist())
        position = {int(k): i for i, k in enumerate(keys)}
        # Every score returned is the exact max-sim of that image, whatever the kind.
        np.testing.assert_allclose(hits.scores, best[[position[int(k)] for k in hits.keys]], atol=1e-6)
        assert list(hits.scores) == sorted(hits.scores, reverse=True)
        found.append(len(truth & set(hits.keys.tolist())) / n)
    return float(np.mean(found))


@pytest.mark.parametrize("spec", KINDS)
def test_each_kind_trains_searches_deletes_and_reloads(spec, collection, tmp_path):
    keys, vectors, queries = collection
    index = built(spec, keys, vectors)
    assert index.kind == IndexSpec.parse(spec).kind  # trained: no longer staged
    recall = recall_and_check_scores(index, keys, vectors, queries)
    assert recall == 1.0 if index.spec.exact else recall >= MIN_RECALL[index.kind], recall

    gone = keys[:: 3]
    assert index.remove(np.append(gone, 10**9)) == len(gone)
    kept = np.setdiff1d(keys, gone)
    assert index.keys().tolist() == kept.tolist()
    for query in queries[:5]:
        assert not set(index.search(query, 20, exact=source(keys, vectors))[0].keys.tolist()) & set(gone.tolist())

    index.save(tmp_path / "v.faiss")
    for mmap in (False, True):
        loaded = MaxSimIndex.load(tmp_path / "v.faiss", D, Q, spec, mmap=mmap)
        assert loaded.kind == index.kind and loaded.keys().tolist() == kept.tolist()
        assert loaded.needs_rebuild() is None
    # A mapped file is read-only to FAISS (writing one aborts the process): changes read it first.
    loaded.add(gone[:2], vectors[:: 3][:2])
    loaded.remove(kept[:1])
    assert loaded.ntotal == (len(kept) + 1) * Q


def test_trained_kinds_stay_exact_until_they_can_train():
    rng = np.random.default_rng(3)
    vectors = unit(rng.standard_normal((10, Q, D)))
    index = MaxSimIndex(D, Q, "ivf-pq:m=8")
    index.add(np.arange(10), vectors)
    assert index.kind == "flat-fp16" and index.needs_rebuild() is None
    query = unit(rng.standard_normal(D))
    hits = index.search(query, 3, exact=source(np.arange(10), vectors))[0]
    assert hits.keys.tolist() == np.argsort(-(vectors @ query).max(axis=1))[:3].tolist()


def test_ivf_is_retrained_when_the_collection_outgrows_it():
    rng = np.random.default_rng(4)
    small = unit(rng.standard_normal((40, Q, D)))  # 1,280 vectors: 32 lists
    index = MaxSimIndex(D, Q, "ivf-flat")
    index.rebuild(lambda: [(np.arange(40), small)], 40 * Q, small.reshape(-1, D))
    assert index.kind == "ivf-flat" and index.needs_rebuild() is None
    lists = index.index.nlist
    more = unit(rng.standard_normal((1200, Q, D)))
    index.add(np.arange(40, 1240), more)
    assert "far past" in index.needs_rebuild()
    everything = np.concatenate([small, more])
    index.rebuild(lambda: [(np.arange(1240), everything)], 1240 * Q, everything.reshape(-1, D)[:40_000])
    assert index.index.nlist >= 4 * lists and index.needs_rebuild() is None and index.ntotal == 1240 * Q


def test_hnsw_deletes_by_tombstone_and_saves_only_live_vectors(tmp_path, collection):
    keys, vectors, _ = collection
    index = MaxSimIndex(D, Q, "hnsw")
    index.add(keys[:100], vectors[:100])
    index.remove(keys[:30])
    assert index.needs_rebuild() is not None  # 30 % deleted
    index.add(keys[:1], vectors[50:51])  # a deleted key comes back with other vectors
    assert index.ntotal == 71 * Q
    hits = index.search(vectors[50, 0], 2)[0]
    assert set(hits.keys.tolist()) == {keys[0], keys[50]}  # the old vectors of keys[0] are gone
    index.save(tmp_path / "h.faiss")
    assert MaxSimIndex.load(tmp_path / "h.faiss", D, Q, "hnsw").index.ntotal == 71 * Q


def test_another_kind_on_disk_loads_empty_for_the_caller_to_refill(tmp_path, collection):
    keys, vectors, _ = collection
    built("flat-fp32", keys[:20], vectors[:20]).save(tmp_path / "v.faiss")
    assert MaxSimIndex.load(tmp_path / "v.faiss", D, Q, "hnsw").ntotal == 0
    assert MaxSimIndex.load(tmp_path / "v.faiss", D, Q, "flat-fp32").ntotal == 20 * Q


@pytest.mark.parametrize("text, expected", [
    ("ivf-pq", IndexSpec("ivf-pq")),
    ("ivf-pq:m=16,opq=1,nprobe=32", IndexSpec("ivf-pq", m=16, opq=True, nprobe=32)),
    ("hnsw:hnsw-m=16,ef_search=64", IndexSpec("hnsw", hnsw_m=16, ef_search=64)),
])
def test_spec_parses_and_prints_back(text, expected):
    assert IndexSpec.parse(text) == expected
    assert IndexSpec.parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["ivfpq", "ivf-pq:m=x", "ivf-pq:bits=4", "ivf-pq:m=0", "hnsw:kind=flat", "sq8:nlist"])
def test_bad_specs_are_usage_errors(text):
    with pytest.raises(UsageError):
        IndexSpec.parse(text)


def test_m_must_divide_the_dimension():
    with pytest.raises(UsageError, match="dividing"):
        MaxSimIndex(D, Q, "ivf-pq:m=5")


def test_auto_picks_the_most_exact_kind_that_fits():
    per_image = lambda kind: IndexSpec(kind).bytes_per_vector(256) * 32  # noqa: E731
    assert choose_spec(10**6 * per_image("flat-fp16"), 10**6, 32, 256).kind == "flat-fp16"
    assert choose_spec(10**6 * per_image("sq8"), 10**6, 32, 256).kind == "sq8"
    pq = choose_spec(4 * 2**10 * 10**6, 10**6, 32, 256)  # the 4 KiB per image
    assert pq == IndexSpec("ivf-pq", m=64) and pq.bytes_per_vector(256) * 32 <= 4 * 2**10
    with pytest.raises(UsageError) as small:
        choose_spec(10**6, 10**6, 32, 256)
    assert str(small.value) == ("1,000,000 images need at least 488.3 MiB of index memory (ivf-pq:m=8); "
                                "raise --max-index-memory above 976.6 KiB")
    with pytest.raises(UsageError) as tiny:  # in whole MiB, both read 0
        choose_spec(1, 1, 32, 64)
    assert str(tiny.value) == ("1 image needs at least 320 bytes of index memory (ivf-pq:m=2); "
                               "raise --max-index-memory above 1 byte")


@pytest.mark.parametrize("spec", ["flat-fp32", "flat-fp16", "sq8", "hnsw"])
def test_files_with_a_reverse_id_map_load_without_it(spec, collection, tmp_path):
    """Earlier blipsearch saved these kinds as `IndexIDMap2`, whose reverse map FAISS rebuilds at
    every read (about 1 kB an image). Such a file searches as before, keeps no reverse map, and is
    saved without one at its next change."""
    import faiss

    from retrieval import faiss_index

    keys, vectors, queries = collection
    keys, vectors = keys[:300], vectors[:300]
    fresh = faiss_index.new_index(IndexSpec.parse(spec), D, len(keys) * Q)
    old = faiss.IndexIDMap2(fresh.index)  # as earlier blipsearch built them
    old.referenced_objects.append(fresh)
    flat = np.ascontiguousarray(vectors.reshape(-1, D))
    old.train(flat)
    old.add_with_ids(flat, (keys[:, None] * Q + np.arange(Q)).ravel())
    faiss.write_index(old, str(tmp_path / "old.faiss"))
    current = MaxSimIndex(D, Q, spec)
    current.add(keys, vectors)
    exact = source(keys, vectors)
    for mmap in (False, True):
        loaded = MaxSimIndex.load(tmp_path / "old.faiss", D, Q, spec, mmap=mmap)
        assert type(loaded.index) is faiss.IndexIDMap and loaded.kind == spec
        assert loaded.keys().tolist() == keys.tolist()
        for query in queries[:5]:
            assert (loaded.search(query, 10, exact)[0].keys.tolist()
                    == current.search(query, 10, exact)[0].keys.tolist())
    loaded.remove(keys[:2])
    loaded.save(tmp_path / "old.faiss")
    assert (tmp_path / "old.faiss").read_bytes()[:4] == b"IxMp"  # FAISS's tag for a plain IndexIDMap
    assert MaxSimIndex.load(tmp_path / "old.faiss", D, Q, spec).keys().tolist() == keys[2:].tolist()


def test_stored_vectors_are_read_back_by_id(collection):
    from retrieval import faiss_index

    keys, vectors, _ = collection
    index = MaxSimIndex(D, Q, "flat-fp32")
    index.add(keys[:50], vectors[:50])
    index.remove(keys[10:20])
    wanted = np.array([keys[3] * Q + 5, keys[40] * Q, keys[0] * Q + 31])
    np.testing.assert_array_equal(faiss_index.reconstruct(index.index, wanted),
                                  [vectors[3, 5], vectors[40, 0], vectors[0, 31]])
    with pytest.raises(KeyError):
        faiss_index.reconstruct(index.index, np.array([keys[15] * Q]))  # removed
