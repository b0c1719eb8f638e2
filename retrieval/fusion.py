"""How ITM re-ranking scores a candidate from its ITM logits and its ITC cosine.

LAVIS's `compute_sim_matrix` ranks ITC's top k by the positive ITM logit plus the ITC cosine. The two
live on different scales: among the top k of a trained model the cosines differ by hundredths, the
logits by units, so that sum is ITM's ranking with ITC as a tie-break. A model can instead carry a
weighting calibrated on held-out pairs (`blipsearch calibrate`, or `blipsearch train`): ITM log-odds
plus `itc_weight` x cosine, with the weight that ranks those pairs best. It lives beside the
checkpoint in `blipsearch_fusion.json`; a model without one (Salesforce's) keeps LAVIS's rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.errors import UsageError
from retrieval.loading import local_file

FUSION_FILE = "blipsearch_fusion.json"
# candidate weights, log-spaced: 0 is ITM alone, the largest ITC with ITM as a tie-break
WEIGHTS = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 100.0, 200.0, 1000.0)


@dataclass(frozen=True)
class Fusion:
    itc_weight: float | None = None  # None: LAVIS's rule

    @property
    def calibrated(self) -> bool:
        return self.itc_weight is not None

    def describe(self) -> str:
        if self.itc_weight is None:
            return "ITM logit + ITC (LAVIS)"
        return f"ITM log-odds + {self.itc_weight:g} x ITC (calibrated)"

    def combine(self, match_logit, log_odds, itc):
        """The re-ranking score; arrays or floats, `log_odds` the match logit minus the other."""
        if self.itc_weight is None:
            return match_logit + itc
        return log_odds + self.itc_weight * itc

    def combine_logits(self, itm_logits: np.ndarray, itc: np.ndarray) -> np.ndarray:
        """The same from ITM's (..., 2) logits, as the head gives them."""
        return self.combine(itm_logits[..., 1], itm_logits[..., 1] - itm_logits[..., 0], itc)


def read_fusion(model: str) -> Fusion:
    """The fusion stored with model `model` (a directory or a cached hub id), else LAVIS's rule."""
    path = local_file(model, FUSION_FILE)
    if path is None:
        return Fusion()
    try:
        weight = float(json.loads(path.read_text(encoding="utf-8"))["itc_weight"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path}: not a blipsearch fusion file ({exc}); delete it or rerun blipsearch calibrate") from None
    if not np.isfinite(weight) or weight < 0:
        raise UsageError(f"{path}: itc_weight must be a finite number at least 0, not {weight}")
    return Fusion(weight)


@dataclass(frozen=True)
class Calibration:
    """R@1 with each candidate weight, text->image and image->text, and with ITC alone."""

    weights: tuple[float, ...]
    text_to_image: tuple[float, ...]
    image_to_text: tuple[float, ...]
    itc_text_to_image: float
    itc_image_to_text: float

    @property
    def best(self) -> Fusion:
        """The weight with the best mean R@1 of the two directions; of equals, the smallest (most ITM)."""
        means = np.add(self.text_to_image, self.image_to_text)
        return Fusion(self.weights[int(np.flatnonzero(means == means.max())[0])])

    @property
    def improves_on_itc(self) -> bool:
        best = self.weights.index(self.best.itc_weight)
        return self.text_to_image[best] + self.image_to_text[best] > self.itc_text_to_image + self.itc_image_to_text


@dataclass(frozen=True)
class Candidates:
    """Each query's top candidates by ITC (in ITC's order), their ITM logits and which are right."""

    items: np.ndarray  # (queries, k) gallery index of each candidate
    itm_logits: np.ndarray  # (queries, k, 2)
    itc: np.ndarray  # (queries, k) cosine
    right: np.ndarray  # (queries, k) bool

    def first_right(self, scores: np.ndarray) -> np.ndarray:
        """(queries,) bool: whether the candidate `scores` (queries, k) ranks first is a right one."""
        return self.right[np.arange(len(scores)), scores.argmax(axis=1)]

    def recall_at_1(self, fusion: Fusion) -> float:
        return float(self.first_right(fusion.combine_logits(self.itm_logits, self.itc)).mean())


def calibrate(text_to_image: Candidates, image_to_text: Candidates, weights=WEIGHTS) -> Calibration:
    """R@1 of both directions' candidates re-ranked with each weight, and by ITC alone."""
    return Calibration(
        weights=tuple(weights),
        text_to_image=tuple(text_to_image.recall_at_1(Fusion(w)) for w in weights),
        image_to_text=tuple(image_to_text.recall_at_1(Fusion(w)) for w in weights),
        itc_text_to_image=float(text_to_image.first_right(text_to_image.itc).mean()),
        itc_image_to_text=float(image_to_text.first_right(image_to_text.itc).mean()),
    )


def write_fusion(directory: Path, calibration: Calibration, source: str) -> Path:
    """Stores the calibration's best weight, and the evidence for it (measured on `source`, said in
    words or as a file), beside a model's config.json."""
    path = Path(directory) / FUSION_FILE
    record = {
        "rule": "ITM log-odds + itc_weight x ITC cosine, over ITC's top candidates",
        "itc_weight": calibration.best.itc_weight,
        "calibrated_on": source,
        "recall_at_1": {
            "weights": list(calibration.weights),
            "text_to_image": list(calibration.text_to_image),
            "image_to_text": list(calibration.image_to_text),
            "itc_alone": {"text_to_image": calibration.itc_text_to_image,
                          "image_to_text": calibration.itc_image_to_text},
        },
    }
    try:
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}; copy the model to a directory you can write") from None
    return path
