"""huabi's samplers against diffusers' schedulers on the same tiny real UNet.

Each case runs diffusers' own loop (recording the timestep values it feeds
the UNet), then huabi's sampler with a denoiser that calls the same UNet at
those timesteps, from the same initial noise, with the scheduler's own sigmas
and (for the stochastic samplers) the very same noise.  Final latents must
agree to the stated tolerance.  Latents here have magnitude up to ~3.
"""

from __future__ import annotations

import math

import diffusers
import pytest
import torch

from huabi.core import samplers as S
from huabi.core.names import SAMPLER_NAMES, SCHEDULE_NAMES
from huabi.core.noise import BrownianNoiseSampler, SeededNoiseSampler, initial_noise
from huabi.core.schedules import DiscreteSchedule, compute_sigmas, scaled_linear_alphas_cumprod
from huabi.errors import HuabiError
from sampler_reference import (
    LATENT_SHAPE,
    ReplayNoise,
    gaussian_denoiser,
    gaussian_ode_solution,
    make_context,
    make_unet,
    predict_eps,
    replay_denoiser,
    run_diffusers,
    vp_to_k_scale,
)

# diffusers' schedulers trip NumPy 2 deprecations thousands of times per run.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Should have t:UserWarning"),  # diffusers' own Brownian tree
]

SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
STEP_SEED = 99


@pytest.fixture(scope="module")
def unet():
    return make_unet()


@pytest.fixture(scope="module")
def context():
    return make_context()


def _start_noise() -> torch.Tensor:
    return initial_noise([2024], LATENT_SHAPE)


def _k_case(scheduler, huabi_fn, unet, context, steps, *, noise=None, **options):
    """Schedulers that work in sigma space (Euler family, DPM2, LMS, DPM++ SDE)."""
    scheduler.set_timesteps(steps)
    sigmas = torch.unique_consecutive(scheduler.sigmas.to(torch.float32))  # Heun/DPM2 interleave theirs
    start = _start_noise() * sigmas[0]
    expected, fed = run_diffusers(scheduler, unet, context, start, STEP_SEED if noise is not None else None)
    denoiser, asked = replay_denoiser(unet, context, fed)
    got = huabi_fn(denoiser, start.clone(), sigmas, noise=noise, **options)
    assert not denoiser.remaining, "huabi made fewer model calls than diffusers"
    return got, expected, asked


def _vp_case(scheduler, huabi_fn, unet, context, steps, sigmas, *, noise=None, **options):
    """Schedulers that work on VP latents: start from pure noise, convert to sigma space.

    The result goes back to VP space at the last sigma (a no-op when it is 0;
    for DDIM's final sigma(t=0) it is the factor sqrt(alphas_cumprod[0])).
    """
    start_vp = _start_noise()
    expected, fed = run_diffusers(scheduler, unet, context, start_vp, STEP_SEED if noise is not None else None)
    denoiser, asked = replay_denoiser(unet, context, fed)
    x = start_vp * vp_to_k_scale(float(sigmas[0]))
    got = huabi_fn(denoiser, x, sigmas, noise=noise, **options) / vp_to_k_scale(float(sigmas[-1]))
    assert not denoiser.remaining, "huabi made fewer model calls than diffusers"
    return got, expected, asked


def _max_diff(a, b) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a - b).abs().max())


def _sigmas_from_alphas(alphas_cumprod: torch.Tensor, timesteps, final_alpha: float | None) -> torch.Tensor:
    a = alphas_cumprod.to(torch.float64)[torch.as_tensor(timesteps).long()]
    sigmas = ((1 - a) / a).sqrt()
    final = 0.0 if final_alpha is None else math.sqrt((1 - final_alpha) / final_alpha)
    return torch.cat([sigmas, torch.tensor([final], dtype=torch.float64)]).to(torch.float32)


# Measured max |diff| (fp32, this machine, latents of magnitude ~2.5) in the
# comments; every bound asserted is 1e-5.


def test_euler_matches_diffusers(unet, context):
    sched = diffusers.EulerDiscreteScheduler(**SD_CONFIG, timestep_spacing="linspace")
    got, expected, _ = _k_case(sched, S.sample_euler, unet, context, 6)
    assert _max_diff(got, expected) < 1e-5  # measured 1.4e-06


def test_euler_karras_matches_diffusers(unet, context):
    sched = diffusers.EulerDiscreteScheduler(**SD_CONFIG, use_karras_sigmas=True)
    got, expected, _ = _k_case(sched, S.sample_euler, unet, context, 5)
    assert _max_diff(got, expected) < 1e-5  # measured 2.5e-06


