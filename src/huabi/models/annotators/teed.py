"""TEED soft edges (``softedge_teed``, alias ``te_hed``), sd-webui-controlnet's ``7_model.pth``.

TEED, "Tiny and Efficient Edge Detector" (Soria et al., ICCV 2023 workshops):
58 thousand weights, RGB in 0..255 as it is (no normalisation), Smish
activations (``x * tanh(log(1 + sigmoid(x)))``):

* block 1: two 3x3 convs (the first strided) to 16 channels at 1/2 size;
  block 2: two 3x3 convs to 32 channels (no activation after the last), then a
  3x3/2 max pool to 1/4;
* a skip: block 1 through a strided 1x1 conv (32 channels) added to the pooled
  block 2; a dense layer mixes that sum (Smish, 3x3 conv with padding 2, Smish,
  3x3 conv unpadded: 48 channels) with a 1x1 projection of the pooled block 2,
  averaging the two;
* three side outputs upsampled to full size by 1x1 conv + Smish + transposed
  conv steps (one step from 1/2 size, two from 1/4), and their fusion: two
  depthwise 3x3 convs (3 -> 24 -> 24 channels) summed over channels, then Smish.

The map is the sigmoid of the mean of the four outputs, snapped to ``Safe Steps``
levels (sd-webui-controlnet's slider, 0..10, default 2; 0 keeps every grey
level) and stored as 8 bits; computed on the edge-padded image (a multiple of
64) and cropped back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from huabi.core.line_maps import pad_edge, quantise_probability
from huabi.models.annotators import Annotator
from huabi.models.annotators.lines import device_of, grey_map, load_checked

TEED_FILE = "7_model.pth"
DEFAULT_SAFE_STEPS = 2


def smish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tanh(torch.log(1 + torch.sigmoid(x)))


class Smish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return smish(x)


class ConvPair(nn.Module):
    """3x3 conv (optionally strided), Smish, 3x3 conv, and Smish unless ``last_activation`` is False."""

    def __init__(self, in_channels: int, channels: int, *, stride: int = 1, last_activation: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.last_activation = last_activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(smish(self.conv1(x)))
        return smish(x) if self.last_activation else x


class PointwiseConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class DenseLayer(nn.Module):
    """Smish, 3x3 conv padded by 2, Smish, unpadded 3x3 conv: same size, ``channels`` wide."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=2)
        self.conv2 = nn.Conv2d(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(smish(self.conv1(smish(x))))


class DenseBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.denselayer1 = DenseLayer(in_channels, channels)  # the checkpoint's name

    def forward(self, x: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.denselayer1(x) + projected)


class Upsampler(nn.Module):
    """``steps`` times: 1x1 conv, Smish, transposed conv x2 (16 channels between steps, 1 at the end)."""

    def __init__(self, in_channels: int, steps: int):
        super().__init__()
        kernel, padding = {1: (2, 0), 2: (4, 1)}[steps]
        layers: list[nn.Module] = []
        for step in range(steps):
            out_channels = 1 if step == steps - 1 else 16
            layers += [nn.Conv2d(in_channels, out_channels, 1), Smish(),
                       nn.ConvTranspose2d(out_channels, out_channels, kernel, stride=2, padding=padding)]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class DepthwiseFusion(nn.Module):
    """Three side maps -> one: depthwise 3x3 (x8 channels), Smish, depthwise 3x3, sum of both over channels, Smish."""

    def __init__(self, sides: int = 3, per_side: int = 8):
        super().__init__()
        width = sides * per_side
        self.DWconv1 = nn.Conv2d(sides, width, 3, padding=1, groups=sides)
        self.DWconv2 = nn.Conv2d(width, width, 3, padding=1, groups=width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.DWconv1(smish(x))
        second = self.DWconv2(smish(first))
        return smish((first + second).sum(1, keepdim=True))


class Teed(nn.Module):
    """RGB in 0..255 ``[B, 3, H, W]`` (H, W multiples of 4) -> four edge logit maps at full size (3 sides, fused)."""

    def __init__(self):
        super().__init__()
        self.block_1 = ConvPair(3, 16, stride=2)
        self.block_2 = ConvPair(16, 32, last_activation=False)
        self.dblock_3 = DenseBlock(32, 48)
        self.side_1 = PointwiseConv(16, 32, stride=2)
        self.pre_dense_3 = PointwiseConv(32, 48)
        self.up_block_1 = Upsampler(16, 1)
        self.up_block_2 = Upsampler(32, 1)
        self.up_block_3 = Upsampler(48, 2)
        self.block_cat = DepthwiseFusion()

    def forward(self, rgb_255: torch.Tensor) -> list[torch.Tensor]:
        half_1 = self.block_1(rgb_255)
        half_2 = self.block_2(half_1)
        quarter = F.max_pool2d(half_2, kernel_size=3, stride=2, padding=1)
        dense = self.dblock_3(quarter + self.side_1(half_1), self.pre_dense_3(quarter))
        sides = [self.up_block_1(half_1), self.up_block_2(half_2), self.up_block_3(dense)]
        return sides + [self.block_cat(torch.cat(sides, 1))]


def load_teed(paths: dict[str, Path], device: torch.device) -> Teed:
    return load_checked(Teed(), paths[TEED_FILE], device, "softedge_teed", strip="module.")


def snap_to_steps(edge: np.ndarray, steps: int) -> np.ndarray:
    """sd-webui-controlnet's safe_step: [0, 1] cut into steps + 1 equal bands, mapped to 0, 1/steps, ..., 1."""
    return (edge.astype(np.float32) * float(steps + 1)).astype(np.int32).astype(np.float32) / float(steps)


def detect_teed(net: Teed, image: np.ndarray, a, b) -> np.ndarray:
    steps = DEFAULT_SAFE_STEPS if a is None else int(a)  # a whole number; A1111 truncates the slider value too
    h, w = image.shape[:2]
    rgb = torch.tensor(pad_edge(image)).to(device_of(net), torch.float32).permute(2, 0, 1)[None]
    logits = np.stack([out[0, 0].float().cpu().numpy() for out in net(rgb)], axis=2)
    edge = 1.0 / (1.0 + np.exp(-np.mean(logits, axis=2).astype(np.float64)))
    if steps != 0:
        edge = snap_to_steps(edge, steps)
    return grey_map(quantise_probability(edge, safe=False)[:h, :w])


ANNOTATORS = (Annotator("softedge_teed", (TEED_FILE,), load_teed, detect_teed),)
