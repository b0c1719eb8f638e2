"""A large FAISS file changed without rewriting it: the saved base, plus a small delta.

A writer used to read the whole FAISS file into memory and write it whole again for any change: at
a million images in `flat-fp16` that is 16 GB read and written to add one photo. `SegmentedIndex`
instead maps the saved file (the base) read-only and keeps changes beside it: images added since go
into a small exact index (the delta: `flat-fp16`, or `flat-fp32` beside a `flat-fp32` base), images
removed from the base are skipped in its searches (`MaxSimIndex.skip`). Saving writes the delta and
the skipped keys to one small file (`vectors.delta.npz`) that names the base it belongs to (inode,
size, mtime); a delta whose base has been replaced since is ignored, because that base was written
with the delta's images in it. The whole file is written again, merging the delta in, when it is
small (`DeltaPolicy.whole_below_bytes`), when the delta grows past a fraction of it, and after a
rebuild. A search merges the base's top images with the delta's: both are exact, or for approximate
kinds re-scored exactly, so the merged top n is what one index would have returned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval import faiss_index
from retrieval.index import ImageHits, MaxSimIndex, VectorChunks, VectorSource, replace_atomically
from retrieval.index_types import IndexSpec


@dataclass(frozen=True)
class DeltaPolicy:
    whole_below_bytes: int = 64 << 20  # a base file smaller than this is simply written again whole
    max_fraction: float = 0.1  # a delta (bytes) or skipped images (count) past this share of the base: merged
    max_bytes: int = 1 << 30  # and a delta past this, whatever the base: writers hold it in memory


def delta_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).stem + ".delta.npz")


def file_stamp(path: Path) -> list[int] | None:
    """What identifies one version of a file that is only ever replaced by a rename."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_ino, stat.st_size, stat.st_mtime_ns]


class SegmentedIndex:
    """A `MaxSimIndex` base (mapped when large) with images added since in a delta, and base images
    removed since skipped. The same search, add, remove and rebuild as `MaxSimIndex`."""

    def __init__(self, base: MaxSimIndex, delta: MaxSimIndex | None = None,
                 base_stamp: list[int] | None = None) -> None:
        self.base = base
        self.delta = delta if delta is not None else self._empty_delta()
        self.base_stamp = base_stamp  # the saved file `base` holds as it is (plus skips); None: none
        self._base_keys: np.ndarray | None = None  # every image the base's FAISS index holds, skipped too

    def _empty_delta(self) -> MaxSimIndex:
        kind = "flat-fp32" if self.base.kind == "flat-fp32" else "flat-fp16"
        return MaxSimIndex(self.base.dim, self.base.num_queries, IndexSpec(kind))

    # -- what it is -------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.base.dim

    @property
    def num_queries(self) -> int:
        return self.base.num_queries

    @property
    def spec(self) -> IndexSpec:
        return self.base.spec

    @property
    def kind(self) -> str:
        return self.base.kind

    @property
    def ntotal(self) -> int:
        return self.base.ntotal + self.delta.ntotal

    @property
    def skipped(self) -> np.ndarray:
        """The base's images removed since it was saved (sorted keys)."""
        return self.base.skipped

    def _live_in_base(self, keys: np.ndarray) -> np.ndarray:
        """Those of `keys` the base holds and does not skip."""
        if self._base_keys is None:  # read once from the base's ids; reset where the base changes (rebuild, save)
            self._base_keys = faiss_index.stored_keys(self.base.index, self.num_queries)
        return np.setdiff1d(np.intersect1d(keys, self._base_keys), self.skipped, assume_unique=True)

    def keys(self) -> np.ndarray:
        return np.union1d(self.base.keys(), self.delta.keys())

    # -- changes ----------------------------------------------------------------------------------
    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        if len(keys) == 0:
            return
        in_base = self._live_in_base(keys)
        if len(in_base):  # new vectors for a key the base holds: the delta's replace them
            self.base.skip(in_base)
        self.delta.add(keys, vectors)

    def remove(self, keys: np.ndarray) -> int:
        keys = np.unique(np.asarray(keys, dtype=np.int64))
        if len(keys) == 0:
            return 0
        removed = self.delta.remove(np.intersect1d(keys, self.delta.keys()))
        in_base = self._live_in_base(keys)
        if len(in_base):
            self.base.skip(in_base)
        return removed + len(in_base)

    def needs_rebuild(self, spec: IndexSpec | None = None) -> str | None:
        return self.base.needs_rebuild(spec, vectors=self.ntotal)

    def train_size(self, spec: IndexSpec, vectors: int) -> int:
        return self.base.train_size(spec, vectors)

    def rebuild(self, chunks: VectorChunks, vectors: int, sample: np.ndarray, spec: IndexSpec | None = None) -> None:
        """Everything into a new base (saved whole next time) and an empty delta."""
        self.base.rebuild(chunks, vectors, sample, spec)
        self.delta, self.base_stamp, self._base_keys = self._empty_delta(), None, None

    def use_gpu(self) -> bool:
        return self.base.use_gpu()  # the delta is small: searched on the CPU

    # -- search -----------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, n_images: int, exact: VectorSource | None = None) -> list[ImageHits]:
        hits = self.base.search(queries, n_images, exact)
        if self.delta.ntotal == 0:
            return hits
        return [_merged(a, b, n_images) for a, b in zip(hits, self.delta.search(queries, n_images, exact))]

    # -- files ------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path, dim: int, num_queries: int, spec: IndexSpec | str = IndexSpec(),
             mmap: bool = False) -> "SegmentedIndex":
        """The base saved at `path` (as `MaxSimIndex.load`: empty when missing, unreadable or of
        another kind) with the delta saved for it, where there is one."""
        stamp = file_stamp(path)
        base = MaxSimIndex.load(path, dim, num_queries, spec, mmap=mmap)
        if base.ntotal == 0:  # no base of this kind to apply a delta to: the caller refills it
            return cls(base)
        loaded = cls(base, base_stamp=stamp)
        saved = delta_of(path, stamp)
        if saved is None:
            return loaded
        skipped, delta = saved
        if delta.d != dim or faiss_index.kind_of(delta) != loaded.delta.spec.kind:
            return loaded
        base.skip(skipped)  # base images when the delta was saved, and this is that base: no ids read
        return cls(base, MaxSimIndex(dim, num_queries, loaded.delta.spec, delta), stamp)

    def delta_bytes(self) -> int:
        """About what the delta file takes: the delta's vectors and the skipped keys."""
        per_vector = 4 if self.delta.kind == "flat-fp32" else 2
        return self.delta.ntotal * (self.dim * per_vector + 8) + len(self.skipped) * 8

    def whole_save_due(self, path: Path, policy: DeltaPolicy) -> bool:
        """Whether `save` will write the whole file: there is none of this base, it is small or of an
        older format (`saved_with_reverse_map`), or the delta has grown past `policy`'s share of it."""
        if self.base_stamp is None or self.base_stamp != file_stamp(path) or faiss_index.saved_with_reverse_map(path):
            return True
        if self.base_stamp[1] < policy.whole_below_bytes:
            return True
        base_images = self.base.index.ntotal // self.num_queries
        return (self.delta_bytes() > min(policy.max_fraction * self.base_stamp[1], policy.max_bytes)
                or len(self.skipped) > policy.max_fraction * base_images)

    def save(self, path: Path, policy: DeltaPolicy = DeltaPolicy()) -> bool:
        """Save atomically; returns True where the whole file was written (the delta merged in),
        False where only the delta file was."""
        path = Path(path)
        if not self.whole_save_due(path, policy):
            _write_delta(delta_path(path), self.base_stamp, self.skipped, self.delta)
            return False
        self.base.purge()  # first: a key skipped and added again must keep its new vectors only
        if self.delta.ntotal:
            keys = self.delta.keys()
            self.base.add(keys, self.delta.stored(keys))
        self.base.save(path)
        try:
            os.unlink(delta_path(path))  # after the base: a crash in between leaves a delta of an older base
        except FileNotFoundError:
            pass
        self.delta, self.base_stamp, self._base_keys = self._empty_delta(), file_stamp(path), None
        return True


