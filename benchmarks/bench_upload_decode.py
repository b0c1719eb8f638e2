"""Uploaded query images (`POST /api/search/image`): decoded in a worker process, one at a time
(`workers.UntrustedDecoder`), against the baseline of decoding them in the serving process itself,
as uploads were before. The query's decode options; median of 15 each."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from indexer.decode import Decoded, DecodeOptions, decode_file
from indexer.workers import PoolOptions, UntrustedDecoder
from retrieval.preprocess import peek_transform
from retrieval.tiny import make_tiny


def main():
    tmp = Path(tempfile.mkdtemp())
    model, _ = make_tiny(tmp / "models")
    options = DecodeOptions.for_query(peek_transform(str(model)))
    rng = np.random.default_rng(0)
    photos = {}
    for name, (w, h), file in (("12 MP JPEG", (4000, 3000), "p.jpg"), ("1 MP PNG", (1200, 900), "p.png")):
        small = rng.integers(0, 256, (h // 50, w // 50, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(tmp / file, quality=90)
        photos[name] = str(tmp / file)
    decoder = UntrustedDecoder(PoolOptions(workers=1, timeout_s=10))
    began = time.perf_counter()
    assert isinstance(decoder(photos["1 MP PNG"], options), Decoded)
    print(f"first call (starts the worker): {(time.perf_counter() - began) * 1000:.0f} ms")
    for name, path in photos.items():
        times = {}
        for label, decode in (("in-process", decode_file), ("worker", decoder)):
            runs = []
            for _ in range(15):
                began = time.perf_counter()
                assert isinstance(decode(path, options), Decoded)
                runs.append(time.perf_counter() - began)
            times[label] = statistics.median(runs)
        print(f"{name}: in-process {times['in-process'] * 1000:.1f} ms, worker {times['worker'] * 1000:.1f} ms, "
              f"worker / in-process {times['worker'] / times['in-process']:.2f}x (median of 15)")
    decoder.close()


if __name__ == "__main__":
    main()