def test_euler_ancestral_matches_diffusers(unet, context):
    sched = diffusers.EulerAncestralDiscreteScheduler(**SD_CONFIG, timestep_spacing="linspace")
    noise = ReplayNoise(STEP_SEED, (1, *LATENT_SHAPE))
    got, expected, _ = _k_case(sched, S.sample_euler_ancestral, unet, context, 6, noise=noise)
    assert _max_diff(got, expected) < 1e-5  # measured 1.5e-06


def test_heun_matches_diffusers(unet, context):
    sched = diffusers.HeunDiscreteScheduler(**SD_CONFIG, timestep_spacing="linspace")
    got, expected, _ = _k_case(sched, S.sample_heun, unet, context, 5)
    assert _max_diff(got, expected) < 1e-5  # measured 0.0 (bit-identical)


def test_lms_matches_diffusers(unet, context):
    # 8 steps so the full order-4 coefficients are used; diffusers integrates
    # them with scipy quad, we with exact Gauss-Legendre quadrature.
    sched = diffusers.LMSDiscreteScheduler(**SD_CONFIG, timestep_spacing="linspace")
    got, expected, _ = _k_case(sched, S.sample_lms, unet, context, 8)
    assert _max_diff(got, expected) < 1e-5  # measured 2.1e-06


def test_dpm2_matches_diffusers(unet, context):
    sched = diffusers.KDPM2DiscreteScheduler(**SD_CONFIG, timestep_spacing="linspace")
    got, expected, asked = _k_case(sched, S.sample_dpm_2, unet, context, 5)
    assert len(asked) == 2 * 5 - 1
    assert _max_diff(got, expected) < 1e-5  # measured 4.1e-06


def test_dpm2_ancestral_matches_diffusers(unet, context):
    sched = diffusers.KDPM2AncestralDiscreteScheduler(**SD_CONFIG, timestep_spacing="linspace")
    noise = ReplayNoise(STEP_SEED, (1, *LATENT_SHAPE))
    got, expected, _ = _k_case(sched, S.sample_dpm_2_ancestral, unet, context, 5, noise=noise)
    assert _max_diff(got, expected) < 1e-5  # measured 4.8e-06


def test_dpmpp_2m_matches_diffusers(unet, context):
    sched = diffusers.DPMSolverMultistepScheduler(
        **SD_CONFIG, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
    )
    sched.set_timesteps(7)
    got, expected, _ = _vp_case(sched, S.sample_dpmpp_2m, unet, context, 7, sched.sigmas.to(torch.float32))
    assert _max_diff(got, expected) < 1e-5  # measured 2.1e-06


def test_dpmpp_2m_sde_matches_diffusers(unet, context):
    sched = diffusers.DPMSolverMultistepScheduler(
        **SD_CONFIG, algorithm_type="sde-dpmsolver++", solver_order=2, use_exponential_sigmas=True
    )
    sched.set_timesteps(7)
    noise = ReplayNoise(STEP_SEED, (1, *LATENT_SHAPE))
    got, expected, _ = _vp_case(
        sched, S.sample_dpmpp_2m_sde, unet, context, 7, sched.sigmas.to(torch.float32), noise=noise
    )
    assert _max_diff(got, expected) < 1e-5  # measured 3.2e-06


def test_dpmpp_sde_matches_diffusers_with_same_brownian_tree(unet, context):
    sched = diffusers.DPMSolverSDEScheduler(**SD_CONFIG, use_karras_sigmas=True, noise_sampler_seed=31)
    sched.set_timesteps(5)
    sigmas = torch.unique_consecutive(sched.sigmas.to(torch.float32))
    positive = sched.sigmas[sched.sigmas > 0]
    start = _start_noise() * sigmas[0]
    noise = BrownianNoiseSampler(start, positive.min().item(), positive.max().item(), [31])
    expected, fed = run_diffusers(sched, unet, context, start)
    denoiser, _ = replay_denoiser(unet, context, fed)
    got = S.sample_dpmpp_sde(denoiser, start.clone(), sigmas, noise=noise)
    assert not denoiser.remaining
    assert _max_diff(got, expected) < 1e-5  # measured 2.0e-06


def test_ddim_matches_diffusers(unet, context):
    sched = diffusers.DDIMScheduler(
        **SD_CONFIG, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False
    )
    sched.set_timesteps(6)
    a0 = float(sched.alphas_cumprod[0])
    sigmas = _sigmas_from_alphas(sched.alphas_cumprod, sched.timesteps, a0)
    # diffusers returns the VP latent at alphas_cumprod[0]: sigma space times sqrt(a0).
    got, expected, _ = _vp_case(sched, S.sample_ddim, unet, context, 6, sigmas)
    assert _max_diff(got, expected) < 1e-5  # measured 1.7e-06


