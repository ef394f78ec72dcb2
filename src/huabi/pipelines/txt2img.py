"""Text to image, as numbered steps: check -> encode prompt -> prepare latents -> denoise -> decode."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from huabi.core.conditioning import EmbeddingLookup
from huabi.core.request import GenerationRequest
from huabi.models.bundle import ModelBundle
from huabi.pipelines.patches import Patch
from huabi.pipelines.common import (
    StepCallback,
    decode_latents,
    denoise,
    encode_guidance,
    latent_shape,
    noise_variation,
)


@dataclass(frozen=True)
class Txt2ImgResult:
    images: list[Image.Image]
    seeds: list[int]
    width_px: int
    height_px: int
    embeddings_used: tuple[str, ...] = ()  # textual-inversion names the prompts used


def txt2img(
    bundle: ModelBundle,
    request: GenerationRequest,
    seeds: Sequence[int],
    *,
    device: torch.device,
    on_step: StepCallback | None = None,
    embeddings: EmbeddingLookup | None = None,
    variation_seeds: Sequence[int] | None = None,
    patches: Sequence[Patch] = (),
    unet_kwargs_for=None,  # older spellings of patches (ControlNet hook factory, refiner stage)
    refiner=None,
) -> Txt2ImgResult:
    """Generate one batch: ``len(seeds)`` images, image i from ``seeds[i]``.

    ``embeddings``: textual-inversion name -> vectors (see :func:`encode_guidance`).
    ``variation_seeds``: this batch's A1111 variation seeds (one per image), used with
    ``request.variation_strength``; ``request.seed_resize_from_px`` applies either way.
    ``patches``: what changes the denoiser (ControlNet, refiner hand-over; see :mod:`huabi.pipelines.patches`).
    """
    # 1. Check: resolve the size against the model's native resolution.
    width_px = request.width_px or bundle.native_size_px
    height_px = request.height_px or bundle.native_size_px
    shape = latent_shape(bundle, width_px, height_px)

    # 2. Encode the prompt and negative prompt (every text its schedule switches to).
    guidance = encode_guidance(
        bundle,
        request.prompt,
        request.negative_prompt,
        clip_skip=request.clip_skip,
        width_px=width_px,
        height_px=height_px,
        device=device,
        steps=request.steps,
        sampler_name=request.sampler,
        embeddings=embeddings,
    )

    # 3 + 4. Prepare seeded latents and denoise them.
    latents = denoise(
        bundle,
        guidance,
        sampler_name=request.sampler,
        schedule_name=request.schedule,
        steps=request.steps,
        cfg_scale=request.cfg_scale,
        seeds=seeds,
        shape=shape,
        device=device,
        on_step=on_step,
        variation=noise_variation(bundle, request, variation_seeds),
        patches=patches,
        unet_kwargs_for=unet_kwargs_for,
        refiner=refiner,
    )

    # 5. Decode to pixels.
    images = decode_latents(bundle, latents)
    return Txt2ImgResult(
        images=images, seeds=list(seeds), width_px=width_px, height_px=height_px,
        embeddings_used=guidance.embeddings_used(),
    )
