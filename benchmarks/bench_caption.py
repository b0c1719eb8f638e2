"""Captioning benchmark, batched against one by one in the same run, on a tiny checkpoint.

blipsearch: its captioner on batches of 16 images (preprocessing included). Baseline: the checkpoint's
processor and `Blip2ForConditionalGeneration.generate` one image at a time. Both greedy, 20 new tokens.

Run: python -m benchmarks.bench_caption [--images 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def main() -> None:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    from retrieval.captioner import Blip2Captioner, CaptionOptions
    from retrieval.config import ModelConfig
    from retrieval.tiny import make_captioner

    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    options = CaptionOptions(max_new_tokens=20)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)) for _ in range(args.images)]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_captioner(f"{tmp}/captioner")
        captioner = Blip2Captioner.load(ModelConfig(name=str(model_dir), device="cpu"))
        model = Blip2ForConditionalGeneration.from_pretrained(str(model_dir)).eval()
        processor = AutoProcessor.from_pretrained(str(model_dir))

    def batched() -> list[str]:
        out = []
        for start in range(0, len(images), args.batch_size):
            chunk = images[start : start + args.batch_size]
            out += captioner.caption(np.stack([captioner.transform(im) for im in chunk]), options)
        return out

    def one_by_one() -> list[str]:
        out = []
        for image in images:
            inputs = processor(images=image, return_tensors="pt")
            with torch.no_grad():
                generated = model.generate(**inputs, max_new_tokens=options.max_new_tokens, do_sample=False)
            out.append(processor.batch_decode(generated, skip_special_tokens=True)[0].strip())
        return out

    assert batched() == one_by_one(), "batched captions differ from one-by-one captions"
    timings = {}
    for name, run in (("batched", batched), ("one by one", one_by_one)):
        best = float("inf")
        for _ in range(3):
            began = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - began)
        timings[name] = best
    n = len(images)
    print(f"captions of {n} images (tiny checkpoint, greedy, {options.max_new_tokens} new tokens):")
    print(f"  one by one (transformers):       {n / timings['one by one']:7.1f} captions/s")
    print(f"  blipsearch, batches of {args.batch_size:<3}:       {n / timings['batched']:7.1f} captions/s")
    print(f"  speed-up = {timings['one by one'] / timings['batched']:.1f}x (identical captions)")


if __name__ == "__main__":
    main()
