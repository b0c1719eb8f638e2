"""The catalog on SQLite and on PostgreSQL (a fresh database per test, ICU en-US collation)."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import random
import re
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from indexer.catalog import Catalog, FileEntry
from indexer.database import CLIENT_KEEPALIVES, SERVER_KEEPALIVES
from indexer.errors import CatalogConnectionError
from indexer.schema import INDEXED, SKIPPED
from retrieval.errors import ModelMismatchError
from retrieval.loading import ModelIdentity
from tests.conftest import ROOT, Cuttable, _postgres_admin, assert_consistent, fill_files, make_images, run_cli

Q, D = 4, 8
IDENTITY = ModelIdentity(name="m", fingerprint="abc", embed_dim=D, num_queries=Q)


def entry(path: str, content_hash: str | None, status: str = INDEXED) -> FileEntry:
    return FileEntry(path=path, size=10, mtime_ns=1, content_hash=content_hash, status=status,
                     error=None if status == INDEXED else "corrupt: broken", width=4, height=3, format="JPEG")


def vectors(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((Q, D)).astype(np.float32)


@pytest.fixture
def catalog(catalog_url):
    opened = Catalog.open(catalog_url)
    yield opened
    opened.close()


def test_migrates_once_and_reopens(catalog_url):
    Catalog.open(catalog_url).close()
    reopened = Catalog.open(catalog_url)
    assert reopened.counts() == {"files": 0, "distinct_images": 0, "captioned_images": 0}
    reopened.close()


def at_schema(catalog_url: str, revision: str) -> None:
    """A new catalog at `url` as an earlier blipsearch made it: its schema at `revision`."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine

    engine = create_engine(catalog_url)
    config = Config()
    config.set_main_option("script_location", str(ROOT / "indexer" / "migrations"))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
    engine.dispose()


def test_a_catalog_of_an_older_version_is_migrated_with_its_rows(catalog_url):
    """A catalog written by an earlier blipsearch (schema 0003) gains what is new at its next open."""
    from sqlalchemy import create_engine, inspect

    at_schema(catalog_url, "0003")
    older = Catalog(create_engine(catalog_url))  # as it was: not migrated
    older.write_batch([entry("/p/b.jpg", None, SKIPPED), entry("/p/a.jpg", None, SKIPPED)], {})
    older.engine.dispose()
    catalog = Catalog.open(catalog_url)
    assert "ix_files_skipped_path" in {index["name"] for index in inspect(catalog.engine).get_indexes("files")}
    assert [row.path for row in catalog.listing.page(0, 5, status=SKIPPED)[1]] == ["/p/a.jpg", "/p/b.jpg"]
    assert len(catalog.vectors_version()) == 32  # 0005
    catalog.close()


def test_a_rare_glob_is_found_through_the_trigram_index_on_postgresql(postgres_url):
    """0006: '*2019*' read every path to find its few matches; pg_trgm's index finds them."""
    from sqlalchemy import select

    from indexer import path_glob, schema

    catalog = Catalog.open(postgres_url)
    try:
        catalog.write_batch([entry(f"/p/{i:04d}/IMG_{i:06d}.jpg", None, SKIPPED) for i in range(2000)], {})
        assert [row.path for row in catalog.listing.page(0, 5, path_glob="*IMG_00123[0-4]*")[1]] == \
            [f"/p/{i:04d}/IMG_{i:06d}.jpg" for i in range(1230, 1235)]
        f = schema.files
        for glob in ("*IMG_001234*", "*IMG_00123[0-4]*"):  # LIKE alone; LIKE and a regular expression
            query = select(f.c.id).where(*path_glob.conditions(f.c.path, glob, "postgresql"))
            compiled = query.compile(catalog.engine, compile_kwargs={"literal_binds": True})
            with catalog.engine.begin() as conn:
                conn.exec_driver_sql("SET LOCAL enable_seqscan = off")  # 2,000 rows: a scan would be cheaper
                plan = "\n".join(conn.exec_driver_sql(f"EXPLAIN {compiled}".replace("%", "%%")).scalars())
            assert "ix_files_path_trgm" in plan, plan
        assert catalog.listing.has_path_trigrams()  # what status says
    finally:
        catalog.close()


