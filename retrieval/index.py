"""Max-sim over BLIP-2's 32 query vectors per image, on FAISS, for every `IndexSpec` kind.

Every image (keyed by an int64 `key`) owns `num_queries` vectors, stored under FAISS ids
`key * num_queries + slot`. An image's ITC score for a text is the max over its vectors. A top-n
by that max needs only the first `num_queries * (n - 1) + 1` vectors: they hold at least n
distinct images, and an image whose best vector ranks below all of them cannot beat those n.

Exact kinds stay exact. `flat-fp32` is. `flat-fp16` halves memory and scans about 3x faster than
an fp32 matrix product: fp16 rounding moves a score by at most `error_bound(q)`, so every image of
the true top-n scores within 2 bounds of the n-th fp16 score, and those few candidates are re-scored
on their exact fp32 vectors (from the catalog), which gives the exact ranking.

Approximate kinds (`sq8`, `ivf-*`, `hnsw`) propose several times the images asked for (2x, 16x for
PQ's rougher scores: `IndexSpec.rescore_factor`); those are re-scored on their exact vectors and the
best n returned, so every score returned is exact and only recall
is approximate. Kinds that need training hold their vectors in a `flat-fp16` index (exact) until
the collection is large enough to train on; `needs_rebuild` says when, and `rebuild` does it.
"""

from __future__ import annotations

import os
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from retrieval import faiss_index
from retrieval.index_types import IndexSpec

