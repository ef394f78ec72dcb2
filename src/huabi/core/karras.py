"""The Karras et al. (2022) noise levels on their own, so that both the schedules and a sampler that
re-plans its schedule (Restart) use one formula without importing each other."""

from __future__ import annotations

import torch
from torch import Tensor


def karras_levels(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """``n`` sigmas evenly spaced in sigma**(1/rho) from ``sigma_max`` down to ``sigma_min``, then 0
    (computed in float64, stored as float32 like every schedule). Callers check the arguments."""
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    top, bottom = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    levels = (top + ramp * (bottom - top)) ** rho
    return torch.cat([levels, levels.new_zeros(1)]).to(torch.float32)
