"""Listing the images a FAISS index holds (`MaxSimIndex.keys`, what reconciling it with the catalog
reads at every writer's open and end, and at a search's open after a change): each image's first
vector id kept as it is read (`faiss_index.stored_keys`), against the baseline of every vector id
copied out and made unique (`np.unique(stored_ids // 32)`, as before). Both on the same index, in one
run; both must give the same keys (asserted). 32 vectors an image, 16-d (the ids' cost does not
depend on the dimension); an IndexIDMap over a flat index (flat-*, sq8, hnsw) and an IVF index.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from retrieval import faiss_index

Q, D = 32, 16


def best(function, runs: int = 3):
    times, result = [], None
    for _ in range(runs):
        began = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - began)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200_000)
    images = parser.parse_args().images
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((images * Q, D)).astype(np.float32)
    ids = (np.arange(images)[:, None] * Q + np.arange(Q)[None, :]).ravel()
    kept = np.sort(rng.permutation(images)[: images - images // 100])  # some images deleted
    held = np.isin(ids // Q, kept)
    flat = faiss.IndexIDMap(faiss.IndexFlatIP(D))
    flat.add_with_ids(vectors[held], ids[held])
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(D), D, 256, faiss.METRIC_INNER_PRODUCT)
    ivf.train(vectors[:100_000])
    ivf.add_with_ids(vectors[held], ids[held])
    for name, index in (("IndexIDMap (flat-*, sq8, hnsw)", flat), ("IVF (ivf-*)", ivf)):
        baseline, old = best(lambda: np.unique(faiss_index.stored_ids(index) // Q))
        project, new = best(lambda: faiss_index.stored_keys(index, Q))
        assert np.array_equal(old, kept) and np.array_equal(new, kept)
        print(f"{name}: {len(kept):,} images, {index.ntotal:,} vectors: every id made unique "
              f"{baseline * 1000:.0f} ms, first ids kept {project * 1000:.0f} ms; ratio {baseline / project:.0f}x")


if __name__ == "__main__":
    main()
