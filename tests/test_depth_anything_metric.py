"""Depth-Anything-V2 metric models (Hypersim indoor, VKITTI outdoor): registry entries, official
checkpoint layout, parity with transformers' metric head, and the wrapper's depth path."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from lpcv_depth.models import create_model, get_spec, list_models

METRIC = {f"depth_anything_v2_metric_{dataset}_{encoder}": (encoder, dataset, max_depth)
          for dataset, max_depth in (("hypersim", 20.0), ("vkitti", 80.0)) for encoder in ("vits", "vitb", "vitl")}
# From the official code (DINOv2 vit_small/base/large and metric_depth/depth_anything_v2/dpt.py's
# model_configs): embed dim, blocks, DPT features, DPT out_channels.
OFFICIAL = {"vits": (384, 12, 64, (48, 96, 192, 384)), "vitb": (768, 12, 128, (96, 192, 384, 768)),
            "vitl": (1024, 24, 256, (256, 512, 1024, 1024))}


def official_state_shapes(encoder: str) -> dict[str, tuple[int, ...]]:
    """Every key of an official metric checkpoint with its shape, written from the official modules."""
    dim, depth, features, channels = OFFICIAL[encoder]
    shapes: dict[str, tuple[int, ...]] = {
        "pretrained.cls_token": (1, 1, dim), "pretrained.pos_embed": (1, 37 * 37 + 1, dim),
        "pretrained.mask_token": (1, dim), "pretrained.patch_embed.proj.weight": (dim, 3, 14, 14),
        "pretrained.patch_embed.proj.bias": (dim,), "pretrained.norm.weight": (dim,), "pretrained.norm.bias": (dim,)}
    for i in range(depth):
        block = f"pretrained.blocks.{i}."
        shapes.update({block + "norm1.weight": (dim,), block + "norm1.bias": (dim,),
                       block + "attn.qkv.weight": (3 * dim, dim), block + "attn.qkv.bias": (3 * dim,),
                       block + "attn.proj.weight": (dim, dim), block + "attn.proj.bias": (dim,),
                       block + "ls1.gamma": (dim,), block + "norm2.weight": (dim,), block + "norm2.bias": (dim,),
                       block + "mlp.fc1.weight": (4 * dim, dim), block + "mlp.fc1.bias": (4 * dim,),
                       block + "mlp.fc2.weight": (dim, 4 * dim), block + "mlp.fc2.bias": (dim,),
                       block + "ls2.gamma": (dim,)})
    head = "depth_head."
    for i, c in enumerate(channels):
        shapes[f"{head}projects.{i}.weight"] = (c, dim, 1, 1)
        shapes[f"{head}projects.{i}.bias"] = (c,)
        shapes[f"{head}scratch.layer{i + 1}_rn.weight"] = (features, c, 3, 3)
    for index, kernel in ((0, 4), (1, 2)):
        shapes[f"{head}resize_layers.{index}.weight"] = (channels[index], channels[index], kernel, kernel)
        shapes[f"{head}resize_layers.{index}.bias"] = (channels[index],)
    shapes[f"{head}resize_layers.3.weight"] = (channels[3], channels[3], 3, 3)
    shapes[f"{head}resize_layers.3.bias"] = (channels[3],)
    for n in range(1, 5):
        fusion = f"{head}scratch.refinenet{n}."
        shapes[fusion + "out_conv.weight"] = (features, features, 1, 1)
        shapes[fusion + "out_conv.bias"] = (features,)
        for unit in ("resConfUnit1", "resConfUnit2"):
            for conv in ("conv1", "conv2"):
                shapes[f"{fusion}{unit}.{conv}.weight"] = (features, features, 3, 3)
                shapes[f"{fusion}{unit}.{conv}.bias"] = (features,)
    shapes.update({f"{head}scratch.output_conv1.weight": (features // 2, features, 3, 3),
                   f"{head}scratch.output_conv1.bias": (features // 2,),
                   f"{head}scratch.output_conv2.0.weight": (32, features // 2, 3, 3),
                   f"{head}scratch.output_conv2.0.bias": (32,),
                   f"{head}scratch.output_conv2.2.weight": (1, 32, 1, 1),
                   f"{head}scratch.output_conv2.2.bias": (1,)})
    return shapes


def test_every_metric_model_is_registered_with_its_semantics():
    assert set(METRIC) <= set(list_models())
    for name, (encoder, dataset, max_depth) in METRIC.items():
        spec = get_spec(name)
        meta = spec.metadata()
        assert spec.native_output == "depth" and spec.max_depth == max_depth
        assert meta["max_depth"] == max_depth and meta["output_semantics"].startswith("metric depth")
        assert spec.hub_weights.filename == f"depth_anything_v2_metric_{dataset}_{encoder}.pth"
        label = {"hypersim": "Hypersim", "vkitti": "VKITTI"}[dataset]
        size = {"vits": "Small", "vitb": "Base", "vitl": "Large"}[encoder]
        assert spec.hub_weights.repo_id == f"depth-anything/Depth-Anything-V2-Metric-{label}-{size}"
    assert get_spec("depth_anything_v2_vits").max_depth is None


@pytest.mark.parametrize("name", sorted(METRIC))
def test_official_layout_checkpoint_loads_strictly(name, tmp_path):
    encoder, dataset, _ = METRIC[name]
    expected = official_state_shapes(encoder)
    backbone = get_spec(name).build()
    assert {k: tuple(v.shape) for k, v in backbone.state_dict().items()} == expected
    if encoder == "vitl":
        return  # 335M parameters: the shapes above already pin the layout; loading it takes a minute
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=generator) * 0.02 for k, shape in expected.items()}
    path = tmp_path / f"depth_anything_v2_metric_{dataset}_{encoder}.pth"
    torch.save(state, path)
    model = create_model(name, weights=path, input_size=(98, 98))
    loaded = model.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert model.weights_info.source == "file" and model.weights_info.path.endswith(path.name)
    assert len(model.weights_info.sha256) == 64


def test_a_relative_checkpoint_in_a_metric_entry_warns_with_the_right_file(tmp_path, caplog):
    state = get_spec("depth_anything_v2_vits").build().state_dict()
    relative = tmp_path / "depth_anything_v2_vits.pth"
    torch.save(state, relative)
    with caplog.at_level(logging.WARNING, logger="lpcv_depth.models"):
        create_model("depth_anything_v2_metric_hypersim_vits", weights=relative, input_size=(98, 98))
    message = caplog.text
    assert "depth_anything_v2_vits.pth is the official checkpoint of another model (relative vits)" in message
    assert "depth_anything_v2_metric_hypersim_vits.pth" in message
    assert "Depth-Anything-V2-Metric-Hypersim-Small" in message
    caplog.clear()
    metric = tmp_path / "depth_anything_v2_metric_vkitti_vits.pth"
    torch.save(state, metric)
    with caplog.at_level(logging.WARNING, logger="lpcv_depth.models"):
        create_model("depth_anything_v2_vits", weights=metric, input_size=(98, 98))
        create_model("depth_anything_v2_metric_hypersim_vits", weights=metric, input_size=(98, 98))
    assert caplog.text.count("is the official checkpoint of another model (metric VKITTI vits)") == 2
    caplog.clear()
    right = tmp_path / "depth_anything_v2_metric_hypersim_vits.pth"
    torch.save(state, right)
    with caplog.at_level(logging.WARNING, logger="lpcv_depth.models"):
        create_model("depth_anything_v2_metric_hypersim_vits", weights=right, input_size=(98, 98))
    assert "another model" not in caplog.text


def test_wrapper_divides_metric_depth_by_its_per_sample_maximum_without_a_floor():
    model = create_model("depth_anything_v2_metric_hypersim_vits", weights=None, input_size=(98, 126))
    image = torch.rand(2, 3, 480, 640) * 255
    with torch.no_grad():
        out = model(image)
        x = (image - model.pixel_mean) / model.pixel_std
        x = torch.nn.functional.interpolate(x, size=(98, 126), mode="bilinear", align_corners=False)
        raw = model.backbone(x)
        raw = torch.nn.functional.interpolate(raw, size=(480, 640), mode="bilinear", align_corners=False)
    assert 0 < raw.min() and raw.max() < 20.0
    expected = raw / raw.amax(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(out, expected)
    assert model.describe()["disparity_floor"] is None and model.describe()["max_depth"] == 20.0


def test_metric_export_records_max_depth_and_semantics(tmp_path, calibration_dir):
    import onnx

    from lpcv_depth.stages.export import ExportConfig, run_export

    result = run_export(ExportConfig(model="depth_anything_v2_metric_hypersim_vits", weights=None,
                                     input_size=(98, 126), out=tmp_path / "export", check_images=calibration_dir,
                                     num_check_images=1))
    props = {p.key: p.value for p in onnx.load(str(result.onnx_path), load_external_data=False).metadata_props}
    assert props["lpcv.max_depth"] == "20" and props["lpcv.native_output"].startswith("metric depth")
    assert result.manifest["results"]["spec"]["max_depth"] == 20.0
    assert result.manifest["results"]["model"]["output_semantics"].startswith("metric depth")
    assert np.isfinite(result.results.parity["sqnr_db"])


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["w8a8", "w8a16"])
def test_metric_vits_quantizes_and_runs_fully_on_the_htp(preset, tmp_path, calib_subset):
    """Export, PTQ and the local HTP check of the Hypersim metric ViT-S (random weights, 266x266 to
    keep it minutes): the Sigmoid and the max_depth multiply are in the 16-bit output tail, and every
    node runs on the HTP."""
    pytest.importorskip("aimet_torch", reason="aimet-torch (the quant extra) is not installed")
    from lpcv_depth.backends import qnn
    from lpcv_depth.stages.export import ExportConfig, run_export
    from lpcv_depth.stages.htp_check import HtpCheckConfig, run_htp_check
    from lpcv_depth.stages.ptq import PtqConfig, run_ptq

    if qnn.unavailable_reason():
        pytest.skip(qnn.unavailable_reason())
    export = run_export(ExportConfig(model="depth_anything_v2_metric_hypersim_vits", weights=None,
                                     input_size=(266, 266), out=tmp_path / "export", check_images=calib_subset,
                                     num_check_images=1))
    ptq = run_ptq(PtqConfig(calib=calib_subset, fp32=export.out_dir, preset=preset, holdout=4, min_calib=8,
                            latency_runs=1, out=tmp_path / f"ptq-{preset}"))
    assert _quantized_dtype_after(ptq.qdq_onnx, "Sigmoid") == ["uint16"]
    # The max_depth multiply right after the Sigmoid is in the 16-bit tail too.
    assert _quantized_dtype_after(ptq.qdq_onnx, "Mul", fed_by="Sigmoid") == ["uint16"]
    check = run_htp_check(HtpCheckConfig(ptq=ptq.out_dir, max_frames=1, fp16_baseline=False, require_full_htp=True))
    assert check.results.coverage.full_htp and check.results.coverage.cpu_nodes == 0
    assert check.results.coverage.htp_partitions == 1


def _quantized_dtype_after(path, op_type: str, fed_by: str | None = None) -> list[str]:
    """The dtype each `op_type` node's output is quantized to (optionally only nodes whose input is
    the dequantized output of a `fed_by` node)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    dtypes = []
    for node in graph.node:
        if node.op_type != op_type:
            continue
        if fed_by is not None:
            sources = [producer.get(producer[i].input[0]) if i in producer and producer[i].op_type ==
                       "DequantizeLinear" and producer[i].input[0] in producer else None for i in node.input]
            quantized = [producer.get(s.input[0]) if s is not None and s.op_type == "QuantizeLinear" else None
                         for s in sources]
            if not any(q is not None and q.op_type == fed_by for q in quantized):
                continue
        for consumer in graph.node:
            if consumer.op_type == "QuantizeLinear" and consumer.input[0] == node.output[0]:
                zero_point = initializers[consumer.input[2]]
                dtypes.append(onnx.helper.tensor_dtype_to_np_dtype(zero_point.data_type).name)
    return dtypes
