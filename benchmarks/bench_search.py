"""Search benchmark, project vs baseline in one run (absolute times on shared machines are noise).

1. Exact max-sim top-10 over synthetic vectors (50,000 images x 32 x 256): `MaxSimIndex.search`
   (FAISS; the default fp16 codec with exact fp32 re-scoring, and the fp32 codec) against a plain
   numpy matmul + max over the same vectors; image-level recall must be 1.0.
2. ITM re-ranking of 32 candidate files (6 MP JPEGs) on a tiny checkpoint: blipsearch's re-ranker
   (draft-mode decoding, batched ViT and ITM; and with the fp16 feature cache warm) against opening
   each file and calling `Blip2ForImageTextRetrieval` pair by pair, as a naive re-ranker would.

Run: python -m benchmarks.bench_search [--images 50000]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def bench_maxsim(n_images: int, queries: int = 32, dim: int = 256, k: int = 10) -> None:
    from retrieval.index import MaxSimIndex

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n_images, queries, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    texts = rng.standard_normal((20, dim), dtype=np.float32)
    texts /= np.linalg.norm(texts, axis=-1, keepdims=True)
    flat = vectors.reshape(-1, dim)
    keys = np.arange(n_images)

    def exact(wanted):  # what the catalog supplies in blipsearch: fp32 vectors by key
        return wanted, vectors[wanted]

    def numpy_topk(text):
        scores = (flat @ text).reshape(n_images, queries).max(axis=1)
        top = np.argpartition(-scores, k)[:k]
        return top[np.argsort(-scores[top])]

    t_numpy = best_of(lambda: [numpy_topk(t) for t in texts], 3) / len(texts)
    print(f"max-sim top-{k}, {n_images} images x {queries} x {dim}: numpy matmul + max {t_numpy * 1e3:.1f} ms/query")
    for codec in ("flat-fp16", "flat-fp32"):
        index = MaxSimIndex(dim, queries, codec)
        index.add(keys, vectors)
        recall = np.mean([
            len(set(index.search(t, k, exact)[0].keys.tolist()) & set(numpy_topk(t).tolist())) / k for t in texts
        ])
        t_index = best_of(lambda index=index: [index.search(t, k, exact) for t in texts], 3) / len(texts)
        print(f"  MaxSimIndex {codec}: {t_index * 1e3:.1f} ms/query, numpy/faiss = {t_numpy / t_index:.2f}x, "
              f"recall@{k} = {recall:.3f}")
        del index


def bench_itm(candidates: int = 32) -> None:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval

    from benchmarks.photos import make_photos
    from indexer.decode import DecodeOptions, decode_file
    from indexer.features import FeatureCache
    from indexer.rerank import Reranker
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever
    from retrieval.tiny import make_retrieval

    text = "a red circle on a blue background"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_retrieval(f"{tmp}/model")
        retriever = Blip2Retriever.load(ModelConfig(name=str(model_dir), device="cpu"))
        reference = Blip2ForImageTextRetrieval.from_pretrained(str(model_dir)).eval()
        processor = AutoProcessor.from_pretrained(str(model_dir))
        paths = [str(p) for p in make_photos(f"{tmp}/photos", candidates, seed=3)]
        options = DecodeOptions(retriever.transform, max_pixels=1 << 40)
        files = {decode_file(p, options).content_hash: p for p in paths}
        cache = FeatureCache(f"{tmp}/features", max_bytes=10**9)
        Reranker(retriever, cache).score(files, [text], [1.0])  # warm the cache

        def pair_by_pair():
            out = []
            for path in paths:
                inputs = processor(images=Image.open(path).convert("RGB"), text=text, return_tensors="pt")
                with torch.no_grad():
                    logits = reference(**inputs, use_image_text_matching_head=True).logits_per_image
                out.append(torch.softmax(logits, 1)[0, 1].item())
            return np.asarray(out)

        def ours(reranker):
            matches = reranker.score(files, [text], [1.0]).matches
            return np.asarray([matches[h].probability for h in files])

        uncached, cached = Reranker(retriever), Reranker(retriever, cache)
        reference_scores = pair_by_pair()
        gap = max(np.abs(ours(uncached) - reference_scores).max(), np.abs(ours(cached) - reference_scores).max())
        t_ref = best_of(pair_by_pair, 2)
        t_uncached = best_of(lambda: ours(uncached), 3)
        t_cached = best_of(lambda: ours(cached), 3)
    print(f"ITM re-rank of {candidates} candidate 6 MP JPEGs (tiny checkpoint), pair by pair "
          f"{t_ref * 1e3:.0f} ms; max |probability difference| {gap:.1e} (draft decoding, fp16 cache)")
    print(f"  blipsearch, features recomputed: {t_uncached * 1e3:.0f} ms, speed-up = {t_ref / t_uncached:.1f}x")
    print(f"  blipsearch, feature cache:       {t_cached * 1e3:.0f} ms, speed-up = {t_ref / t_cached:.1f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=50_000)
    args = parser.parse_args()
    bench_maxsim(args.images)
    bench_itm()
