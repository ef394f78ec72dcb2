"""Samplers: small functions that integrate the denoising ODE/SDE in sigma space.

Shape (as in k-diffusion): ``sample_<name>(denoiser, x, sigmas, *, noise=None,
on_step=None, **options) -> Tensor``.

- ``denoiser(x, sigma)`` takes the latent batch ``x`` ``[B, C, H, W]`` at
  noise level ``sigma`` (float32 tensor ``[B]`` on x's device) and returns
  the predicted clean latent ("denoised") of the same shape.  CFG, eps/v
  prediction and inpaint blending are wrappers around the model that
  produce such a denoiser; samplers know nothing of them.
- ``x`` is the starting latent already scaled to ``sigmas[0]`` (pure noise
  times ``sigmas[0]`` for txt2img).
- ``sigmas`` are ``n + 1`` descending noise levels; the last may be 0.
- ``noise(sigma, sigma_next)`` supplies unit-variance noise shaped like ``x``
  (required by the ancestral and SDE samplers; see ``huabi.core.noise``).
- ``on_step(i, total, x, denoised)`` is called after step ``i`` of ``total``
  with the updated latent and that step's first denoised prediction.

Step-size maths runs in float64 on the host (Python floats); only the latent
arithmetic runs on x's device and dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from huabi.core.karras import karras_levels
from huabi.core.names import SAMPLER_NAMES, canonical_sampler_name
from huabi.core.noise import NoiseSampler
from huabi.errors import HuabiError


class Denoiser(Protocol):
    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor: ...


StepCallback = Callable[[int, int, Tensor, Tensor], None]


# ---------------------------------------------------------------- helpers


def checked_sigmas(x: Tensor, sigmas: Tensor) -> list[float]:
    if not isinstance(x, Tensor) or x.ndim < 2:
        raise HuabiError("x: must be a latent batch tensor [B, C, H, W]")
    if not isinstance(sigmas, Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise HuabiError("sigmas: must be a 1-D tensor of at least 2 noise levels")
    values = sigmas.detach().to("cpu", torch.float64).tolist()
    if not all(math.isfinite(s) and s >= 0 for s in values):
        raise HuabiError("sigmas: every noise level must be finite and >= 0")
    if any(b > a for a, b in zip(values, values[1:])):
        raise HuabiError("sigmas: noise levels must not increase")
    if values[0] <= 0:
        raise HuabiError("sigmas: the first noise level must be > 0")
    return values


def _need_noise(noise: NoiseSampler | None, sampler: str) -> NoiseSampler:
    if noise is None:
        raise HuabiError(f"noise: sampler {sampler!r} needs a noise sampler (it adds fresh noise every step)")
    return noise


def call_denoiser(denoiser: Denoiser, x: Tensor, sigma: float) -> Tensor:
    sigma_batch = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)
    return denoiser(x, sigma_batch)


def report_step(on_step: StepCallback | None, i: int, total: int, x: Tensor, denoised: Tensor) -> None:
    if on_step is not None:
        on_step(i, total, x, denoised)


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step to ``sigma_next`` into a deterministic part down to ``sigma_down``
    and fresh noise of size ``sigma_up`` (sigma_down**2 + sigma_up**2 == sigma_next**2)."""
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    sigma_down = math.sqrt(max(sigma_next**2 - sigma_up**2, 0.0))
    return sigma_down, sigma_up


def _euler(x: Tensor, denoised: Tensor, sigma: float, sigma_to: float) -> Tensor:
    # x moves along d = (x - denoised) / sigma; written so sigma_to = 0 gives denoised.
    return denoised + (x - denoised) * (sigma_to / sigma)


# ---------------------------------------------------------------- first order


