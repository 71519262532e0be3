"""The Track 3 metric against an independent brute-force reference, and its properties."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lpcv_depth.track3_metric import (FSCORE, METRICS, OFFICIAL_K, Intrinsics, backproject, fscore_against_reference,
                                      neighbour_within, pixel_grid, score_frame)

# A K that spreads a small test grid over about a metre, so the 0.1 / 0.2 m thresholds are crossed
# by lateral offsets as well as depth errors.
COARSE_K = Intrinsics(fx=9.0, fy=11.0, cx=7.3, cy=5.1)


def organizers_pixels(height: int, width: int) -> np.ndarray:
    """(2, H*W) pixel grid built exactly as the organizers' BackprojectDepth builds it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that meshgrid will need indexing=
        grid_w, grid_h = torch.meshgrid(torch.arange(width), torch.arange(height))
    return torch.stack((grid_w, grid_h)).view(2, -1).numpy()


def brute_force_track3(pred, gt, conf, K: Intrinsics, grid: str) -> dict[str, float]:
    """The metric from its definition with all-pairs distances; shares no code with the module."""
    height, width = gt.shape
    valid = gt > 0
    pred = np.where(pred == 0, 1e-5, pred).astype(np.float64)
    gt = np.where(gt == 0, 1e-5, gt).astype(np.float64)
    pred = pred * np.median(gt) / np.median(pred)
    if conf is None:
        metric_pixels = point_pixels = valid
    else:
        metric_pixels = conf >= 1
        point_pixels = conf == 2 if (conf == 2).any() else conf == 1
    g, p = gt[metric_pixels], pred[metric_pixels]
    ratio = np.maximum(g / p, p / g)
    result = {"abs_rel": np.mean(np.abs(g - p) / g), "sq_rel": np.mean((g - p) ** 2 / g),
              "rmse": np.sqrt(np.mean((g - p) ** 2)), "rmse_log": np.sqrt(np.mean((np.log(g) - np.log(p)) ** 2)),
              **{f"delta{i}": np.mean(ratio < 1.25 ** i) for i in (1, 2, 3)}}

    if grid == "official":
        pixels = organizers_pixels(height, width).astype(np.float64)
    else:
        xs, ys = np.meshgrid(np.arange(width), np.arange(height), indexing="xy")
        pixels = np.stack((xs.ravel(), ys.ravel())).astype(np.float64)
    k_inv = np.linalg.inv(np.array([[K.fx, 0, K.cx], [0, K.fy, K.cy], [0, 0, 1.0]]))
    rays = k_inv @ np.vstack((pixels, np.ones((1, height * width))))
    keep = point_pixels.ravel()
    pred_points = (rays * pred.ravel())[:, keep].T
    gt_points = (rays * gt.ravel())[:, keep].T
    distances = np.sqrt(((pred_points[:, None, :] - gt_points[None, :, :]) ** 2).sum(-1))
    for threshold in (0.1, 0.2):
        precision = np.mean(distances.min(axis=1) < threshold)
        recall = np.mean(distances.min(axis=0) < threshold)
        fscore = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        result.update({f"fscore@{threshold:g}": 100 * fscore, f"precision@{threshold:g}": 100 * precision,
                       f"recall@{threshold:g}": 100 * recall})
    return result


def random_frame(rng: np.random.Generator, shape=(12, 16), with_conf=True):
    """A slanted scene with holes, a noisy prediction with zeros, and a 0/1/2 confidence map."""
    height, width = shape
    rows, cols = np.mgrid[0:height, 0:width]
    gt = 1.0 + 2.0 * cols / width + 0.5 * rows / height + rng.normal(0, 0.05, shape)
    gt[rng.random(shape) < 0.15] = 0
    pred = (gt + rng.normal(0, 0.15, shape)).clip(0.2) * 0.37
    pred[rng.random(shape) < 0.05] = 0
    conf = rng.choice([0, 1, 2], size=shape, p=[0.2, 0.3, 0.5]).astype(np.uint8) if with_conf else None
    return pred.astype(np.float32), gt.astype(np.float32), conf


def assert_same_scores(got: dict, expected: dict):
    for name in METRICS:
        # The reference keeps 1e-5 in the input's float32, the module in float64: a relative 1e-7
        # on depth errors at invalid pixels. Point counts are exact, so F-scores must match exactly.
        assert got[name] == pytest.approx(expected[name], rel=1e-6, abs=1e-12), name


@pytest.mark.parametrize("grid", ["official", "xy"])
@pytest.mark.parametrize("K", [COARSE_K, OFFICIAL_K], ids=["coarse_K", "official_K"])
@pytest.mark.parametrize("with_conf", [True, False], ids=["conf", "no_conf"])
def test_matches_brute_force(grid, K, with_conf):
    rng = np.random.default_rng(7)
    for _ in range(8):
        pred, gt, conf = random_frame(rng, with_conf=with_conf)
        got = score_frame(pred, gt, conf, K=K, grid=grid)
        assert_same_scores(got, brute_force_track3(pred, gt, conf, K, grid))


