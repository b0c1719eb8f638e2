"""MaxSimIndex against brute-force numpy max-sim, including near-ties that fp16 cannot order."""

from __future__ import annotations

import types

import numpy as np
import pytest

from retrieval.index import MaxSimIndex

Q, D = 32, 16


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def brute_force(vectors: np.ndarray, keys: np.ndarray, query: np.ndarray, n: int):
    sims = vectors @ query
    best = sims.max(axis=1)
    order = np.lexsort((keys, -best))[:n]
    return keys[order], best[order], sims.argmax(axis=1)[order]


def source(keys_all: np.ndarray, vectors: np.ndarray):
    position = {int(k): i for i, k in enumerate(keys_all)}
    return lambda keys: (keys, vectors[[position[int(k)] for k in keys]])


def near_ties(count: int, rng) -> np.ndarray:
    """Images whose best vector scores 0.5 + i * 1e-5 against e0: all the same in fp16."""
    vectors = unit(rng.standard_normal((count, Q, D)))
    vectors[:, :, 0] = 0  # every other vector is orthogonal to the query
    vectors = unit(vectors)
    top = np.sqrt(1 - (0.5 + 1e-5 * np.arange(count)) ** 2)
    vectors[:, 5, :] = 0
    vectors[:, 5, 0] = 0.5 + 1e-5 * np.arange(count)
    vectors[:, 5, 1] = top
    return vectors.astype(np.float32)


@pytest.mark.parametrize("codec", ["flat-fp16", "flat-fp32"])
@pytest.mark.parametrize("n", [1, 3, 10, 60])
def test_top_n_equals_brute_force(codec, n):
    rng = np.random.default_rng(n)
    keys = rng.permutation(1000)[:60].astype(np.int64) * 3
    vectors = unit(rng.standard_normal((60, Q, D)))
    index = MaxSimIndex(D, Q, codec)
    index.add(keys, vectors)
    for query in unit(rng.standard_normal((5, D))):
        hits = index.search(query, n, exact=source(keys, vectors))[0]
        want_keys, want_scores, want_slots = brute_force(vectors, keys, query, n)
        assert hits.keys.tolist() == want_keys.tolist()
        np.testing.assert_allclose(hits.scores, want_scores, atol=1e-6)
        assert hits.slots.tolist() == want_slots.tolist()
        assert hits.exhausted == (n >= 60)


@pytest.mark.parametrize("count", [40, 300])  # 300 near-ties overflow the k-NN list: range search
def test_fp16_orders_near_ties_exactly(count):
    vectors = near_ties(count, np.random.default_rng(0))
    keys = np.arange(count, dtype=np.int64)
    index = MaxSimIndex(D, Q, "flat-fp16")
    index.add(keys, vectors)
    query = np.eye(D, dtype=np.float32)[0]
    hits = index.search(query, 3, exact=source(keys, vectors))[0]
    assert hits.keys.tolist() == [count - 1, count - 2, count - 3]
    assert hits.slots.tolist() == [5, 5, 5]
    # Without the exact vectors the fp16 values tie, so the order is not the exact one.
    stored = index.search(query, 3)[0]
    assert len(set(stored.scores.tolist())) == 1


def test_remove_save_load_and_codec_change(tmp_path):
    rng = np.random.default_rng(1)
    vectors = unit(rng.standard_normal((20, Q, D)))
    index = MaxSimIndex(D, Q, "flat-fp16")
    index.add(np.arange(20), vectors)
    assert index.remove(np.array([3, 4, 99])) == 2
    index.save(tmp_path / "v.faiss")
    loaded = MaxSimIndex.load(tmp_path / "v.faiss", D, Q, "flat-fp16")
    assert loaded.keys().tolist() == [k for k in range(20) if k not in (3, 4)]
    assert MaxSimIndex.load(tmp_path / "v.faiss", D, Q, "flat-fp32").ntotal == 0  # the caller refills it


