"""M-LSD straight-line detector (``mlsd``), sd-webui-controlnet's ``mlsd_large_512_fp32.pth``.

The network (M-LSD large, NAVER's Apache-2 design): a MobileNetV2 trunk cut
after its 96-channel stage, fed RGB plus a constant fourth channel, and a
small feature-pyramid decoder.  Its output at half the input size has, per
pixel, a line-centre logit and the (x, y) offsets of the line's two ends.

Decoding (as sd-webui-controlnet): sigmoid of the centre map, keep local
maxima (3x3), take the 200 strongest; a centre makes a line when its score is
above Threshold A ("MLSD Value Threshold", 0.1) and the line is longer than
Threshold B ("MLSD Distance Threshold", 0.1, in half-resolution pixels).
Lines are drawn 1 px wide, white on black, at twice the decoded coordinates
(truncated to whole pixels), on the edge-padded image, then cropped back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from huabi.core.line_maps import pad_edge
from huabi.models.annotators import Annotator
from huabi.models.annotators.lines import device_of, grey_map, load_checked

MLSD_FILE = "mlsd_large_512_fp32.pth"
CANDIDATE_LINES = 200
PEAK_WINDOW_PX = 3
FOURTH_CHANNEL = 1.0  # the constant extra input plane, before the -1..1 scaling


# --------------------------------------------------------------------------- MobileNetV2 trunk


class ConvBnRelu6(nn.Sequential):
    """conv (no bias) + batch norm + ReLU6; stride 2 pads only right/bottom by 1, as TFLite does."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        padding = 0 if stride == 2 else (kernel - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(),
        )
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            x = F.pad(x, (0, 1, 0, 1))
        return super().forward(x)


class InvertedResidual(nn.Module):
    """Expand 1x1 (unless ``expand`` is 1), depthwise 3x3, project 1x1; residual when the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int):
        super().__init__()
        hidden = in_channels * expand
        layers: list[nn.Module] = [] if expand == 1 else [ConvBnRelu6(in_channels, hidden, kernel=1)]
        layers += [
            ConvBnRelu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


# (expansion, channels, repeats, first stride) of MobileNetV2's first five stages.
TRUNK_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
PYRAMID_TAPS = (1, 3, 6, 10, 13)  # feature indices whose outputs feed the decoder


class MobileNetV2Trunk(nn.Module):
    def __init__(self):
        super().__init__()
        features: list[nn.Module] = [ConvBnRelu6(4, 32, stride=2)]
        channels = 32
        for expand, out_channels, repeats, stride in TRUNK_STAGES:
            for index in range(repeats):
                features.append(InvertedResidual(channels, out_channels, stride if index == 0 else 1, expand))
                channels = out_channels
        self.features = nn.Sequential(*features)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for index, feature in enumerate(self.features):
            x = feature(x)
            if index in PYRAMID_TAPS:
                taps.append(x)
        return taps


# --------------------------------------------------------------------------- decoder


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int, *, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=padding, dilation=dilation),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


class Merge(nn.Module):
    """1x1 conv both the skip (``conv2``) and the deeper map (``conv1``), upsample the deeper one, concatenate."""

    def __init__(self, skip_channels: int, deep_channels: int, upscale: bool = True):
        super().__init__()
        self.conv1 = _conv_bn_relu(deep_channels, 64, 1)
        self.conv2 = _conv_bn_relu(skip_channels, 64, 1)
        self.upscale = upscale

    def forward(self, skip: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        deep = self.conv1(deep)
        skip = self.conv2(skip)
        if self.upscale:
            deep = F.interpolate(deep, scale_factor=2.0, mode="bilinear", align_corners=True)
        return torch.cat((skip, deep), dim=1)


class Refine(nn.Module):
    """3x3 conv with a residual, then 3x3 conv down to 64 channels."""

    def __init__(self, channels: int = 128, out_channels: int = 64):
        super().__init__()
        self.conv1 = _conv_bn_relu(channels, channels, 3)
        self.conv2 = _conv_bn_relu(channels, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x) + x)


class Head(nn.Module):
    """Dilated 3x3 (dilation 5), 3x3, then 1x1 to 16 maps."""

    def __init__(self, channels: int = 64, out_channels: int = 16):
        super().__init__()
        self.conv1 = _conv_bn_relu(channels, channels, 3, dilation=5)
        self.conv2 = _conv_bn_relu(channels, channels, 3)
        self.conv3 = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


class MlsdLarge(nn.Module):
    """M-LSD large; attribute names follow the checkpoint (``block15`` ... ``block23``)."""

    def __init__(self):
        super().__init__()
        self.backbone = MobileNetV2Trunk()
        self.block15 = Merge(64, 96, upscale=False)
        self.block16 = Refine()
        self.block17 = Merge(32, 64)
        self.block18 = Refine()
        self.block19 = Merge(24, 64)
        self.block20 = Refine()
        self.block21 = Merge(16, 64)
        self.block22 = Refine()
        self.block23 = Head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[1, 4, H, W]`` in -1..1 -> ``[1, 9, H/2, W/2]``: centre logit, then (x0, y0, x1, y1) offsets, ..."""
        c1, c2, c3, c4, c5 = self.backbone(x)
        x = self.block16(self.block15(c4, c5))
        x = self.block18(self.block17(c3, x))
        x = self.block20(self.block19(c2, x))
        x = self.block22(self.block21(c1, x))
        return self.block23(x)[:, 7:]