def test_matches_brute_force_on_a_larger_frame():
    pred, gt, conf = random_frame(np.random.default_rng(3), shape=(36, 48))
    got = score_frame(pred, gt, conf, K=Intrinsics(fx=30.0, fy=30.0, cx=24.0, cy=18.0))
    assert_same_scores(got, brute_force_track3(pred, gt, conf, Intrinsics(fx=30.0, fy=30.0, cx=24.0, cy=18.0),
                                               "official"))


def test_neighbour_search_is_exact_near_the_thresholds():
    # Queries placed 0.05-0.3 m from a dense cloud: many fall where the approximate first search
    # cannot decide, so the exact second search must.
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 1, (3000, 3))
    directions = rng.normal(size=(2000, 3))
    queries = points[:2000] + directions / np.linalg.norm(directions, axis=1, keepdims=True) * rng.uniform(
        0.05, 0.3, (2000, 1))
    nearest = np.sqrt(((queries[:, None] - points[None]) ** 2).sum(-1)).min(axis=1)
    hits = neighbour_within(queries, points, (0.1, 0.2), workers=1)
    np.testing.assert_array_equal(hits, np.stack([nearest < 0.1, nearest < 0.2]))


@pytest.mark.parametrize("shape", [(5, 7), (7, 5), (480, 640)])
def test_official_grid_is_the_organizers_meshgrid(shape):
    height, width = shape
    expected = organizers_pixels(height, width)
    u, v = pixel_grid(height, width, "official")
    np.testing.assert_array_equal(np.stack((u, v)), expected)
    # It is not the pixel each depth value comes from: element k is pixel (k % W, k // W).
    u_xy, v_xy = pixel_grid(height, width, "xy")
    assert not np.array_equal(np.stack((u_xy, v_xy)), expected)
    np.testing.assert_array_equal(u_xy.reshape(shape), np.broadcast_to(np.arange(width), shape))


