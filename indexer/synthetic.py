"""Captioned synthetic images for training and evaluating a small BLIP-2: shapes with colours, sizes,
positions and counts on varied backgrounds, captioned like "a small red circle above a large blue
square". Deterministic for a seed. The test split holds colour-shape combinations that the training
split never shows, so an evaluation on it measures composition, not memory.

Files: `train.jsonl` and `test.jsonl` in the `blipsearch eval` format, images beside them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
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


def _random_colour(rng: random.Random, low: int, high: int, avoid: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    """A random colour, channels in [low, high], more than 150 (L1) from every colour in `avoid`."""
    while True:
        rgb = tuple(rng.randint(low, high) for _ in range(3))
        if all(sum(abs(a - b) for a, b in zip(rgb, other)) > 150 for other in avoid):
            return rgb


def _background(rng: random.Random, avoid: set[str]) -> tuple[int, int, int]:
    """A muted colour, far from every object colour in the scene so shapes stay visible."""
    return _random_colour(rng, 60, 200, [COLOURS[c] for c in avoid])


def free_colour(shape: str, background: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    """A random colour, not necessarily a named one, for a thing of `shape`: it stands out from
    `background` and is far from the colour of every held-out pair of `shape`, so a drawing in it
    never shows a held-out pair."""
    return _random_colour(rng, 0, 255, [COLOURS[c] for c, s in HELD_OUT if s == shape] + [background])


def make_scene(rng: random.Random, held_out: bool = False) -> Scene:
    kind = rng.random()
    first = _thing(rng, held_out)
    if kind < 0.4:
        things, relation = (first,), None
    elif kind < 0.8:
        second = _thing(rng, False)
        while second.colour == first.colour:  # two colours, so each word points at one shape
            second = _thing(rng, False)
        relation = rng.choice(RELATIONS)
        things = (first, second)
    else:
        things, relation = (first,) * rng.choice(list(NUMBERS)), None
    return Scene(things, relation, _background(rng, {t.colour for t in things}), describe(things, relation))


def describe(things: tuple[Thing, ...], relation: str | None) -> str:
    """The caption of `things`: one, two in `relation`, or a row of one kind."""
    first = things[0]
    if len(things) == 1:
        return f"a {first.size} {first.colour} {first.shape}"
    if relation is not None:
        second = things[1]
        return f"a {first.size} {first.colour} {first.shape} {relation} a {second.size} {second.colour} {second.shape}"
    return f"{NUMBERS[len(things)]} {first.size} {first.colour} {first.shape}s"


OPPOSITE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


def parse(caption: str) -> tuple[tuple[Thing, ...], str | None]:
    """The things and relation that a caption in `describe`'s words names: its inverse."""
    words = caption.split()
    counts = {word: n for n, word in NUMBERS.items()}
    if words[0] in counts:  # "two small red circles"
        return (Thing(words[2], words[3].removesuffix("s"), words[1]),) * counts[words[0]], None
    first = Thing(words[2], words[3], words[1])
    if len(words) == 4:
        return (first,), None
    return (first, Thing(words[-2], words[-1], words[-3])), " ".join(words[4:-4])


def foils(scene: Scene, rng: random.Random, count: int) -> list[Scene]:
    """Up to `count` scenes one change away from `scene`, captioned, each a layout of its own: one
    thing's colour, shape or size changed, two things' colours or shapes swapped, the relation turned
    round, the count changed. Never a held-out colour-shape pair, which training text must not name."""
    things, relation = scene.things, scene.relation
    changed = [(new, relation) for new in _one_thing_varied(things, relation, ("colour", "shape", "size"))]
    if relation is not None:
        changed += _swapped(things, relation)
    elif len(things) > 1:
        changed += [(things[:1] * n, None) for n in NUMBERS if n != len(things)]
    distinct = _trainable(scene, changed)
    return rng.sample(distinct, min(count, len(distinct)))


def word_edits(scene: Scene) -> list[str]:
    """Every caption that names other colour-shape pairs than `scene`'s own and differs from it in one
    colour or shape word, or in two things' colours or shapes swapped, held-out pairs included: what a
    captioner might write instead of the right caption."""
    things, relation = scene.things, scene.relation
    edited = _one_thing_varied(things, relation, ("colour", "shape"))
    if relation is not None:
        edited += [new for new, _ in _swapped(things, relation)[:2]]  # colours swapped, shapes swapped
    own = colour_shapes(scene.caption)
    return sorted(caption for caption in {describe(new, relation) for new in edited} if colour_shapes(caption) != own)


