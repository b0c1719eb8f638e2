"""Captioned synthetic images for training and evaluating a small BLIP-2: shapes with colours, sizes,
positions and counts on varied backgrounds, captioned like "a small red circle above a large blue
square". Deterministic for a seed. The test split holds colour-shape combinations that the training
split never shows, so an evaluation on it measures composition, not memory.

Files: `train.jsonl` and `test.jsonl` in the `blipsearch eval` format, images beside them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

COLOURS = {
    "red": (215, 35, 35), "green": (40, 170, 60), "blue": (45, 80, 225), "yellow": (240, 215, 35),
    "purple": (140, 50, 190), "orange": (245, 140, 30), "white": (250, 250, 250), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.22, "large": 0.42}  # side as a fraction of the image
RELATIONS = ("above", "below", "left of", "right of")
NUMBERS = {2: "two", 3: "three"}
# Never drawn in the training split; the test split draws them on purpose.
HELD_OUT = frozenset({("purple", "triangle"), ("orange", "circle"), ("yellow", "square")})


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    size: str


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    relation: str | None  # between things[0] and things[1] when there are two different things
    background: tuple[int, int, int]
    caption: str


def _thing(rng: random.Random, held_out: bool) -> Thing:
    """A random thing whose colour-shape pair is a held-out one exactly when `held_out`."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES if ((c, s) in HELD_OUT) == held_out]
    colour, shape = rng.choice(pairs)
    return Thing(colour, shape, rng.choice(list(SIZES)))


def _background(rng: random.Random, avoid: set[str]) -> tuple[int, int, int]:
    """A muted colour, far from every object colour in the scene so shapes stay visible."""
    while True:
        rgb = tuple(rng.randint(60, 200) for _ in range(3))
        if all(sum(abs(a - b) for a, b in zip(rgb, COLOURS[c])) > 150 for c in avoid):
            return rgb


def make_scene(rng: random.Random, held_out: bool = False) -> Scene:
    kind = rng.random()
    first = _thing(rng, held_out)
    if kind < 0.4:
        things, relation = (first,), None
        caption = f"a {first.size} {first.colour} {first.shape}"
    elif kind < 0.8:
        second = _thing(rng, False)
        while second.colour == first.colour:  # two colours, so each word points at one shape
            second = _thing(rng, False)
        relation = rng.choice(RELATIONS)
        things = (first, second)
        caption = f"a {first.size} {first.colour} {first.shape} {relation} a {second.size} {second.colour} {second.shape}"
    else:
        count = rng.choice(list(NUMBERS))
        things, relation = (first,) * count, None
        caption = f"{NUMBERS[count]} {first.size} {first.colour} {first.shape}s"
    return Scene(things, relation, _background(rng, {t.colour for t in things}), caption)


def draw(scene: Scene, size: int, rng: random.Random):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), scene.background)
    canvas = ImageDraw.Draw(image)
    for box, thing in zip(_boxes(scene, size, rng), scene.things):
        rgb = COLOURS[thing.colour]
        if thing.shape == "circle":
            canvas.ellipse(box, fill=rgb)
        elif thing.shape == "square":
            canvas.rectangle(box, fill=rgb)
        else:
            x0, y0, x1, y1 = box
            canvas.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=rgb)
    return image


def _boxes(scene: Scene, size: int, rng: random.Random) -> list[tuple[int, int, int, int]]:
    """One box per thing: the relation's two halves, or side by side for counts; jittered."""
    sides = [int(SIZES[t.size] * size) for t in scene.things]
    n = len(scene.things)
    if scene.relation in ("above", "below"):
        top, bottom = (0, 1) if scene.relation == "above" else (1, 0)
        centres = {top: (0.5, 0.27), bottom: (0.5, 0.73)}
    elif scene.relation in ("left of", "right of"):
        left, right = (0, 1) if scene.relation == "left of" else (1, 0)
        centres = {left: (0.27, 0.5), right: (0.73, 0.5)}
    else:
        centres = {i: ((i + 0.5) / n, 0.5) for i in range(n)}
    boxes = []
    for i, side in enumerate(sides):
        side = min(side, int(size / max(n, 2) * 0.9)) if n > 1 else side
        cx = centres[i][0] * size + rng.uniform(-0.04, 0.04) * size
        cy = centres[i][1] * size + rng.uniform(-0.04, 0.04) * size
        boxes.append((int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2)))
    return boxes


def make_dataset(directory: Path, train: int, test: int, seed: int = 0, size: int = 96) -> tuple[Path, Path]:
    """Write `train` + `test` captioned PNGs and their JSONL files; returns (train.jsonl, test.jsonl).

    Half of the test scenes feature a held-out colour-shape combination."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    out = []
    for split, count in (("train", train), ("test", test)):
        records = []
        for i in range(count):
            scene = make_scene(rng, held_out=split == "test" and i % 2 == 0)
            name = f"images/{split}_{i:05d}.png"
            draw(scene, size, rng).save(directory / name, optimize=False)
            records.append({"image": name, "captions": [scene.caption]})
        path = directory / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        out.append(path)
    return out[0], out[1]
