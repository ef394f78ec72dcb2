"""ControlNet units as the user asks for them, and their maths that needs no model.

A :class:`ControlUnit` is one sd-webui-controlnet unit: model, control image,
preprocessor ("module"), weight, guidance start/end (fractions of the sampling
steps), control mode and resize mode.  Units are validated at construction.

Control modes, as sd-webui-controlnet applies them:

* ``Balanced``: every residual times ``weight``, on the positive and negative rows.
* ``My prompt is more important``: "soft injection": residual i of n (encoder
  outputs, then the mid block) times ``weight * 0.825 ** (12 - i)`` with the
  13 residuals of SD1's layout; SDXL keeps the first ten of those 13 scales
  (sd-webui-controlnet's ``control_scales[:10]``).  Other layouts count the
  exponent back from the mid block (``0.825 ** (n - 1 - i)``), which is the same rule for n = 13.
* ``ControlNet is more important``: the soft scales, and the residuals only on
  the positive-prompt rows of the CFG batch (the negative sees no control), so
  CFG pushes the image *towards* the control.

Guidance start/end: a unit is active at step s of S (s = denoiser calls made
from 0, S = steps this pass runs) when ``start <= s / S <= end``, as
sd-webui-controlnet's ``current_sampling_percent``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from huabi.errors import HuabiError

SOFT_INJECTION_BASE = 0.825  # sd-webui-controlnet / ControlNet's "guess mode" per-block decay
SD1_RESIDUALS = 13  # 12 encoder outputs + mid block in SD1's layout
SDXL_RESIDUALS = 10  # 9 encoder outputs + mid block
DEFAULT_PROCESSOR_RES = 512
MAX_CONTROL_WEIGHT = 2.0  # sd-webui-controlnet's slider range is 0..2


class ControlMode(str, enum.Enum):
    BALANCED = "Balanced"
    PROMPT = "My prompt is more important"
    CONTROL = "ControlNet is more important"


class ResizeMode(str, enum.Enum):
    JUST_RESIZE = "Just Resize"
    CROP_AND_RESIZE = "Crop and Resize"
    RESIZE_AND_FILL = "Resize and Fill"


_MODE_ALIASES = {
    "balanced": ControlMode.BALANCED, "0": ControlMode.BALANCED,
    "prompt": ControlMode.PROMPT, "my prompt is more important": ControlMode.PROMPT, "1": ControlMode.PROMPT,
    "control": ControlMode.CONTROL, "controlnet": ControlMode.CONTROL,
    "controlnet is more important": ControlMode.CONTROL, "2": ControlMode.CONTROL,
}
_RESIZE_ALIASES = {
    "just resize": ResizeMode.JUST_RESIZE, "just": ResizeMode.JUST_RESIZE, "resize": ResizeMode.JUST_RESIZE,
    "0": ResizeMode.JUST_RESIZE,
    "crop and resize": ResizeMode.CROP_AND_RESIZE, "crop": ResizeMode.CROP_AND_RESIZE, "1": ResizeMode.CROP_AND_RESIZE,
    "resize and fill": ResizeMode.RESIZE_AND_FILL, "fill": ResizeMode.RESIZE_AND_FILL, "2": ResizeMode.RESIZE_AND_FILL,
}


def parse_control_mode(value: "str | ControlMode") -> ControlMode:
    if isinstance(value, ControlMode):
        return value
    mode = _MODE_ALIASES.get(str(value).strip().lower())
    if mode is None:
        raise HuabiError(
            f"control mode: unknown {value!r}; valid: balanced, prompt, control (or the full names: "
            + ", ".join(m.value for m in ControlMode) + ")"
        )
    return mode


def parse_resize_mode(value: "str | ResizeMode") -> ResizeMode:
    if isinstance(value, ResizeMode):
        return value
    mode = _RESIZE_ALIASES.get(str(value).strip().lower())
    if mode is None:
        raise HuabiError(
            f"control resize mode: unknown {value!r}; valid: just, crop, fill (or the full names: "
            + ", ".join(m.value for m in ResizeMode) + ")"
        )
    return mode


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet unit.  ``image`` is a path (None: given again at run time, e.g. after ``--from``)."""

    model: str
    image: str | None = None
    module: str = "none"
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: ControlMode = ControlMode.BALANCED
    resize_mode: ResizeMode = ResizeMode.CROP_AND_RESIZE  # sd-webui-controlnet's default
    processor_res: int = DEFAULT_PROCESSOR_RES
    threshold_a: float | None = None  # module-specific; None: the module's default
    threshold_b: float | None = None
    mask: str | None = None  # inpaint module: mask image path (white = repaint)

    def __post_init__(self) -> None:
        from huabi.core.preprocess import module_spec  # the module names live with the preprocessors

        if not isinstance(self.model, str) or not self.model.strip():
            raise HuabiError("controlnet model: must be a ControlNet name or path")
        if self.image is not None and (not isinstance(self.image, str) or not self.image):
            raise HuabiError(f"control image: must be an image path, got {self.image!r}")
        spec = module_spec(self.module)
        object.__setattr__(self, "module", spec.name)
        for name in ("weight", "guidance_start", "guidance_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise HuabiError(f"control {name.replace('_', ' ')}: must be a number, got {value!r}")
        if not 0.0 <= self.weight <= MAX_CONTROL_WEIGHT:
            raise HuabiError(f"control weight: must be from 0 to {MAX_CONTROL_WEIGHT:g}, got {self.weight}")
        if not 0.0 <= self.guidance_start <= 1.0 or not 0.0 <= self.guidance_end <= 1.0:
            raise HuabiError(
                f"control start/end: must be fractions from 0 to 1, got {self.guidance_start} and {self.guidance_end}"
            )
        if self.guidance_start > self.guidance_end:
            raise HuabiError(f"control start: {self.guidance_start} is after control end {self.guidance_end}")
        object.__setattr__(self, "control_mode", parse_control_mode(self.control_mode))
        object.__setattr__(self, "resize_mode", parse_resize_mode(self.resize_mode))
        if isinstance(self.processor_res, bool) or not isinstance(self.processor_res, int) or not 64 <= self.processor_res <= 4096:
            raise HuabiError(f"control processor res: must be an integer from 64 to 4096, got {self.processor_res!r}")
        thresholds = spec.check_thresholds(self.threshold_a, self.threshold_b)
        object.__setattr__(self, "threshold_a", thresholds[0])
        object.__setattr__(self, "threshold_b", thresholds[1])


def residual_scales(
    count: int, weight: float, mode: ControlMode, *, sdxl: bool, force_soft: bool = False
) -> list[float]:
    """Per-residual multipliers (encoder outputs first, mid block last) for one unit."""
    if mode is ControlMode.BALANCED and not force_soft:
        return [weight] * count
    if sdxl and count <= SD1_RESIDUALS:
        return [weight * SOFT_INJECTION_BASE ** float(SD1_RESIDUALS - 1 - i) for i in range(count)]
    return [weight * SOFT_INJECTION_BASE ** float(count - 1 - i) for i in range(count)]


ADAPTER_SOFT_SCALES = (0.25, 0.62, 0.825, 1.0)  # sd-webui-controlnet's T2I-Adapter soft injection


def adapter_scales(count: int, weight: float, mode: ControlMode) -> list[float]:
    """Per-feature multipliers of a T2I-Adapter (one feature per UNet level, shallow first).

    Balanced: ``weight`` each; the other modes: sd-webui-controlnet's soft scales
    (0.25, 0.62, 0.825, 1.0), the deepest ``count`` of them for adapters with fewer levels.
    """
    if mode is ControlMode.BALANCED:
        return [weight] * count
    soft = list(ADAPTER_SOFT_SCALES[-count:]) if count <= len(ADAPTER_SOFT_SCALES) else [1.0] * count
    return [weight * s for s in soft]


def unit_active(step: int, total_steps: int, start: float, end: float) -> bool:
    """sd-webui-controlnet's schedule: active unless step/total is before start or after end."""
    percent = step / total_steps if total_steps > 0 else 0.0
    return not (percent < start or percent > end)


# ---------------------------------------------------------------------- infotext

def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def format_unit_infotext(unit: ControlUnit, model_label: str) -> str:
    """The value of ``ControlNet N`` as sd-webui-controlnet writes it (``Key: value, ...``)."""
    fields = [
        ("Module", unit.module),
        ("Model", model_label),
        ("Weight", _number(unit.weight)),
        ("Resize Mode", unit.resize_mode.value),
        ("Processor Res", str(unit.processor_res)),
    ]
    if unit.threshold_a is not None:
        fields.append(("Threshold A", _number(unit.threshold_a)))
    if unit.threshold_b is not None:
        fields.append(("Threshold B", _number(unit.threshold_b)))
    fields += [
        ("Guidance Start", _number(unit.guidance_start)),
        ("Guidance End", _number(unit.guidance_end)),
        ("Pixel Perfect", "False"),
        ("Control Mode", unit.control_mode.value),
    ]
    for key, value in fields:
        if "," in value or ":" in value:
            raise HuabiError(f"controlnet {key.lower()}: {value!r} cannot be written to infotext (contains ',' or ':')")
    return ", ".join(f"{key}: {value}" for key, value in fields)


def parse_unit_infotext(text: str) -> ControlUnit:
    """A unit from a ``ControlNet N`` value; the model keeps its name (``name [hash]`` -> ``name``)."""
    values: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.strip().partition(": ")
        if not sep:
            raise HuabiError(f"ControlNet infotext: cannot read {item.strip()!r} (expected 'Key: value')")
        values[key.strip()] = value.strip()
    model = values.get("Model")
    if not model:
        raise HuabiError("ControlNet infotext: no Model")
    name = model.rsplit(" [", 1)[0] if model.endswith("]") else model

    def number(key: str, default: float | None) -> float | None:
        raw = values.get(key)
        if raw is None:
            return default
        try:
            parsed = float(raw)
        except ValueError:
            raise HuabiError(f"ControlNet infotext: {key} is not a number: {raw!r}") from None
        return None if parsed == -1 else parsed

    processor_res = number("Processor Res", DEFAULT_PROCESSOR_RES)
    return ControlUnit(
        model=name,
        image=None,
        module=values.get("Module", "none"),
        weight=number("Weight", 1.0),
        guidance_start=number("Guidance Start", 0.0),
        guidance_end=number("Guidance End", 1.0),
        control_mode=values.get("Control Mode", ControlMode.BALANCED.value),
        resize_mode=values.get("Resize Mode", ResizeMode.CROP_AND_RESIZE.value),
        processor_res=int(processor_res) if processor_res is not None else DEFAULT_PROCESSOR_RES,
        threshold_a=number("Threshold A", None),
        threshold_b=number("Threshold B", None),
    )
