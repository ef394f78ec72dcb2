"""Image to image, as numbered steps: check -> encode prompt -> encode init image -> denoise the tail -> decode.

The denoise loop is txt2img's (:func:`huabi.pipelines.common.denoise`) started
from the init image's latent; inpainting (:mod:`huabi.pipelines.inpaint`) adds
a mask on top of the same steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from huabi.core.conditioning import EmbeddingLookup
from huabi.core.request import GenerationRequest
from huabi.core.variation import NoiseVariation
from huabi.errors import HuabiError
from huabi.models.bundle import ModelBundle
from huabi.core.family import UNetVariant
from huabi.pipelines.patches import Patch
from huabi.pipelines.common import StepCallback, decode_latents, denoise, encode_guidance, latent_shape


@dataclass(frozen=True)
class Img2ImgResult:
    images: list[Image.Image]
    seeds: list[int]
    width_px: int
    height_px: int
    embeddings_used: tuple[str, ...] = ()
    latents: torch.Tensor | None = None  # the denoised latents, before decoding


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> [3, H, W] float32 in [-1, 1] (the VAE's range)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def encode_image(bundle: ModelBundle, image: Image.Image | torch.Tensor, device: torch.device) -> torch.Tensor:
    """One RGB image (PIL, or [3, H, W] in [-1, 1]) -> its latent [1, C, h, w] in float32.

    The mean of the VAE's latent distribution times the scaling factor: the
    deterministic encoding (diffusers' ``argmax``), so the same input always
    gives the same start.
    """
    pixels = image_to_tensor(image) if isinstance(image, Image.Image) else image
    vae_dtype = next(bundle.vae.parameters()).dtype
    with torch.inference_mode():
        posterior = bundle.vae.encode(pixels.unsqueeze(0).to(device=device, dtype=vae_dtype)).latent_dist
        return posterior.mean.float() * bundle.latent_scaling_factor


def img2img_image_channels(bundle: ModelBundle, init_latent: torch.Tensor, batch: int) -> torch.Tensor | None:
    """Extra UNet inputs for plain image-to-image (no mask).

    Inpainting models: A1111 treats the whole image as masked, so the masked
    image is all mid-grey: that is what text-to-image gives them (left to
    :func:`denoise`). Instruct-pix2pix models get the init image's latent unscaled (the
    VAE's mode, as they were trained; ``huabi edit`` runs them through
    :mod:`huabi.pipelines.instruct` with three-way guidance instead).
    """
    if bundle.variant is UNetVariant.INSTRUCT_PIX2PIX:
        return (init_latent / bundle.latent_scaling_factor).expand(batch, -1, -1, -1)
    return None


def img2img(
    bundle: ModelBundle,
    request: GenerationRequest,
    init_image: Image.Image,
    seeds: Sequence[int],
    *,
    denoising_strength: float,
    device: torch.device,
    on_step: StepCallback | None = None,
    embeddings: EmbeddingLookup | None = None,
    image_channels: torch.Tensor | None = None,
    wrap_denoiser: Callable[[Callable], Callable] | None = None,
    init_latent: torch.Tensor | None = None,
    variation: NoiseVariation | None = None,
    patches: Sequence[Patch] = (),
    unet_kwargs_for=None,  # older spellings of patches (ControlNet hook factory, refiner stage, guidance)
    refiner=None,
    guided_denoiser: Callable[..., Callable] | None = None,
) -> Img2ImgResult:
    """Repaint ``init_image`` (already at the working size) ``len(seeds)`` times.

    ``denoising_strength`` 0 returns the image through a VAE round trip; 1 runs
    the whole schedule (txt2img's sigmas, starting from init latent + noise).
    ``init_latent`` ([1 or B, C, h, w]) overrides the encoded image (inpainting's
    "masked content" options); ``image_channels`` and ``wrap_denoiser`` pass
    through to :func:`denoise`, as does ``variation`` (variation seeds / seed
    resize change the noise added to the init latent).  ``refiner`` (SDXL refiner
    hand-over) and ``guided_denoiser`` (instruct-pix2pix guidance) pass through too.
    """
    # 1. Check: the working size is the init image's.
    if not 0.0 <= float(denoising_strength) <= 1.0:
        raise HuabiError(f"denoising strength: must be from 0 to 1, got {denoising_strength}")
    width_px, height_px = init_image.size
    shape = latent_shape(bundle, width_px, height_px)

    # 2. Encode the prompt and negative prompt.
    guidance = encode_guidance(
        bundle, request.prompt, request.negative_prompt, clip_skip=request.clip_skip,
        width_px=width_px, height_px=height_px, device=device, steps=request.steps,
        sampler_name=request.sampler, embeddings=embeddings,
    )

    # 3. Encode the init image to its latent, one copy per image of the batch.
    if init_latent is None:
        init_latent = encode_image(bundle, init_image, device)
    batch = len(seeds)
    init_latent = init_latent.to(device=device, dtype=torch.float32).expand(batch, -1, -1, -1)
    if image_channels is None:
        image_channels = img2img_image_channels(bundle, init_latent[:1], batch)

    # 4. Noise it to the strength's sigma and denoise the rest of the schedule.
    latents = denoise(
        bundle, guidance, sampler_name=request.sampler, schedule_name=request.schedule, steps=request.steps,
        cfg_scale=request.cfg_scale, seeds=seeds, shape=shape, device=device, on_step=on_step,
        init_latent=init_latent, denoising_strength=float(denoising_strength),
        image_channels=image_channels, wrap_denoiser=wrap_denoiser, variation=variation,
        patches=patches, unet_kwargs_for=unet_kwargs_for,
        refiner=refiner, guided_denoiser=guided_denoiser,
    )

    # 5. Decode to pixels.
    images = decode_latents(bundle, latents)
    return Img2ImgResult(
        images=images, seeds=list(seeds), width_px=width_px, height_px=height_px,
        embeddings_used=guidance.embeddings_used(), latents=latents,
    )
