"""Variation seeds and seed resize (A1111's "Extra" seed options), on tiny random-weight models.

Tolerances: exact (``torch.equal`` / identical pixels) where the same float
operations run; slerp is checked against a float64 per-column formula to 1e-5.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from huabi.core.guidance import CFGDenoiser, PredictionDenoiser
from huabi.core.infotext import format_infotext, request_from_infotext
from huabi.core.noise import SeededNoiseSampler, initial_noise
from huabi.core.request import GenerationRequest
from huabi.core.samplers import get_sampler
from huabi.core.schedules import DiscreteSchedule, compute_sigmas
from huabi.core.variation import NoiseVariation, paste_centred, slerp_noise, variation_noise
from huabi.errors import HuabiError
from huabi.models.load import load_model
from huabi.pipelines.common import decode_latents, denoise, encode_guidance, latent_shape

SIZE_PX = 64
CPU = torch.device("cpu")


def _randn(seed, shape):
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def test_slerp_matches_per_column_formula():
    low, high = _randn(1, (4, 8, 6)), _randn(2, (4, 8, 6))
    got = slerp_noise(0.3, low, high).double().numpy()
    a, b = low.double().numpy(), high.double().numpy()
    expected = np.empty_like(a)
    for c in range(4):
        for x in range(6):  # A1111 measures the angle along the height axis, per (channel, column)
            u, v = a[c, :, x], b[c, :, x]
            omega = math.acos(np.dot(u, v) / np.linalg.norm(u) / np.linalg.norm(v))
            expected[c, :, x] = (math.sin(0.7 * omega) * u + math.sin(0.3 * omega) * v) / math.sin(omega)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_slerp_ends_and_parallel_fallback():
    low, high = _randn(1, (4, 8, 8)), _randn(2, (4, 8, 8))
    assert torch.equal(slerp_noise(1.0, low, high), high)
    assert torch.allclose(slerp_noise(0.0, low, high), low, atol=1e-6)
    # Same noise on both sides: A1111's linear fallback (weights as it writes them).
    assert torch.equal(slerp_noise(0.25, low, low), low * 0.25 + low * 0.75)


def test_strength_zero_is_plain_noise_and_batch_is_per_image():
    shape = (4, 8, 8)
    plain = initial_noise([5, 6], shape)
    assert torch.equal(variation_noise([5, 6], shape), plain)
    assert torch.equal(variation_noise([5, 6], shape, variation_seeds=[9, 10], variation_strength=0.0), plain)
    both = variation_noise([5, 5], shape, variation_seeds=[9, 10], variation_strength=0.4)
    alone = variation_noise([5], shape, variation_seeds=[10], variation_strength=0.4)
    assert torch.equal(both[1], alone[0])


def test_seed_resize_pastes_centred_and_crops_centred():
    target = torch.zeros(1, 6, 8)
    small = torch.ones(1, 2, 3)
    out = paste_centred(target, small)
    assert out.sum() == 6 and torch.equal(out[0, 2:4, 2:5], torch.ones(2, 3))  # (6-2)//2=2, (8-3)//2=2
    big = torch.arange(1 * 9 * 11, dtype=torch.float32).reshape(1, 9, 11)
    cropped = paste_centred(torch.full((1, 6, 8), -1.0), big)
    # (6-9)//2 = -2: rows 2..6 of the source fill rows 0..4; the last row keeps the target.
    assert torch.equal(cropped[0, :5, :7], big[0, 2:7, 2:9])
    assert torch.all(cropped[0, 5, :] == -1) and torch.all(cropped[0, :, 7] == -1)


def test_seed_resize_noise_keeps_the_small_images_noise():
    small = variation_noise([3], (4, 4, 4))
    resized = variation_noise([3], (4, 8, 8), resize_from_latent=(4, 4))
    assert torch.equal(resized[0, :, 2:6, 2:6], small[0])
    plain = initial_noise([3], (4, 8, 8))
    assert torch.equal(resized[0, :, 0, :], plain[0, :, 0, :])  # the border is the target-size draw


def test_bad_variation_inputs():
    with pytest.raises(HuabiError, match="variation_strength: must be a number from 0 to 1"):
        variation_noise([1], (4, 8, 8), variation_seeds=[2], variation_strength=1.5)
    with pytest.raises(HuabiError, match="variation_seeds: need one per image"):
        variation_noise([1, 2], (4, 8, 8), variation_seeds=[2], variation_strength=0.5)
    with pytest.raises(HuabiError, match="variation_seeds: needed"):
        variation_noise([1], (4, 8, 8), variation_strength=0.5)
    with pytest.raises(HuabiError, match="seed_resize_from: latent size"):
        variation_noise([1], (4, 8, 8), resize_from_latent=(0, 4))
    with pytest.raises(HuabiError, match="variation_strength: must be a number from 0 to 1"):
        GenerationRequest("x", variation_strength=-0.1)
    with pytest.raises(HuabiError, match="variation_seed: must be an integer"):
        GenerationRequest("x", variation_seed="7")
    with pytest.raises(HuabiError, match="seed_resize_from_px width: must be from 8"):
        GenerationRequest("x", seed_resize_from_px=(4, 64))


def test_request_batch_seeds_follow_a1111():
    request = GenerationRequest("x", seed=10, variation_seed=100, variation_strength=0.5, batch_size=2, batch_count=2)
    assert request.image_seeds() == [[10, 10], [10, 10]]  # A1111 keeps the seed when varying
    assert request.image_variation_seeds() == [[100, 101], [102, 103]]
    assert GenerationRequest("x", seed=10, batch_size=2).image_variation_seeds() is None
    import random

    resolved = GenerationRequest("x", seed=1, variation_strength=0.2).with_resolved_seed(random.Random(0))
    assert resolved.variation_seed >= 0
    assert GenerationRequest("x", seed=1).with_resolved_seed().variation_seed == -1  # unused: not drawn
    assert GenerationRequest("x", seed_resize_from_px=(512, 768)).seed_resize_from_latent(8) == (96, 64)


def test_infotext_keys_round_trip():
    request = GenerationRequest("a cat", seed=10, variation_seed=100, variation_strength=0.25,
                                seed_resize_from_px=(512, 768), batch_size=2)
    text = format_infotext(request, seed=10, width_px=512, height_px=512, model_name=None, model_hash=None,
                           version="huabi test", variation_seed=101)
    assert "Seed: 10, Size: 512x512, Variation seed: 101, Variation seed strength: 0.25, Seed resize from: 512x768" in text
    again = request_from_infotext(text)
    assert (again.variation_seed, again.variation_strength, again.seed_resize_from_px) == (101, 0.25, (512, 768))
    plain = format_infotext(GenerationRequest("a", seed=1, variation_seed=5), seed=1, width_px=64, height_px=64,
                            model_name=None, model_hash=None, version="v")
    assert "Variation" not in plain and "Seed resize" not in plain
    assert request_from_infotext("a\nSteps: 3, Seed: 1, Seed resize from: -1x-1").seed_resize_from_px is None
    with pytest.raises(HuabiError, match="Seed resize from: expected WIDTHxHEIGHT"):
        request_from_infotext("a\nSteps: 3, Seed: 1, Seed resize from: big")


@pytest.fixture(scope="module")
def sd1(tiny_sd1_file):
    return load_model(tiny_sd1_file, compute_hash=False)


def _run(bundle, seeds, sampler="Euler", variation=None):
    guidance = encode_guidance(bundle, "a cat", "", clip_skip=1, width_px=SIZE_PX, height_px=SIZE_PX, device=CPU)
    return denoise(bundle, guidance, sampler_name=sampler, schedule_name="Karras", steps=3, cfg_scale=5.0,
                   seeds=seeds, shape=latent_shape(bundle, SIZE_PX, SIZE_PX), device=CPU, variation=variation)


def _pixels(bundle, latents):
    return [np.asarray(image) for image in decode_latents(bundle, latents)]


def test_strength_0_and_1_give_the_seed_images_exactly(sd1):
    plain_seed = _pixels(sd1, _run(sd1, [7]))
    plain_variation = _pixels(sd1, _run(sd1, [99]))
    at_zero = _pixels(sd1, _run(sd1, [7], variation=NoiseVariation((99,), 0.0)))
    at_one = _pixels(sd1, _run(sd1, [7], variation=NoiseVariation((99,), 1.0)))
    halfway = _pixels(sd1, _run(sd1, [7], variation=NoiseVariation((99,), 0.5)))
    assert np.array_equal(at_zero[0], plain_seed[0])
    assert np.array_equal(at_one[0], plain_variation[0])
    assert not np.array_equal(halfway[0], plain_seed[0]) and not np.array_equal(halfway[0], plain_variation[0])


def test_ancestral_noise_keeps_the_main_seed_stream(sd1):
    shape = latent_shape(sd1, SIZE_PX, SIZE_PX)
    got = _run(sd1, [7], sampler="Euler a", variation=NoiseVariation((99,), 1.0))
    # By hand: start from the variation seed's noise, ancestral draws from seed 7's generator.
    guidance = encode_guidance(sd1, "a cat", "", clip_skip=1, width_px=SIZE_PX, height_px=SIZE_PX, device=CPU)
    schedule = DiscreteSchedule(sd1.alphas_cumprod)
    sigmas = compute_sigmas("Karras", "Euler a", 3, schedule)
    conds, uncond = guidance.conditioning(3)
    denoiser = CFGDenoiser(PredictionDenoiser(sd1.unet, schedule, sd1.prediction),
                           [(c.with_channels(None), w) for c, w in conds], uncond.with_channels(None), 5.0)
    x = initial_noise([99], shape) * sigmas[0]
    with torch.inference_mode():
        expected = get_sampler("Euler a").fn(denoiser, x, sigmas, noise=SeededNoiseSampler([7], shape),
                                             on_step=lambda *a: None)
    assert torch.equal(got, expected)
    assert not torch.equal(got, _run(sd1, [99], sampler="Euler a"))


def test_generate_flags_build_the_request():
    from huabi.cli.main import build_parser, requests_from_args

    args = build_parser().parse_args(["generate", "a cat", "--seed", "5", "--variation-seed", "9",
                                      "--variation-strength", "0.3", "--seed-resize-from", "512x768"])
    (request,) = requests_from_args(args)
    assert (request.variation_seed, request.variation_strength, request.seed_resize_from_px) == (9, 0.3, (512, 768))
    bad = build_parser().parse_args(["generate", "a cat", "--seed-resize-from", "big"])
    with pytest.raises(HuabiError, match="seed resize from: expected WIDTHxHEIGHT such as 512x512, got 'big'"):
        requests_from_args(bad)
    too_strong = build_parser().parse_args(["generate", "a cat", "--variation-strength", "2"])
    with pytest.raises(HuabiError, match="variation_strength: must be a number from 0 to 1, got 2.0"):
        requests_from_args(too_strong)
