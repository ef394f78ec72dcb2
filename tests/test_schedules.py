"""Schedules against diffusers' scheduler configurations and A1111's definitions."""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch

from huabi.core.names import SAMPLER_NAMES, SCHEDULE_NAMES
from huabi.core.schedules import (
    DiscreteSchedule,
    compute_sigmas,
    default_schedule_for,
    scaled_linear_alphas_cumprod,
    sigmas_ddim_uniform,
    sigmas_exponential,
    sigmas_karras,
    sigmas_normal,
    sigmas_sgm_uniform,
    sigmas_simple,
)
from huabi.errors import HuabiError

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# n = 1 is left out of the diffusers comparisons: diffusers' single step starts
# at sigma_min (its linspace(0, 999, 1) is [0]); ours starts at sigma_max like
# k-diffusion and A1111, see test_one_step_starts_at_sigma_max.
STEP_COUNTS = [2, 4, 7, 10, 20, 25, 50]


@pytest.fixture(scope="module")
def diffusers_schedule() -> DiscreteSchedule:
    """The schedule built from diffusers' own (float32) alphas_cumprod, so both sides start equal."""
    return DiscreteSchedule(diffusers.EulerDiscreteScheduler(**SD_CONFIG).alphas_cumprod)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(torch.float64), b.to(torch.float64)
    scale = b.abs().clamp(min=1e-12)
    return float(((a - b).abs() / scale)[b != 0].max()) if bool((b != 0).any()) else 0.0


def test_scaled_linear_alphas_cumprod_matches_diffusers():
    ours = scaled_linear_alphas_cumprod()
    theirs = diffusers.EulerDiscreteScheduler(**SD_CONFIG).alphas_cumprod
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    # diffusers accumulates in float32; measured max relative difference 3.5e-6.
    assert _rel(theirs, ours) < 2e-5


def test_discrete_schedule_sigmas(diffusers_schedule):
    sched = diffusers_schedule
    a = sched.alphas_cumprod
    assert torch.allclose(sched.sigmas, ((1 - a) / a).sqrt(), rtol=0, atol=0)
    assert sched.sigma_min == pytest.approx(0.02916753, rel=1e-6)
    assert sched.sigma_max == pytest.approx(14.6146412, rel=1e-6)
    assert sched.t_max == 999


def test_sigma_to_t_round_trips_and_matches_diffusers(diffusers_schedule):
    sched = diffusers_schedule
    t = torch.tensor([0.0, 0.25, 1.0, 17.5, 500.0, 998.9, 999.0], dtype=torch.float64)
    sigma = sched.t_to_sigma(t)
    assert torch.allclose(sched.sigma_to_t(sigma), t, rtol=0, atol=1e-9)
    # Integer timesteps give the trained sigmas exactly.
    assert torch.allclose(sched.t_to_sigma(torch.arange(1000.0)), sched.sigmas, rtol=1e-14, atol=0)
    # diffusers' _sigma_to_t uses the same log-sigma interpolation.
    ref = diffusers.EulerDiscreteScheduler(**SD_CONFIG)
    probe = np.array([0.05, 0.3, 1.0, 4.2, 14.0])
    theirs = ref._sigma_to_t(probe, np.log(sched.sigmas.numpy()))
    assert np.allclose(sched.sigma_to_t(torch.from_numpy(probe)).numpy(), theirs, rtol=0, atol=1e-9)


def test_sigma_to_t_clamps_outside_the_trained_range(diffusers_schedule):
    sched = diffusers_schedule
    assert float(sched.sigma_to_t(0.0)) == 0.0
    assert float(sched.sigma_to_t(1e-6)) == 0.0
    assert float(sched.sigma_to_t(1e6)) == 999.0
    assert float(sched.t_to_sigma(-5.0)) == pytest.approx(sched.sigma_min)
    assert float(sched.t_to_sigma(5000.0)) == pytest.approx(sched.sigma_max)


@pytest.mark.parametrize("n", STEP_COUNTS)
def test_karras_matches_diffusers(diffusers_schedule, n):
    ref = diffusers.EulerDiscreteScheduler(**SD_CONFIG, use_karras_sigmas=True)
    ref.set_timesteps(n)
    ours = sigmas_karras(n, diffusers_schedule.sigma_min, diffusers_schedule.sigma_max)
    assert ours.dtype == torch.float32 and ours.shape == (n + 1,) and float(ours[-1]) == 0.0
    assert _rel(ours, ref.sigmas) < 1e-6  # measured 1.3e-7 (float32 rounding)


@pytest.mark.parametrize("n", STEP_COUNTS)
def test_exponential_matches_diffusers(diffusers_schedule, n):
    ref = diffusers.EulerDiscreteScheduler(**SD_CONFIG, use_exponential_sigmas=True)
    ref.set_timesteps(n)
    ours = sigmas_exponential(n, diffusers_schedule.sigma_min, diffusers_schedule.sigma_max)
    assert ours.shape == (n + 1,) and float(ours[-1]) == 0.0
    assert _rel(ours, ref.sigmas) < 1e-6  # measured 1.2e-7


