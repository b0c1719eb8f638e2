"""Query vectors: texts with weights, concepts to push away from, or an example image.

Like rclip, several texts combine by weighted sum and `--not` texts are subtracted (weight -1 each
unless given); the sum is L2-normalised and scored by max-sim like a single text, which is exact
because max-sim is applied to the combined vector. An example image becomes the normalised mean of
its 32 query embeddings: the direction its queries share, scored by max-sim against each image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from retrieval.errors import UsageError

MAX_QUERY_CHARS = 1000


@dataclass(frozen=True)
class TextQuery:
    texts: tuple[str, ...]
    weights: tuple[float, ...]
    negatives: tuple[str, ...] = ()
    negative_weight: float = 1.0

    @classmethod
    def parse(cls, texts: list[str], negatives: list[str] = ()) -> "TextQuery":
        """`texts` items may carry a weight as `WEIGHT:text`, e.g. `2:red car`."""
        parsed, weights = [], []
        for raw in texts:
            text, weight = _split_weight(raw)
            parsed.append(text)
            weights.append(weight)
        for text in list(parsed) + list(negatives):
            validate_text(text)
        return cls(tuple(parsed), tuple(weights), tuple(negatives))


def _split_weight(raw: str) -> tuple[str, float]:
    """A finite number before the first colon is a weight; anything else, "nan: grandma's garden"
    included (Python reads "nan" and "inf" as numbers), is part of the text."""
    head, sep, tail = raw.partition(":")
    if sep:
        try:
            weight = float(head)
        except ValueError:
            weight = math.nan
        if math.isfinite(weight):
            return tail.strip(), weight
    return raw.strip(), 1.0


def validate_text(text: str) -> None:
    if not text or not text.strip():
        raise UsageError("the query text is empty")
    if len(text) > MAX_QUERY_CHARS:
        raise UsageError(f"the query text is longer than {MAX_QUERY_CHARS} characters")


def combine(positive: np.ndarray, weights: tuple[float, ...], negative: np.ndarray | None, negative_weight: float):
    """Weighted sum of L2-normalised text vectors, minus the negatives, normalised again."""
    vector = (np.asarray(weights, np.float32)[:, None] * positive).sum(axis=0)
    if negative is not None and len(negative):
        vector = vector - negative_weight * negative.sum(axis=0)
    norm = float(np.linalg.norm(vector))
    if norm < 1e-8:
        raise UsageError("the query's texts cancel out; change the weights or the --not texts")
    return (vector / norm).astype(np.float32)


def image_query_vector(query_embeds: np.ndarray) -> np.ndarray:
    """(Q, D) query embeddings of an example image -> one normalised (D,) query vector."""
    mean = query_embeds.mean(axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-8)).astype(np.float32)
