"""Where the shapes BLIP-2 goes wrong, for work on its quality (issue: the trained demo model).

1. Error types: for each held-out caption whose image ITC (and ITC+ITM) does not rank first, what the
   top image gets wrong against the right one: a thing's colour, shape or size, the relation swapped,
   the count, or the kind of scene. Then R@1 with ITC's top 16 ranked by other mixes of ITM and ITC.
   Then a foil test (as ARO and Winoground test binding): each image's own caption against each
   caption one change away (`indexer.synthetic.foils`), by kind of change; the share of pairs that
   ITC, ITM and their LAVIS sum score the right way round.
   Then where binding is lost (`swap_test`): for each two-thing test scene and each of its swaps
   (`indexer.synthetic.swaps`), drawn alike, the cosine of the two captions' text embeddings, of the
   two drawings' query embeddings and of their ViT features; and the Winoground scores of ITC and ITM
   on the 2x2 of captions and drawings (text score: each drawing prefers its own caption; image
   score: each caption prefers its own drawing).
   Then the caption choice ceiling (`choice_ceiling`): how often ITC, ITM and the model's fusion rank
   an image's own caption above every caption one colour or shape word away at once: how often a
   chooser of captions by that score picks the right one when such near misses are among its
   candidates.
2. What the frozen ViT encodes: linear probes on its patch features, trained on fresh scenes without
   held-out pairs, predict the colour, shape and size of the thing at each patch of fresh test scenes;
   accuracy on things with a seen colour-shape pair and on those with a held-out pair, against chance
   (the most common class), as a ratio. The same per thing: linear probes on the mean of the patch
   features each thing covers. And per scene (`probe_scene`): its layout and the colour, shape and
   size of its first thing and of its second (top or left, bottom or right), from the ViT's [CLS],
   the mean of its patch tokens, and the Q-Former's 32 query embeddings (concatenated): which of them
   still says which thing has which colour.

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
    from indexer.evaluate import Pairs, _candidates, _encode_images, _itm, _reranked
    from indexer.synthetic import HELD_OUT, make_dataset, scenes

    with tempfile.TemporaryDirectory() as scratch:
        _, test = make_dataset(Path(scratch), 0, images, seed=seed)
        pairs = Pairs.read(test)
        shown = scenes(images, random.Random(seed), held_out_share=0.5, unique=True)  # as make_dataset draws them
        assert [s.caption for s in shown] == pairs.texts
        embeds, vit = _encode_images(retriever, pairs.images, 32)
    itc = np.einsum("td,nqd->tnq", retriever.encode_texts(pairs.texts), embeds).max(axis=2)
    # as `blipsearch eval` ranks: each caption's top 16 by ITC, scored by the model's fusion of ITM and ITC
    images_of = [{t} for t in range(len(pairs.texts))]
    candidates = _candidates(itc, 16, images_of, lambda t, ns: _itm(retriever, vit, [pairs.texts[t]] * len(ns), ns))
    reranked = _reranked(itc, candidates, retriever.fusion)
    unseen = np.asarray([any((t.colour, t.shape) in HELD_OUT for t in scene.things) for scene in shown])
    for name, scores in (("itc", itc), ("itc+itm", reranked)):
        first = scores.argmax(axis=1)
        hit = first == np.arange(len(first))
        counts = collections.Counter(error_type(shown[t], shown[f]) for t, f in enumerate(first) if f != t)
        print(f"{name:8} R@1 {hit.mean():.3f} (captions with a held-out pair {hit[unseen].mean():.3f}, "
              f"{int((~hit[unseen]).sum())} misses; the rest {hit[~unseen].mean():.3f}, {int((~hit[~unseen]).sum())} "
              "misses); top-1 misses by what is wrong: " + ", ".join(f"{kind} {n}" for kind, n in counts.most_common()))
    ranking_rules(candidates)
    foil_test(retriever, shown, embeds, vit, unseen)
    choice_ceiling(retriever, shown, embeds, vit, unseen)
    swap_test(retriever, shown)


def ranking_rules(candidates) -> None:
    """R@1 when each caption's top candidates by ITC (`indexer.evaluate` `Candidates`) are ranked by
    other combinations of the two heads, to tell a weak ITM head from a poor way of adding it."""
    logits, cosine = candidates.itm_logits, candidates.itc
    log_odds = logits[..., 1] - logits[..., 0]  # what `search --score itm` ranks by (the match probability)
    rules = {"ITC": cosine, "ITM logit + ITC (LAVIS)": logits[..., 1] + cosine, "ITM logit": logits[..., 1],
             "ITM log-odds": log_odds, **{f"ITM log-odds + {w} ITC": log_odds + w * cosine for w in (10, 40)}}
    print(f"R@1 with ITC's top {cosine.shape[1]} ranked by: " + ", ".join(
        f"{name} {candidates.first_right(scores).mean():.3f}" for name, scores in rules.items()))


def foil_kind(scene, foil) -> str:
    """What `foil` changed of `scene`: an `error_type`, or two things' colours or shapes swapped."""
    from dataclasses import replace

    if scene.relation is not None and foil.relation == scene.relation:
        (a, b), (x, y) = scene.things, foil.things
        for attribute in ("colour", "shape"):
            if (x, y) == (replace(a, **{attribute: getattr(b, attribute)}), replace(b, **{attribute: getattr(a, attribute)})):
                return f"{attribute}s swapped"
    return error_type(scene, foil)


