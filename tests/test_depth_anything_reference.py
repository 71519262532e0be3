"""Depth-Anything-V2 parity against an independent implementation: Hugging Face transformers'
`DepthAnythingForDepthEstimation` (its own port of DA-V2: DINOv2 backbone + DPT neck and head).

The official checkpoints cannot be fetched here, so both models get the same random weights: our
model is built with a fixed seed, every LayerScale gamma, norm weight, bias and token is perturbed
away from its trivial initial value, and the state dict is renamed to transformers' layout by
`to_transformers_state_dict` below (written for this test) and loaded with strict=True.

One known, deliberate difference: at inputs other than the native 518x518, transformers' DINOv2
resamples the 37x37 position table with `interpolate(size=(h, w))`, while the official
Depth-Anything-V2 code (depth_anything_v2/dinov2.py, `interpolate_offset=0.1`) uses
`interpolate(scale_factor=((h + 0.1) / 37, (w + 0.1) / 37))`; bicubic resampling then samples at
37/(h+0.1) instead of 37/h, a different grid. Our model follows the official code, so the
non-native tests swap transformers' resampling for `official_position_embedding` (the official
formula, written out here independently of models/depth_anything_v2.py). Everything else is stock
transformers.

Skipped when transformers is not installed (it is a dev-only dependency).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from lpcv_depth.models import get_spec  # noqa: E402

# Tolerance, relative to the largest |value| of the tensor compared. Measured on CPU (torch 2.14.1,
# transformers 5.24.0, float32): the encoder features are bit-identical, and so is the output for
# batch 1 (same op sequence; the attention scale 1/8 is a power of two). For batch 2 the output
# differs by up to 2.6e-6 of its max (vits/vitb/vitl): our head, like the official one, feeds the
# convolutions a strided view of the tokens where transformers makes them contiguous first, so
# oneDNN picks other conv kernels (forcing .contiguous() on our side gives 0 again). 1e-5 is ~4x
# that rounding and ~10^4 below the smallest real defect seen (stock transformers' position
# resampling at non-native sizes: 0.1-0.2 of the max).
RTOL = 1e-5
PATCH = 14


def to_transformers_state_dict(state: dict[str, torch.Tensor], dim: int) -> dict[str, torch.Tensor]:
    """Official/our Depth-Anything-V2 names -> transformers DepthAnythingForDepthEstimation names."""
    out: dict[str, torch.Tensor] = {}
    block_renames = {"attn.proj": "attention.o_proj", "ls1.gamma": "layer_scale1.lambda1",
                     "ls2.gamma": "layer_scale2.lambda1"}
    unit_renames = {"resConfUnit1": "residual_layer1", "resConfUnit2": "residual_layer2",
                    "conv1": "convolution1", "conv2": "convolution2", "out_conv": "projection"}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "pretrained":
            name = ".".join(parts[1:])
            if name in ("cls_token", "mask_token"):
                out[f"backbone.embeddings.{name}"] = value
            elif name == "pos_embed":
                out["backbone.embeddings.position_embeddings"] = value
            elif name.startswith("patch_embed.proj."):
                out[f"backbone.embeddings.patch_embeddings.projection.{parts[-1]}"] = value
            elif name.startswith("norm."):
                out[f"backbone.layernorm.{parts[-1]}"] = value
            elif parts[1] == "blocks":
                prefix = f"backbone.encoder.layer.{parts[2]}."
                sub = ".".join(parts[3:])
                if sub.startswith("attn.qkv."):
                    # the fused (3*dim, dim) projection stacks q, k, v along the output dim
                    for proj, chunk in zip(("q_proj", "k_proj", "v_proj"), value.split(dim, dim=0)):
                        out[f"{prefix}attention.{proj}.{parts[-1]}"] = chunk
                    continue
                for old, new in block_renames.items():
                    if sub.startswith(old):
                        sub = new + sub[len(old):]
                        break
                out[prefix + sub] = value  # norm1/norm2/mlp.fc1/mlp.fc2 keep their names
            else:
                raise KeyError(key)
        elif parts[:2] == ["depth_head", "projects"]:
            out[f"neck.reassemble_stage.layers.{parts[2]}.projection.{parts[3]}"] = value
        elif parts[:2] == ["depth_head", "resize_layers"]:
            out[f"neck.reassemble_stage.layers.{parts[2]}.resize.{parts[3]}"] = value
        elif parts[:2] == ["depth_head", "scratch"]:
            module = parts[2]
            if module.startswith("layer") and module.endswith("_rn"):  # layerN_rn -> convs[N-1]
                out[f"neck.convs.{int(module[5]) - 1}.{parts[3]}"] = value
            elif module.startswith("refinenet"):
                # transformers fuses deepest first: fusion layer 0 is refinenet4, layer 3 refinenet1
                prefix = f"neck.fusion_stage.layers.{4 - int(module[-1])}."
                out[prefix + ".".join(unit_renames.get(p, p) for p in parts[3:])] = value
            elif module == "output_conv1":
                out[f"head.conv1.{parts[3]}"] = value
            elif module == "output_conv2":  # Sequential(conv, ReLU, conv, ReLU, Identity)
                out[f"head.conv{ {'0': 2, '2': 3}[parts[3]] }.{parts[4]}"] = value
            else:
                raise KeyError(key)
        else:
            raise KeyError(key)
    return out


# The official architectures, written out from the official sources rather than taken from
# models/depth_anything_v2.py, so a wrong entry there cannot hide here: DINOv2 vit_small/base/large
# (dinov2.py), `intermediate_layer_idx` (dpt.py) and `model_configs` (run.py):
# encoder: (embed_dim, depth, heads, 0-based blocks fed to the head, DPT features, DPT out_channels)
OFFICIAL = {
    "vits": (384, 12, 6, (2, 5, 8, 11), 64, (48, 96, 192, 384)),
    "vitb": (768, 12, 12, (2, 5, 8, 11), 128, (96, 192, 384, 768)),
    "vitl": (1024, 24, 16, (4, 11, 17, 23), 256, (256, 512, 1024, 1024)),
}


def transformers_model(encoder: str, estimation: str = "relative", max_depth: float = 1):
    dim, depth, heads, blocks, features, channels = OFFICIAL[encoder]
    backbone = transformers.Dinov2Config(
        hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
        mlp_ratio=4, hidden_act="gelu", layer_norm_eps=1e-6, image_size=518, patch_size=PATCH,
        qkv_bias=True, layerscale_value=1.0, use_swiglu_ffn=False, use_mask_token=True,
        apply_layernorm=True, reshape_hidden_states=False,
        # transformers' stage k is the output of block k-1 (stage 0 is the embedding), so the
        # official 0-based blocks (2, 5, 8, 11) are out_indices (3, 6, 9, 12).
        out_indices=[i + 1 for i in blocks],
    )
    config = transformers.DepthAnythingConfig(
        backbone_config=backbone, patch_size=PATCH, reassemble_hidden_size=dim,
        reassemble_factors=[4, 2, 1, 0.5], neck_hidden_sizes=list(channels),
        fusion_hidden_size=features, head_in_index=-1, head_hidden_size=32,
        depth_estimation_type=estimation, max_depth=max_depth,
    )
    config._attn_implementation = "eager"  # the only one DepthAnything supports; pinned for clarity
    return transformers.DepthAnythingForDepthEstimation(config).eval()


def our_model(encoder: str, seed: int = 0, name: str | None = None):
    torch.manual_seed(seed)
    model = get_spec(name or f"depth_anything_v2_{encoder}").build().eval()
    gen = torch.Generator().manual_seed(seed + 1)

    def randn(shape):
        return torch.randn(shape, generator=gen)

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".gamma"):  # LayerScale: not 1, and different per channel
                param.copy_(torch.empty(param.shape).uniform_(0.05, 1.5, generator=gen))
            elif name.startswith("pretrained") and "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.3 * randn(param.shape))
            elif name.endswith("bias"):
                param.add_(0.05 * randn(param.shape))
            elif name.endswith(("cls_token", "mask_token")):
                param.copy_(randn(param.shape))
            elif name.endswith("pos_embed"):
                param.copy_(0.5 * randn(param.shape))
        # Random weights give a nearly constant map (std ~1% of its mean) that sits wholly on one
        # side of the final ReLU. Rescale the last 1x1 conv from one calibration input so the
        # pre-activation has unit spread and a median just below zero: the map varies by O(1)
        # and the final ReLU clips part of it, so both are exercised.
        head = model.depth_head.scratch
        captured = {}
        hook = head.output_conv2[1].register_forward_hook(lambda m, i, out: captured.__setitem__("f", out))
        model(torch.randn(1, 3, 98, 126, generator=gen))
        hook.remove()
        last = head.output_conv2[2]
        pre = F.conv2d(captured["f"], last.weight).flatten()
        scale = 1.0 / pre.std()
        last.weight.mul_(scale)
        last.bias.fill_(0.3 - pre.median().item() * scale)
    return model


def official_position_embedding(embeddings, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Official DA-V2 DINOv2 resampling (interpolate_offset=0.1, antialias=False) on transformers' table."""
    table = embeddings.position_embeddings
    native = table.shape[1] - 1
    if tokens.shape[1] - 1 == native and height == width:
        return table
    side = math.sqrt(native)
    grid = table[:, 1:].float().reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, mode="bicubic", antialias=False,
                         scale_factor=((height // PATCH + 0.1) / side, (width // PATCH + 0.1) / side))
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, table.shape[-1])
    return torch.cat((table[:, :1].float(), grid), dim=1).to(table.dtype)


@pytest.fixture(scope="module")
def pair_cache():
    cache = {}

    def get(encoder: str):
        if encoder not in cache:
            ours = our_model(encoder)
            with torch.device("meta"):  # skip transformers' random init: every tensor is loaded
                theirs = transformers_model(encoder)
            state = to_transformers_state_dict(ours.state_dict(), OFFICIAL[encoder][0])
            theirs.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
            assert not any(t.is_meta for t in (*theirs.parameters(), *theirs.buffers()))
            cache[encoder] = ours, theirs
        return cache[encoder]

    return get


def _compare(ours, theirs, x: torch.Tensor, *, official_pos: bool):
    captured = {}
    hooks = [ours.depth_head.register_forward_pre_hook(lambda m, args: captured.__setitem__("ours", args[0])),
             theirs.neck.register_forward_pre_hook(lambda m, args: captured.__setitem__("theirs", args[0]))]
    embeddings = theirs.backbone.embeddings
    calls = []
    if official_pos:
        def patched(tokens, height, width):
            calls.append((height, width))
            return official_position_embedding(embeddings, tokens, height, width)
        embeddings.interpolate_pos_encoding = patched
    try:
        with torch.no_grad():
            ours_out = ours(x)
            theirs_out = theirs(pixel_values=x).predicted_depth
    finally:
        for hook in hooks:
            hook.remove()
        embeddings.__dict__.pop("interpolate_pos_encoding", None)
    assert not official_pos or calls == [tuple(x.shape[-2:])]

    # Ours keeps the channel dim (B,1,H,W); official and transformers squeeze it to (B,H,W).
    assert ours_out.shape == (x.shape[0], 1, *x.shape[-2:])
    assert theirs_out.shape == (x.shape[0], *x.shape[-2:])
    ours_out = ours_out[:, 0]
    positive = (ours_out > 0).float().mean().item()
    assert ours_out.std() > 0.3 and 0.2 < positive < 0.95  # an O(1) map, partly clipped by the ReLU

    # The four normalised intermediate layers feeding the head (transformers keeps the CLS token).
    for i, (ours_feat, theirs_feat) in enumerate(zip(captured["ours"], captured["theirs"], strict=True)):
        _assert_close(ours_feat, theirs_feat[:, 1:], f"intermediate layer {i}")
    _assert_close(ours_out, theirs_out, "predicted disparity")


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.shape == theirs.shape, what
    scale = ours.abs().max().item()
    diff = (ours - theirs).abs().max().item()
    assert diff <= RTOL * scale, f"{what}: max |ours - transformers| = {diff:.3e} (max |ours| = {scale:.3f})"


def test_vits_native_size_matches_stock_transformers(pair_cache):
    # 518x518: the position table is used as is, so no patching at all.
    ours, theirs = pair_cache("vits")
    x = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(1))
    _compare(ours, theirs, x, official_pos=False)


