"""Seamless tiling: circular padding while generating, restored afterwards; tiled images wrap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from huabi.core.infotext import format_infotext, request_from_infotext
from huabi.core.request import GenerationRequest
from huabi.errors import HuabiError
from huabi.models.load import load_model
from huabi.service.engine import Engine
from huabi.service.tiling import circular_padding

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bundle(tiny_sd1_file):
    return load_model(tiny_sd1_file, device=CPU, dtype=torch.float32)


def padded_convs(module: torch.nn.Module) -> list[torch.nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Conv2d) and any(m.padding)]


def test_context_sets_and_restores_padding_mode_and_leaves_weights(bundle):
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    convs = padded_convs(bundle.unet) + padded_convs(bundle.vae.decoder)
    assert convs and all(c.padding_mode == "zeros" for c in convs)
    one_by_one = [m for m in bundle.unet.modules() if isinstance(m, torch.nn.Conv2d) and not any(m.padding)]
    with circular_padding(bundle.unet, bundle.vae.decoder, bundle.unet) as changed:
        assert changed == len(convs)  # each layer once, even when a module is given twice
        assert all(c.padding_mode == "circular" for c in convs)
        assert all(c.padding_mode == "zeros" for c in one_by_one)  # unpadded layers untouched
        assert all(c.padding_mode == "zeros" for c in padded_convs(bundle.vae.encoder))  # only what was asked
    assert all(c.padding_mode == "zeros" for c in convs)
    after = bundle.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_context_restores_on_error(bundle):
    with pytest.raises(RuntimeError, match="boom"):
        with circular_padding(bundle.unet):
            raise RuntimeError("boom")
    assert all(c.padding_mode == "zeros" for c in padded_convs(bundle.unet))


def test_context_restores_a_non_default_mode(bundle):
    conv = padded_convs(bundle.vae.decoder)[0]
    conv.padding_mode = "reflect"
    try:
        with circular_padding(bundle.vae.decoder):
            assert conv.padding_mode == "circular"
        assert conv.padding_mode == "reflect"
    finally:
        conv.padding_mode = "zeros"


def test_tiled_unet_and_decoder_live_on_a_torus(bundle):
    """With circular padding, shifting the input around the edges shifts the output the same way.

    That is what makes the image seamless: no position (edge or not) is special.
    Tolerance: float32 rounding, 1e-4 absolute on outputs of size ~1.
    """
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 77, bundle.unet.config.cross_attention_dim, generator=generator)
    timestep = torch.tensor([500])
    shift = 4  # a multiple of the UNet's total downsampling on this tiny model

    def unet(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return bundle.unet(x, timestep, encoder_hidden_states=context).sample

    def decode(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return bundle.vae.decode(x).sample

    rolled = latent.roll((shift, shift), dims=(2, 3))
    with circular_padding(bundle.unet, bundle.vae.decoder):
        assert torch.allclose(unet(rolled), unet(latent).roll((shift, shift), dims=(2, 3)), atol=1e-4)
        pixel_shift = shift * 8
        assert torch.allclose(decode(rolled), decode(latent).roll((pixel_shift, pixel_shift), dims=(2, 3)), atol=1e-4)
    # Zero padding breaks the symmetry: the same comparison is far off.
    assert (unet(rolled) - unet(latent).roll((shift, shift), dims=(2, 3))).abs().max() > 1e-2
    assert (decode(rolled) - decode(latent).roll((shift * 8,) * 2, dims=(2, 3))).abs().max() > 1e-2


def edge_stats(image) -> tuple[float, float]:
    """(mean |left-right| and |top-bottom| edge difference, mean difference of adjacent interior columns/rows)."""
    pixels = np.asarray(image, dtype=np.float64)
    edge = (np.abs(pixels[:, 0] - pixels[:, -1]).mean() + np.abs(pixels[0] - pixels[-1]).mean()) / 2
    interior = (np.abs(np.diff(pixels, axis=1)).mean() + np.abs(np.diff(pixels, axis=0)).mean()) / 2
    return edge, interior


def test_tiled_images_wrap_around(tiny_sd1_file):
    engine = Engine(device="cpu", dtype="fp32")
    base = GenerationRequest("a floral pattern", model=str(tiny_sd1_file), steps=3, sampler="Euler",
                             width_px=64, height_px=64, seed=1, batch_size=3)
    plain = engine.generate(base)
    tiled = engine.generate(base.replace(tile=True))
    plain_edge = np.mean([edge_stats(r.image)[0] for r in plain])
    tiled_edge, tiled_interior = np.mean([edge_stats(r.image) for r in tiled], axis=0)
    # Measured on this tiny random model: tiled edge ~0.97x its interior step, plain edge ~1.6x;
    # tiled edge ~0.62x plain edge. Thresholds leave room for other CPUs' rounding.
    assert tiled_edge < 1.15 * tiled_interior
    assert tiled_edge < 0.8 * plain_edge
    assert all(c.padding_mode == "zeros" for c in padded_convs(engine.load(base.model).unet))
    assert "Tiling: True" in tiled[0].infotext
    assert "Tiling" not in plain[0].infotext
    assert any(not np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(plain, tiled))


def test_tiling_infotext_round_trip():
    text = format_infotext(GenerationRequest("x", tile=True), seed=1, width_px=64, height_px=64,
                           model_name=None, model_hash=None, version="huabi test")
    assert "Seed: 1, Size: 64x64, Tiling: True, Version" in text
    assert request_from_infotext(text).tile is True
    assert request_from_infotext(text.replace("Tiling: True, ", "")).tile is False
    with pytest.raises(HuabiError, match=r"infotext: Tiling: expected True or False, got 'yes'"):
        request_from_infotext(text.replace("Tiling: True", "Tiling: yes"))
    with pytest.raises(HuabiError, match=r"tile: must be True or False, got 1"):
        GenerationRequest("x", tile=1)
