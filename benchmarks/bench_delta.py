"""A writer's small change to a large flat-fp16 FAISS file: adding 100 images and removing 10, then
saving, as `index` does at its end. Baseline: the code before (`MaxSimIndex`: read the whole file
into memory, change it, write it whole again and fsync). Project: `SegmentedIndex` (map the file,
keep the change in a delta, write the delta file alone). Each in a fresh process on its own copy of
the same file, best of 3: time, bytes written, and the resident memory the step added. Both leave
indexes that return the same images for the same queries (asserted), and a search's open of each
is timed too (fresh process, best of 3), since a delta is one more file to read and search.
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

Q, D = 32, 256
ADDED, REMOVED = 100, 10


def unit_vectors(rng, images: int) -> np.ndarray:
    vectors = rng.standard_normal((images, Q, D), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def build(path: Path, images: int) -> None:
    from retrieval.index import MaxSimIndex

    index, rng = MaxSimIndex(D, Q, "flat-fp16"), np.random.default_rng(0)
    for start in range(0, images, 5000):
        keys = np.arange(start, min(images, start + 5000), dtype=np.int64)
        index.add(keys, unit_vectors(rng, len(keys)))
    index.save(path)


def resident() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def change_once(path: Path, how: str, images: int) -> dict:
    """In a fresh process: the writer's step on the file at `path`, as `how` ("before", "now") does it."""
    from retrieval.index import MaxSimIndex
    from retrieval.segments import DeltaPolicy, SegmentedIndex, delta_path

    added_keys = np.arange(images, images + ADDED, dtype=np.int64)
    added = unit_vectors(np.random.default_rng(1), ADDED)
    removed = np.arange(0, REMOVED * 97, 97, dtype=np.int64)
    start_memory, began = resident(), time.perf_counter()
    if how == "before":
        index = MaxSimIndex.load(path, D, Q, "flat-fp16")
    else:
        index = SegmentedIndex.load(path, D, Q, "flat-fp16", mmap=True)
    index.add(added_keys, added)
    assert index.remove(removed) == REMOVED
    mtime = path.stat().st_mtime_ns
    if how == "before":
        index.save(path)
    else:
        assert index.save(path, DeltaPolicy()) is False  # the delta alone
    seconds = time.perf_counter() - began
    written = path.stat().st_size if path.stat().st_mtime_ns != mtime else 0
    if delta_path(path).exists():
        written += delta_path(path).stat().st_size
    return {"seconds": seconds, "added_bytes": resident() - start_memory, "written": written}


def search_once(path: Path) -> dict:
    """In a fresh process: a search's open (mapped) and three searches of the file at `path`."""
    from retrieval.segments import SegmentedIndex

    began = time.perf_counter()
    index = SegmentedIndex.load(path, D, Q, "flat-fp16", mmap=True)
    queries = np.random.default_rng(2).standard_normal((3, D), dtype=np.float32)
    top = [index.search(q / np.linalg.norm(q), 10)[0].keys.tolist() for q in queries]
    return {"seconds": time.perf_counter() - began, "top": top}


def in_fresh_process(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_delta", *args],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def best_of(runs: list[dict]) -> dict:
    best = min(runs, key=lambda r: r["seconds"])
    return {**best, "added_bytes": min(r.get("added_bytes", 0) for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (removed afterwards)")
    parser.add_argument("--change", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--search", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--how", choices=("before", "now"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.change:
        print(json.dumps(change_once(args.change, args.how, args.images)))
        return
    if args.search:
        print(json.dumps(search_once(args.search)))
        return
    workdir = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        began = time.perf_counter()
        original = workdir / "original.faiss"
        build(original, args.images)
        print(f"flat-fp16 file: {args.images:,} images, {original.stat().st_size / 2**30:.2f} GiB, "
              f"built in {time.perf_counter() - began:.0f} s; the change: {ADDED} images added, {REMOVED} removed")
        results, searches = {}, {}
        for how in ("before", "now"):
            runs, finds = [], []
            for attempt in range(3):
                folder = workdir / f"{how}{attempt}"
                folder.mkdir()
                shutil.copyfile(original, folder / "vectors.faiss")
                runs.append(in_fresh_process("--change", str(folder / "vectors.faiss"), "--how", how,
                                             "--images", str(args.images)))
                finds.append(in_fresh_process("--search", str(folder / "vectors.faiss")))
                shutil.rmtree(folder)
            results[how], searches[how] = best_of(runs), best_of(finds)
        assert searches["before"]["top"] == searches["now"]["top"]
        print("a writer's change and save (fresh process each, best of 3):")
        for how, name in (("before", "before (whole file)"), ("now", "now (delta)")):
            result = results[how]
            print(f"  {name:20s} {result['seconds'] * 1000:7.0f} ms  wrote {result['written'] / 2**20:7.1f} MiB  "
                  f"+{result['added_bytes'] / 2**20:5.0f} MiB resident   "
                  f"then a search's open and 3 searches: {searches[how]['seconds'] * 1000:5.0f} ms")
        before, now = results["before"], results["now"]
        print(f"ratio before / now: time {before['seconds'] / now['seconds']:.1f}x, "
              f"bytes written {before['written'] / now['written']:.0f}x, "
              f"search open and searches {searches['before']['seconds'] / searches['now']['seconds']:.2f}x")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
