"""Cheap previews, TAESD (vs diffusers' AutoencoderTiny), tiled VAE, previews during sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from huabi.core.previews import (
    FAMILY_LATENT_RGB,
    HUABI_MINI_LATENT_RGB,
    SD_LATENT_RGB,
    LatentRGB,
    fit_latent_rgb,
    latents_to_rgb,
)
from huabi.core.request import GenerationRequest
from huabi.core.vae_tiling import tile_starts, tiled_apply
from huabi.errors import HuabiError
from huabi.models.family import ModelFamily
from huabi.models.taesd import load_taesd, tiny_decoder, tiny_encoder
from huabi.service.engine import Engine


def test_every_family_has_preview_factors():
    assert set(FAMILY_LATENT_RGB) == set(ModelFamily)


def test_latents_to_rgb_is_the_linear_map():
    latents = torch.zeros(1, 4, 2, 3)
    latents[0, 0] = 1.0  # channel 0 only: the colour is its factor row
    rgb = latents_to_rgb(latents, SD_LATENT_RGB)
    assert rgb.shape == (1, 2, 3, 3) and rgb.dtype == torch.uint8
    expected = [round((v + 1) * 127.5) for v in SD_LATENT_RGB.factors[0]]
    assert rgb[0, 0, 0].tolist() == expected
    with pytest.raises(ValueError, match="latents have 16 channels, the mapping 4"):
        latents_to_rgb(torch.zeros(1, 16, 2, 2), SD_LATENT_RGB)


def test_fit_recovers_a_known_map():
    generator = torch.Generator().manual_seed(0)
    truth = LatentRGB(((0.3, -0.1, 0.2), (0.1, 0.4, -0.2), (-0.3, 0.2, 0.1), (0.05, -0.25, 0.3)), (0.1, -0.05, 0.2))
    latents = torch.randn(6, 4, 8, 8, generator=generator)
    rgb = torch.einsum("bchw,cr->brhw", latents, torch.tensor(truth.factors)) + torch.tensor(truth.bias)[None, :, None, None]
    pixels = torch.nn.functional.interpolate(rgb, scale_factor=8, mode="nearest")  # 8x8 blocks pool back exactly
    fitted = fit_latent_rgb(latents, pixels)
    assert np.allclose(fitted.factors, truth.factors, atol=2e-4) and np.allclose(fitted.bias, truth.bias, atol=2e-4)


def test_huabi_mini_factors_fit_its_own_vae_better_than_sd_factors():
    engine = Engine(device="cpu", dtype="fp32")
    bundle = engine.load(None)  # the built-in model's VAE
    generator = torch.Generator().manual_seed(3)
    size = bundle.native_size_px
    # Smooth colour fields: random 4x4 colours upsampled, the kind of content a preview must get right.
    pixels = torch.nn.functional.interpolate(torch.rand(6, 3, 4, 4, generator=generator) * 2 - 1,
                                             size=(size, size), mode="bilinear", align_corners=False)
    with torch.inference_mode():
        latents = bundle.vae.encode(pixels).latent_dist.mode() * bundle.latent_scaling_factor
    truth = ((torch.nn.functional.adaptive_avg_pool2d(pixels, latents.shape[-2:]) + 1) * 127.5).permute(0, 2, 3, 1)
    mini_error = (latents_to_rgb(latents, HUABI_MINI_LATENT_RGB).float() - truth).abs().mean()
    sd_error = (latents_to_rgb(latents, SD_LATENT_RGB).float() - truth).abs().mean()
    assert mini_error < 35 and mini_error < sd_error / 2, (mini_error, sd_error)


# -- TAESD ----------------------------------------------------------------------------


def _random_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) / max(1.0, param[0].numel() ** 0.5))
    return module


def _diffusers_tiny(decoder_sd: dict, encoder_sd: dict):
    from diffusers import AutoencoderTiny

    model = AutoencoderTiny().eval()
    state = {f"decoder.layers.{int(k.split('.', 1)[0]) - 1}.{k.split('.', 1)[1]}": v for k, v in decoder_sd.items()}
    state.update({f"encoder.layers.{k}": v for k, v in encoder_sd.items()})
    missing, unexpected = model.load_state_dict(state, strict=True), None
    return model


@pytest.fixture(scope="module")
def taesd_files(tmp_path_factory):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("taesd")
    decoder = _random_(tiny_decoder(), seed=1)
    encoder = _random_(tiny_encoder(), seed=2)
    torch.save(decoder.state_dict(), folder / "taesd_decoder.pth")
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(folder / "taesd_encoder.safetensors"))
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(folder / "taesd_encoder.pth.safetensors"))
    return folder, decoder.state_dict(), encoder.state_dict()


def test_taesd_matches_diffusers_autoencoder_tiny(taesd_files, tmp_path):
    from safetensors.torch import save_file

    folder, decoder_sd, encoder_sd = taesd_files
    ours = load_taesd(folder / "taesd_decoder.pth")
    assert ours.encoder is None  # no sibling named taesd_encoder.pth: decoder only
    reference = _diffusers_tiny(decoder_sd, encoder_sd)
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 4, 8, 12, generator=generator)
    with torch.no_grad():
        expected = reference.decode(latents).sample.clamp(-1, 1)  # diffusers: [-1, 1] out, latents in UNet space
        got = ours.decode_latents(latents)
    assert got.shape == (2, 3, 64, 96)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # diffusers' own file layout loads into the same decoder, with its encoder.
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    both = load_taesd(tmp_path)
    pixels = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(both.decode_latents(latents), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(both.encode_pixels(pixels), reference.encode(pixels).latents, atol=1e-5, rtol=1e-5)


def test_bad_taesd_files_are_clear_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(HuabiError, match="taesd: .*missing.pth: no such file"):
        load_taesd(tmp_path / "missing.pth")
    save_file({"model.diffusion_model.x": torch.zeros(1)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(HuabiError, match="not a TAESD file"):
        load_taesd(tmp_path / "wrong.safetensors")
    state = tiny_decoder().state_dict()
    state["1.weight"] = torch.zeros(64, 4, 1, 1)
    torch.save(state, tmp_path / "taesd_decoder.pth")
    with pytest.raises(HuabiError, match=r"tensor 1.weight has shape \(64, 4, 1, 1\), expected \(64, 4, 3, 3\)"):
        load_taesd(tmp_path / "taesd_decoder.pth")


# -- tiled VAE ---------------------------------------------------------------------------


def test_tile_starts_cover_the_length():
    assert tile_starts(10, 16, 4) == [0]
    starts = tile_starts(40, 16, 4)
    assert starts[0] == 0 and starts[-1] == 24 and all(b - a <= 12 for a, b in zip(starts, starts[1:]))


def test_tiled_apply_of_a_pointwise_function_is_exact():
    x = torch.randn(1, 3, 37, 53)
    out = tiled_apply(lambda t: torch.nn.functional.interpolate(t * 2, scale_factor=2, mode="nearest"), x,
                      tile=16, overlap=4, scale=2)
    torch.testing.assert_close(out, torch.nn.functional.interpolate(x * 2, scale_factor=2, mode="nearest"))


def test_tiled_vae_decode_is_close_to_whole_and_to_diffusers_tiling():
    from huabi.service.previews import TiledVAE

    bundle = Engine(device="cpu", dtype="fp32").load(None)  # the built-in model: a trained VAE
    generator = torch.Generator().manual_seed(0)
    factor = bundle.vae_scale_factor
    pixels = torch.nn.functional.interpolate(torch.rand(1, 3, 5, 5, generator=generator) * 2 - 1,
                                             size=(40 * factor, 40 * factor), mode="bilinear")
    tiled = TiledVAE(bundle.vae, tile_latent=16, overlap_latent=4)
    with torch.inference_mode():
        latents = bundle.vae.encode(pixels).latent_dist.mode()
        whole = bundle.vae.decode(latents, return_dict=False)[0]
        ours = tiled.decode(latents, return_dict=False)[0]
        bundle.vae.tile_latent_min_size, bundle.vae.tile_sample_min_size = 16, 16 * factor
        bundle.vae.tile_overlap_factor = 0.25
        theirs = bundle.vae.tiled_decode(latents, return_dict=False)[0]
        tiled_latents = tiled.encode(pixels).latent_dist.mode()
    ours_error = (ours - whole).abs().mean().item() * 127.5  # in 0..255 pixel steps
    theirs_error = (theirs - whole).abs().mean().item() * 127.5
    assert ours.shape == whole.shape == theirs.shape
    # Measured with these small (128 px) tiles: ours 20.0, diffusers' 20.6 pixel steps from the
    # whole-image decode (per-tile GroupNorm and mid-block attention see less of the image);
    # the point is parity with diffusers' enable_tiling, which users accept.
    assert ours_error < 30 and ours_error <= 1.1 * theirs_error, (ours_error, theirs_error)
    assert (tiled_latents - latents).abs().mean() < 0.1 * latents.abs().mean()


# -- previews and fast decode in the engine -------------------------------------------------


def _request(model, **fields) -> GenerationRequest:
    values = dict(prompt="a red apple", model=str(model), steps=4, width_px=64, height_px=64, seed=7, batch_size=2)
    return GenerationRequest(**{**values, **fields})


def test_previews_arrive_during_sampling_without_changing_the_image(tiny_sd1_file):
    engine = Engine(device="cpu", dtype="fp32", preview="cheap", preview_every=2)
    seen = []
    results = engine.generate(_request(tiny_sd1_file, batch_count=2),
                              on_preview=lambda done, total, images: seen.append((done, total, images)))
    assert [(done, total) for done, total, _ in seen] == [(2, 8), (4, 8), (6, 8), (8, 8)]
    assert all(len(images) == 2 and images[0].size == (8, 8) for _, _, images in seen)
    plain = Engine(device="cpu", dtype="fp32").generate(_request(tiny_sd1_file, batch_count=2))
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(results, plain))
    assert "VAE Decoder" not in results[0].infotext


def test_taesd_previews_and_fast_decoder_in_the_engine(tiny_sd1_file, taesd_files):
    folder, _decoder, _encoder = taesd_files
    spec = f"taesd:{folder / 'taesd_decoder.pth'}"
    engine = Engine(device="cpu", dtype="fp32", preview=spec, vae_decoder=spec)
    seen = []
    results = engine.generate(_request(tiny_sd1_file), on_preview=lambda d, t, images: seen.append(images))
    assert len(seen) == 4 and seen[-1][0].size == (64, 64)  # TAESD previews are full size
    assert "VAE Decoder: TAESD (taesd_decoder)" in results[0].infotext
    # The final image is TAESD's decode of the final latents: equal to the last preview.
    assert np.array_equal(np.asarray(results[0].image), np.asarray(seen[-1][0]))
    with pytest.raises(HuabiError, match="vae decoder: unknown method 'tiny'; valid: cheap, taesd:PATH"):
        Engine(device="cpu", dtype="fp32", vae_decoder="tiny")
    with pytest.raises(HuabiError, match="preview every: must be a whole number of steps >= 1, got 0"):
        Engine(device="cpu", dtype="fp32", preview_every=0)


def test_engine_vae_tiling_for_large_images(tiny_sd1_file):
    request = _request(tiny_sd1_file, width_px=640, height_px=576, batch_size=1, steps=2)
    [whole] = Engine(device="cpu", dtype="fp32").generate(request)
    [tiled] = Engine(device="cpu", dtype="fp32", vae_tiling=True).generate(request)
    difference = np.abs(np.asarray(tiled.image, dtype=np.int16) - np.asarray(whole.image, dtype=np.int16))
    assert 0 < difference.mean() < 6, difference.mean()


def test_hires_fix_previews_both_passes_at_their_sizes(tiny_sd1_file):
    """Hires fix: previews follow the first pass (native latent size), then the second (the upscaled
    one), counted over both passes' steps, as A1111's progress does."""
    engine = Engine(device="cpu", dtype="fp32", preview="cheap")
    seen = []
    engine.generate(_request(tiny_sd1_file, batch_size=1, hires=True, hires_scale=2.0, hires_steps=3,
                             hires_upscaler="Latent"),
                    on_preview=lambda done, total, images: seen.append((done, total, images[0].size)))
    assert [(done, total) for done, total, _ in seen] == [(step, 7) for step in range(1, 8)]
    assert {size for done, _, size in seen if done <= 4} == {(8, 8)}  # 64 px / 8: one preview pixel per latent
    assert {size for done, _, size in seen if done > 4} == {(16, 16)}