def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    on_step: StepCallback | None = None,
) -> Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - denoised) / sigma."""
    s = checked_sigmas(x, sigmas)
    total = len(s) - 1
    for i in range(total):
        denoised = call_denoiser(denoiser, x, s[i])
        x = x + (x - denoised) * ((s[i + 1] - s[i]) / s[i])
        report_step(on_step, i, total, x, denoised)
    return x


def sample_euler_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    on_step: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Euler step down to sigma_down, then add sigma_up of fresh noise."""
    s = checked_sigmas(x, sigmas)
    noise = _need_noise(noise, "Euler a") if eta > 0 else noise
    total = len(s) - 1
    for i in range(total):
        denoised = call_denoiser(denoiser, x, s[i])
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        x = x + (x - denoised) * ((sigma_down - s[i]) / s[i])
        if s[i + 1] > 0 and sigma_up > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * (s_noise * sigma_up)
        report_step(on_step, i, total, x, denoised)
    return x


def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    on_step: StepCallback | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM.  With eta = 0 (the default, deterministic) it is exactly Euler in sigma space:
    the DDIM update x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps, divided by sqrt(a_prev),
    is x0 + sigma_prev * eps.  With eta > 0 the VP-space DDIM noise
    sigma_eta = eta * sqrt((1-a_prev)/(1-a)) * sqrt(1 - a/a_prev) becomes, divided by
    sqrt(a_prev), a fresh-noise part sigma_up with sigma_down**2 + sigma_up**2 = sigma_prev**2.
    """
    s = checked_sigmas(x, sigmas)
    if eta > 0:
        noise = _need_noise(noise, "DDIM")
    total = len(s) - 1
    for i in range(total):
        denoised = call_denoiser(denoiser, x, s[i])
        sigma, sigma_next = s[i], s[i + 1]
        sigma_down, sigma_up = sigma_next, 0.0
        if eta > 0 and sigma_next > 0:
            a, a_prev = 1.0 / (1.0 + sigma**2), 1.0 / (1.0 + sigma_next**2)
            var_eta = eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
            sigma_up = min(math.sqrt(var_eta / a_prev), sigma_next)
            sigma_down = math.sqrt(max(sigma_next**2 - sigma_up**2, 0.0))
        x = _euler(x, denoised, sigma, sigma_down)
        if sigma_up > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
        report_step(on_step, i, total, x, denoised)
    return x


def sample_lcm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    on_step: StepCallback | None = None,
) -> Tensor:
    """Latent Consistency: jump to the prediction, then re-noise to the next level."""
    s = checked_sigmas(x, sigmas)
    total = len(s) - 1
    if any(v > 0 for v in s[1:]):
        noise = _need_noise(noise, "LCM")
    for i in range(total):
        denoised = call_denoiser(denoiser, x, s[i])
        x = denoised
        if s[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s[i + 1]
        report_step(on_step, i, total, x, denoised)
    return x


# ---------------------------------------------------------------- second order


def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    on_step: StepCallback | None = None,
) -> Tensor:
    """Heun's method (Karras et al. Algorithm 1 without churn); Euler for the step to 0."""
    s = checked_sigmas(x, sigmas)
    total = len(s) - 1
    for i in range(total):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = call_denoiser(denoiser, x, sigma)
        slope = (x - denoised) / sigma
        if sigma_next == 0:
            x = x + slope * (sigma_next - sigma)
        else:
            x_trial = x + slope * (sigma_next - sigma)
            denoised_trial = call_denoiser(denoiser, x_trial, sigma_next)
            slope_trial = (x_trial - denoised_trial) / sigma_next
            x = x + (slope + slope_trial) * ((sigma_next - sigma) / 2)
        report_step(on_step, i, total, x, denoised)
    return x


# A1111's automatic restart table (modules/sd_samplers_extra.py): with 20+ steps, one restart of 9
# steps (36+: two of steps // 4) from sigma ~0.1 back up to sigma ~2.
RESTART_MIN_STEPS = 20
RESTART_TWICE_FROM_STEPS = 36
RESTART_SIGMA_MIN = 0.1
RESTART_SIGMA_MAX = 2.0


