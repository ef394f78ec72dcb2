"""Image augmentation of user training, as kohya sd-scripts defines its three flags.

* ``--flip-aug``: each sample is mirrored left-right with probability 1/2 (after cropping and
  colour augmentation, as kohya orders them). Cached latents stay possible: the latent of the
  mirrored image is cached beside the plain one and picked per sample (kohya's
  ``latents_flipped``); a flipped latent is the VAE encoding of the mirrored pixels, not a
  mirrored latent.
* ``--random-crop``: once the image is scaled to cover its bucket, the crop offset along the
  side that sticks out is uniform over ``0..excess`` (both ends included) instead of
  ``excess // 2``.
* ``--color-aug``: with probability 0.33 either (1/2) a hue rotation by U(-8, 8) in OpenCV's
  8-bit hue units (degrees / 2, so +-16 degrees) or (1/2) a gamma ``U(0.95, 1.05)``; the
  albumentations ``OneOf([HueSaturationValue(8, 0, 0), RandomGamma((95, 105))], p=0.33)`` kohya's
  code names as its model. Gamma is applied to values scaled to [0, 1] as RandomGamma does;
  kohya's own re-implementation raises the 0-255 values to the power (``255 ** 1.05`` clips
  to 255), a far larger change than the +-5 % it states, which huabi does not copy.

Random crop and colour augmentation change the pixels every time an image is used, so their
latents cannot be cached (kohya refuses ``cache_latents`` with them; so does huabi).

Every random number comes from the caller's generator, drawn in a fixed count per sample
whatever the outcome, so the draws of a step do not depend on earlier outcomes (exact resume).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

HUE_SHIFT_LIMIT = 8.0  # OpenCV 8-bit hue units (0..179)
COLOR_AUG_PROBABILITY = 0.33
GAMMA_RANGE = (0.95, 1.05)


@dataclass(frozen=True)
class Augmentation:
    flip: bool = False
    random_crop: bool = False
    color: bool = False

    @property
    def changes_pixels_every_step(self) -> bool:
        """True when latents cannot be cached (flips alone can: both are cached)."""
        return self.random_crop or self.color


def crop_offsets(resized_w: int, resized_h: int, bucket_w: int, bucket_h: int, generator: torch.Generator | None) -> tuple[int, int]:
    """(left, top) of the bucket-sized crop: centred (``excess // 2``) or uniform over 0..excess.

    With a generator two integers are always drawn (x then y), whether a side sticks out or not.
    """
    excess_x, excess_y = resized_w - bucket_w, resized_h - bucket_h
    if generator is None:
        return excess_x // 2, excess_y // 2
    draw_x = int(torch.randint(0, excess_x + 1, (), generator=generator))
    draw_y = int(torch.randint(0, excess_y + 1, (), generator=generator))
    return draw_x, draw_y


def color_augment(pixels: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """kohya's ``--color-aug`` on an RGB uint8 [H, W, 3] array (always draws 3 numbers)."""
    import cv2

    apply, which, amount = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
    if apply > COLOR_AUG_PROBABILITY:
        return pixels
    if which > 0.5:
        shift = -HUE_SHIFT_LIMIT + 2 * HUE_SHIFT_LIMIT * amount
        hsv = cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV)
        hsv[:, :, 0] = ((hsv[:, :, 0].astype(np.float64) + shift) % 180).astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    gamma = GAMMA_RANGE[0] + (GAMMA_RANGE[1] - GAMMA_RANGE[0]) * amount
    scaled = np.power(pixels.astype(np.float64) / 255.0, gamma) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def draw_flip(generator: torch.Generator) -> bool:
    return float(torch.rand((), generator=generator, dtype=torch.float64)) < 0.5