def foil_test(retriever, shown, embeds, vit, unseen, per_image: int = 40) -> None:
    """Each image's caption against its foils: per kind of change, the share scored the right way round."""
    from indexer.synthetic import foils

    rng = random.Random(0)
    right: dict[str, list] = collections.defaultdict(list)
    for n, scene in enumerate(shown):
        changed = foils(scene, rng, per_image)
        texts = [scene.caption] + [f.caption for f in changed]
        itc, logits = _one_image_itc(retriever, embeds[n], texts), _one_image_itm(retriever, vit[n], texts)
        itm = logits[:, 1] - logits[:, 0]
        lavis = logits[:, 1] + itc
        for k, foil in enumerate(changed, 1):
            right[foil_kind(scene, foil)].append((itc[0] > itc[k], itm[0] > itm[k], lavis[0] > lavis[k], bool(unseen[n])))
    print("foil test, own caption scored above a caption one change away (ITC / ITM / ITC+ITM; images with an unseen pair):")
    for kind, rows in sorted(right.items(), key=lambda item: -len(item[1])):
        table = np.asarray(rows, dtype=float)
        held = table[table[:, 3] == 1]  # none where every such foil would show a held-out pair

        def shares(part) -> str:
            return " / ".join(f"{part[:, c].mean():.3f}" for c in range(3)) if len(part) else "-"

        print(f"  {kind:16} {len(rows):5} pairs: {shares(table)}; unseen {shares(held)} ({len(held)})")


def choice_ceiling(retriever, shown, embeds, vit, unseen) -> None:
    """How often each score ranks an image's own caption above every `word_edits` caption at once: how
    often a caption chooser (`caption --candidates`) scoring by it picks the right caption when the
    captioner's candidates hold it and these near misses."""
    from indexer.synthetic import word_edits

    rows = []
    for n, scene in enumerate(shown):
        texts = [scene.caption] + word_edits(scene)
        itc, logits = _one_image_itc(retriever, embeds[n], texts), _one_image_itm(retriever, vit[n], texts)
        scores = (itc, logits[:, 1] - logits[:, 0], retriever.fusion.combine_logits(logits, itc))
        rows.append([bool((score[0] > score[1:]).all()) for score in scores])
    table, held = np.asarray(rows, dtype=float), np.asarray(unseen, dtype=bool)
    print(f"caption choice ceiling, own caption above all its one-word colour or shape edits (held-out pairs "
          f"included; ITC / ITM log-odds / {retriever.fusion.describe()}): " + "; ".join(
              f"{name} " + " / ".join(f"{part[:, c].mean():.3f}" for c in range(3))
              for name, part in (("all", table), ("unseen pairs", table[held]), ("the rest", table[~held]))))


def swap_test(retriever, shown) -> None:
    """Caption and swap, drawing and swapped drawing: which stage tells them apart."""
    from indexer.synthetic import draw, swaps

    rows: dict[str, list] = collections.defaultdict(list)
    for scene in shown:
        for swapped in swaps(scene):
            texts = [scene.caption, swapped.caption]
            text = retriever.encode_texts(texts)
            pixels = np.stack([retriever.transform(draw(s, 128, random.Random(7))) for s in (scene, swapped)])
            drawn = retriever.encode_images(pixels, keep_vit=True)
            vit = drawn.vit_features.float()
            itc = np.einsum("td,nqd->tnq", text, drawn.query_embeds).max(axis=2)  # (caption, drawing)
            itm = np.stack([_log_odds(retriever, vit[n], texts) for n in range(2)], axis=1)
            rows[foil_kind(scene, swapped)].append((
                float(text[0] @ text[1]), float((drawn.query_embeds[0] * drawn.query_embeds[1]).sum(-1).mean()),
                _token_cosine(vit[0], vit[1]), *_winoground(itc), *_winoground(itm)))
    print("swap test (mean cosine of caption / swap texts, query embeddings, ViT tokens; Winoground text / image score of ITC, ITM):")
    for kind, values in rows.items():
        v = np.asarray(values, dtype=float).mean(axis=0)
        print(f"  {kind:16} {len(values):4} pairs: cosine text {v[0]:.3f}, queries {v[1]:.3f}, ViT {v[2]:.3f}; "
              f"ITC {v[3]:.2f} / {v[4]:.2f}, ITM {v[5]:.2f} / {v[6]:.2f}")


