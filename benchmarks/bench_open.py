"""Opening an index for a search (`IndexStore.load_vectors(read_only=True)`, what every `blipsearch
search` and every server reload does first) on a catalog unchanged since the FAISS file was saved:
trusting the file's recorded vectors version (`vectors.json`) against the baseline of reconciling
it with the catalog, reading every embedding id from both, as every open did before. Both sides in
one run, on one index; best of 3 each. And the same before flat codes were memory-mapped
(`IO_FLAG_MMAP_IFC`): FAISS's IO_FLAG_MMAP alone still read a flat-fp16 file whole.

The index is built straight in the catalog (SQL, zero vectors of BLIP-2's real shape, 32 x 256
fp32 = 32 KB a row, as the real model's are stored), then its flat-fp16 FAISS file from it, as
`blipsearch index` would leave them. The FAISS file is memory-mapped on both sides, as searches map
files over 256 MB. And a writer's open (`load_vectors()`), which trusts the recorded version too
since the twenty-third session, against reconciling; it read the file into memory until the
twenty-fourth session, and maps a file of 64 MiB or more since (`retrieval/segments.py`).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from indexer.store import SYNCED_FILE, IndexStore, StoreConfig
from retrieval.loading import ModelIdentity

IDENTITY = ModelIdentity(name="bench", fingerprint="bench-open", embed_dim=256, num_queries=32)


def build(directory: Path, images: int) -> None:
    store = IndexStore.open(StoreConfig(directory), create=True)
    try:
        store.catalog.claim_model(IDENTITY)
        blob = IDENTITY.num_queries * IDENTITY.embed_dim * 4
        began = time.perf_counter()
        with store.catalog.engine.begin() as conn:
            conn.exec_driver_sql(
                f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {images}) "
                f"INSERT INTO embeddings (content_hash, vectors, created_at) "
                f"SELECT printf('%064d', i), zeroblob({blob}), 0 FROM n")
            conn.exec_driver_sql(  # a file per image, as an index run leaves them
                "INSERT INTO files (path, size, mtime_ns, content_hash, status, embedding_id, updated_at) "
                "SELECT '/photos/' || id || '.jpg', 1, 1, content_hash, 'indexed', id, 0 FROM embeddings")
        print(f"catalog: {images:,} images in {time.perf_counter() - began:.0f} s, "
              f"{(directory / 'catalog.sqlite').stat().st_size / 2**30:.1f} GiB")
        began = time.perf_counter()
        store.reconcile_and_save(store.load_vectors(IDENTITY), IDENTITY)
        print(f"FAISS file: built in {time.perf_counter() - began:.0f} s, "
              f"{store.vectors_path.stat().st_size / 2**30:.1f} GiB")
    finally:
        store.close()


def best_open(directory: Path, runs: int = 3, read_only: bool = True) -> float:
    best = float("inf")
    for _ in range(runs):
        store = IndexStore.open(StoreConfig(directory))
        try:
            began = time.perf_counter()
            index = store.load_vectors(IDENTITY, read_only=read_only)
            best = min(best, time.perf_counter() - began)
            assert index.ntotal == len(store.catalog.embedding_ids()) * IDENTITY.num_queries
        finally:
            store.close()
    return best


def best_open_unmapped(directory: Path) -> float:
    """As `best_open`, with flat codes read into memory as before (no IO_FLAG_MMAP_IFC)."""
    import faiss

    mapped, faiss.IO_FLAG_MMAP_IFC = faiss.IO_FLAG_MMAP_IFC, 0
    try:
        return best_open(directory)
    finally:
        faiss.IO_FLAG_MMAP_IFC = mapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (removed afterwards)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        build(workdir, args.images)
        synced = (workdir / SYNCED_FILE).read_bytes()
        trusted = best_open(workdir)
        writer_trusted = best_open(workdir, read_only=False)
        (workdir / SYNCED_FILE).unlink()  # as before: nothing recorded, so every open reconciles
        reconciled = best_open(workdir)
        writer_reconciled = best_open(workdir, read_only=False)
        before = best_open_unmapped(workdir)  # and the flat codes read, not mapped
        (workdir / SYNCED_FILE).write_bytes(synced)
        now = min(trusted, best_open(workdir))
        print(f"open for a search, {args.images:,} images (best of 3):\n"
              f"  before (codes read, ids reconciled): {before * 1000:7.0f} ms\n"
              f"  codes mapped, ids reconciled:        {reconciled * 1000:7.0f} ms\n"
              f"  codes mapped, version trusted:       {now * 1000:7.0f} ms  (best of 3, twice)\n"
              f"ratio: before / now {before / now:.1f}x; reconciled / trusted {reconciled / now:.1f}x\n"
              f"open for a writer (best of 3):\n"
              f"  ids reconciled:                      {writer_reconciled * 1000:7.0f} ms\n"
              f"  version trusted:                     {writer_trusted * 1000:7.0f} ms\n"
              f"ratio: reconciled / trusted {writer_reconciled / writer_trusted:.2f}x")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
