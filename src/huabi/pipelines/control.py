"""ControlNet at sampling time: residuals added to every UNet call of a denoising pass.

A :class:`ControlSet` holds the prepared units (loaded ControlNet module +
detected map + unit settings).  :meth:`ControlSet.hooks` is what the pipelines
hand to :func:`huabi.pipelines.common.denoise` as ``unet_kwargs_for``: given
the sigmas a pass runs and its latent shape it returns a
:class:`ControlNetHook`, the ``unet_kwargs`` hook of
:class:`huabi.core.guidance.PredictionDenoiser`.  The map is fitted to the
pass's pixel size with the unit's resize mode (so the hires pass gets its own,
larger, hint as in sd-webui-controlnet), and each call:

1. finds its step from its sigma (the index of that sigma in the pass's
   schedule; a second-order sampler's extra call at the next sigma counts as
   the next step) and skips units outside their guidance start/end;
2. runs each active ControlNet on the same scaled latent, timestep and
   context as the UNet (SDXL: the same pooled/size embeddings);
3. scales the residuals per block by the control mode, zeroes them on the
   negative-prompt rows for "ControlNet is more important", sums the units and
   returns them as ``down_block_additional_residuals`` /
   ``mid_block_additional_residual``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from huabi.core.control import ControlMode, ControlUnit, ResizeMode, adapter_scales, residual_scales, unit_active
from huabi.core.guidance import UNetCall
from huabi.models.controlnet import is_adapter_module

# Preprocessors whose maps sd-webui-controlnet always soft-injects in the hires pass (thin lines alias badly).
HIRES_SOFT_MODULES = ("canny", "mlsd")


def fit_map(detected: np.ndarray, width_px: int, height_px: int, mode: ResizeMode) -> np.ndarray:
    """Fit a detected map (float32 [H, W, 3]) to ``width_px`` x ``height_px``.

    Just Resize stretches; Crop and Resize scales to cover and crops the centre;
    Resize and Fill scales to fit inside and fills the margins with the median
    colour of the map's border (sd-webui-controlnet's choice for non-binary maps).
    Shrinking uses the area filter, enlarging bicubic; maps with only 0/1 values
    (edges, scribbles) use nearest neighbour so lines stay crisp.
    """
    import cv2

    h, w = detected.shape[:2]
    values = np.unique(detected[:: max(1, h // 64), :: max(1, w // 64)])
    binary = values.size <= 3 and set(values.tolist()) <= {-1.0, 0.0, 1.0}

    def resize(image: np.ndarray, new_w: int, new_h: int) -> np.ndarray:
        if (new_w, new_h) == (image.shape[1], image.shape[0]):
            return image
        if binary:
            interpolation = cv2.INTER_NEAREST
        elif new_w * new_h < image.shape[0] * image.shape[1]:
            interpolation = cv2.INTER_AREA
        else:
            interpolation = cv2.INTER_CUBIC
        return cv2.resize(image, (new_w, new_h), interpolation=interpolation)

    if mode is ResizeMode.JUST_RESIZE:
        return resize(detected, width_px, height_px)
    if mode is ResizeMode.CROP_AND_RESIZE:
        scale = max(width_px / w, height_px / h)
        new_w, new_h = max(width_px, round(w * scale)), max(height_px, round(h * scale))
        scaled = resize(detected, new_w, new_h)
        top, left = (new_h - height_px) // 2, (new_w - width_px) // 2
        return np.ascontiguousarray(scaled[top:top + height_px, left:left + width_px])
    scale = min(width_px / w, height_px / h)
    new_w, new_h = min(width_px, max(1, round(w * scale))), min(height_px, max(1, round(h * scale)))
    scaled = resize(detected, new_w, new_h)
    border = np.concatenate([detected[0], detected[-1], detected[:, 0], detected[:, -1]])
    canvas = np.empty((height_px, width_px, 3), dtype=np.float32)
    canvas[:] = np.median(border, axis=0)
    top, left = (height_px - new_h) // 2, (width_px - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = scaled
    return canvas


@dataclass(frozen=True)
class PreparedControl:
    """One unit ready to run: its ControlNet module and detected map."""

    unit: ControlUnit
    model: torch.nn.Module  # diffusers ControlNetModel
    detected: np.ndarray  # float32 [H, W, 3], see huabi.core.preprocess
    model_label: str  # "name [hash]" for the infotext


class ControlNetHook:
    """The ``unet_kwargs`` hook for one denoising pass (see the module docstring)."""

    def __init__(
        self,
        controls: Sequence[PreparedControl],
        sigmas: torch.Tensor,
        width_px: int,
        height_px: int,
        *,
        sdxl: bool,
        hires_pass: bool = False,
    ) -> None:
        self.controls = list(controls)
        self.sigmas = sigmas.detach().to("cpu", torch.float64)
        self.total_steps = len(self.sigmas) - 1
        self.sdxl = sdxl
        self.hires_pass = hires_pass
        # [1, 3, H, W] hints in [0, 1] (inpaint: -1 marks pixels to repaint), built once per pass.
        self.hints = [
            torch.from_numpy(fit_map(c.detected, width_px, height_px, c.unit.resize_mode)).permute(2, 0, 1)[None].contiguous()
            for c in self.controls
        ]
        self.calls: list[tuple[int, tuple[bool, ...]]] = []  # (step, unit active?) per call, for tests
        self._adapter_features: dict[int, list[torch.Tensor]] = {}  # T2I-Adapter outputs: one run per pass

    def step_of(self, sigma: float) -> int:
        """Index of ``sigma`` in the pass's schedule (sigmas above it, with float tolerance)."""
        above = self.sigmas[:-1] > sigma * (1.0 + 1e-5) + 1e-8
        return int(above.sum())

    def __call__(self, call: UNetCall) -> dict[str, Any]:
        step = self.step_of(float(call.sigma.reshape(-1)[0]))
        active = tuple(
            unit_active(step, self.total_steps, c.unit.guidance_start, c.unit.guidance_end) and c.unit.weight != 0
            for c in self.controls
        )
        self.calls.append((step, active))
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        intrablock: list[torch.Tensor] | None = None
        rows = call.sample.shape[0]
        for index, (control, hint, on) in enumerate(zip(self.controls, self.hints, active, strict=True)):
            if not on:
                continue
            model = control.model
            if is_adapter_module(model):
                features = self._adapter(index, model, hint, call.sample.device)
                scales = adapter_scales(len(features), control.unit.weight, control.unit.control_mode)
                mark = self._row_scale(control, call, features[0].dtype)
                scaled = [(f * s).expand(rows, -1, -1, -1) * (1 if mark is None else mark) for f, s in zip(features, scales)]
                intrablock = scaled if intrablock is None else [a + b for a, b in zip(intrablock, scaled, strict=True)]
                continue
            dtype = next(model.parameters()).dtype
            cond = hint.to(device=call.sample.device, dtype=dtype).expand(rows, -1, -1, -1)
            added = None if call.added is None else {k: v.to(dtype) for k, v in call.added.items()}
            # Inpainting / instruct-pix2pix UNets take extra image channels after the latent; a
            # ControlNet sees the latent only (as sd-webui-controlnet and diffusers feed it).
            sample = call.sample[:, : int(model.config.in_channels)]
            down_res, mid_res = model(
                sample.to(dtype), call.timestep, encoder_hidden_states=call.context.to(dtype),
                controlnet_cond=cond, conditioning_scale=1.0, added_cond_kwargs=added, return_dict=False,
            )
            residuals = list(down_res) + [mid_res]
            force_soft = self.hires_pass and control.unit.module in HIRES_SOFT_MODULES
            scales = residual_scales(len(residuals), control.unit.weight, control.unit.control_mode,
                                     sdxl=self.sdxl, force_soft=force_soft)
            row_scale = self._row_scale(control, call, residuals[0].dtype)
            scaled = []
            for residual, scale in zip(residuals, scales, strict=True):
                residual = residual * scale
                if row_scale is not None:
                    residual = residual * row_scale
                scaled.append(residual)
            if down is None:
                down, mid = scaled[:-1], scaled[-1]
            else:
                down = [a + b for a, b in zip(down, scaled[:-1], strict=True)]
                mid = mid + scaled[-1]
        unet_dtype = call.sample.dtype
        extra: dict[str, Any] = {}
        if down is not None:
            extra["down_block_additional_residuals"] = tuple(r.to(unet_dtype) for r in down)
            extra["mid_block_additional_residual"] = mid.to(unet_dtype)
        if intrablock is not None:  # a fresh list per call: the UNet pops from it
            extra["down_intrablock_additional_residuals"] = [f.to(unet_dtype) for f in intrablock]
        return extra

    @staticmethod
    def _row_scale(control: PreparedControl, call: UNetCall, dtype: torch.dtype) -> torch.Tensor | None:
        """[B, 1, 1, 1] cond mark for "ControlNet is more important" and for global-pooling
        models (shuffle), whose control goes to the positive rows only (diffusers' guess mode)."""
        pooled = bool(getattr(control.model, "config", {}).get("global_pool_conditions", False))
        if control.unit.control_mode is not ControlMode.CONTROL and not pooled:
            return None
        return call.inputs.row_cond_mark().to(device=call.sample.device, dtype=dtype).reshape(-1, 1, 1, 1)

    def _adapter(self, index: int, model: torch.nn.Module, hint: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
        """The adapter's features for this pass's hint (they depend on the image only)."""
        if index not in self._adapter_features:
            dtype = next(model.parameters()).dtype
            channels = int(model.config.in_channels)
            image = hint.clamp(min=0.0)[:, :channels].to(device=device, dtype=dtype)  # grey adapters: first channel
            with torch.inference_mode():
                self._adapter_features[index] = list(model(image))
        return self._adapter_features[index]


@dataclass(frozen=True)
class ControlSet:
    """The prepared units of one request; :meth:`hooks` makes each pass's UNet hook."""

    controls: tuple[PreparedControl, ...]
    sdxl: bool
    vae_scale_factor: int = 8

    def hooks(self, sigmas: torch.Tensor, latent_shape: Sequence[int], *, hires_pass: bool = False) -> ControlNetHook:
        latent_h, latent_w = int(latent_shape[-2]), int(latent_shape[-1])
        return ControlNetHook(
            self.controls, sigmas, latent_w * self.vae_scale_factor, latent_h * self.vae_scale_factor,
            sdxl=self.sdxl, hires_pass=hires_pass,
        )

    def hires_hooks(self):
        """The factory for a hires fix's second pass (canny/mlsd maps soft-injected there)."""
        return functools.partial(self.hooks, hires_pass=True)

    def infotext(self) -> dict[str, str]:
        from huabi.core.control import format_unit_infotext

        return {f"ControlNet {i}": format_unit_infotext(c.unit, c.model_label) for i, c in enumerate(self.controls)}