def test_a_catalog_user_who_may_not_create_pg_trgm_gets_a_catalog_without_its_index(postgres_url):
    """pg_trgm needs the right to create in the database; without it, the migration goes on."""
    from sqlalchemy import inspect
    from sqlalchemy.engine import make_url

    database = make_url(postgres_url).database
    role = f"limited_{database[-12:]}"
    admin = _postgres_admin()
    with contextlib.closing(admin):
        admin.execute(f"CREATE ROLE {role} LOGIN")
        try:
            with contextlib.closing(_postgres_admin(database)) as owner:
                owner.execute(f"GRANT CREATE, USAGE ON SCHEMA public TO {role}")  # tables, not extensions
            catalog = Catalog.open(make_url(postgres_url).set(username=role).render_as_string(hide_password=False))
            try:
                catalog.write_batch([entry("/p/a.jpg", None, SKIPPED)], {})
                assert [row.path for row in catalog.listing.page(0, 5, path_glob="*a.jpg")[1]] == ["/p/a.jpg"]
                assert "ix_files_path_trgm" not in {i["name"] for i in inspect(catalog.engine).get_indexes("files")}
                assert not catalog.listing.has_path_trigrams()
            finally:
                catalog.close()
        finally:  # roles outlive the test's database
            with contextlib.closing(_postgres_admin(database)) as owner:
                owner.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")


def test_pg_trgm_in_a_schema_off_the_search_path_leaves_the_catalog_without_its_index(postgres_url):
    from sqlalchemy import inspect
    from sqlalchemy.engine import make_url

    with contextlib.closing(_postgres_admin(make_url(postgres_url).database)) as owner:
        owner.execute("CREATE SCHEMA elsewhere")
        owner.execute("CREATE EXTENSION pg_trgm SCHEMA elsewhere")  # gin_trgm_ops not found by name
    catalog = Catalog.open(postgres_url)
    try:
        catalog.write_batch([entry("/p/a.jpg", None, SKIPPED)], {})
        assert [row.path for row in catalog.listing.page(0, 5, path_glob="*a.jpg")[1]] == ["/p/a.jpg"]
        assert "ix_files_path_trgm" not in {index["name"] for index in inspect(catalog.engine).get_indexes("files")}
    finally:
        catalog.close()


def test_an_older_catalog_that_cannot_be_written_is_one_clear_error(catalog_url):
    """A shared index on a read-only mount, first opened by a newer blipsearch: the schema upgrade
    (0005 adds a row) cannot be written. It said "attempt to write a readonly database" and SQL."""
    from indexer.errors import CatalogVersionError

    at_schema(catalog_url, "0004")
    if catalog_url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(catalog_url.removeprefix("sqlite:///"))) as conn:
            conn.execute("PRAGMA journal_mode=WAL")  # as blipsearch keeps its catalogs
        read_only = catalog_url.replace("sqlite:///", "sqlite:///file:") + "?mode=ro&uri=true"
    else:
        read_only = catalog_url + "?options=-c%20default_transaction_read_only%3Don"
    with pytest.raises(CatalogVersionError) as raised:
        Catalog.open(read_only)
    assert "has schema version 0004, older than this blipsearch's 0006, and cannot be upgraded where it is " \
           "read-only; open it once where it can be written" in str(raised.value)
    Catalog.open(catalog_url).close()  # where it can be written, it is upgraded
    Catalog.open(read_only).close()  # and then opens read-only too


def test_the_vectors_version_changes_with_the_embeddings_alone(catalog, tmp_path):
    """A search trusts a FAISS file saved at the catalog's vectors version (`IndexStore.save_vectors`):
    every change to the embeddings must replace it. Changes that leave them be need not."""
    other = Catalog.open(f"sqlite:///{tmp_path / 'other.sqlite'}")
    assert other.vectors_version() != catalog.vectors_version()  # a file of one is never taken for the other's
    other.close()
    seen = [catalog.vectors_version()]

    def changed() -> bool:
        seen.append(catalog.vectors_version())
        return seen[-1] != seen[-2]

    catalog.write_batch([entry("/p/a.jpg", "h1"), entry("/p/b.jpg", "h2")], {"h1": vectors(1), "h2": vectors(2)})
    assert changed()
    catalog.write_batch([entry("/p/copy.jpg", "h1"), entry("/p/bad.jpg", None, SKIPPED)], {})
    assert not changed()  # a duplicate and a skipped file: no embedding added or removed
    ids = {row.path: row.id for row in catalog.files()}
    assert catalog.remove_files([ids["/p/copy.jpg"]]) == [] and not changed()
    assert len(catalog.remove_files([ids["/p/a.jpg"]])) == 1 and changed()
    catalog.write_batch([entry("/p/b.jpg", "h3")], {"h3": vectors(3)})  # new content under an old name
    assert changed()
    assert catalog.remove_under(["/p"])[0] == 2 and changed()


