"""Soft edges (HED) and line art (realistic, coarse, anime) annotators, sd-webui-controlnet's files.

=====================  ===================  ==============================================================
module                 weight file          network
=====================  ===================  ==============================================================
``softedge_hed``       ControlNetHED.pth    lllyasviel's Apache-2 HED: five VGG-style stages on RGB 0..255,
``softedge_hedsafe``                        each with a 1x1 side output; mean of the five, sigmoid
                                            (``hedsafe``: snapped to 0, 0.5, 1)
``scribble_hed``       ControlNetHED.pth    HED, thinned (non-maximum suppression) into bold strokes
``lineart_realistic``  sk_model.pth         "informative drawings" ResNet generator (3 residual blocks,
``lineart_coarse``     sk_model2.pth        instance norm, reflection padding), RGB 0..1 -> sigmoid
``lineart_anime``      netG.pth             pix2pix U-Net (8 levels, instance norm), RGB -1..1 -> tanh,
                                            run at a multiple of 256 px
=====================  ===================  ==============================================================

Every map is white lines on black, computed on the edge-padded image (a
multiple of 64) and cropped back, and quantised to 8 bits like A1111's.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from huabi.core.line_maps import pad_edge, quantise_probability, scribble_from_edges
from huabi.errors import HuabiError
from huabi.models.annotators import Annotator, read_annotator_weights
from huabi.models.convert import state_dict_mismatch

HED_FILE = "ControlNetHED.pth"
LINEART_FILE = "sk_model.pth"
LINEART_COARSE_FILE = "sk_model2.pth"
LINEART_ANIME_FILE = "netG.pth"
ANIME_MULTIPLE_PX = 256  # the anime U-Net halves the size 8 times


# --------------------------------------------------------------------------- loading


def load_exact_state_dict(net: nn.Module, tensors: Mapping[str, torch.Tensor], path: Path, *, module: str) -> nn.Module:
    """Copy ``tensors`` into ``net`` only if names and shapes match exactly; else one error line naming the file.

    Nothing is copied before the whole file has been checked, so a wrong file
    never leaves a half-loaded network behind.
    """
    expected = net.state_dict()
    problem = state_dict_mismatch(expected, tensors, floating=True)
    if problem:
        raise HuabiError(f"{Path(path).name}: not the weights preprocessor {module} expects: {problem}")
    net.load_state_dict({name: tensors[name].to(expected[name].dtype) for name in expected}, strict=True)
    return net


def _without_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Names with a leading ``prefix`` removed (checkpoints saved from ``nn.DataParallel`` carry ``module.``)."""
    return {name[len(prefix):] if name.startswith(prefix) else name: value for name, value in tensors.items()}


def load_checked(net: nn.Module, path: Path, device: torch.device, module: str, *, strip: str | None = None) -> nn.Module:
    """``net`` with the weights of ``path`` (read safely, names checked exactly), float32 on ``device``, eval mode."""
    tensors = read_annotator_weights(path)
    if strip:
        tensors = _without_prefix(tensors, strip)
    load_exact_state_dict(net, tensors, path, module=module)
    return net.to(device=device, dtype=torch.float32).eval()


