"""Mask maths for inpainting and outpainting, on tensors only (no PIL, no I/O).

Conventions: a mask is ``[H, W]`` float in [0, 1], 1 = repaint (A1111's white);
images are ``[3, H, W]`` float in any range. Boxes are ``(left, top, right,
bottom)`` in pixels, right/bottom exclusive.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Box = tuple[int, int, int, int]


def gaussian_kernel(sigma_px: float, max_half_px: int | None = None) -> torch.Tensor:
    """A normalised 1-D Gaussian; A1111's width: ``2 * int(2.5 * sigma + 0.5) + 1`` taps."""
    half = int(2.5 * sigma_px + 0.5)
    if max_half_px is not None:
        half = min(half, max_half_px)  # taps beyond the image would only read padding
    offsets = torch.arange(-half, half + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma_px) ** 2)
    return kernel / kernel.sum()


def _blur_planes(planes: torch.Tensor, sigma_px: float, padding_mode: str) -> torch.Tensor:
    """Separable Gaussian blur of ``[N, H, W]`` planes."""
    height, width = planes.shape[-2:]
    kernel = gaussian_kernel(sigma_px, max_half_px=max(height, width)).to(planes.device)
    half = (kernel.numel() - 1) // 2
    x = planes.unsqueeze(1).float()  # [N, 1, H, W]
    horizontal = kernel.reshape(1, 1, 1, -1)
    vertical = kernel.reshape(1, 1, -1, 1)
    if padding_mode == "zeros":
        x = F.conv2d(x, horizontal, padding=(0, half))
        x = F.conv2d(x, vertical, padding=(half, 0))
    else:
        x = F.conv2d(F.pad(x, (half, half, 0, 0), mode=padding_mode), horizontal)
        x = F.conv2d(F.pad(x, (0, 0, half, half), mode=padding_mode), vertical)
    return x.squeeze(1)


def blur_mask(mask: torch.Tensor, radius_px: float) -> torch.Tensor:
    """Gaussian mask blur (A1111's "Mask blur", sigma = radius). Edges repeat outward,
    so a mask that touches the border stays fully on there."""
    if radius_px <= 0:
        return mask.clone().float()
    return _blur_planes(mask.unsqueeze(0), radius_px, "replicate")[0].clamp(0, 1)


def bounding_box(mask: torch.Tensor, threshold: float = 0.0) -> Box | None:
    """The smallest box holding every mask value above ``threshold``; None if there is none."""
    rows = torch.nonzero((mask > threshold).any(dim=1)).flatten()
    cols = torch.nonzero((mask > threshold).any(dim=0)).flatten()
    if rows.numel() == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def crop_region(mask: torch.Tensor, padding_px: int, working_w_px: int, working_h_px: int) -> Box | None:
    """The area "Only masked" inpainting works on, as A1111 chooses it.

    The mask's bounding box grows by ``padding_px`` on each side (clipped to the
    image), then widens or heightens about its centre to the working size's
    aspect ratio, as far as the image allows, so the upscale does not distort.
    """
    box = bounding_box(mask)
    if box is None:
        return None
    height, width = mask.shape
    left, top, right, bottom = box
    left, top = max(0, left - padding_px), max(0, top - padding_px)
    right, bottom = min(width, right + padding_px), min(height, bottom + padding_px)
    target_ratio = working_w_px / working_h_px
    box_w, box_h = right - left, bottom - top
    if box_w / box_h < target_ratio:  # too narrow: widen
        want = min(width, math.ceil(box_h * target_ratio))
        left, right = _grow(left, right, want, width)
    else:  # too flat: heighten
        want = min(height, math.ceil(box_w / target_ratio))
        top, bottom = _grow(top, bottom, want, height)
    return left, top, right, bottom


def _grow(start: int, end: int, want: int, limit: int) -> tuple[int, int]:
    """Grow [start, end) to length ``want`` about its centre, shifted to stay in [0, limit)."""
    extra = want - (end - start)
    if extra <= 0:
        return start, end
    start -= extra // 2
    end += extra - extra // 2
    if start < 0:
        end, start = end - start, 0
    if end > limit:
        start, end = max(0, start - (end - limit)), limit
    return start, end


# Blur radii (px) and repeats for "fill": coarse colour first, then finer detail near the edge.
FILL_PASSES: tuple[tuple[float, int], ...] = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2))


def fill_masked(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A1111's "fill" masked content: the masked area painted with blurred colours of its surroundings.

    Each pass takes a normalised blur of the kept pixels (colour weighted by
    how much of the neighbourhood is kept) and lays it over the result with
    that neighbourhood weight as opacity, from wide to narrow radii, so far
    inside the hole gets the average surrounding colour and the hole's rim
    continues the nearby colours. Kept pixels (mask 0) are returned unchanged.
    """
    keep = (1.0 - mask.float()).clamp(0, 1)
    if not bool((keep > 0).any()):
        return image.clone()
    result = torch.zeros_like(image, dtype=torch.float32)
    for radius, repeats in FILL_PASSES:
        weight = _blur_planes(keep.unsqueeze(0), radius, "zeros")[0]
        colour = _blur_planes(image.float() * keep, radius, "zeros") / weight.clamp_min(1e-6)
        # The first (widest) pass covers everything it reaches with its colour.
        alpha = torch.ones_like(weight) if radius == FILL_PASSES[0][0] else weight.clamp(0, 1)
        alpha = torch.where(weight > 1e-6, alpha, torch.zeros_like(alpha))
        for _ in range(repeats):
            result = result * (1 - alpha) + colour * alpha
    return torch.where(mask.float() > 0, result, image.float()).to(image.dtype)


def latent_mask(mask: torch.Tensor, latent_h: int, latent_w: int, *, round_values: bool = True) -> torch.Tensor:
    """A pixel mask at latent resolution ``[1, 1, h, w]``: area-averaged, then rounded to 0/1
    (A1111's default "mask round") so latents are either fully kept or fully repainted."""
    small = F.interpolate(mask.float()[None, None], size=(latent_h, latent_w), mode="area")
    return small.round() if round_values else small


def blend_keep(repainted: torch.Tensor, original: torch.Tensor, repaint_mask: torch.Tensor) -> torch.Tensor:
    """``repainted`` where the mask is 1, ``original`` where 0 (both exactly), linear between."""
    return original * (1 - repaint_mask) + repainted * repaint_mask


def outpaint_box(width_px: int, height_px: int, left: int, right: int, up: int, down: int) -> tuple[int, int, Box]:
    """The canvas size after outpainting and where the original lands on it."""
    return width_px + left + right, height_px + up + down, (left, up, left + width_px, up + height_px)


def outpaint_mask(canvas_w_px: int, canvas_h_px: int, original_box: Box, overlap_px: int) -> torch.Tensor:
    """1 over the new area plus ``overlap_px`` into the original along each extended side."""
    left, top, right, bottom = original_box
    mask = torch.ones(canvas_h_px, canvas_w_px)
    inner_left = left + overlap_px if left > 0 else left
    inner_top = top + overlap_px if top > 0 else top
    inner_right = right - overlap_px if right < canvas_w_px else right
    inner_bottom = bottom - overlap_px if bottom < canvas_h_px else bottom
    if inner_right > inner_left and inner_bottom > inner_top:
        mask[inner_top:inner_bottom, inner_left:inner_right] = 0
    return mask
