"""Anime face segmentation (``seg_anime_face``, ``UNet.pth``).

The network (siyeong0's Anime-Face-Segmentation, which sd-webui-controlnet
ships) is a small U-Net: the first 17 blocks of a MobileNetV2 as the encoder
(five stages: 16, 24, 32, 96, 160 channels), and a decoder of nearest x2
upsampling + 3x3 conv + instance norm + leaky ReLU per stage, each output
resized (bilinear, corners aligned) to the skip connection it is concatenated
with, ending in a 7-class softmax.  Written here from the checkpoint's key
layout (torchvision's MobileNetV2 module names under ``en_block0..4``, the
decoder convs under ``de_block0..4.1``); loading is strict.

Processing as sd-webui-controlnet: the image (edge-padded to a multiple of 64)
resized so its short side is 512 (PIL bicubic, the long side truncated), in
[0, 1] without normalisation; per pixel the most likely class (first on ties)
painted with the extension's colours: background yellow, hair blue, eye red,
mouth white, face green, skin cyan, clothes magenta.  One difference: the map
is resized back (nearest) to the padded image before the padding is cropped;
A1111 crops the 512-scale map, which only lines up at resolution 512.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from huabi.errors import HuabiError
from huabi.models.annotators import Annotator, read_annotator_weights
from huabi.models.annotators.depth import pad_to_multiple
from huabi.models.convert import state_dict_mismatch

ANIME_FACE_FILE = "UNet.pth"
NET_SHORT_SIDE = 512
# sd-webui-controlnet's palette, class order: background, hair, eye, mouth, face, skin, clothes.
PALETTE = np.array([(255, 255, 0), (0, 0, 255), (255, 0, 0), (255, 255, 255), (0, 255, 0), (0, 255, 255),
                    (255, 0, 255)], dtype=np.uint8)
CLASSES = len(PALETTE)
# MobileNetV2's inverted-residual settings (expansion, output channels, repeats, first stride)
# for the 16 blocks after the stem the encoder uses (torchvision's ``features[1:17]``).
MOBILENET_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2))
# How many of ``features[0:17]`` each encoder stage holds.
STAGE_SIZES = (2, 2, 3, 7, 3)
STEM_CHANNELS = 32


def _conv_bn_relu6(inputs: int, outputs: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (skipped at expansion 1), 3x3 depthwise, 1x1 linear projection."""

    def __init__(self, inputs: int, outputs: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = inputs * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn_relu6(inputs, hidden, 1, 1))
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, outputs, 1, bias=False), nn.BatchNorm2d(outputs)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and inputs == outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


def _mobilenet_features() -> list[nn.Module]:
    features: list[nn.Module] = [_conv_bn_relu6(3, STEM_CHANNELS, 3, 2)]
    channels = STEM_CHANNELS
    for expansion, outputs, repeats, stride in MOBILENET_BLOCKS:
        for index in range(repeats):
            features.append(InvertedResidual(channels, outputs, stride if index == 0 else 1, expansion))
            channels = outputs
    return features


def _decoder(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.UpsamplingNearest2d(scale_factor=2), nn.Conv2d(inputs, outputs, 3, padding=1),
                         nn.InstanceNorm2d(outputs), nn.LeakyReLU(0.1), nn.Dropout(0.2))


class AnimeFaceUNet(nn.Module):
    """The segmentation U-Net; attribute names are the checkpoint's."""

    def __init__(self) -> None:
        super().__init__()
        features = _mobilenet_features()
        stages, start = [], 0
        for size in STAGE_SIZES:
            stages.append(nn.Sequential(*features[start:start + size]))
            start += size
        self.en_block0, self.en_block1, self.en_block2, self.en_block3, self.en_block4 = stages
        self.de_block4 = _decoder(160, 96)
        self.de_block3 = _decoder(96 * 2, 32)
        self.de_block2 = _decoder(32 * 2, 24)
        self.de_block1 = _decoder(24 * 2, 16)
        self.de_block0 = nn.Sequential(nn.UpsamplingNearest2d(scale_factor=2), nn.Conv2d(16 * 2, CLASSES, 3, padding=1),
                                       nn.Softmax(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] -> class probabilities [N, 7, H', W']."""
        skips = []
        for stage in (self.en_block0, self.en_block1, self.en_block2, self.en_block3):
            x = stage(x)
            skips.append(x)
        x = self.en_block4(x)
        for decoder, skip in zip((self.de_block4, self.de_block3, self.de_block2, self.de_block1), reversed(skips)):
            x = nn.functional.interpolate(decoder(x), size=skip.shape[-2:], mode="bilinear", align_corners=True)
            x = torch.cat((x, skip), dim=1)
        return self.de_block0(x)


@dataclass(frozen=True)
class LoadedAnimeFace:
    model: AnimeFaceUNet
    device: torch.device


def load_anime_face(path: Path, device: torch.device) -> LoadedAnimeFace:
    tensors = read_annotator_weights(path)
    # DataParallel copies: sd-webui-controlnet drops "module." wherever it appears.
    tensors = {key.replace("module.", ""): value for key, value in tensors.items()}
    model = AnimeFaceUNet()
    expected = model.state_dict()
    problem = state_dict_mismatch(expected, tensors)
    if problem:
        raise HuabiError(f"{path.name}: not an anime face segmentation UNet checkpoint ({problem})")
    model.load_state_dict({key: value.to(expected[key].dtype) for key, value in tensors.items()}, strict=True)
    return LoadedAnimeFace(model.to(device).eval(), device)


def network_input_size(height: int, width: int, short: int = NET_SHORT_SIDE) -> tuple[int, int]:
    """Short side ``short``, the long side scaled and truncated (torchvision's ``Resize(int)``)."""
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short


def anime_face_pixels(image: np.ndarray) -> torch.Tensor:
    """uint8 RGB [H, W, 3] -> [1, 3, h, w] in [0, 1] at the network size (PIL bicubic)."""
    from PIL import Image

    height, width = network_input_size(*image.shape[:2])
    resized = np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))
    return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))).float()[None] / 255.0


def colour_classes(probabilities: np.ndarray) -> np.ndarray:
    """[7, H, W] -> uint8 [H, W, 3]: the most likely class's colour (first on ties)."""
    return PALETTE[np.argmax(probabilities, axis=0)]


def detect_anime_face(net: LoadedAnimeFace, image: np.ndarray, a: float | None, b: float | None) -> np.ndarray:
    import cv2

    height, width = image.shape[:2]
    padded = pad_to_multiple(image)
    with torch.inference_mode():
        probabilities = net.model(anime_face_pixels(padded).to(net.device))[0].float().cpu().numpy()
    colours = colour_classes(probabilities)
    if colours.shape[:2] != padded.shape[:2]:
        colours = cv2.resize(colours, (padded.shape[1], padded.shape[0]), interpolation=cv2.INTER_NEAREST)
    return colours[:height, :width].astype(np.float32) / 255.0


ANNOTATORS = (
    Annotator("seg_anime_face", (ANIME_FACE_FILE,),
              lambda paths, device: load_anime_face(paths[ANIME_FACE_FILE], device), detect_anime_face),
)
