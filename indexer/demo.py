"""The built-in example collection: scenes of the synthetic shapes data set, drawn as JPEGs, with their
descriptions. Half feature a colour-shape pair that the shipped model never saw in training."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from indexer.synthetic import HELD_OUT, draw, scenes


@dataclass(frozen=True)
class DemoImage:
    path: Path
    description: str
    unseen_pair: bool  # shows a colour-shape pair absent from the training images


def make_demo_images(directory: Path, count: int = 40, seed: int = 2024, size: int = 256) -> list[DemoImage]:
    """Writes `count` JPEGs of distinct scenes (same seed, same files); returns them in order."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    written = []
    for number, scene in enumerate(scenes(count, rng, held_out_share=0.5, unique=True)):
        path = directory / f"shapes-{number:03d}.jpg"
        draw(scene, size, rng).save(path, quality=90)
        unseen = any((thing.colour, thing.shape) in HELD_OUT for thing in scene.things)
        written.append(DemoImage(path, scene.caption, unseen))
    return written
