"""Stand-alone upscaling: Lanczos, or an ESRGAN-family model run tile by tile.

Memory bound of a model upscale (input W x H pixels, scale s, tile T input
pixels, overlap O, float32; ``band_bytes`` and ``tile_activation_bytes`` below):

* the input as uint8: ``3 W H`` bytes; the output as uint8: ``3 W H s^2`` bytes
  (48 MiB for 4096x4096) -- both are needed anyway;
* one band of float accumulators, value + weight, ``T s`` output rows high:
  ``16 T s * W s`` bytes (e.g. T=256, s=4, 4096 wide: 64 MiB), whatever H is;
* one tile's activations in the model: for an RRDBNet with F features that is
  about ``4 * (10 F T^2 + 3 F (2T)^2 + 3 F (sT)^2)`` bytes (trunk dense blocks
  plus the upsampled stages; F=64, T=256: ~1.2 GiB; a 128 tile needs a quarter).

None of these grows with the image height; the band grows with the width only.
Tiles overlap by O input pixels. In an overlap, the outer pixels of a tile
(up to the model's receptive radius, at most O/2), where the model saw zero
padding, get no weight; the rest is blended with a linear feather, so seams
vanish without whole-image float buffers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from huabi.errors import HuabiError
from huabi.models.upscalers import UpscalerModel

MIN_SCALE = 1.0
MAX_SCALE = 8.0
DEFAULT_TILE_PX = 256
DEFAULT_OVERLAP_PX = 32
LANCZOS_NAME = "Lanczos"  # A1111's name for Pillow's Lanczos upscaler
POSTPROCESS_KEY = "postprocessing"  # the PNG text chunk A1111's extras tab writes

TileCallback = Callable[[int, int], None]  # (tiles done, total tiles)


def check_scale(scale: float) -> float:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) \
            or not MIN_SCALE <= scale <= MAX_SCALE:
        raise HuabiError(f"scale: must be a number from {MIN_SCALE:g} to {MAX_SCALE:g}, got {scale!r}")
    return float(scale)


def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """The image at ``path``, fully read; a missing or non-image file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise HuabiError(f"image: {path}: no such file")
    from huabi.service.pngio import open_image as open_limited

    with open_limited(path, what="image") as image:  # pixel limit and one-line errors
        image.load()
        return image.copy() if image.mode in ("RGB", "RGBA") else image.convert("RGBA" if "A" in image.getbands() else "RGB")


def target_size(width_px: int, height_px: int, scale: float) -> tuple[int, int]:
    """A1111 rounds the upscaled size to whole pixels: ``int(side * scale)``."""
    return max(1, int(width_px * scale)), max(1, int(height_px * scale))


def upscale_lanczos(image: Image.Image, scale: float) -> Image.Image:
    scale = check_scale(scale)
    return image.resize(target_size(image.width, image.height, scale), resample=Image.LANCZOS)


# Floor of a feather weight: pixels a tile should not speak for get this instead of 0, so
# every output pixel's total weight stays positive; its effect is below 8-bit rounding.
_MIN_WEIGHT = 1e-6


def _feather(length: int, lead: int, trail: int, margin: int) -> np.ndarray:
    """Weights along one axis of a tile: ~0 for ``margin`` pixels at an edge with a
    neighbour (the model saw padding there), then a linear ramp to 1 over the rest of
    the ``lead``/``trail`` overlap; 1 at image edges and in the middle."""
    weight = np.ones(length, dtype=np.float32)
    position = np.arange(length, dtype=np.float32) + 0.5
    for overlap, distance in ((lead, position), (trail, length - position)):
        if overlap > 0:
            ramp = max(overlap - margin, 1)
            weight = np.minimum(weight, np.clip((distance - margin) / ramp, _MIN_WEIGHT, 1.0))
    return weight


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along an axis: stride ``tile - overlap``, the last tile flush with the end."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


@dataclass(frozen=True)
class TilePlan:
    width_px: int
    height_px: int
    tile_px: int
    overlap_px: int

    def rows(self) -> list[int]:
        return _starts(self.height_px, self.tile_px, self.overlap_px)

    def cols(self) -> list[int]:
        return _starts(self.width_px, self.tile_px, self.overlap_px)

    def count(self) -> int:
        return len(self.rows()) * len(self.cols())


def band_bytes(width_px: int, scale: int, tile_px: int) -> int:
    """Float32 value + weight accumulators for one band of tiles (4 channels of 4 bytes)."""
    return 16 * tile_px * scale * width_px * scale


