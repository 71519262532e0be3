"""Depth-Anything-V2 (DINOv2 ViT encoder + DPT head), written for this repo.

Parameter names and shapes follow the official checkpoints (depth_anything_v2_vit{s,b,l}.pth) so
they load with strict=True, and the forward pass follows the official computation step by step
(pre-norm blocks with LayerScale, four normalised intermediate layers, DPT reassembly and fusion,
bilinear align_corners=True upsampling, final ReLU). The model predicts relative *disparity*.

The metric models (the official metric_depth/ code, fine-tuned on Hypersim or Virtual KITTI 2) are
the same network with two changes in the head: a Sigmoid instead of the last ReLU, and the output
multiplied by `max_depth` (20 m indoor, 80 m outdoor). Their state dicts have the same keys and
shapes, so only the checkpoint's file name tells a metric checkpoint from a relative one.

Deployment choices that differ from the training code are explicit and opt-in elsewhere
(`set_gelu_approximation`): the module itself reproduces the official outputs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lpcv_depth.models.registry import HubWeights, ModelSpec, register_model
from lpcv_depth.models.weights import load_state_dict_strict, load_torch_checkpoint

log = logging.getLogger("lpcv_depth.models")

PATCH_SIZE = 14
NATIVE_SIZE = 518  # the 37x37 patch grid the positional embedding was trained at
_POS_EMBED_OFFSET = 0.1  # DINOv2 adds it to the target grid size to dodge float rounding in interpolate


@dataclass(frozen=True)
class VitConfig:
    embed_dim: int
    depth: int
    num_heads: int
    layer_indices: tuple[int, int, int, int]
    head_features: int
    head_channels: tuple[int, int, int, int]


VIT_CONFIGS = {
    "vits": VitConfig(384, 12, 6, (2, 5, 8, 11), 64, (48, 96, 192, 384)),
    "vitb": VitConfig(768, 12, 12, (2, 5, 8, 11), 128, (96, 192, 384, 768)),
    "vitl": VitConfig(1024, 24, 16, (4, 11, 17, 23), 256, (256, 512, 1024, 1024)),
}


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Indexed rather than unpacked: torch.fx (AIMET's model preparation) cannot iterate a shape.
        batch, tokens, dim = x.shape[0], x.shape[1], x.shape[2]
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(batch, tokens, dim))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.norm1 = norm(dim)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, dim * 4)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def patch_grid(x: torch.Tensor) -> tuple[int, int]:
    """Rows and columns of 14x14 patches. Python ints, so exported graphs get constant sizes."""
    return int(x.shape[-2]) // PATCH_SIZE, int(x.shape[-1]) // PATCH_SIZE


def resample_position_embedding(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """The trained 37x37 table resampled (bicubic) to a patch grid, with DINOv2's +0.1 offset."""
    native = pos_embed.shape[1] - 1
    side = int(math.sqrt(native))
    if grid_h == grid_w == side:
        return pos_embed
    table = pos_embed[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    scale = ((grid_h + _POS_EMBED_OFFSET) / side, (grid_w + _POS_EMBED_OFFSET) / side)
    table = F.interpolate(table, scale_factor=scale, mode="bicubic", antialias=False)
    table = table.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
    return torch.cat((pos_embed[:, :1], table.to(pos_embed.dtype)), dim=1)


# torch.fx (AIMET's model preparation) keeps these two as opaque calls evaluated at run time: their
# shape arithmetic and branches cannot be traced symbolically, and neither holds anything to quantize.
torch.fx.wrap("patch_grid")
torch.fx.wrap("resample_position_embedding")


class DinoV2Encoder(nn.Module):
    """DINOv2 ViT/14 without registers, returning normalised patch tokens of chosen blocks."""

    def __init__(self, cfg: VitConfig):
        super().__init__()
        dim = cfg.embed_dim
        grid = NATIVE_SIZE // PATCH_SIZE
        self.layer_indices = cfg.layer_indices
        self.patch_embed = PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        # Unused at inference; kept so official checkpoints load with strict=True.
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.blocks = nn.ModuleList(Block(dim, cfg.num_heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        grid = patch_grid(x)
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        tokens = tokens + resample_position_embedding(self.pos_embed, grid[0], grid[1])
        features = []
        for index, block in enumerate(self.blocks):
            tokens = block(tokens)
            if index in self.layer_indices:
                features.append(self.norm(tokens)[:, 1:])
        return features


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class FusionBlock(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            size = (x.shape[-2] * 2, x.shape[-1] * 2)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTHead(nn.Module):
    def __init__(self, in_dim: int, features: int, channels: tuple[int, int, int, int], metric: bool = False):
        super().__init__()
        self.projects = nn.ModuleList(nn.Conv2d(in_dim, c, 1) for c in channels)
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(channels[0], channels[0], kernel_size=4, stride=4),
            nn.ConvTranspose2d(channels[1], channels[1], kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(channels[3], channels[3], kernel_size=3, stride=2, padding=1),
        ])
        self.scratch = nn.Module()
        for i, c in enumerate(channels, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(c, features, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self.scratch, f"refinenet{i}", FusionBlock(features))
        self.scratch.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
        self.scratch.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 1, 1), nn.Sigmoid() if metric else nn.ReLU(), nn.Identity())
        # Random initialisation only (checkpoints overwrite it): pipeline tests on random weights need a
        # real, varying map. A positive bias keeps the relative head's final ReLU alive; a wider last
        # conv spreads the metric head's sigmoid, which default init leaves within 2% of one value.
        if metric:
            nn.init.normal_(self.scratch.output_conv2[2].weight, std=1.0)
        else:
            nn.init.constant_(self.scratch.output_conv2[2].bias, 0.1)

    def forward(self, features: list[torch.Tensor], grid_h: int, grid_w: int) -> torch.Tensor:
        s = self.scratch
        maps = []
        for tokens, project, resize, rn in zip(features, self.projects, self.resize_layers,
                                               (s.layer1_rn, s.layer2_rn, s.layer3_rn, s.layer4_rn)):
            x = tokens.permute(0, 2, 1).reshape(tokens.shape[0], tokens.shape[-1], grid_h, grid_w)
            maps.append(rn(resize(project(x))))
        l1, l2, l3, l4 = maps
        path = s.refinenet4(l4, size=l3.shape[-2:])
        path = s.refinenet3(path, l3, size=l2.shape[-2:])
        path = s.refinenet2(path, l2, size=l1.shape[-2:])
        path = s.refinenet1(path, l1)
        out = s.output_conv1(path)
        out = F.interpolate(out, size=(grid_h * PATCH_SIZE, grid_w * PATCH_SIZE), mode="bilinear", align_corners=True)
        return s.output_conv2(out)


class DepthAnythingV2(nn.Module):
    """(B,3,H,W) ImageNet-normalised, H and W multiples of 14 -> (B,1,H,W) relative disparity, or
    with `max_depth` metric depth in metres in (0, max_depth)."""

    def __init__(self, encoder: str = "vits", max_depth: float | None = None):
        super().__init__()
        cfg = VIT_CONFIGS[encoder]
        self.encoder = encoder
        self.max_depth = max_depth
        self.pretrained = DinoV2Encoder(cfg)
        self.depth_head = DPTHead(cfg.embed_dim, cfg.head_features, cfg.head_channels, metric=max_depth is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = patch_grid(x)
        out = self.depth_head(self.pretrained(x), grid[0], grid[1])
        return F.relu(out) if self.max_depth is None else out * self.max_depth


_SIZES = {"vits": "Small", "vitb": "Base", "vitl": "Large"}
_LICENSES = {"vits": "Apache-2.0", "vitb": "CC-BY-NC-4.0", "vitl": "CC-BY-NC-4.0"}
# dataset key: (Hugging Face name part, max_depth in metres, scenes) of the official metric models.
METRIC_DATASETS = {"hypersim": ("Hypersim", 20.0, "indoor"), "vkitti": ("VKITTI", 80.0, "outdoor")}


def official_filename(encoder: str, dataset: str | None = None) -> str:
    """The official checkpoint's file name: depth_anything_v2_vits.pth, depth_anything_v2_metric_hypersim_vits.pth."""
    return f"depth_anything_v2_{encoder}.pth" if dataset is None else f"depth_anything_v2_metric_{dataset}_{encoder}.pth"


def official_repo(encoder: str, dataset: str | None = None) -> str:
    if dataset is None:
        return f"depth-anything/Depth-Anything-V2-{_SIZES[encoder]}"
    return f"depth-anything/Depth-Anything-V2-Metric-{METRIC_DATASETS[dataset][0]}-{_SIZES[encoder]}"


_OFFICIAL_FILES = {official_filename(e, d): (e, d) for e in VIT_CONFIGS for d in (None, *METRIC_DATASETS)}


def checkpoint_loader(encoder: str, dataset: str | None = None):
    """Strict loading, plus a loud warning when the file is another official checkpoint: relative and
    metric (or Hypersim and VKITTI) checkpoints share every key and shape, so only the name tells."""
    expected = official_filename(encoder, dataset)

    def load(model: nn.Module, path: Path) -> None:
        found = _OFFICIAL_FILES.get(Path(path).name)
        if found is not None and found != (encoder, dataset):
            log.warning("%s is the official checkpoint of another model (%s), not of this one: it loads, but "
                        "the output will be wrong. Use %s from https://huggingface.co/%s, or --weights hf.",
                        Path(path).name, _describe(*found), expected, official_repo(encoder, dataset))
        load_state_dict_strict(model, load_torch_checkpoint(path), source=str(path))

    return load


def _describe(encoder: str, dataset: str | None) -> str:
    return f"relative {encoder}" if dataset is None else f"metric {METRIC_DATASETS[dataset][0]} {encoder}"


def prepare_for_quantization(model: nn.Module) -> dict:
    """Before PTQ: fold the LayerScales (exact; AIMET cannot wrap a parameter-holding custom module)."""
    return {"layer_scale_fold": {"folded": fold_layer_scales(model)}}


def fold_layer_scales(model: nn.Module) -> int:
    """Fold every LayerScale into the Linear before it: gamma * (W x + b) = (gamma W) x + gamma b.

    Exact in real arithmetic, one Mul fewer per residual branch on the device, and it leaves no
    parameter-holding custom module behind for a quantizer (AIMET) that only knows standard layers.
    Returns how many were folded.
    """
    folded = 0
    for block in model.modules():
        if not isinstance(block, Block):
            continue
        for scale_name, linear in (("ls1", block.attn.proj), ("ls2", block.mlp.fc2)):
            scale = getattr(block, scale_name)
            if not isinstance(scale, LayerScale):
                continue
            with torch.no_grad():
                linear.weight.mul_(scale.gamma[:, None])
                linear.bias.mul_(scale.gamma)
            setattr(block, scale_name, nn.Identity())
            folded += 1
    return folded


def _spec(encoder: str, dataset: str | None = None) -> ModelSpec:
    name = f"depth_anything_v2_{encoder}" if dataset is None else f"depth_anything_v2_metric_{dataset}_{encoder}"
    filename = official_filename(encoder, dataset)
    repo = official_repo(encoder, dataset)
    if dataset is None:
        max_depth, semantics = None, "relative disparity"
        description = f"Depth-Anything-V2 {encoder.upper()} (DINOv2 + DPT), relative disparity"
    else:
        label, max_depth, scenes = METRIC_DATASETS[dataset]
        semantics = f"metric depth in metres, 0..{max_depth:g}"
        description = f"Depth-Anything-V2 {encoder.upper()} fine-tuned on {label} ({scenes}), {semantics}"
    return ModelSpec(
        name=name, build=partial(DepthAnythingV2, encoder, max_depth), load_weights=checkpoint_loader(encoder, dataset),
        native_input_size=(NATIVE_SIZE, NATIVE_SIZE), patch_multiple=PATCH_SIZE,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        native_output="disparity" if dataset is None else "depth", max_depth=max_depth, output_semantics=semantics,
        license=_LICENSES[encoder], weight_source=f"https://huggingface.co/{repo} ({filename})",
        hub_weights=HubWeights(repo_id=repo, filename=filename), default_weights="hf", description=description,
        prepare_for_quantization=prepare_for_quantization,
    )


for _encoder in VIT_CONFIGS:
    for _dataset in (None, *METRIC_DATASETS):
        register_model(_spec(_encoder, _dataset))