# Keys -> (the keys it still has, their exact (n, num_queries, dim) float32 vectors).
VectorSource = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
# Yields (keys, (n, num_queries, dim) vectors) chunks: every image a rebuilt index must hold.
VectorChunks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]
TOMBSTONE_REBUILD = 0.2  # HNSW (which cannot delete) is rebuilt when a fifth of it is deleted


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write` a temporary file beside `path`, fsync it, rename it over `path` and fsync the folder:
    readers see the old file or the new, never half of one. A failed write (a full disk, Ctrl-C)
    removes its temporary file; one a killed process left is removed by the next writer
    (`IndexStore.writer_lock`), since beside a FAISS file it is as large as the file."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@dataclass(frozen=True)
class ImageHits:
    """Top images for one query vector, best first: keys, max-sim scores, best query slot."""

    keys: np.ndarray
    scores: np.ndarray
    slots: np.ndarray
    exhausted: bool  # True when every image in the index was considered


class MaxSimIndex:
    def __init__(self, dim: int, num_queries: int, spec: IndexSpec | str = IndexSpec(), faiss_index=None) -> None:
        self.dim = dim
        self.num_queries = num_queries
        self.spec = IndexSpec.parse(spec) if isinstance(spec, str) else spec
        self.spec.validate(dim)
        self.index = faiss_index if faiss_index is not None else self._empty(self.spec, 0)
        self.deleted = np.zeros(0, np.int64)  # vector ids skipped but still in FAISS's index (`skip`)
        self._gpu = None  # a GPU copy for searching, made by `use_gpu`, dropped by any change
        self._want_gpu = False
        self._skip_selector = (self.deleted, None)  # (the `deleted` it was built for, `skip_selector`)
        self._mapped_from: Path | None = None  # the file a memory-mapped index maps

    def _empty(self, spec: IndexSpec, vectors: int):
        """An index to fill: `spec`'s own, or the exact fp16 staging index until it can be trained."""
        if spec.trained and vectors < spec.min_train_vectors(self.dim, vectors):
            return faiss_index.new_index(IndexSpec("flat-fp16"), self.dim, vectors)
        return faiss_index.new_index(spec, self.dim, vectors)

    @property
    def kind(self) -> str:
        """The kind of index holding the vectors now (`flat-fp16` while a trained kind is staged)."""
        return faiss_index.kind_of(self.index)

    # -- persistence ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path, dim: int, num_queries: int, spec: IndexSpec | str = IndexSpec(),
             mmap: bool = False) -> "MaxSimIndex":
        """The index saved at `path`, or an empty one when there is none, it cannot be read, or it
        holds another kind (the catalog holds every vector, so the caller refills it). `mmap` maps the
        file read-only instead of reading it: for large indexes that are searched, not changed."""
        empty = cls(dim, num_queries, spec)
        if not Path(path).exists():
            return empty
        index = faiss_index.read_index(path, mmap)
        if index is None:  # corrupt or truncated: as good as lost, and refilled the same way
            return empty
        staged = empty.spec.trained and faiss_index.kind_of(index) == "flat-fp16"
        if index.d != dim or not (staged or faiss_index.matches(index, empty.spec, dim)):
            return empty
        loaded = cls(dim, num_queries, empty.spec, index)
        loaded._mapped_from = Path(path) if mmap else None
        return loaded

    def _writable(self) -> None:
        """Before a change: a memory-mapped index is read-only (FAISS aborts on writing one), so
        read the file into memory first."""
        import faiss

        if self._mapped_from is not None:
            self.index = faiss_index.without_reverse_map(faiss.read_index(str(self._mapped_from)))
            self._mapped_from = None

    def save(self, path: Path) -> None:
        """Save to `path` atomically (`replace_atomically`): readers see the old file or the new."""
        import faiss

        self.purge()  # tombstones live in memory only: a saved file holds live vectors alone
        replace_atomically(Path(path), lambda tmp: faiss.write_index(self.index, str(tmp)))

    # -- training ---------------------------------------------------------------------------------
    def needs_rebuild(self, spec: IndexSpec | None = None, vectors: int | None = None) -> str | None:
        """Why the vectors should move into a new index of `spec` (default: this one's), or None.
        `vectors`: how many the collection has, where this index holds only part of them (a base)."""
        spec = spec or self.spec
        vectors = self.ntotal if vectors is None else vectors
        if self.kind == "flat-fp16" and spec.trained:  # staged
            need = spec.min_train_vectors(self.dim, vectors)
            return f"{vectors} vectors are enough to train {spec} (needs {need})" if vectors >= need else None
        if not faiss_index.matches(self.index, spec, self.dim):
            return f"the index is {self.kind}, wanted {spec}"
        if spec.kind in ("ivf-flat", "ivf-pq") and spec.nlist is None:
            nlist = faiss_index.ivf_nlist(self.index)
            if spec.nlist_for(vectors) >= 4 * nlist:  # about 16x the vectors it was trained for
                return f"the collection grew to {vectors} vectors, far past what {nlist} IVF lists were trained for"
        if self.kind == "hnsw" and len(self.deleted) > TOMBSTONE_REBUILD * self.index.ntotal:
            return f"{len(self.deleted)} of {self.index.ntotal} HNSW vectors are deleted"
        return None

    def train_size(self, spec: IndexSpec, vectors: int) -> int:
        """How many vectors `rebuild` should be given to train `spec` for `vectors` vectors (0: none)."""
        if not spec.trained or vectors < spec.min_train_vectors(self.dim, vectors):
            return 0
        if spec.kind == "sq8":
            return 65_536
        return max(spec.min_train_vectors(self.dim, vectors), min(256 * spec.nlist_for(vectors), 1 << 20))

    def rebuild(self, chunks: VectorChunks, vectors: int, sample: np.ndarray, spec: IndexSpec | None = None) -> None:
        """Replace the index by a new one of `spec` sized for `vectors` vectors, trained on `sample`
        ((S, dim) vectors), holding what `chunks` yields."""
        spec = spec or self.spec
        spec.validate(self.dim)
        index = self._empty(spec, vectors)
        if not index.is_trained:
            faiss_index.train(index, sample)
        self.spec, self.index, self.deleted, self._gpu = spec, index, np.zeros(0, np.int64), None
        self._mapped_from = None
        for keys, chunk in chunks():
            self.add(keys, chunk)

    def purge(self) -> None:
        """Drop the skipped vectors from FAISS's index itself: removed where FAISS can, else (HNSW)
        the graph rebuilt without them."""
        import faiss

        if not len(self.deleted):
            return
        if self.kind == "hnsw":
            self._compact()
            return
        self._writable()
        self.index.remove_ids(faiss.IDSelectorBatch(self.deleted))
        self.deleted, self._gpu = np.zeros(0, np.int64), None

    def stored(self, keys: np.ndarray) -> np.ndarray:
        """The stored (n, num_queries, dim) vectors of `keys`, all held, for kinds that `reconstructs`."""
        return faiss_index.reconstruct(self.index, self._ids(keys)).reshape(len(keys), self.num_queries, self.dim)

    def _compact(self) -> None:
        """Rebuild an HNSW graph without its deleted vectors."""
        keys = self.keys()
        stored = self.stored(keys)
        self.rebuild(lambda: [(keys, stored)], len(keys) * self.num_queries, stored[:0].reshape(0, self.dim))

    def use_gpu(self) -> bool:
        """Search on a GPU copy from now on (re-made after changes), when a GPU and FAISS's GPU
        support for this kind exist."""
        self._gpu = faiss_index.to_gpu(self.index)
        self._want_gpu = self._gpu is not None
        return self._want_gpu

    # -- contents ---------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        """Live vectors (HNSW's deleted ones excluded)."""
        return int(self.index.ntotal) - len(self.deleted)

    def keys(self) -> np.ndarray:
        """The images held, sorted; each image's vectors are added and deleted together."""
        keys = faiss_index.stored_keys(self.index, self.num_queries)
        if len(self.deleted):
            keys = np.setdiff1d(keys, self.skipped, assume_unique=True)
        return keys

    @property
    def skipped(self) -> np.ndarray:
        """The images `skip` leaves out (sorted keys), still in FAISS's index."""
        return np.unique(self.deleted // self.num_queries)

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
        ids = self._ids(keys)
        self._writable()
        if self._is_skipped(ids).any():
            self.purge()  # a skipped key comes back: drop its old vectors first
        self.index.add_with_ids(flat, ids)
        self._gpu = None

    def remove(self, keys: np.ndarray) -> int:
        import faiss

        keys = np.asarray(keys, dtype=np.int64)
        if len(keys) == 0:
            return 0
        ids = self._ids(keys)
        if self.kind == "hnsw":  # FAISS's HNSW cannot remove: skip these ids in searches instead
            present = np.setdiff1d(np.intersect1d(ids, faiss_index.stored_ids(self.index)), self.deleted)
            self.skip(present[present % self.num_queries == 0] // self.num_queries)
            return len(present) // self.num_queries
        self._gpu = None
        self._writable()
        return int(self.index.remove_ids(faiss.IDSelectorBatch(ids))) // self.num_queries

    def skip(self, keys: np.ndarray) -> None:
        """Leave images out of searches, `keys()` and `ntotal` without changing FAISS's index (HNSW
        cannot remove; a mapped file cannot be written). Each key must be held and not yet skipped."""
        self.deleted = np.union1d(self.deleted, self._ids(np.asarray(keys, dtype=np.int64)))

    def error_bound(self, query: np.ndarray) -> float | None:
        """Largest difference between a stored and an exact score for `query`, over unit vectors;
        None for kinds that bound only their scores' error, not which images they find."""
        if self.kind == "flat-fp32":
            return 0.0
        if self.kind != "flat-fp16":
            return None
        # fp16 rounding: |x - fp16(x)| <= 2^-11 |x| (+ a subnormal term far below the margin),
        # and fp32 accumulation over `dim` terms adds at most dim * 2^-24 |q||x|; doubled for slack.
        return float(np.linalg.norm(query)) * (2.0**-10 + self.dim * 2.0**-22)

    # -- search -----------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, n_images: int, exact: VectorSource | None = None) -> list[ImageHits]:
        """Top-`n_images` images by max-sim for each row of `queries` (T, dim): exact for exact
        kinds, with exact scores for the others.

        `exact` supplies the fp32 vectors that lossy codecs re-score on; without it they re-score on
        the stored vectors (exact for the stored values)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        total_images = self.ntotal // self.num_queries
        n_images = min(n_images, total_images)
        if n_images <= 0:
            empty = np.zeros(0, np.int64)
            return [ImageHits(empty, np.zeros(0, np.float32), empty, True) for _ in queries]
        approximate = self.error_bound(queries[0]) is None
        if approximate:
            depth = min(self.num_queries * n_images * self.spec.rescore_factor(), self.ntotal)
        else:
            depth = min(self.num_queries * (n_images - 1) + 1, self.ntotal)
        needed = n_images * self.spec.rescore_factor() if approximate else n_images
        scores, ids = self._search_vectors(queries, depth, needed)
        hits = []
        for query, row_scores, row_ids in zip(queries, scores, ids):
            keys, best, slots = self._collapse(row_scores, row_ids)
            if approximate:
                considered, top = len(keys), n_images * self.spec.rescore_factor()
                keys, best, slots = keys[:top], best[:top], slots[:top]
                if exact is not None or faiss_index.reconstructs(self.index):
                    keys, best, slots = self._ranked(*self._rescore(query, keys, exact))
                hits.append(ImageHits(keys[:n_images], best[:n_images], slots[:n_images], considered >= total_images))
                continue
            margin = 2 * self.error_bound(query)
            if margin > 0:
                keys = self._rivals(query, row_scores, row_ids, best[n_images - 1] - margin)
                keys, best, slots = self._ranked(*self._rescore(query, keys, exact))
            hits.append(ImageHits(keys[:n_images], best[:n_images], slots[:n_images], n_images >= total_images))
        return hits

    def _search_vectors(self, queries: np.ndarray, depth: int, needed: int) -> tuple[np.ndarray, np.ndarray]:
        """The top `depth` vectors for each query; fewer from the GPU where they already hold the
        `needed` first images (an image ranks by its best vector, so any prefix of the ranking that
        holds n images names the first n, as the whole ranking would)."""
        if self._want_gpu and self._gpu is None:
            self._gpu = faiss_index.to_gpu(self.index)
        if self._gpu is not None:
            ivf = self.kind in ("ivf-flat", "ivf-pq")
            nprobe = self.spec.probes(faiss_index.ivf_nlist(self.index)) if ivf else None
            if (nprobe or 0) <= faiss_index.GPU_MAX_K:
                scores, ids = faiss_index.gpu_search(self._gpu, nprobe, queries, min(depth, faiss_index.GPU_MAX_K))
                ids = self._masked(ids)  # GPU indexes take no selector
                complete = depth <= faiss_index.GPU_MAX_K and not len(self.deleted)
                if complete or all(self._images_in(row) >= needed for row in ids):
                    return scores, ids
        if len(self.deleted):  # first without the selector, which slows a scan by about a third
            scores, ids = self.index.search(queries, depth, params=faiss_index.search_params(self.index, self.spec, depth))
            ids = self._masked(ids)
            if all(self._images_in(row) >= needed for row in ids):
                return scores, ids
        skip = self._skipping()  # a local reference: kept alive while FAISS uses it, whatever other threads do
        params = faiss_index.search_params(self.index, self.spec, depth, skip)
        return self.index.search(queries, depth, params=params)

    def _masked(self, ids: np.ndarray) -> np.ndarray:
        """Search results with skipped ids as -1 (none found), as FAISS marks missing results."""
        return np.where(self._is_skipped(ids), -1, ids) if len(self.deleted) else ids

    def _is_skipped(self, ids: np.ndarray) -> np.ndarray:
        """Which of `ids` are skipped: a binary search in the sorted `deleted` (np.isin sorts both)."""
        if not len(self.deleted):
            return np.zeros(ids.shape, bool)
        found = np.minimum(np.searchsorted(self.deleted, ids), len(self.deleted) - 1)
        return self.deleted[found] == ids

    def _skipping(self):
        """The selector leaving out `deleted`, built once per change of it and then shared by searches
        (FAISS only reads it); None when nothing is skipped."""
        built_for, skip = self._skip_selector
        if built_for is not self.deleted:
            skip = faiss_index.skip_selector(self.deleted) if len(self.deleted) else None
            self._skip_selector = (self.deleted, skip)
        return skip

    def _images_in(self, ids: np.ndarray) -> int:
        return len(np.unique(ids[ids >= 0] // self.num_queries))

    @staticmethod
    def _ranked(keys: np.ndarray, best: np.ndarray, slots: np.ndarray):
        order = np.lexsort((keys, -best))
        return keys[order], best[order], slots[order]

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
        live = (ids >= 0) & (scores >= threshold) & ~self._is_skipped(ids)
        return np.unique(ids[live] // self.num_queries)

    def _rescore(self, query: np.ndarray, keys: np.ndarray, exact: VectorSource | None):
        if exact is not None:
            keys, vectors = exact(keys)  # a key may be gone if a writer removed it meanwhile
        else:
            vectors = self.stored(keys)
        sims = np.asarray(vectors, dtype=np.float32) @ query
        return np.asarray(keys, np.int64), sims.max(axis=1).astype(np.float32), sims.argmax(axis=1).astype(np.int64)