def _one_image_itc(retriever, query_embeds, texts):
    """(T,) ITC of one image's (Q, D) query embeddings with each text: the best query's, as search scores."""
    return (query_embeds @ retriever.encode_texts(texts).T).max(axis=0)


def _one_image_itm(retriever, vit, texts):
    """(T, 2) ITM logits of one image's ViT features with each text."""
    return retriever.itm_logits(retriever.stack_vit_features([vit] * len(texts)), texts)


def _log_odds(retriever, vit, texts):
    logits = _one_image_itm(retriever, vit, texts)
    return logits[:, 1] - logits[:, 0]


def _token_cosine(a, b) -> float:
    """Mean cosine of matching rows (tokens) of two (P, D) tensors."""
    import torch

    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


def _winoground(scores) -> tuple[bool, bool]:
    """Text and image score of a (caption, drawing) 2x2, item 0 and 1 each other's swap."""
    text = scores[0, 0] > scores[1, 0] and scores[1, 1] > scores[0, 1]
    image = scores[0, 0] > scores[0, 1] and scores[1, 1] > scores[1, 0]
    return bool(text), bool(image)


def _linear_probe(x_train, y_train, x_test, classes: int):
    """Predictions on `x_test` of a linear classifier fitted to (x_train, y_train)."""
    import torch

    torch.manual_seed(0)
    probe = torch.nn.Linear(x_train.shape[1], classes)
    optimiser = torch.optim.Adam(probe.parameters(), 1e-2)
    for _ in range(300):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(probe(x_train), y_train).backward()
        optimiser.step()
    with torch.no_grad():
        return probe(x_test).argmax(dim=1)


def _probe_scenes(retriever, count: int, seed: int, held_out_share: float):
    """Fresh scenes drawn at 128 px: their ViT patch features (N, P, D) and masks resized to the input."""
    import torch

    from indexer.synthetic import render, scenes

    rng = random.Random(seed)
    chosen = scenes(count, rng, held_out_share=held_out_share)
    drawn = [render(scene, rng, (128, 128)) for scene in chosen]
    pixels = [retriever.transform.resize(image) for image, _ in drawn]
    features = torch.cat([retriever.vit_features(np.stack(pixels[i : i + 128]))[:, 1:].float()
                          for i in range(0, len(pixels), 128)])
    return chosen, features, [mask for _, mask in drawn]


def probe_vit(retriever, train_scenes: int = 2000, test_scenes: int = 500) -> None:
    """Per patch: the colour, shape and size of the thing at the patch's centre."""
    import torch
    from PIL import Image

    from indexer.synthetic import HELD_OUT, REGION_CLASSES, region_codes

    grid = retriever.transform.width // retriever.model.config.vision_config.patch_size

    def patches(count: int, seed: int, held_out_share: float):
        chosen, features, masks = _probe_scenes(retriever, count, seed, held_out_share)
        labels, unseen = [], []
        for scene, mask in zip(chosen, masks):
            owner = np.asarray(mask.resize((grid, grid), Image.Resampling.NEAREST)).reshape(-1)
            labels.append(np.asarray(region_codes(scene))[owner])
            things = [None, *scene.things]
            unseen.append([o > 0 and (things[o].colour, things[o].shape) in HELD_OUT for o in owner])
        return (features.reshape(-1, features.shape[-1]), torch.from_numpy(np.stack(labels)).reshape(-1, 3),
                torch.from_numpy(np.asarray(unseen)).reshape(-1))

    x_train, y_train, _ = patches(train_scenes, 5, 0.0)
    x_test, y_test, unseen = patches(test_scenes, 6, 0.5)
    on_thing = y_test[:, 0] != REGION_CLASSES[0] - 1
    for a, name in enumerate(("colour", "shape", "size")):
        right = _linear_probe(x_train, y_train[:, a], x_test, REGION_CLASSES[a]) == y_test[:, a]
        things = y_test[on_thing, a]
        chance = float(torch.bincount(things).max()) / len(things)
        seen_acc, unseen_acc = float(right[on_thing & ~unseen].float().mean()), float(right[on_thing & unseen].float().mean())
        print(f"ViT patch probe, {name:6}: seen pairs {seen_acc:.3f} ({seen_acc / chance:.1f}x chance), "
              f"held-out pairs {unseen_acc:.3f} ({unseen_acc / chance:.1f}x chance); chance {chance:.3f}")


