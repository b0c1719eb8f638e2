"""The bulk indexing pipeline: walk -> decode (worker processes) -> embed (model) -> write (catalog + FAISS).

Decoding overlaps with the model because workers run ahead of it by a bounded window. Each batch is
committed to the catalog in one transaction before the next begins, so after `kill -9` a re-run
finds every finished batch unchanged and embeds none of it again. Files gone from disk are removed
last, so a file renamed in the same run first reuses its vectors by content hash.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from indexer.catalog import FileEntry, FileRow
from indexer.decode import Decoded, DecodeOptions, Skipped
from indexer.features import FeatureCache
from indexer.schema import INDEXED, SKIPPED
from indexer.store import IndexStore
from indexer.walk import FoundFile, WalkOptions, resolve_roots, walk
from indexer.workers import DecodePool, PoolOptions


class Embedder(Protocol):
    identity: Any
    transform: Any

    def encode_images(self, pixel_values: np.ndarray, keep_vit: bool = False) -> Any: ...


class Progress(Protocol):
    def start(self, total: int) -> None: ...
    def advance(self, count: int) -> None: ...
    def close(self) -> None: ...


class NoProgress:
    def start(self, total: int) -> None: ...
    def advance(self, count: int) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class IndexConfig:
    batch_size: int = 16
    walk: WalkOptions = WalkOptions()
    pool: PoolOptions = PoolOptions()
    max_pixels: int = 100_000_000
    use_draft: bool = True
    save_every_s: float = 30.0  # how often the FAISS file catches up with the catalog mid-run


@dataclass
class IndexSummary:
    indexed: int = 0
    unchanged: int = 0
    reused: int = 0
    removed: int = 0
    skipped: Counter = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=lambda: Counter())

    def as_dict(self) -> dict:
        return {
            "indexed": self.indexed,
            "unchanged": self.unchanged,
            "reused": self.reused,
            "removed": self.removed,
            "skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


@dataclass(frozen=True)
class _Result:
    found: FoundFile
    outcome: Decoded | Skipped


class Indexer:
    def __init__(
        self, store: IndexStore, embedder: Embedder, config: IndexConfig, progress: Progress | None = None,
        feature_cache: FeatureCache | None = None,
    ):
        self.store = store
        self.embedder = embedder
        self.config = config
        self.progress = progress or NoProgress()
        self.feature_cache = feature_cache  # filled with the ViT features the run computes anyway

    def run(self, paths: Sequence[str]) -> IndexSummary:
        started = time.perf_counter()
        summary = IndexSummary()
        identity = self.embedder.identity
        self.store.catalog.claim_model(identity)
        vectors = self.store.load_vectors(identity)
        roots = resolve_roots(list(paths))
        found = walk(roots, self.config.walk)
        known = self.store.catalog.files_under(roots)
        todo = [f for path, f in found.items() if not _unchanged(f, known.get(path))]
        summary.unchanged = len(found) - len(todo)
        self.progress.start(len(todo))
        saved_at = time.monotonic()
        options = DecodeOptions(self.embedder.transform, self.config.max_pixels, self.config.use_draft)
        with DecodePool(options, self.config.pool) as pool:
            batch: list[_Result] = []
            for result in self._decoded(pool, todo, summary):
                batch.append(result)
                if len(batch) >= self.config.batch_size:
                    self._write(batch, known, vectors, summary)
                    batch = []
                    if time.monotonic() - saved_at > self.config.save_every_s:
                        self.store.save_vectors(vectors)
                        saved_at = time.monotonic()
            if batch:
                self._write(batch, known, vectors, summary)
        gone = sorted(set(known) - set(found))
        vectors.remove(np.asarray(self.store.catalog.remove_paths(gone), dtype=np.int64))
        summary.removed = len(gone)
        self.store.save_vectors(vectors)
        summary.seconds["total"] = time.perf_counter() - started
        self.progress.close()
        return summary

    def _decoded(self, pool: DecodePool, todo: list[FoundFile], summary: IndexSummary):
        by_path = {f.path: f for f in todo}
        iterator = pool.imap([f.path for f in todo])
        while True:
            waited = time.perf_counter()
            item = next(iterator, None)
            summary.seconds["decode_wait"] += time.perf_counter() - waited
            if item is None:
                return
            path, outcome = item
            yield _Result(by_path[path], outcome)

    def _write(self, batch: list[_Result], known: dict[str, FileRow], vectors, summary: IndexSummary) -> None:
        catalog = self.store.catalog
        decoded = [r for r in batch if isinstance(r.outcome, Decoded)]
        existing = catalog.embedding_ids_for(r.outcome.content_hash for r in decoded)
        fresh: dict[str, np.ndarray] = {}  # content hash -> pixels, one per distinct new content
        entries: list[FileEntry] = []
        for result in batch:
            found, outcome = result.found, result.outcome
            if isinstance(outcome, Skipped):
                summary.skipped[outcome.reason] += 1
                entries.append(_entry(found, outcome, SKIPPED, outcome.error))
                continue
            entries.append(_entry(found, outcome, INDEXED))
            previous = known.get(found.path)
            if outcome.content_hash in existing or outcome.content_hash in fresh:
                same_file = previous is not None and previous.content_hash == outcome.content_hash
                if same_file:
                    summary.unchanged += 1  # touched, same bytes: nothing to redo
                else:
                    summary.reused += 1
            else:
                fresh[outcome.content_hash] = outcome.pixels
                summary.indexed += 1
        new_vectors: dict[str, np.ndarray] = {}
        if fresh:
            began = time.perf_counter()
            encoded = self.embedder.encode_images(np.stack(list(fresh.values())), keep_vit=bool(self.feature_cache))
            summary.seconds["model"] += time.perf_counter() - began
            new_vectors = dict(zip(fresh.keys(), encoded.query_embeds))
            if self.feature_cache:
                for content_hash, vit in zip(fresh, encoded.vit_features):
                    self.feature_cache.put(content_hash, vit.float().cpu().numpy())
        began = time.perf_counter()
        written = catalog.write_batch(entries, new_vectors)
        vectors.remove(np.asarray(written.orphaned, dtype=np.int64))
        if written.created:
            keys = np.fromiter(written.created.values(), np.int64)
            vectors.add(keys, np.stack([new_vectors[h] for h in written.created]))
        summary.seconds["write"] += time.perf_counter() - began
        self.progress.advance(len(batch))


def _unchanged(found: FoundFile, row: FileRow | None) -> bool:
    return row is not None and row.size == found.size and row.mtime_ns == found.mtime_ns


def _entry(found: FoundFile, outcome: Decoded | Skipped, status: str, error: str | None = None) -> FileEntry:
    return FileEntry(
        path=found.path, size=found.size, mtime_ns=found.mtime_ns, content_hash=outcome.content_hash,
        status=status, error=error, width=outcome.width, height=outcome.height, format=outcome.format,
    )
