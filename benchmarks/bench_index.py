"""Indexing benchmark, project vs baseline in one run: images/s of the whole `blipsearch index`
process against a naive loop (`naive_index.py`, also a whole process) on photo-sized JPEGs.

Run: python -m benchmarks.bench_index [--images 1000] [--megapixels 6] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def timed(command: list[str]) -> tuple[float, str]:
    began = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    return time.perf_counter() - began, done.stdout


def main() -> None:
    from benchmarks.photos import make_photos
    from retrieval.tiny import make_retrieval

    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--megapixels", type=float, default=6.0)
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each side, alternated; each side's best time counts (shared machines are noisy)")
    args = parser.parse_args()
    width = int((args.megapixels * 1e6 * 1.5) ** 0.5)
    size = (width, int(width / 1.5))
    naive_times, our_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        model = make_retrieval(Path(tmp) / "model")
        paths = make_photos(Path(tmp) / "photos", args.images, size=size, seed=11)
        megabytes = sum(p.stat().st_size for p in paths) / 1e6
        for run in range(args.repeats):
            naive_s, _ = timed([sys.executable, "-m", "benchmarks.naive_index", str(model), f"{tmp}/naive.npy",
                                *map(str, paths)])
            shutil.rmtree(f"{tmp}/idx", ignore_errors=True)
            ours_s, out = timed([sys.executable, "-m", "api.cli", "index", f"{tmp}/photos", "--index", f"{tmp}/idx",
                                 "--model", str(model), "--json", "-q"])
            summary = json.loads(out)
            assert summary["indexed"] == args.images, summary
            naive_times.append(naive_s)
            our_times.append(ours_s)
            print(f"  run {run + 1}: naive {naive_s:.1f} s, blipsearch {ours_s:.1f} s "
                  f"(model {summary['seconds'].get('model', 0):.1f} s, waiting for decoders "
                  f"{summary['seconds'].get('decode_wait', 0):.1f} s), ratio {naive_s / ours_s:.2f}x", flush=True)
        check_vectors(Path(tmp), paths, model)
    naive_s, ours_s = min(naive_times), min(our_times)
    print(f"{args.images} JPEGs of {size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.1f} MP, {megabytes:.0f} MB), "
          f"tiny checkpoint, whole processes, best of {args.repeats} alternated runs each:")
    print(f"  naive loop:       {naive_s:6.1f} s, {args.images / naive_s:6.1f} images/s")
    print(f"  blipsearch index: {ours_s:6.1f} s, {args.images / ours_s:6.1f} images/s")
    print(f"  speed-up = {naive_s / ours_s:.1f}x")


def check_vectors(tmp: Path, paths: list[Path], model: Path) -> None:
    """Both computed the same thing: draft-decoded vectors stay close to the naive full decode's."""
    from indexer.store import IndexStore, StoreConfig

    naive = np.load(tmp / "naive.npy")
    store = IndexStore.open(StoreConfig(tmp / "idx"))
    try:
        rows = {row.path: row for row in store.catalog.files()}
        ids = [rows[str(p)].embedding_id for p in paths]
        found, vectors = store.catalog.vectors(ids, naive.shape[1], naive.shape[2])
        by_id = dict(zip(found.tolist(), vectors))
        ours = np.stack([by_id[i] for i in ids])
    finally:
        store.close()
    cosine = (ours * naive).sum(-1)
    print(f"  vectors vs naive: mean cosine {cosine.mean():.4f}, min {cosine.min():.4f}")


if __name__ == "__main__":
    main()