def test_vits_non_square_matches_with_official_position_resampling(pair_cache):
    ours, theirs = pair_cache("vits")
    x = torch.randn(1, 3, 364, 504, generator=torch.Generator().manual_seed(2))
    _compare(ours, theirs, x, official_pos=True)


def test_vitb_matches_with_official_position_resampling(pair_cache):
    ours, theirs = pair_cache("vitb")
    x = torch.randn(2, 3, 168, 224, generator=torch.Generator().manual_seed(3))
    _compare(ours, theirs, x, official_pos=True)


@pytest.mark.slow
def test_vitl_matches_with_official_position_resampling(pair_cache):
    # Different intermediate layers (4, 11, 17, 23) and 24 blocks; ~1.3 GB per model, hence slow.
    ours, theirs = pair_cache("vitl")
    x = torch.randn(1, 3, 196, 252, generator=torch.Generator().manual_seed(4))
    _compare(ours, theirs, x, official_pos=True)


@pytest.mark.parametrize("name,max_depth", [("depth_anything_v2_metric_hypersim_vits", 20.0),
                                            ("depth_anything_v2_metric_vkitti_vits", 80.0)])
def test_metric_head_matches_transformers_metric_estimation(name, max_depth):
    """transformers' DepthAnythingForDepthEstimation with depth_estimation_type="metric": a Sigmoid
    head scaled by max_depth, the same weights mapped across, at the native 518x518."""
    ours = our_model("vits", name=name)
    with torch.device("meta"):
        theirs = transformers_model("vits", estimation="metric", max_depth=int(max_depth))  # its config takes an int
    state = to_transformers_state_dict(ours.state_dict(), OFFICIAL["vits"][0])
    theirs.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
    x = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours_out = ours(x)[:, 0]
        theirs_out = theirs(pixel_values=x).predicted_depth
    assert isinstance(theirs.head.activation2, torch.nn.Sigmoid)
    # A metric map that varies, strictly inside (0, max_depth): the sigmoid is exercised, not saturated.
    assert 0 < ours_out.min() and ours_out.max() < max_depth and ours_out.std() > 0.05 * max_depth
    _assert_close(ours_out, theirs_out, "predicted metric depth")
