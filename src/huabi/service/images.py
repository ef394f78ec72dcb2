"""Reading init and mask images, and A1111's three resize modes.

Everything here is pixels in PIL form at the edge of the program; the mask
maths itself is in :mod:`huabi.core.masks` (tensors only).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

from huabi.errors import HuabiError
from huabi.service.pngio import open_image
from huabi.pipelines.img2img import image_to_tensor  # noqa: F401  (re-exported for interfaces)
from huabi.pipelines.inpaint import mask_to_tensor, tensor_to_mask  # noqa: F401

# CLI spelling -> the name A1111 shows (and writes as "Resize mode").
RESIZE_MODES = {"just": "Just resize", "crop": "Crop and resize", "fill": "Resize and fill"}


def canonical_resize_mode(name: str) -> str:
    """``just``/``crop``/``fill`` or A1111's own names -> the short name."""
    lowered = str(name).strip().lower()
    for short, long_name in RESIZE_MODES.items():
        if lowered in (short, long_name.lower()):
            return short
    raise HuabiError(f"resize mode: unknown mode {name!r}; valid: {', '.join(RESIZE_MODES)}")


def load_image(path: str | Path, *, what: str = "image") -> Image.Image:
    """An image file as RGB, EXIF rotation applied (an alpha channel is dropped, as A1111's RGB convert does)."""
    with open_image(path, what=what) as opened:  # pixel limit and one-line errors
        opened.load()
        image = ImageOps.exif_transpose(opened)
        return image.convert("RGB")


def load_mask(path: str | Path, width_px: int, height_px: int) -> Image.Image:
    """A mask file as 8-bit grey (white = repaint), resized to ``width_px`` x ``height_px``.

    A mask of another size is stretched to the image, as A1111 does. An alpha
    channel, if any, counts: transparent pixels are black (kept).
    """
    with open_image(path, what="mask") as opened:  # pixel limit and one-line errors
        opened.load()
        mask = ImageOps.exif_transpose(opened)
        if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
            rgba = mask.convert("RGBA")
            black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            mask = Image.alpha_composite(black, rgba)
        mask = mask.convert("L")
    if mask.size != (width_px, height_px):
        mask = mask.resize((width_px, height_px), Image.Resampling.BILINEAR)
    return mask


def default_size(image: Image.Image, multiple: int = 8) -> tuple[int, int]:
    """The image's size rounded to the nearest multiple of ``multiple`` (at least one cell)."""
    return tuple(max(multiple, int(round(side / multiple)) * multiple) for side in image.size)  # type: ignore[return-value]


def resize_image(image: Image.Image, width_px: int, height_px: int, mode: str = "just") -> Image.Image:
    """Resize as A1111's img2img does.

    * ``just``: stretch to the size (aspect ratio not kept).
    * ``crop``: scale to cover the size, keep the centre, crop the overhang.
    * ``fill``: scale to fit inside, centre, and fill the empty bands by
      stretching the image's outermost rows/columns across them.
    """
    mode = canonical_resize_mode(mode)
    lanczos = Image.Resampling.LANCZOS
    if image.size == (width_px, height_px):
        return image.copy()
    if mode == "just":
        return image.resize((width_px, height_px), lanczos)
    target_ratio = width_px / height_px
    source_ratio = image.width / image.height
    if mode == "crop":
        wider = target_ratio > source_ratio  # target relatively wider: match widths, crop height
        scaled_w = width_px if wider else image.width * height_px // image.height
        scaled_h = image.height * width_px // image.width if wider else height_px
    else:
        taller = target_ratio < source_ratio  # target relatively taller: match widths, bands above/below
        scaled_w = width_px if taller else image.width * height_px // image.height
        scaled_h = image.height * width_px // image.width if taller else height_px
    scaled = image.resize((max(1, scaled_w), max(1, scaled_h)), lanczos)
    canvas = Image.new("RGB", (width_px, height_px))
    left = width_px // 2 - scaled.width // 2
    top = height_px // 2 - scaled.height // 2
    canvas.paste(scaled, (left, top))
    if mode == "fill":
        if top > 0:
            canvas.paste(scaled.crop((0, 0, scaled.width, 1)).resize((width_px, top)), (0, 0))
            bottom = top + scaled.height
            if bottom < height_px:
                canvas.paste(scaled.crop((0, scaled.height - 1, scaled.width, scaled.height))
                             .resize((width_px, height_px - bottom)), (0, bottom))
        if left > 0:
            canvas.paste(scaled.crop((0, 0, 1, scaled.height)).resize((left, height_px)), (0, 0))
            right = left + scaled.width
            if right < width_px:
                canvas.paste(scaled.crop((scaled.width - 1, 0, scaled.width, scaled.height))
                             .resize((width_px - right, height_px)), (right, 0))
    return canvas
