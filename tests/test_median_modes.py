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


def _write_set(root, name: str, depth_m: np.ndarray) -> None:
    import json

    from PIL import Image

    (root / name / "rgb").mkdir(parents=True)
    (root / name / "depth").mkdir()
    (root / name / "meta.json").write_text(json.dumps({"source": "synthetic", "license": "test",
                                                       "intrinsics": None, "frames": 1}))
    Image.fromarray(np.full((480, 640, 3), 128, np.uint8)).save(root / name / "rgb" / "f0.jpg")
    Image.fromarray(np.round(depth_m * 1000).astype(np.uint16)).save(root / name / "depth" / "f0.png")


@pytest.fixture()
def holey_and_dense(tmp_path):
    """Two one-frame sets, the predictions a perfect dense model gives: the GT with holes filled."""
    rows = np.linspace(1.0, 4.0, 480)[:, None] + np.linspace(0, 0.5, 640)[None, :]
    dense = np.round(rows * 1000) / 1000
    holey = dense.copy()
    holey[::2, :] = 0
    holey[:, ::3] = 0
    data, predictions = tmp_path / "data", tmp_path / "pred"
    for name, depth in (("dense", dense), ("holey", holey)):
        _write_set(data, name, depth)
        (predictions / name).mkdir(parents=True)
        np.save(predictions / name / "f0.npy", fill_holes(depth)[None, None].astype(np.float32))
    return data, predictions


def test_evaluate_reports_the_ceiling_and_warns_exactly_for_the_holey_set(holey_and_dense, tmp_path):
    from lpcv_depth.stages.evaluate import EvaluateConfig, run_evaluate

    data, predictions = holey_and_dense
    result = run_evaluate(EvaluateConfig(data=data, predictions=predictions, out=tmp_path / "all", num_vis=0))
    sets = result.results.sets
    assert sets["dense"].ceiling_fscore == pytest.approx(100.0) and sets["dense"].invalid_share == 0
    assert sets["holey"].invalid_share > 0.5 and sets["holey"].ceiling_fscore < 90
    assert sets["holey"].metrics[FSCORE] == pytest.approx(sets["holey"].ceiling_fscore)
    [warning] = result.results.warnings
    assert warning.startswith("set holey:") and "--median valid" in warning
    assert result.manifest["config"]["median"] == "all" and result.summary["median"] == "all"
    frames = (tmp_path / "all" / "frames.csv").read_text().splitlines()
    assert "ceiling_fscore@0.1" in frames[0] and "share_of_ceiling" in frames[0]
    assert "median `all`" in (tmp_path / "all" / "summary.md").read_text()

    valid = run_evaluate(EvaluateConfig(data=data, predictions=predictions, out=tmp_path / "valid", num_vis=0,
                                        median="valid"))
    assert valid.results.sets["holey"].metrics[FSCORE] == pytest.approx(100.0)
    assert valid.results.sets["holey"].ceiling_fscore == pytest.approx(100.0)
    # Still warned: most of the set is holes, whatever the mode.
    assert [w.split(":")[0] for w in valid.results.warnings] == ["set holey"]

    quiet = run_evaluate(EvaluateConfig(data=data / "dense", predictions=predictions / "dense",
                                        out=tmp_path / "dense", num_vis=0))
    assert quiet.results.warnings == []