def delta_of(path: Path, stamp: list[int] | None):
    """(skipped keys, FAISS index) of the delta saved for the file at `path` whose stamp is `stamp`;
    None where there is none, it cannot be read, or it belongs to a file since replaced (which
    holds its images)."""
    saved = read_delta(delta_path(path))
    return None if saved is None or saved[0] != stamp else saved[1:]


def saved_delta(path: Path) -> tuple[int, int]:
    """(vectors in the delta, base images it skips) saved for the base at `path`; (0, 0) where none is."""
    saved = delta_of(path, file_stamp(path))
    return (0, 0) if saved is None else (int(saved[1].ntotal), len(saved[0]))


def _merged(first: ImageHits, second: ImageHits, n_images: int) -> ImageHits:
    keys = np.concatenate([first.keys, second.keys])
    scores = np.concatenate([first.scores, second.scores])
    slots = np.concatenate([first.slots, second.slots])
    order = np.lexsort((keys, -scores))[:n_images]
    return ImageHits(keys[order], scores[order], slots[order], first.exhausted and second.exhausted)


def _write_delta(path: Path, base_stamp: list[int], skipped: np.ndarray, delta: MaxSimIndex) -> None:
    import faiss

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, base=np.asarray(base_stamp, np.int64), skipped=skipped.astype(np.int64),
                     delta=faiss.serialize_index(delta.index))

    replace_atomically(path, write)


def read_delta(path: Path):
    """(base stamp, skipped keys, FAISS index) from a delta file; None where there is none or it
    cannot be read (the catalog holds every vector: the caller reconciles)."""
    import faiss

    try:
        with np.load(path, allow_pickle=False) as saved:  # each array read from the file once
            return ([int(v) for v in saved["base"]], saved["skipped"].astype(np.int64),
                    faiss.deserialize_index(saved["delta"]))
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, EOFError):
        return None