def _one_thing_varied(things: tuple[Thing, ...], relation: str | None, attributes: tuple[str, ...]):
    """`things` with one thing's value of one of `attributes` replaced by each value it can take (itself
    included); a row's things are one kind, so they vary together."""
    values = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}
    varied = things[:1] if relation is None else things
    return [tuple(other if j == i or relation is None else t for j, t in enumerate(things))
            for i, thing in enumerate(varied)
            for attribute in attributes for other in (replace(thing, **{attribute: v}) for v in values[attribute])]


def swaps(scene: Scene) -> list[Scene]:
    """The foils of `scene` that keep its words (the relation turned round: "B above A" in other words)
    and change what goes with what: two things' colours or shapes swapped, the relation turned
    round. A model that reads a caption as a bag of words cannot tell them from the scene's own
    caption (as ARO and Winoground test)."""
    return [] if scene.relation is None else _trainable(scene, _swapped(scene.things, scene.relation))


def _swapped(things: tuple[Thing, ...], relation: str) -> list[tuple[tuple[Thing, ...], str]]:
    first, second = things
    return [((replace(first, colour=second.colour), replace(second, colour=first.colour)), relation),
            ((replace(first, shape=second.shape), replace(second, shape=first.shape)), relation),
            (things, OPPOSITE[relation])]


def _trainable(scene: Scene, changed: list[tuple[tuple[Thing, ...], str | None]]) -> list[Scene]:
    """The changed scenes that training may show: drawable, without a held-out pair, and another
    layout than `scene`'s; one per caption, in caption order."""
    truth = layout(scene)
    candidates = {describe(t, r): Scene(t, r, scene.background, describe(t, r)) for t, r in changed
                  if (r is None or t[0].colour != t[1].colour)  # as make_scene draws them
                  and not any((x.colour, x.shape) in HELD_OUT for x in t)}
    return sorted((c for c in candidates.values() if layout(c) != truth), key=lambda c: c.caption)


def draw(scene: Scene, size: int, rng: random.Random):
    return draw_with_mask(scene, size, rng)[0]


def draw_with_mask(scene: Scene, size: int, rng: random.Random, fills: list[tuple[int, int, int]] | None = None):
    """The image, and an "L" mask of the same size whose pixels hold 1 + the index of the thing drawn
    there (0: background). `fills`: one RGB per thing instead of its named colour."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), scene.background)
    mask = Image.new("L", (size, size), 0)
    canvases = ((ImageDraw.Draw(image), None), (ImageDraw.Draw(mask), 0))
    fills = fills or [COLOURS[thing.colour] for thing in scene.things]
    for number, (box, thing, rgb) in enumerate(zip(_boxes(scene, size, rng), scene.things, fills), 1):
        for canvas, fill in canvases:
            fill = rgb if fill is None else number
            if thing.shape == "circle":
                canvas.ellipse(box, fill=fill)
            elif thing.shape == "square":
                canvas.rectangle(box, fill=fill)
            else:
                x0, y0, x1, y1 = box
                canvas.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return image, mask


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


def layout(scene: Scene) -> tuple:
    """What the image shows, independent of wording: "A above B" and "B below A" are one layout."""
    things = scene.things
    if len(things) == 1:
        return ("single", things[0])
    if scene.relation is None:
        return ("row", len(things), things[0])
    if scene.relation in ("above", "left of"):
        return ("vertical" if scene.relation == "above" else "horizontal", things[0], things[1])
    return ("vertical" if scene.relation == "below" else "horizontal", things[1], things[0])


LAYOUTS = ("single", "vertical", "horizontal", "row of 2", "row of 3")
# Classes of each attribute that `attributes` returns: layout, then colour, shape and size of the
# first thing (single, top, left or repeated) and of the second (bottom or right; last class: none).
ATTRIBUTE_CLASSES = (len(LAYOUTS), len(COLOURS), len(SHAPES), len(SIZES), len(COLOURS) + 1, len(SHAPES) + 1, len(SIZES) + 1)
COLOUR_ATTRIBUTES = (1, 4)  # the attributes that are a thing's colour


def attributes(scene: Scene) -> tuple[int, ...]:
    """Class labels of what is drawn, for pre-training an image encoder by attribute classification."""
    kind, *rest = layout(scene)
    if kind == "row":
        count, first = rest
        kind, rest = f"row of {count}", [first]
    first, second = rest[0], rest[1] if len(rest) > 1 else None

    def codes(thing: Thing | None) -> list[int]:
        if thing is None:
            return [len(COLOURS), len(SHAPES), len(SIZES)]
        return [list(COLOURS).index(thing.colour), SHAPES.index(thing.shape), list(SIZES).index(thing.size)]

    return (LAYOUTS.index(kind), *codes(first), *codes(second))


def caption_attributes(caption: str) -> tuple[int, ...]:
    """`attributes` of the scene a caption describes, read from its words: what a text encoder can learn
    to tell from the caption alone ("A above B" and "B below A" alike)."""
    things, relation = parse(caption)
    return attributes(Scene(things, relation, (0, 0, 0), caption))


def colour_shapes(caption: str) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a caption names, e.g. {("red", "circle")} for "two small red circles"."""
    words = caption.lower().replace(".", " ").split()
    found = set()
    for previous, word in zip(words, words[1:]):
        shape = word[:-1] if word.endswith("s") and word[:-1] in SHAPES else word
        if shape in SHAPES and previous in COLOURS:
            found.add((previous, shape))
    return found


