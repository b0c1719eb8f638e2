"""The fusion of ITM and ITC scores: LAVIS's rule, a calibrated weight, choosing it and storing it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval.errors import UsageError
from retrieval.fusion import FUSION_FILE, Candidates, Fusion, calibrate, read_fusion, write_fusion


def test_lavis_rule_adds_the_positive_logit_and_a_calibrated_one_weighs_log_odds():
    logits = np.array([[1.0, 3.0], [2.0, -1.0]])
    itc = np.array([0.5, 0.25])
    assert Fusion().combine_logits(logits, itc).tolist() == [3.5, -0.75]
    assert Fusion(10.0).combine_logits(logits, itc).tolist() == [2.0 + 5.0, -3.0 + 2.5]
    assert not Fusion().calibrated and Fusion(0.0).calibrated


def _random_candidates(rng, queries=300, k=8) -> Candidates:
    """Candidates in ITC order, one right per query; ITM and ITC each informative and noisy."""
    right = np.zeros((queries, k), bool)
    right[np.arange(queries), rng.integers(0, k, queries)] = True
    itc = np.sort(rng.normal(0.3, 0.02, (queries, k)) + 0.02 * right, axis=1)[:, ::-1]
    log_odds = rng.normal(0, 2, (queries, k)) + 2 * right
    logits = np.stack([np.zeros_like(log_odds), log_odds], axis=-1)
    return Candidates(np.tile(np.arange(k), (queries, 1)), logits, itc, right)


def test_calibration_measures_each_weight_by_brute_force_and_picks_the_best():
    rng = np.random.default_rng(5)
    t2i, i2t = _random_candidates(rng), _random_candidates(rng)
    weights = (0.0, 1.0, 10.0, 100.0)
    calibration = calibrate(t2i, i2t, weights)
    for weight, got_t2i, got_i2t in zip(weights, calibration.text_to_image, calibration.image_to_text):
        for got, candidates in ((got_t2i, t2i), (got_i2t, i2t)):
            hits = [candidates.right[q, max(range(8), key=lambda j: candidates.itm_logits[q, j, 1]
                                            + weight * candidates.itc[q, j])] for q in range(300)]
            assert got == pytest.approx(np.mean(hits))
    means = np.add(calibration.text_to_image, calibration.image_to_text)
    assert calibration.best.itc_weight == weights[int(np.argmax(means))]
    assert calibration.itc_text_to_image == pytest.approx(t2i.right[:, 0].mean())  # ITC's first is column 0
    assert calibration.improves_on_itc == (means.max() > calibration.itc_text_to_image + calibration.itc_image_to_text)


def test_ties_go_to_the_smallest_weight():
    right = np.array([[True, False]])
    candidates = Candidates(np.array([[0, 1]]), np.array([[[0.0, 5.0], [0.0, 1.0]]]), np.array([[0.9, 0.8]]), right)
    assert calibrate(candidates, candidates, (2.0, 5.0, 9.0)).best == Fusion(2.0)


def test_fusion_file_round_trip_and_its_absence(tmp_path):
    assert read_fusion(str(tmp_path)) == Fusion()  # no file: LAVIS's rule
    right = np.array([[False, True]])
    candidates = Candidates(np.array([[0, 1]]), np.array([[[0.0, 0.0], [0.0, 4.0]]]), np.array([[0.9, 0.8]]), right)
    path = write_fusion(tmp_path, calibrate(candidates, candidates, (0.0, 100.0)), "two pairs")
    assert path == tmp_path / FUSION_FILE and read_fusion(str(tmp_path)) == Fusion(0.0)
    assert json.loads(path.read_text())["calibrated_on"] == "two pairs"


@pytest.mark.parametrize("text", ["not json", '{"weight": 3}', '{"itc_weight": -1}', '{"itc_weight": "NaN"}'])
def test_a_bad_fusion_file_is_a_clear_error(tmp_path, text):
    (tmp_path / FUSION_FILE).write_text(text)
    with pytest.raises(UsageError, match=FUSION_FILE):
        read_fusion(str(tmp_path))


def test_an_unwritable_model_directory_is_a_clear_error(tmp_path):
    candidates = Candidates(np.array([[0]]), np.zeros((1, 1, 2)), np.array([[0.5]]), np.array([[True]]))
    with pytest.raises(UsageError, match="cannot write"):
        write_fusion(tmp_path / "no-such-directory", calibrate(candidates, candidates, (1.0,)), "one pair")
