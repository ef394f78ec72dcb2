"""The memory guard (``Engine.check_memory``) from stated inputs (issue 22).

huabi refuses a size that will not fit before it loads or samples anything. Nothing tested that: here
the free memory the engine sees is stated (the engine's ``available_memory_bytes`` replaced through
pytest's monkeypatch: the only way to make "this machine has N bytes free" an input), and the
estimate is checked against its stated rule:

* free memory on the CPU is ``MemAvailable`` of /proc/meminfo (read independently here);
* the estimate is ``VAE part + UNet part`` with the UNet part proportional to the batch and both
  proportional to the element size (fp16 = half of fp32), and it grows with the pixel count;
* a job whose first pass fits but whose hires target does not is refused naming the hires size,
  before any sampling; one that fits runs.
"""

from __future__ import annotations

import pytest
import torch

from huabi.core.request import GenerationRequest
from huabi.errors import HuabiError
from huabi.service import engine as engine_module
from huabi.service.devices import available_memory_bytes, estimate_peak_bytes
from huabi.service.engine import Engine


@pytest.fixture(scope="module")
def engine(tiny_sd1_file):
    return Engine(device="cpu", dtype="fp32")


def test_cpu_free_memory_is_memavailable():
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            stated = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        pytest.skip("no /proc/meminfo MemAvailable on this platform")
    # Other processes allocate between the two reads: 10% is far below any unit mistake (KiB vs bytes: 1024x).
    assert available_memory_bytes(torch.device("cpu")) == pytest.approx(stated, rel=0.1)


def test_estimate_scales_with_batch_dtype_and_size(engine, tiny_sd1_file):
    bundle = engine.load(str(tiny_sd1_file))
    one = estimate_peak_bytes(bundle, 512, 512, 1, torch.float32)
    two = estimate_peak_bytes(bundle, 512, 512, 2, torch.float32)
    three = estimate_peak_bytes(bundle, 512, 512, 3, torch.float32)
    unet_part = two - one
    assert unet_part > 0 and three - two == unet_part  # the UNet part is per image of the batch
    assert one - unet_part > 0  # the VAE part (one image decoded at a time) does not grow with the batch
    assert estimate_peak_bytes(bundle, 512, 512, 2, torch.float16) * 2 == two  # half the bytes per element
    assert estimate_peak_bytes(bundle, 1024, 1024, 1, torch.float32) == 4 * one  # linear in pixels


def _fits_exactly(engine, bundle, width_px: int, height_px: int) -> int:
    return estimate_peak_bytes(bundle, width_px, height_px, 1, engine.dtype)


def test_refuses_a_size_that_does_not_fit_in_one_line(engine, tiny_sd1_file, monkeypatch):
    bundle = engine.load(str(tiny_sd1_file))
    need = _fits_exactly(engine, bundle, 64, 64)
    monkeypatch.setattr(engine_module, "available_memory_bytes", lambda device: need - 1)
    with pytest.raises(HuabiError) as error:
        engine.check_memory(bundle, 64, 64, 1)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("size: 64x64 with batch size 1 needs about ")
    assert "use a smaller size or batch" in message
    monkeypatch.setattr(engine_module, "available_memory_bytes", lambda device: need)
    engine.check_memory(bundle, 64, 64, 1)  # exactly enough: allowed


def test_hires_target_is_checked_before_sampling(engine, tiny_sd1_file, monkeypatch):
    bundle = engine.load(str(tiny_sd1_file))
    first, target = _fits_exactly(engine, bundle, 64, 64), _fits_exactly(engine, bundle, 128, 128)
    assert target > first
    monkeypatch.setattr(engine_module, "available_memory_bytes", lambda device: (first + target) // 2)
    steps: list = []
    request = GenerationRequest("a castle", model=str(tiny_sd1_file), steps=2, seed=1, width_px=64, height_px=64,
                                hires=True, hires_scale=2.0)
    with pytest.raises(HuabiError, match=r"^size: 128x128 with batch size 1 needs about"):
        engine.generate(request, on_progress=lambda done, total: steps.append(done))
    assert steps == []  # refused before the first pass ran
    plain = GenerationRequest("a castle", model=str(tiny_sd1_file), steps=2, seed=1, width_px=64, height_px=64)
    assert len(engine.generate(plain)) == 1  # the first pass alone fits


def test_vae_tiling_lowers_the_estimate_and_lets_a_large_size_through(tiny_sd1_file, monkeypatch):
    """With ``--vae-tiling`` the VAE holds one tile's activations (plus the blended float32 image),
    so a size refused for the full-image decoder's memory is allowed; below one tile nothing changes."""
    from huabi.service.previews import TILE_LATENT

    tiled_engine = Engine(device="cpu", dtype="fp32", vae_tiling=True)
    plain_engine = Engine(device="cpu", dtype="fp32")
    bundle = plain_engine.load(str(tiny_sd1_file))
    tile_px = TILE_LATENT * bundle.vae_scale_factor
    size = 4 * tile_px
    full = estimate_peak_bytes(bundle, size, size, 1, torch.float32)
    tiled = estimate_peak_bytes(bundle, size, size, 1, torch.float32, vae_tile_px=tile_px)
    unet_part = estimate_peak_bytes(bundle, size, size, 2, torch.float32) - full
    channels = int(bundle.vae.config.block_out_channels[0])
    assert full - tiled == (size * size - tile_px * tile_px) * channels * 4 * 6 - size * size * 16
    assert tiled > unet_part  # the UNet part stays
    small = estimate_peak_bytes(bundle, tile_px, tile_px, 1, torch.float32)
    assert estimate_peak_bytes(bundle, tile_px, tile_px, 1, torch.float32, vae_tile_px=tile_px) == small

    monkeypatch.setattr(engine_module, "available_memory_bytes", lambda device: (full + tiled) // 2)
    with pytest.raises(HuabiError, match=r"use a smaller size or batch \(or VAE tiling\)$"):
        plain_engine.check_memory(bundle, size, size, 1)
    tiled_engine.check_memory(bundle, size, size, 1)  # fits once tiled
    monkeypatch.setattr(engine_module, "available_memory_bytes", lambda device: tiled - 1)
    with pytest.raises(HuabiError, match=r"use a smaller size or batch$"):
        tiled_engine.check_memory(bundle, size, size, 1)
