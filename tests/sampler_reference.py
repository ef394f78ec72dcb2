"""Test helpers: a tiny real UNet, diffusers' sampling loop, and huabi's on the same model.

The comparison works like this: diffusers' loop runs first and records the
timestep value it fed the UNet at every call.  huabi's denoiser then calls the
same UNet at those same timestep values, in the same order, so both sides see
the identical function; only the samplers' maths differs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

LATENT_SHAPE = (4, 8, 8)


def make_unet(dtype: torch.dtype = torch.float32):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return unet.to(dtype).eval()


def predict_eps(unet, model_in: Tensor, t, context: Tensor) -> Tensor:
    """The test model: identity plus the random UNet.

    A random UNet alone predicts eps with std ~0.3 whatever the input, which
    leaves final latents of magnitude ~50 and makes absolute tolerances
    meaningless; adding the input makes it a plausible eps-predictor for data
    near 0 (final latents of order 1) while every call still runs the UNet.
    """
    return model_in + unet(model_in, t, encoder_hidden_states=context).sample


def make_context(batch: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    generator = torch.Generator("cpu").manual_seed(123)
    return torch.randn((batch, 6, 32), generator=generator).to(dtype)


class ReplayNoise:
    """A NoiseSampler drawing what diffusers' schedulers draw: randn(shape, generator) per call."""

    def __init__(self, seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> None:
        self.generator = torch.Generator("cpu").manual_seed(seed)
        self.shape = shape
        self.dtype = dtype
        self.calls = 0

    def __call__(self, sigma, sigma_next) -> Tensor:
        self.calls += 1
        return torch.randn(self.shape, generator=self.generator, dtype=self.dtype)


def run_diffusers(scheduler, unet, context: Tensor, start: Tensor, step_seed: int | None = None):
    """Run diffusers' loop from latent ``start`` (already in the scheduler's space).

    Returns (final latent, list of timestep values fed to the UNet).
    """
    generator = torch.Generator("cpu").manual_seed(step_seed) if step_seed is not None else None
    latents = start.clone()
    fed: list[Tensor] = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(latents, t)
            fed.append(t.clone() if isinstance(t, Tensor) else torch.tensor(t))
            eps = predict_eps(unet, model_in, t, context)
            kwargs = {"generator": generator} if generator is not None else {}
            latents = scheduler.step(eps, t, latents, **kwargs).prev_sample
    return latents, fed


def replay_denoiser(unet, context: Tensor, timesteps: list[Tensor]) -> tuple[Callable, list[float]]:
    """An eps-prediction denoiser in sigma space calling ``unet`` at the recorded timesteps in order.

    Returns the denoiser and a list collecting the sigmas huabi asked for.
    """
    queue = list(timesteps)
    asked: list[float] = []

    def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        assert queue, "huabi called the model more often than diffusers did"
        t = queue.pop(0)
        asked.append(float(sigma[0]))
        sigma_b = sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        model_in = x / (sigma_b**2 + 1) ** 0.5
        with torch.no_grad():
            eps = predict_eps(unet, model_in, t, context)
        return x - sigma_b * eps

    denoiser.remaining = queue  # type: ignore[attr-defined]
    return denoiser, asked


def vp_to_k_scale(sigma: float) -> float:
    """x_k = x_vp * sqrt(1 + sigma**2): VP-space latents to sigma space."""
    return math.sqrt(1.0 + sigma**2)


def gaussian_denoiser(mu: float, s: float) -> Callable:
    """Exact denoiser for data ~ N(mu, s**2) per element: E[x0 | x] at noise sigma."""

    def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        sigma_b = sigma.to(torch.float64).view(-1, *([1] * (x.ndim - 1)))
        out = mu + (x.to(torch.float64) - mu) * (s**2 / (s**2 + sigma_b**2))
        return out.to(x.dtype)

    return denoiser


def gaussian_ode_solution(x_start: Tensor, sigma_start: float, sigma_end: float, mu: float, s: float) -> Tensor:
    """Probability-flow ODE for Gaussian data: (x - mu) scales with sqrt(s^2 + sigma^2)."""
    scale = math.sqrt(s**2 + sigma_end**2) / math.sqrt(s**2 + sigma_start**2)
    return mu + (x_start - mu) * scale
