"""PiDiNet soft edges (``softedge_pidinet``, ``softedge_pidisafe``, ``scribble_pidinet``, ``t2ia_sketch_pidi``).

Weights: sd-webui-controlnet's ``table5_pidinet.pth``.

PiDiNet (Su et al., "Pixel Difference Networks for Efficient Edge Detection",
ICCV 2021), the "carv4" network of the paper's table 5 that sd-webui-controlnet
ships: 60 base channels, four stages of depthwise pixel-difference blocks, and
per stage a dilation module (24 channels), a spatial attention and a 1x1
reduction to one edge map; a 1x1 classifier fuses the four.

Pixel-difference convolutions use a plain 3x3 kernel ``w`` on differences of
pixels instead of pixels:

* central (``cd``): sum of ``w_i * (x_i - x_centre)``: the plain convolution minus
  the kernel's sum times the centre pixel;
* angular (``ad``): differences between clockwise neighbours on the 3x3 ring,
  which is a plain convolution with ``w`` minus ``w`` rotated one step;
* radial (``rd``): the outer 5x5 ring minus the inner 3x3 ring, which is a 5x5
  convolution whose outer ring holds ``w``'s eight outer weights and inner ring
  their negatives;
* ``cv``: a plain convolution.

The network takes BGR in 0..1 and the fused map is a sigmoid; A1111 stores it
as 8 bits (``pidisafe``: snapped to 0, 0.5, 1 first; ``t2ia_sketch_pidi``: 0 or 255 at 0.5;
``scribble_pidinet``: thinned into bold strokes).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from huabi.core.line_maps import pad_edge, quantise_probability, scribble_from_edges
from huabi.models.annotators import Annotator
from huabi.models.annotators.lines import device_of, grey_map, load_checked

PIDINET_FILE = "table5_pidinet.pth"
# The kinds of the 16 pixel-difference layers of "carv4" (init block, then the 15 blocks).
CARV4 = ("cd", "ad", "rd", "cv") * 4
BASE_CHANNELS = 60
DILATION_CHANNELS = 24
# For angular differences: each of the 3x3 kernel's positions (row-major) takes the weight of the ring
# position one step anticlockwise from it, so w - w[ANGULAR_SHIFT] weighs x_i - x_(next clockwise).
ANGULAR_SHIFT = (3, 0, 1, 6, 4, 2, 7, 8, 5)
# Radial differences: where the eight outer 3x3 weights go in a 5x5 kernel (outer ring, then inner ring).
RADIAL_OUTER = (0, 2, 4, 10, 14, 20, 22, 24)
RADIAL_INNER = (6, 7, 8, 11, 13, 16, 17, 18)


class PixelDifferenceConv(nn.Module):
    """A bias-free 3x3 convolution of kind ``cv``/``cd``/``ad``/``rd`` (padding 1)."""

    def __init__(self, kind: str, in_channels: int, out_channels: int, groups: int = 1):
        super().__init__()
        if kind not in ("cv", "cd", "ad", "rd"):
            raise ValueError(f"unknown pixel difference kind {kind!r}")
        self.kind = kind
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels // groups, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.kind == "cv":
            return F.conv2d(x, w, padding=1, groups=self.groups)
        if self.kind == "cd":
            centre = F.conv2d(x, w.sum(dim=(2, 3), keepdim=True), groups=self.groups)
            return F.conv2d(x, w, padding=1, groups=self.groups) - centre
        flat = w.reshape(w.shape[0], w.shape[1], 9)
        if self.kind == "ad":
            return F.conv2d(x, (flat - flat[:, :, list(ANGULAR_SHIFT)]).reshape(w.shape), padding=1, groups=self.groups)
        radial = w.new_zeros(w.shape[0], w.shape[1], 25)
        radial[:, :, list(RADIAL_OUTER)] = flat[:, :, 1:]
        radial[:, :, list(RADIAL_INNER)] = -flat[:, :, 1:]
        return F.conv2d(x, radial.reshape(w.shape[0], w.shape[1], 5, 5), padding=2, groups=self.groups)


class PdcBlock(nn.Module):
    """(2x2 max pool,) depthwise pixel-difference conv, ReLU, 1x1 conv; plus the input (1x1 conv'd when pooled)."""

    def __init__(self, kind: str, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        if stride > 1:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1)
        self.conv1 = PixelDifferenceConv(kind, in_channels, in_channels, groups=in_channels)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        y = self.conv2(F.relu(self.conv1(x)))
        if self.stride > 1:
            x = self.shortcut(x)
        return y + x


class DilationModule(nn.Module):
    """CDCM: ReLU, 1x1 conv, then the sum of four 3x3 convs dilated 5, 7, 9 and 11."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 1)
        for name, dilation in (("conv2_1", 5), ("conv2_2", 7), ("conv2_3", 9), ("conv2_4", 11)):
            setattr(self, name, nn.Conv2d(channels, channels, 3, dilation=dilation, padding=dilation, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.relu(x))
        return self.conv2_1(x) + self.conv2_2(x) + self.conv2_3(x) + self.conv2_4(x)


class SpatialAttention(nn.Module):
    """CSAM: the input times a sigmoid mask from ReLU, 1x1 conv to 4 channels, 3x3 conv to 1."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4, 1)
        self.conv2 = nn.Conv2d(4, 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv2(self.conv1(F.relu(x))))


class Reduce(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PiDiNet(nn.Module):
    """PiDiNet "carv4" with dilation modules and spatial attention; names follow the checkpoint."""

    def __init__(self, kinds: tuple[str, ...] = CARV4, base: int = BASE_CHANNELS, dilation: int = DILATION_CHANNELS):
        super().__init__()
        self.init_block = PixelDifferenceConv(kinds[0], 3, base)
        widths = (base, base * 2, base * 4, base * 4)
        layer = 1
        channels = base
        for stage, width in enumerate(widths, start=1):
            for index in range(1, 4 if stage == 1 else 5):
                stride = 2 if stage > 1 and index == 1 else 1
                setattr(self, f"block{stage}_{index}", PdcBlock(kinds[layer], channels, width, stride))
                channels = width
                layer += 1
        self.dilations = nn.ModuleList([DilationModule(width, dilation) for width in widths])
        self.attentions = nn.ModuleList([SpatialAttention(dilation) for _ in widths])
        self.conv_reduces = nn.ModuleList([Reduce(dilation) for _ in widths])
        self.classifier = nn.Conv2d(4, 1, 1)

    def stages(self):
        return [[getattr(self, f"block{stage}_{index}") for index in range(1, 4 if stage == 1 else 5)]
                for stage in range(1, 5)]

    def forward(self, bgr_unit: torch.Tensor) -> list[torch.Tensor]:
        """BGR in 0..1 -> five sigmoid maps at full size (four stages, then the fused one)."""
        size = bgr_unit.shape[2:]
        x = self.init_block(bgr_unit)
        edges = []
        for index, blocks in enumerate(self.stages()):
            for block in blocks:
                x = block(x)
            edge = self.conv_reduces[index](self.attentions[index](self.dilations[index](x)))
            edges.append(F.interpolate(edge, size, mode="bilinear", align_corners=False))
        edges.append(self.classifier(torch.cat(edges, dim=1)))
        return [torch.sigmoid(edge) for edge in edges]


def load_pidinet(paths: dict[str, Path], device: torch.device, module: str = "softedge_pidinet") -> PiDiNet:
    return load_checked(PiDiNet(), paths[PIDINET_FILE], device, module, strip="module.")


def pidinet_edges(net: PiDiNet, image: np.ndarray, *, safe: bool = False, binary: bool = False) -> np.ndarray:
    """uint8 [H, W] soft edges of an RGB image (edge-padded to a multiple of 64, then cropped).

    ``binary``: 255 where the edge probability is above 0.5, else 0 (the T2I-Adapter sketch input).
    """
    h, w = image.shape[:2]
    bgr = np.ascontiguousarray(pad_edge(image)[:, :, ::-1])
    x = torch.from_numpy(bgr).to(device_of(net), torch.float32).permute(2, 0, 1)[None] / 255.0
    fused = net(x)[-1][0, 0].float().cpu().numpy()
    if binary:
        fused = (fused > 0.5).astype(np.float32)
    return quantise_probability(fused, safe=safe)[:h, :w]


def detect_pidinet(net, image, a, b):
    return grey_map(pidinet_edges(net, image, safe=False))


def detect_pidinet_safe(net, image, a, b):
    return grey_map(pidinet_edges(net, image, safe=True))


def detect_sketch_pidinet(net, image, a, b):
    return grey_map(pidinet_edges(net, image, binary=True))


def detect_scribble_pidinet(net, image, a, b):
    return grey_map(scribble_from_edges(pidinet_edges(net, image, safe=False)))


ANNOTATORS = (
    Annotator("softedge_pidinet", (PIDINET_FILE,), load_pidinet, detect_pidinet),
    Annotator("softedge_pidisafe", (PIDINET_FILE,), partial(load_pidinet, module="softedge_pidisafe"), detect_pidinet_safe),
    Annotator("scribble_pidinet", (PIDINET_FILE,), partial(load_pidinet, module="scribble_pidinet"),
              detect_scribble_pidinet),
    Annotator("t2ia_sketch_pidi", (PIDINET_FILE,), partial(load_pidinet, module="t2ia_sketch_pidi"),
              detect_sketch_pidinet),
)
