"""Bulk indexing and captioning on a Ray cluster.

The driver walks and diffs the folders as a single-machine run does; Ray Data reads the files to do,
decodes them on CPU actors (`ray_stages.DecodeStage`) and embeds or captions them on model actors,
which write shard files to a shared filesystem or object store (fsspec URL). The driver then merges
the shards into the catalog and the FAISS index, one catalog transaction per shard, and deletes each
shard once merged.

Resumable shard by shard: a run first merges the shards an interrupted run left, so only files no
shard holds are read again. Merging a shard twice (a crash between its transaction and its deletion)
changes nothing: files are upserted by path and contents reused by hash.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, replace
from itertools import islice
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from indexer.captions import CaptionConfig, CaptionSummary
from indexer.catalog import FileEntry
from indexer.compare import files_to_do
from indexer.decode import DecodeOptions
from indexer.pipeline import IndexConfig, IndexSummary, NoProgress, Progress, comparisons, walk_summary
from indexer.ray_stages import MODEL_KEY, SHARD_PREFIX, CaptionStage, DecodeStage, EmbedStage, read_todo
from indexer.schema import INDEXED, SKIPPED
from indexer.store import IndexStore
from indexer.walk import FoundFile, at_or_under, resolve_roots
from retrieval.errors import BlipsearchError
from retrieval.loading import ModelIdentity


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: start a local Ray here; "auto", "ray://head:10001", ...
    shards_url: str = ""  # where model actors write shards: a shared path or an fsspec URL
    decode_actors: int | None = None  # CPU actors decoding; None: the cluster's CPUs less the model actors
    model_actors: int = 1
    gpus_per_model_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    num_cpus: int | None = None  # CPUs of a local Ray (None: all)
    batch_size: int = 16


def start_ray(config: RayConfig) -> None:
    import logging

    import ray

    if not ray.is_initialized():
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
        if config.address is None:
            options["num_cpus"] = config.num_cpus
        with _sigterm_kept():
            ray.init(address=config.address, **options)
    import ray.data._internal.execution.streaming_executor  # noqa: F401  (creates the loggers quietened below)

    for name in [n for n in logging.Logger.manager.loggerDict if n.startswith("ray")]:
        logging.getLogger(name).setLevel(logging.ERROR)  # Ray Data's INFO lines would bury our progress
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the CLI shows its own progress


@contextlib.contextmanager
def _sigterm_kept():
    """Keep a SIGTERM handler the caller installed (the CLI's, which stops a run as Ctrl-C does) over
    the one `ray.init` installs, which exits at once with a C-level stack dump on stderr."""
    own = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    finally:
        if callable(own):
            signal.signal(signal.SIGTERM, own)


def _actors(config: RayConfig) -> tuple[int, float]:
    """(decode actors, GPUs per model actor) for the cluster Ray is connected to."""
    import ray

    resources = ray.cluster_resources()
    gpus = config.gpus_per_model_actor
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    decode = config.decode_actors or max(1, int(resources.get("CPU", 1)) - config.model_actors)
    return decode, gpus


def _pool(actors: int) -> dict:
    import ray

    return {"compute": ray.data.ActorPoolStrategy(size=actors)}



TODO_FOLDER = "todo"  # under the shards URL: the files to do, for Ray Data to read


class Shards:
    """The shard files under one URL: listed, read, deleted by the driver."""

    def __init__(self, url: str) -> None:
        import fsspec

        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.url = url

    def names(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)
                      if p.rsplit("/", 1)[-1].startswith(SHARD_PREFIX))

    def read(self, name: str):
        import pyarrow.parquet as pq

        with self.fs.open(f"{self.root}/{name}", "rb") as handle:
            table = pq.read_table(handle)
        return table.to_pylist(), json.loads(table.schema.metadata[MODEL_KEY])

    def delete(self, name: str) -> None:
        self.fs.rm(f"{self.root}/{name}")

    def clear_partial(self) -> None:
        """Remove shards a killed run's model actors left half-written (`ShardWriter` writes each under
        `.tmp-` and renames it when whole). Only at the start of a run, before its actors start: the
        index's writer lock keeps other runs out."""
        if self.fs.exists(self.root):
            for path in self.fs.ls(self.root, detail=False):
                if path.rsplit("/", 1)[-1].startswith(f".tmp-{SHARD_PREFIX}"):
                    self.fs.rm(path)

    def write_todo(self, rows: Iterator[dict], per_file: int) -> list[str]:
        """The files to do, written `per_file` rows to a Parquet file under todo/ for Ray Data to read
        (each file one block, so the decode actors share the work): the driver lists none of them.
        Returns the files' paths on `self.fs`; what an interrupted run left there is replaced."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.clear_todo()
        folder = f"{self.root}/{TODO_FOLDER}"
        self.fs.makedirs(folder, exist_ok=True)
        written = []
        for chunk in iter(lambda: list(islice(rows, per_file)), []):
            written.append(f"{folder}/{len(written):06d}.parquet")
            with self.fs.open(written[-1], "wb") as handle:
                pq.write_table(pa.Table.from_pylist(chunk), handle)
        return written

    def clear_todo(self) -> None:
        folder = f"{self.root}/{TODO_FOLDER}"
        if self.fs.exists(folder):
            self.fs.rm(folder, recursive=True)


def _stream(dataset, stages: list[tuple[Any, dict]], batch_size: int) -> Iterator[int]:
    """Run the Ray Data pipeline over `dataset`; yields how many rows each finished batch held."""
    import ray

    for stage, options in stages:
        dataset = dataset.map_batches(stage, batch_size=batch_size, batch_format="numpy", **options)
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            yield len(batch["path"])
    except ray.exceptions.RayError as exc:
        cause = str(exc).strip().splitlines()[-1][:300]
        raise RayRunError(f"the Ray run failed ({cause}); the shards written so far are kept, "
                          "so running the same command again resumes") from None


def _from_items(rows: list[dict], batch_size: int):
    import ray

    return ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size, 1000)))


class RayRunError(BlipsearchError):
    exit_code = 1


class _RayRun:
    """What index and caption runs share: the store, the model, the shards, and the Ray pipeline."""

    def __init__(self, store: IndexStore, model_config: Any, config: Any, ray_config: RayConfig,
                 transform: Any, progress: Progress | None = None) -> None:
        self.store, self.model_config, self.config, self.ray = store, model_config, config, ray_config
        self.transform = transform
        self.progress = progress or NoProgress()
        self.shards = Shards(ray_config.shards_url)

    def _process(self, dataset, count: int, decode: DecodeOptions, model_stage: type, model_args: tuple,
                 batch_size: int) -> None:
        """Decode actors then model actors over the `count` rows of `dataset`, each model batch written
        as a shard."""
        start_ray(self.ray)
        decode_actors, gpus = _actors(self.ray)
        stages = [
            (DecodeStage, {"fn_constructor_args": (decode, replace(self.config.pool, workers=1)),
                           **_pool(decode_actors), "num_cpus": 1}),
            (model_stage, {"fn_constructor_args": model_args,
                           **_pool(self.ray.model_actors), "num_gpus": gpus, "num_cpus": 1}),
        ]
        self.progress.start(count)
        for done in _stream(dataset, stages, batch_size):
            self.progress.advance(done)


class RayIndexRun(_RayRun):
    config: IndexConfig
    vectors = None  # the FAISS index, loaded once the model is known

    def run(self, paths: Sequence[str]) -> IndexSummary:
        started = time.perf_counter()
        summary = IndexSummary()
        catalog = self.store.catalog
        roots = resolve_roots(list(paths))
        catalog.add_roots(roots)
        self.shards.clear_partial()
        leftover = self._merge(roots, summary)  # what an interrupted run left
        # As `Indexer.run`: the walk and the catalog compared as streams.
        comparison, todo, total = files_to_do(*comparisons(self.store, roots, self.config.walk, self.progress))
        if total:
            self._embed((item.found for item in todo), total)
            self._merge(roots, summary)
        orphaned = catalog.remove_files(comparison.gone)
        walk_summary(comparison, summary)
        summary.unchanged -= leftover  # merged from the shards above, so found unchanged since
        identity = catalog.model()
        if identity is not None:
            vectors = self._vectors(identity)
            vectors.remove(np.asarray(orphaned, dtype=np.int64))
            summary.vectors_saved = "whole" if self.store.reconcile_and_save(vectors, identity) else "delta"
        summary.seconds["total"] = time.perf_counter() - started
        self.progress.close()
        return summary

    def _embed(self, todo: Iterable[FoundFile], count: int) -> None:
        import ray

        start_ray(self.ray)
        known = ray.put(self.store.catalog.content_hashes())  # put once, read by every model actor
        rows = ({"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns} for f in todo)
        per_file = max(self.ray.batch_size, -(-count // 1000))  # as many blocks as before: up to 1,000
        files = self.shards.write_todo(rows, per_file)
        dataset = ray.data.from_items([{"file": name} for name in files], override_num_blocks=len(files))
        dataset = dataset.map_batches(read_todo, batch_size=1, batch_format="numpy",
                                      fn_kwargs={"shards_url": self.ray.shards_url})
        decode = DecodeOptions(self.transform, self.config.max_pixels, self.config.use_draft)
        self._process(dataset, count, decode, EmbedStage, (self.model_config, self.ray.shards_url, known),
                      self.ray.batch_size)
        self.shards.clear_todo()

    def _vectors(self, identity: ModelIdentity):
        if self.vectors is None:
            self.vectors = self.store.load_vectors(identity)
        return self.vectors

    def _merge(self, roots: list[str], summary: IndexSummary) -> int:
        """Merge every shard; returns how many files they held (of those under `roots` still as they were)."""
        catalog = self.store.catalog
        saved_at, merged = time.monotonic(), 0
        for name in self.shards.names():
            rows, model = self.shards.read(name)
            identity = ModelIdentity(**model)
            catalog.claim_model(identity)  # refuses a shard made by another model
            vectors = self._vectors(identity)
            entries, fresh = self._entries(self._still_there(rows, roots), summary,
                                           (identity.num_queries, identity.embed_dim))
            merged += len(entries)
            written = catalog.write_batch(entries, fresh)
            vectors.remove(np.asarray(written.orphaned, dtype=np.int64))
            if written.created:
                vectors.add(np.fromiter(written.created.values(), np.int64),
                            np.stack([fresh[h] for h in written.created]))
            self.shards.delete(name)
            if time.monotonic() - saved_at > self.config.save_every_s:
                self.store.save_vectors(vectors)
                saved_at = time.monotonic()
        return merged

    def _still_there(self, rows: list[dict], roots: list[str]) -> list[dict]:
        """A shard's rows of files under `roots` that are on disk as they were when decoded; the others
        changed since (they are still to do) or left the run's folders."""
        kept = []
        for row in rows:
            if not any(at_or_under(row["path"], root) for root in roots):
                continue
            try:
                stat = os.stat(row["path"], follow_symlinks=self.config.walk.follow_symlinks)
            except OSError:
                continue
            if (stat.st_size, stat.st_mtime_ns) == (row["size"], row["mtime_ns"]):
                kept.append(row)
        return kept

    def _entries(self, rows: list[dict], summary: IndexSummary,
                 shape: tuple[int, int]) -> tuple[list[FileEntry], dict[str, np.ndarray]]:
        """A shard's rows -> catalog entries and new vectors, the summary counting what each row is, as
        a single run would."""
        existing = self.store.catalog.embedding_ids_for(r["content_hash"] for r in rows if r["decoded"])
        known = self.store.catalog.files_at([r["path"] for r in rows])
        entries, fresh = [], {}
        for row in rows:
            digest = row["content_hash"]
            facts = {k: row[k] for k in ("path", "size", "mtime_ns", "width", "height", "format")}
            if not row["decoded"]:
                summary.skipped[row["reason"]] += 1
                entries.append(FileEntry(**facts, content_hash=digest, status=SKIPPED, error=row["error"]))
                continue
            if digest in existing or digest in fresh:
                previous = known.get(row["path"])
                if previous is not None and previous.content_hash == digest:
                    summary.unchanged += 1  # touched, same bytes
                else:
                    summary.reused += 1
            elif row["vectors"] is not None:
                fresh[digest] = np.frombuffer(row["vectors"], np.float32).reshape(shape)
                summary.indexed += 1
            else:
                continue  # known to the catalog when embedded, gone from it since: still to do
            entries.append(FileEntry(**facts, content_hash=digest, status=INDEXED, error=None))
        return entries, fresh


