"""A1111's hires fix in ``huabi generate``: sizes, upscaler modes, infotext and ``--from``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from huabi.core.infotext import format_infotext, request_from_infotext
from huabi.core.request import HIRES_UPSCALER_NAMES, GenerationRequest
from huabi.errors import HuabiError
from huabi.pipelines.hires import crop_latent, hires_plan, upscale_latent
from huabi.service.pngio import read_infotext
from cli_runner import run
from test_cli import generate, pixels, sd1_file  # noqa: F401


def generate_from(capsys, model, image, out):
    """``huabi generate --from IMAGE`` with only the model (test_cli's helper adds --size and --steps)."""
    code, stdout, stderr = run(capsys, "generate", "--from", image, "--model", model, "--out", out, "--quiet")
    assert code == 0, stderr
    return [line for line in stdout.splitlines()]


def test_generate_hires_latent_size_infotext_and_from(capsys, sd1_file, tmp_path):
    paths = generate(capsys, sd1_file, tmp_path / "a", "--seed", "5", "--size", "32x32", "--steps", "2",
                     "--hires", "--hires-scale", "1.5", "--hires-steps", "2", "--hires-denoise", "0.6")
    assert Image.open(paths[0]).size == (48, 48)
    text = read_infotext(paths[0])
    assert "Size: 32x32," in text
    assert "Denoising strength: 0.6, Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent" in text
    again = generate_from(capsys, sd1_file, paths[0], tmp_path / "b")
    assert np.array_equal(pixels(again[0]), pixels(paths[0]))  # same code path: exact
    assert read_infotext(again[0]) == text
    plain = generate(capsys, sd1_file, tmp_path / "c", "--seed", "5", "--size", "48x48", "--steps", "2")
    assert not np.array_equal(pixels(plain[0]), pixels(paths[0]))


def test_generate_hires_pixel_upscaler_and_resize(capsys, sd1_file, tmp_path):
    paths = generate(capsys, sd1_file, tmp_path / "a", "--seed", "5", "--size", "32x32", "--steps", "2",
                     "--hires-resize", "64x48", "--hires-upscaler", "Lanczos", "--hires-denoise", "0.5")
    assert Image.open(paths[0]).size == (64, 48)
    text = read_infotext(paths[0])
    assert "Hires resize: 64x48" in text and "Hires upscale:" not in text and "Hires steps" not in text
    assert "Hires upscaler: Lanczos" in text
    again = generate_from(capsys, sd1_file, paths[0], tmp_path / "b")
    assert np.array_equal(pixels(again[0]), pixels(paths[0]))


def test_latent_modes_match_torch_interpolate():
    latents = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.interpolate(latents, size=(8, 12), mode="bicubic", antialias=True)
    assert torch.equal(upscale_latent(latents, 8, 12, "Latent (bicubic antialiased)"), expected)
    nearest = upscale_latent(latents, 8, 12, "Latent (nearest)")
    assert torch.equal(nearest[..., ::2, ::2], latents)
    for name in HIRES_UPSCALER_NAMES:
        if name.startswith("Latent"):
            assert upscale_latent(latents, 8, 12, name).shape == (1, 4, 8, 12)


def test_hires_resize_other_aspect_covers_then_crops_centred():
    request = GenerationRequest("x", hires=True, hires_resize_px=(64, 32))
    plan = hires_plan(request, 32, 32, 8)
    assert (plan.upscale_w_px, plan.upscale_h_px, plan.crop_w_cells, plan.crop_h_cells) == (64, 64, 0, 4)
    latents = torch.arange(8.0).view(1, 1, 8, 1).expand(1, 1, 8, 8)
    cropped = crop_latent(latents, plan.crop_h_cells, plan.crop_w_cells)
    assert cropped.shape == (1, 1, 4, 8) and cropped[0, 0, :, 0].tolist() == [2.0, 3.0, 4.0, 5.0]
    assert GenerationRequest("x", hires_scale=1.3).hires_target_px(60 * 8, 50 * 8) == (624, 520)


def test_infotext_round_trip_of_a1111_hires_keys():
    text = ("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Denoising strength: 0.55, "
            "Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent (nearest-exact), Version: v1")
    request = request_from_infotext(text)
    assert request.hires and request.hires_scale == 2.0 and request.hires_steps == 10
    assert request.hires_denoise == 0.55 and request.hires_upscaler == "Latent (nearest-exact)"
    again = format_infotext(request, seed=1, width_px=512, height_px=512, model_name=None, model_hash=None,
                            version="v1")
    assert again == text
    # Without hires keys "Denoising strength" is not the hires strength (img2img's), kept as it was.
    plain = request_from_infotext("a\nSteps: 2, Seed: 1, Denoising strength: 0.3")
    assert not plain.hires and ("Denoising strength", "0.3") in plain.extra


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"hires_scale": 4.5}, "hires_scale: must be a number from 1 to 4, got 4.5"),
        ({"hires_scale": 0.5}, "hires_scale: must be a number from 1 to 4, got 0.5"),
        ({"hires_upscaler": "R-ESRGAN 4x+"}, "hires_upscaler: unknown upscaler 'R-ESRGAN 4x+'; valid: Latent, "),
        ({"hires_steps": -1}, "hires_steps: must be from 0 to 1000, got -1"),
        ({"hires_denoise": 1.5}, "hires_denoise: must be a number from 0 to 1, got 1.5"),
        ({"hires_resize_px": (60, 64)}, "hires_resize_px width: must be a multiple of 8, got 60"),
        ({"refiner_switch_at": 0.0}, "refiner_switch_at: must be a number above 0 and at most 1, got 0.0"),
        ({"refiner_switch_at": 1.2}, "refiner_switch_at: must be a number above 0 and at most 1, got 1.2"),
    ],
)
def test_bad_hires_and_refiner_fields(fields, message):
    with pytest.raises(HuabiError) as err:
        GenerationRequest("x", hires=True, **fields)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_unknown_upscaler_lists_the_valid_names():
    with pytest.raises(HuabiError) as err:
        GenerationRequest("x", hires=True, hires_upscaler="Bilinear")
    for name in HIRES_UPSCALER_NAMES:
        assert name in str(err.value)


def test_cli_bad_hires_input(capsys, sd1_file, tmp_path):
    code, _out, err = run(capsys, "generate", "x", "--model", sd1_file, "--hires", "--hires-scale", "8",
                          "--out", tmp_path, "--quiet")
    assert code != 0 and "--hires-scale: must be a number from 1 to 4, got 8.0" in err
    code, _out, err = run(capsys, "generate", "x", "--model", sd1_file, "--hires-resize", "big",
                          "--out", tmp_path, "--quiet")
    assert code != 0 and "hires resize: expected WIDTHxHEIGHT such as 1024x1024, got 'big'" in err
    code, _out, err = run(capsys, "generate", "x", "--model", sd1_file, "--hires-upscaler", "/no/such.pth",
                          "--size", "32x32", "--steps", "1", "--out", tmp_path, "--quiet")
    assert code != 0 and "hires upscaler: /no/such.pth: no such file" in err


def test_foreign_upscaler_name_keeps_hires_off_and_the_text_verbatim():
    text = ("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Denoising strength: 0.4, "
            "Hires upscale: 2.0, Hires upscaler: R-ESRGAN 4x+, Version: v1")
    request = request_from_infotext(text)
    assert not request.hires
    assert format_infotext(request, seed=1, width_px=512, height_px=512, model_name=None, model_hash=None,
                           version="v1") == text