def probe_objects(retriever, train_scenes: int = 2000, test_scenes: int = 600) -> None:
    """Per thing: its colour and shape from the mean of the patch features it covers (weighted by how
    much of each patch it covers, patches under 10% left out), closer to what a Q-Former query can
    gather than a single patch is."""
    import torch

    from indexer.synthetic import COLOURS, HELD_OUT, SHAPES
    from retrieval.train.recipe import patch_coverage

    grid = retriever.transform.width // retriever.model.config.vision_config.patch_size

    def things(count: int, seed: int, held_out_share: float):
        chosen, features, masks = _probe_scenes(retriever, count, seed, held_out_share)
        rows, labels, unseen, small = [], [], [], []
        for scene, patch_features, mask in zip(chosen, features, masks):
            share = patch_coverage(mask, len(scene.things) + 1, grid)
            for k, thing in enumerate(scene.things, 1):
                weights = torch.from_numpy(np.where(share[:, k] >= 0.1, share[:, k], 0.0)).float()
                if weights.sum() > 0:
                    rows.append((weights[:, None] * patch_features).sum(dim=0) / weights.sum())
                    labels.append((list(COLOURS).index(thing.colour), SHAPES.index(thing.shape)))
                    unseen.append((thing.colour, thing.shape) in HELD_OUT)
                    small.append(thing.size == "small")
        return torch.stack(rows), torch.tensor(labels), torch.tensor(unseen), torch.tensor(small)

    x_train, y_train, _, _ = things(train_scenes, 5, 0.0)
    x_test, y_test, unseen, small = things(test_scenes, 6, 0.5)

    def rate(right: torch.Tensor, where: torch.Tensor) -> str:  # the probe's accuracy on the things `where` picks
        return f"{float(right[where].mean()):.3f}"

    for a, (name, classes) in enumerate((("colour", len(COLOURS)), ("shape", len(SHAPES)))):
        right = (_linear_probe(x_train, y_train[:, a], x_test, classes) == y_test[:, a]).float()
        print(f"ViT object probe, {name:6}: seen pairs {rate(right, ~unseen)}, held-out pairs {rate(right, unseen)} "
              f"({int(unseen.sum())} things with a held-out pair); small things {rate(right, ~unseen & small)} / "
              f"{rate(right, unseen & small)}, large {rate(right, ~unseen & ~small)} / {rate(right, unseen & ~small)}")


def probe_scene(retriever, train_scenes: int = 3000, test_scenes: int = 800) -> None:
    """Per scene: the bound description (`indexer.synthetic.attributes`) from the ViT's [CLS], the mean of
    its patch tokens, and the concatenated query embeddings; accuracy on test scenes of two things."""
    import torch

    from indexer.synthetic import ATTRIBUTE_CLASSES, HELD_OUT, attributes, render, scenes

    def views(count: int, seed: int, held_out_share: float):
        rng = random.Random(seed)
        chosen = scenes(count, rng, held_out_share=held_out_share)
        pixels = np.stack([retriever.transform.resize(render(scene, rng, (128, 128))[0]) for scene in chosen])
        vit = torch.cat([retriever.vit_features(pixels[i : i + 128]).float() for i in range(0, len(pixels), 128)])
        queries = torch.from_numpy(np.concatenate([retriever.query_embeds_from_vit(vit[i : i + 128])
                                                   for i in range(0, len(vit), 128)])).float()
        features = {"ViT [CLS]": vit[:, 0], "ViT patch mean": vit[:, 1:].mean(dim=1), "queries": queries.flatten(1)}
        labels = torch.tensor([attributes(scene) for scene in chosen])
        unseen = torch.tensor([any((t.colour, t.shape) in HELD_OUT for t in scene.things) for scene in chosen])
        return features, labels, unseen, torch.tensor([scene.relation is not None for scene in chosen])

    x_train, y_train, _, _ = views(train_scenes, 5, 0.0)
    x_test, y_test, unseen, two = views(test_scenes, 6, 0.5)
    names = ("layout", "colour 1", "shape 1", "size 1", "colour 2", "shape 2", "size 2")
    for view in x_train:
        right = torch.stack([_linear_probe(x_train[view], y_train[:, a], x_test[view], n) == y_test[:, a]
                             for a, n in enumerate(ATTRIBUTE_CLASSES)], dim=1)
        bound = right[:, [0, 1, 2, 4, 5]].all(dim=1)  # layout and both things' colour and shape
        print(f"scene probe, {view:14}, two-thing scenes: " + ", ".join(
            f"{name} {float(right[two, a].float().mean()):.2f}" for a, name in enumerate(names))
            + f"; all of layout, colours and shapes: seen pairs {float(bound[two & ~unseen].float().mean()):.2f}, "
            f"held-out {float(bound[two & unseen].float().mean()):.2f}")


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
    probe_objects(retriever)
    probe_scene(retriever)


if __name__ == "__main__":
    main()
