"""The bulk indexing pipeline: walk and compare with the catalog -> decode (worker processes) -> embed
(model) -> write (catalog + FAISS).

The walk and the catalog are compared as two sorted streams (`compare.Comparison`), so a run holds
neither in memory, only the files it is decoding and embedding.

Decoding overlaps with the model because workers run ahead of it by a bounded window; it even starts
while the model is still loading (the embedder may be a Future), holding up to `prefetch_images`
decoded images until the model is there. Each batch is
committed to the catalog in one transaction before the next begins, so after `kill -9` a re-run
finds every finished batch unchanged and embeds none of it again. Files gone from disk are removed
last, so a file renamed in the same run first reuses its vectors by content hash.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np

from indexer.caption_catalog import NewCaptions
from indexer.catalog import FileEntry
from indexer.compare import Comparison, Todo, files_to_do
from indexer.decode import DEFAULT_MAX_PIXELS, Decoded, DecodeOptions, Skipped
from indexer.features import FeatureCache, FeatureCacheConfig
from indexer.schema import INDEXED, SKIPPED
from indexer.store import IndexStore
from indexer.threads import ThreadBalancer
from indexer.walk import FoundFile, WalkOptions, resolve_roots
from indexer.workers import DecodePool, PoolOptions
from retrieval.errors import BlipsearchError


class Embedder(Protocol):
    identity: Any
    transform: Any

    def encode_images(self, pixel_values: np.ndarray, keep_vit: bool = False) -> Any: ...


class Progress(Protocol):
    def walked(self, count: int) -> None: ...  # before `start`: files walked so far, now and then
    def start(self, total: int) -> None: ...
    def advance(self, count: int) -> None: ...
    def close(self) -> None: ...


class NoProgress:
    def walked(self, count: int) -> None: ...
    def start(self, total: int) -> None: ...
    def advance(self, count: int) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class IndexConfig:
    batch_size: int = 16
    walk: WalkOptions = WalkOptions()
    pool: PoolOptions = PoolOptions()
    max_pixels: int = DEFAULT_MAX_PIXELS
    use_draft: bool = True
    save_every_s: float = 30.0  # how often the FAISS file catches up with the catalog mid-run
    prefetch_images: int = 256  # decoded images held while the model loads (~0.6 MB each at 224 px)
    feature_cache: FeatureCacheConfig = FeatureCacheConfig(0)  # keep ViT features for re-ranking
    caption: Any = None  # retrieval.captioner.CaptionOptions: caption new images from the same pixels


NAME_NOT_UTF8 = "name-not-utf8"  # a skip reason with no catalog row: the catalog cannot hold the name
PATH_TOO_LONG = "path-too-long"  # the same: over `walk.MAX_PATH_BYTES`


@dataclass
class IndexSummary:
    indexed: int = 0
    unchanged: int = 0
    reused: int = 0
    removed: int = 0
    captioned: int = 0
    skipped: Counter = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=lambda: Counter())
    decoded_before_model: int = 0  # files decoded while the model was still loading
    names_not_utf8: list[str] = field(default_factory=list)  # skipped, with no catalog row (`walk.storable`)
    paths_too_long: list[str] = field(default_factory=list)  # the same (`walk.MAX_PATH_BYTES`)
    links_not_followed: int = 0  # symbolic links the walk left alone (`WalkOptions.follow_symlinks`)
    unreadable: list[str] = field(default_factory=list)  # not read; what the catalog holds there stays
    roots_found_empty: list[str] = field(default_factory=list)  # no file found, files indexed: kept (`walk.Missing`)
    vectors_saved: str = "unchanged"  # how the run left the FAISS file: "unchanged", "delta" or "whole"

    def skip_unstorable(self, names_not_utf8: list[str], paths_too_long: list[str]) -> None:
        """Files the catalog cannot name: counted as skipped, with no catalog row."""
        self.names_not_utf8, self.paths_too_long = names_not_utf8, paths_too_long
        for reason, found in ((NAME_NOT_UTF8, names_not_utf8), (PATH_TOO_LONG, paths_too_long)):
            if found:
                self.skipped[reason] += len(found)

    def as_dict(self) -> dict:
        return {
            "indexed": self.indexed,
            "unchanged": self.unchanged,
            "reused": self.reused,
            "removed": self.removed,
            "captioned": self.captioned,
            "skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "names_not_utf8": self.names_not_utf8,
            "paths_too_long": self.paths_too_long,
            "links_not_followed": self.links_not_followed,
            "unreadable": self.unreadable,
            "roots_found_empty": self.roots_found_empty,
            "vectors_saved": self.vectors_saved,
        }


@dataclass(frozen=True)
class _Result:
    todo: Todo
    outcome: Decoded | Skipped

    @property
    def found(self) -> FoundFile:
        return self.todo.found


class Indexer:
    def __init__(
        self, store: IndexStore, embedder: Embedder | Future, config: IndexConfig, progress: Progress | None = None,
        transform: Any = None, captioner: Any = None,
    ):
        """`embedder` may still be loading (a Future); give `transform` too, and decoding starts at once.
        `captioner` (or a Future of one) with `config.caption` captions new images as they are embedded."""
        self.store = store
        self._embedder = embedder
        self._captioner = captioner
        self.transform = transform
        self.config = config
        self.progress = progress or NoProgress()

    @property
    def embedder(self) -> Embedder:
        if isinstance(self._embedder, Future):
            self._embedder = self._embedder.result()  # re-raises a failed load, e.g. ModelNotFoundError
        return self._embedder

    def _model_ready(self) -> bool:
        return not isinstance(self._embedder, Future) or self._embedder.done()

    def run(self, paths: Sequence[str]) -> IndexSummary:
        started = time.perf_counter()
        summary = IndexSummary()
        roots = resolve_roots(list(paths))
        self.store.catalog.add_roots(roots)
        comparison, todo, total = files_to_do(*comparisons(self.store, roots, self.config.walk, self.progress))
        self.progress.start(total)
        transform = self.transform or self.embedder.transform
        options = DecodeOptions(transform, self.config.max_pixels, self.config.use_draft)
        writer: _Writer | None = None
        held: list[list[_Result]] = []  # decoded batches waiting for the model
        try:
            with DecodePool(options, self.config.pool) as pool:
                batch: list[_Result] = []
                for result in self._decoded(pool, todo, summary):
                    batch.append(result)
                    summary.decoded_before_model += writer is None and not self._model_ready()
                    if len(batch) >= self.config.batch_size:
                        held.append(batch)
                        batch = []
                        if self._model_ready() or len(held) * self.config.batch_size >= self.config.prefetch_images:
                            writer = writer or self._start_writing(transform, summary)
                            writer.write_all(held, summary)
                            held = []
                if held or batch:
                    writer = writer or self._start_writing(transform, summary)
                    writer.write_all(held + [batch], summary)
        finally:
            if writer is not None:
                writer.finish()
        orphaned = np.asarray(self.store.catalog.remove_files(comparison.gone), dtype=np.int64)
        walk_summary(comparison, summary)
        if writer is None and len(orphaned) == 0 and self.store.left_as_it_is(self.embedder.identity):
            # Nothing embedded or removed, and the FAISS file in step with the catalog and its settings:
            # a re-run over an unchanged collection neither reads nor rewrites it (16 GB a million
            # flat-fp16 images).
            self.store.catalog.claim_model(self.embedder.identity)  # another model is still refused
        else:
            writer = writer or self._start_writing(transform, summary)
            writer.vectors.remove(orphaned)
            # Writers sharing the catalog (PostgreSQL) add images this run's file lacks: take them in.
            whole = self.store.reconcile_and_save(writer.vectors, writer.embedder.identity)
            summary.vectors_saved = "whole" if whole else "delta"
        summary.seconds["total"] = time.perf_counter() - started
        self.progress.close()
        return summary

    def _start_writing(self, transform, summary: IndexSummary) -> "_Writer":
        """Once the model is loaded: check it decodes as assumed, claim the index for it, load vectors."""
        began = time.perf_counter()
        embedder = self.embedder
        summary.seconds["model_wait"] += time.perf_counter() - began
        if embedder.transform != transform:
            raise BlipsearchError(
                f"the model's processor file describes {transform}, but its loaded processor {embedder.transform}; "
                "please report this"
            )
        identity = embedder.identity
        self.store.catalog.claim_model(identity)
        cache = FeatureCache.for_model(self.store.directory, identity.fingerprint, self.config.feature_cache)
        captioner = self._captioner.result() if isinstance(self._captioner, Future) else self._captioner
        if captioner is not None and captioner.transform != transform:
            captioner = None  # it needs other pixels: `CaptionRun` captions these images afterwards
        return _Writer(self, self.store.load_vectors(identity), cache, captioner)

    def _decoded(self, pool: DecodePool, todo: Iterable[Todo], summary: IndexSummary):
        decoding: dict[str, Todo] = {}  # the files the pool has taken and not yet given back

        def paths():
            for item in todo:
                decoding[item.found.path] = item
                yield item.found.path

        iterator = pool.imap(paths())
        while True:
            waited = time.perf_counter()
            item = next(iterator, None)
            summary.seconds["decode_wait"] += time.perf_counter() - waited
            if item is None:
                return
            path, outcome = item
            yield _Result(decoding.pop(path), outcome)


class _Writer:
    """The embed and write stages: a batch of decoded files -> model -> one catalog transaction + FAISS."""

    def __init__(self, indexer: Indexer, vectors, feature_cache: FeatureCache | None, captioner: Any) -> None:
        self.store = indexer.store
        self.embedder = indexer.embedder
        self.config = indexer.config
        self.progress = indexer.progress
        self.vectors = vectors
        self.feature_cache = feature_cache  # filled with the ViT features the run computes anyway
        self.captioner = captioner if indexer.config.caption is not None else None
        self.saved_at = time.monotonic()
        self.threads = ThreadBalancer.for_device(getattr(self.embedder, "device", None))
        self._seen: tuple[float, float] | None = None  # decode_wait and model seconds when the balancer last looked

    def finish(self) -> None:
        """Give torch back the threads the run began with."""
        if self.threads is not None:
            self.threads.restore()

    def write_all(self, batches: list[list[_Result]], summary: IndexSummary) -> None:
        if self._seen is None:  # waits while the model loaded say nothing about the balance
            self._seen = (summary.seconds["decode_wait"], summary.seconds["model"])
        for batch in batches:
            if batch:
                self.write(batch, summary)
            if time.monotonic() - self.saved_at > self.config.save_every_s:
                self.store.save_vectors(self.vectors)
                self.saved_at = time.monotonic()
        if self.threads is not None:
            now = (summary.seconds["decode_wait"], summary.seconds["model"])
            self.threads.observe(len(batches), now[0] - self._seen[0], now[1] - self._seen[1])
            self._seen = now

    def write(self, batch: list[_Result], summary: IndexSummary) -> None:
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
            previous = result.todo.row
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
        captions = self._captions(fresh, summary) if fresh and self.captioner else None
        began = time.perf_counter()
        written = catalog.write_batch(entries, new_vectors, captions)
        self.vectors.remove(np.asarray(written.orphaned, dtype=np.int64))
        if written.created:
            keys = np.fromiter(written.created.values(), np.int64)
            self.vectors.add(keys, np.stack([new_vectors[h] for h in written.created]))
        summary.seconds["write"] += time.perf_counter() - began
        self.progress.advance(len(batch))


    def _captions(self, fresh: dict[str, np.ndarray], summary: IndexSummary) -> NewCaptions:
        began = time.perf_counter()
        options = self.config.caption
        texts = self.captioner.caption(np.stack(list(fresh.values())), options)
        summary.seconds["caption"] += time.perf_counter() - began
        summary.captioned += len(texts)
        return NewCaptions(dict(zip(fresh, texts)), self.captioner.name, options.prompt)


def comparisons(store: IndexStore, roots: list[str], options: WalkOptions,
                progress: Progress) -> tuple[Comparison, Callable[[], Comparison]]:
    """For `files_to_do`: the first pass, which reports the walk to `progress`, and a maker of another."""
    skip_dirs = (str(store.directory),)  # the index's own, which may lie inside a root

    def compare(on_walked=None) -> Comparison:
        return Comparison(store.catalog, roots, options, skip_dirs, on_walked)

    return compare(progress.walked), compare


def walk_summary(comparison: Comparison, summary: IndexSummary) -> None:
    """What the walk found besides the files to do, into the summary."""
    summary.unchanged += comparison.unchanged
    summary.removed = len(comparison.gone)
    summary.roots_found_empty = comparison.missing.held_roots()
    noticed = comparison.noticed
    summary.skip_unstorable(sorted(noticed.names_not_utf8), sorted(noticed.paths_too_long))
    summary.links_not_followed = len(noticed.links)
    summary.unreadable = noticed.unreadable_shown()


def _entry(found: FoundFile, outcome: Decoded | Skipped, status: str, error: str | None = None) -> FileEntry:
    return FileEntry(
        path=found.path, size=found.size, mtime_ns=found.mtime_ns, content_hash=outcome.content_hash,
        status=status, error=error, width=outcome.width, height=outcome.height, format=outcome.format,
    )
