"""Denoiser wrappers: turn a UNet into k-diffusion's D(x, sigma) and add CFG.

Samplers only ever see ``denoiser(x, sigma) -> denoised``. What the UNet
predicts (epsilon or v), how timesteps are derived from sigmas, and
classifier-free guidance live here, as wrappers, so no sampler knows of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from huabi.core.prompt_parser import schedule_entry_index
from huabi.errors import HuabiError
from huabi.core.family import Prediction


@dataclass(frozen=True)
class UNetInputs:
    """Conditioning for one batch of UNet calls, batch-first."""

    context: torch.Tensor  # [B, tokens, D] cross-attention states
    added: dict[str, torch.Tensor] | None = None  # SDXL: {"text_embeds": [B, P], "time_ids": [B, 6|5]}
    # Extra UNet input channels appended to the scaled latent (inpainting: mask + masked-image
    # latent, [B, 5, h, w]; instruct-pix2pix: image latent, [B, 4, h, w]).
    channels: torch.Tensor | None = None
    # [B] 1.0 for rows of a positive prompt, 0.0 for the negative (set by CFGDenoiser; None = all
    # positive). For UNet hooks that treat them differently (ControlNet's "ControlNet is more important").
    cond_mark: torch.Tensor | None = None

    @staticmethod
    def concat(parts: list["UNetInputs"]) -> "UNetInputs":
        context = torch.cat([p.context for p in parts])
        added = None
        if parts[0].added is not None:
            added = {key: torch.cat([p.added[key] for p in parts]) for key in parts[0].added}
        channels = None if parts[0].channels is None else torch.cat([p.channels for p in parts])
        cond_mark = None
        if any(p.cond_mark is not None for p in parts):
            cond_mark = torch.cat([p.row_cond_mark() for p in parts])
        return UNetInputs(context, added, channels, cond_mark)

    def row_cond_mark(self) -> torch.Tensor:
        """[B] float cond mark, 1.0 (positive) where none was set."""
        if self.cond_mark is not None:
            return self.cond_mark
        return torch.ones(self.context.shape[0], device=self.context.device)

    def repeat_to(self, batch: int) -> "UNetInputs":
        """Broadcast single-row conditioning to ``batch`` rows (rows already at ``batch`` stay)."""

        def expand(tensor: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None or tensor.shape[0] == batch:
                return tensor
            if tensor.shape[0] != 1:
                raise ValueError(f"cannot broadcast conditioning of batch {tensor.shape[0]} to {batch}")
            return tensor.expand(batch, *tensor.shape[1:])

        added = None if self.added is None else {k: expand(v) for k, v in self.added.items()}
        return UNetInputs(expand(self.context), added, expand(self.channels), expand(self.cond_mark))


@dataclass(frozen=True)
class ScheduledInputs:
    """UNet inputs that change during sampling (A1111 prompt editing and alternation).

    ``entries`` are ``(last_step, inputs)`` in ascending ``last_step``, from
    :func:`huabi.core.prompt_parser.prompt_schedule`.  :meth:`at` takes A1111's
    step count -- the number of denoiser calls made so far, from 0 -- and returns
    the first entry whose ``last_step`` is >= it (the last entry past the end).
    """

    entries: tuple[tuple[int, UNetInputs], ...]

    def __post_init__(self) -> None:
        if not self.entries:
            raise HuabiError("scheduled conditioning needs at least one entry")

    @staticmethod
    def constant(inputs: UNetInputs) -> "ScheduledInputs":
        return ScheduledInputs(((0, inputs),))

    def at(self, step: int) -> UNetInputs:
        index = schedule_entry_index([last for last, _ in self.entries], step)
        return self.entries[index][1]

    def with_channels(self, channels: torch.Tensor | None) -> "ScheduledInputs":
        return ScheduledInputs(tuple((last, replace(inputs, channels=channels)) for last, inputs in self.entries))


def as_scheduled(cond: "UNetInputs | ScheduledInputs") -> ScheduledInputs:
    return cond if isinstance(cond, ScheduledInputs) else ScheduledInputs.constant(cond)


@dataclass(frozen=True)
class UNetCall:
    """One UNet call as the UNet will see it, for hooks that add UNet inputs.

    ``sample`` is the scaled latent (extra input channels appended) in the UNet's
    dtype, ``timestep`` and ``sigma`` are per row [B], ``inputs`` the batched
    conditioning with its device-placed ``context`` / ``added`` as passed to the UNet.
    """

    sample: torch.Tensor
    timestep: torch.Tensor
    sigma: torch.Tensor
    inputs: UNetInputs
    context: torch.Tensor
    added: dict[str, torch.Tensor] | None


# Extra keyword arguments for the UNet call, e.g. ControlNet residuals
# (down_block_additional_residuals / mid_block_additional_residual).
UNetKwargsHook = Callable[[UNetCall], dict[str, Any]]


class PredictionDenoiser:
    """A UNet trained on discrete timesteps, seen as a denoiser in sigma space.

    x = x0 + sigma * eps. The UNet sees x / sqrt(sigma^2 + 1) at the
    (fractional) timestep whose sigma matches, and predicts eps or v.
    ``unet_kwargs`` (optional) is called with every :class:`UNetCall` and returns
    extra keyword arguments for the UNet (an empty dict adds nothing).
    """

    def __init__(
        self, unet: torch.nn.Module, schedule, prediction: Prediction, unet_kwargs: UNetKwargsHook | None = None
    ) -> None:
        self.unet = unet
        self.schedule = schedule  # huabi.core.schedules.DiscreteSchedule
        self.prediction = prediction
        self.unet_kwargs = unet_kwargs

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
        unet_input = unet_input.to(unet_dtype)
        context = inputs.context.to(device=x.device, dtype=unet_dtype)
        extra: dict[str, Any] = {}
        if self.unet_kwargs is not None:
            extra = self.unet_kwargs(UNetCall(unet_input, timestep, sigma, inputs, context, added))
        out = self.unet(
            unet_input,
            timestep,
            encoder_hidden_states=context,
            added_cond_kwargs=added,
            return_dict=False,
            **extra,
        )[0].to(torch.float32)
        x = x.to(torch.float32)
        if self.prediction is Prediction.EPSILON:
            return x - out * sigma_b
        # v-prediction (Salimans & Ho): x0 = c_skip * x + c_out * v with sigma_data = 1.
        c_skip = 1.0 / (sigma_b**2 + 1.0)
        c_out = -sigma_b / torch.sqrt(sigma_b**2 + 1.0)
        return x * c_skip + out * c_out


class CFGDenoiser:
    """Classifier-free guidance, with A1111's composable (AND) prompts and prompt editing.

    ``cond`` is one conditioning or a list of ``(conditioning, weight)`` AND
    sub-prompts; each conditioning may be a :class:`ScheduledInputs`.  As in
    A1111's CFGDenoiser:
    ``denoised = uncond + sum_i (cond_i - uncond) * (weight_i * scale)``, and the
    schedule step is the number of calls made so far (``self.step``, from 0), so a
    second-order sampler advances it twice per step -- A1111 therefore schedules
    those samplers over twice the steps.

    With one sub-prompt of weight 1 and no negative conditioning or scale 1 the
    unconditional pass is skipped, which is exact: uncond + 1 * (cond - uncond) = cond.
    All inputs of equal token length go through the UNet in one batch; otherwise
    each goes separately, as A1111 does unless padding is enabled.
    """

    def __init__(
        self,
        model: PredictionDenoiser,
        cond: "UNetInputs | ScheduledInputs | Sequence[tuple[UNetInputs | ScheduledInputs, float]]",
        uncond: "UNetInputs | ScheduledInputs | None",
        scale: float,
    ) -> None:
        self.model = model
        if isinstance(cond, (UNetInputs, ScheduledInputs)):
            cond = [(cond, 1.0)]
        self.conds: list[tuple[ScheduledInputs, float]] = [(as_scheduled(c), float(w)) for c, w in cond]
        if not self.conds:
            raise HuabiError("cond: at least one conditioning is needed")
        self.uncond = None if uncond is None else as_scheduled(uncond)
        self.scale = float(scale)
        self.step = 0  # denoiser calls so far: A1111's prompt-schedule clock

    @property
    def cond(self) -> UNetInputs:
        """The first sub-prompt's conditioning at the current step."""
        return self.conds[0][0].at(self.step)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        step = self.step
        self.step += 1
        batch = x.shape[0]
        conds = [(c.at(step).repeat_to(batch), w) for c, w in self.conds]
        single = len(conds) == 1 and conds[0][1] == 1.0
        if single and (self.uncond is None or self.scale == 1.0):
            return self.model(x, sigma, conds[0][0])
        if self.uncond is None:
            raise HuabiError("uncond: composable (AND) prompts need an unconditional conditioning")
        uncond = self.uncond.at(step).repeat_to(batch)
        sigma = sigma.reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(batch)
        # Mark negative/positive rows for UNet hooks (ControlNet's CFG-aware modes).
        inputs = [_with_cond_mark(uncond, 0.0)] + [_with_cond_mark(c, 1.0) for c, _ in conds]
        if all(i.context.shape[1] == uncond.context.shape[1] for i in inputs):
            n = len(inputs)
            outputs = self.model(torch.cat([x] * n), torch.cat([sigma] * n), UNetInputs.concat(inputs)).chunk(n)
        else:  # different prompt lengths: separate calls, as A1111 does unless padding is enabled
            outputs = [self.model(x, sigma, i) for i in inputs]
        denoised_uncond = outputs[0]
        if single:
            return denoised_uncond + (outputs[1] - denoised_uncond) * self.scale
        denoised = denoised_uncond.clone()
        for out, (_, weight) in zip(outputs[1:], conds, strict=True):
            denoised += (out - denoised_uncond) * (weight * self.scale)
        return denoised


def _with_cond_mark(inputs: UNetInputs, mark: float) -> UNetInputs:
    rows = inputs.context.shape[0]
    return replace(inputs, cond_mark=torch.full((rows,), mark, device=inputs.context.device))