def load_mlsd(paths: dict[str, Path], device: torch.device) -> MlsdLarge:
    return load_checked(MlsdLarge(), paths[MLSD_FILE], device, "mlsd")


# --------------------------------------------------------------------------- decoding and drawing


def network_input(rgb: np.ndarray) -> torch.Tensor:
    """uint8 RGB [H, W, 3] -> float32 [1, 4, H, W] in -1..1 (RGB plus the constant plane)."""
    planes = np.concatenate([rgb.astype(np.float64), np.full(rgb.shape[:2] + (1,), FOURTH_CHANNEL)], axis=2)
    planes = planes.transpose(2, 0, 1)[None].astype(np.float32)
    return torch.from_numpy(planes / np.float32(127.5) - np.float32(1.0))


def decode_lines(output: torch.Tensor, score_threshold: float, length_threshold: float) -> np.ndarray:
    """Line segments ``[N, 4]`` (x0, y0, x1, y1 at the network output's half resolution)."""
    _, _, _, width = output.shape
    heat = torch.sigmoid(output[:, 0])
    peaks = F.max_pool2d(heat, PEAK_WINDOW_PX, stride=1, padding=(PEAK_WINDOW_PX - 1) // 2)
    heat = (heat * (peaks == heat).float()).reshape(-1)
    scores, indices = torch.topk(heat, min(CANDIDATE_LINES, heat.numel()), dim=-1, largest=True)
    rows = torch.div(indices, width, rounding_mode="floor").cpu().numpy()
    cols = torch.fmod(indices, width).cpu().numpy()
    scores = scores.cpu().numpy()
    offsets = output[0, 1:5].float().cpu().numpy().transpose(1, 2, 0)  # [h, w, (x0, y0, x1, y1)]
    lengths = np.sqrt(np.sum((offsets[:, :, :2] - offsets[:, :, 2:]) ** 2, axis=-1))
    segments = []
    for row, col, score in zip(rows, cols, scores):
        if score > score_threshold and lengths[row, col] > length_threshold:
            dx0, dy0, dx1, dy1 = offsets[row, col]
            segments.append([col + dx0, row + dy0, col + dx1, row + dy1])
    return np.asarray(segments, dtype=np.float64).reshape(-1, 4)


def draw_lines(segments: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [height, width]: each segment drawn 1 px wide in white, end points truncated to whole pixels."""
    import cv2

    canvas = np.zeros((height, width), dtype=np.uint8)
    for x0, y0, x1, y1 in segments:
        cv2.line(canvas, (int(x0), int(y0)), (int(x1), int(y1)), 255, 1)
    return canvas


def detect_mlsd(net: MlsdLarge, image: np.ndarray, a: float | None, b: float | None) -> np.ndarray:
    h, w = image.shape[:2]
    padded = pad_edge(image)
    output = net(network_input(padded).to(device_of(net)))
    # The output is at half size: coordinates double back to the padded image's pixels.
    segments = decode_lines(output, float(a), float(b)) * 2.0
    return grey_map(draw_lines(segments, *padded.shape[:2])[:h, :w])


ANNOTATORS = (Annotator("mlsd", (MLSD_FILE,), load_mlsd, detect_mlsd),)
