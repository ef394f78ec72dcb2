"""Steps shared by every pipeline: conditioning, latent preparation, denoising, decoding."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from huabi.core.conditioning import encode_negative_prompts, encode_prompts, sdxl_add_time_ids
from huabi.core.guidance import CFGDenoiser, PredictionDenoiser, UNetInputs
from huabi.core.noise import BrownianNoiseSampler, SeededNoiseSampler, initial_noise
from huabi.core.samplers import get_sampler
from huabi.core.schedules import DiscreteSchedule, compute_sigmas
from huabi.models.bundle import ModelBundle
from huabi.models.family import ModelFamily, UNetVariant

# A1111's defaults for the SDXL refiner's aesthetic-score conditioning.
REFINER_AESTHETIC_SCORE = 6.0
REFINER_NEGATIVE_AESTHETIC_SCORE = 2.5

StepCallback = Callable[[int, int], None]  # (step done, total steps)


@dataclass(frozen=True)
class GuidanceInputs:
    cond: UNetInputs
    uncond: UNetInputs


def encode_guidance(
    bundle: ModelBundle,
    prompt: str,
    negative_prompt: str,
    *,
    clip_skip: int,
    width_px: int,
    height_px: int,
    device: torch.device,
) -> GuidanceInputs:
    """Encode the prompt and negative prompt into UNet inputs.

    Their token lengths may differ (a long prompt, a short negative): as in A1111's
    default, they are then run through the UNet separately rather than padded.
    """
    with torch.inference_mode():
        cond = encode_prompts(
            bundle.text_encoders, bundle.tokenizers, bundle.family, [prompt], clip_skip=clip_skip
        )
        uncond = encode_negative_prompts(
            bundle.text_encoders, bundle.tokenizers, bundle.family, [negative_prompt], clip_skip=clip_skip
        )
    if bundle.family is ModelFamily.SDXL:
        time_ids = sdxl_add_time_ids(
            (height_px, width_px), (0, 0), (height_px, width_px), dtype=torch.float32, device=device
        )
        return GuidanceInputs(
            UNetInputs(cond.context, {"text_embeds": cond.pooled, "time_ids": time_ids}),
            UNetInputs(uncond.context, {"text_embeds": uncond.pooled, "time_ids": time_ids}),
        )
    if bundle.family is ModelFamily.SDXL_REFINER:
        def refiner_ids(score: float) -> torch.Tensor:
            return sdxl_add_time_ids(
                (height_px, width_px), (0, 0), (height_px, width_px),
                aesthetic_score=score, dtype=torch.float32, device=device,
            )
        return GuidanceInputs(
            UNetInputs(cond.context, {"text_embeds": cond.pooled, "time_ids": refiner_ids(REFINER_AESTHETIC_SCORE)}),
            UNetInputs(uncond.context, {"text_embeds": uncond.pooled, "time_ids": refiner_ids(REFINER_NEGATIVE_AESTHETIC_SCORE)}),
        )
    return GuidanceInputs(UNetInputs(cond.context), UNetInputs(uncond.context))


def txt2img_image_channels(bundle: ModelBundle, batch: int, shape: tuple[int, int, int], device: torch.device) -> torch.Tensor | None:
    """Extra UNet inputs that text-to-image gives models whose UNet expects an image.

    Inpainting models get A1111's choice: everything masked (mask 1) over the
    latent of a flat mid-grey image, so they generate freely. Instruct-pix2pix
    models get a zero image latent (they are meant for editing; see ``huabi edit``).
    """
    if bundle.variant is UNetVariant.BASE:
        return None
    _channels, latent_h, latent_w = shape
    if bundle.variant is UNetVariant.INSTRUCT_PIX2PIX:
        return torch.zeros(batch, bundle.latent_channels, latent_h, latent_w, device=device)
    factor = bundle.vae_scale_factor
    vae_dtype = next(bundle.vae.parameters()).dtype
    grey = torch.zeros(1, 3, latent_h * factor, latent_w * factor, device=device, dtype=vae_dtype)  # 0 is mid-grey in [-1, 1]
    with torch.inference_mode():
        grey_latent = bundle.vae.encode(grey).latent_dist.mode().float() * bundle.latent_scaling_factor
    mask = torch.ones(1, 1, latent_h, latent_w, device=device)
    return torch.cat([mask, grey_latent], dim=1).expand(batch, -1, -1, -1)


def latent_shape(bundle: ModelBundle, width_px: int, height_px: int) -> tuple[int, int, int]:
    factor = bundle.vae_scale_factor
    if width_px % factor or height_px % factor:
        from huabi.errors import HuabiError

        raise HuabiError(
            f"size: {width_px}x{height_px} is not a multiple of this model's {factor}-pixel latent cell"
        )
    return (bundle.latent_channels, height_px // factor, width_px // factor)


def denoise(
    bundle: ModelBundle,
    guidance: GuidanceInputs,
    *,
    sampler_name: str,
    schedule_name: str,
    steps: int,
    cfg_scale: float,
    seeds: Sequence[int],
    shape: tuple[int, int, int],
    device: torch.device,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Sample latents from seeded noise; returns x0 latents [B, C, h, w] in float32."""
    spec = get_sampler(sampler_name)
    schedule = DiscreteSchedule(bundle.alphas_cumprod)
    sigmas = compute_sigmas(schedule_name, sampler_name, steps, schedule).to(device)
    noise = initial_noise(seeds, shape, device=device, dtype=torch.float32)
    x = noise * sigmas[0]
    if spec.brownian:
        noise_sampler = BrownianNoiseSampler.for_sigmas(x, sigmas, seeds)
    else:
        noise_sampler = SeededNoiseSampler(seeds, shape, device=device, dtype=torch.float32)
    channels = txt2img_image_channels(bundle, len(seeds), shape, device)
    denoiser = CFGDenoiser(
        PredictionDenoiser(bundle.unet, schedule, bundle.prediction),
        replace(guidance.cond, channels=channels),
        replace(guidance.uncond, channels=channels),
        cfg_scale,
    )
    total = len(sigmas) - 1

    def report(i: int, *_unused) -> None:
        if on_step is not None:
            on_step(i + 1, total)

    with torch.inference_mode():
        return spec.fn(denoiser, x, sigmas, noise=noise_sampler, on_step=report)


# Decode as many images per VAE call as fit in this many output pixels: small images go
# together (faster), large ones one at a time (peak memory does not grow with the batch).
DECODE_PIXEL_BUDGET = 512 * 512


def decode_latents(bundle: ModelBundle, latents: torch.Tensor) -> list[Image.Image]:
    vae_dtype = next(bundle.vae.parameters()).dtype
    pixels_per_image = latents.shape[-2] * latents.shape[-1] * bundle.vae_scale_factor**2
    per_call = max(1, DECODE_PIXEL_BUDGET // pixels_per_image)
    images = []
    with torch.inference_mode():
        for group in latents.split(per_call):
            decoded = bundle.vae.decode((group / bundle.latent_scaling_factor).to(vae_dtype), return_dict=False)[0]
            images.extend(to_pil(image) for image in decoded)
    return images


def to_pil(image: torch.Tensor) -> Image.Image:
    """[-1, 1] CHW tensor -> 8-bit RGB image (rounded, as diffusers does)."""
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(np.ascontiguousarray(array.permute(1, 2, 0).cpu().numpy()))
