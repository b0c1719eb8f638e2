"""Path-filter benchmark, project vs baseline in one run: a text search limited by `--path` to a few
files of a large index (the candidate stage, before re-ranking), for three globs:

- a folder (`/bench/small/*`) and the same files by a glob with no literal start (`*/small/*`):
  the project finds them in the catalog and scores them exactly (`PREFILTER_FILES`);
- a glob matching more files than that, spread through the index (`*[0-4]7.jpg`, 1 in 20): the
  project reads the catalog until it has found too many, then widens FAISS's search as the baseline
  does; this is what the catalog read costs where it does not pay.

The baseline is the same searcher with `PREFILTER_FILES` 0: FAISS's search widened, doubling, until
enough of its results pass the filter (what every glob did before, and globs without a literal start
until the nineteenth session).

Synthetic vectors (no model): `--images` images in one folder and `--small` in another, written to a
real catalog and FAISS file; random unit queries. Both sides must return the same files and scores.

With `--postgres URL` (a server's URL; a database is made there for the run and dropped after), the
catalog is on PostgreSQL instead of SQLite.

Run: python -m benchmarks.bench_path_filter [--images 50000] [--small 50] [--postgres URL]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

Q, D = 32, 32


def build(directory: Path, images: int, small: int, catalog_url: str | None = None):
    from indexer.catalog import FileEntry
    from indexer.store import IndexStore, StoreConfig
    from retrieval.loading import ModelIdentity

    identity = ModelIdentity(name="synthetic", fingerprint="bench", embed_dim=D, num_queries=Q)
    store = IndexStore.open(StoreConfig(directory, catalog_url), create=True)
    store.catalog.claim_model(identity)
    vectors = store.load_vectors(identity)
    rng = np.random.default_rng(0)
    paths = [f"/bench/big/{i:07d}.jpg" for i in range(images)] + [f"/bench/small/{i:04d}.jpg" for i in range(small)]
    for start in range(0, len(paths), 5000):
        part = paths[start : start + 5000]
        new = rng.standard_normal((len(part), Q, D), dtype=np.float32)
        new /= np.linalg.norm(new, axis=-1, keepdims=True)
        digests = [f"{start + i:064x}" for i in range(len(part))]
        entries = [FileEntry(path=p, size=1, mtime_ns=1, content_hash=h, status="indexed", error=None, width=1,
                             height=1, format="JPEG") for p, h in zip(part, digests)]
        written = store.catalog.write_batch(entries, dict(zip(digests, new)))
        vectors.add(np.fromiter(written.created.values(), np.int64), np.stack([new[digests.index(h)] for h in written.created]))
    store.save_vectors(vectors)
    return store, identity


def main() -> None:
    from indexer import search
    from indexer.search import Searcher, SearchOptions

    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--small", type=int, default=50)
    parser.add_argument("--postgres", default=None, help="a PostgreSQL server's URL: the catalog goes there")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work, contextlib.ExitStack() as stack:
        url = None
        if args.postgres:
            from benchmarks.bench_rewalk import postgres_databases

            [url] = stack.enter_context(postgres_databases(args.postgres, [f"bench_path_filter_{os.getpid()}"]))
        store, identity = build(Path(work) / "idx", args.images, args.small, url)
        stack.callback(store.close)  # before its database is dropped
        searcher = Searcher(store, SimpleNamespace(identity=identity), reranker=object())
        rng = np.random.default_rng(1)
        queries = rng.standard_normal((20, D), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=-1, keepdims=True)
        shipped = search.PREFILTER_FILES
        print(f"{args.images + args.small} images ({Q} x {D}), catalog on {'PostgreSQL' if url else 'SQLite'}, "
              "top 10, 20 queries each; "
              "baseline: FAISS widened until enough pass")
        for glob in ["/bench/small/*", "*/small/*", "*[0-4]7.jpg"]:
            options = SearchOptions(k=10, rerank=False, score="itc", path_glob=glob)  # depth 10

            def run(prefilter_files: int):
                search.PREFILTER_FILES = prefilter_files
                began = time.perf_counter()
                found = [[(c.row.path, round(c.itc, 5)) for c in searcher._candidates(q, options, None)]
                         for q in queries]
                return (time.perf_counter() - began) / len(queries), found

            run(shipped)  # warm the catalog's pages and FAISS
            t_base, base = run(0)
            t_ours, ours = run(shipped)
            assert ours == base, "both sides must find the same files with the same scores"
            matching = len(store.catalog.listing.indexed_matching(glob, args.images + args.small) or [])
            print(f"  --path {glob!r:16} matching {matching:6}: baseline {t_base * 1e3:8.1f} ms/query, "
                  f"project {t_ours * 1e3:8.1f} ms/query, baseline / project = {t_base / t_ours:.2f}x; same results")


if __name__ == "__main__":
    main()
