"""SDXL refiner hand-over: against diffusers' base + refiner pipelines, switch rule, family checks, CLI round trip."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from cli_runner import run
from huabi.core.infotext import parse_infotext, request_from_infotext
from huabi.core.request import GenerationRequest
from huabi.core.schedules import DiscreteSchedule
from huabi.errors import HuabiError
from huabi.models.family import ModelFamily
from huabi.models.load import load_model
from huabi.pipelines.common import denoise, encode_guidance, latent_shape
from huabi.pipelines.hires import hires_txt2img
from huabi.pipelines.refiner import HandoverDenoiser, RefinerStage, check_refiner_pair, completed_ratio
from huabi.pipelines.txt2img import txt2img
from huabi.service.pngio import read_infotext

CPU = torch.device("cpu")
SIZE_PX = 64
PROMPT, NEGATIVE = "a lighthouse at dusk", "blurry"
# Measured max|ours - theirs| / max|theirs| = 2.7e-6 (Euler, "Simple" = diffusers' trailing spacing, 10 steps,
# switch 0.8, seed 21); asserted below the txt2img comparison's bound.
RELATIVE_TOLERANCE = 2e-5


@pytest.fixture(scope="module")
def refiner_file(tiny_model_factory) -> Path:
    return tiny_model_factory(ModelFamily.SDXL_REFINER)


@pytest.fixture(scope="module")
def base(tiny_sdxl_file):
    return load_model(tiny_sdxl_file, device=CPU, dtype=torch.float32)


@pytest.fixture(scope="module")
def refiner(refiner_file):
    bundle = load_model(refiner_file, device=CPU, dtype=torch.float32)
    assert bundle.family is ModelFamily.SDXL_REFINER
    return bundle


def ours(base, stage, *, sampler="Euler", schedule="Simple", steps=10, seed=21, cfg=5.0):
    guidance = encode_guidance(base, PROMPT, NEGATIVE, clip_skip=1, width_px=SIZE_PX, height_px=SIZE_PX, device=CPU)
    return denoise(base, guidance, sampler_name=sampler, schedule_name=schedule, steps=steps, cfg_scale=cfg,
                   seeds=[seed], shape=latent_shape(base, SIZE_PX, SIZE_PX), device=CPU, refiner=stage)


def test_matches_diffusers_base_then_refiner(base, refiner):
    """diffusers' documented ensemble-of-experts: the base pipeline with denoising_end=0.8 hands its noisy
    latent to StableDiffusionXLImg2ImgPipeline with denoising_start=0.8 (aesthetic scores 6 / 2.5). With
    trailing timesteps 999, 899, ..., 99 the cut at t < 200 is where A1111's ratio (999 - t) / 1000 reaches 0.8."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    def scheduler():
        return EulerDiscreteScheduler(timestep_spacing="trailing", beta_start=0.00085, beta_end=0.012,
                                      beta_schedule="scaled_linear")

    base_pipe = StableDiffusionXLPipeline(
        vae=base.vae, text_encoder=base.text_encoders[0], text_encoder_2=base.text_encoders[1],
        tokenizer=base.tokenizers[0], tokenizer_2=base.tokenizers[1], unet=base.unet, scheduler=scheduler(),
    )
    refiner_pipe = StableDiffusionXLImg2ImgPipeline(
        vae=refiner.vae, text_encoder=None, text_encoder_2=refiner.text_encoders[0], tokenizer=None,
        tokenizer_2=refiner.tokenizers[0], unet=refiner.unet, scheduler=scheduler(), requires_aesthetics_score=True,
    )
    for pipe in (base_pipe, refiner_pipe):
        pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(21))
    with torch.inference_mode():
        handed = base_pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=5.0,
                           height=SIZE_PX, width=SIZE_PX, latents=noise, denoising_end=0.8,
                           output_type="latent").images
        theirs = refiner_pipe(PROMPT, negative_prompt=NEGATIVE, image=handed, num_inference_steps=10,
                              guidance_scale=5.0, denoising_start=0.8, output_type="latent").images
    mine = ours(base, RefinerStage(refiner, 0.8, PROMPT, NEGATIVE))
    relative = ((mine - theirs).abs().max() / theirs.abs().max()).item()
    print(f"relative difference {relative:.2e}")
    assert relative < RELATIVE_TOLERANCE
    # And the refiner really did something: base alone ends elsewhere.
    alone = ours(base, None)
    assert ((alone - theirs).abs().max() / theirs.abs().max()).item() > 1e-2


def test_switch_at_one_is_the_base_alone_exactly(base, refiner):
    assert torch.equal(ours(base, RefinerStage(refiner, 1.0, PROMPT, NEGATIVE)), ours(base, None))


