"""`blipsearch train`: trains the small shapes BLIP-2 from scratch on generated data, then evaluates it
on a held-out split whose colour-shape combinations the training images never show."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from api.options import NumberRange, emit_json, make_directory
from retrieval.train.recipe import RECOLOUR_SHARE, WITH_SWAPS, TrainConfig

VALIDATION_SEED = 2  # the validation split is drawn with the training seed + 2, the test split with + 1
TRAIN_CANDIDATES = 16  # the held-out captions are also judged as `caption --candidates 16` would choose them


@click.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where to write the two checkpoints and the held-out validation and test splits.")
@click.option("--images", type=click.IntRange(16, 1_000_000), default=8_000, show_default=True,
              help="Training images to generate.")
@click.option("--test-images", type=click.IntRange(8, 100_000), default=500, show_default=True,
              help="Held-out test images (half with unseen colour-shape pairs), and as many for validation.")
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True,
              help="Seed of the data, the weights and the held-out splits (seed + 1 test, seed + 2 validation).")
@click.option("--itm-negatives", type=click.Choice(["batch", "bank"]), default="batch", show_default=True,
              help="Where ITM's hard negatives come from: each batch (as LAVIS), or the whole training set.")
@click.option("--foils", type=click.IntRange(0, 50), default=0, show_default=True,
              help="Captions one change away from each image's, as extra negatives: drawn like swaps, or by the bank.")
@click.option("--swaps/--no-swaps", default=WITH_SWAPS, show_default=True,
              help="Each caption with two things' colours or shapes swapped, or its relation turned, as a negative.")
@click.option("--recolour", type=NumberRange(0, 1), default=RECOLOUR_SHARE, show_default=True,
              help="Share of training scenes the image encoder sees in random colours (colour labels ignored); later stages never do.")
@click.option("--text-steps", type=click.IntRange(0, 100_000), default=None,
              help=f"Steps pre-training the Q-Former's text side to read word order before stage 1 (0: none).  "
                   f"[default: {TrainConfig().text.steps}]")
@click.option("--colour-noise", type=NumberRange(0, 1), default=TrainConfig().caption_colour_noise, show_default=True,
              help="How often stage 2's teacher forcing replaces each caption's last colour word by a random colour, "
                   "so the captioner reads that thing's shape from the image, not from the colour word.")
@click.option("--smoke", is_flag=True, help="A narrow model and a few steps per stage: checks the machinery in seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
def train(out_dir, images, test_images, seed, itm_negatives, foils, swaps, recolour, text_steps, colour_noise, smoke,
          as_json) -> None:
    """Train a small BLIP-2 (ViT, Q-Former stages 1 and 2, OPT decoder) on generated captioned shapes."""
    from indexer.synthetic import make_dataset, training_set
    from retrieval.train.recipe import train as run_training

    from dataclasses import replace

    if foils and itm_negatives != "bank" and not swaps:
        raise click.UsageError("--foils are drawn with the swaps or by the bank: drop --no-swaps or add --itm-negatives bank")
    config = replace(TrainConfig.smoke() if smoke else TrainConfig(), seed=seed, itm_negatives=itm_negatives,
                     caption_colour_noise=colour_noise)
    if text_steps is not None:
        config = replace(config, text=replace(config.text, steps=text_steps))
    make_directory(out_dir)
    began = time.perf_counter()
    data = training_set(images, seed, foils_per_scene=foils, recolour_share=recolour, with_swaps=swaps)
    _, test_pairs = make_dataset(out_dir / "test-data", 0, test_images, seed=seed + 1)
    _, validation_pairs = make_dataset(out_dir / "validation-data", 0, test_images, seed=seed + VALIDATION_SEED)

    def progress(stage: str, step: int, steps: int, loss: float) -> None:
        if step == steps or sys.stderr.isatty() or step % 200 == 1:
            click.echo(f"{time.perf_counter() - began:7.0f}s  {stage:18} step {step:>5}/{steps}  loss {loss:.3f}", err=True)

    trained = run_training(data, config, out_dir, progress)
    calibration = calibrate_shapes_model(trained.retrieval_dir, validation_pairs, test_images, seed + VALIDATION_SEED)
    result = {
        "retrieval_model": str(trained.retrieval_dir), "caption_model": str(trained.caption_dir),
        "train_seconds": round(time.perf_counter() - began, 1), "losses": trained.losses,
        "fusion": calibration.best.describe(), "caption_colour_noise": config.caption_colour_noise,
        "evaluation": evaluate_shapes_model(trained.retrieval_dir, trained.caption_dir, test_pairs),
    }
    if as_json:
        emit_json(result)
        return
    evaluation = result["evaluation"]
    click.echo(f"trained in {result['train_seconds']:.0f} s: {trained.retrieval_dir}, {trained.caption_dir}")
    click.echo(f"re-ranking scores {result['fusion']}, the weight that ranks a validation split best")
    for name in ("itc", "itc+itm"):
        recall = evaluation["retrieval"][name]["text_to_image"]
        click.echo(f"held-out text->image {name:8} R@1 {recall[1]:.3f}  R@5 {recall[5]:.3f}  R@10 {recall[10]:.3f}")
    click.echo(f"held-out captions naming the right colours and shapes: {evaluation['captions']['exact']:.3f}, "
               f"the best of {TRAIN_CANDIDATES} by ITC (caption --candidates {TRAIN_CANDIDATES}): "
               f"{evaluation['captions_best_of'][str(TRAIN_CANDIDATES)]['exact']:.3f}")
    click.echo(f"evaluate again: blipsearch eval --pairs {test_pairs} --model {trained.retrieval_dir}")


def calibrate_shapes_model(retrieval_dir: Path, validation_pairs: Path, scenes: int, seed: int):
    """Stores with the retrieval model the fusion of ITM and ITC that ranks a validation split (scenes
    unseen in training, half with unseen colour-shape pairs; not the test split) best."""
    from indexer.evaluate import Pairs, calibrate_fusion
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever
    from retrieval.fusion import Fusion, write_fusion

    retriever = Blip2Retriever.load(ModelConfig.retrieval(str(retrieval_dir), "cpu"), fusion=Fusion())
    calibration = calibrate_fusion(retriever, Pairs.read(validation_pairs))
    write_fusion(retrieval_dir, calibration, f"{scenes} held-out shapes scenes (indexer.synthetic.make_dataset, seed {seed})")
    return calibration


def evaluate_shapes_model(retrieval_dir: Path, caption_dir: Path, test_pairs: Path) -> dict:
    """Retrieval recall (ITC and ITC+ITM) and caption correctness of a shapes model on a test split: the
    captioner's first choice, and the best of `TRAIN_CANDIDATES` by the retrieval model's ITC."""
    from indexer.evaluate import Pairs, evaluate, evaluate_captions
    from indexer.synthetic import colour_shapes
    from retrieval.best_caption import BestOfCaptions
    from retrieval.captioner import Blip2Captioner
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever

    pairs = Pairs.read(test_pairs)
    retriever = Blip2Retriever.load(ModelConfig.retrieval(str(retrieval_dir), "cpu"))
    captioner = Blip2Captioner.load(ModelConfig.captioning(str(caption_dir), "cpu"))
    best_of = BestOfCaptions(captioner, retriever, TRAIN_CANDIDATES)
    return {"retrieval": evaluate(retriever, pairs), "captions": evaluate_captions(captioner, pairs, colour_shapes),
            "captions_best_of": {str(TRAIN_CANDIDATES): evaluate_captions(best_of, pairs, colour_shapes)}}
