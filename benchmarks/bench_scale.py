"""Scale benchmark: an approximate index against exact search over the same collection, in one run.

A million synthetic images (32 x 256-d unit vectors each, 32 M vectors) are written once as fp16 to
a memory-mapped file, which stands in for the catalog's stored vectors. Then, in one run:

- the approximate index (default `ivf-pq:nlist=4096,m=64`: 72 bytes per vector with its id) is built through `MaxSimIndex.rebuild`,
  the path `blipsearch index` takes: build time, bytes per image (the saved FAISS file);
- exact search, blipsearch's `flat-fp16` kind with exact re-scoring, runs shard by shard (the whole
  flat index, 16 GB, does not fit here beside the rest): the top 10 of the shards' top 10s is the
  exact top 10, and an exact query's latency is the sum of its shards' latencies, since a flat
  index is a linear scan;
- each query is searched one at a time on both; image-level recall@10 is measured against the
  exact top 10, and the latency ratio printed, for several `nprobe` and `rescore` values (`rescore`:
  images re-scored exactly per image asked, read from the stored vectors).

The vectors mimic BLIP-2's: an image's 32 vectors share its topic(s) and its own direction, each
query slot has a direction of its own, and a text query points at a topic and an image's direction.

Run: python -m benchmarks.bench_scale [--images 1000000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

Q, D, K = 32, 256, 10
TOPICS = 1000
CHUNK = 20_000  # images generated (and added) at a time


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def basis(seed: int):
    rng = np.random.default_rng(seed)
    return unit(rng.standard_normal((TOPICS, D), dtype=np.float32)), unit(rng.standard_normal((Q, D), dtype=np.float32))


def image_traits(rng, count: int):
    """Each image's two topics and its own direction: drawn first, so queries can redraw them alone."""
    first, second = rng.integers(0, TOPICS, count), rng.integers(0, TOPICS, count)
    return first, second, unit(rng.standard_normal((count, D), dtype=np.float32))


