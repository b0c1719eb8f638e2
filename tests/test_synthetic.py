"""The captioned synthetic data set: deterministic, held-out combinations only in the test split, and
captions that say what is drawn."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
from PIL import Image

from indexer.synthetic import COLOURS, HELD_OUT, SHAPES, draw, make_dataset, make_scene


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
    assert len(train.read_text().splitlines()) == 60 and Image.open(tmp_path / "a" / "images" / "test_00000.png").size == (96, 96)


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
