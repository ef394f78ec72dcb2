"""Inpainting and outpainting on top of image-to-image.

Steps: mask (invert, blur) -> choose the working area (whole picture, or the
mask's padded box upscaled) -> masked content -> img2img with the kept area
re-imposed after every denoiser call -> paste back with the blurred mask as a
soft edge, so pixels outside the blurred mask are exactly the input's.

Ordinary checkpoints learn nothing of the mask: :class:`KeepUnmaskedDenoiser`
replaces the denoised prediction outside it by the init latent (A1111's
CFGDenoiser does the same), so the sampler's next x there is the init latent
noised to the next sigma. Inpainting checkpoints (9 UNet input channels) also
get ``[mask, masked-image latent]`` as extra channels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from huabi.core.conditioning import EmbeddingLookup
from huabi.core.masks import (
    blend_keep,
    blur_mask,
    crop_region,
    fill_masked,
    latent_mask,
    outpaint_box,
    outpaint_mask,
)
from huabi.core.noise import initial_noise
from huabi.core.request import EditOptions, GenerationRequest
from huabi.core.variation import NoiseVariation
from huabi.errors import HuabiError
from huabi.models.bundle import ModelBundle
from huabi.core.family import UNetVariant
from huabi.pipelines.common import StepCallback, decode_latents
from huabi.pipelines.patches import Patch, WrapPatch, as_patches
from huabi.pipelines.img2img import Img2ImgResult, encode_image, image_to_tensor, img2img

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """Grey mask -> [H, W] float32 in [0, 1] (1 = repaint)."""
    return torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)


def tensor_to_mask(mask: torch.Tensor) -> Image.Image:
    """[H, W] in [0, 1] -> 8-bit grey image (rounded)."""
    array = (mask.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


class KeepUnmaskedDenoiser:
    """Wraps a denoiser: outside the mask the prediction is the init latent itself."""

    def __init__(self, inner: Denoiser, init_latent: torch.Tensor, repaint_mask: torch.Tensor) -> None:
        self.inner = inner
        self.init_latent = init_latent
        self.repaint_mask = repaint_mask  # [1, 1, h, w], 1 = repaint

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        denoised = self.inner(x, sigma)
        return blend_keep(denoised, self.init_latent.to(denoised.dtype), self.repaint_mask.to(denoised.dtype))


@dataclass(frozen=True)
class InpaintResult:
    images: list[Image.Image]  # final composites, at the input image's size
    seeds: list[int]
    width_px: int  # working size the model ran at
    height_px: int
    embeddings_used: tuple[str, ...]
    mask: Image.Image  # the blurred mask used as the paste-back alpha, at the input's size


def prepare_mask(mask: Image.Image, options: EditOptions) -> torch.Tensor:
    """The mask as [H, W] in [0, 1]: inverted if asked, blurred; an empty mask is an error."""
    tensor = mask_to_tensor(mask)
    if options.invert_mask:
        tensor = 1.0 - tensor
    if not bool((tensor > 0).any()):
        raise HuabiError(
            "mask: nothing to inpaint: the mask is all black (white marks the area to repaint"
            + ("; --invert-mask is on)" if options.invert_mask else ")")
        )
    return blur_mask(tensor, options.mask_blur_px)


def inpaint(
    bundle: ModelBundle,
    request: GenerationRequest,
    image: Image.Image,
    mask: Image.Image,
    seeds: Sequence[int],
    options: EditOptions,
    *,
    device: torch.device,
    on_step: StepCallback | None = None,
    embeddings: EmbeddingLookup | None = None,
    working_size: tuple[int, int] | None = None,
    variation: NoiseVariation | None = None,
    patches: Sequence[Patch] = (),
    unet_kwargs_for=None,  # older spellings of patches (ControlNet hook factory, refiner stage)
    refiner=None,
) -> InpaintResult:
    """Repaint the white part of ``mask`` (same size as ``image``) ``len(seeds)`` times.

    ``working_size`` is the size the model runs at: the image's own for "whole"
    (then it must already be a multiple of 8), the size the masked box is scaled
    to for "masked" (default: the image's size rounded to 8). ``variation``
    (variation seeds / seed resize) goes to the noise added to the init latent.
    """
    if mask.size != image.size:
        raise HuabiError(f"mask: size {mask.size[0]}x{mask.size[1]} differs from the image's {image.width}x{image.height}")
    # 1. Mask: invert, blur (the blurred mask is the final paste-back alpha).
    soft_mask = prepare_mask(mask, options)

    # 2. Working area: the whole picture, or the padded mask box scaled to the working size.
    if options.inpaint_area == "masked":
        work_w, work_h = working_size or tuple(max(8, round(s / 8) * 8) for s in image.size)
        region = crop_region(soft_mask, options.padding_px, work_w, work_h)
        assert region is not None  # prepare_mask refused empty masks
        work_image = image.crop(region).resize((work_w, work_h), Image.Resampling.LANCZOS)
        work_mask = tensor_to_mask(soft_mask).crop(region).resize((work_w, work_h), Image.Resampling.BILINEAR)
        work_mask_t = mask_to_tensor(work_mask)
    else:
        region = None
        work_image, work_mask_t = image, soft_mask
        if working_size is not None and working_size != image.size:
            raise HuabiError(f"size: whole-picture inpainting runs at the image's size {image.width}x{image.height}")
    work_w, work_h = work_image.size

    # 3. Masked content in pixels ("fill"), then the init latent.
    pixels = image_to_tensor(work_image)
    if options.masked_content == "fill":
        pixels = fill_masked(pixels, work_mask_t)
    init_latent = encode_image(bundle, pixels, device)
    _, channels, latent_h, latent_w = init_latent.shape
    repaint = latent_mask(work_mask_t, latent_h, latent_w).to(device)
    batch = len(seeds)
    init_latent = init_latent.expand(batch, -1, -1, -1)
    if options.masked_content == "latent noise":
        noise = initial_noise(seeds, (channels, latent_h, latent_w), device=device)
        init_latent = blend_keep(noise, init_latent, repaint)
    elif options.masked_content == "latent nothing":
        init_latent = init_latent * (1 - repaint)

    # 4. Inpainting checkpoints: [mask, latent of the image with the mask blanked] as extra channels.
    image_channels = None
    if bundle.variant is UNetVariant.INPAINT:
        hard_mask = work_mask_t.round()
        masked_pixels = pixels * (1 - hard_mask)  # 0 is mid-grey in [-1, 1]
        masked_latent = encode_image(bundle, masked_pixels, device)
        small_mask = torch.nn.functional.interpolate(hard_mask[None, None], size=(latent_h, latent_w)).to(device)
        image_channels = torch.cat([small_mask, masked_latent], dim=1).expand(batch, -1, -1, -1)

    # 5. Denoise with the kept area re-imposed at every call; final latents blended once more.
    result: Img2ImgResult = img2img(
        bundle, request, work_image, seeds, denoising_strength=options.denoising_strength, device=device,
        on_step=on_step, embeddings=embeddings, image_channels=image_channels, init_latent=init_latent,
        patches=(*as_patches(patches, unet_kwargs_for=unet_kwargs_for, refiner=refiner),
                 WrapPatch(lambda inner: KeepUnmaskedDenoiser(inner, init_latent, repaint))),
        variation=variation,
    )
    latents = blend_keep(result.latents, init_latent, repaint)
    generated = decode_latents(bundle, latents)

    # 6. Paste back: scale the working area into its box, then composite with the soft mask.
    finals = [composite(image, piece, soft_mask, region) for piece in generated]
    return InpaintResult(
        images=finals, seeds=list(seeds), width_px=work_w, height_px=work_h,
        embeddings_used=result.embeddings_used, mask=tensor_to_mask(soft_mask),
    )


def composite(
    original: Image.Image, generated: Image.Image, soft_mask: torch.Tensor, region: tuple[int, int, int, int] | None
) -> Image.Image:
    """``generated`` over ``original`` with alpha ``soft_mask``; exactly ``original`` where the mask is 0."""
    if region is not None:
        left, top, right, bottom = region
        placed = original.copy()
        placed.paste(generated.resize((right - left, bottom - top), Image.Resampling.LANCZOS), (left, top))
        generated = placed
    base = np.asarray(original.convert("RGB"), dtype=np.float32)
    over = np.asarray(generated.convert("RGB"), dtype=np.float32)
    alpha = np.round(soft_mask.cpu().numpy() * 255.0)[..., None] / 255.0  # 8-bit alpha, as a PNG mask holds
    mixed = np.round(over * alpha + base * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    mixed = np.where(alpha > 0, mixed, np.asarray(original.convert("RGB")))
    return Image.fromarray(np.ascontiguousarray(mixed))


def outpaint_canvas(
    image: Image.Image, options: EditOptions, seed: int
) -> tuple[Image.Image, Image.Image]:
    """The extended canvas with its new area pre-filled, and the mask over the new area (+ overlap).

    ``masked_content`` "fill" paints the new area with the original's edge
    colours (A1111's fill), anything else with seeded noise pixels; the
    inpainting pass then repaints it.
    """
    assert options.outpaint is not None
    left, right, up, down = options.outpaint
    canvas_w, canvas_h, box = outpaint_box(image.width, image.height, left, right, up, down)
    canvas = Image.new("RGB", (canvas_w, canvas_h))
    canvas.paste(image, box[:2])
    new_area = torch.ones(canvas_h, canvas_w)
    new_area[box[1]:box[3], box[0]:box[2]] = 0
    pixels = image_to_tensor(canvas)
    if options.masked_content == "fill":
        pixels = fill_masked(pixels, new_area)
    else:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.rand(pixels.shape, generator=generator) * 2 - 1
        pixels = torch.where(new_area.bool(), noise, pixels)
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    filled = Image.fromarray(np.ascontiguousarray(array))
    mask = tensor_to_mask(outpaint_mask(canvas_w, canvas_h, box, options.outpaint_overlap_px))
    return filled, mask
