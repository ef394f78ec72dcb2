"""Restart sampling (Xu et al. 2023) as A1111's "Restart" sampler.

The reference below is written from the paper's algorithm, with its own structure: the main
schedule and every restart segment are computed by hand from Karras et al.'s formula, and the
sampler is an explicit loop over a restart table (row = restart point t_min, jump target t_max,
K repetitions, N steps per segment): solve the ODE down the main schedule with Heun (Euler to 0);
on reaching a row's t_min, K times: add noise of variance t_max^2 - t_min^2 (the forward process),
then solve back down from t_max to t_min with the segment's Heun steps. A1111's automatic table
(what "Restart" does with no settings): 20+ steps -> one restart of 9 steps from ~0.1 to ~2 (36+
steps: two of steps // 4), the main schedule re-made as Karras over the same range with those
steps taken out.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from huabi.core.samplers import SAMPLERS, get_sampler, restart_plan, sample_heun, sample_restart
from huabi.core.schedules import sigmas_karras

TOL = 1e-12  # float64 throughout: the two must agree to rounding


class TinyDenoiser(torch.nn.Module):
    """A small random conv net as an eps-model, in float64: denoised = x - sigma * eps(x / sqrt(1 + sigma^2))."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(16, 4, 3, padding=1)
        ).double().requires_grad_(False)
        self.calls = 0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        sigma = sigma.to(x.dtype).view(-1, 1, 1, 1)
        return x - sigma * self.net(x / torch.sqrt(1 + sigma**2))


class FixedNoise:
    """Pre-drawn unit noise, handed out in order (the reference takes the same list)."""

    def __init__(self, draws: list[torch.Tensor]) -> None:
        self.draws = list(draws)
        self.used = 0

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        self.used += 1
        return self.draws[self.used - 1]


