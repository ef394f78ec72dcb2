"""Seeded noise: A1111's CPU convention, batch-vs-single identity, Brownian trees."""

from __future__ import annotations

import pytest
import torch

from huabi.core.noise import BrownianNoiseSampler, SeededNoiseSampler, initial_noise
from huabi.errors import HuabiError

SHAPE = (4, 8, 8)


def test_initial_noise_is_a1111_cpu_randn():
    want = torch.randn((4, 8, 8), generator=torch.Generator("cpu").manual_seed(1234))
    got = initial_noise([1234], (4, 8, 8))
    assert got.shape == (1, 4, 8, 8)
    assert torch.equal(got[0], want)


def test_initial_noise_batch_equals_single_runs():
    batch = initial_noise([7, 8, 9], SHAPE)
    for i, seed in enumerate([7, 8, 9]):
        assert torch.equal(batch[i], initial_noise([seed], SHAPE)[0])


def test_initial_noise_device_and_dtype():
    half = initial_noise([3], SHAPE, device="cpu", dtype=torch.float16)
    assert half.dtype == torch.float16 and half.device.type == "cpu"
    assert torch.equal(half, initial_noise([3], SHAPE).to(torch.float16))


def test_large_seeds_are_accepted():
    assert torch.isfinite(initial_noise([2**32 + 5, 2**64 - 1], SHAPE)).all()


def test_seeded_sampler_continues_the_initial_stream():
    generator = torch.Generator("cpu").manual_seed(42)
    first = torch.randn(SHAPE, generator=generator)
    second = torch.randn(SHAPE, generator=generator)
    third = torch.randn(SHAPE, generator=generator)
    assert torch.equal(initial_noise([42], SHAPE)[0], first)
    sampler = SeededNoiseSampler([42], SHAPE)
    assert torch.equal(sampler(1.0, 0.5)[0], second)
    assert torch.equal(sampler(0.5, 0.1)[0], third)
    # Without skipping, the first draw is the initial noise itself.
    assert torch.equal(SeededNoiseSampler([42], SHAPE, skip_initial=False).draw()[0], first)


def test_seeded_sampler_batch_equals_single_runs():
    batch = SeededNoiseSampler([5, 6], SHAPE)
    singles = [SeededNoiseSampler([5], SHAPE), SeededNoiseSampler([6], SHAPE)]
    for _ in range(3):
        drawn = batch(1.0, 0.5)
        assert drawn.shape == (2, *SHAPE)
        for i, single in enumerate(singles):
            assert torch.equal(drawn[i], single(1.0, 0.5)[0])


def test_seeded_sampler_device_and_dtype():
    sampler = SeededNoiseSampler([5], SHAPE, device="cpu", dtype=torch.float64)
    assert sampler(1.0, 0.5).dtype == torch.float64


def test_brownian_batch_equals_single_runs():
    x = torch.zeros(2, *SHAPE)
    batch = BrownianNoiseSampler(x, 0.03, 14.6, [10, 11])
    singles = [BrownianNoiseSampler(x[:1], 0.03, 14.6, [s]) for s in (10, 11)]
    for sigma, sigma_next in [(14.6, 7.0), (7.0, 3.3), (3.3, 0.03)]:
        drawn = batch(torch.tensor(sigma), torch.tensor(sigma_next))
        assert drawn.shape == (2, *SHAPE)
        for i, single in enumerate(singles):
            assert torch.equal(drawn[i], single(torch.tensor(sigma), torch.tensor(sigma_next))[0])


@pytest.mark.filterwarnings("ignore:Should have t:UserWarning")  # diffusers' tree warns on float32 ends
def test_brownian_matches_diffusers_tree_per_seed():
    # diffusers' BrownianTreeNoiseSampler with a list of seeds keeps one
    # torchsde tree per image, as k-diffusion and A1111 do.
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    x = torch.zeros(2, *SHAPE)
    ours = BrownianNoiseSampler(x, 0.03, 14.6, [3, 4])
    theirs = BrownianTreeNoiseSampler(x, 0.03, 14.6, [3, 4])
    for sigma, sigma_next in [(14.6, 5.0), (5.0, 1.0), (1.0, 0.2)]:
        a = ours(torch.tensor(sigma), torch.tensor(sigma_next))
        b = theirs(torch.tensor(sigma), torch.tensor(sigma_next))
        assert torch.equal(a, b)


