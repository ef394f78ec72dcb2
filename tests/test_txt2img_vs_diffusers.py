"""Whole-pipeline equivalence: huabi's txt2img vs diffusers' own pipelines on the same model.

Same tiny checkpoint (loaded once by huabi, whose modules diffusers then
drives), same prompt, same initial noise, same sigmas, CFG on. diffusers
scales its starting latents by ``init_noise_sigma`` (sqrt(sigma_max^2 + 1)
for these schedulers) where k-diffusion starts at ``sigma_max``; we hand
diffusers ``noise * sigma_max / init_noise_sigma`` so both start from the same
point. The random tiny UNet leaves final latents of magnitude ~20, so the
comparison is relative to the largest latent value: measured
max|ours - theirs| / max|theirs| = 1.3e-6 (SD1 Euler/Karras), 2.3e-6 (SD1
Heun/Karras), 2.1e-6 (SD1 Euler a/Simple, same ancestral noise), 2.3e-6 (SDXL
Euler/Karras); asserted below 2e-5.
(diffusers applies CFG to eps, huabi to the denoised x0: the same algebra,
rounded differently in float32.)
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from huabi.core.request import GenerationRequest
from huabi.models.family import ModelFamily
from huabi.models.load import load_model
from huabi.pipelines.common import decode_latents, denoise, encode_guidance, latent_shape

PROMPT = "a lighthouse on a cliff, watercolor"
NEGATIVE = "blurry"
SIZE_PX = 64
STEPS = 5  # divides 1000, see CASES
CFG = 6.5
SEED = 1234
RELATIVE_TOLERANCE = 2e-5


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


# (huabi sampler, huabi schedule, diffusers scheduler with the same sigmas and timesteps).
# diffusers' DPM-Solver schedulers round Karras timesteps to integers and work in the
# variance-preserving space, so they are compared step by step in test_samplers.py instead.
CASES = {
    "Euler/Karras": ("Euler", "Karras", lambda **c: EulerDiscreteScheduler(use_karras_sigmas=True, **c)),
    "Heun/Karras": ("Heun", "Karras", lambda **c: HeunDiscreteScheduler(use_karras_sigmas=True, **c)),
    # "Simple" equals diffusers' "trailing" spacing when the step count divides 1000.
    "Euler a/Simple": ("Euler a", "Simple", lambda **c: EulerAncestralDiscreteScheduler(timestep_spacing="trailing", **c)),
}
SCHEDULER_BASE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def huabi_latents(bundle, sampler: str, schedule: str, negative: str) -> torch.Tensor:
    guidance = encode_guidance(bundle, PROMPT, negative, clip_skip=1, width_px=SIZE_PX, height_px=SIZE_PX,
                               device=torch.device("cpu"))
    return denoise(bundle, guidance, sampler_name=sampler, schedule_name=schedule, steps=STEPS, cfg_scale=CFG,
                   seeds=[SEED], shape=latent_shape(bundle, SIZE_PX, SIZE_PX), device=torch.device("cpu"))


def diffusers_latents(pipe, bundle, negative: str | None) -> torch.Tensor:
    pipe.scheduler.set_timesteps(STEPS)
    sigma_max = float(pipe.scheduler.sigmas[0])
    shape = latent_shape(bundle, SIZE_PX, SIZE_PX)
    # The generator draws the initial noise first, then the ancestral noise, as huabi's per-image one does.
    generator = torch.Generator("cpu").manual_seed(SEED)
    noise = torch.randn(shape, generator=generator)[None]
    start = noise * sigma_max / float(pipe.scheduler.init_noise_sigma)
    with torch.inference_mode():
        return pipe(PROMPT, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=CFG,
                    height=SIZE_PX, width=SIZE_PX, latents=start, generator=generator, output_type="latent").images


@pytest.mark.parametrize("case", list(CASES))
def test_sd1_txt2img_matches_diffusers(tiny_sd1_file, case):
    sampler, schedule, make_scheduler = CASES[case]
    bundle = load_model(tiny_sd1_file)
    pipe = StableDiffusionPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0], unet=bundle.unet,
        scheduler=make_scheduler(**SCHEDULER_BASE), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    ours = huabi_latents(bundle, sampler, schedule, NEGATIVE)
    theirs = diffusers_latents(pipe, bundle, NEGATIVE)
    print(f"relative difference {relative_difference(ours, theirs):.2e}")
    assert relative_difference(ours, theirs) < RELATIVE_TOLERANCE
    [image] = decode_latents(bundle, ours)
    assert image.size == (SIZE_PX, SIZE_PX)


def test_sdxl_txt2img_matches_diffusers(tiny_sdxl_file):
    bundle = load_model(tiny_sdxl_file)
    assert bundle.family is ModelFamily.SDXL
    pipe = StableDiffusionXLPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoders[0], text_encoder_2=bundle.text_encoders[1],
        tokenizer=bundle.tokenizers[0], tokenizer_2=bundle.tokenizers[1], unet=bundle.unet,
        scheduler=CASES["Euler/Karras"][2](**SCHEDULER_BASE), force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    # A1111 zeroes an all-empty SDXL negative; diffusers does so for negative_prompt=None.
    ours = huabi_latents(bundle, "Euler", "Karras", "")
    theirs = diffusers_latents(pipe, bundle, None)
    print(f"relative difference {relative_difference(ours, theirs):.2e}")
    assert relative_difference(ours, theirs) < RELATIVE_TOLERANCE


def test_request_defaults_resolve_to_model_native_size(tiny_sd1_file):
    bundle = load_model(tiny_sd1_file)
    request = GenerationRequest("x")
    assert (request.width_px or bundle.native_size_px) == 512
