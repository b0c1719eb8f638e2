"""Ray benchmark, in one run: `blipsearch index --ray` (a local Ray: CPU decode actors and one model
actor) against the single-process `blipsearch index` on the same folder of photo-sized JPEGs, both
whole processes, with a check that both catalogs hold the same vectors.

On a 2-core machine Ray's actors share the cores the single process already uses, so this measures
Ray's overhead and checks correctness; Ray pays off with more machines and GPUs (see the README).

Run: python -m benchmarks.bench_ray [--images 300] [--megapixels 6]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.bench_index import timed


def vectors_by_hash(index_dir: Path) -> dict[str, np.ndarray]:
    from indexer.catalog import Catalog, sqlite_url

    catalog = Catalog.open(sqlite_url(index_dir / "catalog.sqlite"))
    try:
        identity = catalog.model()
        rows = {r.embedding_id: r.content_hash for r in catalog.files() if r.embedding_id is not None}
        ids, vectors = catalog.vectors(sorted(rows), identity.num_queries, identity.embed_dim)
        return {rows[int(i)]: v for i, v in zip(ids, vectors)}
    finally:
        catalog.close()


def main() -> None:
    from benchmarks.photos import make_photos
    from retrieval.tiny import make_retrieval

    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--megapixels", type=float, default=6.0)
    args = parser.parse_args()
    width = int((args.megapixels * 1e6 * 1.5) ** 0.5)
    size = (width, int(width / 1.5))
    with tempfile.TemporaryDirectory() as tmp:
        model = make_retrieval(Path(tmp) / "model")
        make_photos(Path(tmp) / "photos", args.images, size=size, seed=12)
        common = [sys.executable, "-m", "api.cli", "index", f"{tmp}/photos", "--model", str(model), "--json", "-q"]
        single_s, single_out = timed([*common, "--index", f"{tmp}/single"])
        ray_s, ray_out = timed([*common, "--index", f"{tmp}/ray", "--ray"])
        single, on_ray = json.loads(single_out), json.loads(ray_out)
        assert single["indexed"] == on_ray["indexed"] == args.images, (single, on_ray)
        a, b = vectors_by_hash(Path(tmp) / "single"), vectors_by_hash(Path(tmp) / "ray")
        assert a.keys() == b.keys()
        worst = max(float(np.abs(a[h] - b[h]).max()) for h in a)
    print(f"{args.images} JPEGs of {size[0]}x{size[1]}, tiny checkpoint, whole processes, {os.cpu_count()} cores:")
    print(f"  blipsearch index:       {single_s:6.1f} s, {args.images / single_s:5.1f} images/s")
    print(f"  blipsearch index --ray: {ray_s:6.1f} s, {args.images / ray_s:5.1f} images/s (local Ray, "
          f"{max(1, (os.cpu_count() or 2) - 1)} decode actor(s) + 1 model actor)")
    print(f"  ratio single/ray time = {single_s / ray_s:.2f}x; same vectors: largest difference {worst:.1e}")


if __name__ == "__main__":
    main()
