"""Steps shared by every pipeline: conditioning, latent preparation, denoising, decoding."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from huabi.core.conditioning import EmbeddingLookup, encode_a1111_prompts, sdxl_add_time_ids
from huabi.core.guidance import CFGDenoiser, PredictionDenoiser, ScheduledInputs, UNetInputs
from huabi.core.noise import BrownianNoiseSampler, SeededNoiseSampler, initial_noise
from huabi.core.progress import ProgressEvent, StopSampling
from huabi.core.request import GenerationRequest
from huabi.core.prompt_parser import ExtraNetworkTag, extract_extra_networks, prompt_schedule, split_composable
from huabi.core.samplers import get_sampler
from huabi.core.variation import NoiseVariation
from huabi.core.schedules import DiscreteSchedule, compute_sigmas
from huabi.models.bundle import ModelBundle
from huabi.core.family import ModelFamily, UNetVariant
from huabi.errors import HuabiError
from huabi.pipelines.patches import FIRST_PASS, DenoisePass, Patch, as_patches, combined_unet_kwargs, wrapped_denoiser

if TYPE_CHECKING:
    from huabi.pipelines.refiner import RefinerStage

# A1111's defaults for the SDXL refiner's aesthetic-score conditioning.
REFINER_AESTHETIC_SCORE = 6.0
REFINER_NEGATIVE_AESTHETIC_SCORE = 2.5

StepCallback = Callable[[ProgressEvent], None]  # one event per sampling step of a pass
TextEncoder = Callable[[str, bool], UNetInputs]  # (text in force at a step, is negative) -> UNet inputs


def schedule_steps(sampler_name: str, steps: int) -> int:
    """The step count prompt editing is scheduled over: A1111 counts denoiser calls,
    so second-order samplers (two calls per step) get twice the steps."""
    return steps * 2 if get_sampler(sampler_name).second_order else steps


@dataclass(frozen=True)
class GuidanceInputs:
    """The prompt and negative prompt in A1111's syntax, parsed, with their encoder.

    ``subprompts`` are the ``AND`` parts ``(text, weight)`` of the prompt with
    extra-network tags removed (the tags are in ``extra_networks`` /
    ``negative_extra_networks``, for whoever applies them).  Prompt editing makes
    the conditioning depend on the step count, known only when denoising:
    :meth:`conditioning` builds it, encoding each distinct text once (``encode``
    remembers the texts it has seen).
    """

    subprompts: tuple[tuple[str, float], ...]
    negative_prompt: str
    extra_networks: tuple[ExtraNetworkTag, ...]
    negative_extra_networks: tuple[ExtraNetworkTag, ...]
    encode: TextEncoder = field(repr=False, compare=False)
    # Textual-inversion names used by the texts encoded so far, in order of first use.
    embeddings_used: Callable[[], tuple[str, ...]] = field(default=tuple, repr=False, compare=False)

    def conditioning(self, total_steps: int) -> tuple[list[tuple[ScheduledInputs, float]], ScheduledInputs]:
        """``([(scheduled cond, weight) per sub-prompt], scheduled uncond)`` over ``total_steps``."""
        conds = [(self._scheduled(text, total_steps, negative=False), weight) for text, weight in self.subprompts]
        return conds, self._scheduled(self.negative_prompt, total_steps, negative=True)

    def _scheduled(self, prompt: str, total_steps: int, *, negative: bool) -> ScheduledInputs:
        with torch.inference_mode():
            return ScheduledInputs(
                tuple((last, self.encode(text, negative)) for last, text in prompt_schedule(prompt, total_steps))
            )


def encode_guidance(
    bundle: ModelBundle,
    prompt: str,
    negative_prompt: str,
    *,
    clip_skip: int,
    width_px: int,
    height_px: int,
    device: torch.device,
    steps: int | None = None,
    sampler_name: str | None = None,
    embeddings: EmbeddingLookup | None = None,
) -> GuidanceInputs:
    """Parse the prompt and negative prompt (A1111's syntax) and encode them.

    Extra-network tags come out first, then the prompt splits at ``AND``; the
    negative prompt has no ``AND``, as in A1111, but supports everything else.
    The texts are encoded now for ``steps`` with ``sampler_name`` (1 step if not
    given); texts that only appear at other step counts are encoded when
    :func:`denoise` asks for them.  ``embeddings`` (name -> vectors, e.g. a
    :class:`huabi.models.embeddings.EmbeddingLibrary`) makes embedding names in
    either prompt stand for their vectors.  Prompt and negative may differ in token
    length: as in A1111's default, they then go through the UNet separately.
    """
    positive_text, positive_tags = extract_extra_networks(prompt)
    negative_text, negative_tags = extract_extra_networks(negative_prompt)
    encoded: dict[tuple[str, bool], UNetInputs] = {}
    used: dict[str, None] = {}  # ordered set of embedding names

    def encode(text: str, negative: bool) -> UNetInputs:
        key = (text, negative)
        if key not in encoded:
            cond = encode_a1111_prompts(
                bundle.text_encoders, bundle.tokenizers, bundle.family, [text], clip_skip=clip_skip, negative=negative,
                embeddings=embeddings,
            )
            used.update(dict.fromkeys(cond.embeddings_used))
            inputs = _unet_inputs(bundle, cond.context, cond.pooled, negative, width_px, height_px, device)
            if bundle.extra_unet_added is not None:  # per-job UNet inputs (IP-Adapter image embeddings)
                inputs = UNetInputs(inputs.context, {**(inputs.added or {}), **bundle.extra_unet_added(negative)},
                                    inputs.channels)
            encoded[key] = inputs
        return encoded[key]

    guidance = GuidanceInputs(
        subprompts=tuple(split_composable(positive_text)),
        negative_prompt=negative_text,
        extra_networks=tuple(positive_tags),
        negative_extra_networks=tuple(negative_tags),
        encode=encode,
        embeddings_used=lambda: tuple(used),
    )
    total = 1 if steps is None else (steps if sampler_name is None else schedule_steps(sampler_name, steps))
    guidance.conditioning(total)  # encode now: errors surface here, the encoder memo is warm
    return guidance


def _unet_inputs(
    bundle: ModelBundle,
    context: torch.Tensor,
    pooled: torch.Tensor | None,
    negative: bool,
    width_px: int,
    height_px: int,
    device: torch.device,
) -> UNetInputs:
    if bundle.family is ModelFamily.SDXL:
        time_ids = sdxl_add_time_ids(
            (height_px, width_px), (0, 0), (height_px, width_px), dtype=torch.float32, device=device
        )
        return UNetInputs(context, {"text_embeds": pooled, "time_ids": time_ids})
    if bundle.family is ModelFamily.SDXL_REFINER:
        score = REFINER_NEGATIVE_AESTHETIC_SCORE if negative else REFINER_AESTHETIC_SCORE
        time_ids = sdxl_add_time_ids(
            (height_px, width_px), (0, 0), (height_px, width_px),
            aesthetic_score=score, dtype=torch.float32, device=device,
        )
        return UNetInputs(context, {"text_embeds": pooled, "time_ids": time_ids})
    return UNetInputs(context)


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


def noise_variation(
    bundle: ModelBundle, request: GenerationRequest, variation_seeds: Sequence[int] | None
) -> NoiseVariation | None:
    """A1111's variation seed / seed resize for one batch, or None for plain seeded noise."""
    resize = request.seed_resize_from_latent(bundle.vae_scale_factor)
    if request.variation_strength == 0 and resize is None:
        return None
    seeds = tuple(variation_seeds) if request.variation_strength != 0 and variation_seeds is not None else None
    return NoiseVariation(seeds, float(request.variation_strength) if seeds else 0.0, resize)


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
    variation: NoiseVariation | None = None,
    init_latent: torch.Tensor | None = None,
    denoising_strength: float = 1.0,
    fixed_steps: bool = False,
    image_channels: torch.Tensor | None = None,
    patches: Sequence[Patch] = (),
    pass_name: str = FIRST_PASS,
    wrap_denoiser: Callable[[Callable], Callable] | None = None,
    guided_denoiser: Callable[..., Callable] | None = None,
    refiner: "RefinerStage | None" = None,
    unet_kwargs_for: Callable[[torch.Tensor, tuple[int, int, int]], Callable] | None = None,
) -> torch.Tensor:
    """Sample latents from seeded noise; returns x0 latents [B, C, h, w] in float32.

    Without ``init_latent`` this is text-to-image.  With it (image-to-image) the
    sampler runs only the tail of the ``steps``-step schedule picked by
    ``denoising_strength`` (see :func:`img2img_sigmas`), starting from
    ``init_latent + noise * sigma_start``.  With ``fixed_steps`` (A1111's rule for the
    hires fix's second pass, see :func:`fixed_steps_schedule_length`) exactly ``steps``
    steps run, the last ones of a schedule stretched by the strength.
    ``image_channels`` replaces the extra
    UNet inputs that text-to-image would give inpainting/pix2pix models.

    ``patches`` (:mod:`huabi.pipelines.patches`) change this pass in one place: their
    ``unet_kwargs`` hooks go to the UNet (ControlNet residuals) and their ``wrap`` faces
    wrap the guided denoiser in list order (instruct guidance, refiner hand-over,
    inpainting's blend), so samplers never know.  ``pass_name`` tells them which pass
    this is ("first pass" or "hires").  ``on_step`` receives a
    :class:`huabi.core.progress.ProgressEvent` per step (step/total of this pass, phase,
    the denoised latent) and may raise :class:`huabi.core.progress.StopSampling` to end
    the loop early: the latest denoised latent is returned (A1111's interrupt/skip).
    ``wrap_denoiser``, ``guided_denoiser``, ``refiner`` and ``unet_kwargs_for`` are the
    older spellings of the same patches (see :func:`huabi.pipelines.patches.as_patches`).
    """
    spec = get_sampler(sampler_name)
    schedule = DiscreteSchedule(bundle.alphas_cumprod)
    stretched = init_latent is not None and fixed_steps and denoising_strength > 0
    schedule_length = fixed_steps_schedule_length(steps, denoising_strength) if stretched else steps
    sigmas = compute_sigmas(schedule_name, sampler_name, schedule_length, schedule).to(device)
    # Variation seeds / seed resize (A1111) change only the first draw; ancestral noise
    # still continues each image's own seed stream.
    if variation is None:
        noise = initial_noise(seeds, shape, device=device, dtype=torch.float32)
    else:
        noise = variation.noise(seeds, shape, device=device, dtype=torch.float32)
    full_sigmas = sigmas  # A1111 spans the Brownian tree over the whole schedule, img2img too
    if init_latent is None:
        x = noise * sigmas[0]
    else:
        sigmas = sigmas[schedule_length - steps:] if stretched else img2img_sigmas(sigmas, denoising_strength)
        x = init_latent.to(device=device, dtype=torch.float32) + noise * sigmas[0]
    if spec.brownian:
        noise_sampler = BrownianNoiseSampler.for_sigmas(x, full_sigmas, seeds)
    else:
        noise_sampler = SeededNoiseSampler(seeds, shape, device=device, dtype=torch.float32)
    channels = image_channels
    if channels is None:
        channels = txt2img_image_channels(bundle, len(seeds), shape, device)
    # Per-step conditioning (prompt editing, alternation) and AND sub-prompts; the CFG
    # denoiser picks each call's entry by counting its calls, as A1111 does.
    conds, uncond = guidance.conditioning(schedule_steps(sampler_name, steps))
    patches = as_patches(patches, unet_kwargs_for=unet_kwargs_for, refiner=refiner, guided_denoiser=guided_denoiser,
                         wrap_denoiser=wrap_denoiser)
    this_pass = DenoisePass(bundle, pass_name, sigmas, shape, sampler_name, steps, cfg_scale, device)
    denoiser: Callable = CFGDenoiser(
        PredictionDenoiser(bundle.unet, schedule, bundle.prediction, combined_unet_kwargs(patches, this_pass)),
        [(cond.with_channels(channels), weight) for cond, weight in conds],
        uncond.with_channels(channels),
        cfg_scale,
    )
    denoiser = wrapped_denoiser(patches, denoiser, this_pass)
    total = len(sigmas) - 1
    latest = [x]

    def report(i: int, _total: int, _x: torch.Tensor, denoised: torch.Tensor) -> None:
        latest[0] = denoised
        if on_step is not None:
            on_step(ProgressEvent(i + 1, total, phase=this_pass.phase, latent=denoised))

    if total == 0:  # strength 0: nothing to denoise
        return x
    with torch.inference_mode():
        try:
            return spec.fn(denoiser, x, sigmas, noise=noise_sampler, on_step=report)
        except StopSampling:
            return latest[0]


