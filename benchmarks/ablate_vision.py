"""The image encoder alone, pre-trained as `blipsearch train` pre-trains it, then probed: for comparing
ways of teaching the ViT shape apart from colour in a few minutes, without the later stages.

The ViT is trained by the recipe's attribute classification on the seed-0 training scenes, then
`diagnose_shapes_model`'s object probe measures how well its features tell each thing's colour and
shape, on things whose colour-shape pair training showed and on things with a held-out pair. With
the defaults the ViT is trained as the shipped model's was (the probe's baseline).

`--recolour SHARE` is `blipsearch train --recolour SHARE`: that share of the training scenes is shown
to the encoder drawn in random colours instead of the named ones (`indexer.synthetic.recolour`; their
colour labels ignored), never near a held-out pair's colour for the thing's shape, so the encoder
sees each shape in many colours without ever seeing an unseen pair. The recipe's share is the
default; `--recolour 0` trains the encoder as models before the seventh session did.

`--image-size` and `--patch-size` change the ViT's input (64 px, 16 px patches in the shipped model):
for asking whether the encoder tells small things' shapes better from more pixels.

Run: python -m benchmarks.ablate_vision [--images 8000] [--steps 3000] [--recolour 0.5] [--seed 0]
     [--image-size 64] [--patch-size 16] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def main() -> None:
    import torch

    from benchmarks.diagnose_shapes_model import probe_objects, probe_vit
    from indexer.synthetic import training_set
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever
    from retrieval.tiny import quiet
    from retrieval.train.architecture import retrieval_model, retrieval_processor
    from retrieval.train.recipe import RECOLOUR_SHARE, TrainConfig, _image_encoder

    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=TrainConfig().vision.steps)
    parser.add_argument("--recolour", type=float, default=RECOLOUR_SHARE)
    parser.add_argument("--seed", type=int, default=0, help="the ViT's initialisation and batches; the data stay seed 0's")
    parser.add_argument("--image-size", type=int, default=TrainConfig().architecture.image_size)
    parser.add_argument("--patch-size", type=int, default=TrainConfig().architecture.patch_size)
    parser.add_argument("--patches", action="store_true", help="also run the per-patch probe")
    parser.add_argument("--out", type=Path, help="keep the checkpoint (ViT trained, Q-Former not) here")
    args = parser.parse_args()

    quiet()
    config = TrainConfig(seed=args.seed)
    config = replace(config, vision=replace(config.vision, steps=args.steps),
                     architecture=replace(config.architecture, image_size=args.image_size, patch_size=args.patch_size))
    data = training_set(args.images, 0, recolour_share=args.recolour)
    processor = retrieval_processor(config.architecture, data.words())
    torch.manual_seed(args.seed)
    model = retrieval_model(config.architecture, processor)

    began = time.perf_counter()

    def progress(stage: str, step: int, steps: int, loss: float) -> None:
        if step % 500 == 1 or step == steps:
            print(f"{time.perf_counter() - began:6.0f}s  {stage} step {step}/{steps}  loss {loss:.3f}", file=sys.stderr)

    _, loss = _image_encoder(model.vision_model, processor, data, config, progress)
    print(f"{vars(args)}: ViT {args.steps} steps in {time.perf_counter() - began:.0f} s, final loss {loss:.3f}")
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        model.half().save_pretrained(out)
        processor.save_pretrained(out)
        retriever = Blip2Retriever.load(ModelConfig(name=str(out), device="cpu"))
        if args.patches:
            probe_vit(retriever)
        probe_objects(retriever)


if __name__ == "__main__":
    main()