def test_rejects_unnormalised_vectors():
    with pytest.raises(ValueError, match="L2-normalised"):
        MaxSimIndex(D, Q).add(np.arange(1), np.full((1, Q, D), 1.0, np.float32))


def test_vanished_keys_are_dropped_from_rescoring():
    rng = np.random.default_rng(2)
    vectors = unit(rng.standard_normal((10, Q, D)))
    index = MaxSimIndex(D, Q, "flat-fp16")
    index.add(np.arange(10), vectors)
    query = unit(rng.standard_normal(D))
    best = brute_force(vectors, np.arange(10), query, 1)[0][0]

    def without_best(keys):
        kept = keys[keys != best]
        return kept, vectors[kept]

    hits = index.search(query, 2, exact=without_best)[0]
    assert best not in hits.keys.tolist() and len(hits.keys) >= 1


@pytest.mark.parametrize("alike", [False, True])
def test_searches_beyond_the_gpus_k_selection(monkeypatch, alike):
    """FAISS's GPU search returns at most 2048 results (facebookresearch/faiss#2103), and ours ask for
    32(n-1)+1 vectors for n images (ivf-pq: 32 x n x 16): searched there, k = 100 raised. The GPU's
    first 2048 now answer when they hold the n images, as any prefix of the ranking that holds them
    does; else the CPU searches (`alike`: each image's 32 vectors one, so 2048 hold 64 images). A
    stand-in for the GPU copy here, which FAISS's limit guards; tests/test_gpu.py searches a real one."""
    from retrieval import faiss_index

    class StandIn:
        def __init__(self, index):
            self.index, self.asked = index, []

        def search(self, queries, k):
            assert k <= faiss_index.GPU_MAX_K, "FAISS's GPU code raises here"
            self.asked.append(k)
            return self.index.search(queries, k)

    monkeypatch.setattr(faiss_index, "to_gpu", StandIn)
    on_cpu = []
    search_params = faiss_index.search_params  # the CPU path's first step
    monkeypatch.setattr(faiss_index, "search_params", lambda *args: on_cpu.append(1) or search_params(*args))
    rng = np.random.default_rng(3)
    keys = np.arange(200, dtype=np.int64)
    vectors = unit(np.repeat(rng.standard_normal((200, 1, D)), Q, axis=1) if alike else rng.standard_normal((200, Q, D)))
    index = MaxSimIndex(D, Q, "flat-fp32")
    index.add(keys, vectors)
    assert index.use_gpu()
    query = unit(rng.standard_normal(D))
    for n in (10, 100):
        hits = index.search(query, n)[0]
        assert hits.keys.tolist() == brute_force(vectors, keys, query, n)[0].tolist()
    assert index._gpu.asked == [32 * 9 + 1, 2048]  # n = 100 (3,169 vectors): the GPU's first 2048 first,
    assert len(on_cpu) == (1 if alike else 0)  # which held 100 images, or (alike) 64: then the CPU searched


@pytest.mark.parametrize("kind, fp16", [("flat-fp32", False), ("ivf-pq:m=8", True)])
def test_the_gpu_copy_keeps_flat_vectors_in_fp32(kind, fp16, monkeypatch):
    """FAISS's cloner option for fp16 PQ lookup tables also stores a flat index's vectors in fp16: on
    a GPU, flat-fp32, which is never re-scored, would have returned fp16 scores. The cloner is stood
    in for here (no GPU); tests/test_gpu.py compares real searches."""
    import faiss

    from retrieval import faiss_index
    from retrieval.index_types import IndexSpec

    asked = []
    monkeypatch.setattr(faiss_index, "gpu_count", lambda: 1)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", types.SimpleNamespace, raising=False)  # CPU FAISS has none
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index, options: asked.append(options.useFloat16),
                        raising=False)
    index = faiss_index.new_index(IndexSpec.parse(kind), D, 10_000)
    faiss_index.to_gpu(index)
    assert asked == [fp16]