def test_backprojection_matches_the_organizers():
    height, width = 48, 64
    depth = np.random.default_rng(1).uniform(0.5, 4, (height, width))
    K = torch.tensor([[OFFICIAL_K.fx, 0, OFFICIAL_K.cx, 0], [0, OFFICIAL_K.fy, OFFICIAL_K.cy, 0],
                      [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float64)
    pix = torch.cat((torch.from_numpy(organizers_pixels(height, width)).double(), torch.ones(1, height * width)))
    expected = (K.inverse()[:3, :3] @ pix * torch.from_numpy(depth).flatten()).T.numpy()
    np.testing.assert_allclose(backproject(depth, OFFICIAL_K, "official"), expected, rtol=1e-12)


def test_grids_score_differently():
    pred, gt, _ = random_frame(np.random.default_rng(5), shape=(24, 32), with_conf=False)
    scores = {grid: score_frame(pred, gt, K=COARSE_K, grid=grid)[FSCORE] for grid in ("official", "xy")}
    assert scores["official"] != scores["xy"]


def test_points_come_from_conf_2_else_conf_1_else_valid_depth():
    pred, gt, conf = random_frame(np.random.default_rng(2))
    assert score_frame(pred, gt, conf)["n_points"] == (conf == 2).sum()
    only_ones = np.where(conf == 2, 0, conf)
    assert score_frame(pred, gt, only_ones)["n_points"] == (only_ones == 1).sum()
    assert score_frame(pred, gt, None)["n_points"] == (gt > 0).sum()
    with pytest.raises(ValueError, match="conf >= 1"):
        score_frame(pred, gt, np.zeros_like(conf))


def test_depth_metrics_use_only_conf_at_least_1():
    _, gt, conf = random_frame(np.random.default_rng(4))
    # Perfect where conf >= 1, scrambled where conf == 0; scrambling keeps the median (all pixels).
    pred = gt.copy()
    unscored = np.flatnonzero(conf == 0)
    pred.flat[unscored] = np.random.default_rng(0).permutation(pred.flat[unscored])
    assert not np.array_equal(pred, gt)
    result = score_frame(pred, gt, conf, K=COARSE_K)
    assert result["median_scale"] == 1 and result["abs_rel"] == 0 and result["delta1"] == 1
    assert result[FSCORE] == 100


def test_zeros_become_1e_minus_5():
    pred, gt, _ = random_frame(np.random.default_rng(6), with_conf=False)
    pred.flat[np.flatnonzero(gt > 0)[:3]] = 0
    explicit = np.where(pred == 0, 1e-5, pred.astype(np.float64))
    assert score_frame(pred, gt) == score_frame(explicit, gt)
    # Invalid GT pixels are not points: a GT of zeros with one valid pixel has exactly one point.
    single = np.zeros_like(gt)
    single[3, 4] = 2.0
    assert score_frame(pred, single)["n_points"] == 1


def test_scale_invariance():
    pred, gt, conf = random_frame(np.random.default_rng(8))
    # A zero becomes 1e-5 before scaling, so it is not scale-free; float64 keeps pred * 7 exact
    # enough for abs_rel at invalid GT pixels with conf >= 1 (GT 1e-5), which magnify any rounding.
    pred = np.where(pred == 0, 0.5, pred).astype(np.float64)
    base = score_frame(pred, gt, conf)
    scaled = score_frame(pred * 7, gt, conf)
    for name in METRICS:
        assert scaled[name] == pytest.approx(base[name], rel=1e-9, abs=1e-9), name


def test_perfect_prediction_scores_100():
    _, gt, conf = random_frame(np.random.default_rng(9))
    for c in (conf, None):
        result = score_frame(gt.copy(), gt, c, K=COARSE_K)
        assert result[FSCORE] == 100 and result["fscore@0.2"] == 100
        assert result["abs_rel"] == 0 and result["delta1"] == 1


def room_depth(height=60, width=80) -> np.ndarray:
    """A corridor: floor and walls receding from 1 m to 6 m, and a box at 2 m."""
    rows, cols = np.mgrid[0:height, 0:width]
    depth = 1.0 + 5.0 * (1 - rows / height) ** 2 + 2.0 * np.abs(cols - width / 2) / width
    depth[20:35, 30:45] = 2.0
    return depth


def test_disparity_scores_worse_than_depth():
    depth = room_depth()
    disparity = 1.0 / depth
    normalised_disparity = (disparity - disparity.min()) / (disparity.max() - disparity.min())
    K = Intrinsics(fx=60.0, fy=60.0, cx=40.0, cy=30.0)
    scores = {name: score_frame(pred, depth, K=K, grid=grid)[FSCORE]
              for grid in ("official", "xy")
              for name, pred in ((f"depth-{grid}", depth), (f"disparity-{grid}", disparity),
                                 (f"normalised-{grid}", normalised_disparity))}
    for grid in ("official", "xy"):
        assert scores[f"depth-{grid}"] == 100
        assert scores[f"disparity-{grid}"] < 60 and scores[f"normalised-{grid}"] < 60


def test_fscore_against_reference():
    reference = room_depth() / 6.0  # relative depth in [0, 1], like a model output
    assert fscore_against_reference(reference * 3, reference)[FSCORE] == 100
    noisy = reference * np.random.default_rng(0).normal(1, 0.05, reference.shape)
    result = fscore_against_reference(noisy, reference)
    assert 0 < result[FSCORE] < 100 and result["n_points"] == reference.size
    # The threshold is absolute, so the reference's assumed metric scale matters.
    assert fscore_against_reference(noisy, reference, reference_median_m=10)[FSCORE] < result[FSCORE]


def test_max_points_samples_the_same_pixels_reproducibly():
    pred, gt, conf = random_frame(np.random.default_rng(10), shape=(40, 50))
    sampled = score_frame(pred, gt, conf, K=COARSE_K, max_points=200)
    assert sampled["n_points"] == 200
    assert sampled == score_frame(pred, gt, conf, K=COARSE_K, max_points=200)
    assert score_frame(gt, gt, conf, max_points=200)[FSCORE] == 100


def test_intrinsics_scale_with_the_image():
    K = Intrinsics(fx=495.0, fy=495.0, cx=269.5, cy=169.0).scaled((540, 360), (640, 480))
    assert K.as_dict() == pytest.approx({"fx": 495 * 640 / 540, "fy": 495 * 480 / 360, "cx": 269.5 * 640 / 540,
                                         "cy": 169 * 480 / 360})
    with pytest.raises(ValueError):
        Intrinsics(fx=0.0, fy=1.0, cx=0.0, cy=0.0)


def test_bad_inputs_raise():
    pred, gt, _ = random_frame(np.random.default_rng(11), with_conf=False)
    with pytest.raises(ValueError, match="shape"):
        score_frame(pred[:-1], gt)
    with pytest.raises(ValueError, match="NaN"):
        score_frame(np.where(gt > 0, np.nan, pred), gt)
    with pytest.raises(ValueError, match="no valid"):
        score_frame(pred, np.zeros_like(gt))
    with pytest.raises(ValueError, match="grid"):
        score_frame(pred, gt, grid="yx")
    np.testing.assert_equal(score_frame(pred[None, None], gt)[FSCORE], score_frame(pred, gt)[FSCORE])
