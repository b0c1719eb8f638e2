"""ITM re-ranking: candidate files -> ViT features (feature cache, or decode + ViT in batches) -> ITM head.

This is the second half of LAVIS's `compute_sim_matrix`: the ITM head scores each (text, image)
pair on the image's ViT features. Files are decoded in parallel threads with draft-mode JPEG
decoding, so a 12 MP photo costs a fraction of a full decode. Callers pass one file per content
hash, so duplicates are scored once.
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from indexer.decode import CHANGED, Decoded, DecodeOptions, Skipped, decode_file
from indexer.features import FeatureCache
from retrieval.encoders import match_probability


@dataclass(frozen=True)
class Match:
    probability: float  # ITM match probability, weighted over the query's texts
    logit: float  # the positive ITM logit, weighted the same way
    log_odds: float  # the positive logit minus the other, weighted the same way


@dataclass
class Reranked:
    matches: dict[str, Match]  # content hash -> its match, for each whose features could be had
    changed: list[str]  # the content hashes whose files hold other content now: not scored


class Reranker:
    def __init__(self, retriever: Any, cache: FeatureCache | None = None, batch_size: int = 32,
                 decode_slots: Any = None) -> None:
        """`decode_slots`: a semaphore that every decode holds, where several searches run at once (a
        server's), so that their decodes together stay within the cores (and their memory)."""
        self.retriever = retriever
        self.cache = cache
        self.batch_size = batch_size
        self.decode_slots = decode_slots or contextlib.nullcontext()
        self.decode_options = DecodeOptions.for_indexed(retriever.transform)
        # Decoded and run through the ViT so far, and the seconds it took (not the cache's): on a CPU
        # with ViT-g that is seconds an image, which the CLI points out (`api.cli_search`).
        self.recomputed, self.recompute_seconds = 0, 0.0

    def score(self, files: dict[str, str], texts: Sequence[str], weights: Sequence[float]) -> Reranked:
        """`files`: content hash -> a path holding it; `weights` positive and summing to 1, as
        `TextQuery.itm_texts` gives them. A file that can no longer be decoded is left out, and one
        that holds other content now is too, but named: its score (and its cached features, under
        the hash it was indexed with) would be another image's."""
        matches: dict[str, Match] = {}
        changed: list[str] = []
        hashes = list(files)
        for start in range(0, len(hashes), self.batch_size):
            chunk, vit = self._features(hashes[start : start + self.batch_size], files, changed)
            if not chunk:
                continue
            probability = np.zeros(len(chunk))
            logit = np.zeros(len(chunk))
            log_odds = np.zeros(len(chunk))
            for text, weight in zip(texts, weights):
                logits = self.retriever.itm_logits(vit, [text]).astype(np.float64)
                probability += weight * match_probability(logits)
                logit += weight * logits[:, 1]
                log_odds += weight * (logits[:, 1] - logits[:, 0])
            for i, content_hash in enumerate(chunk):
                matches[content_hash] = Match(float(probability[i]), float(logit[i]), float(log_odds[i]))
        return Reranked(matches, changed)

    def _decode(self, path: str, content_hash: str) -> Decoded | Skipped:
        with self.decode_slots:
            return decode_file(path, self.decode_options, expected_hash=content_hash)

    def _features(self, hashes: list[str], files: dict[str, str], changed: list[str]):
        """(hashes with features, their ViT features stacked as one tensor on the model's device);
        appends to `changed` the hashes whose files hold other content now."""
        cached = {h: f for h in hashes if (f := self.cache.get(h) if self.cache else None) is not None}
        todo = [h for h in hashes if h not in cached]
        began = time.perf_counter()
        # Pillow decodes and resizes with the GIL released, so threads decode files in parallel.
        with ThreadPoolExecutor(max_workers=min(len(todo), os.cpu_count() or 1) or 1) as pool:
            outcomes = list(pool.map(self._decode, [files[h] for h in todo], todo))
        decoded = {h: o.pixels for h, o in zip(todo, outcomes) if isinstance(o, Decoded)}
        changed.extend(h for h, o in zip(todo, outcomes) if isinstance(o, Skipped) and o.reason == CHANGED)
        features: dict[str, Any] = dict(cached)
        if decoded:
            computed = self.retriever.vit_features(np.stack(list(decoded.values())))
            for content_hash, vit in zip(decoded, computed):
                features[content_hash] = vit
                if self.cache:
                    self.cache.put(content_hash, vit.float().cpu().numpy())
        self.recomputed += len(decoded)
        self.recompute_seconds += time.perf_counter() - began
        order = [h for h in hashes if h in features]
        if not order:
            return [], None
        return order, self.retriever.stack_vit_features([features[h] for h in order])
