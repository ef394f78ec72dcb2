"""Noise schedules in k-diffusion's sigma space.

A latent at noise level ``sigma`` is ``x = x0 + sigma * eps``.  A model trained
on a discrete VP schedule (``alphas_cumprod``, 1000 steps for the SD family)
sees ``sigma_t = sqrt((1 - a_t) / a_t)`` at integer timestep ``t``.

Every ``sigmas_<name>`` function returns ``n + 1`` descending float32 sigmas:
``n`` sampling steps, the last one going to 0 unless stated otherwise.  They
are pure functions: no model, no device; callers move the result with ``.to``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from huabi.core.karras import karras_levels
from huabi.core.names import SCHEDULE_NAMES, canonical_schedule_name
from huabi.core.samplers import get_sampler
from huabi.errors import HuabiError


def scaled_linear_alphas_cumprod(
    beta_start: float = 0.00085, beta_end: float = 0.012, n: int = 1000
) -> Tensor:
    """SD's training schedule: betas linear in sqrt-space, cumulative product of 1 - beta.

    Computed in float64 (as the original CompVis code does before storing the
    result as a float32 buffer in every checkpoint).
    """
    if n < 2:
        raise HuabiError(f"n: a training schedule needs at least 2 timesteps, got {n}")
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class DiscreteSchedule:
    """A model's discrete training schedule seen in sigma space.

    ``sigmas[t]`` is the noise level of integer timestep ``t`` (ascending in t).
    Fractional timesteps interpolate linearly in log-sigma, both ways, so
    ``t_to_sigma(sigma_to_t(s)) == s`` inside the trained range.
    """

    def __init__(self, alphas_cumprod: Tensor) -> None:
        if not isinstance(alphas_cumprod, Tensor) or alphas_cumprod.ndim != 1 or alphas_cumprod.numel() < 2:
            raise HuabiError("alphas_cumprod: must be a 1-D tensor with at least 2 timesteps")
        alphas = alphas_cumprod.detach().to("cpu", torch.float64)
        if not bool(torch.all((alphas > 0) & (alphas < 1))):
            raise HuabiError("alphas_cumprod: every value must be strictly between 0 and 1")
        if not bool(torch.all(alphas[1:] < alphas[:-1])):
            raise HuabiError("alphas_cumprod: must be strictly decreasing with the timestep")
        self.alphas_cumprod: Tensor = alphas
        self.sigmas: Tensor = ((1.0 - alphas) / alphas).sqrt()  # float64, ascending in t
        self.log_sigmas: Tensor = self.sigmas.log()

    @property
    def num_timesteps(self) -> int:
        return int(self.sigmas.numel())

    @property
    def t_max(self) -> int:
        return self.num_timesteps - 1

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor | float) -> Tensor:
        """Fractional timestep(s) of ``sigma`` (float64), clamped to [0, t_max]."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu().clamp(min=1e-300).log()
        # Index of the last trained log-sigma <= log_sigma, kept so high = low + 1 exists.
        low = torch.searchsorted(self.log_sigmas, log_sigma, right=True) - 1
        low = low.clamp(0, self.num_timesteps - 2)
        log_low, log_high = self.log_sigmas[low], self.log_sigmas[low + 1]
        weight = ((log_sigma - log_low) / (log_high - log_low)).clamp(0.0, 1.0)
        return low.to(torch.float64) + weight

    def t_to_sigma(self, t: Tensor | float) -> Tensor:
        """Sigma(s) at fractional timestep(s) ``t`` (float64), t clamped to [0, t_max]."""
        t = torch.as_tensor(t, dtype=torch.float64).cpu().clamp(0.0, float(self.t_max))
        low = t.floor().long()
        high = t.ceil().long()
        weight = t - low.to(torch.float64)
        return ((1.0 - weight) * self.log_sigmas[low] + weight * self.log_sigmas[high]).exp()


def _check_steps(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise HuabiError(f"steps: must be an integer >= 1, got {n!r}")


def _check_sigma_range(sigma_min: float, sigma_max: float) -> None:
    if not (0 < sigma_min <= sigma_max) or not math.isfinite(sigma_max):
        raise HuabiError(
            f"sigma_min/sigma_max: need 0 < sigma_min <= sigma_max, got {sigma_min!r}, {sigma_max!r}"
        )


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)


def sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022): steps evenly spaced in sigma**(1/rho)."""
    _check_steps(n)
    _check_sigma_range(sigma_min, sigma_max)
    return karras_levels(n, sigma_min, sigma_max, rho)


def sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Steps evenly spaced in log-sigma."""
    _check_steps(n)
    _check_sigma_range(sigma_min, sigma_max)
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp())


def sigmas_normal(n: int, schedule: DiscreteSchedule) -> Tensor:
    """k-diffusion's default: n timesteps evenly spaced from t_max down to 0.

    Same timesteps as diffusers' ``timestep_spacing="linspace"``; diffusers
    interpolates sigma linearly between integer timesteps where we (like
    k-diffusion and A1111) interpolate log-sigma, a relative difference
    below 1e-5 for SD's schedule.
    """
    _check_steps(n)
    t = torch.linspace(float(schedule.t_max), 0.0, n, dtype=torch.float64)
    return _append_zero(schedule.t_to_sigma(t))


def sigmas_sgm_uniform(n: int, schedule: DiscreteSchedule) -> Tensor:
    """A1111/ComfyUI "SGM Uniform": n + 1 evenly spaced timesteps t_max..0, the last dropped.

    Close to, but not the same as, diffusers' ``"trailing"`` spacing, which
    rounds ``1000 - k * 1000 / n`` to integers and subtracts 1.
    """
    _check_steps(n)
    t = torch.linspace(float(schedule.t_max), 0.0, n + 1, dtype=torch.float64)[:-1]
    return _append_zero(schedule.t_to_sigma(t))


def sigmas_simple(n: int, schedule: DiscreteSchedule) -> Tensor:
    """ComfyUI "simple": every (T / n)-th trained sigma, starting from the top."""
    _check_steps(n)
    stride = schedule.num_timesteps / n
    index = [schedule.t_max - int(k * stride) for k in range(n)]
    return _append_zero(schedule.sigmas[index])


def sigmas_ddim_uniform(n: int, schedule: DiscreteSchedule) -> Tensor:
    """CompVis/A1111 DDIM timesteps ``range(0, T, T // n) + 1``, descending.

    Matches diffusers' DDIMScheduler with ``timestep_spacing="leading"``,
    ``steps_offset=1``, ``set_alpha_to_one=False``.  Stated exception to
    "last = 0": the final step goes to the sigma of timestep 0 (about 0.029
    for SD), not to 0, as in those implementations.  In sigma space the
    result is therefore ``x0 + sigma(0) * eps``; the VP latent diffusers
    returns is that times ``sqrt(alphas_cumprod[0])``.
    A1111's own loop can add an extra step when T % n != 0 (e.g. n = 7);
    here there are always exactly n steps.
    """
    _check_steps(n)
    if n > schedule.num_timesteps:
        raise HuabiError(f"steps: DDIM schedule allows at most {schedule.num_timesteps} steps, got {n}")
    stride = schedule.num_timesteps // n
    index = [k * stride + 1 for k in range(n)][::-1]
    index = [min(i, schedule.t_max) for i in index]
    last = schedule.sigmas[:1]
    return torch.cat([schedule.sigmas[index], last]).to(torch.float32)


def sigmas_beta(n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """A1111's "Beta" (Lee et al. 2024, "Beta Sampling is All You Need"): sigma_min + (sigma_max -
    sigma_min) * Beta(alpha, beta).ppf(q) for q from 1 down to 0, then 0. alpha = beta = 0.6 are
    A1111's defaults; the same curve as diffusers' ``use_beta_sigmas``."""
    from scipy.special import betaincinv  # scipy comes with torchsde; imported only when used

    _check_steps(n)
    _check_sigma_range(sigma_min, sigma_max)
    if not (alpha > 0 and beta > 0):
        raise HuabiError(f"beta schedule: alpha and beta must be > 0, got {alpha!r}, {beta!r}")
    quantiles = 1.0 - torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    ppf = torch.from_numpy(betaincinv(alpha, beta, quantiles.numpy()))
    return _append_zero(sigma_min + ppf * (sigma_max - sigma_min))


# NVIDIA's published 10-step "Align Your Steps" sigmas (research.nvidia.com/labs/toronto-ai/
# AlignYourSteps/howto.html) with A1111's last value 0.029 (the trained sigma_min).
AYS_SIGMAS_SD1 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SIGMAS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)


