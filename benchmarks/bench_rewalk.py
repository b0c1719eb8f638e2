"""Re-walk benchmark, project vs baseline in one run: memory and time of comparing a folder of N files
with an index's catalog, the step every `blipsearch index` run begins with.

- project: `compare.Comparison`, the walk and the catalog as two sorted streams;
- baseline: what `index` did before, and what a plain implementation does: every walked file in a
  dict, every catalog row under the roots in a dict, then the files to do and the gone ones.

Two cases: a re-run with nothing changed (a nightly cron over a large library), and a first run where
all N files are new (the project's counting pass and its second, streaming pass, against the baseline's
one list). Each side runs in its own process; the memory is its peak resident size above what it held
once imports were done. The files are empty, the catalog rows made directly: no model is involved.

With `--postgres URL` (a server's URL; two databases are made there for the run and dropped after),
both sides read a PostgreSQL catalog instead of SQLite, one that PostgreSQL has not analysed: as just
after a first large run, before autovacuum comes round, when the planner knows least.

Run: python -m benchmarks.bench_rewalk [--files 200000] [--postgres postgresql+psycopg://postgres@127.0.0.1/test]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_folder(root: Path, files: int, per_folder: int = 1000) -> None:
    for start in range(0, files, per_folder):
        folder = root / f"f{start // per_folder:05d}"
        folder.mkdir(parents=True)
        for i in range(start, min(start + per_folder, files)):
            (folder / f"img{i:08d}.jpg").touch()


def fill_catalog(url: str, root: Path) -> None:
    from indexer.catalog import Catalog, FileEntry
    from indexer.walk import Noticed, WalkOptions, walk_sorted

    catalog = Catalog.open(url)
    batch = []
    for found in walk_sorted([str(root)], WalkOptions(), Noticed()):
        batch.append(FileEntry(path=found.path, size=found.size, mtime_ns=found.mtime_ns, content_hash=None,
                               status="skipped", error="corrupt: not an image", width=None, height=None, format=None))
        if len(batch) == 20_000:
            catalog.write_batch(batch, {})
            batch = []
    catalog.write_batch(batch, {})
    catalog.close()


def without_autovacuum(url: str) -> None:
    from indexer.catalog import Catalog

    catalog = Catalog.open(url)  # the schema
    with catalog.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE files SET (autovacuum_enabled = false)")
    catalog.close()


def status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def reset_peak() -> None:
    """Linux: make the peak resident size (VmHWM) the current one, so imports' peak does not count."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def side(name: str, url: str, root: str) -> dict:
    """One side, in this process: (files to do, gone, seconds, peak MB above the start)."""
    from sqlalchemy import or_, select

    from indexer import schema
    from indexer.catalog import Catalog, FileRow, _under
    from indexer.compare import Comparison, files_to_do, unchanged
    from indexer.walk import Noticed, WalkOptions, walk_sorted

    catalog = Catalog.open(url)
    reset_peak()
    before = status_kb("VmRSS")
    began = time.perf_counter()
    if name == "project":  # as `Indexer.run`: the files to do are streamed to the decoders, not kept
        comparison, todo, total = files_to_do(Comparison(catalog, [root], WalkOptions()),
                                              lambda: Comparison(catalog, [root], WalkOptions()))
        todo_count = sum(1 for _ in todo)
        assert todo_count == total
        gone_count = len(comparison.gone)
    else:
        found = {f.path: f for f in walk_sorted([root], WalkOptions(), Noticed())}
        with catalog.engine.connect() as conn:  # what Catalog.files_under did: every row under the root
            query = select(schema.files).where(or_(schema.files.c.path == root, _under(root)))
            known = {row.path: FileRow(**row._mapping) for row in conn.execute(query)}
        todo = [f for path, f in found.items() if not unchanged(f, known.get(path))]
        gone = [path for path in known if path not in found]
        todo_count, gone_count = len(todo), len(gone)
    seconds = time.perf_counter() - began
    peak_mb = (status_kb("VmHWM") - before) / 1024
    catalog.close()
    return {"todo": todo_count, "gone": gone_count, "seconds": seconds, "peak_mb": peak_mb}


def measure(name: str, url: str, root: Path) -> dict:
    code = f"import json, benchmarks.bench_rewalk as b; print(json.dumps(b.side({name!r}, {url!r}, {str(root)!r})))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@contextlib.contextmanager
def postgres_databases(server_url: str, names: list[str]):
    """URLs of new databases `names` on the server at `server_url`, dropped afterwards."""
    import psycopg

    admin = psycopg.connect(server_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
    base = server_url.rsplit("/", 1)[0]
    try:
        for name in names:
            admin.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8'")
        yield [f"{base}/{name}" for name in names]
    finally:
        for name in names:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--postgres", default=None, help="a PostgreSQL server's URL: the catalogs go there")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work, contextlib.ExitStack() as stack:
        root = Path(work) / "photos"
        make_folder(root, args.files)
        if args.postgres:
            names = [f"bench_rewalk_{kind}_{os.getpid()}" for kind in ("empty", "full")]
            empty, full = stack.enter_context(postgres_databases(args.postgres, names))
        else:
            empty, full = f"sqlite:///{work}/empty.sqlite", f"sqlite:///{work}/full.sqlite"
        cases = {"first run (all new)": empty, "re-run (nothing changed)": full}
        if args.postgres:  # no statistics, as in a catalog just filled (the planner's worst case), and
            for url in (empty, full):  # no autovacuum starting during a side, at random
                without_autovacuum(url)
        fill_catalog(full, root)
        print(f"{args.files} files, catalog on {'PostgreSQL' if args.postgres else 'SQLite'}; each side in its own process")
        for case, url in cases.items():
            baseline, project = measure("baseline", url, root), measure("project", url, root)
            assert (project["todo"], project["gone"]) == (baseline["todo"], baseline["gone"]), (project, baseline)
            print(f"{case}: {project['todo']} to do")
            for label, result in (("baseline", baseline), ("project", project)):
                print(f"  {label:8s} {result['seconds']:7.2f} s  peak {result['peak_mb']:7.1f} MB")
            print(f"  memory: baseline / project = {baseline['peak_mb'] / max(project['peak_mb'], 0.1):.1f}x; "
                  f"time: project / baseline = {project['seconds'] / baseline['seconds']:.2f}x")


if __name__ == "__main__":
    main()
