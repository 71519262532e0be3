"""Issue: GT with holes biases the official median scaling. `median="valid"` and the ceiling."""

from __future__ import annotations

import numpy as np
import pytest

from lpcv_depth.track3_metric import FSCORE, ZERO_DEPTH, ceiling_fscore, fill_holes, median_scale, score_frame


def _scene(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = np.linspace(1.0, 4.0, 120)[:, None]
    return (rows + rng.uniform(0, 0.5, (120, 160))).astype(np.float64)


def _official_reference(pred: np.ndarray, gt: np.ndarray) -> float:
    """The organizers' scale, written out: zeros to 1e-5, medians over every pixel."""
    pred = np.where(pred == 0, ZERO_DEPTH, pred)
    gt = np.where(gt == 0, ZERO_DEPTH, gt)
    return float(np.median(gt) / np.median(pred))


def test_without_holes_both_modes_agree_and_the_ceiling_is_100():
    gt = _scene()
    pred = gt * 0.37
    by_mode = {mode: score_frame(pred, gt, median=mode) for mode in ("all", "valid")}
    assert by_mode["all"] == by_mode["valid"]
    assert by_mode["all"][FSCORE] == pytest.approx(100.0)
    assert ceiling_fscore(gt) == pytest.approx(100.0) and ceiling_fscore(gt, median="valid") == pytest.approx(100.0)


def test_with_holes_all_is_the_organizers_number_and_valid_scores_a_perfect_prediction_100():
    gt = _scene()
    holes = gt.copy()
    holes[::3, :] = 0
    holes[:, ::4] = 0  # half the pixels invalid, as on the HoloLens frames
    perfect = fill_holes(holes)
    official = score_frame(perfect, holes)
    assert official["median_scale"] == pytest.approx(_official_reference(perfect, holes))
    assert official[FSCORE] < 90, "holes must bias the official scale"
    assert score_frame(perfect, holes, median="valid")[FSCORE] == pytest.approx(100.0)
    assert ceiling_fscore(holes) == pytest.approx(official[FSCORE])
    assert ceiling_fscore(holes, median="valid") == pytest.approx(100.0)


def test_fill_holes_and_median_scale_checks():
    gt = np.array([[0.0, 2.0], [4.0, 0.0]])
    np.testing.assert_array_equal(fill_holes(gt), [[3.0, 2.0], [4.0, 3.0]])
    with pytest.raises(ValueError, match="no valid"):
        fill_holes(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="median must be one of"):
        median_scale(gt, gt, gt > 0, "mean")
