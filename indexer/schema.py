"""Catalog tables (SQLAlchemy Core). Migrations in `migrations/versions` create and evolve them.

`embeddings` holds one row per distinct image content (keyed by content hash) with its 32 query
vectors: the catalog is the source of truth, and the FAISS file is derived from it and reconciled
with it on open unless saved in step with `meta`'s vectors version (0005). `files` holds one row per
file seen, indexed or skipped with a reason; renamed and duplicate files point at the same embedding
row. `captions` holds one caption per embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import (
    BigInteger, Column, Float, ForeignKey, Index, Integer, LargeBinary, MetaData, String, Table, Text, text,
)

metadata = MetaData()

meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)
VECTORS_VERSION = "vectors_version"  # meta's token for the embeddings as they are (0005)

embeddings = Table(
    "embeddings",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("content_hash", String(64), nullable=False, unique=True),
    Column("vectors", LargeBinary, nullable=False),  # float32, (num_queries, embed_dim), C order
    Column("created_at", Float, nullable=False),
)

files = Table(
    "files",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("path", Text, nullable=False, unique=True),
    Column("size", BigInteger, nullable=False),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("content_hash", String(64), index=True),
    Column("status", String(16), nullable=False),  # indexed | skipped
    Column("error", Text),  # "reason: detail" for every file not indexed
    Column("width", Integer),
    Column("height", Integer),
    Column("format", String(16)),
    Column("embedding_id", Integer, ForeignKey("embeddings.id"), index=True),
    Column("updated_at", Float, nullable=False),
)
# The skipped files' paths alone (0004): a page of them reads only them. (On PostgreSQL, 0006 also
# indexes the paths' trigrams where pg_trgm can be created: a migration's alone, as it may not be.)
Index("ix_files_skipped_path", files.c.path, sqlite_where=text("status = 'skipped'"),
      postgresql_where=text("status = 'skipped'"))

captions = Table(
    "captions",
    metadata,
    Column("embedding_id", Integer, ForeignKey("embeddings.id"), primary_key=True),
    Column("caption", Text, nullable=False),
    Column("model", Text, nullable=False),  # the captioning model's name
    Column("prompt", Text, nullable=False),  # "" for unprompted captions
    Column("created_at", Float, nullable=False),
)
# Full text: `captions_fts` (SQLite FTS5, synced by triggers) or a GIN index (PostgreSQL); see 0003.

@dataclass(frozen=True)
class FileRow:
    """A row of `files` as the catalog holds it."""

    id: int
    path: str
    size: int
    mtime_ns: int
    content_hash: str | None
    status: str
    error: str | None
    width: int | None
    height: int | None
    format: str | None
    embedding_id: int | None
    updated_at: float


IN_CHUNK = 500  # rows per IN (...) clause, well under SQLite's variable limit


def chunks(items, size: int = IN_CHUNK):
    """Consecutive slices of `items`, for IN (...) clauses and batched reads."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


INDEXED = "indexed"
SKIPPED = "skipped"
