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

import json
import time
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import numpy as np

from indexer.captions import CaptionConfig, CaptionSummary
from indexer.catalog import FileEntry, FileRow
from indexer.decode import DecodeOptions
from indexer.compare import unchanged
from indexer.pipeline import IndexConfig, IndexSummary, NoProgress, Progress
from indexer.ray_stages import MODEL_KEY, SHARD_PREFIX, CaptionStage, DecodeStage, EmbedStage
from indexer.schema import INDEXED, SKIPPED
from indexer.store import IndexStore, reconcile
from indexer.walk import FoundFile, resolve_roots, walk
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
        ray.init(address=config.address, **options)
    import ray.data._internal.execution.streaming_executor  # noqa: F401  (creates the loggers quietened below)

    for name in [n for n in logging.Logger.manager.loggerDict if n.startswith("ray")]:
        logging.getLogger(name).setLevel(logging.ERROR)  # Ray Data's INFO lines would bury our progress
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the CLI shows its own progress


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


def _stream(rows: list[dict], stages: list[tuple[Any, dict]], batch_size: int) -> Iterator[int]:
    """Run the Ray Data pipeline over `rows`; yields how many rows each finished batch held."""
    import ray

    dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size, 1000)))
    for stage, options in stages:
        dataset = dataset.map_batches(stage, batch_size=batch_size, batch_format="numpy", **options)
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            yield len(batch["path"])
    except ray.exceptions.RayError as exc:
        cause = str(exc).strip().splitlines()[-1][:300]
        raise RayRunError(f"the Ray run failed ({cause}); the shards written so far are kept, "
                          "so running the same command again resumes") from None


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

    def _process(self, rows: list[dict], decode: DecodeOptions, model_stage: type, model_args: tuple,
                 batch_size: int) -> None:
        """Decode actors then model actors over `rows`, each model batch written as a shard."""
        start_ray(self.ray)
        decode_actors, gpus = _actors(self.ray)
        stages = [
            (DecodeStage, {"fn_constructor_args": (decode, replace(self.config.pool, workers=1)),
                           **_pool(decode_actors), "num_cpus": 1}),
            (model_stage, {"fn_constructor_args": model_args,
                           **_pool(self.ray.model_actors), "num_gpus": gpus, "num_cpus": 1}),
        ]
        self.progress.start(len(rows))
        for count in _stream(rows, stages, batch_size):
            self.progress.advance(count)


class RayIndexRun(_RayRun):
    config: IndexConfig
    vectors = None  # the FAISS index, loaded once the model is known

    def run(self, paths: Sequence[str]) -> IndexSummary:
        started = time.perf_counter()
        summary = IndexSummary()
        catalog = self.store.catalog
        roots = resolve_roots(list(paths))
        catalog.add_roots(roots)
        walked = walk(roots, self.config.walk, skip_dirs=(str(self.store.directory),))
        found = walked.files
        summary.skip_names_not_utf8(walked.names_not_utf8)
        summary.links_not_followed = walked.links_not_followed
        summary.unreadable = walked.unreadable
        leftover = self._merge(found, catalog.files_under(roots), summary)  # what an interrupted run left
        known = catalog.files_under(roots)
        todo = [f for f in found.values() if not unchanged(f, known.get(f.path))]
        summary.unchanged += len(found) - len(todo) - leftover
        if todo:
            self._embed(todo)
            self._merge(found, known, summary)
        gone, summary.roots_found_empty = walked.gone(catalog.files_under(roots))
        orphaned = catalog.remove_paths(gone)
        summary.removed = len(gone)
        identity = catalog.model()
        if identity is not None:
            vectors = self._vectors(identity)
            vectors.remove(np.asarray(orphaned, dtype=np.int64))
            reconcile(vectors, catalog, identity)
            self.store.save_vectors(vectors)
        summary.seconds["total"] = time.perf_counter() - started
        self.progress.close()
        return summary

    def _embed(self, todo: list[FoundFile]) -> None:
        import ray

        start_ray(self.ray)
        known = ray.put(frozenset(self.store.catalog.content_hashes()))  # put once, read by every model actor
        rows = [{"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns} for f in todo]
        decode = DecodeOptions(self.transform, self.config.max_pixels, self.config.use_draft)
        self._process(rows, decode, EmbedStage, (self.model_config, self.ray.shards_url, known), self.ray.batch_size)

    def _vectors(self, identity: ModelIdentity):
        if self.vectors is None:
            self.vectors = self.store.load_vectors(identity)
        return self.vectors

    def _merge(self, found: dict[str, FoundFile], known: dict[str, FileRow], summary: IndexSummary) -> int:
        """Merge every shard; returns how many files they held (of those still as they were)."""
        catalog = self.store.catalog
        saved_at, merged = time.monotonic(), 0
        for name in self.shards.names():
            rows, model = self.shards.read(name)
            identity = ModelIdentity(**model)
            catalog.claim_model(identity)  # refuses a shard made by another model
            vectors = self._vectors(identity)
            entries, fresh = self._entries(rows, found, known, summary, (identity.num_queries, identity.embed_dim))
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

    def _entries(self, rows: list[dict], found: dict[str, FoundFile], known: dict[str, FileRow],
                 summary: IndexSummary, shape: tuple[int, int]) -> tuple[list[FileEntry], dict[str, np.ndarray]]:
        """A shard's rows -> catalog entries and new vectors; rows of files changed since are dropped
        (they are still to do), and the summary counts what each row is, as a single run would."""
        existing = self.store.catalog.embedding_ids_for(r["content_hash"] for r in rows if r["decoded"])
        entries, fresh = [], {}
        for row in rows:
            now = found.get(row["path"])
            if now is None or (now.size, now.mtime_ns) != (row["size"], row["mtime_ns"]):
                continue
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
        self._merge(summary)  # what an interrupted run left
        captions = self.store.catalog.captions
        key = (self.model_config.name, self.config.options.prompt, self.config.overwrite)
        rows, after = [], 0
        while page := captions.todo(*key, after_id=after, limit=4096):
            after = page[-1].embedding_id
            for task in page:
                if os.path.exists(task.path):
                    rows.append({"embedding_id": task.embedding_id, "path": task.path})
                else:
                    summary.missing.append(task.path)
        if rows:
            model_args = (self.model_config, self.config.options, self.ray.shards_url)
            self._process(rows, DecodeOptions.for_indexed(self.transform), CaptionStage, model_args,
                          self.config.batch_size)
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
                    summary.failed[row["reason"]] += 1
            catalog.captions.write(texts, model["name"], model["prompt"])
            summary.captioned += len(texts)
            self.shards.delete(name)


def check_shards_url(url: str) -> None:
    try:
        Shards(url)
    except (ValueError, ImportError) as exc:
        raise BlipsearchError(f"cannot use {url!r} for shards: {exc}") from None
