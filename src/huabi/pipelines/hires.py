"""A1111's hires fix, as numbered steps: first pass -> upscale -> second (img2img) pass -> decode.

1. Text to image at the request's size (the "Size" the infotext records).
2. Upscale to the target: latent modes interpolate the latent with A1111's
   torch mode/antialias per name; pixel modes decode, resize the image
   (Lanczos, or a model upscaler passed in as a callable so this layer never
   imports the service layer) and encode it again.
3. Image to image at the target size with ``hires_steps`` (0: the first pass's
   steps) and ``hires_denoise``, same prompt, same seeds, by A1111's "fixed steps"
   rule, as A1111 and Forge always run this pass (``sample_img2img(...,
   steps=hr_second_pass_steps or steps)``): exactly S = ``hires_steps`` steps, the
   last S of a schedule of ``int(S / min(denoise, 0.999))`` steps, so the same
   infotext gives the same schedule in huabi and A1111 (plain img2img keeps
   A1111's default rule: ``int(d * S) + 1`` steps of an S-step schedule).

Noise of the second pass: A1111 builds a fresh per-image generator from the
same seeds (and variation seeds / seed resize) at the new latent shape and
draws from its start; huabi's :func:`denoise` does the same by construction
(``initial_noise(seeds, new shape)``), so the second pass's noise is the one a
plain txt2img at the target size would start from.  The second pass's
conditioning (SDXL size ids) is encoded for the target size.  Inpainting
models get text-to-image's all-masked grey channels in the second pass (A1111
feeds them the first pass's decoded image instead).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from PIL import Image

from huabi.core.conditioning import EmbeddingLookup
from huabi.core.progress import ProgressEvent
from huabi.core.request import HIRES_LATENT_MODES, GenerationRequest
from huabi.errors import HuabiError
from huabi.models.bundle import ModelBundle
from huabi.pipelines.common import (
    StepCallback,
    decode_latents,
    denoise,
    encode_guidance,
    latent_shape,
    noise_variation,
)
from huabi.pipelines.img2img import encode_image
from huabi.pipelines.patches import HIRES_PASS, Patch, RefinerPatch, UNetHookPatch, refiner_passes

# (image, width_px, height_px) -> the image at exactly that size.
PixelUpscaler = Callable[[Image.Image, int, int], Image.Image]


def lanczos_upscaler(image: Image.Image, width_px: int, height_px: int) -> Image.Image:
    """A1111's "Lanczos" and "None" hires upscalers: one Pillow Lanczos resize to the target."""
    return image.resize((width_px, height_px), resample=Image.LANCZOS)


@dataclass(frozen=True)
class HiresResult:
    images: list[Image.Image]
    seeds: list[int]
    width_px: int  # the first pass's size (recorded as "Size")
    height_px: int
    hires_width_px: int  # the output's size
    hires_height_px: int
    embeddings_used: tuple[str, ...] = ()


@dataclass(frozen=True)
class HiresPlan:
    """Where the upscale goes: ``upscale_*`` is the size to scale to, then ``crop_*`` latent
    cells come off (A1111's "Hires resize" to another aspect: cover, then crop centred)."""

    upscale_w_px: int
    upscale_h_px: int
    crop_w_cells: int
    crop_h_cells: int
    target_w_px: int
    target_h_px: int


def hires_plan(request: GenerationRequest, width_px: int, height_px: int, latent_factor: int) -> HiresPlan:
    target_w, target_h = request.hires_target_px(width_px, height_px, latent_factor)
    if request.hires_resize_px is None:
        return HiresPlan(target_w, target_h, 0, 0, target_w, target_h)
    # Cover the target keeping the first pass's aspect, as A1111 does, then crop the excess.
    if width_px * target_h < target_w * height_px:  # first pass is narrower than the target
        upscale_w, upscale_h = target_w, target_w * height_px // width_px
    else:
        upscale_w, upscale_h = target_h * width_px // height_px, target_h
    return HiresPlan(
        upscale_w, upscale_h,
        (upscale_w - target_w) // latent_factor, (upscale_h - target_h) // latent_factor,
        target_w, target_h,
    )


def upscale_latent(latents: torch.Tensor, latent_h: int, latent_w: int, upscaler: str) -> torch.Tensor:
    """Interpolate [B, C, h, w] latents to (latent_h, latent_w) with an A1111 "Latent ..." mode."""
    if upscaler not in HIRES_LATENT_MODES:
        raise HuabiError(f"hires upscaler: {upscaler!r} is not a latent mode; valid: {', '.join(HIRES_LATENT_MODES)}")
    mode, antialias = HIRES_LATENT_MODES[upscaler]
    return torch.nn.functional.interpolate(latents, size=(latent_h, latent_w), mode=mode, antialias=antialias)


def crop_latent(latents: torch.Tensor, crop_h_cells: int, crop_w_cells: int) -> torch.Tensor:
    """Cut ``crop_*`` cells off, the odd one at the end (A1111's truncation)."""
    height, width = latents.shape[-2:]
    return latents[
        :, :, crop_h_cells // 2: height - (crop_h_cells + 1) // 2, crop_w_cells // 2: width - (crop_w_cells + 1) // 2
    ]


