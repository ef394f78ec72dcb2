"""A loaded checkpoint: the torch modules plus what huabi detected about them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from huabi.core.family import ModelFamily, Prediction, UNetVariant


@dataclass
class ModelBundle:
    """Everything a pipeline needs from one checkpoint.

    ``text_encoders``/``tokenizers`` are ordered as the family uses them:
    SD1/SD2/huabi-mini one each; SDXL [CLIP-L, OpenCLIP bigG]; SDXL refiner [bigG].
    """

    family: ModelFamily
    prediction: Prediction
    variant: UNetVariant
    unet: torch.nn.Module  # diffusers UNet2DConditionModel
    vae: torch.nn.Module  # diffusers AutoencoderKL
    text_encoders: list[torch.nn.Module]  # transformers CLIPTextModel / CLIPTextModelWithProjection
    tokenizers: list  # transformers CLIPTokenizer
    alphas_cumprod: torch.Tensor  # [1000] float64, the training noise schedule
    native_size_px: int  # the resolution the model was trained at (512, 768, 1024, ...)
    name: str  # file stem as A1111 shows it in "Model:"
    path: Path | None = None
    short_hash: str | None = None  # A1111 "Model hash": first 10 hex digits of the file's SHA-256
    vae_name: str | None = None  # set when a separate VAE file replaced the checkpoint's
    vae_short_hash: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # Per-job extra UNet ``added_cond_kwargs`` for conditional (False) / unconditional (True) rows:
    # IP-Adapter image embeddings. Set only on a job's copy (dataclasses.replace), never on the engine's.
    extra_unet_added: Callable[[bool], dict[str, torch.Tensor]] | None = None

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)