def test_completed_ratio_is_a1111s():
    table = DiscreteSchedule(load_alphas())
    assert completed_ratio(table, table.sigmas[199]).item() == pytest.approx(0.8)
    assert completed_ratio(table, table.sigmas[999]).item() == pytest.approx(0.0)
    assert completed_ratio(table, table.sigmas[0]).item() == pytest.approx(0.999)
    # Compared in float32 as A1111's tensors are: t = 299 reaches a switch at 0.7.
    assert bool(completed_ratio(table, table.sigmas[299]) >= 0.7)


def load_alphas() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


class _Counter:
    def __init__(self, value: float):
        self.value, self.step, self.sigmas = value, 0, []

    def __call__(self, x, sigma):
        self.step += 1
        self.sigmas.append(float(sigma))
        return torch.full_like(x, self.value)


@pytest.mark.parametrize("sampler", ["Euler", "Heun", "DPM++ 2M", "Euler a", "DPM++ SDE"])
def test_hand_over_at_first_call_past_the_switch(sampler):
    """Any sampler: the refiner answers from the first denoiser call whose ratio reaches the switch, never the
    base after it; second-order samplers may switch between the two calls of a step (checked per call)."""
    from huabi.core.noise import BrownianNoiseSampler, SeededNoiseSampler
    from huabi.core.samplers import get_sampler
    from huabi.core.schedules import compute_sigmas

    table = DiscreteSchedule(load_alphas())
    sigmas = compute_sigmas("Automatic", sampler, 12, table)
    base_part, refiner_part = _Counter(0.0), _Counter(1.0)
    denoiser = HandoverDenoiser(base_part, refiner_part, 0.55, table)
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    spec = get_sampler(sampler)
    noise = (BrownianNoiseSampler.for_sigmas(x, sigmas, [1]) if spec.brownian
             else SeededNoiseSampler([1], (4, 2, 2), device=CPU, dtype=torch.float32))
    spec.fn(denoiser, x, sigmas, noise=noise, on_step=None)
    calls = base_part.sigmas + refiner_part.sigmas
    ratios = [completed_ratio(table, torch.tensor(s)).item() for s in calls]
    first = next(i for i, r in enumerate(ratios) if r >= 0.55)
    assert denoiser.switched_at_call == first == len(base_part.sigmas)
    assert all(r < 0.55 for r in ratios[:first])
    assert refiner_part.step == len(calls)  # the prompt-schedule clock continued from the base's count
    if sampler == "Heun":  # calls 2i, 2i + 1 per step: here the refiner takes step 6's corrector call
        assert denoiser.switched_at_call == 13


def test_family_checks(base, refiner, tiny_sd1_file):
    with pytest.raises(HuabiError, match=r"^refiner: tiny_sdxl_base_epsilon is a sdxl model, not an SDXL refiner$"):
        check_refiner_pair(base, base)
    sd1 = load_model(tiny_sd1_file, compute_hash=False)
    with pytest.raises(HuabiError, match=r"^refiner: the base model tiny_sd1_base_epsilon is sd1; the SDXL refiner "
                                         r"continues SDXL models only$"):
        check_refiner_pair(sd1, refiner)
    with pytest.raises(HuabiError, match=r"^refiner switch at: must be a number above 0 and at most 1, got 0$"):
        RefinerStage(refiner, 0, PROMPT)
    with pytest.raises(HuabiError, match=r"^refiner_switch_at: must be a number above 0 and at most 1, got 1.5$"):
        GenerationRequest(prompt="x", refiner="r", refiner_switch_at=1.5)


def test_txt2img_and_hires_hand_over(base, refiner):
    request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, steps=4, sampler="Euler", seed=3,
                                width_px=SIZE_PX, height_px=SIZE_PX, hires=True, hires_scale=1.5, hires_denoise=0.6)
    late = RefinerStage(refiner, 1.0, PROMPT, NEGATIVE)
    stage = RefinerStage(refiner, 0.8, PROMPT, NEGATIVE)
    plain = txt2img(base, request, [3], device=CPU).images[0]
    assert txt2img(base, request, [3], device=CPU, refiner=late).images[0].tobytes() == plain.tobytes()
    assert txt2img(base, request, [3], device=CPU, refiner=stage).images[0].tobytes() != plain.tobytes()
    hires_plain = hires_txt2img(base, request, [3], device=CPU).images[0]
    hires_refined = hires_txt2img(base, request, [3], device=CPU, refiner=stage).images[0]
    assert hires_refined.size == (96, 96) and hires_refined.tobytes() != hires_plain.tobytes()
    # A1111's other "Hires fix: which pass to enable refiner for" choices.
    first = hires_txt2img(base, request.replace(refiner_hires_pass="first pass"), [3], device=CPU, refiner=stage)
    both = hires_txt2img(base, request.replace(refiner_hires_pass="both passes"), [3], device=CPU, refiner=stage)
    outputs = {image.tobytes() for image in (hires_plain, hires_refined, first.images[0], both.images[0])}
    assert len(outputs) == 4


