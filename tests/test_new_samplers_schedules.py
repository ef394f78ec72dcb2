"""DPM++ 3M SDE, the Beta / Align Your Steps / KL Optimal schedules and ComfyUI's names (issue 14).

References, all independent of huabi's code:
- DPM++ 3M SDE at eta = 0 is DPM-Solver++(3M): diffusers' third-order multistep
  (``solver_order=3``, ``solver_type="heun"`` for the second-order start) on the same UNet.
  At eta = 1 the first- and second-order steps (and the noise) are checked against diffusers'
  ``sde-dpmsolver++`` on a three-step run. diffusers' *third*-order SDE update is not used: its
  D2 term carries ``- 0.5`` where k-diffusion's ``sample_dpmpp_3m_sde`` (what A1111 runs) has
  ``+ 0.5`` (``x + phi_2 d1 - phi_3 d2``, ``phi_3 = phi_2 / h_eta - 0.5``); huabi follows k-diffusion,
  whose third-order term is exactly the ODE's with h replaced by h_eta, which the eta = 0 check covers.
  k-diffusion itself is not installed: its PyPI package requires torchvision, which would replace
  the pinned torch.
- Beta: diffusers' ``use_beta_sigmas`` (the same formula as A1111's beta_scheduler).
- Align Your Steps: the tables in diffusers' ``AysSchedules`` and NVIDIA's log-linear
  interpolation, re-done here with numpy.
- KL Optimal: the arctan formula, in float64 numpy.
"""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch

import huabi.core.samplers as S
from huabi.core.names import SAMPLER_NAMES, SCHEDULE_NAMES, canonical_sampler_name, canonical_schedule_name
from huabi.core.noise import initial_noise
from huabi.core.schedules import (
    AYS_SIGMAS_SD1,
    AYS_SIGMAS_SDXL,
    DiscreteSchedule,
    compute_sigmas,
    sigmas_align_your_steps,
    sigmas_beta,
    sigmas_kl_optimal,
)
from sampler_reference import LATENT_SHAPE, ReplayNoise, make_context, make_unet, replay_denoiser, run_diffusers, vp_to_k_scale

SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
STEP_SEED = 99


@pytest.fixture(scope="module")
def unet():
    return make_unet()


@pytest.fixture(scope="module")
def context():
    return make_context()


@pytest.fixture(scope="module")
def schedule() -> DiscreteSchedule:
    return DiscreteSchedule(diffusers.EulerDiscreteScheduler(**SD_CONFIG).alphas_cumprod)


def _vp_run(scheduler, unet, context, *, noise=None, **options):
    """diffusers' loop on VP latents vs huabi's 3M SDE on the same UNet calls (sigma space)."""
    sigmas = scheduler.sigmas.to(torch.float32)
    start_vp = initial_noise([2024], LATENT_SHAPE)
    expected, fed = run_diffusers(scheduler, unet, context, start_vp, STEP_SEED if noise is not None else None)
    denoiser, _asked = replay_denoiser(unet, context, fed)
    got = S.sample_dpmpp_3m_sde(denoiser, start_vp * vp_to_k_scale(float(sigmas[0])), sigmas, noise=noise, **options)
    assert not denoiser.remaining
    return got / vp_to_k_scale(float(sigmas[-1])), expected


def test_dpmpp_3m_at_eta_0_matches_diffusers_third_order(unet, context):
    # 16 steps: diffusers drops to lower orders near the end only below 15 steps (except the last).
    scheduler = diffusers.DPMSolverMultistepScheduler(**SD_CONFIG, algorithm_type="dpmsolver++", solver_order=3,
                                                      solver_type="heun", use_exponential_sigmas=True)
    scheduler.set_timesteps(16)
    got, expected = _vp_run(scheduler, unet, context, eta=0.0)
    assert float((got - expected).abs().max()) < 1e-5  # measured ~2e-6


def test_dpmpp_3m_sde_first_and_second_order_steps_match_diffusers_sde(unet, context):
    scheduler = diffusers.DPMSolverMultistepScheduler(**SD_CONFIG, algorithm_type="sde-dpmsolver++", solver_order=3,
                                                      solver_type="heun", use_exponential_sigmas=True)
    scheduler.set_timesteps(3)  # first order, second order, then the step to 0
    noise = ReplayNoise(STEP_SEED, (1, *LATENT_SHAPE))
    got, expected = _vp_run(scheduler, unet, context, noise=noise, eta=1.0)
    assert noise.calls == 2
    assert float((got - expected).abs().max()) < 1e-5


def test_dpmpp_3m_sde_is_registered_like_a1111(schedule):
    spec = S.get_sampler("DPM++ 3M SDE")
    assert spec.fn is S.sample_dpmpp_3m_sde and spec.default_schedule == "Exponential"
    assert spec.needs_noise and spec.brownian and spec.discard_penultimate_sigma
    sigmas = compute_sigmas("Automatic", "DPM++ 3M SDE", 10, schedule)
    assert sigmas.numel() == 11 and float(sigmas[-1]) == 0.0
    with pytest.raises(Exception, match="needs a noise sampler"):
        S.sample_dpmpp_3m_sde(lambda x, s: x, torch.zeros(1, 4, 2, 2), sigmas)


