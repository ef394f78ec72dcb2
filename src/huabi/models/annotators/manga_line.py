"""Manga line extraction (``lineart_anime_denoise``), sd-webui-controlnet's ``erika.pth``.

The network of "Deep Extraction of Manga Structural Lines" (Li, Liu, Wong,
SIGGRAPH 2017; ported from Keras to PyTorch), which sd-webui-controlnet offers as
the de-noising anime line art preprocessor: it keeps structural lines and drops
screen tones.  A residual U-Net on the grey image in 0..255 (no normalisation):

* every conv is pre-activated: batch norm (eps 1e-3), LeakyReLU(0.2), conv
  (3x3, or 1x1 at the end); a unit is two of those plus a shortcut (identity,
  or a 1x1 conv when the width or stride changes);
* encoder: five stages of 2, 3, 5, 7, 12 units, 24 -> 384 channels; a stage's
  *last* unit halves the size (not the first stage);
* decoder: four stages of 7, 5, 3, 2 units back to 24 channels, each starting
  with a unit that upsamples (nearest, x2) after its first conv and its
  shortcut conv; the encoder output of the same size is then added (not
  concatenated);
* a last stage of 2 units to 16 channels and a 1x1 pre-activated conv to one
  channel: the page, 255 = paper.

The map is ``255 - page``, clipped and truncated to 8 bits (white lines on
black), computed on the edge-padded image (a multiple of 64) and cropped back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from huabi.core.line_maps import pad_edge
from huabi.models.annotators import Annotator
from huabi.models.annotators.lines import device_of, grey_map, load_checked

MANGA_LINE_FILE = "erika.pth"
# (in channels, out channels, units) of the encoder stages (block0..block4) and decoder stages (block5..block8).
ENCODER_STAGES = ((1, 24, 2), (24, 48, 3), (48, 96, 5), (96, 192, 7), (192, 384, 12))
DECODER_STAGES = ((384, 192, 7), (192, 96, 5), (96, 48, 3), (48, 24, 2))


class PreActivatedConv(nn.Module):
    """Batch norm, LeakyReLU(0.2), conv (zero padding k // 2), then optionally nearest x2 upsampling."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, *, stride: int = 1, upsample: bool = False):
        super().__init__()
        layers = [nn.BatchNorm2d(in_channels, eps=1e-3), nn.LeakyReLU(0.2),
                  nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2)]
        if upsample:
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class Shortcut(nn.Module):
    """Identity, or a 1x1 conv (+ nearest x2 upsampling) where the unit changes width, stride or size."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, upsample: bool = False):
        super().__init__()
        self.model = None
        if in_channels != out_channels or stride != 1:
            layers = [nn.Conv2d(in_channels, out_channels, 1, stride=stride)]
            if upsample:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.model is None else self.model(x)


class ResidualUnit(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, upsample: bool = False):
        super().__init__()
        self.conv1 = PreActivatedConv(in_channels, out_channels, 3, stride=stride, upsample=upsample)
        self.residual = PreActivatedConv(out_channels, out_channels, 3)
        self.shortcut = Shortcut(in_channels, out_channels, stride=stride, upsample=upsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.residual(self.conv1(x))


class Stage(nn.Module):
    """``units`` residual units; ``down``: the last one has stride 2; ``up``: the first one upsamples x2."""

    def __init__(self, in_channels: int, out_channels: int, units: int, *, down: bool = False, up: bool = False):
        super().__init__()
        self.model = nn.Sequential(*[
            ResidualUnit(in_channels if i == 0 else out_channels, out_channels,
                         stride=2 if down and i == units - 1 else 1, upsample=up and i == 0)
            for i in range(units)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MangaLineNet(nn.Module):
    """Grey page in 0..255 ``[B, 1, H, W]`` (H, W multiples of 16) -> structural lines, 255 = paper."""

    def __init__(self):
        super().__init__()
        # Attribute names are the checkpoint's: block0..4 encoder, block5..8 decoder, block9 + conv15 the head.
        for index, (cin, cout, units) in enumerate(ENCODER_STAGES):
            setattr(self, f"block{index}", Stage(cin, cout, units, down=index > 0))
        for index, (cin, cout, units) in enumerate(DECODER_STAGES, start=len(ENCODER_STAGES)):
            setattr(self, f"block{index}", Stage(cin, cout, units, up=True))
        self.block9 = Stage(24, 16, 2)
        self.conv15 = PreActivatedConv(16, 1, 1)

    def forward(self, grey_255: torch.Tensor) -> torch.Tensor:
        encoded = []
        x = grey_255
        for index in range(len(ENCODER_STAGES)):
            x = getattr(self, f"block{index}")(x)
            encoded.append(x)
        for index, skip in zip(range(len(ENCODER_STAGES), 9), reversed(encoded[:-1])):
            x = getattr(self, f"block{index}")(x) + skip  # same width and size: added
        return self.conv15(self.block9(x))


def load_manga_line(paths: dict[str, Path], device: torch.device) -> MangaLineNet:
    return load_checked(MangaLineNet(), paths[MANGA_LINE_FILE], device, "lineart_anime_denoise", strip="module.")


def detect_manga_line(net: MangaLineNet, image: np.ndarray, a, b) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    grey = cv2.cvtColor(pad_edge(image), cv2.COLOR_RGB2GRAY)  # 8-bit grey, as A1111 feeds the network
    page = net(torch.tensor(grey).to(device_of(net), torch.float32)[None, None])[0, 0].float().cpu().numpy()
    lines = (255.0 - page).clip(0, 255).astype(np.uint8)
    return grey_map(lines[:h, :w])


ANNOTATORS = (Annotator("lineart_anime_denoise", (MANGA_LINE_FILE,), load_manga_line, detect_manga_line),)
