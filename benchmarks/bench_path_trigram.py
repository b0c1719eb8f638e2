"""`--path` globs that do not start with a folder, on PostgreSQL: project (schema 0006's pg_trgm index
of the paths) vs baseline (the same catalog without that index), in one run.

Two databases on the server are filled alike with `--files` paths ('/photos/2003/17/IMG_00123456.jpg':
20 years, 100 folders each, one name per file). For each glob, the median of 5 of:
- search's prefilter (`FileListing.indexed_matching`, at most 2,000 files: `search.PREFILTER_FILES`),
- one page of 50 files and its total counted within 0.2 s (`GET /api/images?path=`).
Both sides must return the same files and the same total wherever the project has one.

Run: python -m benchmarks.bench_path_trigram [--files 1000000] [--postgres URL]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

from benchmarks.bench_listing import timed  # median of 5, and the last result
from benchmarks.bench_rewalk import postgres_databases

COUNT_WITHIN_S = 0.2  # api.service.ServeConfig.count_time_limit_s
PREFILTER_FILES = 2000  # indexer.search.PREFILTER_FILES
GLOBS = {  # label: glob
    "a file's name": "*IMG_00012345*",
    "ten names": "*IMG_0001234?.jpg",
    "a class": "*IMG_00012[0-4]45*",
    "a folder anywhere": "*/2007/42/*",
    "most files": "*.jpg",
}


def fill(url: str, files: int) -> None:
    from indexer.catalog import Catalog

    catalog = Catalog.open(url)
    with catalog.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO files (path, size, mtime_ns, status, updated_at) "
            "SELECT '/photos/' || (2000 + mod(i, 20)) || '/' || lpad(mod(i / 20, 100)::text, 2, '0') || '/IMG_' "
            f"|| lpad(i::text, 8, '0') || '.jpg', 1, 1, 'indexed', 0 FROM generate_series(0, {files - 1}) i")
    with catalog.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE files")  # as autovacuum would after a large run
    catalog.close()


def main() -> None:
    from sqlalchemy import create_engine

    from indexer.catalog import Catalog

    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--postgres", default=os.environ.get(
        "BLIPSEARCH_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    args = parser.parse_args()
    names = [f"bench_trigram_{side}_{os.getpid()}" for side in ("project", "baseline")]
    with contextlib.ExitStack() as stack:
        project_url, baseline_url = stack.enter_context(postgres_databases(args.postgres, names))
        for url in (project_url, baseline_url):
            began = time.perf_counter()
            fill(url, args.files)
            print(f"filled {url.rsplit('/', 1)[1]} in {time.perf_counter() - began:.1f} s")
        engine = create_engine(baseline_url)
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP INDEX ix_files_path_trgm")
            size = conn.exec_driver_sql("SELECT pg_relation_size('files')").scalar_one()
        engine.dispose()
        project, baseline = Catalog.open(project_url), Catalog.open(baseline_url)
        with project.engine.connect() as conn:
            index_bytes = conn.exec_driver_sql("SELECT pg_relation_size('ix_files_path_trgm')").scalar_one()
        print(f"{args.files:,} paths on PostgreSQL; the table {size / 2**20:.0f} MiB, the trigram index "
              f"{index_bytes / 2**20:.0f} MiB; median of 5")
        print(f"{'glob':32s} {'what':10s} {'baseline':>10s} {'project':>10s}  baseline / project")
        for label, glob in GLOBS.items():
            base_s, base = timed(lambda: baseline.listing.indexed_matching(glob, PREFILTER_FILES))
            proj_s, proj = timed(lambda: project.listing.indexed_matching(glob, PREFILTER_FILES))
            assert (base is None) == (proj is None) and sorted(r.path for r in base or []) == \
                sorted(r.path for r in proj or []), label
            print(f"{label + ' ' + glob:32s} {'prefilter':10s} {base_s * 1e3:7.1f} ms {proj_s * 1e3:7.1f} ms  "
                  f"{base_s / proj_s:6.1f}x")
            base_s, (base_total, base_rows) = timed(lambda: baseline.listing.page(
                0, 50, path_glob=glob, count_within_s=COUNT_WITHIN_S))
            proj_s, (proj_total, proj_rows) = timed(lambda: project.listing.page(
                0, 50, path_glob=glob, count_within_s=COUNT_WITHIN_S))
            assert [r.path for r in proj_rows] == [r.path for r in base_rows], label
            assert proj_total is None or base_total is None or proj_total == base_total, label
            totals = f"totals {base_total} / {proj_total}"
            print(f"{'':32s} {'page':10s} {base_s * 1e3:7.1f} ms {proj_s * 1e3:7.1f} ms  {base_s / proj_s:6.1f}x  {totals}")
        project.close()
        baseline.close()


if __name__ == "__main__":
    main()
