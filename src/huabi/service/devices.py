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
    except RuntimeError as err:
        raise HuabiError(f"device: unknown device {name!r} (use auto, cpu, cuda, cuda:N)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HuabiError(f"device: {name} requested but no CUDA device is available")
    return device


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
           "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is fp16 on CUDA and fp32 on the CPU (bf16 on CPU is opt-in: faster, ~1% error)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
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


def estimate_peak_bytes(bundle: ModelBundle, width_px: int, height_px: int, batch_size: int, dtype: torch.dtype) -> int:
    """A deliberately rough upper bound on activation memory for one batch.

    The VAE decoder's full-resolution blocks dominate at large sizes (decoded one
    image at a time); self-attention at the first UNet level grows with the
    square of the latent token count when the attention kernel materialises it.
    """
    element = torch.finfo(dtype).bits // 8
    pixels = width_px * height_px
    decoder_channels = int(bundle.vae.config.block_out_channels[0])
    vae_bytes = pixels * decoder_channels * element * 6
    tokens = pixels // bundle.vae_scale_factor**2
    unet_bytes = 2 * batch_size * tokens * int(bundle.unet.config.block_out_channels[0]) * element * 40
    return vae_bytes + unet_bytes
