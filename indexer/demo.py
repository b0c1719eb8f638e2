"""A small built-in example collection: coloured shapes on plain backgrounds, with their descriptions."""

from __future__ import annotations

from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (240, 210, 30)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15)}


def make_demo_images(directory: Path) -> list[tuple[Path, str]]:
    """Writes 24 JPEGs (4 colours x 3 shapes x 2 backgrounds); returns (path, description) pairs."""
    from PIL import Image, ImageDraw

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            for background, bg in BACKGROUNDS.items():
                image = Image.new("RGB", (320, 240), bg)
                draw = ImageDraw.Draw(image)
                box = (100, 60, 220, 180)
                if shape == "circle":
                    draw.ellipse(box, fill=rgb)
                elif shape == "square":
                    draw.rectangle(box, fill=rgb)
                else:
                    draw.polygon([(160, 60), (100, 180), (220, 180)], fill=rgb)
                path = directory / f"{colour}-{shape}-on-{background}.jpg"
                image.save(path, quality=90)
                written.append((path, f"a {colour} {shape} on a {background} background"))
    return written
