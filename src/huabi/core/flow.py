"""Flow matching (rectified flow) for SD3/SD3.5 and FLUX.1: sigmas, samplers, guidance. No I/O.

Space: ``x_sigma = (1 - sigma) * x0 + sigma * noise`` with sigma in [0, 1]; the model predicts the
velocity ``v = noise - x0``, so the clean estimate is ``denoised = x - sigma * v``. With that
denoiser, huabi's sigma-space samplers integrate the flow ODE ``dx/dsigma = v`` exactly as written
(``(x - denoised) / sigma == v``): Euler and Heun are used unchanged. Samplers whose maths assumes
``x = x0 + sigma * noise`` get flow versions here: DPM++ 2M with ``alpha = 1 - sigma`` (the general
DPM-Solver++ form), and ``Euler a`` re-noising so the marginal stays ``(1 - s) x0 + s noise``.

Schedules: ``Simple`` is Forge/ComfyUI's default and diffusers' FluxPipeline's: ``linspace(1, 1/n, n)``
shifted, then 0. The shift ``s`` maps ``sigma -> s*sigma / (1 + (s - 1)*sigma)``; SD3 uses a fixed
``s = 3``, FLUX dev ``s = exp(mu)`` with ``mu`` linear in the number of latent patches
(0.5 at 256 patches, 1.15 at 4096 = a 1024x1024 image), FLUX schnell ``s = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from huabi.core.samplers import (
    Denoiser,
    StepCallback,
    call_denoiser,
    checked_sigmas,
    dpmpp_2m_loop,
    report_step,
    sample_euler,
    sample_heun,
)
from huabi.errors import HuabiError

SD3_SHIFT = 3.0
FLUX_BASE_SEQ_LEN, FLUX_MAX_SEQ_LEN = 256, 4096
FLUX_BASE_SHIFT, FLUX_MAX_SHIFT = 0.5, 1.15
FLOW_SCHEDULES = ("Simple", "Uniform")
FLOW_SAMPLERS = ("Euler", "Euler a", "Heun", "DPM++ 2M")


def flux_mu(image_seq_len: int) -> float:
    """FLUX's resolution-dependent shift exponent (diffusers' ``calculate_shift`` defaults)."""
    slope = (FLUX_MAX_SHIFT - FLUX_BASE_SHIFT) / (FLUX_MAX_SEQ_LEN - FLUX_BASE_SEQ_LEN)
    return image_seq_len * slope + (FLUX_BASE_SHIFT - slope * FLUX_BASE_SEQ_LEN)


def flux_shift_for(width_px: int, height_px: int, *, vae_scale: int = 8, patch: int = 2) -> float:
    """The shift FLUX dev uses at this image size: ``exp(mu)`` of its patch count."""
    patches = (height_px // vae_scale // patch) * (width_px // vae_scale // patch)
    return math.exp(flux_mu(patches))


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """``s*sigma / (1 + (s-1)*sigma)``: spends more steps at high noise for s > 1 (SD3 3.0; FLUX exp(mu))."""
    if not (shift > 0 and math.isfinite(shift)):
        raise HuabiError(f"shift: must be a positive number, got {shift}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(steps: int, *, shift: float, schedule: str = "Simple") -> Tensor:
    """``steps + 1`` descending flow sigmas ending in 0 (float64 on the CPU).

    ``Simple``: shifted ``linspace(1, 1/steps, steps)`` (Forge/ComfyUI "Simple", diffusers' FLUX pipeline).
    ``Uniform``: diffusers' SD3 default, ``linspace(1, s_min, steps)`` shifted, with ``s_min`` the shifted
    1/1000 of the training grid.
    """
    if steps < 1:
        raise HuabiError(f"steps: must be >= 1, got {steps}")
    if schedule == "Simple":
        base = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    elif schedule == "Uniform":
        sigma_min = float(shift_sigmas(torch.tensor(1e-3, dtype=torch.float64), shift))
        base = torch.linspace(1.0, sigma_min, steps, dtype=torch.float64)
    else:
        raise HuabiError(f"schedule: {schedule!r} is not a flow-matching schedule; valid: {', '.join(FLOW_SCHEDULES)}")
    return torch.cat([shift_sigmas(base, shift), torch.zeros(1, dtype=torch.float64)])


def start_index_for_strength(steps: int, strength: float) -> int:
    """img2img: the first of ``steps`` steps to run at ``strength`` (diffusers' rule: the last
    ``int(steps * strength)`` steps run). A1111's rule runs ``steps`` steps of a longer schedule instead."""
    if not 0.0 < strength <= 1.0:
        raise HuabiError(f"denoising strength: must be in (0, 1], got {strength}")
    return steps - min(int(steps * strength), steps)


# --------------------------------------------------------------------------- denoisers


def velocity_denoiser(model: Callable[[Tensor, Tensor], Tensor]) -> Denoiser:
    """``model(x, sigma) -> velocity`` as a denoiser returning the clean estimate ``x - sigma * v``."""

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        velocity = model(x, sigma)
        return x - sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) * velocity

    return denoise


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)`` (on velocity or on denoised alike)."""
    return uncond + scale * (cond - uncond)


# --------------------------------------------------------------------------- flow samplers


def sample_euler_ancestral_flow(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise=None,
    on_step: StepCallback | None = None,
    eta: float = 1.0,
) -> Tensor:
    """Euler a in flow space: an ODE step down to ``sigma_down`` then fresh noise up to ``sigma_next``.

    ``sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)``; the deterministic part is
    scaled by ``alpha_next / alpha_down`` (alpha = 1 - sigma) and noise added so the total noise
    is exactly ``sigma_next`` and the signal ``(1 - sigma_next) * x0``.
    """
    s = checked_sigmas(x, sigmas)
    if noise is None and eta > 0:
        raise HuabiError("noise: sampler 'Euler a' needs a noise sampler (it adds fresh noise every step)")
    total = len(s) - 1
    for i in range(total):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = call_denoiser(denoiser, x, sigma)
        if sigma_next == 0 or eta == 0:
            x = denoised + (x - denoised) * (sigma_next / sigma)
        else:
            sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
            alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
            x_down = denoised + (x - denoised) * (sigma_down / sigma)
            renoise = math.sqrt(max(sigma_next**2 - (sigma_down * alpha_next / alpha_down) ** 2, 0.0))
            x = x_down * (alpha_next / alpha_down) + noise(sigmas[i], sigmas[i + 1]) * renoise
        report_step(on_step, i, total, x, denoised)
    return x


def sample_dpmpp_2m_flow(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise=None,
    on_step: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) with ``alpha = 1 - sigma``, ``lambda = log(alpha / sigma)``; first order on the
    first step and on the step to 0 (as diffusers' ``DPMSolverMultistepScheduler(use_flow_sigmas=True)``).
    The loop and the update are sigma space's (:func:`huabi.core.samplers.dpmpp_2m_loop`)."""

    def lam(sigma: float) -> float:
        # -inf at sigma = 1 (pure noise): clamped, so expm1(-h) there is -1 to double precision
        return math.log(max(1.0 - sigma, 1e-30)) - math.log(sigma)

    return dpmpp_2m_loop(denoiser, x, sigmas, on_step=on_step,
                         lambda_step=lambda sigma, sigma_next: lam(sigma_next) - lam(sigma),
                         alpha=lambda sigma: 1.0 - sigma)


_FLOW_SAMPLER_FUNCTIONS = {
    "Euler": sample_euler,
    "Euler a": sample_euler_ancestral_flow,
    "Heun": sample_heun,
    "DPM++ 2M": sample_dpmpp_2m_flow,
}


def get_flow_sampler(name: str):
    """The flow-space sampler for an A1111/Forge sampler name (case-insensitive)."""
    for canonical, fn in _FLOW_SAMPLER_FUNCTIONS.items():
        if name.strip().lower() == canonical.lower():
            return canonical, fn
    raise HuabiError(f"sampler: {name!r} is not available for SD3/FLUX (flow matching); valid: {', '.join(FLOW_SAMPLERS)}")


def flow_sampler_needs_noise(name: str) -> bool:
    return get_flow_sampler(name)[0] == "Euler a"