def karras_by_hand(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """n Karras sigmas from sigma_max down to sigma_min (no trailing zero), computed in float64 and
    stored as float32, as schedules are (A1111's and huabi's sigma tensors are float32)."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [float(np.float32((hi + k / (n - 1) * (lo - hi)) ** rho)) for k in range(n)]


def heun_by_hand(model, x, t, t_next):
    d = (x - model(x, torch.full((x.shape[0],), t, dtype=torch.float64))) / t
    if t_next == 0:
        return x + (t_next - t) * d
    x_euler = x + (t_next - t) * d
    d_next = (x_euler - model(x_euler, torch.full((x.shape[0],), t_next, dtype=torch.float64))) / t_next
    return x + (t_next - t) * 0.5 * (d + d_next)


def restart_reference(model, x, main: list[float], table: list[dict], noise_draws: list[torch.Tensor]):
    """The paper's Restart loop over an explicit table; ``main`` ends with 0."""
    draws = iter(noise_draws)
    for i in range(len(main) - 1):
        x = heun_by_hand(model, x, main[i], main[i + 1])
        for row in table:
            if row["index"] != i + 1:
                continue
            t_min, t_max = main[row["index"]], main[row["top"]]
            segment = karras_by_hand(row["steps"], t_min, t_max)  # t_max ... t_min
            for _ in range(row["times"]):
                x = x + next(draws) * math.sqrt(t_max**2 - t_min**2)
                for k in range(len(segment) - 1):
                    x = heun_by_hand(model, x, segment[k], segment[k + 1])
    return x


def nearest_index(values: list[float], target: float) -> int:
    return int(np.argmin(np.abs(np.asarray(values) - target)))


def automatic_table(steps: int, sigma_min: float, sigma_max: float) -> tuple[list[float], list[dict]]:
    """A1111's automatic choice, written out: (main schedule with its 0, table)."""
    if steps < 20:
        raise ValueError("no restarts below 20 steps")
    seg_steps, times = (steps // 4, 2) if steps >= 36 else (9, 1)
    main = karras_by_hand(steps - seg_steps * times, sigma_min, sigma_max) + [0.0]
    index, top = nearest_index(main, 0.1), nearest_index(main, 2.0)
    return main, [{"index": index, "top": top, "steps": seg_steps + 1, "times": times}]


def start(seed: int = 0, sigma_max: float = 14.6) -> torch.Tensor:
    return torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * sigma_max


def draws(count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    return [torch.randn((2, 4, 8, 8), generator=g, dtype=torch.float64) for _ in range(count)]


@pytest.mark.parametrize("steps", [20, 27, 40])
def test_automatic_restart_equals_the_papers_loop(steps):
    sigmas = sigmas_karras(steps, 0.0292, 14.6).to(torch.float64)
    model, x = TinyDenoiser(), start()
    noise_list = draws(4)
    ours = sample_restart(model, x.clone(), sigmas, noise=FixedNoise(noise_list))
    main, table = automatic_table(steps, float(sigmas[-2]), float(sigmas[0]))
    reference = restart_reference(model, x.clone(), main, table, noise_list)
    assert torch.allclose(ours, reference, rtol=0, atol=TOL * float(reference.abs().max()))
    assert not torch.allclose(ours, sample_heun(model, x.clone(), sigmas), atol=1e-3)  # restarts did something


def test_model_calls_and_noise_draws_follow_the_table():
    steps = 40  # two restarts of 10 steps: main 20 steps
    sigmas = sigmas_karras(steps, 0.0292, 14.6).to(torch.float64)
    model, noise = TinyDenoiser(), FixedNoise(draws(4))
    sample_restart(model, start(), sigmas, noise=noise)
    main_pairs, restart_pairs = 20, 2 * 10
    assert noise.used == 2
    assert model.calls == 2 * (main_pairs + restart_pairs) - 1  # Heun everywhere, Euler for the last step to 0
    main, pairs = restart_plan(sigmas.tolist())
    assert len(pairs) == steps and len(main) == 21


def test_below_twenty_steps_it_is_heun():
    sigmas = sigmas_karras(12, 0.0292, 14.6).to(torch.float64)
    model, x = TinyDenoiser(), start()
    assert torch.equal(sample_restart(model, x.clone(), sigmas), sample_heun(model, x.clone(), sigmas))


def test_an_explicit_table_equals_the_reference_and_the_interval_matters():
    sigmas = sigmas_karras(14, 0.0292, 14.6).to(torch.float64)
    values = sigmas.tolist()
    model, x, noise_list = TinyDenoiser(), start(1), draws(6)
    table_in = {0.5: (6, 2, 3.0)}
    ours = sample_restart(model, x.clone(), sigmas, noise=FixedNoise(noise_list), restart_list=table_in)
    table = [{"index": nearest_index(values, 0.5), "top": nearest_index(values, 3.0), "steps": 6, "times": 2}]
    reference = restart_reference(model, x.clone(), values, table, noise_list)
    assert torch.allclose(ours, reference, rtol=0, atol=TOL * float(reference.abs().max()))
    # mutation-sensitive: another interval (t_max), repeat count or restart point changes the result
    for other in ({0.5: (6, 2, 5.0)}, {0.5: (6, 1, 3.0)}, {1.0: (6, 2, 3.0)}, {0.5: (4, 2, 3.0)}):
        changed = sample_restart(model, x.clone(), sigmas, noise=FixedNoise(noise_list), restart_list=other)
        assert (changed - ours).abs().max() > 1e-3, other


def test_s_noise_scales_the_restart_noise():
    sigmas = sigmas_karras(20, 0.0292, 14.6).to(torch.float64)
    model, x, noise_list = TinyDenoiser(), start(2), draws(2)
    half = sample_restart(model, x.clone(), sigmas, noise=FixedNoise(noise_list), s_noise=0.5)
    scaled = sample_restart(model, x.clone(), sigmas, noise=FixedNoise([d * 0.5 for d in noise_list]))
    assert torch.allclose(half, scaled, rtol=0, atol=1e-12)


def test_registered_as_a1111_names_it():
    spec = get_sampler("restart")
    assert spec is SAMPLERS["Restart"] and spec.default_schedule == "Karras" and spec.needs_noise and spec.second_order