def img2img_sigmas(sigmas: torch.Tensor, denoising_strength: float) -> torch.Tensor:
    """The tail of a full schedule that image-to-image runs (A1111 with "fix steps" off).

    With S steps (``len(sigmas) - 1``) and strength d, A1111 runs
    ``t_enc = int(min(d, 0.999) * S)`` encoding steps and samples over
    ``sigmas[S - t_enc - 1:]``: ``t_enc + 1`` steps, the whole schedule at d = 1.
    Strength 0 is special-cased here (A1111 would still take its last, smallest
    step): the schedule is just ``[0]`` so the input comes back unchanged.
    """
    if not 0.0 <= denoising_strength <= 1.0:
        raise HuabiError(f"denoising strength: must be from 0 to 1, got {denoising_strength}")
    if denoising_strength == 0:
        return sigmas[-1:]
    steps = len(sigmas) - 1
    t_enc = int(min(denoising_strength, 0.999) * steps)
    return sigmas[steps - t_enc - 1:]


def fixed_steps_schedule_length(steps: int, denoising_strength: float) -> int:
    """How long a schedule A1111's "fixed steps" img2img rule samples the tail of.

    A1111 and Forge (``setup_img2img_steps`` with ``steps`` given, as the hires fix's
    second pass always does with ``hr_second_pass_steps or steps``; plain img2img only
    with the ``img2img_fix_steps`` option): a schedule of ``int(S / min(d, 0.999))``
    steps whose last S run, so the pass always takes exactly S steps and starts at
    about the strength's sigma.  At d = 1 that is the plain S-step schedule.
    """
    if not 0.0 < denoising_strength <= 1.0:
        raise HuabiError(f"denoising strength: fixed steps need a strength above 0 and at most 1, got {denoising_strength}")
    return int(steps / min(denoising_strength, 0.999))


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
