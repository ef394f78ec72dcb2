"""Fit the "Approx cheap" latent -> RGB factors of a model's VAE by least squares.

    .venv/bin/python scripts/fit_preview_factors.py [--model PATH] [--images DIR] [--count N]

Encodes up to N images (PNG/JPEG in DIR, default the huabi-mini training set built by
`huabi data build`, ~/.cache/huabi/data/huabi-mini-128) with the model's VAE, scales
the latents into the UNet's space, pools the pixels to the latent grid and solves
``[latents, 1] @ W = rgb`` (huabi.core.previews.fit_latent_rgb). Prints the factors and,
on a held-out quarter of the images, the preview's mean absolute error in 0..255
pixels against the pooled images, beside the error of the SD1 factors for scale.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from huabi.core.previews import SD_LATENT_RGB, fit_latent_rgb, latents_to_rgb
from huabi.service.engine import Engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="default: the built-in huabi-mini")
    parser.add_argument("--images", type=Path, default=Path.home() / ".cache/huabi/data/huabi-mini-128")
    parser.add_argument("--count", type=int, default=400)
    args = parser.parse_args()
    bundle = Engine(device="cpu", dtype="fp32").load(args.model)
    size = bundle.native_size_px
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[: args.count]
    if len(paths) < 8:
        raise SystemExit(f"need at least 8 images in {args.images}")
    pixels = torch.stack([
        torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((size, size)), dtype=np.float32))
        .permute(2, 0, 1) / 127.5 - 1 for p in paths])
    with torch.inference_mode():
        latents = torch.cat([bundle.vae.encode(chunk).latent_dist.mode() for chunk in pixels.split(16)])
    latents = latents * bundle.latent_scaling_factor
    split = len(paths) * 3 // 4
    mapping = fit_latent_rgb(latents[:split], pixels[:split])
    pooled = torch.nn.functional.adaptive_avg_pool2d(pixels[split:], latents.shape[-2:])
    truth = ((pooled.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1)
    for name, candidate in (("fitted", mapping), ("SD1 factors", SD_LATENT_RGB)):
        error = (latents_to_rgb(latents[split:], candidate).float() - truth).abs().mean()
        print(f"{name}: held-out mean |error| {error:.1f} / 255 on {len(paths) - split} images")
    print("factors =", mapping.factors)
    print("bias =", mapping.bias)


if __name__ == "__main__":
    main()
