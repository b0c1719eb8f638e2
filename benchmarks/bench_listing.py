"""Catalog listing benchmark (`GET /api/images`), project vs baseline in one run: one page of 50
files and its total, for each filter a client lists by, on a catalog of `--files` files of which 1 in
10,000 was skipped.

- project: what the server does now. Skipped files have an index of their own (schema 0004); a total
  by status alone comes from the counts the server keeps (`api.service.CachedCounts`: not counted
  per request, so not timed here), and other filters' totals are counted within 0.2 s, null past it.
- baseline: what it did before, on a copy of the same catalog without that index: every total
  counted in full, each page found through the index of every path.

Both sides must return the same page, and the same total wherever the project has one.

With `--postgres URL` (a server's URL; databases are made there for the run and dropped after), the
catalogs are on PostgreSQL instead of SQLite.

Run: python -m benchmarks.bench_listing [--files 1000000] [--postgres URL]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.bench_rewalk import postgres_databases

COUNT_WITHIN_S = 0.2  # api.service.ServeConfig.count_time_limit_s
LISTINGS = {  # label: (status, has_caption, path glob)
    "status=skipped": ("skipped", None, None),
    "status=indexed": ("indexed", None, None),
    "path=<folder>/*": (None, None, "/p/00007/*"),
    "path=*7.jpg": (None, None, "*7.jpg"),
    "has_caption=false": (None, False, None),
}


def fill(url: str, files: int) -> None:
    from indexer.catalog import Catalog

    catalog = Catalog.open(url)
    with catalog.engine.begin() as conn:
        conn.exec_driver_sql(
            f"WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {files - 1}) "
            "INSERT INTO files (path, size, mtime_ns, status, error, updated_at) "
            "SELECT '/p/' || substr(CAST(100000 + i / 1000 AS TEXT), 2) || '/' || (10000000 + i) || '.jpg', 0, 1, "
            "CASE WHEN i - i / 10000 * 10000 = 7 THEN 'skipped' ELSE 'indexed' END, "
            "CASE WHEN i - i / 10000 * 10000 = 7 THEN 'corrupt: x' END, 0 FROM n")
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("COMMIT")
            conn.exec_driver_sql("ANALYZE files")
    catalog.close()


def without_skipped_index(url: str) -> None:
    from sqlalchemy import create_engine

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_files_skipped_path")
    engine.dispose()


def timed(page, repeats: int = 5) -> tuple[float, tuple]:
    seconds, result = [], None
    for _ in range(repeats):
        began = time.perf_counter()
        result = page()
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds), result


def main() -> None:
    from indexer.catalog import Catalog

    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--postgres", default=None, help="a PostgreSQL server's URL: the catalogs go there")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work, contextlib.ExitStack() as stack:
        if args.postgres:
            names = [f"bench_listing_{side}_{os.getpid()}" for side in ("project", "baseline")]
            project_url, baseline_url = stack.enter_context(postgres_databases(args.postgres, names))
            fill(project_url, args.files)
            fill(baseline_url, args.files)
        else:
            project_url, baseline_url = f"sqlite:///{work}/project.sqlite", f"sqlite:///{work}/baseline.sqlite"
            fill(project_url, args.files)
            Path(f"{work}/baseline.sqlite").write_bytes(Path(f"{work}/project.sqlite").read_bytes())
        without_skipped_index(baseline_url)
        project, baseline = Catalog.open(project_url), Catalog.open(baseline_url)
        counts = project.counts()
        print(f"{args.files} files ({counts.get('skipped', 0)} skipped), catalog on "
              f"{'PostgreSQL' if args.postgres else 'SQLite'}; median of 5, one page of 50 and its total")
        print(f"{'listing':18s} {'baseline':>9s} {'project':>9s}  total  project / baseline")
        for label, (status, has_caption, glob) in LISTINGS.items():
            by_status_only = has_caption is None and glob is None
            base_s, (base_total, base_rows) = timed(lambda: baseline.page(0, 50, status, has_caption, glob))
            proj_s, (proj_total, proj_rows) = timed(lambda: project.page(
                0, 50, status, has_caption, glob, count=not by_status_only, count_within_s=COUNT_WITHIN_S))
            if by_status_only:
                proj_total = counts.get(status, 0)
            assert [r.path for r in proj_rows] == [r.path for r in base_rows], label
            assert proj_total in (None, base_total), (label, proj_total, base_total)
            shown = "null" if proj_total is None else "same"
            print(f"{label:18s} {base_s * 1000:7.1f} ms {proj_s * 1000:6.1f} ms  {shown:5s}  {proj_s / base_s:.3f}x")
        project.close()
        baseline.close()


if __name__ == "__main__":
    main()
