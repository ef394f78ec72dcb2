"""Latent and text-embedding caches, so the UNet stage runs neither the VAE nor the text encoder.

* latents: the VAE posterior *mean* of every image at full size (unscaled, fp32);
  the latent scaling factor is ``1 / std`` of all cached latent values (SD's 0.18215
  was chosen the same way), recorded in ``meta.json`` and later in the checkpoint;
* text: the frozen text encoder's ``last_hidden_state`` for every unique caption
  variant (index 0 is the empty caption used for classifier-free-guidance dropout),
  fp16 in an ``.npy`` that is memory-mapped when read.

Files live in one folder: ``latents.pt``, ``text.npy``, ``meta.json``; each is written
atomically and ``meta.json`` last, so a folder with ``meta.json`` is complete.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from huabi.errors import HuabiError
from huabi.models.files import atomic_path
from huabi.train.common import atomic_torch_save, atomic_write_text, autocast, load_torch_file
from huabi.train.data import CLIP_CONTEXT, TrainingImages

CACHE_FORMAT_VERSION = 1


@dataclass
class LatentTextCache:
    latents: torch.Tensor  # [N, C, h, w] float32, unscaled VAE means
    text: np.ndarray  # [M, 77, width] float16 (memory-mapped)
    caption_ids: list[list[int]]  # per image: rows of ``text`` that are its captions
    scaling_factor: float

    def __len__(self) -> int:
        return int(self.latents.shape[0])


@torch.no_grad()
def encode_latents(
    vae,
    images: TrainingImages,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    log: Callable[[str], None] = lambda message: None,
) -> torch.Tensor:
    """VAE posterior means of all images, [N, C, size/8, size/8] float32 on the CPU."""
    vae.eval()
    out = []
    for start in range(0, len(images), batch_size):
        pixels = images.batch_pixels(torch.arange(start, min(len(images), start + batch_size)))
        with autocast(device, precision):
            mean = vae.encode(pixels.to(device)).latent_dist.mean
        out.append(mean.float().cpu())
        if (start // batch_size) % 50 == 0:
            log(f"[cache] latents {min(len(images), start + batch_size)}/{len(images)}")
    return torch.cat(out)


def latent_scaling_factor(latents: torch.Tensor) -> float:
    """1 / std of all latent values: makes the UNet's clean latents unit-variance."""
    std = float(latents.double().std())
    if not std > 0:
        raise HuabiError("cached latents have zero variance; is the VAE trained?")
    return 1.0 / std


@torch.no_grad()
def build_cache(
    vae,
    text_encoder,
    images: TrainingImages,
    token_ids: torch.Tensor,
    cache_dir: Path,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    log: Callable[[str], None] = lambda message: None,
    scaling_factor: float | None = None,
) -> LatentTextCache:
    """Encode every image and every caption variant once; returns the loaded cache.

    ``scaling_factor`` fixes the latent scale (a warm-started UNet needs its base's);
    by default it is ``1 / std`` of the new latents.
    """
    if token_ids.shape != (len(images.captions), CLIP_CONTEXT):
        raise HuabiError(f"token_ids must be [{len(images.captions)}, {CLIP_CONTEXT}], got {list(token_ids.shape)}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta_path = cache_dir / "meta.json"
    if meta_path.exists():
        meta_path.unlink()  # an old complete marker must not vouch for new files
    latents = encode_latents(vae, images, batch_size=batch_size, device=device, precision=precision, log=log)
    scaling = latent_scaling_factor(latents) if scaling_factor is None else float(scaling_factor)
    atomic_torch_save(latents, cache_dir / "latents.pt")

    text_encoder.eval()
    width = int(text_encoder.config.hidden_size)
    with atomic_path(cache_dir / "text.npy") as tmp_path:
        text = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=np.float16,
                                         shape=(len(token_ids), CLIP_CONTEXT, width))
        for start in range(0, len(token_ids), batch_size):
            ids = token_ids[start : start + batch_size].to(device)
            with autocast(device, precision):
                hidden = text_encoder(input_ids=ids).last_hidden_state
            text[start : start + len(ids)] = hidden.float().cpu().numpy().astype(np.float16)
            if (start // batch_size) % 100 == 0:
                log(f"[cache] captions {min(len(token_ids), start + batch_size)}/{len(token_ids)}")
        text.flush()
        del text
    meta = {
        "format": CACHE_FORMAT_VERSION,
        "scaling_factor": scaling,
        "latent_shape": list(latents.shape),
        "text_shape": [len(token_ids), CLIP_CONTEXT, width],
        "caption_ids": images.caption_ids,
    }
    atomic_write_text(meta_path, json.dumps(meta))
    log(
        f"[cache] {len(latents)} latents {list(latents.shape[1:])}, latent std {float(latents.double().std()):.4f}, "
        f"scaling factor {scaling:.5f}; {len(token_ids)} captions"
    )
    return load_cache(cache_dir)


def load_cache(cache_dir: Path) -> LatentTextCache:
    cache_dir = Path(cache_dir)
    meta_path = cache_dir / "meta.json"
    if not meta_path.exists():
        raise HuabiError(f"latent cache {cache_dir} is missing or incomplete (no meta.json); run the cache stage")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HuabiError(f"latent cache {meta_path} cannot be read: {exc}") from exc
    if meta.get("format") != CACHE_FORMAT_VERSION:
        raise HuabiError(f"latent cache {meta_path} has format {meta.get('format')!r}, expected {CACHE_FORMAT_VERSION}")
    latents = load_torch_file(cache_dir / "latents.pt", what="latent cache")
    text = np.load(cache_dir / "text.npy", mmap_mode="r")
    if list(latents.shape) != meta["latent_shape"] or list(text.shape) != meta["text_shape"]:
        raise HuabiError(f"latent cache {cache_dir} files do not match meta.json shapes")
    return LatentTextCache(latents=latents, text=text, caption_ids=meta["caption_ids"], scaling_factor=float(meta["scaling_factor"]))