def hires_txt2img(
    bundle: ModelBundle,
    request: GenerationRequest,
    seeds: Sequence[int],
    *,
    device: torch.device,
    on_step: StepCallback | None = None,
    embeddings: EmbeddingLookup | None = None,
    variation_seeds: Sequence[int] | None = None,
    pixel_upscaler: PixelUpscaler | None = None,
    patches: Sequence[Patch] = (),
    unet_kwargs_for=None,  # older spellings of patches: ControlNet hook factories (first, second pass),
    hires_unet_kwargs_for=None,
    first_pass: Callable[..., torch.Tensor] | None = None,
    refiner=None,  # and the refiner stage (in the passes request.refiner_hires_pass names)
) -> HiresResult:
    """Text to image with A1111's hires fix; ``request.hires`` need not be set (this is the fix).

    ``pixel_upscaler`` resizes decoded images for non-latent upscalers (default
    Lanczos; the engine passes a model upscaler for a file path).  ``on_step``
    sees events counted over both passes: the first pass's ``request.steps``
    then ``hires_steps`` (or ``request.steps``), with
    the phase ("first pass", "hires", or "refiner" once the refiner took over).
    ``first_pass`` replaces step 1's denoise (same keyword arguments as
    :func:`denoise`).  ``patches`` apply to both passes; each sees which pass it is in
    (ControlNet makes the second pass's own hint; the refiner patch hands over in the
    pass(es) ``request.refiner_hires_pass`` names: A1111's default "second pass", or
    "first pass", or "both passes", each pass starting on the base model).
    """
    # 1. First pass at the request's size.
    width_px = request.width_px or bundle.native_size_px
    height_px = request.height_px or bundle.native_size_px
    shape = latent_shape(bundle, width_px, height_px)
    factor = bundle.vae_scale_factor
    plan = hires_plan(request, width_px, height_px, factor)
    target_shape = latent_shape(bundle, plan.target_w_px, plan.target_h_px)
    hires_steps = request.hires_steps or request.steps
    total_steps = request.steps + hires_steps

    if unet_kwargs_for is not None or hires_unet_kwargs_for is not None:
        hook = UNetHookPatch(unet_kwargs_for or (lambda *_: None), hires_factory=hires_unet_kwargs_for or (lambda *_: None))
        patches = (hook, *patches)
    if refiner is not None:
        patches = (*patches, RefinerPatch(refiner, refiner_passes(request.refiner_hires_pass)))

    def first_step(event: ProgressEvent) -> None:
        if on_step is not None:
            on_step(replace(event, step=min(event.step, request.steps), total=total_steps))

    def second_step(event: ProgressEvent) -> None:
        if on_step is not None:  # fixed steps: the pass runs exactly hires_steps steps
            on_step(replace(event, step=request.steps + event.step, total=total_steps))

    guidance = encode_guidance(
        bundle, request.prompt, request.negative_prompt, clip_skip=request.clip_skip,
        width_px=width_px, height_px=height_px, device=device, steps=request.steps,
        sampler_name=request.sampler, embeddings=embeddings,
    )
    variation = noise_variation(bundle, request, variation_seeds)
    run_first = first_pass or (lambda *args, **kwargs: denoise(*args, **kwargs))
    latents = run_first(
        bundle, guidance, sampler_name=request.sampler, schedule_name=request.schedule, steps=request.steps,
        cfg_scale=request.cfg_scale, seeds=seeds, shape=shape, device=device, on_step=first_step,
        variation=variation, patches=patches,
    )

    # 2. Upscale to the (cover) size, then crop to the target.
    if request.hires_upscaler in HIRES_LATENT_MODES:
        latents = upscale_latent(latents, plan.upscale_h_px // factor, plan.upscale_w_px // factor,
                                 request.hires_upscaler)
    else:
        resize = pixel_upscaler or lanczos_upscaler
        images = [resize(image, plan.upscale_w_px, plan.upscale_h_px) for image in decode_latents(bundle, latents)]
        latents = torch.cat([encode_image(bundle, image, device) for image in images])
    latents = crop_latent(latents, plan.crop_h_cells, plan.crop_w_cells)
    if tuple(latents.shape[1:]) != target_shape:  # the cover size is rounded to whole cells
        latents = latents[:, :, : target_shape[1], : target_shape[2]]

    # 3. Second pass: image to image at the target size, the same seeds.
    hires_guidance = encode_guidance(
        bundle, request.prompt, request.negative_prompt, clip_skip=request.clip_skip,
        width_px=plan.target_w_px, height_px=plan.target_h_px, device=device, steps=hires_steps,
        sampler_name=request.sampler, embeddings=embeddings,
    )
    latents = denoise(
        bundle, hires_guidance, sampler_name=request.sampler, schedule_name=request.schedule, steps=hires_steps,
        cfg_scale=request.cfg_scale, seeds=seeds, shape=target_shape, device=device, on_step=second_step,
        variation=variation, init_latent=latents, denoising_strength=float(request.hires_denoise),
        fixed_steps=True, patches=patches, pass_name=HIRES_PASS,
    )

    # 4. Decode to pixels.
    used = dict.fromkeys(guidance.embeddings_used() + hires_guidance.embeddings_used())
    return HiresResult(
        images=decode_latents(bundle, latents), seeds=list(seeds), width_px=width_px, height_px=height_px,
        hires_width_px=plan.target_w_px, hires_height_px=plan.target_h_px, embeddings_used=tuple(used),
    )
