"""Pages of the catalog's files: by path, filtered by status, caption and a `--path` glob, counted
within a time limit; bounded scans for filters no index serves; the few files a narrow glob matches.

What `GET /api/images`, `export --status/--path` and `search --path` ask the catalog for. Pages go by
path, after the last path of the page before (`after`), so a page costs the same deep in a
hundred-million-file catalog as at its start.
"""

from __future__ import annotations

from sqlalchemy import exists, func, select
from sqlalchemy.engine import Engine

from indexer import path_glob, schema
from indexer.database import scalar_within
from indexer.schema import FileRow, chunks


class FileListing:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def page(self, offset: int, limit: int, status: str | None = None, has_caption: bool | None = None,
             path_glob: str | None = None, after: str | None = None, count: bool = True,
             count_within_s: float | None = None) -> tuple[int | None, list[FileRow]]:
        """(total matching, one page of) files ordered by path, filtered by status, caption and a
        `--path` glob (`indexer.path_glob`); the page from `offset` among those after the path `after`.
        The total ignores `after`: it is how many the filters match; None without `count`, or when
        counting would take over `count_within_s` (a filter matching much of a large catalog)."""
        f = schema.files
        conditions = file_filters(self.engine, status, has_caption, path_glob)
        on_page = conditions + ([f.c.path > after] if after is not None else [])
        with self.engine.connect() as conn:
            rows = [FileRow(**r._mapping) for r in
                    conn.execute(select(f).where(*on_page).order_by(f.c.path).offset(offset).limit(limit))]
            return (_count(conn, conditions, count_within_s) if count else None), rows

    def count_matching(self, status: str | None = None, has_caption: bool | None = None,
                       path_glob: str | None = None, within_s: float | None = None) -> int | None:
        """How many files the filters match, as `page` counts them (the total of `scan_page`'s pages)."""
        with self.engine.connect() as conn:
            return _count(conn, file_filters(self.engine, status, has_caption, path_glob), within_s)

    def scan_page(self, limit: int, has_caption: bool | None = None, path_glob: str | None = None,
                  after: str | None = None, status: str | None = None,
                  scan_rows: int = 100_000) -> tuple[list[FileRow], str | None]:
        """Up to `limit` files after the path `after` that the filters match, looking at no more than
        the next `scan_rows` paths; and where the next page starts after (None: at the end).

        For filters no index finds the matches of (a caption or not, a glob that does not start with
        a folder), `page` reads rows until it has a page: where matches are rare, most of the catalog.
        Here a page costs at most `scan_rows` rows, and may hold fewer than `limit` files, none even,
        while the catalog goes on; its `next` says where the following page starts."""
        f = schema.files
        start = [f.c.path > after] if after is not None else []
        window = select(f.c.path).where(*start).order_by(f.c.path).limit(scan_rows).subquery()
        # A file added between the two reads, inside the window, is listed or not, as with any page
        # by `after`; none is listed twice, and none already there is missed.
        with self.engine.connect() as conn:
            seen, last = conn.execute(select(func.count(), func.max(window.c.path))).one()
            if last is None:
                return [], None
            matching = file_filters(self.engine, status, has_caption, path_glob) + start + [f.c.path <= last]
            rows = [FileRow(**r._mapping)
                    for r in conn.execute(select(f).where(*matching).order_by(f.c.path).limit(limit))]
        if len(rows) == limit:
            return rows, rows[-1].path
        return rows, (last if seen == scan_rows else None)  # the window ended the catalog, or did not

    def indexed_matching(self, glob: str, most: int) -> list[FileRow] | None:
        """The indexed files whose path `glob` matches, in no particular order; None when they are
        more than `most` (found by their ids first, so that many matches cost no rows)."""
        f = schema.files
        query = select(f.c.id).where(f.c.status == schema.INDEXED, *_glob_conditions(self.engine, glob)).limit(most + 1)
        out: list[FileRow] = []
        with self.engine.connect() as conn:
            ids = conn.execute(query).scalars().all()
            if len(ids) > most:
                return None
            for chunk in chunks(ids):
                out.extend(FileRow(**r._mapping) for r in conn.execute(select(f).where(f.c.id.in_(chunk))))
        return out


    def has_path_trigrams(self) -> bool:
        """Whether globs without a folder start are found through pg_trgm's index (schema 0006, on
        PostgreSQL where the database allowed it) rather than by reading every path."""
        if self.engine.dialect.name != "postgresql":
            return False
        with self.engine.connect() as conn:
            return conn.exec_driver_sql(
                "SELECT count(*) FROM pg_indexes WHERE tablename = 'files' AND indexname = 'ix_files_path_trgm' "
                "AND schemaname = current_schema()").scalar_one() > 0


def file_filters(engine: Engine, status: str | None = None, has_caption: bool | None = None,
                 path_glob: str | None = None) -> list:
    """Conditions on files: of one status, with or without a caption, matching a `--path` glob."""
    f, c = schema.files, schema.captions
    conditions = []
    if status is not None:  # skipped files: their own index (0004), found by SQLite and PostgreSQL
        conditions.append(f.c.status == status)
    if has_caption is not None:
        captioned = exists().where(c.c.embedding_id == f.c.embedding_id)
        conditions.append(captioned if has_caption else ~captioned)
    if path_glob:
        conditions += _glob_conditions(engine, path_glob)
    return conditions


def _glob_conditions(engine: Engine, glob: str) -> list:
    return path_glob.conditions(schema.files.c.path, glob, engine.dialect.name)


def _count(conn, conditions: list, within_s: float | None) -> int | None:
    """The files matching `conditions`; None when counting would take over `within_s`."""
    counting = select(func.count()).select_from(schema.files).where(*conditions)
    if within_s is None:
        return conn.execute(counting).scalar_one()
    conn.rollback()  # a read before it (the page's) ends first: the count sets its own limit
    return scalar_within(conn, counting, within_s)
