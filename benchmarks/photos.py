"""Photo-sized JPEGs for the benchmarks: smooth gradients, shapes and sensor-like noise, so they
compress like photos (a few MB each) rather than like flat synthetic images."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_photos(directory: Path, count: int, size: tuple[int, int] = (3000, 2000), seed: int = 0) -> list[Path]:
    from PIL import Image, ImageDraw

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for i in range(count):
        path = directory / f"photo_{i:04d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        a, b, c = rng.uniform(0, 255, 3), rng.uniform(-0.05, 0.05, 3), rng.uniform(-0.05, 0.05, 3)
        base = a[None, None, :] + xs[..., None] * b[None, None, :] + ys[..., None] * c[None, None, :]
        noise = rng.normal(0, 6, (height, width, 3)).astype(np.float32)
        image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = rng.integers(0, width - 200), rng.integers(0, height - 200)
            x1, y1 = x0 + rng.integers(100, 1200), y0 + rng.integers(100, 900)
            draw.ellipse((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        image.save(path, quality=90)
    return paths