@pytest.mark.parametrize("n", STEP_COUNTS)
def test_normal_matches_diffusers_linspace(diffusers_schedule, n):
    ref = diffusers.EulerDiscreteScheduler(**SD_CONFIG, timestep_spacing="linspace")
    ref.set_timesteps(n)
    ours = sigmas_normal(n, diffusers_schedule)
    assert ours.shape == (n + 1,) and float(ours[-1]) == 0.0
    # Same timesteps (measured |dt| <= 3.6e-5, float32 sigmas) ...
    t = diffusers_schedule.sigma_to_t(ours[:-1].double())
    assert torch.allclose(t, ref.timesteps.double(), rtol=0, atol=1e-4)
    # ... but between integer timesteps diffusers interpolates sigma linearly
    # and we (like k-diffusion and A1111) log-sigma: the sigmas differ by up to
    # 7.3e-5 relative at n = 50 (4.8e-4 at n = 150), largest near t = 0 where
    # the trained sigma changes fastest.
    assert _rel(ours, ref.sigmas) < 1e-4


@pytest.mark.parametrize("n", STEP_COUNTS)
def test_ddim_uniform_matches_diffusers_ddim(diffusers_schedule, n):
    ref = diffusers.DDIMScheduler(**SD_CONFIG, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
    ref.set_timesteps(n)
    a = ref.alphas_cumprod.double()
    want = ((1 - a[ref.timesteps]) / a[ref.timesteps]).sqrt()
    final = math.sqrt((1 - float(a[0])) / float(a[0]))  # set_alpha_to_one=False: last step goes to t = 0
    ours = sigmas_ddim_uniform(n, diffusers_schedule)
    assert ours.shape == (n + 1,)
    assert _rel(ours[:-1], want) < 1e-6
    assert float(ours[-1]) == pytest.approx(final, rel=1e-6)
    assert float(ours[-1]) > 0  # the stated exception to "last sigma = 0"


@pytest.mark.parametrize("n", [4, 10, 25, 50])
def test_simple_equals_diffusers_trailing_when_steps_divide_1000(diffusers_schedule, n):
    ref = diffusers.EulerDiscreteScheduler(**SD_CONFIG, timestep_spacing="trailing")
    ref.set_timesteps(n)
    ours = sigmas_simple(n, diffusers_schedule)
    assert ours.shape == (n + 1,) and float(ours[-1]) == 0.0
    assert _rel(ours, ref.sigmas) < 1e-6


def test_simple_picks_evenly_strided_trained_sigmas(diffusers_schedule):
    # ComfyUI's definition: index 999 - floor(k * 1000 / n).  For n = 7 that is
    # 999, 857, 714, 571, 428, 285, 142 (diffusers' "trailing" rounds: 856, 713, ...).
    ours = sigmas_simple(7, diffusers_schedule)
    index = [999, 857, 714, 571, 428, 285, 142]
    assert torch.equal(ours[:-1], diffusers_schedule.sigmas[index].to(torch.float32))


@pytest.mark.parametrize("n", STEP_COUNTS)
def test_sgm_uniform_timesteps(diffusers_schedule, n):
    ours = sigmas_sgm_uniform(n, diffusers_schedule)
    assert ours.shape == (n + 1,) and float(ours[-1]) == 0.0
    t = diffusers_schedule.sigma_to_t(ours[:-1].double())
    want = torch.linspace(999, 0, n + 1, dtype=torch.float64)[:-1]
    assert torch.allclose(t, want, atol=2e-3)  # float32 sigmas: measured |dt| < 1e-3
    # The closest diffusers configuration is "trailing" (integer timesteps
    # round(1000 - k*1000/n) - 1), within one timestep (measured 0.98) of ours,
    # which is not an equality: near t = 0 one timestep moves sigma by ~30 %.
    ref = diffusers.EulerDiscreteScheduler(**SD_CONFIG, timestep_spacing="trailing")
    ref.set_timesteps(n)
    assert float((t - ref.timesteps.double()).abs().max()) < 1.0


@pytest.mark.parametrize("name", ["Karras", "Exponential", "Normal", "SGM Uniform"])
def test_one_step_starts_at_sigma_max(diffusers_schedule, name):
    sigmas = compute_sigmas(name, "Euler", 1, diffusers_schedule)
    assert float(sigmas[0]) == pytest.approx(diffusers_schedule.sigma_max, rel=1e-6)
    assert float(sigmas[1]) == 0.0


@pytest.mark.parametrize("name", ["Karras", "Exponential", "Normal", "SGM Uniform", "Simple", "DDIM"])
@pytest.mark.parametrize("n", [1, 3, 30])
def test_every_schedule_is_descending_float32(diffusers_schedule, name, n):
    sigmas = compute_sigmas(name, "Euler", n, diffusers_schedule)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (n + 1,)
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    assert float(sigmas[0]) <= diffusers_schedule.sigma_max * (1 + 1e-6)


AUTOMATIC = {
    "Euler": "Normal",
    "Euler a": "Normal",
    "Heun": "Normal",
    "LMS": "Normal",
    "DPM2": "Karras",
    "DPM2 a": "Karras",
    "DPM++ 2M": "Karras",
    "DPM++ 2M SDE": "Exponential",
    "DPM++ 3M SDE": "Exponential",
    "DPM++ SDE": "Karras",
    "DPM++ 2S a": "Karras",
    "DDIM": "DDIM",
    "UniPC": "Normal",
    "LCM": "Normal",
    "Restart": "Karras",  # A1111: {"scheduler": "karras", "second_order": True}
}


def test_automatic_table_covers_every_sampler():
    assert set(AUTOMATIC) == set(SAMPLER_NAMES)


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_automatic_resolves_to_a1111_default(diffusers_schedule, sampler):
    assert default_schedule_for(sampler) == AUTOMATIC[sampler]
    if sampler in ("DPM2", "DPM2 a", "DPM++ 3M SDE"):
        return
    auto = compute_sigmas("Automatic", sampler, 9, diffusers_schedule)
    explicit = compute_sigmas(AUTOMATIC[sampler], sampler, 9, diffusers_schedule)
    assert torch.equal(auto, explicit)


@pytest.mark.parametrize("sampler", ["DPM2", "DPM2 a"])
def test_dpm2_discards_the_penultimate_sigma(diffusers_schedule, sampler):
    sigmas = compute_sigmas("Automatic", sampler, 10, diffusers_schedule)
    full = sigmas_karras(11, diffusers_schedule.sigma_min, diffusers_schedule.sigma_max)
    assert sigmas.shape == (11,)
    assert torch.equal(sigmas, torch.cat([full[:-2], full[-1:]]))
    assert float(sigmas[-2]) > diffusers_schedule.sigma_min  # the tiny last step is gone


def test_compute_sigmas_accepts_loose_spelling(diffusers_schedule):
    a = compute_sigmas("sgm_uniform", "k_dpmpp_2m", 5, diffusers_schedule)
    b = compute_sigmas("SGM Uniform", "DPM++ 2M", 5, diffusers_schedule)
    assert torch.equal(a, b)


def test_schedule_names_all_implemented(diffusers_schedule):
    for name in SCHEDULE_NAMES:
        assert compute_sigmas(name, "Euler", 4, diffusers_schedule).shape == (5,)


# ---------------------------------------------------------------- bad input


def test_unknown_schedule_is_named(diffusers_schedule):
    with pytest.raises(HuabiError, match=r"schedule: unknown schedule type 'Bogus'; valid: Automatic, Karras"):
        compute_sigmas("Bogus", "Euler", 10, diffusers_schedule)


def test_unknown_sampler_is_named(diffusers_schedule):
    with pytest.raises(HuabiError, match=r"sampler: unknown sampler 'Bogus'; valid: Euler"):
        compute_sigmas("Karras", "Bogus", 10, diffusers_schedule)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_bad_steps_are_named(diffusers_schedule, steps):
    with pytest.raises(HuabiError, match=r"steps: must be an integer >= 1, got"):
        compute_sigmas("Karras", "Euler", steps, diffusers_schedule)


def test_bad_sigma_range_is_named():
    with pytest.raises(HuabiError, match=r"sigma_min/sigma_max: need 0 < sigma_min <= sigma_max, got 0.0, 1.0"):
        sigmas_karras(4, 0.0, 1.0)
    with pytest.raises(HuabiError, match=r"sigma_min/sigma_max: need 0 < sigma_min <= sigma_max, got 2.0, 1.0"):
        sigmas_exponential(4, 2.0, 1.0)


def test_too_many_ddim_steps_is_named(diffusers_schedule):
    with pytest.raises(HuabiError, match=r"steps: DDIM schedule allows at most 1000 steps, got 1001"):
        sigmas_ddim_uniform(1001, diffusers_schedule)


@pytest.mark.parametrize(
    ("alphas", "message"),
    [
        (torch.tensor([0.5]), "alphas_cumprod: must be a 1-D tensor with at least 2 timesteps"),
        (torch.ones(2, 2) * 0.5, "alphas_cumprod: must be a 1-D tensor with at least 2 timesteps"),
        (torch.tensor([1.0, 0.5]), "alphas_cumprod: every value must be strictly between 0 and 1"),
        (torch.tensor([0.4, 0.5]), "alphas_cumprod: must be strictly decreasing with the timestep"),
    ],
)
def test_bad_alphas_cumprod_is_named(alphas, message):
    with pytest.raises(HuabiError, match=message):
        DiscreteSchedule(alphas)


def test_bad_training_length_is_named():
    with pytest.raises(HuabiError, match=r"n: a training schedule needs at least 2 timesteps, got 1"):
        scaled_linear_alphas_cumprod(n=1)
