"""Surface normals (``normal_bae``): Bae et al.'s network, sd-webui-controlnet's ``scannet.pt``.

"Estimating and Exploiting the Aleatoric Uncertainty in Surface Normal
Estimation" (Bae, Budvytis, Cipolla, ICCV 2021), the ScanNet-trained model that
ControlNet 1.1's ``control_v11p_sd15_normalbae`` was trained on:

* encoder: EfficientNet-B5 (the TensorFlow-compatible AdvProp variant: width
  x1.6, depth x2.2, batch norm eps 1e-3, TF "SAME" padding on strided convs,
  SiLU, squeeze-excitation at 1/4 of each block's input channels).  The decoder
  reads the outputs of stages 1, 2, 3 and 5 (24, 40, 64, 176 channels, 1/2 to
  1/16 size) and the 2048-channel 1x1 head conv *before* its batch norm (the
  checkpoint holds that norm's weights, unused);
* decoder: a 1x1 conv, four "upsample (bilinear, corners aligned), concatenate
  the skip, two 3x3 conv + batch norm + LeakyReLU" steps, a 3x3 conv to a 1/8
  size prediction, then three refinements to 1/4, 1/2 and full size, each a
  per-pixel MLP (1x1 Conv1d layers) on the upsampled features and the upsampled
  previous prediction.  Every prediction is (x, y, z, kappa): the normal scaled
  to unit length and kappa = elu + 1.01 (the confidence, unused here).

Input: RGB in 0..1 normalised with ImageNet's mean/std, on the edge-padded image
(a multiple of 64).  Map: ``(normal + 1) / 2`` as 8-bit RGB (x red, y green, z
blue), as sd-webui-controlnet stores it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from huabi.core.line_maps import pad_edge
from huabi.models.annotators import Annotator
from huabi.models.annotators.lines import device_of, load_checked

NORMAL_BAE_FILE = "scannet.pt"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_BATCH_NORM_EPS = 1e-3

STEM_CHANNELS = 48
HEAD_CHANNELS = 2048
# EfficientNet-B5's stages after width/depth scaling: (blocks, kernel, stride, expansion, out channels).
B5_STAGES = (
    (3, 3, 1, 1, 24),
    (5, 3, 2, 6, 40),
    (5, 5, 2, 6, 64),
    (7, 3, 2, 6, 128),
    (7, 5, 1, 6, 176),
    (9, 5, 2, 6, 304),
    (3, 3, 1, 6, 512),
)
SKIP_STAGES = (0, 1, 2, 4)  # stages whose outputs the decoder concatenates (1/2, 1/4, 1/8, 1/16 size)
MIN_KAPPA = 0.01


# --------------------------------------------------------------------------- encoder


def conv_tf_same(in_channels: int, out_channels: int, kernel: int, *, stride: int = 1, groups: int = 1,
                 bias: bool = False) -> nn.Conv2d:
    """A conv padded like TensorFlow's "SAME" (stride 1: k // 2 each side; strided: see :class:`StridedSameConv2d`)."""
    if stride == 1:
        return nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, groups=groups, bias=bias)
    return StridedSameConv2d(in_channels, out_channels, kernel, stride=stride, groups=groups, bias=bias)


