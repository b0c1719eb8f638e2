"""Would the server gain from batching concurrent searches into one model call? Measured per stage.

A re-ranked text search makes three model calls: the query's text encoding, the ViT on its 32
candidates (without the feature cache), and ITM on the 32 (text, image) pairs. For 8 concurrent
queries this times each stage as the server runs it now, one query at a time (the baseline), against
one batched call for all 8 (texts padded together; ViT and ITM over 8 x 32 inputs), and prints the
ratio. On the tiny checkpoint and on the shipped shapes model, on this machine's threads.

Run: python -m benchmarks.bench_query_batching [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.bench_search import best_of

QUERIES = 8
CANDIDATES = 32


def stage_times(name: str, repeats: int) -> dict[str, tuple[float, float]]:
    """stage -> (seconds one query at a time, seconds batched), each the best of `repeats`."""
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever

    retriever = Blip2Retriever.load(ModelConfig(name=name, device="cpu"))
    size = retriever.model.config.vision_config.image_size
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (QUERIES, CANDIDATES, 3, size, size), dtype=np.uint8)
    texts = [f"a small red circle above a large blue square, query {i}" for i in range(QUERIES)]
    vit = [retriever.vit_features(p) for p in pixels]
    all_vit = retriever.stack_vit_features([f for v in vit for f in v])
    paired = [t for t in texts for _ in range(CANDIDATES)]
    stages = {
        "text encoding": (lambda: [retriever.encode_texts([t]) for t in texts],
                          lambda: retriever.encode_texts(texts)),
        f"ViT on {CANDIDATES} candidates": (lambda: [retriever.vit_features(p) for p in pixels],
                                            lambda: retriever.vit_features(pixels.reshape(-1, 3, size, size))),
        f"ITM on {CANDIDATES} pairs": (lambda: [retriever.itm_logits(v, [t]) for v, t in zip(vit, texts)],
                                       lambda: retriever.itm_logits(all_vit, paired)),
    }
    for one_by_one, batched in stages.values():  # warm up
        one_by_one(), batched()
    return {stage: (best_of(one, repeats), best_of(batch, repeats)) for stage, (one, batch) in stages.items()}


def main() -> None:
    from retrieval.checkpoints import SHAPES_RETRIEVAL
    from retrieval.tiny import make_retrieval

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = {"tiny checkpoint": str(make_retrieval(Path(tmp) / "tiny")), "shapes model": str(SHAPES_RETRIEVAL)}
        for label, name in models.items():
            times = stage_times(name, args.repeats)
            total_one = sum(one for one, _ in times.values())
            total_batched = sum(batched for _, batched in times.values())
            print(f"{label}: {QUERIES} re-ranked queries' model calls, one query at a time vs batched")
            for stage, (one, batched) in times.items():
                print(f"  {stage:<24} {one * 1e3:8.1f} ms vs {batched * 1e3:8.1f} ms  ({one / batched:.2f}x)")
            print(f"  {'all three':<24} {total_one * 1e3:8.1f} ms vs {total_batched * 1e3:8.1f} ms  "
                  f"({total_one / total_batched:.2f}x)")


if __name__ == "__main__":
    main()
