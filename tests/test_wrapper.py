"""The Track 3 contract as the wrapper implements it, on every registered model and on backbones
whose output is known exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lpcv_depth.images import list_images, load_contract_batch
from lpcv_depth.models import ModelSpec, Track3Wrapper, create_model, get_spec, list_models

# Small backbone sizes keep the forward passes of the big ViTs quick; the contract does not care.
_ENCODER_SIZES = {"vits": (196, 252), "vitb": (196, 252), "vitl": (140, 182)}
FAST_INPUT_SIZE = {name: _ENCODER_SIZES[name[-4:]] for name in list_models() if name.startswith("depth_anything")}


def registered_models(slow: tuple[str, ...] = ()) -> list:
    """Every registered model; the metric ViT-B/L differ from ViT-S metric only in the shared encoder,
    so they run with -m slow to keep the default suite short, as do the names in `slow`."""
    heavy = {f"depth_anything_v2_metric_{d}_{e}" for d in ("hypersim", "vkitti") for e in ("vitb", "vitl")}
    heavy |= set(slow)
    return [pytest.param(name, marks=pytest.mark.slow) if name in heavy else name for name in list_models()]


def _random_model(name: str, output: str = "depth"):
    model = create_model(name, weights=None, output=output, input_size=FAST_INPUT_SIZE.get(name))
    head = getattr(model.backbone, "depth_head", None)
    if head is not None:
        # Random DA-V2 weights give a map within a few percent of one value, and the per-sample min-max
        # then magnifies float rounding ~50x. A wider last conv gives the map a real spread, so these
        # tests check the normalisation itself at 1e-5 (as real weights would), not amplified rounding.
        with torch.no_grad():
            last = head.scratch.output_conv2[2]
            last.weight.copy_(torch.randn(last.weight.shape, generator=torch.Generator().manual_seed(0)))
    return model


@pytest.fixture(scope="module")
def real_images(calibration_dir):
    return torch.from_numpy(load_contract_batch(list_images(calibration_dir)[:2]))


@pytest.mark.parametrize("name", registered_models())
def test_contract_shapes_and_range(name, real_images):
    model = _random_model(name)
    with torch.no_grad():
        out = model(real_images)
    assert out.shape == (2, 1, 480, 640) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    assert torch.allclose(out.amax(dim=(1, 2, 3)), torch.ones(2), atol=1e-4)


# ViT-L's normalisation is ViT-S/B's code on a wider encoder (40 s here): -m slow runs it.
@pytest.mark.parametrize("name", registered_models(slow=("depth_anything_v2_vitl",)))
@pytest.mark.parametrize("output", ["depth", "disparity"])
def test_normalisation_is_per_sample(name, output, real_images):
    # The published sample solution normalised over the whole batch, so an image's output changed
    # with its batch mates. Here a sample's output must not depend on the rest of the batch.
    # In float64: batched and single-image convolutions round differently in float32 (ViT-L: 1e-6 on
    # this AVX2 host), and the disparity-to-depth conversion magnifies that 1/floor = 20x, which would
    # hide what is tested here, the per-sample normalisation, behind kernel rounding.
    model = _random_model(name, output).double()
    images = real_images.double()
    with torch.no_grad():
        together = model(images)
        alone = torch.cat([model(images[i:i + 1]) for i in range(2)])
        swapped_partner = model(torch.stack([images[0], images[0].flip(-1) * 0.3]))
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(together[0], swapped_partner[0], atol=1e-5)


class KnownMap(nn.Module):
    """Ignores the image and returns a fixed positive map at the backbone resolution."""

    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.register_buffer("values", values)

    def forward(self, x):
        return self.values.expand(x.shape[0], -1, -1, -1)


def _wrap(values: torch.Tensor, native: str, output: str) -> Track3Wrapper:
    spec = ModelSpec(name=f"known_{native}", build=lambda: None, load_weights=lambda m, p: None,
                     native_input_size=(480, 640), patch_multiple=1, mean=(0, 0, 0), std=(1, 1, 1),
                     native_output=native, license="test", weight_source="test", default_weights=None)
    return Track3Wrapper(KnownMap(values), spec, output=output).eval()


def _depth_ramp() -> torch.Tensor:
    # metric depth from 0.5 m (top) to 8 m (bottom)
    return torch.linspace(0.5, 8.0, 480).view(1, 1, 480, 1).expand(1, 1, 480, 640).clone()


def test_depth_backbone_is_only_scaled_so_median_scaling_recovers_it():
    depth = _depth_ramp()
    out = _wrap(depth, "depth", "depth")(torch.zeros(1, 3, 480, 640))
    rescaled = out * depth.median() / out.median()
    # No min-max offset: the scorer's median scaling gives back the metric depth.
    assert torch.allclose(rescaled, depth, rtol=1e-4)


def test_min_max_offset_would_not_survive_median_scaling():
    # Why depth mode does not subtract the minimum: the same recovery fails for a min-max map.
    depth = _depth_ramp()
    min_max = (depth - depth.min()) / (depth.max() - depth.min())
    rescaled = min_max * depth.median() / min_max.median()
    assert (rescaled - depth).abs().max() > 0.5


def test_disparity_backbone_becomes_depth_ordered_and_bounded():
    depth = _depth_ramp()
    disparity = 3.0 / depth + 0.7  # affine-invariant disparity, as DA-V2 predicts
    out = _wrap(disparity, "disparity", "depth")(torch.zeros(1, 3, 480, 640))
    column = out[0, 0, :, 0]
    assert torch.all(column[1:] >= column[:-1]), "farther rows must get larger depth"
    floor = 0.05
    assert out.max().item() == pytest.approx(1.0, abs=1e-5)
    assert out.min().item() == pytest.approx(floor / (1 + floor), rel=1e-3)
    rank_corr = np.corrcoef(np.argsort(np.argsort(column.numpy())), np.arange(480))[0, 1]
    assert rank_corr > 0.999


def test_disparity_output_is_per_sample_min_max_of_disparity():
    disparity = 3.0 / _depth_ramp() + 0.7
    out = _wrap(disparity, "disparity", "disparity")(torch.zeros(2, 3, 480, 640))
    expected = (disparity - disparity.min()) / (disparity.max() - disparity.min())
    assert torch.allclose(out, expected.expand(2, -1, -1, -1), atol=1e-5)
    column = out[0, 0, :, 0]
    assert torch.all(column[1:] <= column[:-1]), "disparity mode keeps near = large"


def test_wrapper_normalises_with_the_model_mean_and_std():
    seen = {}

    class Probe(nn.Module):
        def forward(self, x):
            seen["x"] = x
            return torch.ones(x.shape[0], 1, 14, 14)

    spec = get_spec("depth_anything_v2_vits")
    wrapper = Track3Wrapper(Probe(), spec, input_size=(28, 28)).eval()
    pixel = torch.tensor([120.0, 60.0, 200.0]).view(1, 3, 1, 1).expand(1, 3, 480, 640)
    wrapper(pixel)
    expected = (torch.tensor([120.0, 60.0, 200.0]) / 255 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    assert seen["x"].shape == (1, 3, 28, 28)
    assert torch.allclose(seen["x"][0, :, 5, 5], expected, atol=1e-5)
