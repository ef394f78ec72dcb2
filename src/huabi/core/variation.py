"""Variation seeds and seed resize: A1111's way of making starting noise from two seeds.

A1111 ("Extra" seed options) builds each image's starting noise from:

* the main seed's noise, drawn at the "resize from" latent size when seed
  resize is on (else at the target size);
* a variation seed's noise of the same size, combined with the main one by
  spherical interpolation with the variation strength (0: main seed only,
  1: the variation seed's noise);
* with seed resize, that noise pasted centred into (or cropped centred from)
  a target-size draw of the main seed.

Every draw comes from a fresh CPU generator, except the target-size draw,
which comes from the image's own generator; so the image's generator has
always advanced by exactly one target-size draw, and ancestral samplers keep
getting the main seed's stream (``SeededNoiseSampler(skip_initial=True)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from huabi.core.noise import check_seeds, check_shape  # the same checks as plain noise
from huabi.errors import HuabiError

# A1111 falls back to a plain weighted sum when the two noises are almost parallel
# (mean cosine above this), where slerp's 1/sin(omega) would blow up.
_PARALLEL_COSINE = 0.9995


def slerp_noise(strength: float, low: Tensor, high: Tensor) -> Tensor:
    """Spherical interpolation from ``low`` (strength 0) to ``high`` (strength 1), A1111-style.

    The tensors are one image's noise ``[C, H, W]``. As in A1111 the angle is
    measured per column: vectors run along dim 1 (height), one angle for
    every (channel, x). The near-parallel fallback keeps A1111's weights as
    they are (``low * strength + high * (1 - strength)``), so images with a
    variation seed equal to the seed match A1111's.
    """
    if low.shape != high.shape or low.ndim < 2:
        raise HuabiError(f"noise: slerp needs two noises of one shape, got {tuple(low.shape)} and {tuple(high.shape)}")
    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    cosine = (low_unit * high_unit).sum(1)
    if cosine.mean() > _PARALLEL_COSINE:
        return low * strength + high * (1 - strength)
    omega = torch.acos(cosine)
    sin_omega = torch.sin(omega)
    weight_low = (torch.sin((1.0 - strength) * omega) / sin_omega).unsqueeze(1)
    weight_high = (torch.sin(strength * omega) / sin_omega).unsqueeze(1)
    return weight_low * low + weight_high * high


def paste_centred(target: Tensor, source: Tensor) -> Tensor:
    """``source`` [C, h, w] put centred into a copy of ``target`` [C, H, W]; cropped centred where larger.

    Offsets round toward the top-left as A1111's integer halving does
    (``(H - h) // 2``, with the crop of a larger source mirrored).
    """
    _, target_h, target_w = target.shape
    _, source_h, source_w = source.shape
    out = target.clone()
    top, left = _centre_offsets(target_h, source_h), _centre_offsets(target_w, source_w)
    (dst_y, src_y, span_h), (dst_x, src_x, span_w) = top, left
    out[:, dst_y:dst_y + span_h, dst_x:dst_x + span_w] = source[:, src_y:src_y + span_h, src_x:src_x + span_w]
    return out


def _centre_offsets(target_len: int, source_len: int) -> tuple[int, int, int]:
    """(start in target, start in source, length) of the centred overlap along one axis."""
    shift = (target_len - source_len) // 2
    if shift >= 0:
        return shift, 0, source_len
    # Source larger: A1111 keeps source_len + 2 * shift cells, from -shift on.
    return 0, -shift, source_len + 2 * shift


def _randn(seed: int, shape: tuple[int, ...]) -> Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def variation_noise(
    seeds: Sequence[int],
    shape: tuple[int, int, int],
    *,
    variation_seeds: Sequence[int] | None = None,
    variation_strength: float = 0.0,
    resize_from_latent: tuple[int, int] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Starting noise ``[len(seeds), *shape]`` with A1111's variation seed and seed resize.

    ``variation_seeds[i]`` goes with ``seeds[i]`` (used only when the strength
    is not 0); ``resize_from_latent`` is the (latent_h, latent_w) the noise is
    drawn at before pasting (None or equal to the target: no resize). With
    strength 0 and no resize this equals :func:`huabi.core.noise.initial_noise`.
    """
    seeds = check_seeds(seeds)
    shape = check_shape(shape)
    if len(shape) != 3:
        raise HuabiError(f"shape: variation noise needs (channels, latent_h, latent_w), got {shape!r}")
    if not isinstance(variation_strength, (int, float)) or isinstance(variation_strength, bool) \
            or not 0.0 <= variation_strength <= 1.0:
        raise HuabiError(f"variation_strength: must be a number from 0 to 1, got {variation_strength!r}")
    use_variation = variation_strength != 0
    if use_variation:
        if variation_seeds is None:
            raise HuabiError("variation_seeds: needed when variation_strength is not 0")
        variation_seeds = check_seeds(variation_seeds)
        if len(variation_seeds) != len(seeds):
            raise HuabiError(
                f"variation_seeds: need one per image, got {len(variation_seeds)} for {len(seeds)} seeds"
            )
    draw_shape = shape
    if resize_from_latent is not None:
        from_h, from_w = resize_from_latent
        if not all(isinstance(v, int) and v > 0 for v in (from_h, from_w)):
            raise HuabiError(f"seed_resize_from: latent size must be positive integers, got {resize_from_latent!r}")
        draw_shape = (shape[0], from_h, from_w)
    resized = draw_shape != shape

    images = []
    for index, seed in enumerate(seeds):
        noise = _randn(seed, draw_shape)
        if use_variation:
            noise = slerp_noise(float(variation_strength), noise, _randn(variation_seeds[index], draw_shape))
        if resized:
            # The target-size draw from the main seed is what fills the border.
            noise = paste_centred(_randn(seed, shape), noise)
        images.append(noise)
    return torch.stack(images).to(device=device, dtype=dtype)




@dataclass(frozen=True)
class NoiseVariation:
    """A batch's variation seeds, strength and seed-resize size, for :func:`variation_noise`."""

    variation_seeds: tuple[int, ...] | None = None
    variation_strength: float = 0.0
    resize_from_latent: tuple[int, int] | None = None  # (latent_h, latent_w)

    def noise(
        self,
        seeds: Sequence[int],
        shape: tuple[int, int, int],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        return variation_noise(
            seeds, shape, variation_seeds=self.variation_seeds, variation_strength=self.variation_strength,
            resize_from_latent=self.resize_from_latent, device=device, dtype=dtype,
        )


__all__ = ["NoiseVariation", "paste_centred", "slerp_noise", "variation_noise"]