def device_of(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


def grey_map(single: np.ndarray) -> np.ndarray:
    """uint8 [H, W] -> float32 [H, W, 3] in [0, 1]."""
    return np.repeat(single[..., None], 3, axis=2).astype(np.float32) / 255.0


# --------------------------------------------------------------------------- HED


class HedStage(nn.Module):
    """3x3 conv + ReLU layers (after an optional 2x2 max pool) and a 1x1 side output of the last one."""

    def __init__(self, in_channels: int, channels: int, layers: int):
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1)
                                     for i in range(layers)])
        self.projection = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor, pool: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if pool:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class SoftEdgeHed(nn.Module):
    """ControlNetHED_Apache2's layout: a learnt per-channel offset, then five stages (64..512 channels)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.block1 = HedStage(3, 64, 2)
        self.block2 = HedStage(64, 128, 2)
        self.block3 = HedStage(128, 256, 3)
        self.block4 = HedStage(256, 512, 3)
        self.block5 = HedStage(512, 512, 3)

    def forward(self, rgb_255: torch.Tensor) -> list[torch.Tensor]:
        """RGB in 0..255 ``[1, 3, H, W]`` -> the five side outputs (logits at 1, 1/2, ... 1/16 size)."""
        x = rgb_255 - self.norm
        sides = []
        for index, stage in enumerate((self.block1, self.block2, self.block3, self.block4, self.block5)):
            x, side = stage(x, pool=index > 0)
            sides.append(side)
        return sides


def load_hed(paths: dict[str, Path], device: torch.device, module: str = "softedge_hed") -> SoftEdgeHed:
    return load_checked(SoftEdgeHed(), paths[HED_FILE], device, module)


def hed_edges(net: SoftEdgeHed, image: np.ndarray, *, safe: bool) -> np.ndarray:
    """uint8 [H, W] soft edges of an RGB image (computed on the edge-padded image, then cropped)."""
    import cv2

    h, w = image.shape[:2]
    padded = pad_edge(image)
    ph, pw = padded.shape[:2]
    rgb = torch.tensor(padded).to(device_of(net), torch.float32).permute(2, 0, 1)[None]
    sides = [side[0, 0].float().cpu().numpy() for side in net(rgb)]
    # Bilinear upsampling with OpenCV, as A1111 does, so the maps agree to the last bit.
    stacked = np.stack([cv2.resize(side, (pw, ph), interpolation=cv2.INTER_LINEAR) for side in sides], axis=2)
    probability = 1.0 / (1.0 + np.exp(-np.mean(stacked, axis=2).astype(np.float64)))
    return quantise_probability(probability, safe=safe)[:h, :w]


def detect_hed(net, image, a, b):
    return grey_map(hed_edges(net, image, safe=False))


def detect_hed_safe(net, image, a, b):
    return grey_map(hed_edges(net, image, safe=True))


def detect_scribble_hed(net, image, a, b):
    return grey_map(scribble_from_edges(hed_edges(net, image, safe=False)))


# --------------------------------------------------------------------------- line art (realistic / coarse)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class LineartGenerator(nn.Module):
    """The "informative drawings" generator: 7x7 stem, two stride-2 downs, residual blocks, two ups, 7x7 + sigmoid."""

    def __init__(self, residual_blocks: int = 3):
        super().__init__()
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, 64, 7), nn.InstanceNorm2d(64), nn.ReLU())
        self.model1 = nn.Sequential(
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.InstanceNorm2d(128), nn.ReLU(),
            nn.Conv2d(128, 256, 3, stride=2, padding=1), nn.InstanceNorm2d(256), nn.ReLU(),
        )
        self.model2 = nn.Sequential(*[ResidualBlock(256) for _ in range(residual_blocks)])
        self.model3 = nn.Sequential(
            nn.ConvTranspose2d(256, 128, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(128), nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(64), nn.ReLU(),
        )
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, 1, 7), nn.Sigmoid())

    def forward(self, rgb_unit: torch.Tensor) -> torch.Tensor:
        """RGB in 0..1 -> drawing in 0..1 (1 = paper, 0 = ink), same size."""
        return self.model4(self.model3(self.model2(self.model1(self.model0(rgb_unit)))))


def _load_lineart(file_name: str, module: str):
    def load(paths: dict[str, Path], device: torch.device) -> LineartGenerator:
        return load_checked(LineartGenerator(), paths[file_name], device, module)

    return load


def detect_lineart(net: LineartGenerator, image: np.ndarray, a, b) -> np.ndarray:
    h, w = image.shape[:2]
    padded = pad_edge(image)
    rgb = torch.tensor(padded).to(device_of(net), torch.float32).permute(2, 0, 1)[None] / 255.0
    drawing = net(rgb)[0, 0].float().cpu().numpy()
    ink_on_paper = (drawing * 255.0).clip(0, 255).astype(np.uint8)
    return grey_map((255 - ink_on_paper)[:h, :w])  # white lines on black


# --------------------------------------------------------------------------- line art (anime)


class UNetLevel(nn.Module):
    """One level of the pix2pix U-Net; ``model`` is a Sequential laid out like the original's indices.

    outermost: [down conv, inner, ReLU, up conv, tanh]; innermost: [LeakyReLU, down conv, ReLU, up conv, norm];
    others: [LeakyReLU, down conv, norm, inner, ReLU, up conv, norm]; all but the outermost concatenate their
    input (skip connection) to their output.
    """

    def __init__(self, outer: int, inner: int, *, in_channels: int | None = None, child: UNetLevel | None = None,
                 outermost: bool = False):
        super().__init__()
        self.outermost = outermost
        down = nn.Conv2d(in_channels or outer, inner, 4, stride=2, padding=1)
        if outermost:
            layers = [down, child, nn.ReLU(), nn.ConvTranspose2d(inner * 2, outer, 4, stride=2, padding=1), nn.Tanh()]
        elif child is None:
            layers = [nn.LeakyReLU(0.2), down, nn.ReLU(), nn.ConvTranspose2d(inner, outer, 4, stride=2, padding=1),
                      nn.InstanceNorm2d(outer)]
        else:
            layers = [nn.LeakyReLU(0.2), down, nn.InstanceNorm2d(inner), child, nn.ReLU(),
                      nn.ConvTranspose2d(inner * 2, outer, 4, stride=2, padding=1), nn.InstanceNorm2d(outer)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


class AnimeLineartUNet(nn.Module):
    """pix2pix U-Net with 8 levels and 64 base channels (3 -> 1), instance norm, no dropout."""

    def __init__(self, levels: int = 8, base: int = 64):
        super().__init__()
        level = UNetLevel(base * 8, base * 8)
        for _ in range(levels - 5):
            level = UNetLevel(base * 8, base * 8, child=level)
        level = UNetLevel(base * 4, base * 8, child=level)
        level = UNetLevel(base * 2, base * 4, child=level)
        level = UNetLevel(base, base * 2, child=level)
        self.model = UNetLevel(1, base, in_channels=3, child=level, outermost=True)

    def forward(self, rgb_signed: torch.Tensor) -> torch.Tensor:
        """RGB in -1..1 -> drawing in -1..1 (1 = paper)."""
        return self.model(rgb_signed)


def load_lineart_anime(paths: dict[str, Path], device: torch.device) -> AnimeLineartUNet:
    return load_checked(AnimeLineartUNet(), paths[LINEART_ANIME_FILE], device, "lineart_anime", strip="module.")


def detect_lineart_anime(net: AnimeLineartUNet, image: np.ndarray, a, b) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    padded = pad_edge(image)
    ph, pw = padded.shape[:2]
    run_h, run_w = -(-ph // ANIME_MULTIPLE_PX) * ANIME_MULTIPLE_PX, -(-pw // ANIME_MULTIPLE_PX) * ANIME_MULTIPLE_PX
    enlarged = cv2.resize(padded, (run_w, run_h), interpolation=cv2.INTER_CUBIC)
    rgb = torch.from_numpy(enlarged).to(device_of(net), torch.float32).permute(2, 0, 1)[None] / 127.5 - 1.0
    drawing = (net(rgb)[0, 0] * 127.5 + 127.5).float().cpu().numpy()
    drawing = cv2.resize(drawing, (pw, ph), interpolation=cv2.INTER_CUBIC)
    ink_on_paper = drawing.clip(0, 255).astype(np.uint8)
    return grey_map((255 - ink_on_paper)[:h, :w])


ANNOTATORS = (
    Annotator("softedge_hed", (HED_FILE,), load_hed, detect_hed),
    Annotator("softedge_hedsafe", (HED_FILE,), partial(load_hed, module="softedge_hedsafe"), detect_hed_safe),
    Annotator("scribble_hed", (HED_FILE,), partial(load_hed, module="scribble_hed"), detect_scribble_hed),
    Annotator("lineart_realistic", (LINEART_FILE,), _load_lineart(LINEART_FILE, "lineart_realistic"), detect_lineart),
    Annotator("lineart_coarse", (LINEART_COARSE_FILE,), _load_lineart(LINEART_COARSE_FILE, "lineart_coarse"),
              detect_lineart),
    Annotator("lineart_anime", (LINEART_ANIME_FILE,), load_lineart_anime, detect_lineart_anime),
)