def tile_activation_bytes(features: int, tile_px: int, scale: int) -> int:
    """Rough peak activations of one RRDBNet tile in float32 (see the module docstring)."""
    return 4 * (10 * features * tile_px**2 + 3 * features * (2 * tile_px) ** 2 + 3 * features * (scale * tile_px) ** 2)


def upscale_with_model(
    image: Image.Image,
    model: UpscalerModel,
    *,
    tile_px: int = DEFAULT_TILE_PX,
    overlap_px: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    on_tile: TileCallback | None = None,
) -> Image.Image:
    """``image`` through the model at its native scale, tile by tile, feathered (RGB out; alpha by Lanczos).

    ``overlap_px`` (input pixels shared by neighbouring tiles) defaults to
    ``min(32, tile_px // 4)``.
    """
    if not isinstance(tile_px, int) or isinstance(tile_px, bool) or tile_px < 16:
        raise HuabiError(f"tile: must be an integer of at least 16 pixels, got {tile_px!r}")
    if overlap_px is None:
        overlap_px = min(DEFAULT_OVERLAP_PX, tile_px // 4)
    if not isinstance(overlap_px, int) or not 0 <= overlap_px <= tile_px // 2:
        raise HuabiError(f"tile overlap: must be from 0 to half the tile ({tile_px // 2}), got {overlap_px!r}")
    alpha = image.getchannel("A") if image.mode == "RGBA" else None
    pixels = np.asarray(image.convert("RGB"))  # uint8 H x W x 3: the only full-size input copy
    height_px, width_px = pixels.shape[:2]
    scale = model.scale
    result = Image.new("RGB", (width_px * scale, height_px * scale))  # the only full-size output
    plan = TilePlan(width_px, height_px, tile_px, overlap_px)
    rows, cols = plan.rows(), plan.cols()
    total, done = len(rows) * len(cols), 0
    out_w = width_px * scale
    band_rows = min(tile_px, height_px) * scale
    # Accumulators for the rows the current band touches: colour * weight, and weight.
    value = np.zeros((band_rows, out_w, 3), dtype=np.float32)
    weight = np.zeros((band_rows, out_w, 1), dtype=np.float32)
    band_top = 0  # output row of value[0]
    # Context the model needs around a pixel, capped so two overlapping tiles still share a ramp.
    margin = min(model.receptive_radius_px, overlap_px // 2) * scale
    for row_index, y0 in enumerate(rows):
        y1 = min(y0 + tile_px, height_px)
        # Shift the accumulators so that value[0] is output row y0 * scale.
        shift = y0 * scale - band_top
        if shift:
            _shift_up(value, shift)
            _shift_up(weight, shift)
            band_top = y0 * scale
        lead_y = overlap_px * scale if row_index > 0 else 0
        trail_y = overlap_px * scale if row_index < len(rows) - 1 else 0
        for col_index, x0 in enumerate(cols):
            x1 = min(x0 + tile_px, width_px)
            tile = _run_tile(model, pixels[y0:y1, x0:x1], device, dtype)  # float32 h*s x w*s x 3
            lead_x = overlap_px * scale if col_index > 0 else 0
            trail_x = overlap_px * scale if col_index < len(cols) - 1 else 0
            w = (_feather(tile.shape[0], lead_y, trail_y, margin)[:, None, None]
                 * _feather(tile.shape[1], lead_x, trail_x, margin)[None, :, None])
            value[: tile.shape[0], x0 * scale: x1 * scale] += tile * w
            weight[: tile.shape[0], x0 * scale: x1 * scale] += w
            done += 1
            if on_tile is not None:
                on_tile(done, total)
        # Rows above the next band's first row are final.
        final_end = rows[row_index + 1] * scale if row_index + 1 < len(rows) else y1 * scale
        # In strips: whole-band temporaries would double the band's memory.
        for start in range(0, final_end - band_top, _STRIP_ROWS):
            stop = min(start + _STRIP_ROWS, final_end - band_top)
            strip = value[start:stop] / weight[start:stop]
            strip = np.clip(np.rint(strip * 255.0), 0, 255).astype(np.uint8)
            result.paste(Image.fromarray(strip, "RGB"), (0, band_top + start))
    if alpha is not None:
        result.putalpha(alpha.resize(result.size, resample=Image.LANCZOS))
    return result


_STRIP_ROWS = 64


def _shift_up(buffer: np.ndarray, rows: int) -> None:
    """Move ``buffer[rows:]`` to the top and zero the rest, chunk by chunk (no full-size temporary)."""
    length = buffer.shape[0]
    chunk = max(1, min(rows, _STRIP_ROWS))
    for start in range(0, length - rows, chunk):
        stop = min(start + chunk, length - rows)
        buffer[start:stop] = buffer[start + rows:stop + rows]  # chunk <= rows: source and target do not overlap
    buffer[length - rows:] = 0


def _run_tile(model: UpscalerModel, tile: np.ndarray, device: torch.device | str, dtype: torch.dtype) -> np.ndarray:
    batch = torch.from_numpy(np.array(tile)).permute(2, 0, 1)[None]  # a writable copy of one tile
    batch = batch.to(device=device, dtype=dtype) / 255.0
    with torch.inference_mode():
        result = model.module(batch)
    return result[0].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


@dataclass(frozen=True)
class UpscaleResult:
    image: Image.Image
    upscaler: str  # as recorded in "Postprocess upscaler"
    scale: float


def upscale_image(
    image: Image.Image,
    scale: float,
    *,
    model: UpscalerModel | None = None,
    tile_px: int = DEFAULT_TILE_PX,
    overlap_px: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    on_tile: TileCallback | None = None,
) -> UpscaleResult:
    """Upscale by ``scale`` (1..8): Lanczos, or ``model`` repeated until the scale is reached, then
    Lanczos down to the exact size (what A1111's extras tab does with a model upscaler)."""
    scale = check_scale(scale)
    width_px, height_px = target_size(image.width, image.height, scale)
    if model is None:
        return UpscaleResult(upscale_lanczos(image, scale), LANCZOS_NAME, scale)
    current = image
    for _ in range(_model_passes(model.scale, scale)):
        if current.width >= width_px and current.height >= height_px:
            break
        current = upscale_with_model(current, model, tile_px=tile_px, overlap_px=overlap_px, device=device,
                                     dtype=dtype, on_tile=on_tile)
    if current.size != (width_px, height_px):
        current = current.resize((width_px, height_px), resample=Image.LANCZOS)
    return UpscaleResult(current, model.name, scale)


def _model_passes(model_scale: int, scale: float) -> int:
    if model_scale <= 1:
        return 1
    return max(1, math.ceil(math.log(scale, model_scale) - 1e-9))


def postprocess_infotext(scale: float, upscaler: str) -> str:
    """A1111's extras-tab record: ``Postprocess upscale by: 2, Postprocess upscaler: Lanczos``."""
    from huabi.core.infotext import format_value, quote

    return f"Postprocess upscale by: {format_value(scale)}, Postprocess upscaler: {quote(upscaler)}"


def save_upscaled(result: UpscaleResult, path: Path, parameters: str | None) -> Path:
    """Write a PNG atomically: the source's "parameters" text (``parameters``) kept as is,
    A1111's "postprocessing" text added, as its extras tab does (so ``huabi generate
    --from`` on the upscaled file still redoes the original)."""
    from PIL.PngImagePlugin import PngInfo

    from huabi.service.outputs import save_image_file
    from huabi.service.pngio import INFOTEXT_KEY

    info = PngInfo()
    if parameters:
        info.add_itxt(INFOTEXT_KEY, parameters)
    info.add_itxt(POSTPROCESS_KEY, postprocess_infotext(result.scale, result.upscaler))
    return save_image_file(result.image, path, pnginfo=info)  # a file that appeared meanwhile is kept


def iter_output_paths(out_dir: Path, stem: str) -> Iterator[Path]:
    yield out_dir / f"{stem}.png"
    for number in range(1, 100_000):
        yield out_dir / f"{stem}-{number}.png"


def next_output_path(out_dir: Path, source: Path) -> Path:
    """``<stem>-upscaled.png`` in ``out_dir``, numbered when taken (never overwrites)."""
    for path in iter_output_paths(out_dir, f"{source.stem}-upscaled"):
        if not path.exists():
            return path
    raise HuabiError(f"out: {out_dir}: no free file name for {source.stem}-upscaled")


__all__ = [
    "LANCZOS_NAME",
    "UpscaleResult",
    "band_bytes",
    "check_scale",
    "open_image",
    "postprocess_infotext",
    "save_upscaled",
    "target_size",
    "tile_activation_bytes",
    "upscale_image",
    "upscale_lanczos",
    "upscale_with_model",
]
