"""The SQL catalog: every file seen, every distinct image content with its vectors, the model used.

SQLite by default (WAL, so searches read while an indexer writes), any SQLAlchemy URL otherwise.
Each write method is one transaction: a batch of files and their vectors lands whole or not at all,
which is what makes `kill -9` at any moment safe.
"""

from __future__ import annotations

import heapq
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import and_, delete, exists, func, insert, or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from indexer import schema
from indexer.schema import VECTORS_VERSION, FileRow, chunks
from indexer.caption_catalog import CaptionCatalog, NewCaptions, delete_captions, write_captions
from indexer.database import open_engine
from indexer.listing import FileListing, file_filters
from indexer.walk import MAX_PATH_BYTES, at_or_under
from retrieval.errors import ModelMismatchError
from retrieval.loading import ModelIdentity

@dataclass(frozen=True)
class FileEntry:
    """What a writer records about one file: indexed (with an embedding) or skipped (with an error)."""

    path: str
    size: int
    mtime_ns: int
    content_hash: str | None
    status: str
    error: str | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None


@dataclass(frozen=True)
class BatchWritten:
    created: dict[str, int]  # content hash -> new embedding id
    orphaned: list[int]  # embedding ids deleted because no file points at them any more


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def _at_or_under(root: str):
    """`files.path` is `root` (a file given as a root) or lies under it."""
    return or_(schema.files.c.path == root, _under(root))


def _under(root: str):
    """`files.path` strictly under directory `root`, as an index-friendly range (no LIKE escaping)."""
    prefix = root.rstrip("/") + "/"
    return and_(schema.files.c.path >= prefix, schema.files.c.path < prefix[:-1] + "0")  # "0" follows "/"


WRITE_ATTEMPTS = 5


