"""Denoiser wrappers: turn a UNet into k-diffusion's D(x, sigma) and add CFG.

Samplers only ever see ``denoiser(x, sigma) -> denoised``. What the UNet
predicts (epsilon or v), how timesteps are derived from sigmas, and
classifier-free guidance live here, as wrappers, so no sampler knows of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from huabi.models.family import Prediction


@dataclass(frozen=True)
class UNetInputs:
    """Conditioning for one batch of UNet calls, batch-first."""

    context: torch.Tensor  # [B, tokens, D] cross-attention states
    added: dict[str, torch.Tensor] | None = None  # SDXL: {"text_embeds": [B, P], "time_ids": [B, 6|5]}
    # Extra UNet input channels appended to the scaled latent (inpainting: mask + masked-image
    # latent, [B, 5, h, w]; instruct-pix2pix: image latent, [B, 4, h, w]).
    channels: torch.Tensor | None = None

    @staticmethod
    def concat(parts: list["UNetInputs"]) -> "UNetInputs":
        context = torch.cat([p.context for p in parts])
        added = None
        if parts[0].added is not None:
            added = {key: torch.cat([p.added[key] for p in parts]) for key in parts[0].added}
        channels = None if parts[0].channels is None else torch.cat([p.channels for p in parts])
        return UNetInputs(context, added, channels)

    def repeat_to(self, batch: int) -> "UNetInputs":
        """Broadcast single-row conditioning to ``batch`` rows (rows already at ``batch`` stay)."""

        def expand(tensor: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None or tensor.shape[0] == batch:
                return tensor
            if tensor.shape[0] != 1:
                raise ValueError(f"cannot broadcast conditioning of batch {tensor.shape[0]} to {batch}")
            return tensor.expand(batch, *tensor.shape[1:])

        added = None if self.added is None else {k: expand(v) for k, v in self.added.items()}
        return UNetInputs(expand(self.context), added, expand(self.channels))


class PredictionDenoiser:
    """A UNet trained on discrete timesteps, seen as a denoiser in sigma space.

    x = x0 + sigma * eps. The UNet sees x / sqrt(sigma^2 + 1) at the
    (fractional) timestep whose sigma matches, and predicts eps or v.
    """

    def __init__(self, unet: torch.nn.Module, schedule, prediction: Prediction) -> None:
        self.unet = unet
        self.schedule = schedule  # huabi.core.schedules.DiscreteSchedule
        self.prediction = prediction

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, inputs: UNetInputs) -> torch.Tensor:
        sigma = sigma.to(device=x.device, dtype=torch.float32).reshape(-1)
        if sigma.numel() == 1 and x.shape[0] != 1:
            sigma = sigma.expand(x.shape[0])
        sigma_b = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        c_in = 1.0 / torch.sqrt(sigma_b**2 + 1.0)
        timestep = self.schedule.sigma_to_t(sigma).to(device=x.device, dtype=torch.float32)
        unet_dtype = next(self.unet.parameters()).dtype
        added = None
        if inputs.added is not None:
            added = {k: v.to(device=x.device, dtype=unet_dtype) for k, v in inputs.added.items()}
        unet_input = x * c_in
        if inputs.channels is not None:
            unet_input = torch.cat([unet_input, inputs.channels.to(device=x.device, dtype=unet_input.dtype)], dim=1)
        out = self.unet(
            unet_input.to(unet_dtype),
            timestep,
            encoder_hidden_states=inputs.context.to(device=x.device, dtype=unet_dtype),
            added_cond_kwargs=added,
            return_dict=False,
        )[0].to(torch.float32)
        x = x.to(torch.float32)
        if self.prediction is Prediction.EPSILON:
            return x - out * sigma_b
        # v-prediction (Salimans & Ho): x0 = c_skip * x + c_out * v with sigma_data = 1.
        c_skip = 1.0 / (sigma_b**2 + 1.0)
        c_out = -sigma_b / torch.sqrt(sigma_b**2 + 1.0)
        return x * c_skip + out * c_out


class CFGDenoiser:
    """Classifier-free guidance: uncond + scale * (cond - uncond), one batched UNet call.

    With no negative conditioning or scale 1 the unconditional pass is skipped,
    which is exact: uncond + 1 * (cond - uncond) = cond.
    """

    def __init__(
        self,
        model: PredictionDenoiser,
        cond: UNetInputs,
        uncond: UNetInputs | None,
        scale: float,
    ) -> None:
        self.model = model
        self.cond = cond
        self.uncond = uncond
        self.scale = float(scale)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        cond = self.cond.repeat_to(batch)
        if self.uncond is None or self.scale == 1.0:
            return self.model(x, sigma, cond)
        uncond = self.uncond.repeat_to(batch)
        sigma = sigma.reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(batch)
        if uncond.context.shape[1] == cond.context.shape[1]:
            both = self.model(
                torch.cat([x, x]), torch.cat([sigma, sigma]), UNetInputs.concat([uncond, cond])
            )
            denoised_uncond, denoised_cond = both.chunk(2)
        else:  # different prompt lengths: two calls, as A1111 does unless padding is enabled
            denoised_uncond = self.model(x, sigma, uncond)
            denoised_cond = self.model(x, sigma, cond)
        return denoised_uncond + (denoised_cond - denoised_uncond) * self.scale
