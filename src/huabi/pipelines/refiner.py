"""The SDXL refiner hand-over (A1111 >= 1.6's "Refiner" / "Refiner switch at").

The base model samples until the switch point, then the *same* sampler run
continues in latent space with the refiner: its own conditioning (OpenCLIP
bigG only, aesthetic-score time ids 6.0 / 2.5 for the negative, as A1111 and
diffusers default), its own UNet, the same noise, sigmas, CFG scale and
prompt-schedule clock.  It is a denoiser that hands over, so every sampler
works unchanged and the switch costs no extra steps.

Where the switch happens (A1111's default, "switch by sampling steps" off): at
every denoiser call the current sigma is matched to the nearest of the base
model's 1000 trained sigmas, timestep ``t``; the completed ratio is
``(999 - t) / 1000`` and the refiner takes over from the first call whose
ratio is at least the switch fraction (compared in float32, as A1111's tensor
arithmetic does).  Because this is per *call*, a second-order sampler (Heun,
DPM2, DPM++ 2S a, DPM++ SDE) may switch between the two calls of one step.
The switch is one-way.  At 1.0 no timestep qualifies (the largest ratio is
0.999): the base model runs alone, bit for bit.

Hires fix: A1111's default ("Hires fix: which pass to enable refiner for" =
"second pass") hands over only in the second pass; huabi does the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from huabi.core.conditioning import EmbeddingLookup
from huabi.core.guidance import CFGDenoiser, PredictionDenoiser
from huabi.core.schedules import DiscreteSchedule
from huabi.errors import HuabiError
from huabi.models.bundle import ModelBundle
from huabi.core.family import ModelFamily, UNetVariant
from huabi.pipelines.common import encode_guidance, schedule_steps


def check_refiner_pair(base: ModelBundle, refiner: ModelBundle) -> None:
    """One-line errors for a hand-over that cannot work: base not SDXL, refiner not an SDXL refiner."""
    if refiner.family is not ModelFamily.SDXL_REFINER or refiner.variant is not UNetVariant.BASE:
        kind = refiner.family.value if refiner.variant is UNetVariant.BASE else f"{refiner.family.value} {refiner.variant.value}"
        raise HuabiError(f"refiner: {refiner.name} is a {kind} model, not an SDXL refiner")
    if base.family is not ModelFamily.SDXL:
        raise HuabiError(
            f"refiner: the base model {base.name} is {base.family.value}; the SDXL refiner continues SDXL models only"
        )
    if (refiner.latent_channels, refiner.vae_scale_factor) != (base.latent_channels, base.vae_scale_factor):
        raise HuabiError(f"refiner: {refiner.name}'s latent space differs from {base.name}'s")


def completed_ratio(table: DiscreteSchedule, sigma: torch.Tensor) -> torch.Tensor:
    """A1111's progress measure at ``sigma``: ``(999 - t) / 1000`` for the nearest trained timestep t (float32)."""
    sigma_max = torch.as_tensor(sigma, dtype=torch.float64).detach().cpu().max()
    timestep = int(torch.argmin((table.sigmas - sigma_max).abs()))
    return torch.tensor(float(table.t_max - timestep), dtype=torch.float32) / float(table.num_timesteps)


class HandoverDenoiser:
    """Calls ``base`` until the completed ratio reaches ``switch_at``, then ``refiner`` for good.

    ``switched_at_call`` records the call index of the hand-over (None: never),
    for tests and the infotext.  ``refiner.step`` (the prompt-schedule clock)
    continues from ``base.step``, as A1111 keeps its CFG denoiser's count.
    """

    def __init__(self, base: Callable, refiner: Callable, switch_at: float, table: DiscreteSchedule) -> None:
        self.base = base
        self.refiner = refiner
        self.switch_at = float(switch_at)
        self.table = table
        self.calls = 0
        self.switched_at_call: int | None = None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.switched_at_call is None and bool(completed_ratio(self.table, sigma) >= self.switch_at):
            self.switched_at_call = self.calls
            if hasattr(self.base, "step") and hasattr(self.refiner, "step"):
                self.refiner.step = self.base.step
        self.calls += 1
        return (self.base if self.switched_at_call is None else self.refiner)(x, sigma)


@dataclass(frozen=True)
class RefinerStage:
    """What the hand-over needs besides the base run: the refiner and the prompts to encode for it.

    Passed to :func:`huabi.pipelines.common.denoise` as ``refiner=``; the refiner's
    conditioning is encoded there, for that run's size and step count.
    ``embeddings``: textual inversions as the refiner's bigG encoder sees them.
    """

    bundle: ModelBundle
    switch_at: float
    prompt: str
    negative_prompt: str = ""
    clip_skip: int = 1
    embeddings: EmbeddingLookup | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        switch = self.switch_at
        if isinstance(switch, bool) or not isinstance(switch, (int, float)) or not 0.0 < switch <= 1.0:
            raise HuabiError(f"refiner switch at: must be a number above 0 and at most 1, got {switch!r}")

    def handover(
        self,
        base_denoiser: Callable,
        base: ModelBundle,
        *,
        sampler_name: str,
        steps: int,
        shape: tuple[int, int, int],
        cfg_scale: float,
        device: torch.device,
    ) -> HandoverDenoiser:
        """Wrap ``base_denoiser`` (the base model's guided denoiser of one run) in the hand-over."""
        check_refiner_pair(base, self.bundle)
        _channels, latent_h, latent_w = shape
        guidance = encode_guidance(
            self.bundle, self.prompt, self.negative_prompt, clip_skip=self.clip_skip,
            width_px=latent_w * base.vae_scale_factor, height_px=latent_h * base.vae_scale_factor,
            device=device, steps=steps, sampler_name=sampler_name, embeddings=self.embeddings,
        )
        conds, uncond = guidance.conditioning(schedule_steps(sampler_name, steps))
        refiner_denoiser = CFGDenoiser(
            PredictionDenoiser(self.bundle.unet, DiscreteSchedule(self.bundle.alphas_cumprod), self.bundle.prediction),
            conds, uncond, cfg_scale,
        )
        return HandoverDenoiser(base_denoiser, refiner_denoiser, self.switch_at, DiscreteSchedule(base.alphas_cumprod))


def refiner_title(bundle: ModelBundle) -> str:
    """A1111's "Refiner" infotext value: ``name [short hash]`` (just the name when unhashed)."""
    return f"{bundle.name} [{bundle.short_hash}]" if bundle.short_hash else bundle.name


def refiner_infotext(stage: RefinerStage | None, hires_pass: str | None = None) -> dict[str, object]:
    """The infotext keys of a hand-over: "Refiner", "Refiner switch at" and, for a hires run
    (``hires_pass`` given) that is not A1111's default "second pass", "Hires refiner".

    Without a refiner, or at 1.0 where no hand-over happens (A1111 writes the keys when
    it switches), they are None: left out, and any copies a --from request carries dropped.
    """
    if stage is None or stage.switch_at >= 1.0:
        return {"Hires refiner": None, "Refiner": None, "Refiner switch at": None}
    return {
        "Hires refiner": hires_pass if hires_pass not in (None, "second pass") else None,
        "Refiner": refiner_title(stage.bundle),
        "Refiner switch at": float(stage.switch_at),
    }
