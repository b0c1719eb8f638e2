"""Stage 1 alone, retrained on the shipped model's frozen ViT: for comparing ways of training the
Q-Former (ITM's negatives and how they are mined, foils, swaps, swap pairs, attribute matching,
dropout, text pre-training, depth, steps, seed) in about half the time of `blipsearch train`.

A fresh Q-Former is trained by the recipe's stage 1 (its text side pre-trained first, 850 steps of
96, with swaps) on the features that the shipped ViT (read from its fp16 checkpoint) gives the seed-0
training images, then evaluated on the 500-scene held-out split that `blipsearch train` writes (seed
1). Prints text->image R@1/5/10 by ITC alone (the baseline) and after ITM re-ranking, and their R@1
ratio. `--text-steps 0 --no-swaps` is stage 1 as it was before the seventh session.

Run: python -m benchmarks.ablate_stage1 --out DIR [--vit CHECKPOINT] [--itm-negatives bank]
     [--itm-attributes 1] [--mining-temperature 0.1] [--foils 2] [--no-swaps] [--swap-pairs]
     [--qformer-layers 3] [--dropout 0.1] [--steps 850] [--text-steps N] [--images 8000] [--seed 0]
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
    from transformers import Blip2ForImageTextRetrieval

    from indexer.evaluate import Pairs, evaluate
    from indexer.synthetic import make_dataset, training_set
    from retrieval.checkpoints import SHAPES_RETRIEVAL
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever
    from retrieval.tiny import quiet
    from retrieval.train.architecture import retrieval_model, retrieval_processor
    from retrieval.train.recipe import WITH_SWAPS, TrainConfig, _stage1, _text_encoder, frozen_features, image_pixels

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True, help="where the retrained retrieval checkpoint goes")
    parser.add_argument("--vit", default=str(SHAPES_RETRIEVAL),
                        help="retrieval checkpoint whose frozen ViT to use [default: the shipped model]")
    parser.add_argument("--itm-negatives", choices=["batch", "bank"], default="batch")
    parser.add_argument("--itm-attributes", type=float, default=TrainConfig().itm_attributes,
                        help="weight of attribute matching beside ITM (retrieval.train.stage1)")
    parser.add_argument("--mining-temperature", type=float, default=TrainConfig().mining_temperature,
                        help="draw ITM's in-batch negatives by softmax(cosine / T); 0: ITC's temperature")
    parser.add_argument("--foils", type=int, default=0)
    parser.add_argument("--swaps", action=argparse.BooleanOptionalAction, default=WITH_SWAPS,
                        help="swapped captions as ITC and ITM negatives")
    parser.add_argument("--swap-pairs", action="store_true",
                        help="each scene with swaps gets one drawn alike as a training image, batched with it")
    parser.add_argument("--qformer-layers", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=TrainConfig().architecture.qformer_dropout,
                        help="the Q-Former's dropout while training")
    parser.add_argument("--steps", type=int, default=TrainConfig().stage1.steps)
    parser.add_argument("--text-steps", type=int, default=TrainConfig().text.steps,
                        help="pre-train the Q-Former's text side this many steps first (retrieval.train.text)")
    parser.add_argument("--images", type=int, default=8000,
                        help="training scenes for stage 1 (seed 0's); the ViT is the checkpoint's whatever its data")
    parser.add_argument("--seed", type=int, default=0, help="stage 1's initialisation, batches and negatives; the data stay seed 0's")
    args = parser.parse_args()

    quiet()
    config = TrainConfig(itm_negatives=args.itm_negatives, itm_attributes=args.itm_attributes,
                         mining_temperature=args.mining_temperature, seed=args.seed)
    config = replace(config, architecture=replace(config.architecture, qformer_layers=args.qformer_layers,
                                                                    qformer_dropout=args.dropout),
                     stage1=replace(config.stage1, steps=args.steps), text=replace(config.text, steps=args.text_steps))
    data = training_set(args.images, 0, foils_per_scene=args.foils, with_swaps=args.swaps, swap_pairs=args.swap_pairs)
    processor = retrieval_processor(config.architecture, data.words())
    torch.manual_seed(args.seed)
    model = retrieval_model(config.architecture, processor)
    shipped = Blip2ForImageTextRetrieval.from_pretrained(args.vit, torch_dtype=torch.float32)
    model.vision_model.load_state_dict(shipped.vision_model.state_dict())
    features = frozen_features(model.vision_model, image_pixels(processor, data.images))

    began = time.perf_counter()

    def progress(stage: str, step: int, steps: int, loss: float) -> None:
        if step % 200 == 1 or step == steps:
            print(f"{time.perf_counter() - began:6.0f}s  {stage} step {step}/{steps}  loss {loss:.3f}", file=sys.stderr)

    if config.text.steps:
        _text_encoder(model, processor, data, config, progress)
    _, losses = _stage1(model, processor, features, data, config, progress)
    seconds = time.perf_counter() - began
    model.half().save_pretrained(args.out)
    processor.save_pretrained(args.out)

    with tempfile.TemporaryDirectory() as scratch:
        _, test = make_dataset(Path(scratch), 0, 500, seed=1)
        recall = evaluate(Blip2Retriever.load(ModelConfig(name=str(args.out), device="cpu")), Pairs.read(test))
    itc, itm = recall["itc"]["text_to_image"], recall["itc+itm"]["text_to_image"]
    print(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "stage1_seconds": round(seconds),
                      "losses": losses, "itc": itc, "itc+itm": itm}))
    print(f"text->image R@1: ITC {itc[1]:.3f}, ITC+ITM {itm[1]:.3f}, ratio {itm[1] / itc[1]:.3f}")


if __name__ == "__main__":
    main()