def test_brownian_noise_is_a_normalised_path_increment():
    x = torch.zeros(1, 4, 32, 32)
    sampler = BrownianNoiseSampler(x, 0.1, 10.0, [1])
    forward = sampler(torch.tensor(8.0), torch.tensor(2.0))
    backward = sampler(torch.tensor(2.0), torch.tensor(8.0))
    assert torch.allclose(forward, -backward)
    assert 0.9 < float(forward.std()) < 1.1  # 4096 samples: std within 10 %
    # Increments over [2, 5] and [5, 8] add up to the one over [2, 8].
    whole = sampler(torch.tensor(2.0), torch.tensor(8.0)) * 6**0.5
    parts = sampler(torch.tensor(2.0), torch.tensor(5.0)) * 3**0.5 + sampler(torch.tensor(5.0), torch.tensor(8.0)) * 3**0.5
    assert torch.allclose(whole, parts, atol=1e-5)


def test_brownian_for_sigmas_uses_the_positive_range():
    x = torch.zeros(1, *SHAPE)
    sigmas = torch.tensor([14.6, 3.0, 0.5, 0.0])
    sampler = BrownianNoiseSampler.for_sigmas(x, sigmas, [9])
    assert (sampler.sigma_min, sampler.sigma_max) == (float(sigmas[2]), float(sigmas[0]))
    with pytest.raises(HuabiError, match="sigmas: need at least one positive noise level for a Brownian tree"):
        BrownianNoiseSampler.for_sigmas(x, torch.zeros(2), [9])


def test_brownian_returns_x_dtype():
    x = torch.zeros(1, *SHAPE, dtype=torch.float64)
    assert BrownianNoiseSampler(x, 0.1, 10.0, [1])(torch.tensor(5.0), torch.tensor(1.0)).dtype == torch.float64


def test_brownian_queries_just_outside_the_range_are_clamped_quietly(recwarn):
    x = torch.zeros(1, *SHAPE)
    sampler = BrownianNoiseSampler(x, 0.0291675366461277, 14.614641189575195, [1])
    out = sampler(torch.tensor(14.614642), torch.tensor(0.02916753))
    assert torch.isfinite(out).all()
    assert not [w for w in recwarn if "Should have" in str(w.message)]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("seeds", "message"),
    [
        ([], "seeds: must be a non-empty list of integers, one per image"),
        (5, "seeds: must be a non-empty list of integers, one per image"),
        ([1, -2], r"seeds: each seed must be an integer from 0 to 2\*\*64-1, got -2"),
        ([1.5], r"seeds: each seed must be an integer from 0 to 2\*\*64-1, got 1.5"),
        ([True], r"seeds: each seed must be an integer from 0 to 2\*\*64-1, got True"),
        ([2**64], r"seeds: each seed must be an integer from 0 to 2\*\*64-1, got 18446744073709551616"),
    ],
)
def test_bad_seeds_are_named(seeds, message):
    with pytest.raises(HuabiError, match=message):
        initial_noise(seeds, SHAPE)
    with pytest.raises(HuabiError, match=message):
        SeededNoiseSampler(seeds, SHAPE)


@pytest.mark.parametrize("shape", [(), (4, 0, 8), (4, -1, 8), (4, 8.0, 8)])
def test_bad_shape_is_named(shape):
    with pytest.raises(HuabiError, match=r"shape: must be positive integers per image"):
        initial_noise([1], shape)


def test_brownian_seed_count_must_match_batch():
    with pytest.raises(HuabiError, match=r"seeds: need one seed per image, got 1 seeds for a batch of 2"):
        BrownianNoiseSampler(torch.zeros(2, *SHAPE), 0.1, 10.0, [1])


def test_brownian_bad_range_is_named():
    with pytest.raises(HuabiError, match=r"sigma_min/sigma_max: need 0 <= sigma_min < sigma_max, got 5.0, 1.0"):
        BrownianNoiseSampler(torch.zeros(1, *SHAPE), 5.0, 1.0, [1])
