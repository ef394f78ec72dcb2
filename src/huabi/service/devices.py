"""Devices, dtypes and a rough memory check, chosen per machine (never assumed)."""

from __future__ import annotations

import torch

from huabi.errors import HuabiError
from huabi.models.bundle import ModelBundle


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise HuabiError(f"device: unknown device {name!r} (use auto, cpu, cuda, cuda:N, mps)") from None
    check_device_available(device, name)
    return device


def check_device_available(device: torch.device, name: str) -> None:
    """Refuse, in one line and before any work, a device this torch build or machine lacks."""
    if device.type == "cpu":
        return
    backends = {
        "cuda": (torch.cuda.is_available, torch.cuda.device_count),
        "mps": (lambda: torch.backends.mps.is_available(), lambda: 1),
        "xpu": (lambda: hasattr(torch, "xpu") and torch.xpu.is_available(),
                lambda: torch.xpu.device_count() if hasattr(torch, "xpu") else 0),
    }
    if device.type not in backends:
        raise HuabiError(f"device: huabi cannot run on {name!r} (use auto, cpu, cuda, cuda:N, mps)")
    is_available, count = backends[device.type]
    if not is_available():
        raise HuabiError(f"device: {name} requested but this machine (or torch build) has no {device.type} device")
    if device.index is not None and device.index >= count():
        raise HuabiError(f"device: {name} requested but there are only {count()} {device.type} device(s)")


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
           "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is fp16 on CUDA; on the CPU bf16 where this processor runs it natively and
    faster, else fp32 (see :mod:`huabi.service.device_choice`)."""
    if name == "auto":
        from huabi.service.device_choice import auto_dtype

        return auto_dtype(device).dtype
    if name not in _DTYPES:
        raise HuabiError(f"dtype: unknown dtype {name!r}; valid: auto, fp32, fp16, bf16")
    dtype = _DTYPES[name]
    if dtype is torch.float16 and device.type == "cpu":
        raise HuabiError("dtype: fp16 is not supported on the CPU; use fp32 or bf16")
    return dtype


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * 2**30  # unknown platform: assume a typical desktop


def estimate_peak_bytes(bundle: ModelBundle, width_px: int, height_px: int, batch_size: int, dtype: torch.dtype,
                        *, vae_tile_px: int | None = None) -> int:
    """A deliberately rough upper bound on activation memory for one batch.

    The VAE decoder's full-resolution blocks dominate at large sizes (decoded one
    image at a time); self-attention at the first UNet level grows with the
    square of the latent token count when the attention kernel materialises it.
    ``vae_tile_px``: the VAE runs in tiles of that side (``--vae-tiling``), so its
    blocks hold one tile's activations, plus the float32 image being blended.
    """
    element = torch.finfo(dtype).bits // 8
    pixels = width_px * height_px
    decoder_channels = int(bundle.vae.config.block_out_channels[0])
    if vae_tile_px is not None and max(width_px, height_px) > vae_tile_px:
        blended = pixels * 4 * 4  # RGB sum and blend weight, float32
        vae_bytes = vae_tile_px * vae_tile_px * decoder_channels * element * 6 + blended
    else:
        vae_bytes = pixels * decoder_channels * element * 6
    tokens = pixels // bundle.vae_scale_factor**2
    unet_bytes = 2 * batch_size * tokens * int(bundle.unet.config.block_out_channels[0]) * element * 40
    return vae_bytes + unet_bytes