def scenes(count: int, rng: random.Random, held_out_share: float = 0.0, unique: bool = False) -> list[Scene]:
    """`count` scenes; each features a held-out pair with probability `held_out_share`; with `unique`
    no two show the same layout, so each caption has exactly one right image."""
    out, seen = [], set()
    while len(out) < count:
        scene = make_scene(rng, held_out=rng.random() < held_out_share)
        if unique and layout(scene) in seen:
            continue
        seen.add(layout(scene))
        out.append(scene)
    return out


def render(scene: Scene, rng: random.Random, sizes: tuple[int, int] = (64, 192),
           fills: list[tuple[int, int, int]] | None = None):
    """The scene and its mask drawn at a random size in `sizes`, so a model sees shapes at many scales of detail."""
    return draw_with_mask(scene, rng.randint(*sizes), rng, fills)


def recolour(scene: Scene, rng: random.Random):
    """The scene rendered in free colours (`free_colour`) instead of its named ones: each thing its own,
    the things of a row one, as a row is things of one colour. Shown to the image encoder with its
    colour labels ignored, such drawings put every shape in many colours without ever drawing a
    held-out pair, so colour stops telling shape."""
    if scene.relation is None:
        fills = [free_colour(scene.things[0].shape, scene.background, rng)] * len(scene.things)
    else:
        fills = [free_colour(thing.shape, scene.background, rng) for thing in scene.things]
    return render(scene, rng, fills=fills)


# Classes of what covers an image region: colour, shape, size of the thing there; last class: background.
REGION_CLASSES = (len(COLOURS) + 1, len(SHAPES) + 1, len(SIZES) + 1)


def region_codes(scene: Scene) -> list[tuple[int, int, int]]:
    """Entry m: the classes of mask value m (0: background, m: thing m - 1)."""
    background = (len(COLOURS), len(SHAPES), len(SIZES))
    return [background] + [(list(COLOURS).index(t.colour), SHAPES.index(t.shape), list(SIZES).index(t.size))
                           for t in scene.things]


def paraphrase(scene: Scene) -> str:
    """The scene's caption worded the other way round where there is one ("B below A" for "A above B")."""
    if scene.relation is None:
        return scene.caption
    return describe(scene.things[::-1], OPPOSITE[scene.relation])