def restart_plan(
    s: list[float], restart_list: Mapping[float, tuple[int, int, float]] | None = None
) -> tuple[list[float], list[tuple[float, float]]]:
    """The main sigmas and the (sigma_from, sigma_to) step list of Restart sampling.

    ``restart_list`` maps a sigma at which to restart to ``(restart_steps, restart_times,
    restart_max_sigma)``. Without it (A1111's automatic choice) a schedule of 20+ steps is
    replaced by a Karras schedule over the same range with the restart steps taken out (so the
    model calls stay about those of Heun), and one restart segment is planned at sigma ~0.1;
    fewer steps run plain Heun. Each sigma is matched to the nearest main sigma. A segment is
    ``restart_steps`` Karras sigmas from the main sigma nearest ``restart_max_sigma`` down to the
    restart point, run ``restart_times`` times right after the main step that reaches that point.
    """
    steps = len(s) - 1
    if restart_list is None:
        restart_list = {}
        if steps >= RESTART_MIN_STEPS:
            restart_steps, restart_times = 9, 1
            if steps >= RESTART_TWICE_FROM_STEPS:
                restart_steps, restart_times = steps // 4, 2
            s = karras_levels(steps - restart_steps * restart_times, s[-2], s[0]).to(torch.float64).tolist()
            restart_list = {RESTART_SIGMA_MIN: (restart_steps + 1, restart_times, RESTART_SIGMA_MAX)}

    def nearest(sigma: float) -> int:  # first index on ties, as torch.argmin
        return min(range(len(s)), key=lambda k: abs(s[k] - sigma))

    at_index = {nearest(sigma): tuple(plan) for sigma, plan in restart_list.items()}
    pairs: list[tuple[float, float]] = []
    for i in range(len(s) - 1):
        pairs.append((s[i], s[i + 1]))
        if i + 1 not in at_index:
            continue
        restart_steps, restart_times, restart_max = at_index[i + 1]
        top = nearest(restart_max)
        if top < i + 1:
            segment = karras_levels(int(restart_steps), s[i + 1], s[top]).to(torch.float64).tolist()[:-1]
            pairs.extend(list(zip(segment[:-1], segment[1:])) * int(restart_times))
    return s, pairs


