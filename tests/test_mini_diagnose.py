"""The two pieces of model maths behind scripts/mini_diagnose.py, on tiny random-weight models:
the per-channel latent centring folded into a VAE (huabi.train.mini_v2.centred_vae, which the
v3 recipe exports), and the script's CFG-rescale guidance rule."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from huabi.core.guidance import CFGDenoiser, PredictionDenoiser, UNetInputs
from huabi.core.family import Prediction
from huabi.core.schedules import DiscreteSchedule, scaled_linear_alphas_cumprod
from huabi.models.family import ModelFamily
from tiny_models import TINY_TEXT_WIDTH, build_tiny_parts

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mini_diagnose.py"


@pytest.fixture(scope="module")
def diagnose():
    spec = importlib.util.spec_from_file_location("mini_diagnose", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def parts():
    return build_tiny_parts(ModelFamily.HUABI_MINI, seed=3)


def test_centred_vae_is_an_exact_reparametrisation(parts):
    from huabi.train.mini_v2 import centred_vae

    vae = parts.vae
    pixels = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = torch.tensor([0.7, -1.3, 0.2, 2.0])[: vae.config.latent_channels]
    std = torch.tensor([0.3, 2.5, 1.1, 0.05])[: vae.config.latent_channels]
    centred = centred_vae(vae, mean, std)
    assert centred.config.scaling_factor == 1.0
    view = (1, -1, 1, 1)
    with torch.no_grad():
        before, after = vae.encode(pixels).latent_dist, centred.encode(pixels).latent_dist
        # latents: (z - mean) / std; log-variance shifted by -2 log std (the posterior of z / std)
        torch.testing.assert_close(after.mean, (before.mean - mean.view(view)) / std.view(view), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(after.logvar, before.logvar - 2 * torch.log(std).view(view), atol=1e-5, rtol=1e-5)
        # decoding the centred latent gives the same pixels as decoding the original one
        torch.testing.assert_close(centred.decode(after.mean).sample, vae.decode(before.mean).sample, atol=1e-5, rtol=1e-4)
    # the original is untouched
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(pixels).latent_dist.mean, before.mean)


def _denoiser(parts):
    schedule = DiscreteSchedule(scaled_linear_alphas_cumprod())
    return PredictionDenoiser(parts.unet, schedule, Prediction.EPSILON)


def _inputs(seed: int) -> UNetInputs:
    return UNetInputs(torch.randn(1, 77, TINY_TEXT_WIDTH, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("space", ["eps", "x0"])
def test_cfg_rescale_zero_is_plain_cfg(diagnose, parts, space):
    model = _denoiser(parts)
    cond, uncond = _inputs(1), _inputs(2)
    x = torch.randn(2, parts.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(4)) * 5
    sigma = torch.tensor(5.0)
    plain = CFGDenoiser(model, cond, uncond, 7.0)
    guide = diagnose.rescaled_cfg(0.0, space)(model, plain.conds, plain.uncond, plain.scale)
    with torch.no_grad():
        torch.testing.assert_close(guide(x, sigma), plain(x, sigma), atol=1e-4, rtol=1e-4)


def test_cfg_rescale_one_matches_the_conditional_spread(diagnose, parts):
    """phi = 1: the guided eps has, per image, the standard deviation of the conditional eps."""
    model = _denoiser(parts)
    cond, uncond = _inputs(1), _inputs(2)
    x = torch.randn(2, parts.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(4)) * 5
    sigma = torch.tensor(5.0)
    plain = CFGDenoiser(model, cond, uncond, 7.0)
    guide = diagnose.rescaled_cfg(1.0)(model, plain.conds, plain.uncond, plain.scale)
    with torch.no_grad():
        eps = (x - guide(x, sigma)) / sigma
        eps_cond = (x - model(x, sigma.expand(2), cond.repeat_to(2))) / sigma
        eps_cfg = (x - plain(x, sigma)) / sigma
    torch.testing.assert_close(eps.std(dim=(1, 2, 3)), eps_cond.std(dim=(1, 2, 3)), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(eps_cfg.std(dim=(1, 2, 3)), eps_cond.std(dim=(1, 2, 3)), rtol=1e-2)
