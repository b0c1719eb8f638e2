"""Query vectors: texts with weights, concepts to push away from, or an example image.

Like rclip, several texts combine by weighted sum and `--not` texts are subtracted (weight -1 each
unless given); the sum is L2-normalised and scored by max-sim like a single text, which is exact
because max-sim is applied to the combined vector. ITM re-ranks by the positively weighted texts
alone (`TextQuery.itm_texts`): it tells how well an image matches a text, not how far it is from
one. An example image becomes the normalised mean of
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
        if not any(weight > 0 for weight in weights):
            # Nothing to look for: the sum would point away from everything named, and ITM can only
            # tell how well an image matches a text, not how far it is from one.
            raise UsageError("the query needs a text with a positive weight; give what to avoid with --not")
        return cls(tuple(parsed), tuple(weights), tuple(negatives))

    def itm_texts(self) -> tuple[tuple[str, ...], tuple[float, ...]]:
        """The texts ITM re-ranks by, those with a positive weight, and their weights summing to 1.
        Texts weighted zero or below, like `--not` texts, act on the ITC query vector alone."""
        kept = [(text, weight) for text, weight in zip(self.texts, self.weights) if weight > 0]
        largest = max(weight for _, weight in kept)
        scaled = [weight / largest for _, weight in kept]  # first, so that 1e308 + 1e308 stays finite
        return tuple(text for text, _ in kept), tuple(weight / sum(scaled) for weight in scaled)


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
    if not is_utf8(text):
        raise UsageError(f"the query text '{printable(text)}' is not valid UTF-8 (is the terminal's encoding UTF-8?)")


def printable(text: str) -> str:
    """`text` fit to print: bytes that were not UTF-8 as \\xff escapes (other lone surrogates as \\udxxx)."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def is_utf8(text: str) -> bool:
    """False for text holding lone surrogates: bytes that were not UTF-8 (in a command's arguments, say),
    which the tokenizer refuses with a TypeError and no database can store."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def combine(positive: np.ndarray, weights: tuple[float, ...], negative: np.ndarray | None, negative_weight: float):
    """Weighted sum of L2-normalised text vectors, minus the negatives, normalised again."""
    weights = np.asarray(weights, np.float64)
    has_negative = negative is not None and len(negative) > 0
    # Only the sum's direction counts: dividing by the largest weight keeps weights of 1e300 (whose
    # float32 products are inf) and 1e-300 (whose products are 0) in range.
    scale = max(float(np.abs(weights).max()), negative_weight if has_negative else 0.0)
    vector = ((weights / scale)[:, None] * positive.astype(np.float64)).sum(axis=0)
    if has_negative:
        vector = vector - (negative_weight / scale) * negative.astype(np.float64).sum(axis=0)
    norm = float(np.linalg.norm(vector))
    if norm < 1e-8:
        raise UsageError("the query's texts cancel out; change the weights or the --not texts")
    return (vector / norm).astype(np.float32)


def image_query_vector(query_embeds: np.ndarray) -> np.ndarray:
    """(Q, D) query embeddings of an example image -> one normalised (D,) query vector."""
    mean = query_embeds.mean(axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-8)).astype(np.float32)
