"""An index directory: the catalog, the FAISS file derived from it, its settings, the writers' lock.

The catalog is the source of truth. The FAISS file may lag behind it after a crash (it is saved
periodically and at the end of a run) or behind writers sharing the catalog, so an open reconciles
the two: vectors of images the catalog no longer has are dropped, images it has but the file lacks
are added from the catalog. An open skips that when the file was saved in step with the catalog's
vectors version as it still is (`vectors.json`, `save_vectors`), a writer with nothing to change
leaves the file alone (`left_as_it_is`), and one that changes a large file saves the change beside
it (`retrieval.segments`). The FAISS file is rebuilt from the catalog when its kind changes, when a
kind that needs training has enough vectors to train on, and when the collection outgrows what it
was trained for.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

import numpy as np

from indexer.catalog import Catalog, sqlite_url
from indexer.errors import IndexBusyError, IndexNotFoundError, IndexNotWritableError, IndexSettingsError
from indexer.walk import WalkOptions
from retrieval.errors import UsageError
from retrieval.index import replace_atomically
from retrieval.index_types import IndexSpec, auto_candidates, choose_spec
from retrieval.loading import ModelIdentity
from retrieval.segments import DeltaPolicy, delta_path, file_stamp

CATALOG_FILE = "catalog.sqlite"
VECTORS_FILE = "vectors.faiss"
LOCK_FILE = "index.lock"
SETTINGS_FILE = "index.json"
WALK_FILE = "walk.json"  # the --exclude and --follow-symlinks `index` was last given, kept for later runs
SYNCED_FILE = "vectors.json"  # the catalog's vectors version the FAISS file was reconciled with
HEADROOM = 1.25  # `auto` picks a type that still fits when the collection has grown by a quarter
ENV_INDEX = "BLIPSEARCH_INDEX"


def default_index_dir() -> Path:
    from platformdirs import user_data_dir

    return Path(os.environ.get(ENV_INDEX) or Path(user_data_dir("blipsearch")) / "index")


@dataclass(frozen=True)
class StoreConfig:
    directory: Path
    catalog_url: str | None = None  # None: SQLite inside `directory`
    mmap_min_bytes: int = 256 << 20  # read-only opens map FAISS files at least this large
    delta: DeltaPolicy = DeltaPolicy()  # when a writer saves its changes beside the file (`SegmentedIndex`)


@dataclass(frozen=True)
class IndexSettings:
    """How the FAISS file is built: a fixed `IndexSpec` text, or `auto` within `max_memory` bytes; and
    how many MB of ViT features re-ranking keeps (`features/`), for runs, searches and servers alike."""

    index_type: str = "flat-fp16"
    max_memory: int | None = None
    feature_cache_mb: int = 0

    def validate(self) -> None:
        if self.index_type == "auto" and self.max_memory is None:
            raise UsageError("--index-type auto needs --max-index-memory")
        if self.index_type != "auto":
            IndexSpec.parse(self.index_type)

    def spec_for(self, images: int, num_queries: int, dim: int, strict: bool = True) -> IndexSpec:
        """The type for `images` images; over budget, a UsageError, or (not `strict`: searching,
        which must keep working) the smallest type that auto would take."""
        planned = int(images * HEADROOM) + 1
        if self.index_type == "auto":
            try:
                return choose_spec(self.max_memory, planned, num_queries, dim)
            except UsageError:
                if strict:
                    raise
                return auto_candidates(dim)[-1]
        spec = IndexSpec.parse(self.index_type)
        spec.validate(dim)
        needed = spec.bytes_per_vector(dim) * num_queries * images
        if strict and self.max_memory is not None and needed > self.max_memory:
            raise UsageError(
                f"{images} images in a {spec} index need {needed / 2**20:.0f} MiB, over --max-index-memory "
                f"{self.max_memory / 2**20:.0f} MiB; choose a smaller type or --index-type auto"
            )
        return spec


class IndexStore:
    def __init__(self, config: StoreConfig, catalog: Catalog) -> None:
        self.config = config
        self.directory = config.directory
        self.catalog = catalog

    @classmethod
    def open(cls, config: StoreConfig, create: bool = False) -> "IndexStore":
        directory = config.directory
        if create:
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a file in the way, a read-only or missing mount, no permission
                raise IndexNotFoundError(f"cannot create the index directory {directory}: {exc.strerror or exc}") \
                    from None
        elif not (directory / CATALOG_FILE).exists() and config.catalog_url is None:
            raise IndexNotFoundError(f"no index at {directory}; build one with: blipsearch index FOLDER --index {directory}")
        return cls(config, Catalog.open(config.catalog_url or sqlite_url(directory / CATALOG_FILE)))

    def close(self) -> None:
        self.catalog.close()

    @property
    def vectors_path(self) -> Path:
        return self.directory / VECTORS_FILE

    def vectors_stamp(self) -> list:
        """What changes whenever a writer saves the vectors: the FAISS file's stamp and its delta's."""
        return [file_stamp(self.vectors_path), file_stamp(delta_path(self.vectors_path))]

    def _mapped(self, read_only: bool) -> bool:
        """Whether to map the FAISS file: searches map large files; writers map those they will
        change through a delta, and read them only where they write them whole."""
        path = self.vectors_path
        least = self.config.mmap_min_bytes if read_only else self.config.delta.whole_below_bytes
        return path.exists() and path.stat().st_size >= least

    @contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Held by `index`/`caption` runs; a second writer gets IndexBusyError at once, never waits."""
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.directory / LOCK_FILE))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise IndexBusyError(
                f"index {self.directory} is busy: another blipsearch run is writing to it; wait for it to finish"
            ) from None
        except OSError as exc:  # a read-only mount, no permission: searching works, writing cannot
            raise IndexNotWritableError(f"cannot write to the index at {self.directory} "
                                        f"({exc.strerror or exc}); it can be searched, not changed") from None
        try:
            self._clear_partial_saves()
            yield
        finally:
            lock.release()

    def _clear_partial_saves(self) -> None:
        """Remove what saves killed mid-way left: `NAME.tmpPID` beside the FAISS file (as large as the
        file), its delta and the settings files. Only under the writer lock, when nothing writes them."""
        names = {VECTORS_FILE, delta_path(self.vectors_path).name, SETTINGS_FILE, WALK_FILE, SYNCED_FILE}
        with suppress(OSError), os.scandir(self.directory) as entries:
            for entry in entries:
                stem, tmp, pid = entry.name.rpartition(".tmp")
                if tmp and stem in names and pid.isdigit():
                    with suppress(OSError):
                        os.unlink(entry.path)

    # -- settings ---------------------------------------------------------------------------------
    def settings(self) -> IndexSettings:
        saved = self._read_json(SETTINGS_FILE, "set the index type again with blipsearch index --index-type TYPE "
                                               "after deleting it")
        known = {f.name for f in fields(IndexSettings)}  # keys a newer blipsearch may add are left alone
        settings = IndexSettings(**{key: value for key, value in (saved or {}).items() if key in known})
        cache_mb = settings.feature_cache_mb
        if isinstance(cache_mb, bool) or not isinstance(cache_mb, int) or cache_mb < 0:
            raise IndexSettingsError(f"{self.directory / SETTINGS_FILE} cannot be read (feature_cache_mb: "
                                     f"{cache_mb!r}); delete it, then give blipsearch index --feature-cache-mb MB "
                                     f"(and --index-type) again")
        return settings

    def save_settings(self, settings: IndexSettings) -> None:
        settings.validate()
        self._write_json(SETTINGS_FILE, asdict(settings))

    def kept_walk(self) -> WalkOptions:
        """The --exclude and --follow-symlinks kept from earlier runs (`choose_walk`)."""
        advice = "delete it and give --exclude and --follow-symlinks again"
        saved = self._read_json(WALK_FILE, advice)
        if saved is None:
            return WalkOptions()
        try:
            return WalkOptions(tuple(str(glob) for glob in saved["excludes"]), bool(saved["follow_symlinks"]))
        except (KeyError, TypeError) as exc:
            raise IndexSettingsError(f"{self.directory / WALK_FILE} cannot be read ({exc!r}); {advice}") from None

    def _read_json(self, name: str, advice: str) -> dict | None:
        """A settings file of the index directory as a dict; None where there is none."""
        path = self.directory / name
        if not path.exists():
            return None
        try:
            saved = json.loads(path.read_text())
            if not isinstance(saved, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError too
            raise IndexSettingsError(f"{path} cannot be read ({exc}); {advice}") from None
        return saved

    def _write_json(self, name: str, payload: dict) -> None:
        replace_atomically(self.directory / name, lambda tmp: tmp.write_text(json.dumps(payload)))

    def choose_walk(self, excludes: tuple[str, ...] = (), clear_excludes: bool = False,
                    follow_symlinks: bool | None = None) -> WalkOptions:
        """The walk options for a run: those given, else those an earlier run was given, as `index`
        without folders re-indexes as before. Given ones are kept for later runs. Call it holding the
        writer lock."""
        kept = self.kept_walk()
        chosen = WalkOptions(() if clear_excludes else (excludes or kept.excludes),
                             kept.follow_symlinks if follow_symlinks is None else follow_symlinks)
        if chosen != kept:
            self._write_json(WALK_FILE, {"excludes": list(chosen.excludes), "follow_symlinks": chosen.follow_symlinks})
        return chosen

    # -- vectors ----------------------------------------------------------------------------------
    def load_vectors(self, identity: ModelIdentity, read_only: bool = False):
        """The FAISS index (a `SegmentedIndex`: the file and its delta), reconciled in memory with the
        catalog and rebuilt if due. A large file is mapped instead of read (`_mapped`), and changes
        leave it as it is. An open of a catalog unchanged since the file was saved reads no ids
        (`_load_synced`)."""
        from retrieval.segments import SegmentedIndex

        if (index := self._load_synced(identity, strict=not read_only, mmap=self._mapped(read_only))) is not None:
            if not read_only:  # a writer trains when due, as below
                self.refresh(index)
            return index
        ids = self.catalog.embedding_ids()
        spec = self.settings().spec_for(len(ids), identity.num_queries, identity.embed_dim, strict=not read_only)
        index = SegmentedIndex.load(self.vectors_path, identity.embed_dim, identity.num_queries, spec,
                                    mmap=self._mapped(read_only))
        if index.ntotal == 0 and len(ids):  # new, lost, or of another kind: build it straight away
            self._rebuild(index, spec, ids)
        else:
            reconcile(index, self.catalog, identity, ids)
        if not read_only:  # searching leaves training to writers (a staged index is exact meanwhile)
            self.refresh(index, ids)
        return index

    def refresh(self, index, ids: np.ndarray | None = None) -> str | None:
        """Rebuild `index` from the catalog if its kind changed or training is due; returns why.
        `ids`: the catalog's embedding ids, when the caller has just read them; else the images
        `index` holds stand for the collection's size (it is the catalog's, reconciled or in step,
        with what this writer has added since), and the ids are read only for a rebuild."""
        images = len(ids) if ids is not None else index.ntotal // index.num_queries
        spec = self.settings().spec_for(images, index.num_queries, index.dim)
        reason = index.needs_rebuild(spec)
        if reason is not None:
            self._rebuild(index, spec, self.catalog.embedding_ids() if ids is None else ids)
        return reason

    def _rebuild(self, index, spec: IndexSpec, ids: np.ndarray, chunk: int = 2048) -> None:
        nq, dim = index.num_queries, index.dim
        rng = np.random.default_rng(0)
        wanted = -(-index.train_size(spec, len(ids) * nq) // nq)
        sample_ids = np.sort(rng.choice(ids, min(len(ids), wanted), replace=False)) if wanted else ids[:0]
        sample = self.catalog.vectors(sample_ids, nq, dim)[1].reshape(-1, dim)

        def chunks():
            for start in range(0, len(ids), chunk):
                yield self.catalog.vectors(ids[start : start + chunk], nq, dim)

        index.rebuild(chunks, len(ids) * nq, sample, spec)

    def exact_vectors(self, identity: ModelIdentity):
        """A `VectorSource` for `MaxSimIndex.search`: the fp32 vectors, read from the catalog."""
        return lambda keys: self.catalog.vectors(keys, identity.num_queries, identity.embed_dim)

    def save_vectors(self, index, synced: str | None = None) -> bool:
        """Refresh (a long run trains or retrains here, at its periodic saves), then save atomically.
        `synced`: the catalog's `vectors_version` read before `index` was last reconciled with it
        (`reconcile_and_save`). A later change replaces that version, so while the catalog has it the
        file holds its vectors; a change between the reading and this save makes the version old, so
        it only costs the next search a full reconcile. Returns whether the whole file was written (else
        its delta alone: `SegmentedIndex.save`)."""
        with suppress(FileNotFoundError):
            os.unlink(self.directory / SYNCED_FILE)  # first: never a record that names another file
        self.refresh(index)
        whole = index.save(self.vectors_path, self.config.delta)
        if synced is not None:
            self._write_json(SYNCED_FILE, {"catalog_vectors_version": synced, "images": index.ntotal // index.num_queries,
                                           "files": self.vectors_stamp()})
        return whole

    def reconcile_and_save(self, index, identity: ModelIdentity) -> bool:
        """What a writer does last: make `index` the catalog's, and save it as such; returns whether the
        whole file was written."""
        version = self.catalog.vectors_version()  # before the ids that reconciling reads
        reconcile(index, self.catalog, identity)
        return self.save_vectors(index, synced=version)

    def _load_synced(self, identity: ModelIdentity, strict: bool, mmap: bool):
        """The saved FAISS index, if it was saved reconciled with the catalog's current vectors version
        (and not replaced since); None where that is not known, and the caller reconciles. `strict`:
        as a writer's `spec_for`."""
        from retrieval.segments import SegmentedIndex

        images = self._synced_images()
        if images is None:
            return None
        spec = self.settings().spec_for(images, identity.num_queries, identity.embed_dim, strict=strict)
        index = SegmentedIndex.load(self.vectors_path, identity.embed_dim, identity.num_queries, spec, mmap=mmap)
        return index if index.ntotal == images * identity.num_queries else None

    def in_step(self) -> bool:
        """Whether the FAISS file was saved in step with the catalog as it is (`save_vectors`)."""
        return self._synced_images() is not None

    def left_as_it_is(self, identity: ModelIdentity) -> bool:
        """Whether a writer with nothing to add or remove may leave the FAISS file alone: it is in
        step with the catalog, of the kind the settings ask for, and not due for training (as
        `refresh` decides; a budget outgrown is refused here as by `load_vectors`), and not saved in
        an older format that costs every search's open more (`saved_with_reverse_map`)."""
        from retrieval.faiss_index import saved_with_reverse_map

        if saved_with_reverse_map(self.vectors_path):  # first: loading one builds the map it is rewritten for
            return False
        index = self._load_synced(identity, strict=True, mmap=True)  # mapped: read only to be looked at
        return index is not None and index.needs_rebuild() is None

    def _synced_images(self) -> int | None:
        """How many images the FAISS file holds, if it was saved in step with the catalog's current
        vectors version and not replaced since (`save_vectors`); None where that is not known."""
        try:
            synced = json.loads((self.directory / SYNCED_FILE).read_text())
            version = self.catalog.vectors_version()
            stamp = self.vectors_stamp()
            if "files" in synced:
                files_unchanged = synced["files"] == stamp
            else:  # saved by blipsearch before deltas: the file's size and mtime, and there is no delta
                files_unchanged = stamp[1] is None and stamp[0] is not None and synced["file"] == stamp[0][1:]
            in_step = version is not None and synced["catalog_vectors_version"] == version and files_unchanged
            return int(synced["images"]) if in_step else None
        except (OSError, ValueError, TypeError, KeyError):  # none, or unreadable: it only saves work
            return None

    def disk_bytes(self) -> int:
        """What the index directory holds: one stat per file (thumbnails too, one per image viewed). A
        file or folder removed meanwhile (a thumbnail's temporary file renamed, a shard merged) counts 0."""
        def under(folder: str) -> int:
            total = 0
            with suppress(FileNotFoundError), os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        total += under(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        with suppress(FileNotFoundError):
                            total += entry.stat(follow_symlinks=False).st_size
            return total

        return under(str(self.directory))

    def vectors_summary(self) -> dict:
        """The index settings and what the FAISS file holds (read memory-mapped: cheap at any size), with
        the changes saved beside it since (`SegmentedIndex`), and whether it was saved in step with the
        catalog as it is (else searches reconcile it at open)."""
        from retrieval.faiss_index import kind_of, read_index
        from retrieval.segments import saved_delta

        settings = self.settings()
        summary = {"index_type": settings.index_type, "max_index_memory": settings.max_memory,
                   "feature_cache_mb": settings.feature_cache_mb, "index_kind": None, "index_vectors": 0,
                   "index_delta_vectors": 0, "index_skipped_images": 0, "index_bytes": 0, "index_in_step": False}
        if self.vectors_path.exists():
            summary["index_bytes"] = sum(stamp[1] for stamp in self.vectors_stamp() if stamp is not None)
            index = read_index(self.vectors_path, mmap=True)
            if index is None:  # searches rebuild it in memory from the catalog; the next index run saves it
                summary["index_kind"] = "unreadable (rebuilt from the catalog)"
            else:
                delta_vectors, skipped = saved_delta(self.vectors_path)
                summary.update(index_kind=kind_of(index), index_vectors=int(index.ntotal),
                               index_delta_vectors=delta_vectors, index_skipped_images=skipped,
                               index_in_step=self.in_step())
        return summary


def reconcile(index, catalog: Catalog, identity: ModelIdentity, in_catalog: np.ndarray | None = None,
              chunk: int = 2048) -> tuple[int, int]:
    """Make `index` hold exactly the catalog's embeddings (`in_catalog`: their ids, if just read);
    returns (added, removed)."""
    in_index = index.keys()
    in_catalog = catalog.embedding_ids() if in_catalog is None else in_catalog
    extra = np.setdiff1d(in_index, in_catalog, assume_unique=True)
    missing = np.setdiff1d(in_catalog, in_index, assume_unique=True)
    index.remove(extra)
    for start in range(0, len(missing), chunk):
        ids, vectors = catalog.vectors(missing[start : start + chunk], identity.num_queries, identity.embed_dim)
        index.add(ids, vectors)
    return len(missing), len(extra)
