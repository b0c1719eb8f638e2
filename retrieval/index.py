"""Exact max-sim over BLIP-2's 32 query vectors per image, on FAISS.

Every image (keyed by an int64 `key`) owns `num_queries` vectors, stored under FAISS ids
`key * num_queries + slot`. An image's ITC score for a text is the max over its vectors. A top-n
by that max needs only the first `num_queries * (n - 1) + 1` vectors: they hold at least n
distinct images, and an image whose best vector ranks below all of them cannot beat those n.

The default codec stores vectors in fp16, which halves memory and scans about 3x faster than an
fp32 matrix product, and stays exact: fp16 rounding moves a score by at most `error_bound(q)`, so
every image of the true top-n scores within 2 bounds of the n-th fp16 score. Those few candidates
are re-scored on their exact fp32 vectors (from the catalog), which gives the exact ranking.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

CODECS = ("fp16", "fp32")
# Keys -> (the keys it still has, their exact (n, num_queries, dim) float32 vectors).
VectorSource = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class ImageHits:
    """Top images for one query vector, best first: keys, max-sim scores, best query slot."""

    keys: np.ndarray
    scores: np.ndarray
    slots: np.ndarray
    exhausted: bool  # True when every image in the index was considered


def _new_faiss_index(codec: str, dim: int):
    import faiss

    if codec == "fp32":
        inner = faiss.IndexFlatIP(dim)
    elif codec == "fp16":
        inner = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
    return faiss.IndexIDMap2(inner)


def _codec_of(faiss_index) -> str | None:
    import faiss

    inner = faiss.downcast_index(faiss_index.index) if isinstance(faiss_index, faiss.IndexIDMap2) else None
    if isinstance(inner, faiss.IndexFlatIP):
        return "fp32"
    if isinstance(inner, faiss.IndexScalarQuantizer) and inner.sq.qtype == faiss.ScalarQuantizer.QT_fp16:
        return "fp16"
    return None


class MaxSimIndex:
    def __init__(self, dim: int, num_queries: int, codec: str = "fp16", faiss_index=None) -> None:
        self.dim = dim
        self.num_queries = num_queries
        self.codec = codec
        self.index = faiss_index if faiss_index is not None else _new_faiss_index(codec, dim)

    # -- persistence ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path, dim: int, num_queries: int, codec: str = "fp16") -> "MaxSimIndex":
        """The index saved at `path`, or an empty one when there is none or it uses another codec
        (the catalog holds every vector, so the caller refills it)."""
        import faiss

        if not Path(path).exists():
            return cls(dim, num_queries, codec)
        index = faiss.read_index(str(path))
        if index.d != dim or _codec_of(index) != codec:
            return cls(dim, num_queries, codec)
        return cls(dim, num_queries, codec, index)

    def save(self, path: Path) -> None:
        """Write to a temporary file, fsync, then rename over `path`: readers see old or new, never half."""
        import faiss

        path = Path(path)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        faiss.write_index(self.index, str(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    # -- contents ---------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def keys(self) -> np.ndarray:
        import faiss

        ids = faiss.vector_to_array(self.index.id_map) if self.ntotal else np.zeros(0, np.int64)
        return np.unique(ids // self.num_queries)

    def _ids(self, keys: np.ndarray) -> np.ndarray:
        return (keys[:, None] * self.num_queries + np.arange(self.num_queries)[None, :]).ravel()

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """`vectors`: (n, num_queries, dim) float32, L2-normalised, for the n `keys`."""
        keys = np.asarray(keys, dtype=np.int64)
        if len(keys) == 0:
            return
        if vectors.shape != (len(keys), self.num_queries, self.dim):
            raise ValueError(f"expected vectors of shape {(len(keys), self.num_queries, self.dim)}, got {vectors.shape}")
        flat = np.ascontiguousarray(vectors.reshape(-1, self.dim), dtype=np.float32)
        # error_bound() assumes unit vectors; BLIP-2's ITC vectors are L2-normalised.
        if np.any(np.linalg.norm(flat, axis=1) > 1 + 1e-3):
            raise ValueError("vectors must be L2-normalised")
        self.index.add_with_ids(flat, self._ids(keys))

    def remove(self, keys: np.ndarray) -> int:
        import faiss

        keys = np.asarray(keys, dtype=np.int64)
        if len(keys) == 0:
            return 0
        return int(self.index.remove_ids(faiss.IDSelectorBatch(self._ids(keys)))) // self.num_queries

    def error_bound(self, query: np.ndarray) -> float:
        """Largest difference between a stored and an exact score for `query`, over unit vectors."""
        if self.codec == "fp32":
            return 0.0
        # fp16 rounding: |x - fp16(x)| <= 2^-11 |x| (+ a subnormal term far below the margin),
        # and fp32 accumulation over `dim` terms adds at most dim * 2^-24 |q||x|; doubled for slack.
        return float(np.linalg.norm(query)) * (2.0**-10 + self.dim * 2.0**-22)

    # -- search -----------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, n_images: int, exact: VectorSource | None = None) -> list[ImageHits]:
        """Exact top-`n_images` images by max-sim for each row of `queries` (T, dim).

        `exact` supplies the fp32 vectors that lossy codecs re-score on; without it they re-score on
        the stored vectors (exact for the stored values)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        total_images = self.ntotal // self.num_queries
        n_images = min(n_images, total_images)
        if n_images <= 0:
            empty = np.zeros(0, np.int64)
            return [ImageHits(empty, np.zeros(0, np.float32), empty, True) for _ in queries]
        depth = min(self.num_queries * (n_images - 1) + 1, self.ntotal)
        scores, ids = self.index.search(queries, depth)
        hits = []
        for query, row_scores, row_ids in zip(queries, scores, ids):
            keys, best, slots = self._collapse(row_scores, row_ids)
            margin = 2 * self.error_bound(query)
            if margin > 0:
                keys = self._rivals(query, row_scores, row_ids, best[n_images - 1] - margin)
                keys, best, slots = self._rescore(query, keys, exact)
                order = np.lexsort((keys, -best))
                keys, best, slots = keys[order], best[order], slots[order]
            hits.append(ImageHits(keys[:n_images], best[:n_images], slots[:n_images], n_images >= total_images))
        return hits

    def _collapse(self, scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Vector hits (best first) -> images in order of their first, hence best, vector."""
        valid = ids >= 0
        scores, ids = scores[valid], ids[valid]
        keys = ids // self.num_queries
        _, first = np.unique(keys, return_index=True)
        first = np.sort(first)
        return keys[first], scores[first].astype(np.float32), (ids[first] % self.num_queries).astype(np.int64)

    def _rivals(self, query: np.ndarray, scores: np.ndarray, ids: np.ndarray, threshold: float) -> np.ndarray:
        """Keys of every image with a stored score >= threshold: all that may be in the exact top-n."""
        if len(ids) < self.ntotal and scores[-1] >= threshold:  # the k-NN list may stop above it
            below = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))  # FAISS keeps > radius
            _, scores, ids = self.index.range_search(query[None], below)
        return np.unique(ids[(ids >= 0) & (scores >= threshold)] // self.num_queries)

    def _rescore(self, query: np.ndarray, keys: np.ndarray, exact: VectorSource | None):
        if exact is not None:
            keys, vectors = exact(keys)  # a key may be gone if a writer removed it meanwhile
        else:
            vectors = self.index.reconstruct_batch(self._ids(keys)).reshape(len(keys), self.num_queries, self.dim)
        sims = np.asarray(vectors, dtype=np.float32) @ query
        return np.asarray(keys, np.int64), sims.max(axis=1).astype(np.float32), sims.argmax(axis=1).astype(np.int64)
