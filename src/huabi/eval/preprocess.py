"""Image -> network input, the way each reference implementation prepares it. Pure functions.

Every image is first converted to RGB (``PIL.Image.convert("RGB")``, which is what
pytorch-fid, torch-fidelity and clean-fid do on load: alpha is dropped, palettes and
greyscale expanded), then resized *per image* to the network's input size, so folders
of mixed sizes and modes work (clean-fid's behaviour; torch-fidelity and pytorch-fid
need equal sizes within a batch and resize inside the network, which for equal-sized
inputs gives the same numbers).

Inception resize modes (all produce float pixels in [0, 255] at 299x299):

* ``tf1``   bilinear as TensorFlow 1.x resizes (no half-pixel offset): the original
            TTUR FID and torch-fidelity;
* ``torch`` ``F.interpolate(bilinear, align_corners=False)``: pytorch-fid;
* ``clean`` PIL bicubic on each float channel, no quantisation: clean-fid's "clean" mode.

CLIP (OpenAI preprocessing, as transformers' ``CLIPImageProcessor``): bicubic resize of
the 8-bit image so the short side is the input size, centre crop, /255, mean/std
normalisation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from huabi.errors import HuabiError

INCEPTION_RESIZE_MODES = ("tf1", "torch", "clean")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def rgb_array(image: Image.Image) -> np.ndarray:
    """[H, W, 3] uint8."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def resize_bilinear_tf1(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[N, C, H, W] float -> [N, C, *size]: TF1 ``resize_bilinear(align_corners=False)``.

    Output pixel i samples the input at ``i * in / out`` (no half-pixel centre), clamping
    the right/bottom neighbour at the edge.
    """
    out_h, out_w = size
    in_h, in_w = pixels.shape[-2:]

    def taps(out_size: int, in_size: int):
        position = torch.arange(out_size, dtype=torch.float32, device=pixels.device) * torch.tensor(in_size / out_size, dtype=torch.float32)
        low = position.long()
        high = (low + 1).clamp_max(in_size - 1)
        return low, high, (position - low.float()).to(pixels.dtype)

    y0, y1, wy = taps(out_h, in_h)
    x0, x1, wx = taps(out_w, in_w)
    top = pixels[..., y0, :]
    bottom = pixels[..., y1, :]
    # interpolate along x first on both rows, then along y (the order TF uses)
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * wx
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * wx
    return top + (bottom - top) * wy.view(-1, 1)


def resize_clean(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """clean-fid's resize: each channel as a 32-bit float PIL image, bicubic, clipped to [0, 255]."""
    width, height = size[1], size[0]
    channels = [np.asarray(Image.fromarray(array[:, :, c].astype(np.float32), mode="F").resize((width, height), Image.BICUBIC))
                for c in range(array.shape[2])]
    return np.stack(channels, axis=2).clip(0, 255).astype(np.float32)


def inception_input(image: Image.Image, mode: str = "tf1", size_px: int = 299) -> torch.Tensor:
    """[3, size, size] float32 in [0, 255]."""
    if mode not in INCEPTION_RESIZE_MODES:
        raise HuabiError(f"unknown resize mode {mode!r}; valid: {', '.join(INCEPTION_RESIZE_MODES)}")
    array = rgb_array(image)
    if mode == "clean":
        return torch.from_numpy(resize_clean(array, (size_px, size_px))).permute(2, 0, 1).contiguous()
    pixels = torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1).unsqueeze(0)
    if pixels.shape[-2:] != (size_px, size_px):
        if mode == "tf1":
            pixels = resize_bilinear_tf1(pixels, (size_px, size_px))
        else:
            pixels = F.interpolate(pixels, size=(size_px, size_px), mode="bilinear", align_corners=False)
    return pixels[0]


def clip_input(image: Image.Image, size_px: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """[3, size, size] normalised, OpenAI CLIP preprocessing."""
    image = image.convert("RGB")
    width, height = image.size
    short = min(width, height)
    if short != size_px:
        # the long side as transformers computes it: int(size * long / short)
        if width <= height:
            new_size = (size_px, int(size_px * height / width))
        else:
            new_size = (int(size_px * width / height), size_px)
        image = image.resize(new_size, Image.BICUBIC)
        width, height = image.size
    top, left = int((height - size_px) / 2), int((width - size_px) / 2)
    image = image.crop((left, top, left + size_px, top + size_px))
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def minus_one_to_one_input(image: Image.Image, size_px: int) -> torch.Tensor:
    """huabi-mini's CLIP towers: [-1, 1] pixels, area-downsized (bilinear up) to the tower's size."""
    array = rgb_array(image).astype(np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)
    if pixels.shape[-2:] != (size_px, size_px):
        mode = "area" if pixels.shape[-1] > size_px else "bilinear"
        pixels = F.interpolate(pixels, size=(size_px, size_px), mode=mode)
    return pixels[0]