def test_dpmpp_3m_sde_lands_on_single_point_data():
    target = torch.full((1, 4, 2, 2), 0.25)
    sigmas = torch.tensor([14.6, 5.0, 2.0, 0.7, 0.2, 0.0])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 2, 2, generator=generator) * 14.6
    out = S.sample_dpmpp_3m_sde(lambda latent, sigma: target.clone(), x, sigmas,
                                noise=lambda a, b: torch.randn(1, 4, 2, 2, generator=generator))
    assert torch.allclose(out, target)


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("n", [2, 4, 10, 25])
def test_beta_matches_diffusers(schedule, n):
    # (n = 1 is left out: diffusers derives sigma_max from its one-step timesteps, giving sigma_min;
    # A1111 uses the model's sigma_max, checked below.)
    scheduler = diffusers.EulerDiscreteScheduler(**SD_CONFIG, use_beta_sigmas=True)
    scheduler.set_timesteps(n)
    expected = scheduler.sigmas.to(torch.float64)
    got = sigmas_beta(n, schedule.sigma_min, schedule.sigma_max).to(torch.float64)
    assert got.shape == expected.shape and float(got[-1]) == 0.0
    assert float(((got - expected).abs() / expected.clamp(min=1e-6))[:-1].max()) < 1e-5


def test_beta_one_step_starts_at_sigma_max(schedule):
    assert sigmas_beta(1, schedule.sigma_min, schedule.sigma_max).tolist() == pytest.approx([schedule.sigma_max, 0.0])


def _nvidia_loglinear(table, n):
    xs = np.linspace(0, 1, len(table))
    ys = np.log(np.asarray(table, dtype=np.float64)[::-1])
    return np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1]


@pytest.mark.parametrize("sdxl", [False, True])
@pytest.mark.parametrize("n", [5, 10, 11, 20, 30])
def test_align_your_steps_tables_and_interpolation(sdxl, n):
    from diffusers.schedulers import AysSchedules

    published = AysSchedules["StableDiffusionXLSigmas" if sdxl else "StableDiffusionSigmas"]
    table = AYS_SIGMAS_SDXL if sdxl else AYS_SIGMAS_SD1
    assert list(table[:-1]) == published[:-1]  # diffusers ends its copy with 0, A1111 with sigma_min 0.029
    assert table[-1] == 0.029
    expected = np.append(np.asarray(table) if n == 11 else _nvidia_loglinear(table, n), 0.0)
    got = sigmas_align_your_steps(n, sdxl=sdxl).double().numpy()
    assert got.shape == (n + 1,)
    np.testing.assert_allclose(got, expected.astype(np.float32), rtol=1e-6, atol=0)


def test_align_your_steps_follows_the_model_family(schedule):
    sd1 = compute_sigmas("Align Your Steps", "Euler", 10, schedule)
    sdxl = compute_sigmas("Align Your Steps", "Euler", 10, schedule, sdxl=True)
    assert not torch.equal(sd1, sdxl) and torch.equal(sdxl, sigmas_align_your_steps(10, sdxl=True))


@pytest.mark.parametrize("n", [1, 7, 20])
def test_kl_optimal_formula(schedule, n):
    got = sigmas_kl_optimal(n, schedule.sigma_min, schedule.sigma_max).double().numpy()
    steps = np.arange(n + 1) / n
    expected = np.tan(steps * math.atan(schedule.sigma_min) + (1 - steps) * math.atan(schedule.sigma_max))
    np.testing.assert_allclose(got, expected.astype(np.float32), rtol=1e-6)
    assert got[0] == pytest.approx(schedule.sigma_max, rel=1e-6)
    assert got[-1] == pytest.approx(schedule.sigma_min, rel=1e-6)  # A1111: the last step ends at sigma_min


@pytest.mark.parametrize("name", ["Beta", "Align Your Steps", "KL Optimal"])
def test_new_schedules_run_every_sampler(schedule, name):
    for sampler in SAMPLER_NAMES:
        if sampler == "DDIM":
            continue  # DDIM has its own timesteps
        sigmas = compute_sigmas(name, sampler, 6, schedule)
        assert sigmas.dtype == torch.float32 and bool((sigmas[1:] <= sigmas[:-1]).all())


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("comfy, ours", [
    ("euler", "Euler"), ("euler_ancestral", "Euler a"), ("heun", "Heun"), ("lms", "LMS"), ("dpm_2", "DPM2"),
    ("dpm_2_ancestral", "DPM2 a"), ("dpmpp_2s_ancestral", "DPM++ 2S a"), ("dpmpp_sde", "DPM++ SDE"),
    ("dpmpp_sde_gpu", "DPM++ SDE"), ("dpmpp_2m", "DPM++ 2M"), ("dpmpp_2m_sde", "DPM++ 2M SDE"),
    ("dpmpp_2m_sde_gpu", "DPM++ 2M SDE"), ("dpmpp_3m_sde", "DPM++ 3M SDE"), ("dpmpp_3m_sde_gpu", "DPM++ 3M SDE"),
    ("ddim", "DDIM"), ("uni_pc", "UniPC"), ("lcm", "LCM"), ("k_dpmpp_3m_sde", "DPM++ 3M SDE"),
])
def test_comfyui_sampler_names_are_aliases(comfy, ours):
    assert canonical_sampler_name(comfy) == ours
    assert S.get_sampler(comfy).name == ours


@pytest.mark.parametrize("comfy, ours", [
    ("normal", "Normal"), ("karras", "Karras"), ("exponential", "Exponential"), ("sgm_uniform", "SGM Uniform"),
    ("simple", "Simple"), ("ddim_uniform", "DDIM"), ("beta", "Beta"), ("kl_optimal", "KL Optimal"),
    ("align_your_steps", "Align Your Steps"),
])
def test_comfyui_schedule_names_are_aliases(comfy, ours):
    assert canonical_schedule_name(comfy) == ours
    assert ours in SCHEDULE_NAMES


def test_generate_request_accepts_the_new_names():
    from huabi.core.request import GenerationRequest

    request = GenerationRequest("a cat", sampler="dpmpp_3m_sde_gpu", schedule="kl_optimal")
    assert (request.sampler, request.schedule) == ("DPM++ 3M SDE", "KL Optimal")