def test_ddim_with_eta_matches_diffusers(unet, context):
    # eta > 0: diffusers adds std_dev_t * randn per step in VP space; ours is
    # the same step split into sigma_down and sigma_up in sigma space.
    sched = diffusers.DDIMScheduler(
        **SD_CONFIG, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False
    )
    sched.set_timesteps(6)
    sigmas = _sigmas_from_alphas(sched.alphas_cumprod, sched.timesteps, float(sched.alphas_cumprod[0]))
    start_vp = _start_noise()
    generator = torch.Generator("cpu").manual_seed(STEP_SEED)
    latents, fed = start_vp.clone(), []
    with torch.no_grad():
        for t in sched.timesteps:
            fed.append(t)
            eps = predict_eps(unet, latents, t, context)
            latents = sched.step(eps, t, latents, eta=0.5, generator=generator).prev_sample
    denoiser, _ = replay_denoiser(unet, context, fed)
    x = start_vp * vp_to_k_scale(float(sigmas[0]))
    noise = ReplayNoise(STEP_SEED, (1, *LATENT_SHAPE))
    got = S.sample_ddim(denoiser, x, sigmas, noise=noise, eta=0.5) / vp_to_k_scale(float(sigmas[-1]))
    assert noise.calls == 6
    assert _max_diff(got, latents) < 1e-5  # measured 1.7e-06


@pytest.mark.parametrize(
    ("order", "variant", "steps", "final", "measured"),
    [
        (2, "bh2", 7, "zero", 1.1e-6),  # measured max |diff|, last column
        (3, "bh2", 8, "zero", 1.5e-6),
        # diffusers' bh1 returns NaN when the last sigma is 0 (its B(h) = -h is
        # -inf there and is multiplied by a zero residual), so bh1 is compared
        # with final_sigmas_type="sigma_min"; huabi's step to 0 is always first order.
        (3, "bh1", 8, "sigma_min", 1.5e-6),
        (2, "bh1", 6, "sigma_min", 1.6e-6),
    ],
)
def test_unipc_matches_diffusers(unet, context, order, variant, steps, final, measured):
    sched = diffusers.UniPCMultistepScheduler(
        **SD_CONFIG, solver_order=order, solver_type=variant, final_sigmas_type=final
    )
    sched.set_timesteps(steps)
    got, expected, _ = _vp_case(
        sched, S.sample_unipc, unet, context, steps, sched.sigmas.to(torch.float32), order=order, variant=variant
    )
    assert _max_diff(got, expected) < 1e-5


def test_lcm_matches_diffusers(unet, context):
    # diffusers' LCMScheduler applies the consistency-model boundary condition
    # denoised = c_skip * x + c_out * x0 with c_skip = 0.25 / ((10 t)^2 + 0.25),
    # c_out = 10 t / sqrt((10 t)^2 + 0.25); for the timesteps used (t >= 259)
    # c_skip < 4e-8 and 1 - c_out < 2e-8, which k-diffusion/A1111's LCM omit.
    sched = diffusers.LCMScheduler(**SD_CONFIG)
    sched.set_timesteps(4)
    sigmas = _sigmas_from_alphas(sched.alphas_cumprod, sched.timesteps, None)
    noise = ReplayNoise(STEP_SEED, (1, *LATENT_SHAPE))
    got, expected, _ = _vp_case(sched, S.sample_lcm, unet, context, 4, sigmas, noise=noise)
    assert _max_diff(got, expected) < 1e-5  # measured 3.1e-06


# ---------------------------------------------------------------- analytic checks

ALL_FNS = [spec.fn for spec in S.SAMPLERS.values()]


def _sigmas(n: int) -> torch.Tensor:
    sched = DiscreteSchedule(scaled_linear_alphas_cumprod())
    return compute_sigmas("Karras", "Euler", n, sched)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_single_point_data_lands_exactly(name):
    # Data = one point x0: the exact denoiser is constant, every sampler must end on x0.
    x0 = torch.linspace(-1, 1, 2 * 4 * 8 * 8).view(2, 4, 8, 8)
    spec = S.get_sampler(name)
    noise = SeededNoiseSampler([1, 2], (4, 8, 8))
    sigmas = _sigmas(6)
    x = initial_noise([1, 2], (4, 8, 8)) * sigmas[0]
    out = spec.fn(lambda x, sigma: x0.clone(), x, sigmas, noise=noise)
    assert float((out - x0).abs().max()) < 1e-5  # measured <= 6e-8 (LMS), 0 for most


