"""FAISS on the GPU (the `gpu` extra, faiss-gpu-cu12): same results as the CPU path. Skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.faiss_index import gpu_count
from retrieval.index import MaxSimIndex
from tests.test_index_types import D, Q, built, recall_and_check_scores

pytestmark = pytest.mark.skipif(gpu_count() == 0, reason="no GPU visible to FAISS (install the gpu extra on a GPU machine)")


@pytest.fixture(scope="module")
def collection():
    from tests.test_index_types import unit

    rng = np.random.default_rng(0)
    topics = unit(rng.standard_normal((60, D)))
    vectors = unit(topics[rng.integers(0, 60, (1200, 1))] + 0.6 * rng.standard_normal((1200, Q, D)))
    queries = unit(topics[rng.integers(0, 60, 30)] + 0.3 * rng.standard_normal((30, D)))
    return np.arange(1200, dtype=np.int64), vectors, queries


@pytest.mark.parametrize("spec", ["flat-fp32", "ivf-flat", "ivf-pq:m=8"])
def test_gpu_search_matches_the_cpu(spec, collection):
    keys, vectors, queries = collection
    cpu = built(spec, keys, vectors)  # trained on the GPU: faiss_index.train clusters there
    gpu = built(spec, keys, vectors)
    assert gpu.use_gpu()
    for query in queries:
        on_cpu, on_gpu = cpu.search(query, 10)[0], gpu.search(query, 10)[0]
        shared = set(on_cpu.keys.tolist()) & set(on_gpu.keys.tolist())
        assert len(shared) >= (10 if spec == "flat-fp32" else 8)
    assert recall_and_check_scores(gpu, keys, vectors, queries) >= recall_and_check_scores(cpu, keys, vectors, queries) - 0.05
    # Past FAISS's GPU k-selection (2,048 results): 100 images ask for 3,169 vectors (ivf-pq: 51,200).
    on_cpu, on_gpu = cpu.search(queries[0], 100)[0], gpu.search(queries[0], 100)[0]
    assert len(set(on_cpu.keys.tolist()) & set(on_gpu.keys.tolist())) >= (100 if spec == "flat-fp32" else 80)


def test_a_change_drops_the_gpu_copy_and_searches_see_it(collection):
    keys, vectors, queries = collection
    index = MaxSimIndex(D, Q, "flat-fp32")
    index.add(keys, vectors)
    assert index.use_gpu()
    top = index.search(queries[0], 1)[0].keys[0]
    index.remove(np.array([top]))
    assert top not in index.search(queries[0], 5)[0].keys.tolist()
    assert index._gpu is not None  # searched on a fresh GPU copy
