"""Exact max-sim over BLIP-2's 32 query vectors per image, on FAISS.

Every image (keyed by an int64 `key`) owns `num_queries` vectors, stored under FAISS ids
`key * num_queries + slot`. An image's ITC score for a text is the max over its vectors. A top-n
by that max needs only the first `num_queries * (n - 1) + 1` vectors: they hold at least n
distinct images, and an image whose best vector ranks below all of them cannot beat those n.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ImageHits:
    """Top images for one query vector, best first: keys, max-sim scores, best query slot."""

    keys: np.ndarray
    scores: np.ndarray
    slots: np.ndarray
    exhausted: bool  # True when every image in the index was considered


class MaxSimIndex:
    def __init__(self, dim: int, num_queries: int, faiss_index=None) -> None:
        import faiss

        self.dim = dim
        self.num_queries = num_queries
        self.index = faiss_index if faiss_index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    # -- persistence ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path, dim: int, num_queries: int) -> "MaxSimIndex":
        import faiss

        if not Path(path).exists():
            return cls(dim, num_queries)
        index = faiss.read_index(str(path))
        if index.d != dim:
            raise ValueError(f"{path} holds {index.d}-d vectors, expected {dim}")
        return cls(dim, num_queries, index)

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

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """`vectors`: (n, num_queries, dim) float32 for the n `keys`."""
        keys = np.asarray(keys, dtype=np.int64)
        if len(keys) == 0:
            return
        if vectors.shape != (len(keys), self.num_queries, self.dim):
            raise ValueError(f"expected vectors of shape {(len(keys), self.num_queries, self.dim)}, got {vectors.shape}")
        ids = (keys[:, None] * self.num_queries + np.arange(self.num_queries)[None, :]).ravel()
        flat = np.ascontiguousarray(vectors.reshape(-1, self.dim), dtype=np.float32)
        self.index.add_with_ids(flat, ids)

    def remove(self, keys: np.ndarray) -> int:
        import faiss

        keys = np.asarray(keys, dtype=np.int64)
        if len(keys) == 0:
            return 0
        ids = (keys[:, None] * self.num_queries + np.arange(self.num_queries)[None, :]).ravel()
        return int(self.index.remove_ids(faiss.IDSelectorBatch(ids))) // self.num_queries

    # -- search -----------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, n_images: int) -> list[ImageHits]:
        """Exact top-`n_images` images by max-sim for each row of `queries` (T, dim)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        total_images = self.ntotal // self.num_queries
        n_images = min(n_images, total_images)
        if n_images <= 0:
            empty = np.zeros(0, np.int64)
            return [ImageHits(empty, np.zeros(0, np.float32), empty, True) for _ in queries]
        depth = min(self.num_queries * (n_images - 1) + 1, self.ntotal)
        scores, ids = self.index.search(queries, depth)
        return [self._collapse(s, i, n_images, total_images) for s, i in zip(scores, ids)]

    def _collapse(self, scores: np.ndarray, ids: np.ndarray, n_images: int, total_images: int) -> ImageHits:
        valid = ids >= 0
        scores, ids = scores[valid], ids[valid]
        keys = ids // self.num_queries
        # FAISS returns vectors best first, so an image's first occurrence is its max.
        _, first = np.unique(keys, return_index=True)
        first = np.sort(first)[:n_images]
        return ImageHits(
            keys=keys[first],
            scores=scores[first].astype(np.float32),
            slots=(ids[first] % self.num_queries).astype(np.int64),
            exhausted=n_images >= total_images,
        )
