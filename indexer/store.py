"""An index directory: the catalog, the FAISS file derived from it, and the writers' lock.

The catalog is the source of truth. The FAISS file may lag behind it after a crash (it is saved
periodically and at the end of a run), so every open reconciles the two: vectors of images the
catalog no longer has are dropped, images it has but the file lacks are added from the catalog.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from indexer.catalog import Catalog, sqlite_url
from indexer.errors import IndexBusyError, IndexNotFoundError
from retrieval.loading import ModelIdentity

CATALOG_FILE = "catalog.sqlite"
VECTORS_FILE = "vectors.faiss"
LOCK_FILE = "index.lock"
ENV_INDEX = "BLIPSEARCH_INDEX"


def default_index_dir() -> Path:
    from platformdirs import user_data_dir

    return Path(os.environ.get(ENV_INDEX) or Path(user_data_dir("blipsearch")) / "index")


@dataclass(frozen=True)
class StoreConfig:
    directory: Path
    catalog_url: str | None = None  # None: SQLite inside `directory`


class IndexStore:
    def __init__(self, config: StoreConfig, catalog: Catalog) -> None:
        self.config = config
        self.directory = config.directory
        self.catalog = catalog

    @classmethod
    def open(cls, config: StoreConfig, create: bool = False) -> "IndexStore":
        directory = config.directory
        if create:
            directory.mkdir(parents=True, exist_ok=True)
        elif not (directory / CATALOG_FILE).exists() and config.catalog_url is None:
            raise IndexNotFoundError(f"no index at {directory}; build one with: blipsearch index FOLDER --index {directory}")
        return cls(config, Catalog.open(config.catalog_url or sqlite_url(directory / CATALOG_FILE)))

    def close(self) -> None:
        self.catalog.close()

    @property
    def vectors_path(self) -> Path:
        return self.directory / VECTORS_FILE

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
        try:
            yield
        finally:
            lock.release()

    def load_vectors(self, identity: ModelIdentity):
        """The FAISS index, reconciled in memory with the catalog."""
        from retrieval.index import MaxSimIndex

        index = MaxSimIndex.load(self.vectors_path, identity.embed_dim, identity.num_queries)
        reconcile(index, self.catalog, identity)
        return index

    def exact_vectors(self, identity: ModelIdentity):
        """A `VectorSource` for `MaxSimIndex.search`: the fp32 vectors, read from the catalog."""
        return lambda keys: self.catalog.vectors(keys, identity.num_queries, identity.embed_dim)

    def save_vectors(self, index) -> None:
        index.save(self.vectors_path)

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file())


def reconcile(index, catalog: Catalog, identity: ModelIdentity, chunk: int = 2048) -> tuple[int, int]:
    """Make `index` hold exactly the catalog's embeddings; returns (added, removed)."""
    in_index = index.keys()
    in_catalog = catalog.embedding_ids()
    extra = np.setdiff1d(in_index, in_catalog, assume_unique=True)
    missing = np.setdiff1d(in_catalog, in_index, assume_unique=True)
    index.remove(extra)
    for start in range(0, len(missing), chunk):
        ids, vectors = catalog.vectors(missing[start : start + chunk], identity.num_queries, identity.embed_dim)
        index.add(ids, vectors)
    return len(missing), len(extra)
