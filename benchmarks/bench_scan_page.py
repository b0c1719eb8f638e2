"""Listing by a filter no index serves (`GET /api/images?has_caption=false`), project vs baseline in one
run, on a catalog of `--files` files all captioned but 1 in `--every`:

- baseline: `Catalog.page`, what the server did before: each page reads rows until it has found its
  50 files, so where they are rare, most of the catalog.
- project: `Catalog.scan_page` (the server's page for such filters): each page looks at no more than
  `--scan-rows` paths, and may come back short with a `next` to go on from.

Printed: the first page's time and the slowest page's while listing them all by `next`, each side;
and the time to list them all. Both sides must list the same files.

With `--postgres URL` (a server's URL; a database is made there for the run and dropped after), the
catalog is on PostgreSQL instead of SQLite.

Run: python -m benchmarks.bench_scan_page [--files 1000000] [--every 100000] [--scan-rows 100000] [--postgres URL]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

from benchmarks.bench_rewalk import postgres_databases
from indexer.catalog import Catalog, sqlite_url

PAGE = 50


def fill(catalog: Catalog, files: int, every: int) -> None:
    postgres = catalog.engine.dialect.name == "postgresql"
    numbers = (f"SELECT i FROM generate_series(1, {files}) i" if postgres else
               f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {files}) SELECT i FROM n")
    digest, blob = ("lpad(i::text, 64, '0')", "'\\x00'::bytea") if postgres else ("printf('%064d', i)", "x'00'")
    with catalog.engine.begin() as conn:
        conn.exec_driver_sql(f"INSERT INTO embeddings (id, content_hash, vectors, created_at) "
                             f"SELECT i, {digest}, {blob}, 0 FROM ({numbers}) AS n")
        conn.exec_driver_sql(
            "INSERT INTO files (path, size, mtime_ns, content_hash, status, embedding_id, updated_at) "
            "SELECT '/p/' || (10000000 + id) || '.jpg', 0, 1, content_hash, 'indexed', id, 0 FROM embeddings")
        conn.exec_driver_sql("INSERT INTO captions (embedding_id, caption, model, prompt, created_at) SELECT id, "
                             f"'a caption', 'm', '', 0 FROM embeddings WHERE mod(id, {every}) != {every // 2}")
    if postgres:  # as autovacuum would have by the time anyone lists: statistics and the visibility map
        with catalog.engine.connect() as conn:
            conn.connection.driver_connection.autocommit = True
            conn.exec_driver_sql("VACUUM ANALYZE")


def walk(next_page) -> tuple[list[str], float, float, int, float]:
    """(every path listed, first page's seconds, slowest page's seconds, pages, all pages' seconds)."""
    listed, times, after = [], [], None
    while True:
        began = time.perf_counter()
        rows, after = next_page(after)
        times.append(time.perf_counter() - began)
        listed += [row.path for row in rows]
        if after is None:
            return listed, times[0], max(times), len(times), sum(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--every", type=int, default=100_000, help="1 file in this many has no caption")
    parser.add_argument("--scan-rows", type=int, default=100_000, help="ServeConfig.page_scan_rows")
    parser.add_argument("--postgres", default=None, help="a PostgreSQL server's URL: the catalog goes there")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work, contextlib.ExitStack() as stack:
        url = sqlite_url(Path(work) / "catalog.sqlite")
        if args.postgres:
            [url] = stack.enter_context(postgres_databases(args.postgres, [f"bench_scan_page_{os.getpid()}"]))
        catalog = Catalog.open(url)
        fill(catalog, args.files, args.every)

        def baseline(after):
            _, rows = catalog.listing.page(0, PAGE, has_caption=False, after=after, count=False)
            return rows, (rows[-1].path if len(rows) == PAGE else None)

        def project(after):
            return catalog.listing.scan_page(PAGE, has_caption=False, after=after, scan_rows=args.scan_rows)

        results = {name: walk(side) for name, side in (("baseline", baseline), ("project", project))}
        catalog.close()
    assert results["project"][0] == results["baseline"][0]
    print(f"{args.files} files on {'PostgreSQL' if args.postgres else 'SQLite'}, {len(results['project'][0])} without a caption; pages of {PAGE}, "
          f"the project's reading at most {args.scan_rows} paths")
    for name, (_, first, slowest, pages, total) in results.items():
        print(f"  {name:8s}: first page {first * 1000:7.1f} ms, slowest {slowest * 1000:7.1f} ms, "
              f"{pages} pages in {total * 1000:7.1f} ms")
    base, proj = results["baseline"], results["project"]
    print(f"project / baseline: slowest page {proj[2] / base[2]:.3f}x, every page {proj[4] / base[4]:.3f}x")


if __name__ == "__main__":
    main()