def sample_restart(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    on_step: StepCallback | None = None,
    s_noise: float = 1.0,
    restart_list: Mapping[float, tuple[int, int, float]] | None = None,
) -> Tensor:
    """Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes"),
    as A1111's "Restart": Heun steps (Euler for the step to 0) along :func:`restart_plan`'s step
    list; where the list jumps back up in sigma, fresh noise of variance
    ``s_noise**2 * (sigma_up**2 - sigma_now**2)`` takes x to the higher level (the forward
    process), and the segment is integrated down again. Progress is reported on the scale of
    the given schedule's steps (the step list is longer when restarts are added)."""
    s = checked_sigmas(x, sigmas)
    _, pairs = restart_plan(s, restart_list)
    total, count = len(s) - 1, len(pairs)
    current = None
    for j, (sigma, sigma_next) in enumerate(pairs):
        if current is not None and sigma > current:  # a restart: forward-diffuse back up to sigma
            x = x + _need_noise(noise, "Restart")(current, sigma) * (s_noise * math.sqrt(sigma**2 - current**2))
        denoised = call_denoiser(denoiser, x, sigma)
        slope = (x - denoised) / sigma
        x_next = x + slope * (sigma_next - sigma)
        if sigma_next > 0:
            denoised_next = call_denoiser(denoiser, x_next, sigma_next)
            x_next = x + (slope + (x_next - denoised_next) / sigma_next) * ((sigma_next - sigma) / 2)
        x, current = x_next, sigma_next
        shown = (j + 1) * total // count - 1  # the given schedule's step this point of the list reaches
        if shown >= 0 and shown != (j * total // count - 1):
            report_step(on_step, shown, total, x, denoised)
    return x


def _dpm2_step(denoiser: Denoiser, x: Tensor, denoised: Tensor, sigma: float, sigma_to: float) -> Tensor:
    # Midpoint in log-sigma; the slope there carries x all the way to sigma_to.
    slope = (x - denoised) / sigma
    sigma_mid = math.exp(0.5 * (math.log(sigma) + math.log(sigma_to)))
    x_mid = x + slope * (sigma_mid - sigma)
    denoised_mid = call_denoiser(denoiser, x_mid, sigma_mid)
    slope_mid = (x_mid - denoised_mid) / sigma_mid
    return x + slope_mid * (sigma_to - sigma)


def sample_dpm_2(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    on_step: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver-2 in the k-diffusion form (Karras et al. Algorithm 2 variant)."""
    s = checked_sigmas(x, sigmas)
    total = len(s) - 1
    for i in range(total):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = call_denoiser(denoiser, x, sigma)
        if sigma_next == 0:
            x = x + (x - denoised) * ((sigma_next - sigma) / sigma)
        else:
            x = _dpm2_step(denoiser, x, denoised, sigma, sigma_next)
        report_step(on_step, i, total, x, denoised)
    return x


def sample_dpm_2_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    on_step: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM2 down to sigma_down, then sigma_up of fresh noise."""
    s = checked_sigmas(x, sigmas)
    noise = _need_noise(noise, "DPM2 a") if eta > 0 else noise
    total = len(s) - 1
    for i in range(total):
        sigma = s[i]
        denoised = call_denoiser(denoiser, x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, s[i + 1], eta)
        if sigma_down == 0:
            x = x + (x - denoised) * ((sigma_down - sigma) / sigma)
        else:
            x = _dpm2_step(denoiser, x, denoised, sigma, sigma_down)
        if s[i + 1] > 0 and sigma_up > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * (s_noise * sigma_up)
        report_step(on_step, i, total, x, denoised)
    return x


def sample_dpmpp_2s_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    on_step: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2S), single-step with a midpoint in lambda = -log sigma, ancestral.

    diffusers has no equivalent; tested against the exact solution of
    analytic denoisers and the eta = 0 limit.
    """
    s = checked_sigmas(x, sigmas)
    noise = _need_noise(noise, "DPM++ 2S a") if eta > 0 else noise
    total = len(s) - 1
    for i in range(total):
        sigma = s[i]
        denoised = call_denoiser(denoiser, x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, s[i + 1], eta)
        if sigma_down == 0:
            x = _euler(x, denoised, sigma, 0.0)
        else:
            h = math.log(sigma / sigma_down)
            sigma_mid = sigma * math.exp(-0.5 * h)
            # Exponential-integrator update in data prediction: x_to = (s_to/s) x - expm1(-h) D.
            x_mid = x * (sigma_mid / sigma) - denoised * math.expm1(-0.5 * h)
            denoised_mid = call_denoiser(denoiser, x_mid, sigma_mid)
            x = x * (sigma_down / sigma) - denoised_mid * math.expm1(-h)
        if s[i + 1] > 0 and sigma_up > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * (s_noise * sigma_up)
        report_step(on_step, i, total, x, denoised)
    return x


def sample_dpmpp_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    on_step: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
) -> Tensor:
    """DPM-Solver++ (stochastic, two evaluations per step, split at r in lambda).

    Meant for Brownian-tree noise (``BrownianNoiseSampler``).  The noise query
    times are computed in the sigmas' own dtype through lambda = -log sigma
    and back, exactly as k-diffusion does, because a Brownian path answers a
    1-ulp different time with a visibly different increment.
    """
    s = checked_sigmas(x, sigmas)
    noise = _need_noise(noise, "DPM++ SDE") if eta > 0 else noise
    total = len(s) - 1
    sig_t = sigmas.detach().cpu()
    fac = 1.0 / (2.0 * r)
    for i in range(total):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = call_denoiser(denoiser, x, sigma)
        if sigma_next == 0:
            x = _euler(x, denoised, sigma, 0.0)
        else:
            lam = -sig_t[i].log()
            lam_next = -sig_t[i + 1].log()
            lam_split = lam + (lam_next - lam) * r
            q_from, q_split, q_next = (-lam).exp(), (-lam_split).exp(), (-lam_next).exp()
            sigma_from, sigma_split = float(q_from), float(q_split)
            # Stage 1: ancestral exponential step to the split point.
            down, up = ancestral_step(sigma_from, sigma_split, eta)
            x_split = x * (down / sigma_from) - denoised * math.expm1(-math.log(sigma_from / down))
            if up > 0:
                x_split = x_split + noise(q_from, q_split) * (s_noise * up)
            denoised_split = call_denoiser(denoiser, x_split, sigma_split)
            # Stage 2: from sigma to sigma_next with the blended prediction.
            down, up = ancestral_step(sigma_from, float(q_next), eta)
            blended = denoised * (1.0 - fac) + denoised_split * fac if fac != 1.0 else denoised_split
            x = x * (down / sigma_from) - blended * math.expm1(-math.log(sigma_from / down))
            if up > 0:
                x = x + noise(q_from, q_next) * (s_noise * up)
        report_step(on_step, i, total, x, denoised)
    return x


# ---------------------------------------------------------------- multistep


def sample_lms(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    on_step: StepCallback | None = None,
    order: int = 4,
) -> Tensor:
    """Linear multistep (Adams-Bashforth in sigma) over the last ``order`` slopes."""
    if order < 1:
        raise HuabiError(f"order: LMS order must be >= 1, got {order}")
    s = checked_sigmas(x, sigmas)
    total = len(s) - 1
    slopes: list[Tensor] = []
    for i in range(total):
        denoised = call_denoiser(denoiser, x, s[i])
        slopes.append((x - denoised) / s[i])
        if len(slopes) > order:
            slopes.pop(0)
        current_order = min(i + 1, order)
        for j, slope in enumerate(reversed(slopes)):
            x = x + slope * lms_coefficient(s, i, j, current_order)
        report_step(on_step, i, total, x, denoised)
    return x


def lms_coefficient(sigmas: list[float], i: int, j: int, order: int) -> float:
    """Integral over [sigmas[i], sigmas[i+1]] of the Lagrange basis polynomial of node
    sigmas[i - j] among nodes sigmas[i], ..., sigmas[i - order + 1].

    Gauss-Legendre with ``order`` points is exact for these degree order-1 polynomials.
    """
    nodes = [sigmas[i - k] for k in range(order)]
    gauss_x, gauss_w = np.polynomial.legendre.leggauss(max(order, 1))
    a, b = sigmas[i], sigmas[i + 1]
    taus = 0.5 * (b - a) * gauss_x + 0.5 * (a + b)
    values = np.ones_like(taus)
    for k in range(order):
        if k != j:
            values *= (taus - nodes[k]) / (nodes[j] - nodes[k])
    return float(0.5 * (b - a) * np.dot(gauss_w, values))


def dpmpp_2m_step(
    x: Tensor,
    denoised: Tensor,
    previous: Tensor | None,
    sigma: float,
    sigma_next: float,
    h: float,
    h_last: float,
    alpha_next: float = 1.0,
) -> Tensor:
    """One DPM-Solver++(2M) update from ``sigma`` to ``sigma_next`` (> 0), ``h`` the step in
    lambda = log(alpha / sigma): first order without a ``previous`` prediction, else the prediction
    extrapolated by ``h / (2 h_last)``. ``alpha_next`` is 1 in sigma space (x = x0 + sigma * noise)
    and ``1 - sigma_next`` in flow space (:mod:`huabi.core.flow`)."""
    if previous is not None:
        half_over_r = h / (2.0 * h_last)
        denoised = denoised * (1.0 + half_over_r) - previous * half_over_r
    return x * (sigma_next / sigma) - denoised * (alpha_next * math.expm1(-h))


def dpmpp_2m_loop(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    on_step: StepCallback | None,
    lambda_step: Callable[[float, float], float],
    alpha: Callable[[float], float],
) -> Tensor:
    """DPM-Solver++(2M) over ``sigmas``: ``lambda_step(sigma, sigma_next)`` is the step in
    lambda, ``alpha(sigma)`` the signal scale; the step to 0 returns the prediction (diffusers'
    ``lower_order_final`` / ``final_sigmas_type="zero"``)."""
    s = checked_sigmas(x, sigmas)
    total = len(s) - 1
    previous: Tensor | None = None
    h_last = 0.0
    for i in range(total):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = call_denoiser(denoiser, x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = lambda_step(sigma, sigma_next)
            x = dpmpp_2m_step(x, denoised, previous, sigma, sigma_next, h, h_last, alpha(sigma_next))
            h_last = h
        previous = denoised
        report_step(on_step, i, total, x, denoised)
    return x


def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    on_step: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++(2M): data-prediction multistep, second order from the second step on.

    First order on the first step and on the step to 0 (diffusers calls this
    ``lower_order_final`` / ``final_sigmas_type="zero"``).
    """
    return dpmpp_2m_loop(denoiser, x, sigmas, on_step=on_step,
                         lambda_step=lambda sigma, sigma_next: math.log(sigma / sigma_next), alpha=lambda _: 1.0)


# (prediction, h) of earlier steps, newest first: what a multistep SDE update looks back on.
History = list[tuple[Tensor, float]]


def _sde_multistep(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None,
    on_step: StepCallback | None,
    eta: float,
    s_noise: float,
    name: str,
    update: Callable[[Tensor, Tensor, History, float, float, float], Tensor],
) -> Tensor:
    """The loop DPM++ 2M SDE and 3M SDE share: predict, take ``update(x, denoised, history, sigma,
    sigma_next, h)`` (h = log(sigma / sigma_next)), then add ``sigma_next * sqrt(1 - e^{-2 eta h})``
    of fresh noise; the step to 0 returns the prediction. ``history`` keeps the last two steps."""
    s = checked_sigmas(x, sigmas)
    noise = _need_noise(noise, name) if eta > 0 else noise
    total = len(s) - 1
    history: History = []
    for i in range(total):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = call_denoiser(denoiser, x, sigma)
        h = 0.0
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            x = update(x, denoised, history, sigma, sigma_next, h)
            if eta > 0:
                x = x + noise(sigmas[i], sigmas[i + 1]) * (
                    sigma_next * math.sqrt(-math.expm1(-2.0 * (eta * h))) * s_noise
                )
        history = [(denoised, h), *history[:1]]
        report_step(on_step, i, total, x, denoised)
    return x


def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    on_step: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2M) SDE, midpoint variant; eta = 0 is a deterministic 2M-like ODE solver."""

    def update(x: Tensor, denoised: Tensor, history: History, sigma: float, sigma_next: float, h: float) -> Tensor:
        eta_h = eta * h
        # -expm1(-h - eta h): weight of the prediction after the noisy step.
        weight = -math.expm1(-h - eta_h)
        x = x * (sigma_next / sigma * math.exp(-eta_h)) + denoised * weight
        if history:
            old_denoised, h_last = history[0]
            r = h_last / h
            x = x + (denoised - old_denoised) * (0.5 * weight / r)
        return x

    return _sde_multistep(denoiser, x, sigmas, noise=noise, on_step=on_step, eta=eta, s_noise=s_noise,
                          name="DPM++ 2M SDE", update=update)


def sample_dpmpp_3m_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    on_step: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion's ``sample_dpmpp_3m_sde``, A1111's "DPM++ 3M SDE").

    Data prediction, exponential integrator in lambda = -log(sigma) with the
    noise part scaled by eta: a step of size h integrates ``e^{-(1+eta)(h-u)}``
    against a quadratic through the last three predictions (first order on the
    first step, second on the second; the step to 0 returns the prediction).
    With ``h_eta = (1 + eta) h``: ``phi_2 = 1 - (1 - e^{-h_eta}) / h_eta`` weighs
    the first divided difference and ``phi_2 / h_eta - 1/2`` the second.
    eta = 0 is DPM-Solver++(3M), the ODE solver.
    """
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise HuabiError(f"eta: must be a number >= 0, got {eta!r}")

    def update(x: Tensor, denoised: Tensor, history: History, sigma: float, sigma_next: float, h: float) -> Tensor:
        h_eta = h * (eta + 1.0)
        x = x * math.exp(-h_eta) + denoised * (-math.expm1(-h_eta))
        phi_2 = math.expm1(-h_eta) / h_eta + 1.0
        if len(history) == 2:
            (denoised_1, h_1), (denoised_2, h_2) = history
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - denoised_1) / r0
            d1_1 = (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            x = x + d1 * phi_2 - d2 * phi_3
        elif history:
            denoised_1, h_1 = history[0]
            x = x + (denoised - denoised_1) * (phi_2 * h / h_1)
        return x

    return _sde_multistep(denoiser, x, sigmas, noise=noise, on_step=on_step, eta=eta, s_noise=s_noise,
                          name="DPM++ 3M SDE", update=update)


def _unipc_coefficients(rks: list[float], h: float, order: int, variant: str) -> tuple[np.ndarray, float]:
    """Right-hand side b (length order) and B(h) of the UniPC linear system (data prediction).

    b_k = k! * phi_{k+1}(-h) / B(h) with phi computed by the recurrence
    phi_{k+1} = (phi_k - 1/k!) / (-h); B(h) = -h (bh1) or expm1(-h) (bh2).
    """
    hh = -h
    if variant == "bh1":
        b_h = hh
    elif variant == "bh2":
        b_h = math.expm1(hh)
    else:
        raise HuabiError(f"variant: UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    phi = math.expm1(hh) / hh - 1.0
    factorial = 1.0
    b = []
    for k in range(1, order + 1):
        b.append(phi * factorial / b_h)
        factorial *= k + 1
        phi = phi / hh - 1.0 / factorial
    return np.array(b, dtype=np.float64), b_h


def sample_unipc(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    on_step: StepCallback | None = None,
    order: int = 3,
    variant: str = "bh1",
    lower_order_final: bool = True,
    use_corrector: bool = True,
) -> Tensor:
    """UniPC (Zhao et al. 2023): multistep predictor UniP plus corrector UniC, data prediction.

    Defaults are A1111's settings (variant bh1, order 3, lower order at the
    end); diffusers' UniPCMultistepScheduler defaults to bh2 and order 2.
    The corrector reuses each new model evaluation to refine the latent it
    was made at, so it costs no extra calls.  The step to sigma = 0 is always
    first order (its step size in lambda is infinite).
    """
    if order < 1:
        raise HuabiError(f"order: UniPC order must be >= 1, got {order}")
    if variant not in ("bh1", "bh2"):
        raise HuabiError(f"variant: UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    s = checked_sigmas(x, sigmas)
    total = len(s) - 1
    history: list[tuple[float, Tensor]] = []  # (lambda, denoised), newest last
    last_x: Tensor | None = None
    last_order = 0
    for i in range(total):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = call_denoiser(denoiser, x, sigma)
        lam = -math.log(sigma)
        if use_corrector and last_x is not None:
            x = _unic(last_x, history, lam, sigma, s[i - 1], denoised, last_order, variant)
        history.append((lam, denoised))
        if len(history) > order:
            history.pop(0)
        step_order = min(order, total - i) if lower_order_final else order
        step_order = min(step_order, len(history))
        if sigma_next == 0:
            step_order = 1
        last_x, last_order = x, step_order
        x = _unip(x, history, sigma, sigma_next, step_order, variant)
        report_step(on_step, i, total, x, denoised)
    return x


def _unip(x: Tensor, history: list[tuple[float, Tensor]], sigma: float, sigma_next: float, order: int, variant: str) -> Tensor:
    lam0, m0 = history[-1]
    if sigma_next == 0:
        return m0
    h = math.log(sigma / sigma_next)
    x_next = x * (sigma_next / sigma) - m0 * math.expm1(-h)
    if order < 2:
        return x_next
    rks = [(history[-(k + 1)][0] - lam0) / h for k in range(1, order)]
    b, b_h = _unipc_coefficients(rks, h, order, variant)
    if order == 2:
        rhos = np.array([0.5])
    else:
        matrix = np.array([[r ** (row) for r in rks] for row in range(order - 1)])
        rhos = np.linalg.solve(matrix, b[:-1])
    correction = sum(
        (history[-(k + 1)][1] - m0) * (float(rhos[k - 1]) / rks[k - 1]) for k in range(1, order)
    )
    return x_next - correction * b_h


def _unic(
    last_x: Tensor,
    history: list[tuple[float, Tensor]],
    lam_now: float,
    sigma_now: float,
    sigma_prev: float,
    denoised_now: Tensor,
    order: int,
    variant: str,
) -> Tensor:
    lam0, m0 = history[-1]
    h = lam_now - lam0
    x_now = last_x * (sigma_now / sigma_prev) - m0 * math.expm1(-h)
    rks = [(history[-(k + 1)][0] - lam0) / h for k in range(1, order)]
    b, b_h = _unipc_coefficients(rks, h, order, variant)
    if order == 1:
        rhos = np.array([0.5])
    else:
        nodes = rks + [1.0]
        matrix = np.array([[r**row for r in nodes] for row in range(order)])
        rhos = np.linalg.solve(matrix, b)
    correction = (denoised_now - m0) * float(rhos[-1])
    for k in range(1, order):
        correction = correction + (history[-(k + 1)][1] - m0) * (float(rhos[k - 1]) / rks[k - 1])
    return x_now - correction * b_h


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class SamplerSpec:
    """How to run one user-facing sampler.

    ``default_schedule`` is what "Automatic" means for it (A1111's choice);
    ``needs_noise``: the caller must pass a NoiseSampler; ``brownian``: that
    noise should be a ``BrownianNoiseSampler``; ``discard_penultimate_sigma``:
    A1111 drops the next-to-last sigma for it; ``second_order``: two model
    calls per step (progress bars count them).
    """

    name: str
    fn: Callable[..., Tensor]
    default_schedule: str
    needs_noise: bool = False
    brownian: bool = False
    discard_penultimate_sigma: bool = False
    second_order: bool = False


def _spec(name: str, fn: Callable[..., Tensor], schedule: str, **flags: bool) -> tuple[str, SamplerSpec]:
    return name, SamplerSpec(name=name, fn=fn, default_schedule=schedule, **flags)


# Automatic schedules follow A1111 (sd_samplers_kdiffusion.py options): Karras for
# the DPM-Solver family and DPM2, Exponential for DPM++ 2M SDE, the model's own
# "Normal" (k-diffusion get_sigmas) otherwise.  UniPC and DDIM are A1111
# "timestep" samplers: DDIM uses the CompVis DDIM timesteps; UniPC's own
# time-uniform spacing is uniform in model timestep, which is "Normal" here.
SAMPLERS: Mapping[str, SamplerSpec] = MappingProxyType(
    dict(
        [
            _spec("Euler", sample_euler, "Normal"),
            _spec("Euler a", sample_euler_ancestral, "Normal", needs_noise=True),
            _spec("Heun", sample_heun, "Normal", second_order=True),
            _spec("LMS", sample_lms, "Normal"),
            _spec("DPM2", sample_dpm_2, "Karras", discard_penultimate_sigma=True, second_order=True),
            _spec(
                "DPM2 a",
                sample_dpm_2_ancestral,
                "Karras",
                needs_noise=True,
                discard_penultimate_sigma=True,
                second_order=True,
            ),
            _spec("DPM++ 2M", sample_dpmpp_2m, "Karras"),
            _spec("DPM++ 2M SDE", sample_dpmpp_2m_sde, "Exponential", needs_noise=True, brownian=True),
            _spec("DPM++ 3M SDE", sample_dpmpp_3m_sde, "Exponential", needs_noise=True, brownian=True,
                  discard_penultimate_sigma=True),
            _spec("DPM++ SDE", sample_dpmpp_sde, "Karras", needs_noise=True, brownian=True, second_order=True),
            _spec("DPM++ 2S a", sample_dpmpp_2s_ancestral, "Karras", needs_noise=True, second_order=True),
            _spec("DDIM", sample_ddim, "DDIM"),
            _spec("UniPC", sample_unipc, "Normal"),
            _spec("LCM", sample_lcm, "Normal", needs_noise=True),
            _spec("Restart", sample_restart, "Karras", needs_noise=True, second_order=True),
        ]
    )
)


def get_sampler(name: str) -> SamplerSpec:
    """The registered sampler for a user-facing name (case-insensitive, A1111 aliases accepted)."""
    canonical = canonical_sampler_name(name) if isinstance(name, str) else None
    if canonical is None or canonical not in SAMPLERS:
        raise HuabiError(f"sampler: unknown sampler {name!r}; valid: {', '.join(SAMPLER_NAMES)}")
    return SAMPLERS[canonical]


__all__ = [
    "SAMPLERS",
    "Denoiser",
    "SamplerSpec",
    "ancestral_step",
    "get_sampler",
    "lms_coefficient",
    "restart_plan",
    "sample_ddim",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lcm",
    "sample_lms",
    "sample_restart",
    "sample_unipc",
]