def _gaussian_error(fn, n: int, **options) -> float:
    mu, s = 0.3, 0.5
    sigmas = torch.tensor(
        [math.exp(v) for v in torch.linspace(math.log(10.0), math.log(0.05), n + 1).tolist()], dtype=torch.float64
    )
    x = initial_noise([5], (4, 8, 8), dtype=torch.float64) * sigmas[0] + mu
    out = fn(gaussian_denoiser(mu, s), x, sigmas, **options)
    exact = gaussian_ode_solution(x, float(sigmas[0]), float(sigmas[-1]), mu, s)
    return float((out - exact).abs().max())


@pytest.mark.parametrize(
    ("fn", "min_order"),
    [
        (S.sample_euler, 0.8),
        (S.sample_ddim, 0.8),
        (S.sample_heun, 1.8),
        (S.sample_dpm_2, 1.8),
        (S.sample_lms, 1.8),
        (S.sample_dpmpp_2m, 1.8),
        (S.sample_unipc, 1.8),
    ],
)
def test_convergence_order_on_gaussian_data(fn, min_order):
    # Gaussian data has a closed-form probability-flow ODE; halving the step
    # must shrink the error by about 2**order.
    # 40 -> 80 steps: past the pre-asymptotic range (DPM++ 2M measures 1.68
    # at 10 -> 20 because of its first-order first step; 1.98 here).
    coarse, fine = _gaussian_error(fn, 40), _gaussian_error(fn, 80)
    assert math.log2(coarse / fine) > min_order


def test_unipc_order_3_without_lower_order_final_is_third_order():
    # UniC lifts UniP-3 to order 4 in theory; measured log2 ratio 3.9 at 40 -> 80.
    coarse = _gaussian_error(S.sample_unipc, 40, order=3, lower_order_final=False)
    fine = _gaussian_error(S.sample_unipc, 80, order=3, lower_order_final=False)
    assert math.log2(coarse / fine) > 2.8


@pytest.mark.parametrize(
    "fn", [S.sample_dpmpp_2s_ancestral, S.sample_dpmpp_2m_sde, S.sample_dpmpp_sde, S.sample_euler_ancestral]
)
def test_eta_zero_is_a_convergent_ode_solver(fn):
    # eta = 0 removes the noise; what is left must solve the ODE (2S: second order).
    coarse, fine = _gaussian_error(fn, 10, eta=0.0), _gaussian_error(fn, 20, eta=0.0)
    assert fine < coarse
    if fn in (S.sample_dpmpp_2s_ancestral, S.sample_dpmpp_sde):
        assert math.log2(coarse / fine) > 1.8


def test_dpmpp_2s_ancestral_matches_float64_rederivation():
    # Independent re-derivation of one DPM++ 2S a step for Gaussian data in
    # float64: lambda-midpoint exponential-integrator step then ancestral noise.
    mu, s = 0.3, 0.5
    den = gaussian_denoiser(mu, s)
    sigmas = torch.tensor([8.0, 2.0], dtype=torch.float64)
    x = initial_noise([3], (4, 8, 8), dtype=torch.float64) * 8.0
    fresh = initial_noise([4], (4, 8, 8), dtype=torch.float64)
    out = S.sample_dpmpp_2s_ancestral(den, x, sigmas, noise=lambda a, b: fresh)
    sigma_up = math.sqrt(2.0**2 * (8.0**2 - 2.0**2) / 8.0**2)
    sigma_down = math.sqrt(2.0**2 - sigma_up**2)
    sigma_mid = math.sqrt(8.0 * sigma_down)
    d0 = mu + (x - mu) * s**2 / (s**2 + 64.0)
    x_mid = d0 + (x - d0) * (sigma_mid / 8.0)
    d1 = mu + (x_mid - mu) * s**2 / (s**2 + sigma_mid**2)
    want = d1 + (x - d1) * (sigma_down / 8.0) + fresh * sigma_up
    assert float((out - want).abs().max()) < 1e-12


# ---------------------------------------------------------------- registry and end to end


def test_registry_matches_names_both_ways():
    assert set(S.SAMPLERS) == set(SAMPLER_NAMES)
    for name, spec in S.SAMPLERS.items():
        assert spec.name == name
        assert spec.default_schedule in SCHEDULE_NAMES and spec.default_schedule != "Automatic"


