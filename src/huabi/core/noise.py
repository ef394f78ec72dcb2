"""Seeded noise: the same seed gives the same image on any device and batch size.

All random numbers are drawn on the CPU, one generator per image, then moved
to the sampling device (A1111's "CPU" RNG convention).  Image ``i`` of a batch
with seeds ``[s, s + 1, ...]`` is therefore bit-identical to a single-image
run with seed ``s + i``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from huabi.errors import HuabiError

_MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed accepts 64-bit seeds


class NoiseSampler(Protocol):
    """Fresh noise for a step from ``sigma`` to ``sigma_next``, shaped like the latent batch."""

    def __call__(self, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor: ...


def check_seeds(seeds: Sequence[int]) -> list[int]:
    if isinstance(seeds, (int, str, bytes)) or len(seeds) == 0:
        raise HuabiError("seeds: must be a non-empty list of integers, one per image")
    checked = []
    for seed in seeds:
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= _MAX_SEED:
            raise HuabiError(f"seeds: each seed must be an integer from 0 to 2**64-1, got {seed!r}")
        checked.append(seed)
    return checked


def check_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 0 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise HuabiError(f"shape: must be positive integers per image, e.g. (4, 64, 64), got {shape!r}")
    return tuple(shape)


def _cpu_generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def initial_noise(
    seeds: Sequence[int],
    shape: tuple[int, int, int],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Unit-variance starting noise ``[len(seeds), *shape]``; image i from ``seeds[i]`` alone."""
    seeds = check_seeds(seeds)
    shape = check_shape(shape)
    noise = torch.stack([torch.randn(shape, generator=_cpu_generator(s)) for s in seeds])
    return noise.to(device=device, dtype=dtype)


class SeededNoiseSampler:
    """Per-image CPU generators that keep drawing after the initial noise.

    With ``skip_initial=True`` (the default) each generator first draws and
    discards one ``shape`` tensor, the one ``initial_noise`` returned, so the
    noise an ancestral sampler gets continues the same stream A1111's ImageRNG
    would give.  Pass ``skip_initial=False`` when the initial noise came from
    elsewhere (img2img adds its noise through this sampler's first draw).
    """

    def __init__(
        self,
        seeds: Sequence[int],
        shape: tuple[int, int, int],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        skip_initial: bool = True,
    ) -> None:
        self.seeds = check_seeds(seeds)
        self.shape = check_shape(shape)
        self.device = torch.device(device)
        self.dtype = dtype
        self._generators = [_cpu_generator(s) for s in self.seeds]
        if skip_initial:
            for generator in self._generators:
                torch.randn(self.shape, generator=generator)

    def draw(self) -> Tensor:
        """The next ``[B, *shape]`` standard normal draw, on the sampler's device and dtype."""
        noise = torch.stack([torch.randn(self.shape, generator=g) for g in self._generators])
        return noise.to(device=self.device, dtype=self.dtype)

    def __call__(self, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
        return self.draw()


class BrownianNoiseSampler:
    """Noise from one Brownian tree per image (for the SDE samplers).

    ``noise(sigma, sigma_next)`` is the tree's increment between the two
    noise levels divided by ``sqrt(|sigma_next - sigma|)``: standard normal,
    and correlated across steps the way a Brownian path is, so the SDE result
    changes little with the number of steps.  Trees live on the CPU in
    float32 whatever ``x`` is, so results do not depend on the device.
    """

    def __init__(self, x: Tensor, sigma_min: float, sigma_max: float, seeds: Sequence[int]) -> None:
        import torchsde  # imported here: only the SDE samplers need it

        self.seeds = check_seeds(seeds)
        if x.ndim < 2 or x.shape[0] != len(self.seeds):
            raise HuabiError(
                f"seeds: need one seed per image, got {len(self.seeds)} seeds for a batch of {x.shape[0] if x.ndim else 0}"
            )
        sigma_min, sigma_max = float(sigma_min), float(sigma_max)
        if not 0 <= sigma_min < sigma_max:
            raise HuabiError(f"sigma_min/sigma_max: need 0 <= sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.device = x.device
        self.dtype = x.dtype
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self._trees = [
            torchsde.BrownianInterval(
                t0=sigma_min,
                t1=sigma_max,
                size=tuple(x.shape[1:]),
                dtype=torch.float32,
                device="cpu",
                entropy=seed,
                tol=1e-6,
                pool_size=24,
                halfway_tree=True,
            )
            for seed in self.seeds
        ]

    @classmethod
    def for_sigmas(cls, x: Tensor, sigmas: Tensor, seeds: Sequence[int]) -> "BrownianNoiseSampler":
        """The tree k-diffusion/A1111 build for a run: from the smallest positive sigma to the largest."""
        positive = sigmas[sigmas > 0]
        if positive.numel() == 0:
            raise HuabiError("sigmas: need at least one positive noise level for a Brownian tree")
        return cls(x, positive.min().item(), positive.max().item(), seeds)

    def __call__(self, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
        # Query times are kept in the caller's precision: the SDE samplers pass
        # float32 tensors exactly as k-diffusion computes them, and a Brownian
        # path is rough enough that a 1-ulp change in a time moves the draw.
        t_a = torch.as_tensor(sigma).detach().cpu()
        t_b = torch.as_tensor(sigma_next).detach().cpu()
        sign = 1.0
        if t_a > t_b:
            t_a, t_b, sign = t_b, t_a, -1.0
        increment = torch.stack([self._query(tree, t_a, t_b) for tree in self._trees]) * sign
        scale = (t_b - t_a).abs().sqrt()
        return (increment / scale).to(device=self.device, dtype=self.dtype)

    @staticmethod
    def _query(tree, t_a: Tensor, t_b: Tensor) -> Tensor:
        # torchsde rounds the tree's ends to its tolerance and clamps (with a
        # warning) queries just outside them, as a lambda round trip of
        # sigma_min can be; clamp the same way here, silently.
        start, end = getattr(tree, "_start", None), getattr(tree, "_end", None)
        a, b = float(t_a), float(t_b)
        if start is not None and end is not None:
            a, b = min(max(a, start), end), min(max(b, start), end)
        return tree(a, b)


__all__ = ["BrownianNoiseSampler", "NoiseSampler", "SeededNoiseSampler", "initial_noise"]
