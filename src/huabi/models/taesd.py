"""TAESD / TAESDXL: tiny autoencoders for SD latents (madebyollin's architecture).

A few MB each, ~100x cheaper than the full VAE decoder: good for live previews, and as
an optional fast final decoder (``--vae-decoder taesd:PATH``) when speed matters more
than fine detail. Users bring the weights (no hub); accepted files:

- the original split files ``taesd_decoder.pth`` / ``taesdxl_decoder.safetensors`` (and
  ``*_encoder.*``): keys ``<index>.<...>`` of the ``nn.Sequential`` below (the layout
  A1111's ``VAE-approx`` and ComfyUI's ``vae_approx`` folders use);
- diffusers' ``AutoencoderTiny`` weights (``diffusion_pytorch_model.safetensors`` or a
  folder holding it): ``decoder.layers.<index>...`` (its decoder has no clamp layer, so
  its indices are one lower) and ``encoder.layers.<index>...``.

The decoder takes latents in the UNet's space (already multiplied by the VAE's scaling
factor) and returns images in [-1, 1], as the full VAE's decode does after unscaling.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from huabi.errors import HuabiError


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class _Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3  # soft clamp of the latents to +-3


class _Block(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def tiny_decoder(latent_channels: int = 4, width: int = 64) -> nn.Sequential:
    """Latents -> [0, 1] images at 8x the size: 3 upsampling stages of 3 blocks each."""
    layers: list[nn.Module] = [_Clamp(), _conv(latent_channels, width), nn.ReLU()]
    for _ in range(3):
        layers += [_Block(width, width), _Block(width, width), _Block(width, width),
                   nn.Upsample(scale_factor=2), _conv(width, width, bias=False)]
    layers += [_Block(width, width), _conv(width, 3)]
    return nn.Sequential(*layers)


def tiny_encoder(latent_channels: int = 4, width: int = 64) -> nn.Sequential:
    """[0, 1] images -> latents at 1/8 the size."""
    layers: list[nn.Module] = [_conv(3, width), _Block(width, width)]
    for _ in range(3):
        layers += [_conv(width, width, stride=2, bias=False), _Block(width, width), _Block(width, width),
                   _Block(width, width)]
    layers.append(_conv(width, latent_channels))
    return nn.Sequential(*layers)


class TinyAutoencoder(nn.Module):
    """TAESD with the full VAE's calling convention for the parts huabi uses."""

    def __init__(self, decoder: nn.Sequential | None, encoder: nn.Sequential | None, name: str) -> None:
        super().__init__()
        self.decoder = decoder
        self.encoder = encoder
        self.name = name

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """UNet-space latents [B, 4, h, w] -> images [B, 3, 8h, 8w] in [-1, 1]."""
        if self.decoder is None:
            raise HuabiError(f"taesd: {self.name} has no decoder weights")
        dtype = next(self.decoder.parameters()).dtype
        return self.decoder(latents.to(dtype)).float().clamp(0, 1) * 2 - 1

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> UNet-space latents."""
        if self.encoder is None:
            raise HuabiError(f"taesd: {self.name} has no encoder weights")
        dtype = next(self.encoder.parameters()).dtype
        return self.encoder(((pixels + 1) / 2).to(dtype)).float()


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".pth", ".pt", ".bin"):
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(loaded, dict) and "state_dict" in loaded:
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict):
            raise HuabiError(f"taesd: {path}: not a state dict")
        return loaded
    raise HuabiError(f"taesd: {path}: unknown file type (use .safetensors or .pth)")


def _shift_indices(tensors: dict[str, torch.Tensor], prefix: str, shift: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in tensors.items():
        if key.startswith(prefix):
            index, _, rest = key[len(prefix):].partition(".")
            out[f"{int(index) + shift}.{rest}"] = tensor
    return out


def load_taesd(path: str | Path, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> TinyAutoencoder:
    """A TAESD/TAESDXL decoder (and encoder, when the file or a sibling ``*_encoder`` file
    has one) from ``path``; see the module docstring for the layouts."""
    path = Path(path).expanduser()
    if path.is_dir():
        candidates = [path / "diffusion_pytorch_model.safetensors", *sorted(path.glob("*decoder*.safetensors")),
                      *sorted(path.glob("*decoder*.pth"))]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise HuabiError(f"taesd: {path}: no TAESD weights in this folder")
        path = found
    if not path.is_file():
        raise HuabiError(f"taesd: {path}: no such file")
    tensors = _read_tensors(path)
    decoder_sd: dict[str, torch.Tensor] = {}
    encoder_sd: dict[str, torch.Tensor] = {}
    if any(key.startswith("decoder.layers.") or key.startswith("encoder.layers.") for key in tensors):
        decoder_sd = _shift_indices(tensors, "decoder.layers.", 1)  # diffusers has no clamp layer
        encoder_sd = _shift_indices(tensors, "encoder.layers.", 0)
    elif all(key.split(".")[0].isdigit() for key in tensors):
        # Original split files: a decoder starts with the clamp (no weights at index 0).
        first_conv = tensors.get("0.weight")
        if first_conv is not None and first_conv.shape[1] == 3:
            encoder_sd = tensors
        else:
            decoder_sd = tensors
        sibling = _sibling(path, "encoder" if decoder_sd else "decoder")
        if sibling is not None:
            (encoder_sd if decoder_sd else decoder_sd).update(_read_tensors(sibling))
    else:
        raise HuabiError(f"taesd: {path}: not a TAESD file (expected keys like '1.weight' or 'decoder.layers.0.weight')")
    decoder = encoder = None
    if decoder_sd:
        latent_channels = int(decoder_sd["1.weight"].shape[1]) if "1.weight" in decoder_sd else 4
        decoder = tiny_decoder(latent_channels)
        _load_strict(decoder, decoder_sd, path, "decoder")
    if encoder_sd:
        latent_channels = int(encoder_sd[max((k for k in encoder_sd if k.endswith(".weight")),
                                            key=lambda k: int(k.split(".")[0]))].shape[0])
        encoder = tiny_encoder(latent_channels)
        _load_strict(encoder, encoder_sd, path, "encoder")
    model = TinyAutoencoder(decoder, encoder, path.stem).to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model


def _sibling(path: Path, part: str) -> Path | None:
    other = "decoder" if part == "encoder" else "encoder"
    if other not in path.name:
        return None
    candidate = path.with_name(path.name.replace(other, part))
    return candidate if candidate.exists() else None


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], path: Path, part: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise HuabiError(f"taesd: {path}: {part} keys do not match the TAESD layout "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise HuabiError(f"taesd: {path}: {part} tensor {key} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(expected[key].shape)}")
    module.load_state_dict({k: v.float() for k, v in state.items()})
