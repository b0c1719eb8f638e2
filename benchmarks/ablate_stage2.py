"""Stage 2 alone, retrained on a caption checkpoint's frozen ViT and language model (the shipped
captioner's unless `--captioner`): for comparing ways of training the captioner (how many training
scenes, steps, seed, colour noise) in a fraction of the time of `blipsearch train`.

The Q-Former starts from a stage-1 retrieval checkpoint (the shipped one unless `--qformer`), as the
recipe's stage 2 starts from its stage 1; the language projection is fresh. It is trained by the
recipe's stage 2 (1300 steps of 64) on the seed-0 training scenes, then judged on the 500-scene
held-out split that `blipsearch train` writes (seed 1; `--splits 1 2` adds its validation split):
the share of captions naming exactly the scene's colour-shape pairs, overall, on scenes with an
unseen pair, and on scenes of two different pairs, for the caption model's first choice and for
the best of 16 beams by the stage-1 checkpoint's ITC (`caption --candidates 16`). Run it with
`--images 8000` (the recipe's) beside any change: that is the baseline.

Run: python -m benchmarks.ablate_stage2 --out DIR [--images 8000] [--steps 1300] [--seed 0]
     [--qformer RETRIEVAL_CHECKPOINT --captioner CAPTION_CHECKPOINT] [--frozen-qformer]
     [--colour-noise 0.5] [--splits 1 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def main() -> None:
    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Processor

    from benchmarks.bench_shapes_model import caption_groups
    from indexer.evaluate import Pairs, judge_captions
    from indexer.synthetic import colour_shapes, make_dataset, training_set
    from retrieval.best_caption import BestOfCaptions
    from retrieval.captioner import Blip2Captioner
    from retrieval.checkpoints import SHAPES_CAPTION, SHAPES_RETRIEVAL
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever
    from retrieval.tiny import quiet
    from retrieval.train.architecture import caption_model
    from retrieval.train.recipe import TrainConfig, _copy_qformer, frozen_features, image_pixels

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True, help="where the retrained caption checkpoint goes")
    parser.add_argument("--qformer", default=str(SHAPES_RETRIEVAL), help="stage-1 checkpoint to start the Q-Former from")
    parser.add_argument("--captioner", default=str(SHAPES_CAPTION),
                        help="caption checkpoint whose frozen ViT and language model stage 2 trains against (the same run's as --qformer)")
    parser.add_argument("--images", type=int, default=8000, help="training scenes (seed 0's)")
    parser.add_argument("--steps", type=int, default=TrainConfig().stage2.steps)
    parser.add_argument("--seed", type=int, default=0, help="the projection's initialisation and the batches")
    parser.add_argument("--frozen-qformer", action="store_true",
                        help="train the projection alone, keeping stage 1's Q-Former and queries as they are")
    parser.add_argument("--splits", type=int, nargs="+", default=[1],
                        help="held-out splits to judge on (seeds): 1, the test split; 2, train's validation split")
    parser.add_argument("--colour-noise", type=float, default=TrainConfig().caption_colour_noise,
                        help="how often each caption's last colour word is replaced in teacher forcing (TrainConfig)")
    args = parser.parse_args()

    quiet()
    config = TrainConfig(seed=args.seed)
    config = replace(config, stage2=replace(config.stage2, steps=args.steps))
    processor = Blip2Processor.from_pretrained(args.captioner)
    torch.manual_seed(args.seed)
    model = caption_model(config.architecture, processor)
    frozen = Blip2ForConditionalGeneration.from_pretrained(args.captioner, torch_dtype=torch.float32)
    model.vision_model.load_state_dict(frozen.vision_model.state_dict())
    model.language_model.load_state_dict(frozen.language_model.state_dict())
    _copy_qformer(Blip2ForImageTextRetrieval.from_pretrained(args.qformer, torch_dtype=torch.float32), model)
    data = training_set(args.images, 0)
    features = frozen_features(model.vision_model, image_pixels(processor, data.images))

    began = time.perf_counter()

    def progress(stage: str, step: int, steps: int, loss: float) -> None:
        if step % 200 == 1 or step == steps:
            print(f"{time.perf_counter() - began:6.0f}s  {stage} step {step}/{steps}  loss {loss:.3f}", file=sys.stderr)

    from retrieval.train.recipe import _tokenize, colour_noise
    from retrieval.train.stage2 import caption_inputs, train_stage2

    input_ids, mask, labels = caption_inputs(model, _tokenize(processor, data.captions))
    loss = train_stage2(model, features, input_ids, mask, labels, config.stage2, config.seed, progress,
                        qformer=not args.frozen_qformer, noise=colour_noise(processor, input_ids, args.colour_noise))
    seconds = time.perf_counter() - began
    model.half().save_pretrained(args.out)
    processor.save_pretrained(args.out)

    captioner = Blip2Captioner.load(ModelConfig(name=str(args.out), device="cpu"))
    chooser = BestOfCaptions(captioner, Blip2Retriever.load(ModelConfig(name=args.qformer, device="cpu")), 16)
    exact = {}
    for split in args.splits:
        with tempfile.TemporaryDirectory() as scratch:
            _, test = make_dataset(Path(scratch), 0, 500, seed=split)
            pairs = Pairs.read(test)
            for rule, model in (("first choice", captioner), ("best of 16 by ITC", chooser)):
                groups = caption_groups(pairs, judge_captions(model, pairs, colour_shapes))
                exact[f"split {split}, {rule}"] = {name: group["exact"] for name, group in groups.items()}
    print(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "stage2_seconds": round(seconds),
                      "loss": loss, "exact": exact}))
    for name, shares in exact.items():
        print(f"{name}, captions exactly right: " + ", ".join(f"{group} {share:.3f}" for group, share in shares.items()))

if __name__ == "__main__":
    main()
