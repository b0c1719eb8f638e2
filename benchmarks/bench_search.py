"""Search benchmark, project vs baseline in one run (absolute times on shared machines are noise).

1. Exact max-sim top-10 over synthetic vectors (50,000 images x 32 x 256): `MaxSimIndex.search`
   (FAISS) against a plain numpy matmul + max over the same vectors; image-level recall must be 1.0.
2. ITM re-ranking of 32 candidates on a tiny checkpoint: blipsearch's batched ITM on ViT features
   against calling `Blip2ForImageTextRetrieval` pair by pair (which re-runs the ViT every time).

Run: python benchmarks/bench_search.py [--images 50000]
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
    index = MaxSimIndex(dim, queries)
    index.add(np.arange(n_images), vectors)
    flat = vectors.reshape(-1, dim)

    def numpy_topk(text):
        scores = (flat @ text).reshape(n_images, queries).max(axis=1)
        top = np.argpartition(-scores, k)[:k]
        return top[np.argsort(-scores[top])]

    recall = np.mean([
        len(set(index.search(t[None], k)[0].keys.tolist()) & set(numpy_topk(t).tolist())) / k for t in texts
    ])
    t_faiss = best_of(lambda: [index.search(t[None], k) for t in texts], 3) / len(texts)
    t_numpy = best_of(lambda: [numpy_topk(t) for t in texts], 3) / len(texts)
    print(f"max-sim top-{k}, {n_images} images x {queries} x {dim}: faiss {t_faiss * 1e3:.1f} ms/query, "
          f"numpy {t_numpy * 1e3:.1f} ms/query, numpy/faiss = {t_numpy / t_faiss:.2f}x, recall@{k} = {recall:.3f}")


def bench_itm(candidates: int = 32) -> None:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval

    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever
    from retrieval.tiny import make_retrieval

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_retrieval(f"{tmp}/model")
        retriever = Blip2Retriever.load(ModelConfig(name=str(model_dir), device="cpu"))
        reference = Blip2ForImageTextRetrieval.from_pretrained(str(model_dir)).eval()
        processor = AutoProcessor.from_pretrained(str(model_dir))
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)) for _ in range(candidates)]
    text = "a red circle on a blue background"

    def ours():
        pixels = np.stack([retriever.transform(im) for im in images])
        return retriever.itm_probabilities(retriever.vit_features(pixels), [text])

    def pair_by_pair():
        out = []
        for im in images:
            inputs = processor(images=im, text=text, return_tensors="pt")
            with torch.no_grad():
                logits = reference(**inputs, use_image_text_matching_head=True).logits_per_image
            out.append(torch.softmax(logits, 1)[0, 1].item())
        return np.asarray(out)

    assert np.allclose(ours(), pair_by_pair(), atol=1e-5)
    t_ours, t_ref = best_of(ours, 3), best_of(pair_by_pair, 3)
    print(f"ITM re-rank of {candidates} candidates (tiny checkpoint): blipsearch {t_ours * 1e3:.0f} ms, "
          f"pair by pair {t_ref * 1e3:.0f} ms, speed-up = {t_ref / t_ours:.1f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=50_000)
    args = parser.parse_args()
    bench_maxsim(args.images)
    bench_itm()