def image_chunk(seed: int, start: int, count: int) -> np.ndarray:
    """(count, Q, D) unit vectors for images start..start+count."""
    topics, slots = basis(seed)
    rng = np.random.default_rng([seed, start])
    first, second, own = image_traits(rng, count)
    topic = np.where((np.arange(Q) < Q // 2)[None, :, None], topics[first][:, None], topics[second][:, None])
    noise = rng.standard_normal((count, Q, D), dtype=np.float32) / np.sqrt(D)  # about unit length
    return unit(0.6 * topic + 0.25 * slots[None] + 0.5 * own[:, None] + 0.35 * noise).astype(np.float32)


def dataset(workdir: Path, images: int, seed: int):
    """The memory-mapped fp16 vectors (made once) and 200 text queries about random images."""
    path = workdir / f"vectors-{images}-{seed}.f16"
    done = path.with_suffix(".done")
    if not done.exists():
        began = time.perf_counter()
        store = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(images, Q, D))
        for start in range(0, images, CHUNK):
            store[start : start + CHUNK] = image_chunk(seed, start, min(CHUNK, images - start))
        store.flush()
        del store
        done.write_text(f"{time.perf_counter() - began:.0f} s")
    vectors = np.load(path, mmap_mode="r")
    rng = np.random.default_rng(seed + 1)
    topics, _ = basis(seed)
    queries = []
    for image in rng.choice(images, 200, replace=False):
        start = image // CHUNK * CHUNK
        first, _, own = image_traits(np.random.default_rng([seed, start]), min(CHUNK, images - start))
        offset = image - start
        queries.append(unit(0.7 * topics[first[offset]] + 0.7 * own[offset] + 0.4 * unit(rng.standard_normal(D))))
    return vectors, np.asarray(queries, np.float32)


def exact_source(vectors):
    def exact(keys):
        keys = np.asarray(keys, np.int64)
        order = np.argsort(keys)  # sorted reads of the mapped file
        out = np.empty((len(keys), Q, D), np.float32)
        out[order] = vectors[keys[order]]
        return keys, out

    return exact


def chunks_of(vectors, start: int, stop: int):
    def chunks():
        for begin in range(start, stop, CHUNK):
            end = min(begin + CHUNK, stop)
            yield np.arange(begin, end, dtype=np.int64), np.asarray(vectors[begin:end], np.float32)

    return chunks


def build_approximate(vectors, spec: str, workdir: Path):
    from retrieval.index import MaxSimIndex

    images = len(vectors)
    index = MaxSimIndex(D, Q, spec)
    began = time.perf_counter()
    rng = np.random.default_rng(7)
    want = index.train_size(index.spec, images * Q)
    sample_images = np.sort(rng.choice(images, min(images, -(-want // Q)), replace=False))
    sample = np.asarray(vectors[sample_images], np.float32).reshape(-1, D)[rng.permutation(len(sample_images) * Q)[:want]]
    index.rebuild(chunks_of(vectors, 0, images), images * Q, sample)
    seconds = time.perf_counter() - began
    path = workdir / "approximate.faiss"
    index.save(path)
    return index, seconds, path.stat().st_size


def exact_search(vectors, queries, shard_images: int, timed: int):
    """Exact top-K per query over all images, shard by shard; per-query latency of the first `timed` queries."""
    from retrieval.index import MaxSimIndex

    images, exact = len(vectors), exact_source(vectors)
    best: list[list[tuple[float, int]]] = [[] for _ in queries]
    latency = np.zeros(timed)
    for start in range(0, images, shard_images):
        stop = min(start + shard_images, images)
        shard = MaxSimIndex(D, Q, "flat-fp16")
        for keys, chunk in chunks_of(vectors, start, stop)():
            shard.add(keys, chunk)
        for i, query in enumerate(queries):
            began = time.perf_counter()
            hits = shard.search(query, K, exact)[0]
            if i < timed:
                latency[i] += time.perf_counter() - began
            best[i].extend(zip(hits.scores.tolist(), hits.keys.tolist()))
        del shard
    truth = [[key for _, key in sorted(found, key=lambda sk: (-sk[0], sk[1]))[:K]] for found in best]
    return truth, latency


def numpy_top(vectors, query) -> list[int]:
    """Brute force over the mapped file, to check the shard-by-shard exact search on one query."""
    scores = np.concatenate([(np.asarray(vectors[s : s + CHUNK], np.float32) @ query).max(axis=1)
                             for s in range(0, len(vectors), CHUNK)])
    return np.lexsort((np.arange(len(scores)), -scores))[:K].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--spec", default="ivf-pq:nlist=4096,m=64")
    parser.add_argument("--nprobe", default="16,64")
    parser.add_argument("--rescore", default="8,16,32,64", help="images re-scored exactly per image asked")
    parser.add_argument("--shard-images", type=int, default=125_000)
    parser.add_argument("--timed-queries", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "blipsearch-scale")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    import faiss
    from dataclasses import replace

    began = time.perf_counter()
    vectors, queries = dataset(args.workdir, args.images, args.seed)
    print(f"{args.images:,} images x {Q} x {D} ({len(vectors) * Q:,} vectors), fp16 file ready in "
          f"{time.perf_counter() - began:.0f} s; {faiss.omp_get_max_threads()} threads", flush=True)

    index, build_s, file_bytes = build_approximate(vectors, args.spec, args.workdir)
    print(f"{index.spec}: built (train + add) in {build_s:.0f} s, {file_bytes / args.images:.0f} bytes per image "
          f"({file_bytes / 2**30:.2f} GiB file)", flush=True)

    truth, exact_latency = exact_search(vectors, queries, args.shard_images, args.timed_queries)
    for i in range(2):
        assert numpy_top(vectors, queries[i]) == truth[i], "shard-by-shard exact search disagrees with numpy"
    exact_ms = exact_latency.mean() * 1e3
    print(f"exact flat-fp16: {exact_ms:.0f} ms per query (sum over shards of {args.shard_images:,} images); "
          f"checked against numpy brute force on 2 queries", flush=True)

    exact = exact_source(vectors)
    rows = []
    settings = [(int(n), int(r)) for n in args.nprobe.split(",") for r in args.rescore.split(",")]
    for nprobe, rescore in settings:
        index.spec = replace(index.spec, nprobe=nprobe, rescore=rescore)
        recalls, times = [], []
        for query, wanted in zip(queries, truth):
            start = time.perf_counter()
            hits = index.search(query, K, exact)[0]
            times.append(time.perf_counter() - start)
            recalls.append(len(set(hits.keys.tolist()) & set(wanted)) / K)
        ms = float(np.mean(times)) * 1e3
        rows.append({"nprobe": nprobe, "rescore": rescore, "recall@10": float(np.mean(recalls)), "ms_per_query": ms,
                     "speedup": exact_ms / ms})
        print(f"  nprobe {nprobe:4d}, rescore {rescore:3d}: recall@10 {np.mean(recalls):.3f}, {ms:7.1f} ms per query, "
              f"{exact_ms / ms:6.1f}x faster than exact", flush=True)
    meeting = [r for r in rows if r["recall@10"] >= 0.95]
    best = max(meeting, key=lambda r: r["speedup"]) if meeting else None
    verdict = (f"target met at nprobe {best['nprobe']}, rescore {best['rescore']}: recall@10 {best['recall@10']:.3f}, "
               f"{best['speedup']:.1f}x"
               if best and best["speedup"] >= 10 and file_bytes / args.images <= 4096 else "target NOT met")
    print(f"ratio: {verdict} (targets: recall@10 >= 0.95, >= 10x lower latency, <= 4096 bytes per image)")
    print(json.dumps({"images": args.images, "spec": args.spec, "build_s": build_s,
                      "bytes_per_image": file_bytes / args.images, "exact_ms": exact_ms, "rows": rows}))


if __name__ == "__main__":
    main()
