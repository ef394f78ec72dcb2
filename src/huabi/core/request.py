"""What the user asked for: one frozen, validated dataclass.

Interfaces (CLI, API, web UI, infotext) build a ``GenerationRequest``; every
field is checked at construction so a bad value fails before any model loads,
with a one-line message naming the field.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

from huabi.core.names import (
    SAMPLER_NAMES,
    SCHEDULE_NAMES,
    canonical_sampler_name,
    canonical_schedule_name,
)
from huabi.errors import HuabiError

MAX_SEED = 2**32 - 1  # one seed rule everywhere (A1111 draws random seeds below 2**32; Midjourney caps --seed here)
MAX_SIDE_PX = 8192
MAX_STEPS = 1000
MAX_BATCH_SIZE = 64
MAX_CLIP_SKIP = 12

# A1111's hires-fix upscaler names: latent modes interpolate the latent (torch mode, antialias),
# pixel modes decode, resize the image and encode again. A model file path is also accepted.
HIRES_LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
HIRES_PIXEL_UPSCALERS = ("Lanczos", "None")
HIRES_UPSCALER_NAMES = (*HIRES_LATENT_MODES, *HIRES_PIXEL_UPSCALERS)
UPSCALER_FILE_SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt", ".bin")
MIN_HIRES_SCALE = 1.0
MAX_HIRES_SCALE = 4.0
REFINER_HIRES_PASSES = ("first pass", "second pass", "both passes")  # A1111's choices; default second


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "DPM++ 2M"
    schedule: str = "Automatic"
    seed: int = -1  # -1: pick a random seed at run time (and record it)
    width_px: int | None = None  # None: the model's native size
    height_px: int | None = None
    batch_size: int = 1
    batch_count: int = 1
    clip_skip: int = 1
    model: str | None = None  # path, name or hash; None: the built-in model
    vae: str | None = None
    tile: bool = False  # seamless tiling: circular padding in the UNet and VAE decoder
    # A1111's variation seed ("subseed"): -1 picks one at run time; used only with strength > 0.
    variation_seed: int = -1
    variation_strength: float = 0.0  # 0: the plain seed's noise, 1: the variation seed's
    # A1111's "resize seed from" (width_px, height_px): noise drawn at that size, pasted centred.
    seed_resize_from_px: tuple[int, int] | None = None
    # A1111's hires fix: a second img2img pass at the upscaled size (off unless hires is True).
    hires: bool = False
    hires_scale: float = 2.0  # used when hires_resize_px is None
    hires_resize_px: tuple[int, int] | None = None  # (width_px, height_px) target instead of a scale
    hires_upscaler: str = "Latent"  # a HIRES_UPSCALER_NAMES entry or an upscaler model file path
    hires_steps: int = 0  # 0: the first pass's step count
    hires_denoise: float = 0.7
    # ControlNet units (huabi.core.control.ControlUnit), applied together, in order.
    controlnets: tuple = ()
    # SDXL refiner: a second checkpoint takes over at this fraction of the steps (None: off).
    refiner: str | None = None
    refiner_switch_at: float = 0.8
    # With hires fix, which pass hands over (A1111's "Hires fix: which pass to enable refiner for").
    refiner_hires_pass: str = "second pass"
    # A1111's hypernetwork setting (name or path; <hypernet:name:w> prompt tags add more).
    hypernetwork: str | None = None
    hypernetwork_strength: float = 1.0
    # IP-Adapter image prompt: adapter name or path, the image, its weight; image encoder
    # (a clip_vision name or path; None: the first in clip_vision/ that fits the adapter).
    ip_adapter: str | None = None
    ip_image: str | None = None
    ip_weight: float = 1.0
    ip_image_encoder: str | None = None
    # Infotext keys huabi does not act on, kept so a round trip loses nothing.
    extra: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise HuabiError("prompt: must be text")
        for field, label in (("prompt", "prompt"), ("negative_prompt", "negative prompt")):
            if "\0" in str(getattr(self, field)):  # refused now, not at save time after sampling
                raise HuabiError(f"{label}: contains a NUL character, which an image's infotext cannot hold")
        sampler = canonical_sampler_name(self.sampler)
        if sampler is None:
            raise HuabiError(
                f"sampler: unknown sampler {self.sampler!r}; valid: {', '.join(SAMPLER_NAMES)}"
            )
        object.__setattr__(self, "sampler", sampler)
        schedule = canonical_schedule_name(self.schedule)
        if schedule is None:
            raise HuabiError(
                f"schedule: unknown schedule type {self.schedule!r}; valid: {', '.join(SCHEDULE_NAMES)}"
            )
        object.__setattr__(self, "schedule", schedule)
        _check_int_range("steps", self.steps, 1, MAX_STEPS)
        _check_int_range("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _check_int_range("batch_count", self.batch_count, 1, 10_000)
        _check_int_range("clip_skip", self.clip_skip, 1, MAX_CLIP_SKIP)
        if not isinstance(self.cfg_scale, (int, float)) or not 0 <= self.cfg_scale <= 100:
            raise HuabiError(f"cfg_scale: must be a number from 0 to 100, got {self.cfg_scale!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise HuabiError(f"seed: must be an integer, got {self.seed!r}")
        if self.seed != -1 and not 0 <= self.seed <= MAX_SEED:  # one rule: CLI, Midjourney --seed, infotext
            raise HuabiError(f"seed: must be -1 (random) or a whole number from 0 to {MAX_SEED}, got {self.seed}")
        if not isinstance(self.tile, bool):
            raise HuabiError(f"tile: must be True or False, got {self.tile!r}")
        if not isinstance(self.variation_seed, int) or isinstance(self.variation_seed, bool):
            raise HuabiError(f"variation_seed: must be an integer, got {self.variation_seed!r}")
        if self.variation_seed != -1 and not 0 <= self.variation_seed <= MAX_SEED:
            raise HuabiError(f"variation seed: must be -1 (random) or a whole number from 0 to {MAX_SEED}, "
                             f"got {self.variation_seed}")
        strength = self.variation_strength
        if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not 0.0 <= strength <= 1.0:
            raise HuabiError(f"variation_strength: must be a number from 0 to 1, got {strength!r}")
        if self.seed_resize_from_px is not None:
            size = self.seed_resize_from_px
            if not isinstance(size, tuple) or len(size) != 2:
                raise HuabiError(f"seed_resize_from_px: must be (width_px, height_px), got {size!r}")
            _check_int_range("seed_resize_from_px width", size[0], 8, MAX_SIDE_PX)
            _check_int_range("seed_resize_from_px height", size[1], 8, MAX_SIDE_PX)
        self._check_hires()
        self._check_attention_adapters()
        if self.refiner is not None and (not isinstance(self.refiner, str) or not self.refiner):
            raise HuabiError(f"refiner: must be a model path or name, got {self.refiner!r}")
        switch = self.refiner_switch_at
        if isinstance(switch, bool) or not isinstance(switch, (int, float)) or not 0.0 < switch <= 1.0:
            raise HuabiError(f"refiner_switch_at: must be a number above 0 and at most 1, got {switch!r}")
        if self.refiner_hires_pass not in REFINER_HIRES_PASSES:
            raise HuabiError(f"refiner_hires_pass: must be one of {', '.join(REFINER_HIRES_PASSES)}, "
                             f"got {self.refiner_hires_pass!r}")
        for name in ("width_px", "height_px"):
            value = getattr(self, name)
            if value is None:
                continue
            _check_int_range(name, value, 8, MAX_SIDE_PX)
            if value % 8:
                raise HuabiError(f"{name}: must be a multiple of 8, got {value}")
        from huabi.core.control import ControlUnit  # here: core.control imports the preprocessors

        if not isinstance(self.controlnets, tuple) or not all(isinstance(u, ControlUnit) for u in self.controlnets):
            raise HuabiError(f"controlnets: must be a tuple of ControlUnit, got {self.controlnets!r}")

    def _check_hires(self) -> None:
        if not isinstance(self.hires, bool):
            raise HuabiError(f"hires: must be True or False, got {self.hires!r}")
        scale = self.hires_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not MIN_HIRES_SCALE <= scale <= MAX_HIRES_SCALE:
            raise HuabiError(f"hires_scale: must be a number from {MIN_HIRES_SCALE:g} to {MAX_HIRES_SCALE:g}, got {scale!r}")
        if self.hires_resize_px is not None:
            size = self.hires_resize_px
            if not isinstance(size, tuple) or len(size) != 2:
                raise HuabiError(f"hires_resize_px: must be (width_px, height_px), got {size!r}")
            for side_name, side in zip(("width", "height"), size):
                _check_int_range(f"hires_resize_px {side_name}", side, 8, MAX_SIDE_PX)
                if side % 8:
                    raise HuabiError(f"hires_resize_px {side_name}: must be a multiple of 8, got {side}")
        upscaler = self.hires_upscaler
        if not isinstance(upscaler, str) or not (
            upscaler in HIRES_UPSCALER_NAMES or is_upscaler_path(upscaler)
        ):
            raise HuabiError(
                f"hires_upscaler: unknown upscaler {upscaler!r}; valid: {', '.join(HIRES_UPSCALER_NAMES)} "
                "or an upscaler model file (.pth, .safetensors)"
            )
        _check_int_range("hires_steps", self.hires_steps, 0, MAX_STEPS)
        strength = self.hires_denoise
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
            raise HuabiError(f"hires_denoise: must be a number from 0 to 1, got {strength!r}")

    def _check_attention_adapters(self) -> None:
        for name in ("hypernetwork", "ip_adapter", "ip_image", "ip_image_encoder"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise HuabiError(f"{name}: must be a name or path, got {value!r}")
        strength = self.hypernetwork_strength
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not -10 <= strength <= 10:
            raise HuabiError(f"hypernetwork_strength: must be a number from -10 to 10, got {strength!r}")
        weight = self.ip_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 3:
            raise HuabiError(f"ip_weight: must be a number from 0 to 3, got {weight!r}")
        if (self.ip_adapter is None) != (self.ip_image is None):
            raise HuabiError("ip_adapter: an IP-Adapter needs an image (--ip-image) and an image needs --ip-adapter")

    def hires_target_px(self, width_px: int, height_px: int, latent_factor: int = 8) -> tuple[int, int]:
        """The second pass's (width_px, height_px) for a first pass of ``width_px`` x ``height_px``.

        A scale multiplies both sides (A1111 truncates to whole pixels); huabi then rounds
        down to the latent cell, which A1111's latent shape does implicitly.
        """
        if self.hires_resize_px is not None:
            return self.hires_resize_px
        target_w = int(width_px * self.hires_scale) // latent_factor * latent_factor
        target_h = int(height_px * self.hires_scale) // latent_factor * latent_factor
        return max(target_w, latent_factor), max(target_h, latent_factor)

    def replace(self, **changes) -> "GenerationRequest":
        return dataclasses.replace(self, **changes)

    def with_resolved_seed(self, rng: random.Random | None = None) -> "GenerationRequest":
        """Replace seed -1 (and a used variation seed -1) by concrete random seeds, so they can be recorded."""
        changes: dict[str, int] = {}
        rng = rng or random.Random()
        if self.seed == -1:
            changes["seed"] = rng.randrange(MAX_SEED)
        if self.variation_seed == -1 and self.variation_strength != 0:
            changes["variation_seed"] = rng.randrange(MAX_SEED)
        return self.replace(**changes) if changes else self

    def image_seeds(self) -> list[list[int]]:
        """Seeds of every image, per batch: image i of the request uses seed + i (A1111's rule).

        With a variation strength other than 0 every image keeps the one seed and
        the variation seed counts up instead (A1111 does the same).
        """
        if self.seed == -1:
            raise HuabiError("seed: resolve -1 to a concrete seed before running")
        step = 0 if self.variation_strength != 0 else 1
        return [
            [self.seed + step * (batch * self.batch_size + i) for i in range(self.batch_size)]
            for batch in range(self.batch_count)
        ]

    def image_variation_seeds(self) -> list[list[int]] | None:
        """Variation seeds per batch, image i of the request using variation_seed + i; None at strength 0."""
        if self.variation_strength == 0:
            return None
        if self.variation_seed == -1:
            raise HuabiError("variation_seed: resolve -1 to a concrete seed before running")
        return [
            [self.variation_seed + batch * self.batch_size + i for i in range(self.batch_size)]
            for batch in range(self.batch_count)
        ]

    def seed_resize_from_latent(self, latent_factor: int) -> tuple[int, int] | None:
        """(latent_h, latent_w) to draw noise at for seed resize, or None when it is off."""
        if self.seed_resize_from_px is None:
            return None
        width_px, height_px = self.seed_resize_from_px
        return (height_px // latent_factor, width_px // latent_factor)


def is_upscaler_path(text: str) -> bool:
    """Whether a hires upscaler value names a model file rather than one of A1111's built-in modes."""
    lowered = text.lower()
    return lowered.endswith(UPSCALER_FILE_SUFFIXES) or "/" in text or "\\" in text


def _check_int_range(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise HuabiError(f"{name}: must be an integer, got {value!r}")
    if not low <= value <= high:
        raise HuabiError(f"{name}: must be from {low} to {high}, got {value}")


# -- image editing (img2img, inpainting, outpainting) ----------------------------------

# A1111's "Masked content" names, as written in infotext; the CLI's hyphenated spellings map here.
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
INPAINT_AREAS = {"whole": "Whole picture", "masked": "Only masked"}
EDIT_RESIZE_MODES = ("just", "crop", "fill")
OUTPAINT_SIDES = ("left", "right", "up", "down")
MAX_MASK_BLUR_PX = 256


@dataclass(frozen=True)
class EditOptions:
    """What to do to an existing image: the part of a request that txt2img does not have.

    ``mask_image`` None is plain img2img. ``outpaint`` ``(left, right, up, down)``
    pixels extends the canvas and inpaints the new area (no mask file needed).
    """

    init_image: str
    denoising_strength: float = 0.75
    resize_mode: str = "just"  # just | crop | fill (A1111: Just resize, Crop and resize, Resize and fill)
    mask_image: str | None = None
    mask_blur_px: int = 4
    masked_content: str = "original"  # fill | original | latent noise | latent nothing
    inpaint_area: str = "whole"  # whole | masked
    padding_px: int = 32  # "Only masked padding, pixels"
    invert_mask: bool = False
    outpaint: tuple[int, int, int, int] | None = None  # left, right, up, down in pixels
    outpaint_overlap_px: int = 8  # how far the outpaint mask reaches into the original
    # InstructPix2Pix: edit by instruction with three-way guidance (needs an instruct-pix2pix model).
    instruct: bool = False
    image_cfg_scale: float = 1.5  # A1111's "Image CFG scale" (s_I)

    def __post_init__(self) -> None:
        if not isinstance(self.init_image, str) or not self.init_image:
            raise HuabiError("init image: a path is required")
        strength = self.denoising_strength
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise HuabiError(f"denoising strength: must be from 0 to 1, got {strength!r}")
        if self.resize_mode not in EDIT_RESIZE_MODES:
            raise HuabiError(f"resize mode: unknown mode {self.resize_mode!r}; valid: {', '.join(EDIT_RESIZE_MODES)}")
        _check_int_range("mask_blur", self.mask_blur_px, 0, MAX_MASK_BLUR_PX)
        content = str(self.masked_content).replace("-", " ").lower()
        if content not in MASKED_CONTENT:
            raise HuabiError(
                f"masked content: unknown {self.masked_content!r}; valid: fill, original, latent-noise, latent-nothing"
            )
        object.__setattr__(self, "masked_content", content)
        if self.inpaint_area not in INPAINT_AREAS:
            raise HuabiError(f"inpaint area: unknown {self.inpaint_area!r}; valid: whole, masked")
        _check_int_range("padding", self.padding_px, 0, MAX_SIDE_PX)
        _check_int_range("outpaint overlap", self.outpaint_overlap_px, 0, MAX_SIDE_PX)
        if not isinstance(self.invert_mask, bool):
            raise HuabiError(f"invert_mask: must be True or False, got {self.invert_mask!r}")
        if self.outpaint is not None:
            if len(self.outpaint) != 4:
                raise HuabiError("outpaint: give four sides: left, right, up, down")
            for side, value in zip(OUTPAINT_SIDES, self.outpaint):
                _check_int_range(f"outpaint {side}", value, 0, MAX_SIDE_PX)
                if value % 8:
                    raise HuabiError(f"outpaint {side}: must be a multiple of 8, got {value}")
            if not any(self.outpaint):
                raise HuabiError("outpaint: every side is 0; nothing to extend")
            if self.mask_image is not None:
                raise HuabiError("outpaint: cannot be combined with a mask (the new area is the mask)")
        if not isinstance(self.instruct, bool):
            raise HuabiError(f"instruct: must be True or False, got {self.instruct!r}")
        scale = self.image_cfg_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= 100:
            raise HuabiError(f"image cfg scale: must be a number from 0 to 100, got {scale!r}")
        if self.instruct and (self.mask_image is not None or self.outpaint is not None):
            raise HuabiError("instruct: cannot be combined with a mask or outpainting (InstructPix2Pix edits the whole image)")

    @property
    def inpainting(self) -> bool:
        return self.mask_image is not None or self.outpaint is not None


def parse_outpaint(text: str) -> tuple[int, int, int, int]:
    """``left=128,right=0,up=64,down=0`` (any subset, any order) -> (left, right, up, down)."""
    sides = dict.fromkeys(OUTPAINT_SIDES, 0)
    for part in str(text).split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if not sep or name not in sides:
            raise HuabiError(f"outpaint: expected side=pixels with sides {', '.join(OUTPAINT_SIDES)}, got {part.strip()!r}")
        if not value.strip().isdigit():
            raise HuabiError(f"outpaint {name}: must be a whole number of pixels, got {value.strip()!r}")
        sides[name] = int(value)
    return sides["left"], sides["right"], sides["up"], sides["down"]