def sigmas_align_your_steps(n: int, *, sdxl: bool = False) -> Tensor:
    """A1111's "Align Your Steps": the published 11-value table for SD 1.x or SDXL, log-linearly
    interpolated (NVIDIA's recipe) to n values when n is not 11, then 0."""
    _check_steps(n)
    table = torch.tensor(AYS_SIGMAS_SDXL if sdxl else AYS_SIGMAS_SD1, dtype=torch.float64)
    if n == table.numel():
        return _append_zero(table)
    # Interpolate log-sigma over an even grid in [0, 1], as the how-to's loglinear_interp does.
    log_table = table.flip(0).log()
    grid = torch.linspace(0.0, 1.0, table.numel(), dtype=torch.float64)
    wanted = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    index = torch.clamp(torch.searchsorted(grid, wanted, right=True) - 1, 0, table.numel() - 2)
    weight = (wanted - grid[index]) / (grid[index + 1] - grid[index])
    values = (log_table[index] + weight * (log_table[index + 1] - log_table[index])).exp()
    return _append_zero(values.flip(0))


def sigmas_kl_optimal(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """A1111's "KL Optimal" (from the Align Your Steps paper): n + 1 sigmas evenly spaced in
    arctan(sigma) from sigma_max to sigma_min. Stated exception to "last = 0", as in A1111:
    the last step ends at sigma_min, not at 0."""
    _check_steps(n)
    _check_sigma_range(sigma_min, sigma_max)
    fraction = torch.arange(n + 1, dtype=torch.float64) / n
    angles = fraction * math.atan(sigma_min) + (1.0 - fraction) * math.atan(sigma_max)
    return angles.tan().to(torch.float32)


def default_schedule_for(sampler_name: str) -> str:
    """The schedule A1111 uses for ``sampler_name`` when the user picks "Automatic"."""
    return get_sampler(sampler_name).default_schedule


def compute_sigmas(
    schedule_name: str, sampler_name: str, steps: int, schedule: DiscreteSchedule, *, sdxl: bool = False
) -> Tensor:
    """Sigmas for ``steps`` steps of ``sampler_name`` under the named schedule type.

    "Automatic" resolves to the sampler's default.  Samplers flagged
    ``discard_penultimate_sigma`` (DPM2, DPM2 a) get ``steps + 1`` sigmas with
    the next-to-last dropped, as A1111 does, so they still take ``steps`` steps
    but skip the tiny step just above zero. ``sdxl`` picks the SDXL table of
    "Align Your Steps" (the SD 1.x one otherwise, as A1111).
    """
    spec = get_sampler(sampler_name)
    name = canonical_schedule_name(schedule_name) if isinstance(schedule_name, str) else None
    if name is None:
        raise HuabiError(f"schedule: unknown schedule type {schedule_name!r}; valid: {', '.join(SCHEDULE_NAMES)}")
    _check_steps(steps)
    if name == "Automatic":
        name = spec.default_schedule
    n = steps + 1 if spec.discard_penultimate_sigma else steps
    if name == "Karras":
        sigmas = sigmas_karras(n, schedule.sigma_min, schedule.sigma_max)
    elif name == "Exponential":
        sigmas = sigmas_exponential(n, schedule.sigma_min, schedule.sigma_max)
    elif name == "Normal":
        sigmas = sigmas_normal(n, schedule)
    elif name == "SGM Uniform":
        sigmas = sigmas_sgm_uniform(n, schedule)
    elif name == "Simple":
        sigmas = sigmas_simple(n, schedule)
    elif name == "DDIM":
        sigmas = sigmas_ddim_uniform(n, schedule)
    elif name == "Beta":
        sigmas = sigmas_beta(n, schedule.sigma_min, schedule.sigma_max)
    elif name == "Align Your Steps":
        sigmas = sigmas_align_your_steps(n, sdxl=sdxl)
    elif name == "KL Optimal":
        sigmas = sigmas_kl_optimal(n, schedule.sigma_min, schedule.sigma_max)
    else:  # pragma: no cover - SCHEDULE_NAMES and this table are kept in step by a test
        raise HuabiError(f"schedule: no implementation for {name!r}")
    if spec.discard_penultimate_sigma:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


__all__ = [
    "DiscreteSchedule",
    "compute_sigmas",
    "default_schedule_for",
    "scaled_linear_alphas_cumprod",
    "sigmas_align_your_steps",
    "sigmas_beta",
    "sigmas_ddim_uniform",
    "sigmas_exponential",
    "sigmas_karras",
    "sigmas_kl_optimal",
    "sigmas_normal",
    "sigmas_sgm_uniform",
    "sigmas_simple",
]
