"""Live previews during sampling, and cheaper or smaller final decodes.

- ``Previewer``: the sampler's current ``denoised`` latents -> small PIL images, by
  ``cheap`` (a 4x3 linear map, :mod:`huabi.core.previews`: free) or ``taesd:PATH``
  (the tiny autoencoder: ~1% of the VAE's cost, much closer to the final image).
- ``TinyDecoderVAE``: the bundle's VAE with ``decode`` done by TAESD (``--vae-decoder
  taesd:PATH``): a fast, lower-detail final decode; encode stays the full VAE.
- ``TiledVAE``: the bundle's VAE decoding/encoding in overlapping tiles when the image
  is larger than a tile (``--vae-tiling``): big images fit in memory.

Each wrapper keeps ``config``, ``encoder``/``decoder`` and ``parameters()`` of the VAE
it wraps, so pipelines use it as the VAE.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from huabi.core.previews import FAMILY_LATENT_RGB, LatentRGB, fit_latent_rgb, latents_to_rgb
from huabi.core.vae_tiling import tiled_apply
from huabi.errors import HuabiError
from huabi.models.bundle import ModelBundle
from huabi.models.family import ModelFamily

PreviewCallback = Callable[[int, int, list[Image.Image]], None]  # (steps done, total steps, one image per latent)


class Previewer:
    """Makes preview images of denoised latents (UNet space) for one model family."""

    def __init__(self, method: str, family: ModelFamily, taesd=None, mapping: LatentRGB | None = None) -> None:
        self.method = method
        self.taesd = taesd
        self.mapping = mapping or FAMILY_LATENT_RGB[family]

    def __call__(self, denoised: torch.Tensor) -> list[Image.Image]:
        with torch.inference_mode():
            if self.method == "taesd":
                pixels = self.taesd.decode_latents(denoised.cpu())
                array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            else:
                array = latents_to_rgb(denoised, self.mapping).cpu().numpy()
        return [Image.fromarray(np.ascontiguousarray(image)) for image in array]


def parse_decoder_spec(spec: str, what: str) -> tuple[str, Path | None]:
    """``cheap`` / ``full`` / ``taesd:PATH`` -> (method, path)."""
    method, _, path = spec.partition(":")
    method = method.strip().lower()
    if method == "taesd":
        if not path:
            raise HuabiError(f"{what}: taesd needs a file, e.g. taesd:~/huabi/models/VAE-approx/taesd_decoder.pth")
        return "taesd", Path(path).expanduser()
    if path or method not in ("cheap", "full", "none"):
        raise HuabiError(f"{what}: unknown method {spec!r}; valid: cheap, taesd:PATH")
    return method, None


def make_previewer(spec: str, bundle: ModelBundle) -> Previewer:
    from huabi.models.taesd import load_taesd

    method, path = parse_decoder_spec(spec, "preview")
    flow = bundle.family not in FAMILY_LATENT_RGB  # SD3/FLUX: 16 latent channels
    if method == "taesd" and not flow:
        return Previewer("taesd", bundle.family, load_taesd(path))
    if method == "taesd":  # huabi's TAESD runs SD1/SDXL latents: SD3/FLUX previews fall back to cheap ones
        method = "cheap"
    if method != "cheap":
        raise HuabiError(f"preview: {spec!r} is not a preview method; valid: cheap, taesd:PATH")
    if flow:  # factors fitted to the model's own VAE
        return Previewer("cheap", bundle.family, mapping=fitted_latent_rgb(bundle))
    return Previewer("cheap", bundle.family)


def fitted_latent_rgb(bundle) -> LatentRGB:
    """Cheap-preview factors for a VAE huabi ships none for (SD3/FLUX's 16 channels), fitted by least
    squares on a few synthetic 64x64 images (colour ramps and flat colours) encoded by the bundle's own
    VAE: one small encode per loaded model, and the preview matches whatever VAE the user loaded."""
    from huabi.pipelines.flow import encode_image

    ramp = np.linspace(0, 255, 64, dtype=np.float32)
    images = []
    for r, g, b in ((ramp[None, :], ramp[:, None], 128), (255 - ramp[:, None], 64, ramp[None, :]),
                    (200, ramp[None, :], 255 - ramp[:, None]), (30, 30, 30), (230, 230, 230), (220, 40, 40)):
        array = np.empty((64, 64, 3), dtype=np.float32)
        array[..., 0], array[..., 1], array[..., 2] = r, g, b
        images.append(Image.fromarray(array.round().astype(np.uint8)))
    device = next(bundle.vae.parameters()).device
    latents = torch.cat([encode_image(bundle, image, device) for image in images]).float().cpu()
    pixels = torch.stack([torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                          for image in images])
    return fit_latent_rgb(latents, pixels)


class _VAEWrapper(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.inner = vae
        self.config = vae.config

    @property
    def decoder(self) -> torch.nn.Module:
        return self.inner.decoder

    @property
    def encoder(self) -> torch.nn.Module:
        return self.inner.encoder

    def encode(self, pixels, return_dict=True):
        return self.inner.encode(pixels, return_dict=return_dict)

    def decode(self, latents, return_dict=True):
        return self.inner.decode(latents, return_dict=return_dict)


class _DecodeOutput:
    def __init__(self, sample: torch.Tensor) -> None:
        self.sample = sample

    def __getitem__(self, index):
        return (self.sample,)[index]


class TinyDecoderVAE(_VAEWrapper):
    """``decode`` by TAESD (input: latents already divided by the scaling factor, as the
    pipelines call a VAE)."""

    def __init__(self, vae: torch.nn.Module, taesd) -> None:
        super().__init__(vae)
        self.taesd = taesd

    def decode(self, latents, return_dict=True):
        images = self.taesd.decode_latents(latents.float() * float(self.config.scaling_factor))
        return _DecodeOutput(images) if return_dict else (images,)


# Latent cells per tile side (512 px) and overlap (64 px): the decoder's working set per
# tile is that of a 512x512 image.
TILE_LATENT = 64
OVERLAP_LATENT = 8


class TiledVAE(_VAEWrapper):
    """Decode (and encode) in overlapping tiles once the image is larger than one tile."""

    def __init__(self, vae: torch.nn.Module, tile_latent: int = TILE_LATENT, overlap_latent: int = OVERLAP_LATENT) -> None:
        super().__init__(vae)
        self.tile_latent = tile_latent
        self.overlap_latent = overlap_latent

    def decode(self, latents, return_dict=True):
        if max(latents.shape[-2:]) <= self.tile_latent:
            return self.inner.decode(latents, return_dict=return_dict)
        images = tiled_apply(lambda tile: self.inner.decode(tile, return_dict=False)[0], latents,
                             tile=self.tile_latent, overlap=self.overlap_latent, scale=self._factor())
        return _DecodeOutput(images) if return_dict else (images,)

    def encode(self, pixels, return_dict=True):
        factor = self._factor()
        if max(pixels.shape[-2:]) <= self.tile_latent * factor:
            return self.inner.encode(pixels, return_dict=return_dict)
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        moments = tiled_apply(lambda tile: self._moments(tile), pixels, tile=self.tile_latent * factor,
                              overlap=self.overlap_latent * factor, scale=1 / factor)
        distribution = DiagonalGaussianDistribution(moments)
        if return_dict:
            return _EncodeOutput(distribution)
        return (distribution,)

    def _moments(self, pixels: torch.Tensor) -> torch.Tensor:
        posterior = self.inner.encode(pixels).latent_dist
        return torch.cat([posterior.mean, posterior.logvar], dim=1)

    def _factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)


class _EncodeOutput:
    def __init__(self, latent_dist) -> None:
        self.latent_dist = latent_dist


def with_vae(bundle: ModelBundle, *, tiny_decoder=None, tiled: bool = False) -> ModelBundle:
    """A job copy of ``bundle`` whose VAE decodes with TAESD and/or in tiles."""
    vae = bundle.vae
    if tiny_decoder is not None and not isinstance(bundle, ModelBundle):
        raise HuabiError("vae decoder: taesd:PATH decodes SD1/SDXL latents; SD3/FLUX images decode with their own VAE "
                         "(drop --vae-decoder)")
    if tiled:
        vae = TiledVAE(vae)
    if tiny_decoder is not None:
        vae = TinyDecoderVAE(vae, tiny_decoder)
    return dataclasses.replace(bundle, vae=vae) if vae is not bundle.vae else bundle