@pytest.mark.parametrize("url, message", [
    ("postgresql+psycopg://127.0.0.1:1/nope", "cannot open the catalog at postgresql+psycopg://127.0.0.1:1/nope: "
                                              "connection failed"),
    ("postgresql+psycopg://me:pw@127.0.0.1:1/db", "cannot open the catalog at postgresql+psycopg://me:***@"),
    ("mysql://host/db", "the catalog URL needs a driver that is not installed (No module named 'MySQLdb')"),
    ("not a url", "the catalog URL is not a database URL"),
])
def test_a_catalog_that_cannot_be_opened_is_one_clear_error(tmp_path, url, message):
    result = run_cli("status", "--index", str(tmp_path / "idx"), "--catalog-url", url)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"Error: {message}") and "pw" not in result.stderr


def test_a_corrupt_sqlite_catalog_is_one_clear_error(tmp_path):
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "catalog.sqlite").write_bytes(b"\x13" * 5000)
    result = run_cli("status", "--index", str(tmp_path / "idx"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == f"Error: cannot open the catalog at sqlite:///{tmp_path}/idx/catalog.sqlite: " \
                            "file is not a database\n"


def test_model_is_claimed_once(catalog):
    catalog.claim_model(IDENTITY)
    catalog.claim_model(IDENTITY)
    assert catalog.model() == IDENTITY
    with pytest.raises(ModelMismatchError, match="the model 'm' is not the one this index was built with: its weights "
                                                 r"changed \(fingerprint abc, now zzz"):
        catalog.claim_model(ModelIdentity(name="m", fingerprint="zzz", embed_dim=D, num_queries=Q))
    with pytest.raises(ModelMismatchError, match="built with model 'm'"):
        catalog.claim_model(ModelIdentity(name="other", fingerprint="zzz", embed_dim=D, num_queries=Q))


def test_batches_share_content_and_drop_orphans(catalog):
    a, b = vectors(1), vectors(2)
    written = catalog.write_batch(
        [entry("/p/a.jpg", "ha"), entry("/p/copy.jpg", "ha"), entry("/p/b.jpg", "hb"), entry("/p/bad.jpg", "hx", SKIPPED)],
        {"ha": a, "hb": b},
    )
    assert set(written.created) == {"ha", "hb"} and written.orphaned == []
    ids, stored = catalog.vectors([written.created["ha"], written.created["hb"]], Q, D)
    by_id = dict(zip(ids.tolist(), stored))
    np.testing.assert_array_equal(by_id[written.created["ha"]], a)
    np.testing.assert_array_equal(by_id[written.created["hb"]], b)
    # b.jpg's content changes: its old embedding has no file left and goes in the same transaction.
    changed = catalog.write_batch([entry("/p/b.jpg", "hc")], {"hc": vectors(3)})
    assert changed.orphaned == [written.created["hb"]]
    assert catalog.remove_under(["/p/a.jpg"]) == (1, [])  # copy.jpg still holds "ha"
    assert catalog.remove_under(["/p/copy.jpg"]) == (1, [written.created["ha"]])
    assert catalog.counts() == {"files": 2, "indexed": 1, "skipped": 1, "distinct_images": 1, "captioned_images": 0}
    skipped = [row for row in catalog.files() if row.status == SKIPPED]
    assert skipped[0].error == "corrupt: broken" and skipped[0].embedding_id is None


def test_roots_are_added_and_removed_with_what_lies_under_them(catalog):
    catalog.add_roots(["/p/a", "/p/a/b", "/p/ab", "/p/c.jpg"])
    assert catalog.remove_roots(["/p/a/"]) == ["/p/a", "/p/a/b"]  # not its sibling /p/ab
    assert catalog.remove_roots(["/p/c.jpg", "/p/none"]) == ["/p/c.jpg"]
    assert catalog.roots() == ["/p/ab"] and catalog.remove_roots(["/p/a"]) == []


def test_files_under_a_folder_exclude_its_siblings(catalog):
    """'/p/x&y' sorts between '/p/x/' and '/p/x0' under a locale collation; paths must compare bytewise."""
    paths = ["/p/x/a.jpg", "/p/x/sub/b.jpg", "/p/x&y/c.jpg", "/p/x-1.jpg", "/p/xa/d.jpg", "/p/X/e.jpg"]
    catalog.write_batch([entry(p, None, SKIPPED) for p in paths], {})
    assert [row.path for row in catalog.iter_under(["/p/x"])] == ["/p/x/a.jpg", "/p/x/sub/b.jpg"]
    assert catalog.has_under("/p/x") and not catalog.has_under("/p/x/s")
    assert catalog.remove_under(["/p/x", "/p/x/sub"]) == (2, [])
    assert sorted(row.path for row in catalog.files()) == sorted(paths[2:])


def test_index_search_and_reindex_with_catalog_url(tiny_model, tmp_path, postgres_url):
    make_images(tmp_path / "photos", 6, seed=4)
    common = ["--index", str(tmp_path / "idx"), "--catalog-url", postgres_url, "--model", str(tiny_model)]
    first = run_cli("index", str(tmp_path / "photos"), "-q", "--json", *common, check=True)
    assert '"indexed": 6' in first.stdout
    (tmp_path / "photos" / "img0000.jpg").rename(tmp_path / "photos" / "renamed.jpg")
    (tmp_path / "photos" / "img0001.jpg").unlink()
    second = run_cli("index", str(tmp_path / "photos"), "-q", "--json", *common, check=True)
    assert '"indexed": 0' in second.stdout and '"reused": 1' in second.stdout and '"removed": 2' in second.stdout
    assert not (tmp_path / "idx" / "catalog.sqlite").exists()
    assert_consistent(tmp_path / "idx", postgres_url)
    found = run_cli("search", "a red circle", "-k", "3", "--json", *common, check=True)
    assert found.stdout.count('"path"') == 3
    status = run_cli("status", "--json", *common[:4], check=True)
    assert '"distinct_images": 5' in status.stdout and '"path_trigram_index": true' in status.stdout


def test_captions_todo_write_and_full_text_search(catalog):
    written = catalog.write_batch(
        [entry("/p/a.jpg", "ha"), entry("/p/b.jpg", "hb"), entry("/p/c.jpg", "hc"), entry("/p/a2.jpg", "ha")],
        {"ha": vectors(1), "hb": vectors(2), "hc": vectors(3)},
    )
    ids = written.created
    todo = catalog.captions.todo("m1", "", overwrite=False, after_id=0, limit=10)
    assert [(t.embedding_id, t.path) for t in todo] == [(ids["ha"], "/p/a.jpg"), (ids["hb"], "/p/b.jpg"),
                                                         (ids["hc"], "/p/c.jpg")]
    catalog.captions.write({ids["ha"]: "zebras crossing a road", ids["hb"]: "a zebra near a giraffe"}, "m1", "")
    assert [t.embedding_id for t in catalog.captions.todo("m1", "", False, 0, 10)] == [ids["hc"]]
    assert catalog.captions.todo_count("m2", "", overwrite=True) == 3  # another model: all of them
    found = catalog.captions.search("zebra giraffe", 10)
    assert [eid for eid, _ in found] == [ids["hb"], ids["ha"]]  # stemming: "zebras" matches too
    assert found[0][1] > found[1][1] > 0
    assert catalog.captions.search("!!! ''", 10) == []
    catalog.remove_under(["/p/b.jpg"])  # its content is gone: so is its caption
    assert [eid for eid, _ in catalog.captions.search("giraffe", 10)] == []


def test_indexers_and_searchers_share_one_postgres_catalog(tiny_model, tmp_path, postgres_url):
    """Two indexers at once, each with its own index directory, on folders holding a common image."""
    import os
    import shutil
    import subprocess
    import sys

    from tests.conftest import ROOT

    for name, seed in (("a", 21), ("b", 22)):
        make_images(tmp_path / name, 12, seed=seed)
    shutil.copy(tmp_path / "a" / "img0000.jpg", tmp_path / "b" / "aaa.jpg")  # both writers start with it
    catalog = ["--catalog-url", postgres_url, "--model", str(tiny_model)]

    def command(name):
        return [sys.executable, "-m", "api.cli", "index", str(tmp_path / name), "--index", str(tmp_path / f"idx-{name}"),
                "--batch-size", "2", "-q", "--json", *catalog]

    runs = [subprocess.Popen(command(n), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"}) for n in ("a", "b")]
    for run in runs:
        out, err = run.communicate(timeout=240)
        assert run.returncode == 0, err

    def search(name):
        found = run_cli("search", "a red circle", "-k", "100", "--no-rerank", "--json", "--index",
                        str(tmp_path / f"idx-{name}"), *catalog, check=True)
        return found.stdout.count('"path"')

    # A FAISS file saved while the other writer went on is not taken as the catalog's (vectors.json).
    assert search("a") == search("b") == 25  # both folders, every file
    for name in ("a", "b"):  # each directory's FAISS file takes in what the other writer added
        run_cli(*command(name)[3:], check=True)
        assert_consistent(tmp_path / f"idx-{name}", postgres_url)
        assert search(name) == 25


TRICKY = ["/p/a", "/p/a b.jpg", "/p/a-1.jpg", "/p/a.jpg", "/p/a/b.jpg", "/p/a/sub/c.jpg", "/p/a0.jpg",
          "/p/B.jpg", "/p/b.jpg", "/p/é.jpg", "/p/z.jpg", "/p/\u00ff/x.jpg", "/p/\u4e2d.jpg", "/p/\U0001f600.jpg",
          "/p/x&y/c.jpg", "/p/x/a.jpg", "/q/d.jpg"]


@pytest.mark.parametrize("page", [1, 2, 100])
def test_iter_under_lists_each_file_once_in_pythons_path_order(catalog, page):
    """`compare.Comparison` merges this with the walk's order, Python's str order: the catalog must sort
    paths the same way (bytewise, not by a locale), a page at a time, nested roots once."""
    catalog.write_batch([entry(p, None, SKIPPED) for p in reversed(TRICKY)], {})
    listed = [row.path for row in catalog.iter_under(["/p/x", "/p/a", "/p", "/r"], page)]
    assert listed == sorted(p for p in TRICKY if p.startswith("/p/"))
    assert [row.path for row in catalog.iter_under(["/p/a", "/p/a.jpg"], page)] == \
           ["/p/a", "/p/a.jpg", "/p/a/b.jpg", "/p/a/sub/c.jpg"]


GLOB_PATHS = ["/p/a.jpg", "/p/A.JPG", "/p/b.jpg", "/p/img1.jpg", "/p/img9.JPG", "/p/x_1%.jpg", "/p/x\\y.jpg",
              "/p/é/ü.png", "/p/😀.gif", "/p/new\nline.jpg", "/p/[a].jpg", "/p/a-b.jpg", "/p/^.jpg", "/p/.j",
              "/q/2019/a.jpg", "/q/2019-x/b.png", "/q/img2.jpg", "/r.jpg"]


def test_path_globs_match_as_the_search_does(catalog):
    """`page` (GET /api/images) and `indexed_matching` (search --path's exact path) select in SQL what
    fnmatch selects: case-sensitively (SQLite's LIKE is not), with classes (LIKE has none), and LIKE's
    and regular expressions' own special characters taken literally; random globs built from the
    paths' characters too."""
    catalog.claim_model(IDENTITY)
    indexed = GLOB_PATHS[::2]
    catalog.write_batch([entry(p, f"h{i}") for i, p in enumerate(indexed)], {f"h{i}": vectors(i) for i in range(len(indexed))})
    catalog.write_batch([entry(p, None, SKIPPED) for p in GLOB_PATHS[1::2]], {})
    rng = random.Random(0)
    alphabet = sorted(set("".join(GLOB_PATHS)) - {"\n"}) + ["*"] * 6 + ["?", "[", "]", "!", "-"] * 2
    globs = ["*.jpg", "*.JPG", "/p/img[0-9].*", "*[!a-z].jpg", "/p/x_1%.jpg", "/p/x?1?.jpg", "/p/x\\y.jpg",
             "*/é/*", "/p/?.gif", "*\n*", "/p/[[]a].jpg", "/p/a[-]b.jpg", "/p/[^].jpg", "/p/.*", "/q/2019*",
             "/q/2019/*", "/p/[z-a]*", "/p/[!]*", "*", "/p/[\\]*", "/p/x[\\]y.jpg", "[]/]*"]
    globs += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) for _ in range(150)]
    for glob in globs:
        want = sorted(p for p in GLOB_PATHS if fnmatch.fnmatchcase(p, glob))
        total, rows = catalog.listing.page(0, 100, path_glob=glob)
        assert (total, [row.path for row in rows]) == (len(want), want), glob
        assert sorted(row.path for row in catalog.listing.indexed_matching(glob, 100)) == \
            [p for p in want if p in indexed], glob
    assert catalog.listing.indexed_matching("*.jpg", 6) is None and len(catalog.listing.indexed_matching("*.jpg", 7)) == 7
    for after in ("/p/b.jpg", "/p/é", "/q"):  # GET /api/images?after=: byte order, as the path index's
        total, rows = catalog.listing.page(0, 4, after=after, count=False)
        assert total is None and [row.path for row in rows] == sorted(p for p in GLOB_PATHS if p > after)[:4]
    for never in ["/p/\x00*", "*\x00", "/p/\udce9*"]:  # PostgreSQL refused NUL: a 500 from GET /api/images
        assert catalog.listing.page(0, 10, path_glob=never) == (0, []) and catalog.listing.indexed_matching(never, 10) == []


@pytest.mark.parametrize("scan_rows", [1, 7, 1000])
def test_scanned_pages_read_a_window_each_and_together_list_every_match_once(catalog, scan_rows):
    """`scan_page` (GET /api/images by caption, or a glob with no folder) looks at `scan_rows` paths a
    page: a page may hold fewer than `limit` files, none even, yet following `next` lists exactly what
    `page` lists, in order, whatever the window."""
    paths = [f"/p/{i:03d}{'-x' if i % 9 == 4 else ''}.jpg" for i in range(60)]
    written = catalog.write_batch([entry(p, f"h{i}") for i, p in enumerate(paths)],
                                  {f"h{i}": vectors(i) for i in range(len(paths))})
    catalog.write_batch([entry("/p/030-skipped.jpg", None, SKIPPED)], {})
    catalog.captions.write({written.created[f"h{i}"]: "a caption" for i in range(60) if i % 13 != 5}, "m", "")
    for filters in ({"has_caption": False}, {"has_caption": True}, {"path_glob": "*-x.jpg"},
                    {"path_glob": "*-x.jpg", "has_caption": True}, {"has_caption": False, "status": INDEXED}):
        _, want = catalog.listing.page(0, 1000, **filters, count=False)
        listed, pages, after = [], 0, None
        while True:
            rows, after = catalog.listing.scan_page(4, after=after, scan_rows=scan_rows, **filters)
            assert len(rows) <= 4 and pages < 200
            listed += [row.path for row in rows]
            pages += 1
            if after is None:
                break
        assert listed == [row.path for row in want], filters
        if scan_rows == 1:  # a window of one path: a page per path at least, most of them empty
            assert pages >= 61
    assert catalog.listing.scan_page(4, has_caption=False, after="/q") == ([], None)


def test_an_id_beyond_the_columns_range_is_no_file(catalog):
    """GET /api/images/2147483648 was a 500 on PostgreSQL, whose INTEGER is 32 bits (found by the fuzz)."""
    catalog.write_batch([entry("/p/a.jpg", None, SKIPPED)], {})
    first = catalog.files()[0].id
    assert catalog.file(first).path == "/p/a.jpg"
    assert catalog.file(2**31) is None and catalog.file(2**53) is None and catalog.file(-1) is None


@contextlib.contextmanager
def most_rows_read(engine):
    """For each paged query (one with a LIMIT) run on `engine` meanwhile, the most rows any node of
    PostgreSQL's plan for it read, asked of the same connection in its transaction (EXPLAIN ANALYZE)."""
    from sqlalchemy import event

    read: list[int] = []

    def explain(conn, cursor, statement, parameters, *_):
        if "LIMIT" in statement:
            plan = cursor.connection.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters).fetchone()[0]
            read.append(max(int(n) for n in re.findall(r'"Actual Rows": (\d+)', json.dumps(plan))))

    event.listen(engine, "before_cursor_execute", explain)
    try:
        yield read
    finally:
        event.remove(engine, "before_cursor_execute", explain)


def fill_without_statistics(catalog, sql: str) -> None:
    """Rows written straight, into tables PostgreSQL has not analysed (as just after a large first run)."""
    with catalog.engine.begin() as conn:
        for table in ("files", "embeddings", "captions"):
            conn.exec_driver_sql(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        conn.exec_driver_sql(sql)


@contextlib.contextmanager
def sqlite_steps(engine):
    """For each paged query run on `engine` meanwhile, the hundreds of virtual machine steps SQLite
    took for it: a measure of the rows it read, which SQLite does not report."""
    from sqlalchemy import event

    steps: list[int] = []

    def before(conn, cursor, statement, *_):
        if "LIMIT" in statement:
            steps.append(0)
            cursor.connection.set_progress_handler(lambda: steps.__setitem__(-1, steps[-1] + 1), 100)

    def after(conn, cursor, *_):
        cursor.connection.set_progress_handler(None, 0)

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    try:
        yield steps
    finally:
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)


def test_a_page_of_skipped_files_reads_only_skipped_rows(catalog):
    """GET /api/images?status=skipped lists what an index run could not read. Skipped files are few
    among many, and a page of them read every indexed path sorting before them (0.1 s a million
    files, every page); an index of the skipped paths alone (0004) has a page read its own rows."""
    fill_files(catalog, 30000, "/p/a/%d.jpg", INDEXED)
    fill_files(catalog, 20, "/p/z/%d.jpg", SKIPPED)
    postgres = catalog.engine.dialect.name == "postgresql"
    for _ in range(12):  # psycopg prepares a statement run 5 times, and PostgreSQL plans it generically after 5 more
        catalog.listing.page(0, 5, status=SKIPPED, count=False)
    with (most_rows_read if postgres else sqlite_steps)(catalog.engine) as work:
        total, rows = catalog.listing.page(0, 5, status=SKIPPED)
        _, after = catalog.listing.page(0, 5, status=SKIPPED, after=rows[-1].path, count=False)
        _, indexed = catalog.listing.page(0, 5, status=INDEXED, count=False)
    assert total == 20 and [row.path for row in rows + after] == [f"/p/z/{100000 + i}.jpg" for i in range(1, 11)]
    assert [row.path for row in indexed] == [f"/p/a/{100000 + i}.jpg" for i in range(1, 6)]
    assert len(work) == 3 and max(work) <= (5 if postgres else 20), work


def test_a_total_that_would_take_too_long_to_count_is_none(catalog):
    """A listing's total counts every row its filters match: 0.1 s a million files, for each page.
    Given a time limit, the database stops counting there; the page is still read, and the
    connection goes back to the pool without the limit."""
    fill_files(catalog, 200000, "/p/%d.jpg", INDEXED)
    total, rows = catalog.listing.page(0, 3, path_glob="*7.jpg", count_within_s=0.001)
    assert total is None and [row.path for row in rows] == ["/p/100007.jpg", "/p/100017.jpg", "/p/100027.jpg"]
    for _ in range(3):  # every pooled connection: no limit left behind
        assert catalog.listing.page(0, 1, path_glob="*7.jpg")[0] == 20000
    assert catalog.listing.page(0, 3, path_glob="*7.jpg", count_within_s=60)[0] == 20000
    assert catalog.listing.page(0, 1, path_glob="/p/10000*", count_within_s=0.05)[0] == 9  # a few rows: counted in time


def test_iter_under_pages_walk_the_path_index_on_postgres_without_statistics(postgres_url):
    """PostgreSQL plans by its statistics, and a table it has not analysed yet (a catalog that a first
    large run has just filled, before autovacuum comes round) got each page as a bitmap scan of every
    row after the key and a sort: a re-run over 1,000,000 files took 26 s instead of 14. Every page
    must read no more rows than it returns, whatever the statistics say."""
    catalog = Catalog.open(postgres_url)
    fill_without_statistics(catalog, "INSERT INTO files (path, size, mtime_ns, status, updated_at) SELECT "
                            "'/p/f' || i / 1000 || '/' || i || '.jpg', 0, 1, 'skipped', 0 FROM generate_series(100000, 129999) i")
    with most_rows_read(catalog.engine) as read:
        assert len(list(catalog.iter_under(["/p"], page=1000))) == 30000
    with catalog.engine.connect() as conn:  # the setting ends with each page's read
        assert conn.exec_driver_sql("SHOW enable_sort").scalar() == "on"
    catalog.close()
    assert len(read) == 31 and max(read) <= 1000, read


@pytest.mark.parametrize("analysed", [False, True])
def test_caption_todo_pages_do_not_read_the_captions_before_them_on_postgres(postgres_url, analysed):
    """Each page of contents still to caption anti-joined them with every caption from the first id on,
    analysed or not: 13 ms a page with 100,000 captions, growing with them (0.8 ms now)."""
    catalog = Catalog.open(postgres_url)
    fill_without_statistics(catalog, """
        INSERT INTO embeddings (id, content_hash, vectors, created_at)
            SELECT i, md5(i::text), '\\x00', 0 FROM generate_series(1, 30000) i;
        INSERT INTO files (path, size, mtime_ns, status, updated_at, embedding_id)
            SELECT '/p/' || i || '.jpg', 0, 1, 'indexed', 0, i FROM generate_series(1, 30000) i;
        INSERT INTO captions SELECT i, 'a cat', 'm', '', 0 FROM generate_series(1, 20000) i""")
    if analysed:
        with catalog.engine.connect() as conn:
            conn.exec_driver_sql("COMMIT")
            conn.exec_driver_sql("ANALYZE")
    with most_rows_read(catalog.engine) as read:
        tasks = catalog.captions.todo("m", "", False, after_id=20000, limit=500)
    catalog.close()
    assert [t.embedding_id for t in tasks] == list(range(20001, 20501)) and read[0] <= 500, read


def test_remove_files_by_id_deletes_the_vectors_only_they_used(catalog):
    catalog.claim_model(IDENTITY)
    catalog.write_batch([entry("/p/a.jpg", "h1"), entry("/p/b.jpg", "h1"), entry("/p/c.jpg", "h2")],
                        {"h1": vectors(1), "h2": vectors(2)})
    ids = {row.path: row.id for row in catalog.files()}
    assert catalog.remove_files([ids["/p/a.jpg"]]) == []  # b.jpg still shows h1
    assert catalog.remove_files([ids["/p/b.jpg"], ids["/p/c.jpg"]]) != []
    assert catalog.counts()["files"] == 0 and catalog.counts()["distinct_images"] == 0


def test_either_side_of_a_catalog_connection_drops_it_within_two_minutes_of_a_network_cut(postgres_url):
    """Keepalive probes, the server's: a run's host lost mid-transaction must not hold its row locks
    for hours; and the client's: a run must not wait for hours on an answer the cut swallowed. (Set
    on each connection, the server's kept past a rollback; a real network cut is not simulated.)"""
    catalog = Catalog.open(postgres_url)
    try:
        catalog.engine.dispose()  # a new connection, not the one whose migration check committed
        with catalog.engine.connect() as conn:
            for _ in range(2):  # the second after a rollback, as the pool does on each return
                shown = {name: int(conn.exec_driver_sql(f"SHOW {name}").scalar_one()) for name in SERVER_KEEPALIVES}
                assert shown == SERVER_KEEPALIVES
                conn.rollback()
        assert shown["tcp_keepalives_idle"] + shown["tcp_keepalives_interval"] * shown["tcp_keepalives_count"] <= 120
        with catalog.engine.connect() as conn:  # and this side's, for a server lost the same way
            client = conn.connection.dbapi_connection.info.get_parameters()
        assert {name: int(client[name]) for name in CLIENT_KEEPALIVES} == CLIENT_KEEPALIVES
    finally:
        catalog.close()
    own = Catalog.open(postgres_url + "?keepalives_idle=300")  # a URL's own setting is kept
    try:
        with own.engine.connect() as conn:
            assert conn.connection.dbapi_connection.info.get_parameters()["keepalives_idle"] == "300"
    finally:
        own.close()


def test_a_catalog_server_that_goes_away_and_comes_back(postgres_url):
    """Pooled connections the server dropped while idle are replaced unseen (a long-lived `serve` goes on
    after a database restart); while it is away, one clear error says to run the command again."""
    link = Cuttable(postgres_url)
    catalog = Catalog.open(link.url)
    try:
        catalog.write_batch([entry("/p/a.jpg", None, SKIPPED)], {})
        link.cut()
        link.restore()
        assert catalog.counts()["files"] == 1  # the pooled connection was cut: replaced
        link.cut()
        with pytest.raises(CatalogConnectionError, match="lost the connection to the catalog at postgresql"
                                                         r"\+psycopg://postgres@127.0.0.1:\d+/blipsearch_test_"):
            catalog.counts()
        link.restore()
        catalog.write_batch([entry("/p/b.jpg", None, SKIPPED)], {})
        assert catalog.counts()["files"] == 2
    finally:
        catalog.close()
        link.cut()


def test_a_connection_lost_mid_run_is_one_clear_error_and_the_rerun_finishes(tiny_model, tmp_path, postgres_url):
    make_images(tmp_path / "photos", 40, seed=6)
    link = Cuttable(postgres_url)
    command = ["index", str(tmp_path / "photos"), "--index", str(tmp_path / "idx"), "--model", str(tiny_model),
               "--catalog-url", link.url, "--batch-size", "2", "-q"]
    running = subprocess.Popen([sys.executable, "-m", "api.cli", *command], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    direct = Catalog.open(postgres_url)
    try:
        while direct.counts()["files"] == 0 and running.poll() is None:
            time.sleep(0.05)
        link.cut()
        _, stderr = running.communicate(timeout=120)
        assert running.returncode == 1 and "Traceback" not in stderr
        assert stderr.startswith("Error: lost the connection to the catalog at postgresql+psycopg://postgres@")
        assert stderr.endswith("; run the same command again once it is back; every finished batch is kept, "
                               "and the same command goes on from there\n")
        kept = direct.counts()["files"]
        assert 0 < kept < 40
    finally:
        direct.close()
        running.kill()
    link.restore()
    rerun = run_cli(*command, "--json", check=True)
    assert json.loads(rerun.stdout)["indexed"] == 40 - kept
    assert_consistent(tmp_path / "idx", postgres_url)
    link.cut()


def test_iter_under_pages_cost_the_same_at_the_end_of_a_folder_as_at_its_start(tmp_path):
    """Each page must seek to its key in the path index and stop after a page. Two plans that did not
    (the root's own row in an OR: sort every row after the key; two lower bounds: read from the
    folder's start) made a walk of a folder quadratic. SQLite's virtual machine steps per page tell."""
    from sqlalchemy import event

    catalog = Catalog.open(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    catalog.write_batch([entry(f"/p/{i:05d}.jpg", None, SKIPPED) for i in range(3000)], {})
    catalog.write_batch([entry(f"/q/{i:05d}.jpg", None, SKIPPED) for i in range(3000)], {})  # after the folder
    steps: list[int] = []

    def count_steps(conn, cursor, statement, *_):
        steps.append(0)

        def step():
            steps[-1] += 1
            return 0

        conn.connection.driver_connection.set_progress_handler(step, 100)

    event.listen(catalog.engine, "before_cursor_execute", count_steps)
    assert len(list(catalog.iter_under(["/p"], page=100))) == 3000
    catalog.close()
    pages = steps[1:]  # after the root's own row
    assert len(pages) == 31 and max(pages) < 3 * pages[0] + 10, pages
