"""Cheap previews: latents (the UNet's space) -> RGB with one 4x3 linear map per family.

A1111 calls this "Approx cheap": each latent channel is a fixed mix of R, G, B, so a
preview costs one tiny matrix product per step and needs no decoder. The SD1/SD2 and
SDXL factors are the widely used published ones (SD1/SD2 share a VAE); huabi-mini's
VAE has its own latent space, so its factors were fitted by least squares from its own
VAE (:func:`fit_latent_rgb`, ``scripts/fit_preview_factors.py``): encode images, pool the
pixels to the latent grid, solve ``[latents, 1] @ W = rgb``.

The preview is at latent resolution (1/8 of the image side); callers upscale for display.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from huabi.core.family import ModelFamily


@dataclass(frozen=True)
class LatentRGB:
    """``rgb = latents @ factors + bias``, in [-1, 1]; ``factors`` is [channels][3]."""

    factors: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        if not self.factors or any(len(row) != 3 for row in self.factors) or len(self.bias) != 3:
            raise ValueError("LatentRGB: factors must be [channels][3] and bias [3]")


SD_LATENT_RGB = LatentRGB((
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
))
SDXL_LATENT_RGB = LatentRGB((
    (0.3448, 0.4168, 0.4395),
    (-0.1953, -0.0290, 0.0250),
    (0.1074, 0.0886, -0.0163),
    (-0.3730, -0.2499, -0.2088),
))
# Fitted on the shipped huabi-mini (v4) VAE by scripts/fit_preview_factors.py (400 images of its
# training set, the emoji without skin-tone variants; held-out error 8.8/255 per pixel vs 165/255
# with the SD1 factors). v1's VAE had other factors: a new VAE needs a new fit.
HUABI_MINI_LATENT_RGB = LatentRGB(
    (
        (0.1549, 0.3445, -0.2308),
        (-0.6048, 0.007, 0.0309),
        (-0.0161, 0.0909, 0.0068),
        (-0.2753, -0.3442, -0.6681),
    ),
    (-0.459, 1.1693, -0.2902),
)

FAMILY_LATENT_RGB = {
    ModelFamily.SD1: SD_LATENT_RGB,
    ModelFamily.SD2: SD_LATENT_RGB,
    ModelFamily.SDXL: SDXL_LATENT_RGB,
    ModelFamily.SDXL_REFINER: SDXL_LATENT_RGB,
    ModelFamily.HUABI_MINI: HUABI_MINI_LATENT_RGB,
}


def latents_to_rgb(latents: torch.Tensor, mapping: LatentRGB) -> torch.Tensor:
    """[B, C, h, w] latents -> [B, h, w, 3] uint8 preview pixels."""
    if latents.shape[1] != len(mapping.factors):
        raise ValueError(f"preview: latents have {latents.shape[1]} channels, the mapping {len(mapping.factors)}")
    factors = torch.tensor(mapping.factors, dtype=torch.float32, device=latents.device)
    bias = torch.tensor(mapping.bias, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("bchw,cr->bhwr", latents.float(), factors) + bias
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def fit_latent_rgb(latents: torch.Tensor, pixels: torch.Tensor) -> LatentRGB:
    """Least-squares ``LatentRGB`` from latents [N, C, h, w] (UNet space) and the images they
    came from [N, 3, H, W] in [-1, 1] (average-pooled to the latent grid)."""
    pooled = torch.nn.functional.adaptive_avg_pool2d(pixels.float(), latents.shape[-2:])
    design = latents.float().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    design = torch.cat([design, torch.ones(design.shape[0], 1)], dim=1)
    target = pooled.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(design.double(), target.double()).solution.float()
    factors = tuple(tuple(round(float(v), 4) for v in row) for row in solution[:-1])
    bias = tuple(round(float(v), 4) for v in solution[-1])
    return LatentRGB(factors, bias)  # type: ignore[arg-type]
