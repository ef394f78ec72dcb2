"""One patch shape for everything that changes the model or the denoiser.

A :class:`Patch` has four optional faces; a feature implements the ones it needs:

- ``on_model(bundle)``: a context manager around one batch that changes the model (LoRA weights,
  hypernetwork / IP-Adapter attention processors, circular padding for tiling) and yields the
  bundle the pipeline should use; it puts everything back on exit (or, for LoRA, leaves it for
  the next job to reuse, as A1111 does);
- ``unet_kwargs(denoise_pass)``: the extra UNet keyword arguments hook of one denoising pass
  (ControlNet / T2I-Adapter residuals);
- ``wrap(denoiser, denoise_pass)``: wraps the guided denoiser of one pass (instruct-pix2pix's
  three-way guidance, the SDXL refiner hand-over, inpainting's keep-the-unmasked-area blend);
- ``infotext()``: the keys it records in the PNG.

The engine collects a job's patches once, when the job is prepared, and enters their
``on_model`` faces around each batch; :func:`huabi.pipelines.common.denoise` applies the
``unet_kwargs`` and ``wrap`` faces of every patch, in list order, in one place. A pipeline adds its
own patches (inpaint blending, instruct guidance) to the list it was given. A new adapter is one
class here (or beside its feature) and one line where the engine collects patches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from huabi.core.guidance import CFGDenoiser, UNetCall, UNetKwargsHook
from huabi.errors import HuabiError
from huabi.models.bundle import ModelBundle

if TYPE_CHECKING:
    from huabi.pipelines.refiner import RefinerStage

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
FIRST_PASS = "first pass"
HIRES_PASS = "hires"


@dataclass
class DenoisePass:
    """What patches see of one denoising loop: the model, the pass's schedule and latent shape.

    ``name`` is ``"first pass"`` or ``"hires"`` (the hires fix's second pass); ``phase`` starts as
    the pass's name and a patch may change it while sampling (the refiner hand-over sets
    ``"refiner"``), so progress events can say which model is running.
    """

    bundle: ModelBundle
    name: str
    sigmas: torch.Tensor
    shape: tuple[int, int, int]
    sampler_name: str
    steps: int
    cfg_scale: float
    device: torch.device
    phase: str = field(default="")

    def __post_init__(self) -> None:
        if not self.phase:
            self.phase = FIRST_PASS if self.name == FIRST_PASS else HIRES_PASS


class Patch:
    """The four faces, each doing nothing by default (see the module notes)."""

    def on_model(self, bundle: ModelBundle) -> contextlib.AbstractContextManager[ModelBundle]:
        return contextlib.nullcontext(bundle)

    def unet_kwargs(self, denoise_pass: DenoisePass) -> UNetKwargsHook | None:
        return None

    def wrap(self, denoiser: Denoiser, denoise_pass: DenoisePass) -> Denoiser:
        return denoiser

    def infotext(self) -> dict[str, Any]:
        return {}


@contextlib.contextmanager
def patched_model(patches: Sequence[Patch], bundle: ModelBundle) -> Iterator[ModelBundle]:
    """Enter every patch's ``on_model`` in order, each seeing the bundle the previous one yielded."""
    with contextlib.ExitStack() as stack:
        for patch in patches:
            bundle = stack.enter_context(patch.on_model(bundle))
        yield bundle


def combined_unet_kwargs(patches: Sequence[Patch], denoise_pass: DenoisePass) -> UNetKwargsHook | None:
    """One UNet hook from every patch that has one (two patches may not set the same argument)."""
    hooks = [hook for hook in (patch.unet_kwargs(denoise_pass) for patch in patches) if hook is not None]
    if not hooks:
        return None
    if len(hooks) == 1:
        return hooks[0]

    def hook(call: UNetCall) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for each in hooks:
            for key, value in each(call).items():
                if key in merged:
                    raise HuabiError(f"patches: two features both set the UNet's {key}")
                merged[key] = value
        return merged

    return hook


def wrapped_denoiser(patches: Sequence[Patch], denoiser: Denoiser, denoise_pass: DenoisePass) -> Denoiser:
    for patch in patches:
        denoiser = patch.wrap(denoiser, denoise_pass)
    return denoiser


def patches_infotext(patches: Sequence[Patch]) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    for patch in patches:
        extra.update(patch.infotext())
    return extra


# ---------------------------------------------------------------------------- patches of the pipelines


