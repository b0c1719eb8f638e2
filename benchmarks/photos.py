"""Photo-sized JPEGs for the benchmarks: gradients, shapes and sensor-like noise, so they compress
like photos (a few MB each) rather than like flat synthetic images. Every image has distinct content."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_photos(directory: Path, count: int, size: tuple[int, int] = (3000, 2000), seed: int = 0) -> list[Path]:
    from PIL import Image, ImageDraw

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    # One noise field, shifted per image: drawing fresh noise for every photo would dominate the time.
    noise = rng.normal(0, 14, (height, width, 3)).astype(np.int16)
    ramp_x = np.linspace(-1, 1, width, dtype=np.float32)[None, :, None]
    ramp_y = np.linspace(-1, 1, height, dtype=np.float32)[:, None, None]
    paths = []
    for i in range(count):
        path = directory / f"photo_{i:05d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        base = rng.uniform(40, 215, 3) + ramp_x * rng.uniform(-40, 40, 3) + ramp_y * rng.uniform(-40, 40, 3)
        shifted = np.roll(noise, (int(rng.integers(height)), int(rng.integers(width))), axis=(0, 1))
        image = Image.fromarray(np.clip(base.astype(np.int16) + shifted, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, width - 200)), int(rng.integers(0, height - 200))
            x1, y1 = x0 + int(rng.integers(100, width // 2)), y0 + int(rng.integers(100, height // 2))
            draw.ellipse((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        image.save(path, quality=92)
    return paths