def test_get_sampler_accepts_aliases_and_rejects_unknown():
    assert S.get_sampler("k_dpmpp_2m").name == "DPM++ 2M"
    assert S.get_sampler("euler A").name == "Euler a"
    with pytest.raises(HuabiError, match=r"sampler: unknown sampler 'Bogus'; valid: Euler, Euler a, .*LCM"):
        S.get_sampler("Bogus")


def test_ancestral_sampler_without_noise_is_an_error():
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(HuabiError, match=r"noise: sampler 'Euler a' needs a noise sampler"):
        S.sample_euler_ancestral(lambda x, s: x, x, torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize(
    ("sigmas", "message"),
    [
        (torch.tensor([1.0]), "sigmas: must be a 1-D tensor of at least 2 noise levels"),
        (torch.tensor([1.0, 2.0, 0.0]), "sigmas: noise levels must not increase"),
        (torch.tensor([1.0, float("nan")]), "sigmas: every noise level must be finite and >= 0"),
        (torch.tensor([0.0, 0.0]), "sigmas: the first noise level must be > 0"),
    ],
)
def test_bad_sigmas_are_named(sigmas, message):
    with pytest.raises(HuabiError, match=message):
        S.sample_euler(lambda x, s: x, torch.zeros(1, 4, 8, 8), sigmas)


def test_bad_options_are_named():
    x, sig = torch.zeros(1, 4, 8, 8), torch.tensor([1.0, 0.0])
    with pytest.raises(HuabiError, match="variant: UniPC variant must be 'bh1' or 'bh2', got 'bh3'"):
        S.sample_unipc(lambda x, s: x, x, sig, variant="bh3")
    with pytest.raises(HuabiError, match="order: UniPC order must be >= 1, got 0"):
        S.sample_unipc(lambda x, s: x, x, sig, order=0)
    with pytest.raises(HuabiError, match="order: LMS order must be >= 1, got 0"):
        S.sample_lms(lambda x, s: x, x, sig, order=0)
    with pytest.raises(HuabiError, match="x: must be a latent batch tensor"):
        S.sample_euler(lambda x, s: x, torch.zeros(3), sig)


def test_on_step_reports_every_step():
    seen = []
    sigmas = _sigmas(4)
    S.sample_dpmpp_2m(lambda x, s: x * 0, torch.ones(1, 4, 8, 8) * sigmas[0], sigmas, on_step=lambda *a: seen.append(a))
    assert [(i, total) for i, total, _, _ in seen] == [(0, 4), (1, 4), (2, 4), (3, 4)]


def _unet_denoiser(unet, context, schedule: DiscreteSchedule):
    def denoiser(x, sigma):
        t = schedule.sigma_to_t(sigma.cpu()).to(torch.float32)
        sigma_b = sigma.to(x.dtype).view(-1, 1, 1, 1)
        with torch.no_grad():
            eps = unet(x / (sigma_b**2 + 1) ** 0.5, t, encoder_hidden_states=context.expand(x.shape[0], -1, -1)).sample
        return x - sigma_b * eps

    return denoiser


@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
@pytest.mark.parametrize("sampler_name", SAMPLER_NAMES)
def test_every_sampler_with_every_schedule_runs_on_the_unet(unet, context, sampler_name, schedule_name):
    schedule = DiscreteSchedule(scaled_linear_alphas_cumprod())
    spec = S.get_sampler(sampler_name)
    sigmas = compute_sigmas(schedule_name, sampler_name, 3, schedule)
    assert len(sigmas) == 4
    seeds = [11, 12]
    x = initial_noise(seeds, LATENT_SHAPE) * sigmas[0]
    if spec.brownian:
        noise = BrownianNoiseSampler.for_sigmas(x, sigmas, seeds)
    else:
        noise = SeededNoiseSampler(seeds, LATENT_SHAPE)
    out = spec.fn(_unet_denoiser(unet, context, schedule), x, sigmas, noise=noise)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_samplers_keep_x_dtype_and_device(dtype):
    sigmas = _sigmas(3)
    x = initial_noise([1], (4, 8, 8), dtype=dtype) * sigmas[0].to(dtype)
    for name in SAMPLER_NAMES:
        spec = S.get_sampler(name)
        if spec.brownian:
            noise = BrownianNoiseSampler(x, float(sigmas[-2]), float(sigmas[0]), [1])
        else:
            noise = SeededNoiseSampler([1], (4, 8, 8), dtype=dtype)
        out = spec.fn(gaussian_denoiser(0.0, 0.5), x, sigmas, noise=noise)
        assert out.dtype == dtype and out.device == x.device and torch.isfinite(out).all(), name
