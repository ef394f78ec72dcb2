"""InstructPix2Pix editing, as numbered steps: check -> encode instruction -> encode image -> denoise -> decode.

An instruct-pix2pix UNet takes 8 input channels: the (scaled) noisy latent and
the latent of the image to edit -- the VAE's *mode*, **not** multiplied by the
scaling factor, as the paper's code, diffusers and A1111 feed it.  Guidance is
three-way (Brooks et al. 2023, eq. 3)::

    eps = eps(∅, ∅) + s_I (eps(∅, I) − eps(∅, ∅)) + s_T (eps(T, I) − eps(∅, I))

with ∅ for text the negative prompt and ∅ for the image a zero latent; applied
here to the denoised x0 (x − σ·eps is affine in eps and the weights sum to 1,
so it is the same combination).  ``s_T`` is the request's CFG scale, ``s_I``
the image CFG scale (A1111's "Image CFG scale", default 1.5).

What denoising strength means here (huabi's choice, said in the README):
strength 1 (``huabi edit --instruct``'s default) starts from pure noise over
the whole schedule, as the paper and diffusers do -- the image enters only
through the extra channels.  A strength d < 1 runs A1111's img2img tail: the
image's scaled latent noised to the d-th sigma, the rest of the schedule
(what A1111's img2img tab does with an instruct-pix2pix checkpoint).
Strength 0 returns the image through a VAE round trip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from PIL import Image

from huabi.core.conditioning import EmbeddingLookup
from huabi.core.guidance import UNetInputs, as_scheduled
from huabi.core.request import GenerationRequest
from huabi.core.variation import NoiseVariation
from huabi.errors import HuabiError
from huabi.models.bundle import ModelBundle
from huabi.core.family import UNetVariant
from huabi.pipelines.common import StepCallback, decode_latents, denoise, encode_guidance, latent_shape
from huabi.pipelines.patches import GuidancePatch, Patch
from huabi.pipelines.img2img import Img2ImgResult, encode_image, image_to_tensor

DEFAULT_IMAGE_CFG_SCALE = 1.5  # A1111's and diffusers' default


class InstructCFGDenoiser:
    """Three-way guidance over text and image (A1111's and diffusers' edit-model CFG).

    Built like :class:`huabi.core.guidance.CFGDenoiser` (``model, conds, uncond,
    scale``) with the image latent already in the conditionings' ``channels``;
    the image-free branch is the negative conditioning with zero channels.  AND
    sub-prompts generalise the text term: ``sum_i w_i s_T (eps(T_i, I) − eps(∅, I))``.
    ``step`` counts calls (the prompt-schedule clock), as CFGDenoiser does.
    """

    def __init__(self, model: Callable, cond, uncond, scale: float, image_cfg_scale: float) -> None:
        self.model = model
        if not isinstance(cond, list):
            cond = [(cond, 1.0)]
        self.conds = [(as_scheduled(c), float(w)) for c, w in cond]
        if uncond is None:
            raise HuabiError("instruct: three-way guidance needs the negative (unconditional) conditioning")
        self.uncond = as_scheduled(uncond)
        self.scale = float(scale)
        self.image_cfg_scale = float(image_cfg_scale)
        self.step = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        step = self.step
        self.step += 1
        batch = x.shape[0]
        conds = [(c.at(step).repeat_to(batch), w) for c, w in self.conds]
        image_only = self.uncond.at(step).repeat_to(batch)  # negative text, the image
        if image_only.channels is None:
            raise HuabiError("instruct: the image latent is missing from the UNet inputs")
        nothing = replace(image_only, channels=torch.zeros_like(image_only.channels))  # negative text, no image
        sigma = sigma.reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(batch)
        inputs = [c for c, _ in conds] + [image_only, nothing]
        if all(i.context.shape[1] == inputs[0].context.shape[1] for i in inputs):
            n = len(inputs)  # diffusers' batch order: text+image, image, neither
            outputs = self.model(torch.cat([x] * n), torch.cat([sigma] * n), UNetInputs.concat(inputs)).chunk(n)
        else:  # prompt and negative of different token lengths: separate calls
            outputs = [self.model(x, sigma, i) for i in inputs]
        out_image, out_nothing = outputs[-2], outputs[-1]
        denoised = out_nothing + (out_image - out_nothing) * self.image_cfg_scale
        for out, (_, weight) in zip(outputs[:-2], conds, strict=True):
            denoised = denoised + (out - out_image) * (weight * self.scale)
        return denoised


def instruct_image_latent(bundle: ModelBundle, image: Image.Image, device: torch.device) -> torch.Tensor:
    """The edited image's conditioning latent [1, C, h, w]: the VAE's mode, unscaled (diffusers' ``argmax``)."""
    pixels = image_to_tensor(image)
    vae_dtype = next(bundle.vae.parameters()).dtype
    with torch.inference_mode():
        posterior = bundle.vae.encode(pixels.unsqueeze(0).to(device=device, dtype=vae_dtype)).latent_dist
        return posterior.mode().float()


def check_instruct_model(bundle: ModelBundle) -> None:
    if bundle.variant is not UNetVariant.INSTRUCT_PIX2PIX:
        channels = int(bundle.unet.config.in_channels)
        raise HuabiError(
            f"instruct: {bundle.name} is not an InstructPix2Pix model (its UNet takes {channels} input channels, "
            "instruct-pix2pix takes 8); pass an instruct-pix2pix checkpoint with --model"
        )


def instruct_pix2pix(
    bundle: ModelBundle,
    request: GenerationRequest,
    init_image: Image.Image,
    seeds: Sequence[int],
    *,
    image_cfg_scale: float = DEFAULT_IMAGE_CFG_SCALE,
    denoising_strength: float = 1.0,
    device: torch.device,
    on_step: StepCallback | None = None,
    embeddings: EmbeddingLookup | None = None,
    variation: NoiseVariation | None = None,
    patches: Sequence[Patch] = (),
) -> Img2ImgResult:
    """Edit ``init_image`` (already at the working size) by the instruction ``request.prompt``.

    ``request.cfg_scale`` is the text scale s_T, ``image_cfg_scale`` the image scale s_I;
    see the module notes for ``denoising_strength``. ``patches`` (ControlNet, ...) apply as in every
    pipeline; the three-way guidance is this pipeline's own patch, first in the list.
    """
    # 1. Check: an instruct-pix2pix model, a strength in range, a size on the latent grid.
    check_instruct_model(bundle)
    strength = float(denoising_strength)
    if not 0.0 <= strength <= 1.0:
        raise HuabiError(f"denoising strength: must be from 0 to 1, got {denoising_strength}")
    if isinstance(image_cfg_scale, bool) or not isinstance(image_cfg_scale, (int, float)) or not 0 <= image_cfg_scale <= 100:
        raise HuabiError(f"image cfg scale: must be a number from 0 to 100, got {image_cfg_scale!r}")
    width_px, height_px = init_image.size
    shape = latent_shape(bundle, width_px, height_px)

    # 2. Encode the instruction and the negative prompt.
    guidance = encode_guidance(
        bundle, request.prompt, request.negative_prompt, clip_skip=request.clip_skip,
        width_px=width_px, height_px=height_px, device=device, steps=request.steps,
        sampler_name=request.sampler, embeddings=embeddings,
    )

    # 3. Encode the image: unscaled mode as the UNet's extra channels; scaled mean as the
    #    start of a partial-strength run.
    batch = len(seeds)
    image_channels = instruct_image_latent(bundle, init_image, device).expand(batch, -1, -1, -1)
    init_latent = None
    if strength < 1.0:
        init_latent = encode_image(bundle, init_image, device).expand(batch, -1, -1, -1)

    # 4. Denoise with three-way guidance (from pure noise at strength 1).
    latents = denoise(
        bundle, guidance, sampler_name=request.sampler, schedule_name=request.schedule, steps=request.steps,
        cfg_scale=request.cfg_scale, seeds=seeds, shape=shape, device=device, on_step=on_step,
        variation=variation, init_latent=init_latent, denoising_strength=strength, image_channels=image_channels,
        patches=(GuidancePatch(lambda model, conds, uncond, scale: InstructCFGDenoiser(
            model, conds, uncond, scale, image_cfg_scale)), *patches),
    )

    # 5. Decode to pixels.
    return Img2ImgResult(
        images=decode_latents(bundle, latents), seeds=list(seeds), width_px=width_px, height_px=height_px,
        embeddings_used=guidance.embeddings_used(), latents=latents,
    )
