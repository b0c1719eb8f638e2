"""Caption rows of the catalog: what needs a caption, writing a batch of them, and full-text search.

Captions belong to an image's content (an `embeddings` row), so renamed and duplicate files share
one. Full-text search uses SQLite FTS5 (bm25) or PostgreSQL's text search (ts_rank_cd); a query's
words are OR-ed, so a caption matching more of them, and rarer ones, ranks higher.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Sequence

from sqlalchemy import delete, func, insert, or_, select, text
from sqlalchemy.engine import Engine

from indexer import schema
from indexer.schema import chunks


@dataclass(frozen=True)
class Caption:
    embedding_id: int
    caption: str
    model: str
    prompt: str
    created_at: float


@dataclass(frozen=True)
class CaptionTask:
    """An image content to caption, and one indexed file that holds it."""

    embedding_id: int
    content_hash: str
    path: str


@dataclass(frozen=True)
class NewCaptions:
    """Captions for new contents, written in the same transaction as their embeddings."""

    texts: dict[str, str]  # content hash -> caption
    model: str
    prompt: str


class CaptionCatalog:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @staticmethod
    def _not_done(model: str, prompt: str, overwrite: bool, after_id: int | None = None):
        """Contents lacking a caption (with `overwrite`: lacking one by this model and prompt). With
        `after_id`, the caller reads contents after it, and so does this: said outright, the bound lets
        PostgreSQL's merge anti-join start the captions at the page, where it read them all from the
        first each page (quadratic in a catalog with many captions)."""
        e, c = schema.embeddings, schema.captions
        done = select(c.c.embedding_id).where(c.c.embedding_id == e.c.id)
        if after_id is not None:
            done = done.where(c.c.embedding_id > after_id)
        if overwrite:
            done = done.where(c.c.model == model, c.c.prompt == prompt)
        return ~done.exists()

    def todo_count(self, model: str, prompt: str, overwrite: bool) -> int:
        query = select(func.count()).select_from(schema.embeddings).where(self._not_done(model, prompt, overwrite))
        with self.engine.connect() as conn:
            return conn.execute(query).scalar_one()

    def todo(self, model: str, prompt: str, overwrite: bool, after_id: int, limit: int) -> list[CaptionTask]:
        """Up to `limit` contents still to caption with id > `after_id`, each with the first indexed
        file holding it."""
        e, f = schema.embeddings, schema.files
        first_path = (
            select(func.min(f.c.path)).where(f.c.embedding_id == e.c.id, f.c.status == schema.INDEXED).scalar_subquery()
        )
        query = (
            select(e.c.id, e.c.content_hash, first_path.label("path"))
            .where(e.c.id > after_id, self._not_done(model, prompt, overwrite, after_id))
            .order_by(e.c.id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [CaptionTask(i, h, p) for i, h, p in conn.execute(query) if p is not None]

    def write(self, captions: dict[int, str], model: str, prompt: str) -> None:
        """One transaction: these embeddings' captions become `captions` (replacing older ones)."""
        with self.engine.begin() as conn:
            write_captions(conn, captions, model, prompt, time.time())

    def get(self, embedding_ids: Sequence[int]) -> dict[int, Caption]:
        c = schema.captions
        ids = [int(i) for i in embedding_ids]
        out: dict[int, Caption] = {}
        with self.engine.connect() as conn:
            for chunk in chunks(ids):
                for row in conn.execute(select(c).where(c.c.embedding_id.in_(chunk))):
                    out[row.embedding_id] = Caption(**row._mapping)
        return out

    def count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(schema.captions)).scalar_one()

    def search(self, query: str, limit: int) -> list[tuple[int, float]]:
        """(embedding id, relevance) of the best caption matches for `query`'s words, best first."""
        words = re.findall(r"\w+", query.lower())
        if not words:
            return []
        with self.engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                match = " OR ".join(f'"{w}"' for w in words)
                rows = conn.execute(text(
                    "SELECT rowid, -bm25(captions_fts) AS relevance FROM captions_fts "
                    "WHERE captions_fts MATCH :match ORDER BY relevance DESC, rowid LIMIT :limit"
                ), {"match": match, "limit": limit})
            elif conn.dialect.name == "postgresql":
                rows = conn.execute(text(
                    "SELECT embedding_id, ts_rank_cd(to_tsvector('english', caption), q) AS relevance "
                    "FROM captions, to_tsquery('english', :q) q WHERE to_tsvector('english', caption) @@ q "
                    "ORDER BY relevance DESC, embedding_id LIMIT :limit"
                ), {"q": " | ".join(words), "limit": limit})
            else:  # any other database: a plain substring match on each word
                c = schema.captions
                rows = conn.execute(
                    select(c.c.embedding_id, func.count().label("relevance"))
                    .where(or_(*[c.c.caption.ilike(f"%{w}%") for w in words]))
                    .group_by(c.c.embedding_id).limit(limit)
                )
            return [(int(i), float(r)) for i, r in rows]


def write_captions(conn, captions: dict[int, str], model: str, prompt: str, now: float) -> None:
    """Within a caller's transaction: set these embeddings' captions, replacing older ones."""
    delete_captions(conn, list(captions))
    if captions:
        schema_rows = [
            {"embedding_id": i, "caption": text, "model": model, "prompt": prompt, "created_at": now}
            for i, text in captions.items()
        ]
        conn.execute(insert(schema.captions), schema_rows)


def delete_captions(conn, embedding_ids: Sequence[int]) -> None:
    """Within a caller's transaction: drop the captions of embeddings about to be deleted."""
    c = schema.captions
    for chunk in chunks(list(embedding_ids)):
        conn.execute(delete(c).where(c.c.embedding_id.in_(chunk)))