def caption_corpus(count: int, rng: random.Random) -> list[str]:
    """Text for pre-training a language model: captions of the data set's grammar over every
    colour-shape pair, held-out ones included, as a real LLM has read about purple triangles without
    ever seeing one in the image-text data. They come in pairs, a caption then the same scene in other
    or the same words, so the model learns that earlier text tells what comes next, as in real
    documents; packed one after another, independent captions would teach it to ignore its context,
    and so the soft prompt of stage 2."""
    texts = []
    for _ in range(count // 2):
        scene = make_scene(rng, held_out=rng.random() < len(HELD_OUT) / (len(COLOURS) * len(SHAPES)))
        texts += [scene.caption, paraphrase(scene)] if rng.random() < 0.5 else [paraphrase(scene), scene.caption]
    return texts


def make_dataset(directory: Path, train: int, test: int, seed: int = 0, size: int = 128) -> tuple[Path, Path]:
    """Write `train` + `test` captioned PNGs and their JSONL files; returns (train.jsonl, test.jsonl).

    Half of the test scenes feature a held-out colour-shape combination, and no two test scenes show
    the same layout, so every test caption has one right image."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    out = []
    for split, count in (("train", train), ("test", test)):
        records = []
        chosen = scenes(count, rng, held_out_share=0.5, unique=True) if split == "test" else scenes(count, rng)
        for i, scene in enumerate(chosen):
            name = f"images/{split}_{i:05d}.png"
            draw(scene, size, rng).save(directory / name, optimize=False)
            records.append({"image": name, "captions": [scene.caption]})
        path = directory / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        out.append(path)
    return out[0], out[1]


def training_set(count: int, seed: int = 0, corpus_size: int = 20_000, foils_per_scene: int = 0,
                 recolour_share: float = 0.0, with_swaps: bool = False, swap_pairs: bool = False):
    """`count` scenes with no held-out pair, rendered, captioned and labelled, plus caption text over
    every pair for the language model, `foils_per_scene` foils of each scene's caption, and for about
    `recolour_share` of the scenes a second drawing in free colours (`recolour`) for the image
    encoder, and `with_swaps`, each scene's `swaps` after the foils, their places in `swap_rows`
    (with its foils' places first: stage 1 then learns from foils as from swaps, without a bank);
    with `swap_pairs`, each scene that has swaps also has one of them drawn alike (`twin`), a training
    image of its own after the `count`, the two each other's `partners`:
    the input of `retrieval.train.recipe.train`."""
    from retrieval.train.recipe import TrainingSet

    rng = random.Random(seed)
    chosen = scenes(count, rng)
    states, drawn = [], []
    for scene in chosen:
        states.append(rng.getstate())
        drawn.append(render(scene, rng))
    corpus = caption_corpus(corpus_size, rng)
    partners = [-1] * count if swap_pairs else []
    twin_rng = random.Random(f"swap pairs {seed}")  # its own stream: the rest does not depend on it
    for i, scene in enumerate(chosen[:count] if swap_pairs else []):
        if options := swaps(scene):
            partners[i] = len(chosen)
            partners.append(i)
            chosen.append(twin_rng.choice(options))
            drawn.append(twin(chosen[-1], states[i]))
    # drawn after the rest, so that the images and texts of a seed do not depend on how many foils
    foiled: list[Scene] = []  # texts are the captions, then these: each new one's row is the next

    def add(more: list[Scene]) -> list[int]:
        foiled.extend(more)
        return list(range(len(chosen) + len(foiled) - len(more), len(chosen) + len(foiled)))

    foil_rows = [add(foils(scene, rng, foils_per_scene)) for scene in chosen]
    # with swaps: each scene's swaps' rows, after its foils' when it has them
    swap_rows = [foil_rows[i] + add(swaps(scene)) for i, scene in enumerate(chosen if with_swaps else [])]
    recolour_rng = random.Random(f"recolour {seed}")  # its own stream: the rest does not depend on the share
    recoloured = {i: recolour(scene, recolour_rng) for i, scene in enumerate(chosen)
                  if recolour_rng.random() < recolour_share}
    numbers: dict[tuple, int] = {}
    return TrainingSet(
        images=[image for image, _ in drawn], captions=[scene.caption for scene in chosen],
        scene_ids=[numbers.setdefault(layout(scene), len(numbers)) for scene in [*chosen, *foiled]],
        attributes=[attributes(scene) for scene in chosen], attribute_classes=ATTRIBUTE_CLASSES,
        masks=[mask for _, mask in drawn], region_codes=[region_codes(scene) for scene in chosen],
        region_classes=REGION_CLASSES, corpus=corpus, foils=[foil.caption for foil in foiled], recoloured=recoloured,
        swap_rows=swap_rows, partners=partners,
    )


def twin(swapped: Scene, state: object):
    """A swap of a scene drawn from the random state its scene was drawn from: the same size, background
    and places, so that the two images differ only in what goes with what (for a relation turned
    round, the two things trade places)."""
    rng = random.Random()
    rng.setstate(state)
    return render(swapped, rng)
