from __future__ import annotations

import pytest
import torch
from torch import nn

from lpcv_depth import models
from lpcv_depth.errors import UnknownModelError, WeightsError
from lpcv_depth.models import ModelSpec, create_model, get_spec, list_models, register_model
from tests.test_wrapper import registered_models


def test_registry_lists_all_builtin_models():
    assert {"depth_anything_v2_vits", "depth_anything_v2_vitb", "depth_anything_v2_vitl", "fastdepth"} <= set(list_models())


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(UnknownModelError) as excinfo:
        create_model("depth_anything_v3", weights=None)
    message = str(excinfo.value)
    for name in list_models():
        assert name in message


@pytest.mark.parametrize("name", list_models())
def test_every_model_declares_its_metadata(name):
    meta = get_spec(name).metadata()
    assert meta["license"] and meta["weight_source"]
    height, width = meta["native_input_size"]
    assert height % meta["patch_multiple"] == 0 and width % meta["patch_multiple"] == 0
    assert len(meta["mean"]) == len(meta["std"]) == 3
    assert meta["native_output"] in ("depth", "disparity")


def test_licences_follow_the_checkpoints():
    assert get_spec("depth_anything_v2_vits").license == "Apache-2.0"
    assert get_spec("depth_anything_v2_vitb").license.startswith("CC-BY-NC")
    assert get_spec("depth_anything_v2_vitl").license.startswith("CC-BY-NC")


@pytest.mark.parametrize("encoder,millions", [("vits", 24.8), ("vitb", 97.5), ("vitl", 335.3)])
def test_depth_anything_sizes_match_the_published_models(encoder, millions):
    # The official checkpoints are 24.8M / 97.5M / 335.3M parameters; a different count means a
    # different architecture, and strict loading would fail.
    backbone = get_spec(f"depth_anything_v2_{encoder}").build()
    assert round(sum(p.numel() for p in backbone.parameters()) / 1e6, 1) == millions


def test_depth_anything_uses_the_official_parameter_names():
    keys = set(get_spec("depth_anything_v2_vits").build().state_dict())
    for key in ("pretrained.cls_token", "pretrained.pos_embed", "pretrained.mask_token",
                "pretrained.patch_embed.proj.weight", "pretrained.blocks.11.attn.qkv.weight",
                "pretrained.blocks.0.ls1.gamma", "pretrained.blocks.0.mlp.fc2.bias", "pretrained.norm.weight",
                "depth_head.projects.3.weight", "depth_head.resize_layers.0.weight",
                "depth_head.resize_layers.3.bias", "depth_head.scratch.layer4_rn.weight",
                "depth_head.scratch.refinenet4.resConfUnit1.conv1.weight",
                "depth_head.scratch.refinenet1.out_conv.bias", "depth_head.scratch.output_conv1.weight",
                "depth_head.scratch.output_conv2.2.weight"):
        assert key in keys, key
    assert not any(k.startswith("pretrained.register_tokens") or "readout" in k for k in keys)
    assert "depth_head.scratch.layer1_rn.bias" not in keys  # the official layerN_rn convs have no bias


class TinyDepthNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x):
        return torch.nn.functional.softplus(self.conv(x))


def _load_tiny(net, path):
    from lpcv_depth.models.weights import load_state_dict_strict, load_torch_checkpoint

    load_state_dict_strict(net, load_torch_checkpoint(path), str(path))


TINY_SPEC = ModelSpec(name="tiny_test_net", build=TinyDepthNet, load_weights=_load_tiny,
                      native_input_size=(96, 128), patch_multiple=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                      native_output="depth", license="MIT", weight_source="tests", default_weights=None)


@pytest.fixture
def tiny_model_registered():
    register_model(TINY_SPEC, replace=True)
    yield TINY_SPEC
    models.registry._REGISTRY.pop(TINY_SPEC.name, None)


def test_user_model_is_one_registration_call(tiny_model_registered, tmp_path):
    source = TinyDepthNet()
    torch.save(source.state_dict(), tmp_path / "tiny.pth")
    model = create_model("tiny_test_net", weights=tmp_path / "tiny.pth")
    assert model.weights_info.source == "file"
    assert torch.equal(model.backbone.conv.weight, source.conv.weight)
    assert model(torch.rand(1, 3, 480, 640) * 255).shape == (1, 1, 480, 640)


def test_duplicate_registration_is_refused(tiny_model_registered):
    from lpcv_depth.errors import ConfigError

    with pytest.raises(ConfigError, match="already registered"):
        register_model(TINY_SPEC)


def test_random_weights_must_be_asked_for(tiny_model_registered):
    with pytest.raises(TypeError):
        create_model("tiny_test_net")  # weights is a required keyword: no silent random init
    with pytest.raises(WeightsError, match="declares no default weights"):
        create_model("tiny_test_net", weights="default")
    model = create_model("tiny_test_net", weights=None)
    assert model.weights_info.is_random


def test_random_init_is_reproducible_and_leaves_global_rng_alone(tiny_model_registered):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = create_model("tiny_test_net", weights=None)
    assert torch.equal(torch.rand(1), expected_next)
    b = create_model("tiny_test_net", weights=None)
    c = create_model("tiny_test_net", weights=None, seed=1)
    assert torch.equal(a.backbone.conv.weight, b.backbone.conv.weight)
    assert not torch.equal(a.backbone.conv.weight, c.backbone.conv.weight)


def test_input_size_must_fit_the_patch_multiple():
    from lpcv_depth.errors import ConfigError

    with pytest.raises(ConfigError, match="multiples of 14"):
        create_model("depth_anything_v2_vits", weights=None, input_size=(480, 640))


# The metric ViT-B/L and ViT-L build the same classes as ViT-S/B, only wider: -m slow traces them.
@pytest.mark.parametrize("name", registered_models(slow=("depth_anything_v2_vitl",)))
def test_every_model_traces_with_torch_fx_so_aimet_quantizes_every_op(name):
    # AIMET's QuantSim only quantizes nn.Modules; its model preparation turns functional ops into
    # modules with torch.fx, which fails on Python control flow over tensor shapes.
    multiple = get_spec(name).patch_multiple
    model = create_model(name, weights=None, input_size=(4 * multiple, 4 * multiple))  # small: fast on CPU
    traced = torch.fx.symbolic_trace(model)
    functions = {getattr(node.target, "__name__", str(node.target)) for node in traced.graph.nodes
                 if node.op == "call_function"}
    assert "interpolate" in functions, "the output resize must be traced, not hidden in an opaque call"
    image = torch.rand(1, 3, 480, 640) * 255
    with torch.no_grad():
        assert torch.equal(traced(image), model(image))
