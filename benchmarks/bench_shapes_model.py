"""Quality of the shipped shapes BLIP-2 on a held-out split, ITC+ITM re-ranking against ITC alone.

A fresh test split (seed 1: the one `blipsearch train` writes) of scenes the model never saw; half show a
colour-shape pair absent from every training image. Reports text->image and image->text R@1/5/10 for
ITC alone (the baseline) and ITC+ITM (re-ranked by the model's fusion of the two, else by LAVIS's rule),
their R@1 ratio, and on the `--ranking-seeds` splits of as many scenes each, R@1 by ITC alone, by the
fusion and by LAVIS's rule, and the queries the fusion gets right where ITC is wrong and the reverse,
pooled, with a two-sided sign test. Then the share of generated
captions naming exactly the scene's colour-shape pairs, overall, on the unseen pairs, and on
scenes of two different colour-shape pairs: the caption model's own first choice (the baseline), and
the best of `--candidates` beams by the retrieval model's ITC (`caption --candidates`), with their ratio.

Run: python -m benchmarks.bench_shapes_model [--images 500] [--model DIR --caption-model DIR] [--candidates 16]
     [--ranking-seeds 1,3,4,5,6]  (seed 2 is the validation split `train` calibrates the fusion on)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    from indexer.evaluate import Pairs, evaluate, judge_captions
    from indexer.synthetic import colour_shapes, make_dataset
    from retrieval.best_caption import BestOfCaptions
    from retrieval.captioner import Blip2Captioner
    from retrieval.checkpoints import SHAPES_CAPTION, SHAPES_RETRIEVAL
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever

    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", default=str(SHAPES_RETRIEVAL))
    parser.add_argument("--caption-model", default=str(SHAPES_CAPTION))
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--ranking-seeds", default="1,3,4,5,6")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        _, test = make_dataset(Path(scratch), 0, args.images, seed=args.seed)
        pairs = Pairs.read(test)
        retriever = Blip2Retriever.load(ModelConfig(name=args.model, device="cpu"))
        recall = evaluate(retriever, pairs)
        captioner = Blip2Captioner.load(ModelConfig(name=args.caption_model, device="cpu"))
        chosen = BestOfCaptions(captioner, retriever, args.candidates)
        judged, seconds = {}, {}
        for name, model in (("first choice", captioner), (f"best of {args.candidates} by ITC", chosen)):
            began = time.perf_counter()
            judged[name] = judge_captions(model, pairs, colour_shapes)
            seconds[name] = time.perf_counter() - began

    groups = {name: caption_groups(pairs, judgements) for name, judgements in judged.items()}

    def summary(of: dict[str, dict]) -> str:
        two = ", ".join(f"{name} pairs {of[f'two pairs, {name}']['exact']:.3f} of {of[f'two pairs, {name}']['images']}"
                        for name in ("seen", "unseen"))
        return (f"{of['all']['exact']:.3f} (unseen pairs: {of['unseen pairs']['exact']:.3f}); "
                f"of scenes with two colour-shape pairs: {two}")

    itc, itm = recall["itc"]["text_to_image"][1], recall["itc+itm"]["text_to_image"][1]
    print(f"{recall['images']} held-out images ({groups['first choice']['unseen pairs']['images']} with an unseen "
          "colour-shape pair)")
    for name in ("itc", "itc+itm"):
        t2i, i2t = recall[name]["text_to_image"], recall[name]["image_to_text"]
        print(f"{name:8} text->image R@1/5/10 {t2i[1]:.3f}/{t2i[5]:.3f}/{t2i[10]:.3f}   "
              f"image->text {i2t[1]:.3f}/{i2t[5]:.3f}/{i2t[10]:.3f}   {recall['ms_per_query'][name]:.1f} ms/query")
    print(f"ITC+ITM / ITC text->image R@1: {itm / max(itc, 1e-9):.3f}x, re-ranked by {recall['fusion']}")
    splits = [int(seed) for seed in args.ranking_seeds.split(",") if seed]
    if splits:
        ranking_splits(retriever, splits, args.images)
    print("captions naming exactly the right colour-shape pairs:")
    for name, of in groups.items():
        print(f"  {name:18} {summary(of)}; {1e3 * seconds[name] / of['all']['images']:.1f} ms/image")
    first, best = (of["all"]["exact"] for of in groups.values())
    print(f"best of {args.candidates} / first choice, exact captions: {best / max(first, 1e-9):.2f}x")
    for name, judgements in judged.items():
        print(json.dumps({name: [{"image": Path(pairs.images[i]).name, "caption": j["caption"]}
                                 for i, j in enumerate(judgements[:3])]}))


def ranking_splits(retriever, seeds: list[int], images: int) -> None:
    """R@1 by ITC, by the model's fusion and by LAVIS's rule on fresh splits, and paired counts."""
    from indexer.evaluate import Pairs, score_candidates
    from indexer.synthetic import make_dataset
    from retrieval.fusion import Fusion

    fusion, lavis = retriever.fusion, Fusion()
    changed = {"text->image": [0, 0], "image->text": [0, 0]}
    print(f"text->image / image->text R@1 on splits of {images} scenes (seed 2 is train's validation split): "
          f"ITC, {fusion.describe()}, {lavis.describe()}")
    for seed in seeds:
        with tempfile.TemporaryDirectory() as scratch:
            _, test = make_dataset(Path(scratch), 0, images, seed=seed)
            directions = dict(zip(changed, score_candidates(retriever, Pairs.read(test))))
        cells = []
        for name, c in directions.items():
            by_itc, fused = c.first_right(c.itc), c.first_right(fusion.combine_logits(c.itm_logits, c.itc))
            changed[name][0] += int((fused & ~by_itc).sum())
            changed[name][1] += int((~fused & by_itc).sum())
            cells.append(f"{by_itc.mean():.3f}, {fused.mean():.3f}, {c.recall_at_1(lavis):.3f}")
        print(f"  seed {seed}: " + "   ".join(cells))
    for name, (gained, lost) in changed.items():
        print(f"  pooled {name}: the fusion right where ITC is wrong {gained}, the reverse {lost}; "
              f"sign test p = {_sign_test(gained, lost):.3f}")


def _sign_test(gained: int, lost: int) -> float:
    """Two-sided exact binomial test of gained against lost at one half."""
    from math import comb

    n, low = gained + lost, min(gained, lost)
    return min(1.0, 2 * sum(comb(n, i) for i in range(low + 1)) / 2**n) if n else 1.0


def caption_groups(pairs, judged: list[dict]) -> dict[str, dict]:
    """`caption_summary` of all the test images and of the groups that tell generalisation apart:
    scenes with a colour-shape pair no training image shows, and scenes of two different pairs, seen
    or unseen. `pairs` has one caption per image (the held-out split)."""
    from indexer.evaluate import caption_summary
    from indexer.synthetic import HELD_OUT, colour_shapes

    unseen = {i for i, text in enumerate(pairs.texts) if colour_shapes(text) & HELD_OUT}
    two = [i for i, text in enumerate(pairs.texts) if len(colour_shapes(text)) == 2]  # two different things
    rows = {"all": range(len(judged)), "unseen pairs": sorted(unseen),
            "two pairs, seen": [i for i in two if i not in unseen], "two pairs, unseen": [i for i in two if i in unseen]}
    return {name: caption_summary(pairs, [judged[i] for i in group]) for name, group in rows.items()}


if __name__ == "__main__":
    main()