class Catalog:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.captions = CaptionCatalog(engine)
        self.listing = FileListing(engine)

    @classmethod
    def open(cls, url: str) -> "Catalog":
        """The catalog at `url`, its schema created or migrated (`database.open_engine`)."""
        return cls(open_engine(url))

    def close(self) -> None:
        self.engine.dispose()

    # -- model identity -------------------------------------------------------------------------
    def model(self) -> ModelIdentity | None:
        with self.engine.connect() as conn:
            values = dict(conn.execute(select(schema.meta.c.key, schema.meta.c.value)).all())
        if "model_fingerprint" not in values:
            return None
        return ModelIdentity(
            name=values["model_name"],
            fingerprint=values["model_fingerprint"],
            embed_dim=int(values["embed_dim"]),
            num_queries=int(values["num_queries"]),
        )

    def claim_model(self, identity: ModelIdentity) -> None:
        """Record the model on first use; refuse any other model afterwards."""
        recorded = self.model()
        if recorded is None:
            try:
                with self.engine.begin() as conn:
                    conn.execute(
                        insert(schema.meta),
                        [
                            {"key": "model_name", "value": identity.name},
                            {"key": "model_fingerprint", "value": identity.fingerprint},
                            {"key": "embed_dim", "value": str(identity.embed_dim)},
                            {"key": "num_queries", "value": str(identity.num_queries)},
                        ],
                    )
                return
            except IntegrityError:  # another writer sharing this catalog claimed it first
                recorded = self.model()
        check_same_model(recorded, identity)

    def roots(self) -> list[str]:
        """Every folder or file ever given to `index`: the only places the server serves files from."""
        with self.engine.connect() as conn:
            value = conn.execute(select(schema.meta.c.value).where(schema.meta.c.key == "roots")).scalar()
        return json.loads(value) if value else []

    def add_roots(self, roots: Iterable[str]) -> None:
        """Read, merge and write in one transaction with the row locked, so writers sharing the
        catalog never drop each other's roots; two first inserts collide and the loser retries."""
        m, roots = schema.meta, set(roots)
        for attempt in range(WRITE_ATTEMPTS):
            try:
                with self.engine.begin() as conn:
                    query = select(m.c.value).where(m.c.key == "roots").with_for_update()
                    value = conn.execute(query).scalar()
                    merged = json.dumps(sorted(set(json.loads(value) if value else []) | roots))
                    if value is None:
                        conn.execute(insert(m).values(key="roots", value=merged))
                    elif merged != value:
                        conn.execute(update(m).where(m.c.key == "roots").values(value=merged))
                return
            except IntegrityError:
                if attempt == WRITE_ATTEMPTS - 1:
                    raise

    def remove_roots(self, paths: Iterable[str]) -> list[str]:
        """Forget the roots that are one of `paths` or lie under one; returns them. Locked like
        `add_roots`."""
        m, paths = schema.meta, list(paths)
        with self.engine.begin() as conn:
            value = conn.execute(select(m.c.value).where(m.c.key == "roots").with_for_update()).scalar()
            roots = json.loads(value) if value else []
            gone = [r for r in roots if any(at_or_under(r, p) for p in paths)]
            if gone:
                kept = json.dumps(sorted(set(roots) - set(gone)))
                conn.execute(update(m).where(m.c.key == "roots").values(value=kept))
        return gone

    @property
    def max_path_bytes(self) -> int | None:
        """The longest path this catalog can hold (`walk.MAX_PATH_BYTES`); None: no limit (SQLite)."""
        return MAX_PATH_BYTES if self.engine.dialect.name == "postgresql" else None

    # -- reads ------------------------------------------------------------------------------------
    def file(self, file_id: int) -> FileRow | None:
        largest = MAX_ROW_ID if self.engine.dialect.name == "postgresql" else 2**63 - 1
        if not 0 <= file_id <= largest:  # a database refuses to compare its integer column with it
            return None
        with self.engine.connect() as conn:
            row = conn.execute(select(schema.files).where(schema.files.c.id == int(file_id))).first()
        return FileRow(**row._mapping) if row else None

    def has_under(self, root: str) -> bool:
        """Whether any file is at or under `root`."""
        f = schema.files
        with self.engine.connect() as conn:
            return conn.execute(select(f.c.id).where(_at_or_under(root)).limit(1)).first() is not None

    def iter_under(self, roots: Iterable[str], page: int = 5000) -> Iterator[FileRow]:
        """The files at or under `roots`, each once, in path order (byte order, as `walk_sorted` yields
        paths). Read a page at a time by key, each page its own short read: no transaction stays open
        through a long run (SQLite's WAL could not be checkpointed), and the run's own writes go on
        between pages. A path written meanwhile sorts before the key the next page starts after
        (`compare.Comparison` writes only paths the catalog's stream has passed), so none comes twice."""
        outermost = [root for root in sorted(set(roots))
                     if not any(root != other and at_or_under(root, other) for other in roots)]
        return heapq.merge(*(self._pages(root, page) for root in outermost), key=lambda row: row.path)

    def _pages(self, root: str, page: int) -> Iterator[FileRow]:
        f = schema.files
        with self.engine.connect() as conn:  # a file given as a root: its row sorts before any 'root/...'
            own = [FileRow(**r._mapping) for r in conn.execute(select(f).where(f.c.path == root))]
        yield from own
        # One range with one lower bound, so that the index on path finds the page's first row and
        # orders the page: given both 'path >= root/' and 'path > key', SQLite seeks to the first and
        # reads past every row before the key, and with the root's own row in an OR it gathered and
        # sorted every row after the key; either is quadratic in the folder's size. PostgreSQL did
        # the latter too where it had no statistics yet (a catalog just filled): with sorting ruled
        # out for the page, only the walk of the index remains.
        prefix = root.rstrip("/") + "/"
        after = None
        while True:
            lower = f.c.path >= prefix if after is None else f.c.path > after
            query = select(f).where(lower, f.c.path < prefix[:-1] + "0").order_by(f.c.path).limit(page)
            with self.engine.connect() as conn:
                if conn.dialect.name == "postgresql":
                    conn.exec_driver_sql("SET LOCAL enable_sort = off")  # until this read's end
                rows = [FileRow(**r._mapping) for r in conn.execute(query)]
            yield from rows
            if len(rows) < page:
                return
            after = rows[-1].path

    def files(self, embedding_ids: Sequence[int] | None = None) -> list[FileRow]:
        """Every file, or only those pointing at `embedding_ids`; ordered by path."""
        query = select(schema.files).order_by(schema.files.c.path)
        if embedding_ids is None:
            with self.engine.connect() as conn:
                return [FileRow(**r._mapping) for r in conn.execute(query)]
        out: list[FileRow] = []
        with self.engine.connect() as conn:
            for chunk in chunks([int(k) for k in embedding_ids]):
                out.extend(FileRow(**r._mapping) for r in conn.execute(query.where(schema.files.c.embedding_id.in_(chunk))))
        return out

    def iter_files(self, batch: int = 5000, status: str | None = None,
                   path_glob: str | None = None) -> Iterator[list[FileRow]]:
        """Every file in batches, or those of one status or matching a `--path` glob, ordered by path,
        streamed from the database (a server-side cursor on PostgreSQL): an export of a hundred
        million rows must not hold them all."""
        query = select(schema.files).where(*file_filters(self.engine, status, path_glob=path_glob))\
            .order_by(schema.files.c.path)
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=batch).execute(query)
            for part in result.partitions():
                yield [FileRow(**r._mapping) for r in part]

    def embedding_ids_for(self, hashes: Iterable[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        e = schema.embeddings
        with self.engine.connect() as conn:
            for chunk in chunks(list(set(hashes))):
                found.update(conn.execute(select(e.c.content_hash, e.c.id).where(e.c.content_hash.in_(chunk))).all())
        return found

    def content_hashes(self) -> np.ndarray:
        """Every content hash as its `hash_key`, sorted, in one numpy array (`has_hash` finds one):
        16 bytes each (a 100,000,000-image catalog's in 1.6 GB), streamed from the database."""
        query = select(schema.embeddings.c.content_hash)
        parts = [np.zeros(0, HASH_KEY)]
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=100_000).execute(query)
            for part in result.scalars().partitions():
                parts.append(np.array([hash_key(digest) for digest in part], dtype=HASH_KEY))
        hashes = np.concatenate(parts)
        hashes.sort()
        return hashes

    def files_at(self, paths: Sequence[str]) -> dict[str, FileRow]:
        """The catalog's rows for these paths, where it has them."""
        rows: dict[str, FileRow] = {}
        with self.engine.connect() as conn:
            for chunk in chunks(list(paths)):
                for row in conn.execute(select(schema.files).where(schema.files.c.path.in_(chunk))):
                    rows[row.path] = FileRow(**row._mapping)
        return rows

    def vectors_version(self) -> str | None:
        """A token that every transaction adding or deleting embeddings replaces: a FAISS file
        reconciled with the catalog when it read this token holds the catalog's vectors while the
        catalog still has it (`IndexStore.save_vectors`), without reading every id to find out.
        None where the row is gone (removed by hand): every open then reconciles, as before 0005."""
        with self.engine.connect() as conn:
            return conn.execute(select(schema.meta.c.value).where(schema.meta.c.key == VECTORS_VERSION)).scalar()

    def embedding_ids(self) -> np.ndarray:
        """Every embedding id, sorted: streamed into the array (8 bytes each), not listed as Python ints
        (about 36 each), since every index run reads them all (`store.reconcile`)."""
        query = select(schema.embeddings.c.id).order_by(schema.embeddings.c.id)
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=50_000).execute(query)
            return np.fromiter(result.scalars(), dtype=np.int64)

    def vectors(self, ids: Sequence[int], num_queries: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids found, vectors (n, Q, D) float32) for the given embedding ids."""
        e = schema.embeddings
        got_ids, arrays = [], []
        with self.engine.connect() as conn:
            for chunk in chunks([int(i) for i in ids]):
                for eid, blob in conn.execute(select(e.c.id, e.c.vectors).where(e.c.id.in_(chunk))):
                    got_ids.append(eid)
                    arrays.append(np.frombuffer(blob, dtype=np.float32).reshape(num_queries, dim))
        if not arrays:
            return np.zeros(0, np.int64), np.zeros((0, num_queries, dim), np.float32)
        return np.asarray(got_ids, dtype=np.int64), np.stack(arrays)

    def counts(self) -> dict[str, int]:
        f = schema.files
        with self.engine.connect() as conn:
            by_status = dict(conn.execute(select(f.c.status, func.count()).group_by(f.c.status)).all())
            n_embeddings = conn.execute(select(func.count()).select_from(schema.embeddings)).scalar_one()
        return {"files": sum(by_status.values()), **by_status, "distinct_images": n_embeddings,
                "captioned_images": self.captions.count()}

    # -- writes -----------------------------------------------------------------------------------
    def write_batch(self, entries: Sequence[FileEntry], new_vectors: dict[str, np.ndarray],
                    captions: NewCaptions | None = None) -> BatchWritten:
        """In one transaction: add embeddings for `new_vectors` (hash -> (Q, D)), then upsert `entries`.

        An indexed entry points at the embedding of its content hash, new or already present.
        Embeddings left without any file by the upsert (a file whose content changed) are deleted in
        the same transaction. `captions` of new contents (`index --caption`) land in it too.
        """
        for attempt in range(WRITE_ATTEMPTS):
            try:
                return self._write_batch(entries, new_vectors, captions)
            except (IntegrityError, OperationalError) as exc:
                # Another writer sharing this catalog stored the same content or path first, or the
                # server broke a deadlock between us: the retry sees its rows and reuses them.
                if attempt == WRITE_ATTEMPTS - 1 or (isinstance(exc, OperationalError) and not _transient(exc)):
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def _write_batch(self, entries, new_vectors, captions) -> BatchWritten:
        e, f = schema.embeddings, schema.files
        now = time.time()
        created: dict[str, int] = {}
        with self.engine.begin() as conn:
            present = set()
            for chunk in chunks(sorted(new_vectors)):  # stored by another writer since the caller looked
                present.update(conn.execute(select(e.c.content_hash).where(e.c.content_hash.in_(chunk))).scalars())
            for content_hash, vectors in new_vectors.items():
                if content_hash in present:
                    continue
                blob = np.ascontiguousarray(vectors, dtype=np.float32).tobytes()
                result = conn.execute(insert(e).values(content_hash=content_hash, vectors=blob, created_at=now))
                created[content_hash] = int(result.inserted_primary_key[0])
            wanted = {x.content_hash for x in entries if x.status == schema.INDEXED} - set(created)
            known = dict(created)
            for chunk in chunks(sorted(wanted)):
                known.update(conn.execute(select(e.c.content_hash, e.c.id).where(e.c.content_hash.in_(chunk))).all())
            paths = [x.path for x in entries]
            previous = self._embedding_ids_of(conn, f.c.path, paths)
            for chunk in chunks(paths):
                conn.execute(delete(f).where(f.c.path.in_(chunk)))
            rows = [
                {**x.__dict__, "embedding_id": known[x.content_hash] if x.status == schema.INDEXED else None,
                 "updated_at": now}
                for x in entries
            ]
            if rows:
                conn.execute(insert(f), rows)
            orphaned = self._delete_orphans(conn, previous)
            if captions is not None:
                by_id = {created[h]: text for h, text in captions.texts.items() if h in created}
                write_captions(conn, by_id, captions.model, captions.prompt, now)
            if created or orphaned:
                _new_vectors_version(conn)
        return BatchWritten(created, orphaned)

    def remove_under(self, roots: Sequence[str]) -> tuple[int, list[int]]:
        """Forget the files at or under `roots` in one transaction, by range, listing none of them;
        returns (how many, the embedding ids this left without any file, deleted too)."""
        f = schema.files
        where = or_(*(_at_or_under(root) for root in roots))
        with self.engine.begin() as conn:
            previous = set(conn.execute(
                select(f.c.embedding_id).where(where, f.c.embedding_id.is_not(None)).distinct()).scalars())
            removed = conn.execute(delete(f).where(where)).rowcount
            orphaned = self._delete_orphans(conn, previous)
            if orphaned:
                _new_vectors_version(conn)
            return removed, orphaned

    def remove_files(self, file_ids: Sequence[int]) -> list[int]:
        """Forget files by id; returns the embedding ids this left without any file (deleted too)."""
        f = schema.files
        ids = [int(i) for i in file_ids]
        with self.engine.begin() as conn:
            previous = self._embedding_ids_of(conn, f.c.id, ids)
            for chunk in chunks(ids):
                conn.execute(delete(f).where(f.c.id.in_(chunk)))
            orphaned = self._delete_orphans(conn, previous)
            if orphaned:
                _new_vectors_version(conn)
            return orphaned

    @staticmethod
    def _embedding_ids_of(conn, column, values: Sequence) -> set[int]:
        """The embedding ids of the files whose `column` (path or id) is among `values`."""
        f = schema.files
        ids: set[int] = set()
        for chunk in chunks(list(values)):
            query = select(f.c.embedding_id).where(column.in_(chunk), f.c.embedding_id.is_not(None))
            ids.update(conn.execute(query).scalars())
        return ids

    @staticmethod
    def _delete_orphans(conn, candidates: set[int]) -> list[int]:
        e, f = schema.embeddings, schema.files
        orphans: list[int] = []
        for chunk in chunks(sorted(candidates)):
            unused = ~exists().where(f.c.embedding_id == e.c.id)
            orphans.extend(conn.execute(select(e.c.id).where(e.c.id.in_(chunk), unused)).scalars())
        delete_captions(conn, orphans)
        for chunk in chunks(orphans):
            conn.execute(delete(e).where(e.c.id.in_(chunk)))
        return orphans


def _new_vectors_version(conn) -> None:
    """Last in its transaction: on PostgreSQL the row stays locked until the commit, so concurrent
    writers queue here, at the end, holding nothing the holder waits for."""
    meta = schema.meta
    conn.execute(update(meta).where(meta.c.key == VECTORS_VERSION).values(value=uuid.uuid4().hex))


HASH_KEY = "S16"  # numpy bytes: sorted and searched by value; a trailing NUL is padding, alike on both sides


def hash_key(digest: str) -> bytes:
    """A content hash's first 128 bits, as bytes: two contents share one with odds of 1 in 10^22 in a
    hundred million (the birthday bound), where the 64 hexadecimal characters took four times the memory."""
    return bytes.fromhex(digest[:32])


def has_hash(sorted_keys: np.ndarray, digest: str) -> bool:
    """Whether `digest` is among `sorted_keys` (`Catalog.content_hashes`)."""
    key = np.array([hash_key(digest)], dtype=HASH_KEY)
    at = int(np.searchsorted(sorted_keys, key)[0])
    return at < len(sorted_keys) and sorted_keys[at] == key[0]


def _transient(exc: OperationalError) -> bool:
    """A deadlock or serialization failure (PostgreSQL), or a locked database (SQLite): worth a retry."""
    code = getattr(exc.orig, "sqlstate", None)
    return code in ("40P01", "40001") or "database is locked" in str(exc.orig)


MAX_ROW_ID = 2**31 - 1  # ids are SQL INTEGER columns: 32 bits on PostgreSQL (64 on SQLite)


def check_same_model(recorded: ModelIdentity, identity: ModelIdentity) -> None:
    if (recorded.fingerprint, recorded.embed_dim, recorded.num_queries) != (
        identity.fingerprint, identity.embed_dim, identity.num_queries,
    ):
        if recorded.name == identity.name:  # "built with model M, not M" said nothing
            raise ModelMismatchError(
                f"the model {identity.name!r} is not the one this index was built with: its weights changed "
                f"(fingerprint {recorded.fingerprint}, now {identity.fingerprint}; another download or "
                "revision?); restore that model, or index into another --index")
        raise ModelMismatchError(
            f"this index was built with model {recorded.name!r} (fingerprint {recorded.fingerprint}), "
            f"not {identity.name!r} (fingerprint {identity.fingerprint}); pass --model {recorded.name} "
            "or use another --index"
        )