class StridedSameConv2d(nn.Conv2d):
    """Strided conv with TF "SAME" padding: output size ceil(input / stride), an odd pad pixel at the bottom/right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=TF_BATCH_NORM_EPS)


class SqueezeExcite(nn.Module):
    """Channel gates from the global mean: 1x1 reduce, SiLU, 1x1 expand, sigmoid."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.conv_expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.conv_expand(F.silu(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class DepthwiseBlock(nn.Module):
    """Stage 1's block (no expansion): depthwise conv, BN, SiLU, SE, 1x1 projection, BN (+ input if shapes match)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int):
        super().__init__()
        self.conv_dw = conv_tf_same(in_channels, in_channels, kernel, stride=stride, groups=in_channels)
        self.bn1 = batch_norm(in_channels)
        self.se = SqueezeExcite(in_channels, in_channels // 4)
        self.conv_pw = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn2 = batch_norm(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv_pw(self.se(F.silu(self.bn1(self.conv_dw(x))))))
        return out + x if self.residual else out


class InvertedResidualBlock(nn.Module):
    """MBConv: 1x1 expansion, BN, SiLU, depthwise conv, BN, SiLU, SE, 1x1 projection, BN (+ input if shapes match)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        mid = in_channels * expansion
        self.conv_pw = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn1 = batch_norm(mid)
        self.conv_dw = conv_tf_same(mid, mid, kernel, stride=stride, groups=mid)
        self.bn2 = batch_norm(mid)
        self.se = SqueezeExcite(mid, in_channels // 4)  # reduced from the block's input width, as EfficientNet does
        self.conv_pwl = nn.Conv2d(mid, out_channels, 1, bias=False)
        self.bn3 = batch_norm(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.silu(self.bn1(self.conv_pw(x)))
        out = F.silu(self.bn2(self.conv_dw(out)))
        out = self.bn3(self.conv_pwl(self.se(out)))
        return out + x if self.residual else out


class EfficientNetB5(nn.Module):
    """EfficientNet-B5 without pooling/classifier; returns the decoder's skips and the head conv's output."""

    def __init__(self):
        super().__init__()
        self.conv_stem = conv_tf_same(3, STEM_CHANNELS, 3, stride=2)
        self.bn1 = batch_norm(STEM_CHANNELS)
        stages = []
        in_channels = STEM_CHANNELS
        for index, (repeats, kernel, stride, expansion, out_channels) in enumerate(B5_STAGES):
            blocks = []
            for i in range(repeats):
                block_stride = stride if i == 0 else 1
                if index == 0:
                    blocks.append(DepthwiseBlock(in_channels, out_channels, kernel, block_stride))
                else:
                    blocks.append(InvertedResidualBlock(in_channels, out_channels, kernel, block_stride, expansion))
                in_channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = nn.Conv2d(in_channels, HEAD_CHANNELS, 1, bias=False)
        # The head's norm is in the checkpoint but the decoder reads the conv before it: loaded, never run.
        self.bn2 = batch_norm(HEAD_CHANNELS)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = F.silu(self.bn1(self.conv_stem(x)))
        skips = []
        for index, stage in enumerate(self.blocks):
            x = stage(x)
            if index in SKIP_STAGES:
                skips.append(x)
        return skips, self.conv_head(x)


class BaeEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.original_model = EfficientNetB5()  # the checkpoint's name for the backbone

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.original_model(x)


# --------------------------------------------------------------------------- decoder


def upsample_aligned(x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Bilinear with corners aligned: to ``size``, or twice as large."""
    if size is None:
        size = (x.shape[2] * 2, x.shape[3] * 2)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class UpsampleConcat(nn.Module):
    """Upsample to the skip's size, concatenate it, two 3x3 conv + BN + LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self._net = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.LeakyReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.LeakyReLU(),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self._net(torch.cat([upsample_aligned(x, skip.shape[2:]), skip], 1))


def pixel_mlp(in_channels: int) -> nn.Sequential:
    """Four 1x1 Conv1d layers (128 wide, ReLU between) applied to every pixel -> (x, y, z, kappa)."""
    return nn.Sequential(
        nn.Conv1d(in_channels, 128, 1), nn.ReLU(),
        nn.Conv1d(128, 128, 1), nn.ReLU(),
        nn.Conv1d(128, 128, 1), nn.ReLU(),
        nn.Conv1d(128, 4, 1),
    )


def unit_normal_and_kappa(prediction: torch.Tensor) -> torch.Tensor:
    """(x, y, z, kappa) raw -> (unit normal, elu(kappa) + 1 + 0.01), channel dimension 1."""
    normal, kappa = prediction[:, :3], prediction[:, 3:4]
    length = torch.sqrt((normal ** 2).sum(1, keepdim=True)) + 1e-10
    return torch.cat([normal / length, F.elu(kappa) + 1.0 + MIN_KAPPA], 1)


class BaeDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(HEAD_CHANNELS, HEAD_CHANNELS, 1)
        self.up1 = UpsampleConcat(HEAD_CHANNELS + 176, 1024)
        self.up2 = UpsampleConcat(1024 + 64, 512)
        self.up3 = UpsampleConcat(512 + 40, 256)
        self.up4 = UpsampleConcat(256 + 24, 128)
        self.out_conv_res8 = nn.Conv2d(512, 4, 3, padding=1)
        self.out_conv_res4 = pixel_mlp(512 + 4)
        self.out_conv_res2 = pixel_mlp(256 + 4)
        self.out_conv_res1 = pixel_mlp(128 + 4)

    @staticmethod
    def refine(mlp: nn.Sequential, features: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """Twice the size: the MLP on every pixel of (upsampled features, upsampled coarser prediction)."""
        joined = torch.cat([upsample_aligned(features), upsample_aligned(coarse)], 1)
        b, c, h, w = joined.shape
        return unit_normal_and_kappa(mlp(joined.reshape(b, c, h * w)).reshape(b, 4, h, w))

    def forward(self, skips: list[torch.Tensor], head: torch.Tensor) -> list[torch.Tensor]:
        half, quarter, eighth, sixteenth = skips
        x_d1 = self.up1(self.conv2(head), sixteenth)
        x_d2 = self.up2(x_d1, eighth)
        x_d3 = self.up3(x_d2, quarter)
        x_d4 = self.up4(x_d3, half)
        out_res8 = unit_normal_and_kappa(self.out_conv_res8(x_d2))
        out_res4 = self.refine(self.out_conv_res4, x_d2, out_res8)
        out_res2 = self.refine(self.out_conv_res2, x_d3, out_res4)
        out_res1 = self.refine(self.out_conv_res1, x_d4, out_res2)
        return [out_res8, out_res4, out_res2, out_res1]


class NormalBae(nn.Module):
    """ImageNet-normalised RGB ``[B, 3, H, W]`` (H, W multiples of 32) -> predictions at 1/8, 1/4, 1/2, 1 size."""

    def __init__(self):
        super().__init__()
        self.encoder = BaeEncoder()
        self.decoder = BaeDecoder()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.decoder(*self.encoder(x))


# --------------------------------------------------------------------------- annotator


def load_normal_bae(paths: dict[str, Path], device: torch.device) -> NormalBae:
    return load_checked(NormalBae(), paths[NORMAL_BAE_FILE], device, "normal_bae", strip="module.")


def network_input(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 RGB [H, W, 3] -> ImageNet-normalised float32 [1, 3, H, W]."""
    rgb = torch.tensor(image).to(device, torch.float32).permute(2, 0, 1)[None] / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (rgb - mean) / std


def detect_normal_bae(net: NormalBae, image: np.ndarray, a, b) -> np.ndarray:
    h, w = image.shape[:2]
    normal = net(network_input(pad_edge(image), device_of(net)))[-1][0, :3]
    rgb = ((normal + 1.0) * 0.5).clip(0, 1).permute(1, 2, 0).float().cpu().numpy()
    as_uint8 = (rgb * 255.0).clip(0, 255).astype(np.uint8)  # truncated, as A1111 stores it
    return as_uint8[:h, :w].astype(np.float32) / 255.0


ANNOTATORS = (Annotator("normal_bae", (NORMAL_BAE_FILE,), load_normal_bae, detect_normal_bae),)