class RayCaptionRun(_RayRun):
    """`caption --ray`: contents without a caption -> decode actors -> captioning actors -> shards -> catalog."""

    config: CaptionConfig

    def run(self) -> CaptionSummary:
        import os

        started = time.perf_counter()
        summary = CaptionSummary()
        self.config.options.validate()
        self.shards.clear_partial()
        self._merge(summary)  # what an interrupted run left
        captions = self.store.catalog.captions
        key = (self.model_config.name, self.config.options.prompt, self.config.overwrite)
        rows, after = [], 0
        while page := captions.todo(*key, after_id=after, limit=4096):
            after = page[-1].embedding_id
            for task in page:
                if os.path.exists(task.path):
                    rows.append({"embedding_id": task.embedding_id, "path": task.path, "expected_hash": task.content_hash})
                else:
                    summary.missing.append(task.path)
        if rows:
            model_args = (self.model_config, self.config.options, self.ray.shards_url)
            self._process(_from_items(rows, self.config.batch_size), len(rows),
                          DecodeOptions.for_indexed(self.transform), CaptionStage, model_args, self.config.batch_size)
            self._merge(summary)
        summary.seconds["total"] = time.perf_counter() - started
        self.progress.close()
        return summary

    def _merge(self, summary: CaptionSummary) -> None:
        catalog = self.store.catalog
        for name in self.shards.names():
            rows, model = self.shards.read(name)
            alive = set(catalog.embedding_ids().tolist())  # a content may have left the catalog since
            texts = {r["embedding_id"]: r["caption"] for r in rows if r["caption"] is not None and r["embedding_id"] in alive}
            for row in rows:
                if row["caption"] is None:
                    summary.count_failure(row["path"], row["reason"])
            catalog.captions.write(texts, model["name"], model["prompt"])
            summary.captioned += len(texts)
            self.shards.delete(name)


def check_shards_url(url: str) -> None:
    try:
        Shards(url)
    except (ValueError, ImportError) as exc:
        raise BlipsearchError(f"cannot use {url!r} for shards: {exc}") from None
