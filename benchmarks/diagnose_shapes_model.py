"""Where the shapes BLIP-2 goes wrong, for work on its quality (issue: the trained demo model).

1. Error types: for each held-out caption whose image ITC (and ITC+ITM) does not rank first, what the
   top image gets wrong against the right one: a thing's colour, shape or size, the relation swapped,
   the count, or the kind of scene.
2. What the frozen ViT encodes: linear probes on its patch features, trained on fresh scenes without
   held-out pairs, predict the colour, shape and size of the thing at each patch of fresh test scenes;
   accuracy on things with a seen colour-shape pair and on those with a held-out pair, against chance
   (the most common class), as a ratio.

Run: python -m benchmarks.diagnose_shapes_model [--model DIR] [--images 500]
"""

from __future__ import annotations

import argparse
import collections
import random
import tempfile
from pathlib import Path

import numpy as np


def error_type(truth, found) -> str:
    from indexer.synthetic import layout

    want, got = layout(truth), layout(found)
    if want[0] != got[0]:
        return "kind"
    if want[0] == "row" and want[1] != got[1]:
        return "count"
    things = list(zip(want[1:], got[1:])) if want[0] != "row" else [(want[2], got[2])]
    if want[0] in ("vertical", "horizontal") and (want[1], want[2]) == (got[2], got[1]):
        return "relation swapped"
    wrong = {a for x, y in things for a in ("colour", "shape", "size") if getattr(x, a) != getattr(y, a)}
    return "+".join(sorted(wrong))


def error_types(retriever, images: int, seed: int) -> None:
    from indexer.evaluate import Pairs, _encode_images, _itm, _rerank
    from indexer.synthetic import make_dataset, scenes

    with tempfile.TemporaryDirectory() as scratch:
        _, test = make_dataset(Path(scratch), 0, images, seed=seed)
        pairs = Pairs.read(test)
        shown = scenes(images, random.Random(seed), held_out_share=0.5, unique=True)  # as make_dataset draws them
        assert [s.caption for s in shown] == pairs.texts
        embeds, vit = _encode_images(retriever, pairs.images, 32)
    itc = np.einsum("td,nqd->tnq", retriever.encode_texts(pairs.texts), embeds).max(axis=2)
    # LAVIS ranking, as `blipsearch eval` does it: ITM logit + ITC over each caption's top 16 by ITC
    reranked = _rerank(itc, 16, lambda t, ns: _itm(retriever, vit, [pairs.texts[t]] * len(ns), ns))
    for name, scores in (("itc", itc), ("itc+itm", reranked)):
        first = scores.argmax(axis=1)
        counts = collections.Counter(error_type(shown[t], shown[f]) for t, f in enumerate(first) if f != t)
        print(f"{name:8} R@1 {np.mean(first == np.arange(len(first))):.3f}; top-1 misses by what is wrong: "
              + ", ".join(f"{kind} {n}" for kind, n in counts.most_common()))


def probe_vit(retriever, train_scenes: int = 2000, test_scenes: int = 500) -> None:
    import torch
    from PIL import Image

    from indexer.synthetic import HELD_OUT, REGION_CLASSES, region_codes, render, scenes

    grid = retriever.transform.width // retriever.model.config.vision_config.patch_size

    def patches(count: int, seed: int, held_out_share: float):
        rng = random.Random(seed)
        pixels, labels, unseen = [], [], []
        for scene in scenes(count, rng, held_out_share=held_out_share):
            image, mask = render(scene, rng, (128, 128))
            pixels.append(retriever.transform.resize(image))
            owner = np.asarray(mask.resize((grid, grid), Image.Resampling.NEAREST)).reshape(-1)
            labels.append(np.asarray(region_codes(scene))[owner])
            things = [None, *scene.things]
            unseen.append([o > 0 and (things[o].colour, things[o].shape) in HELD_OUT for o in owner])
        features = torch.cat([retriever.vit_features(np.stack(pixels[i : i + 128]))[:, 1:].float()
                              for i in range(0, len(pixels), 128)])
        return (features.reshape(-1, features.shape[-1]), torch.from_numpy(np.stack(labels)).reshape(-1, 3),
                torch.from_numpy(np.asarray(unseen)).reshape(-1))

    x_train, y_train, _ = patches(train_scenes, 5, 0.0)
    x_test, y_test, unseen = patches(test_scenes, 6, 0.5)
    on_thing = y_test[:, 0] != REGION_CLASSES[0] - 1
    for a, name in enumerate(("colour", "shape", "size")):
        torch.manual_seed(0)
        probe = torch.nn.Linear(x_train.shape[1], REGION_CLASSES[a])
        optimiser = torch.optim.Adam(probe.parameters(), 1e-2)
        for _ in range(300):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(probe(x_train), y_train[:, a]).backward()
            optimiser.step()
        with torch.no_grad():
            right = probe(x_test).argmax(dim=1) == y_test[:, a]
        things = y_test[on_thing, a]
        chance = float(torch.bincount(things).max()) / len(things)
        seen_acc, unseen_acc = float(right[on_thing & ~unseen].float().mean()), float(right[on_thing & unseen].float().mean())
        print(f"ViT patch probe, {name:6}: seen pairs {seen_acc:.3f} ({seen_acc / chance:.1f}x chance), "
              f"held-out pairs {unseen_acc:.3f} ({unseen_acc / chance:.1f}x chance); chance {chance:.3f}")


def main() -> None:
    from retrieval.checkpoints import SHAPES_RETRIEVAL
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(SHAPES_RETRIEVAL))
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    retriever = Blip2Retriever.load(ModelConfig(name=args.model, device="cpu"))
    error_types(retriever, args.images, args.seed)
    probe_vit(retriever)


if __name__ == "__main__":
    main()
