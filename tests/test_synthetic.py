"""The captioned synthetic data set: deterministic, held-out combinations only in the test split, and
captions that say what is drawn."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
from PIL import Image

from indexer.synthetic import (
    ATTRIBUTE_CLASSES, COLOURS, HELD_OUT, SHAPES, Scene, Thing, attributes, caption_attributes, colour_shapes, draw,
    draw_with_mask, foils, free_colour, layout, make_dataset, make_scene, paraphrase, parse, recolour, scenes, swaps,
)


def digest(directory) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())).hexdigest()


def pairs_in(caption: str) -> set[tuple[str, str]]:
    words = caption.replace("left of", "left").replace("right of", "right").split()
    found = set()
    for i, word in enumerate(words):
        shape = word.rstrip("s")
        if shape in SHAPES and words[i - 1] in COLOURS:
            found.add((words[i - 1], shape))
    return found


def test_same_seed_same_files_and_held_out_only_in_test(tmp_path):
    train, test = make_dataset(tmp_path / "a", 60, 20, seed=3)
    make_dataset(tmp_path / "b", 60, 20, seed=3)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    train_pairs = set().union(*(pairs_in(json.loads(l)["captions"][0]) for l in train.read_text().splitlines()))
    test_pairs = set().union(*(pairs_in(json.loads(l)["captions"][0]) for l in test.read_text().splitlines()))
    assert not train_pairs & HELD_OUT and test_pairs & HELD_OUT
    assert len(train.read_text().splitlines()) == 60 and Image.open(tmp_path / "a" / "images" / "test_00000.png").size == (128, 128)
    test_captions = [json.loads(l)["captions"][0] for l in test.read_text().splitlines()]
    assert all(pairs_in(c) == colour_shapes(c) for c in test_captions)


def test_captions_name_what_is_drawn():
    rng = random.Random(5)
    for _ in range(40):
        scene = make_scene(rng)
        pixels = np.asarray(draw(scene, 96, random.Random(1))).reshape(-1, 3)
        for thing in scene.things:  # every named colour is painted, in area about its named size
            area = np.all(pixels == COLOURS[thing.colour], axis=1).sum()
            assert area > 40, scene.caption
        assert scene.caption.startswith(("a ", "two ", "three "))
        if scene.relation:  # "X above Y": X's pixels sit higher; "X left of Y": further left
            grid = np.asarray(draw(scene, 96, random.Random(1)))
            first, second = (np.argwhere(np.all(grid == COLOURS[t.colour], axis=2)).mean(axis=0) for t in scene.things)
            axis, sign = {"above": (0, 1), "below": (0, -1), "left of": (1, 1), "right of": (1, -1)}[scene.relation]
            assert sign * (second[axis] - first[axis]) > 10, scene.caption


def test_free_colours_stand_out_and_never_paint_a_held_out_pair():
    rng = random.Random(2)
    background = (120, 120, 120)
    for shape in SHAPES:
        fills = [free_colour(shape, background, rng) for _ in range(300)]
        assert len(set(fills)) > 250  # random, not a palette
        for held_colour in (COLOURS[c] for c, s in HELD_OUT if s == shape):
            assert min(sum(abs(a - b) for a, b in zip(f, held_colour)) for f in fills) > 150
        assert min(sum(abs(a - b) for a, b in zip(f, background)) for f in fills) > 150
    near_purple = [free_colour("circle", background, rng) for _ in range(300)]  # purple circles are seen pairs
    assert min(sum(abs(a - b) for a, b in zip(f, COLOURS["purple"])) for f in near_purple) <= 150


def test_fills_paint_the_same_drawing_in_other_colours():
    scene = Scene((Thing("red", "circle", "small"), Thing("blue", "square", "large")), "above", (100, 100, 100), "")
    named, named_mask = draw_with_mask(scene, 96, random.Random(1))
    painted, mask = draw_with_mask(scene, 96, random.Random(1), [(1, 2, 3), (4, 5, 6)])
    assert np.array_equal(np.asarray(mask), np.asarray(named_mask))
    owner, pixels = np.asarray(mask), np.asarray(painted)
    assert np.all(pixels[owner == 1] == (1, 2, 3)) and np.all(pixels[owner == 2] == (4, 5, 6))
    assert np.array_equal(pixels[owner == 0], np.asarray(named)[owner == 0])


def test_recolour_paints_things_off_the_palette_never_as_a_held_out_pair_and_a_row_in_one_colour():
    rng, rows = random.Random(4), 0
    for scene in scenes(200, random.Random(3)):
        image, mask = recolour(scene, rng)
        pixels, owner = np.asarray(image), np.asarray(mask)
        fills = {}
        for number, thing in enumerate(scene.things, 1):
            if (owner == number).any():  # a thing may lie under another
                fill = fills[number] = tuple(int(v) for v in pixels[owner == number][0])
                assert fill != COLOURS[thing.colour]
                assert all(sum(abs(a - b) for a, b in zip(fill, COLOURS[c])) > 150 for c, s in HELD_OUT if s == thing.shape)
        if scene.relation is None and len(scene.things) > 1:
            rows += 1
            assert len(set(fills.values())) == 1, scene.caption
    assert rows > 20


def test_swaps_keep_every_word_and_change_what_goes_with_what():
    counted = 0
    for scene in scenes(300, random.Random(5)):
        swapped = swaps(scene)
        if scene.relation is None:
            assert swapped == []
            continue
        counted += len(swapped)
        assert 1 <= len(swapped) <= 3
        all_foils = {f.caption for f in foils(scene, random.Random(0), 1000)}
        for other in swapped:
            words = sorted(scene.caption.split())  # the relation turned: "B above A" in other words
            assert words in (sorted(other.caption.split()), sorted(paraphrase(other).split())), other.caption
            assert layout(other) != layout(scene) and other.caption in all_foils
            assert not any((t.colour, t.shape) in HELD_OUT for t in other.things)
    assert counted > 200


def test_one_layout_has_one_label_however_it_is_worded():
    red, blue = Thing("red", "circle", "small"), Thing("blue", "square", "large")
    above = Scene((red, blue), "above", (100, 100, 100), "a small red circle above a large blue square")
    below = Scene((blue, red), "below", (100, 100, 100), "a large blue square below a small red circle")
    assert layout(above) == layout(below) and attributes(above) == attributes(below)
    labels = attributes(above)
    assert len(labels) == len(ATTRIBUTE_CLASSES) and all(0 <= v < n for v, n in zip(labels, ATTRIBUTE_CLASSES))
    single = Scene((red,), None, (100, 100, 100), "a small red circle")
    assert attributes(single)[4:] == (len(COLOURS), len(SHAPES), 2)  # "no second thing"


def test_parse_reads_back_what_describe_wrote_and_labels_a_caption_as_its_scene():
    kinds = set()
    for scene in scenes(400, random.Random(8), held_out_share=0.3):
        kinds.add((len(scene.things), scene.relation))
        assert parse(scene.caption) == (scene.things, scene.relation)
        for text in (scene.caption, paraphrase(scene)):
            assert caption_attributes(text) == attributes(scene)
    assert {(1, None), (2, None), (3, None), (2, "above"), (2, "left of"), (2, "right of")} <= kinds
    red, blue = Thing("red", "circle", "small"), Thing("blue", "square", "large")
    above = caption_attributes("a small red circle above a large blue square")
    assert above != caption_attributes("a small blue circle above a large red square")  # which colour goes where
    assert above != caption_attributes("a small red circle below a large blue square")
    assert above == attributes(Scene((red, blue), "above", (0, 0, 0), ""))


def test_test_split_has_one_right_image_per_caption(tmp_path):
    _, test = make_dataset(tmp_path, 0, 200, seed=4)
    captions = [json.loads(l)["captions"][0] for l in test.read_text().splitlines()]
    assert len(set(captions)) == len(captions)
    assert 0.3 < sum(bool(colour_shapes(c) & HELD_OUT) for c in captions) / len(captions) < 0.7


def test_colour_shapes_reads_plurals_and_ignores_other_words():
    assert colour_shapes("two small red circles") == {("red", "circle")}
    assert colour_shapes("a large purple triangle left of a small green square.") == {("purple", "triangle"), ("green", "square")}
    assert colour_shapes("a red thing near a circle") == set()


def test_language_corpus_pairs_each_caption_with_a_wording_of_the_same_scene():
    from indexer.synthetic import caption_corpus

    texts = caption_corpus(400, random.Random(2))
    assert len(texts) == 400
    for first, second in zip(texts[::2], texts[1::2]):
        assert colour_shapes(first) == colour_shapes(second)
        assert (first == second) == (not any(r in first for r in ("above", "below", "left of", "right of")))
    assert any(colour_shapes(t) & HELD_OUT for t in texts)  # text has every pair; only images lack some


def test_foils_change_one_thing_and_never_describe_the_scene_or_a_held_out_pair():
    from indexer.synthetic import foils

    rng = random.Random(7)
    kinds = set()
    for _ in range(200):
        scene = make_scene(rng)
        for foil in foils(scene, rng, 50):
            assert layout(foil) != layout(scene) and foil.caption == make_caption(foil)
            assert not colour_shapes(foil.caption) & HELD_OUT
            words, truth = foil.caption.split(), scene.caption.split()
            if len(words) == len(truth):
                changed = [i for i, (a, b) in enumerate(zip(words, truth)) if a != b]
                kinds.add("swap" if len(changed) == 2 else "one word")
                assert len(changed) in (1, 2), (scene.caption, foil.caption)
    assert kinds == {"swap", "one word"}
    red, blue = Thing("red", "circle", "small"), Thing("blue", "square", "large")
    two = Scene((red, blue), "above", (100, 100, 100), "a small red circle above a large blue square")
    captions = {f.caption for f in foils(two, random.Random(0), 100)}
    assert {"a small blue circle above a large red square", "a small red square above a large blue circle",
            "a small red circle below a large blue square"} <= captions
    assert "a large blue square below a small red circle" not in captions  # the same scene in other words


def test_word_edits_are_every_colour_or_shape_word_changed_or_swapped_that_names_other_pairs():
    from indexer.synthetic import word_edits

    def by_words(caption: str) -> set[str]:  # the same, from the caption's words alone
        words, found = caption.split(), set()
        for i, word in enumerate(words):
            choices = COLOURS if word in COLOURS else [s + word[len(word.rstrip("s")):] for s in SHAPES] \
                if word.rstrip("s") in SHAPES else []
            found |= {" ".join(words[:i] + [other] + words[i + 1:]) for other in choices}
        if " a " in caption:  # two things: their colours swapped, their shapes swapped
            for a, b in ((2, -2), (3, -1)):
                swapped = list(words)
                swapped[a], swapped[b] = words[b], words[a]
                found.add(" ".join(swapped))
        return {edit for edit in found if colour_shapes(edit) != colour_shapes(caption)}

    rng = random.Random(11)
    for _ in range(100):
        scene = make_scene(rng, held_out=rng.random() < 0.3)
        edits = word_edits(scene)
        assert edits == sorted(by_words(scene.caption)), scene.caption
    two = Scene((Thing("red", "circle", "small"), Thing("blue", "square", "large")), "above", (0, 0, 0),
                "a small red circle above a large blue square")
    edits = word_edits(two)
    assert len(edits) == 2 * 7 + 2 * 2 + 2 and "a small red circle above a large yellow square" in edits  # held out
    assert "a small blue circle above a large red square" in edits and two.caption not in edits


def make_caption(scene):
    from indexer.synthetic import describe

    return describe(scene.things, scene.relation)


def test_training_set_foils_leave_the_images_alone_and_share_a_scene_number_only_with_their_layout():
    from indexer.synthetic import training_set

    plain, foiled = training_set(40, seed=2, corpus_size=10), training_set(40, seed=2, corpus_size=10, foils_per_scene=2)
    assert plain.captions == foiled.captions and plain.corpus == foiled.corpus and not plain.foils
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain.images, foiled.images))
    assert len(foiled.foils) == 80 and len(foiled.scene_ids) == 120
    assert plain.scene_ids == foiled.scene_ids[:40]
    for i, caption in enumerate(foiled.foils):  # a foil that is some image's caption has that image's number
        for j, truth in enumerate(foiled.captions):
            if caption == truth:
                assert foiled.scene_ids[40 + i] == foiled.scene_ids[j]


def test_swap_pairs_add_a_twin_drawn_alike_that_differs_in_what_goes_with_what():
    from indexer.synthetic import training_set

    plain = training_set(40, seed=2, corpus_size=10, with_swaps=True)
    paired = training_set(40, seed=2, corpus_size=10, with_swaps=True, swap_pairs=True)
    assert paired.captions[:40] == plain.captions and paired.corpus == plain.corpus
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain.images, paired.images))
    twins = [(i, j) for i, j in enumerate(paired.partners) if 0 <= j]
    assert len(paired.images) == len(paired.captions) == len(paired.partners) == 40 + len(twins) // 2
    assert {i for i, _ in twins} == {i for i, rows in enumerate(plain.swap_rows) if rows} | set(range(40, len(paired.images)))
    for i, j in twins:
        assert paired.partners[j] == i and paired.scene_ids[i] != paired.scene_ids[j]
        original, twin = (i, j) if i < j else (j, i)
        assert paired.captions[twin] in {s.caption for s in swaps(Scene(*parse(paired.captions[original]), (0, 0, 0), ""))}
        assert not pairs_in(paired.captions[twin]) & HELD_OUT
        a, b = np.asarray(paired.images[original]), np.asarray(paired.images[twin])
        assert a.shape == b.shape and (a[0, 0] == b[0, 0]).all()  # drawn alike: the same size and background
        assert 0 < (a != b).any(axis=2).mean() < 0.5  # only the things differ


def test_with_swaps_each_scene_draws_its_foils_like_its_swaps():
    """Foils join a scene's swap rows (so stage 1 uses them without a bank): its own foils first, then
    its swaps, none of them a caption of the scene."""
    from indexer.synthetic import training_set

    foiled = training_set(30, seed=3, corpus_size=10, foils_per_scene=2)
    both = training_set(30, seed=3, corpus_size=10, foils_per_scene=2, with_swaps=True)
    texts = [*both.captions, *both.foils]
    assert both.foils[:len(foiled.foils)] == foiled.foils
    start = 0
    for i, (caption, rows) in enumerate(zip(both.captions, both.swap_rows)):
        own = foils(Scene(*parse(caption), (0, 0, 0), caption), random.Random(0), 50)
        count = sum(1 for row in rows if row < 30 + len(foiled.foils))
        assert rows[:count] == list(range(30 + start, 30 + start + count)) and count == min(2, len(own))
        start += count
        assert {texts[r] for r in rows[count:]} == {s.caption for s in swaps(Scene(*parse(caption), (0, 0, 0), caption))}
        assert all(both.scene_ids[r] != both.scene_ids[i] for r in rows)