class UNetHookPatch(Patch):
    """A UNet hook factory ``(sigmas run, latent shape) -> hook`` as a patch (ControlNet's ``ControlSet.hooks``)."""

    def __init__(self, factory: Callable[..., UNetKwargsHook], infotext: dict[str, Any] | None = None,
                 *, hires_factory: Callable[..., UNetKwargsHook] | None = None) -> None:
        self.factory = factory
        self.hires_factory = hires_factory or factory
        self._infotext = dict(infotext or {})

    def unet_kwargs(self, denoise_pass: DenoisePass) -> UNetKwargsHook | None:
        factory = self.hires_factory if denoise_pass.name == HIRES_PASS else self.factory
        return factory(denoise_pass.sigmas, denoise_pass.shape)

    def infotext(self) -> dict[str, Any]:
        return dict(self._infotext)


class RefinerPatch(Patch):
    """The SDXL refiner taking over the guided denoiser at its switch point, in the passes named."""

    def __init__(self, stage: RefinerStage, passes: Sequence[str] = (FIRST_PASS,),
                 infotext: dict[str, Any] | None = None) -> None:
        self.stage = stage
        self.passes = tuple(passes)
        self._infotext = dict(infotext or {})

    def wrap(self, denoiser: Denoiser, denoise_pass: DenoisePass) -> Denoiser:
        if denoise_pass.name not in self.passes:
            return denoiser
        handover = self.stage.handover(denoiser, denoise_pass.bundle, sampler_name=denoise_pass.sampler_name,
                                       steps=denoise_pass.steps, shape=denoise_pass.shape,
                                       cfg_scale=denoise_pass.cfg_scale, device=denoise_pass.device)

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            out = handover(x, sigma)
            if getattr(handover, "switched_at_call", None) is not None:
                denoise_pass.phase = "refiner"
            return out

        denoise.handover = handover  # for tests: where the switch happened
        return denoise

    def infotext(self) -> dict[str, Any]:
        return dict(self._infotext)


def refiner_passes(refiner_hires_pass: str) -> tuple[str, ...]:
    """The passes of a hires job the refiner takes over in (A1111's "Hires fix: which pass to enable refiner for")."""
    return {"first pass": (FIRST_PASS,), "second pass": (HIRES_PASS,),
            "both passes": (FIRST_PASS, HIRES_PASS)}[refiner_hires_pass]


class GuidancePatch(Patch):
    """Replaces classifier-free guidance by another rule built from the same parts
    (``make(model, conds, uncond, scale)``; instruct-pix2pix's three-way guidance)."""

    def __init__(self, make: Callable[..., Denoiser]) -> None:
        self.make = make

    def wrap(self, denoiser: Denoiser, denoise_pass: DenoisePass) -> Denoiser:
        if not isinstance(denoiser, CFGDenoiser):
            raise HuabiError("patches: a guidance rule must come before any other denoiser wrapper")
        return self.make(denoiser.model, denoiser.conds, denoiser.uncond, denoiser.scale)


class WrapPatch(Patch):
    """Any ``wrap(denoiser) -> denoiser`` function as a patch (inpainting's keep-the-unmasked blend)."""

    def __init__(self, wrap: Callable[[Denoiser], Denoiser]) -> None:
        self._wrap = wrap

    def wrap(self, denoiser: Denoiser, denoise_pass: DenoisePass) -> Denoiser:
        return self._wrap(denoiser)


class ModelContextPatch(Patch):
    """A context manager factory ``bundle -> ContextManager[bundle | None]`` as an ``on_model`` face
    (tiling's circular padding, attention adapters), with its infotext keys."""

    def __init__(self, enter: Callable[[ModelBundle], contextlib.AbstractContextManager],
                 infotext: dict[str, Any] | None = None) -> None:
        self.enter = enter
        self._infotext = dict(infotext or {})

    @contextlib.contextmanager
    def on_model(self, bundle: ModelBundle) -> Iterator[ModelBundle]:
        with self.enter(bundle) as changed:
            yield changed if isinstance(changed, ModelBundle) else bundle

    def infotext(self) -> dict[str, Any]:
        return dict(self._infotext)


def as_patches(
    patches: Sequence[Patch] = (),
    *,
    unet_kwargs_for: Callable[..., UNetKwargsHook] | None = None,
    refiner: RefinerStage | None = None,
    guided_denoiser: Callable[..., Denoiser] | None = None,
    wrap_denoiser: Callable[[Denoiser], Denoiser] | None = None,
) -> tuple[Patch, ...]:
    """The old keyword arguments of the pipelines (kept for callers written against them) as patches,
    in the order denoise applied them: guidance rule, UNet hook, refiner hand-over, then ``wrap_denoiser``."""
    front: list[Patch] = []
    if guided_denoiser is not None:
        front.append(GuidancePatch(guided_denoiser))
    if unet_kwargs_for is not None:
        front.append(UNetHookPatch(unet_kwargs_for))
    if refiner is not None:
        front.append(RefinerPatch(refiner, passes=(FIRST_PASS, HIRES_PASS)))
    back: list[Patch] = [WrapPatch(wrap_denoiser)] if wrap_denoiser is not None else []
    return (*front, *patches, *back)