def test_hires_refiner_pass_in_infotext():
    text = ("a\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, Denoising strength: 0.5, "
            "Hires upscale: 2, Hires upscaler: Latent, Hires refiner: both passes, Refiner: r [0123456789], "
            "Refiner switch at: 0.7, Version: v1.10.1")
    request = request_from_infotext(text)
    assert (request.refiner, request.refiner_switch_at, request.refiner_hires_pass) == ("0123456789", 0.7, "both passes")
    with pytest.raises(HuabiError, match=r"^refiner_hires_pass: must be one of first pass, second pass, both passes, "
                                         r"got 'third pass'$"):
        request_from_infotext(text.replace("both passes", "third pass"))


def test_cli_generate_and_edit_with_refiner_round_trip(capsys, tiny_sdxl_file, refiner_file, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_sdxl_file, models / "base.safetensors")
    shutil.copy(refiner_file, models / "refiner.safetensors")
    common = ("--models-dir", models, "--quiet", "--steps", "3", "--sampler", "Heun", "--size", "64x64")
    code, out, err = run(capsys, "generate", PROMPT, "--model", "base", "--refiner", "refiner",
                         "--refiner-switch-at", "0.6", "--seed", "8", "--out", tmp_path / "a", "--hires-scale", "1.5",
                         "--hires-denoise", "0.5", "--refiner-hires-pass", "both", *common)
    assert code == 0, err
    [first] = [Path(line) for line in out.splitlines()]
    params = parse_infotext(read_infotext(first)).params
    assert params["Refiner switch at"] == "0.6" and params["Hires refiner"] == "both passes"
    assert Image.open(first).size == (96, 96)
    name, _, hashed = params["Refiner"].partition(" [")
    assert name == "refiner" and len(hashed.rstrip("]")) == 10
    assert request_from_infotext(read_infotext(first)).refiner == hashed.rstrip("]")
    code, out, err = run(capsys, "generate", "--from", first, "--out", tmp_path / "b", "--models-dir", models, "--quiet")
    assert code == 0, err
    [again] = [Path(line) for line in out.splitlines()]
    assert Image.open(again).tobytes() == Image.open(first).tobytes()
    assert read_infotext(again) == read_infotext(first)

    # img2img with the refiner, and edit --from redoes it.
    code, out, err = run(capsys, "edit", first, "a red lighthouse", "--model", "base", "--refiner", "refiner",
                         "--strength", "0.7", "--seed", "2", "--out", tmp_path / "c", *common)
    assert code == 0, err
    [edited] = [Path(line) for line in out.splitlines()]
    edited_params = parse_infotext(read_infotext(edited)).params
    assert edited_params["Refiner switch at"] == "0.8" and "Hires refiner" not in edited_params
    code, out, err = run(capsys, "edit", first, "--from", edited, "--out", tmp_path / "d", "--models-dir", models,
                         "--quiet")
    assert code == 0, err
    [redone] = [Path(line) for line in out.splitlines()]
    assert Image.open(redone).tobytes() == Image.open(edited).tobytes()


def test_cli_refiner_errors(capsys, tiny_sdxl_file, refiner_file, tmp_path):
    """One-line errors; the family rules themselves are checked in test_family_checks."""
    cases = [
        (("--refiner", tmp_path / "none.safetensors"),
         f"huabi: error: refiner: {tmp_path / 'none.safetensors'}: no such file"),
        (("--refiner", "0123456789ab"),  # e.g. an A1111 image's refiner hash that is not in the models folder
         f"huabi: error: refiner: no model named or hashed '0123456789ab' in {tmp_path} (it holds no models); "
         "pass --refiner PATH"),
        (("--refiner", tiny_sdxl_file),
         "huabi: error: refiner: tiny_sdxl_base_epsilon is a sdxl model, not an SDXL refiner"),
        (("--refiner", refiner_file, "--refiner-switch-at", "0"),
         "huabi: error: --refiner-switch-at: must be a number above 0 and at most 1, got 0.0"),
    ]
    for extra, message in cases:
        code, _out, err = run(capsys, "generate", "x", "--steps", "1", "--size", "64x64", "--quiet",
                              "--out", tmp_path, "--models-dir", tmp_path, "--model", tiny_sdxl_file, *extra)
        assert code == 2 and err.strip() == message, err
