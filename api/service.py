"""What the HTTP server does, apart from HTTP: one loaded model shared by every request and job,
searches that see each finished job's images and what other processes index, safe file access,
thumbnails (`api.thumbnails`).

Model calls from request threads and the job thread take one lock, so concurrent requests queue for
the model instead of oversubscribing it; catalog reads run in parallel.
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from api.jobs import Job, JobProgress, JobRunner
from api.thumbnails import ThumbnailCache
from indexer import decode
from indexer.decode import Skipped
from indexer.errors import IndexBusyError
from indexer.store import IndexStore, StoreConfig
from indexer.workers import PoolOptions, UntrustedDecoder
from indexer.walk import at_or_under
from retrieval.errors import BlipsearchError, UsageError


PREVIEW_PX = 2048  # a full image in the web page's viewer, where the browser cannot show the file


@dataclass(frozen=True)
class ServableFile:
    path: Path  # resolved, inside an indexed folder
    content_hash: str | None  # as indexed; None for a file skipped then
    format: str | None  # Pillow's name for it, as indexed ("JPEG", "HEIF"); None for a file skipped then


@dataclass(frozen=True)
class ServeConfig:
    store: StoreConfig
    model: str | None = None  # default: the model the index records
    caption_model: str | None = None
    device: str | None = None
    token: str | None = None  # required on write endpoints when set
    max_upload_bytes: int = 20 * 1024 * 1024
    feature_cache_mb: int | None = None  # None: as the index keeps it (`blipsearch index --feature-cache-mb`)
    reload_check_s: float = 1.0  # how often a search looks whether another process changed the index
    max_rerank: int = 256  # images one search may have ITM re-rank: each costs a decode and a ViT pass
    count_time_limit_s: float = 0.2  # for a filtered listing's total (GET /api/images)
    page_scan_rows: int = 100_000  # a listing page by caption or a glob with no folder reads at most this many paths
    thumbnail_cache_mb: int = 1024  # thumbnails kept in the index directory, least recently shown removed first
    upload_decode_timeout_s: float = 10.0  # an uploaded query image: decoding past this is given up


class LockedModel:
    """A model whose calls run one at a time; attributes other than methods pass through."""

    def __init__(self, model: Any, lock: threading.Lock) -> None:
        self._model = model
        self._lock = lock

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._model, name)
        if not inspect.ismethod(value):  # e.g. `transform`, a callable value that workers pickle
            return value

        def locked(*args, **kwargs):
            with self._lock:
                return value(*args, **kwargs)

        return locked


class CachedCounts:
    """A count for /healthz, /api/status and /metrics: the catalog's rows (counting reads every row,
    0.1-0.3 s a million files) or the index directory's bytes (a stat per file: 1.1 s for 100,000
    thumbnails). Probes, scrapers and the search page ask often; so requests get the last count, and
    one that finds it stale starts a count in the background: at most every `min_age_s`, and ten
    times the last count's duration apart. `refresh` counts at once (after this server's own writes).
    While counting fails (the database away), requests get that error, as without a cache. Counted
    at once (`at_start`: a catalog that cannot be read stops the server there), or by the first
    request that asks."""

    def __init__(self, count: Callable[[], dict], min_age_s: float = 1.0, at_start: bool = True) -> None:
        self._count = count
        self._min_age_s = min_age_s
        self._lock = threading.Lock()
        self._counting = threading.Lock()  # one count at a time
        self._next = 0.0
        self._value: dict | None = None  # None: not counted yet
        self._error: Exception | None = None
        if at_start:
            self.refresh()
            if self._error is not None:
                raise self._error

    def get(self) -> dict:
        if self._value is None:  # not counted yet: this request counts, and any others wait for it
            with self._counting:
                if self._value is None:
                    self._count_holding_lock(release=False)
        with self._lock:
            value, error, stale = self._value, self._error, time.monotonic() >= self._next
        if stale and self._counting.acquire(blocking=False):
            threading.Thread(target=self._count_holding_lock, name="blipsearch-counts", daemon=True).start()
        if error is not None:
            raise error
        return value

    def refresh(self) -> None:
        with self._counting:
            self._count_holding_lock(release=False)

    def _count_holding_lock(self, release: bool = True) -> None:
        began = time.monotonic()
        try:
            try:
                value, error = self._count(), None
            except Exception as exc:  # noqa: BLE001 - raised to the requests that ask
                value, error = self._value, exc
            with self._lock:
                self._value, self._error = value, error
                self._next = time.monotonic() + max(self._min_age_s, 10 * (time.monotonic() - began))
        finally:
            if release:
                self._counting.release()


class Service:
    def __init__(self, config: ServeConfig, retriever: Any, captioner_loader=None) -> None:
        from api.options import feature_cache
        from indexer.rerank import Reranker

        self.config = config
        self.store = IndexStore.open(config.store, create=True)
        self.model_lock = threading.Lock()
        self.retriever = LockedModel(retriever, self.model_lock)
        self._captioner_loader = captioner_loader
        self._captioner = None
        # Decodes in request threads (40 of them), of whole images where they are no JPEG (300 MB for
        # a 100 MP PNG): re-ranking's and thumbnails' together, at most one per core at a time.
        self.decode_slots = threading.BoundedSemaphore(os.cpu_count() or 1)
        self.reranker = Reranker(self.retriever, feature_cache(self.store, retriever.identity, config.feature_cache_mb),
                                 decode_slots=self.decode_slots)
        self.searcher = None
        self._reload_lock = threading.Lock()
        self._loaded_state = None  # `_index_state()` when the searcher was built
        self._next_check = 0.0
        self._reload_error: BlipsearchError | None = None  # why the last background reload failed
        self.reload()
        self.counts = CachedCounts(self.store.catalog.counts)
        # A stat per file in the index directory: not at every start, only when /api/status asks.
        self.disk_bytes = CachedCounts(lambda: {"bytes": self.store.disk_bytes()}, at_start=False)
        self.jobs = JobRunner(self._run_job, lambda job: self.reload())
        self.uploads = UntrustedDecoder(PoolOptions(workers=1, timeout_s=config.upload_decode_timeout_s))
        self.thumbnails = ThumbnailCache(self.store.directory / "thumbnails", config.thumbnail_cache_mb * 1024 * 1024,
                                         self.decode_slots)

    def close(self) -> None:
        self.jobs.shutdown()
        self.uploads.close()
        self._reload_lock.acquire(timeout=60)  # let a background reload finish with the store
        self.store.close()

    # -- searching --------------------------------------------------------------------------------
    def reload(self) -> None:
        """A fresh Searcher over the catalog and FAISS as they are now, swapped in atomically."""
        with self._reload_lock:  # one at a time, so an older state never replaces a newer one
            self._reload()

    def _reload(self) -> None:
        from indexer.search import Searcher

        state = self._index_state()
        if self.store.catalog.model() is None:
            self.searcher = None
        else:
            self.searcher = Searcher(self.store, self.retriever, self.reranker)
        self._loaded_state = state
        self._reload_error = None

    def _index_state(self) -> tuple:
        """What changes when another process changes the index: its FAISS file and delta, one of which
        every run replaces atomically at its end, and the catalog's vectors version, which every change
        to the embeddings replaces, also those of writers sharing a PostgreSQL catalog under their own
        FAISS files (the newest embedding id, used before, missed what they removed)."""
        return self.store.vectors_stamp(), self.store.catalog.vectors_version()

    def _reload_if_changed(self) -> None:
        """At most every `reload_check_s`: if another process changed the index, reload in the
        background. Searches go on with the searcher they have meanwhile, since loading a large index
        takes a while, and reloads keep four times their own duration apart."""
        if time.monotonic() < self._next_check or not self._reload_lock.acquire(blocking=False):
            return
        try:
            changed = self._index_state() != self._loaded_state
        except BaseException:
            self._reload_lock.release()
            raise
        if not changed:
            self._next_check = time.monotonic() + self.config.reload_check_s
            self._reload_lock.release()
            return
        threading.Thread(target=self._reload_in_background, name="blipsearch-reload", daemon=True).start()

    def _reload_in_background(self) -> None:  # holds `_reload_lock`, taken by `_reload_if_changed`
        began = time.monotonic()
        try:
            self._reload()
        except BlipsearchError as exc:  # e.g. another model claimed the empty index: the error searches get
            self._reload_error = exc
        except Exception as exc:  # the searcher in hand stays, and the next check tries again
            self._reload_error = BlipsearchError(f"could not reload the index: {type(exc).__name__}: {exc}")
        finally:
            took = time.monotonic() - began
            self._next_check = time.monotonic() + max(self.config.reload_check_s, 4 * took)
            self._reload_lock.release()

    def require_searcher(self):
        self._reload_if_changed()
        searcher = self.searcher
        if searcher is None:
            if self._reload_error is not None:
                raise self._reload_error
            raise UsageError("the index is empty; start an index job first (POST /api/jobs)")
        return searcher

    # -- files ------------------------------------------------------------------------------------
    def servable_file(self, file_id: int) -> ServableFile | None:
        """The file of catalog row `file_id`, only if it still resolves inside an indexed root."""
        row = self.store.catalog.file(file_id)
        path = None if row is None else self._servable(row.path)
        return None if path is None else ServableFile(path, row.content_hash, row.format)

    def _servable(self, path: str) -> Path | None:
        real = os.path.realpath(path)
        roots = [os.path.realpath(r) for r in self.store.catalog.roots()]
        inside = any(at_or_under(real, root) for root in roots)
        return Path(real) if inside and os.path.isfile(real) else None

    def thumbnail(self, file: ServableFile) -> bytes | Skipped:
        """A JPEG thumbnail (`api.thumbnails`) of a file indexed as an image (with a content hash); why
        not, for one that can no longer be read as an image."""
        return self.thumbnails.get(file.content_hash, str(file.path))

    def preview(self, file: ServableFile) -> bytes | Skipped:
        """A JPEG of the image at most PREVIEW_PX on a side, for a browser that cannot show the file's
        own format (HEIC, TIFF). Made for each request, not kept: views of full images are few."""
        with self.decode_slots:
            return decode.thumbnail_jpeg(str(file.path), PREVIEW_PX, file.content_hash)

    def delete_image(self, file_id: int) -> bool:
        """Forget one file (not the file on disk); its vectors go when no other file shares them."""
        from indexer.forget import forget

        row = self.store.catalog.file(file_id)
        if row is None:
            return False
        try:
            forget(self.store, [row.path])
        except IndexBusyError:  # the store's message speaks of another run; here it may be our own job
            raise IndexBusyError("the index is busy: a job of this server, or another blipsearch run, is "
                                 "writing to it; try again when it ends") from None
        self.reload()
        self.counts.refresh()
        return True

    # -- jobs -------------------------------------------------------------------------------------
    def _run_job(self, job: Job, progress: JobProgress) -> dict:
        try:
            with self.store.writer_lock():
                if job.kind == "index":
                    return self._index(job, progress)
                return self._caption(job, progress)
        except IndexBusyError as exc:
            raise RuntimeError(str(exc)) from None
        finally:  # before the job shows as finished, so that what it wrote is counted by then
            self.counts.refresh()

    def _index(self, job: Job, progress: JobProgress) -> dict:
        from indexer.pipeline import IndexConfig, Indexer
        from indexer.walk import recorded_roots
        from indexer.workers import PoolOptions

        config = IndexConfig(
            batch_size=job.params.get("batch_size", 16),
            walk=self.store.choose_walk(tuple(job.params.get("exclude") or ())),  # as `index` does
            pool=PoolOptions(workers=os.cpu_count() or 1),
        )
        paths, gone = job.params["paths"], []
        if not paths:  # every folder indexed before; those gone stay in the index, named in the result
            paths, gone = recorded_roots(self.store.catalog.roots())
        result = Indexer(self.store, self.retriever, config, progress).run(paths).as_dict()
        return {**result, "roots_gone": gone}

    def _caption(self, job: Job, progress: JobProgress) -> dict:
        from api.options import best_of
        from indexer.captions import CaptionConfig, CaptionRun
        from indexer.workers import PoolOptions
        from retrieval.captioner import CaptionOptions

        options = CaptionOptions(prompt=job.params.get("prompt", ""),
                                 max_new_tokens=job.params.get("max_new_tokens", 30))
        config = CaptionConfig(options, job.params.get("batch_size", 8), job.params.get("overwrite", False),
                               PoolOptions(workers=os.cpu_count() or 1))
        captioner = best_of(self.captioner(), self.retriever, job.params.get("candidates", 1))
        return CaptionRun(self.store, captioner, config, progress).run().as_dict()

    def captioner(self):
        if self._captioner is None:
            if self._captioner_loader is None:
                raise UsageError("this server has no caption model")
            with self.model_lock:  # loading is not thread-safe in transformers
                self._captioner = LockedModel(self._captioner_loader(), self.model_lock)
        return self._captioner
