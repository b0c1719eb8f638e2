"""Session fixtures: tiny checkpoints and image folders, built once; helpers to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never touch a model hub

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    from retrieval.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_model(tiny_models) -> Path:
    return tiny_models[0]


@pytest.fixture(scope="session")
def retriever(tiny_model):
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever

    return Blip2Retriever.load(ModelConfig(name=str(tiny_model), device="cpu"))


def make_images(directory: Path, count: int, seed: int = 0, size=(160, 120)) -> list[Path]:
    """Distinct images: coloured shapes on varied backgrounds, so tiny models score them differently."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        background = tuple(int(c) for c in rng.integers(0, 256, 3))
        image = Image.new("RGB", size, background)
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x, y = (int(v) for v in rng.integers(0, size[0] - 40, 2))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            draw.ellipse((x, y, x + 40, y + int(rng.integers(20, 60))), fill=colour)
        path = directory / f"img{i:04d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def run_cli(*args: str, check: bool = False, timeout: float = 240, env: dict | None = None):
    """Run `blipsearch` as a real process, exactly as a user would."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", "api.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env=full_env,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"blipsearch {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def assert_consistent(index_dir: Path) -> None:
    """Catalog and FAISS file agree: every embedding has exactly its vectors, nothing else is stored."""
    import faiss

    from indexer.catalog import Catalog, sqlite_url

    catalog = Catalog.open(sqlite_url(index_dir / "catalog.sqlite"))
    try:
        identity = catalog.model()
        stored = faiss.read_index(str(index_dir / "vectors.faiss"))  # keep alive: id_map points into it
        ids = faiss.vector_to_array(stored.id_map).copy()
        embedding_ids = catalog.embedding_ids()
        files = catalog.files()
    finally:
        catalog.close()
    assert len(ids) == len(set(ids.tolist())), "duplicate vector ids"
    keys, per_key = np.unique(ids // identity.num_queries, return_counts=True)
    assert (per_key == identity.num_queries).all()
    assert keys.tolist() == embedding_ids.tolist()
    assert len({f.path for f in files}) == len(files)
    referenced = {f.embedding_id for f in files if f.status == "indexed"}
    assert referenced == set(embedding_ids.tolist()), "orphan or missing embeddings"
