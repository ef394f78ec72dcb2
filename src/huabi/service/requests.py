"""Turning user-level input into validated jobs: the one place the CLI, the REST API and the web UI share.

Interfaces parse their own syntax (argparse flags, JSON bodies, form fields) into the plain values
below and call these functions; everything that decides what a request *means* lives here:
Midjourney parameters in the prompt, styles, wildcards and ``{a|b}`` combinations, ``--from``
infotext merging, ``--lora`` flags as tags, ControlNet units filling a recorded request, hires
flags implying the hires fix, outpaint size arithmetic and edit defaults.

- :func:`prompt_jobs` -> one :class:`PromptJob` per prompt (Midjourney parameters parsed, not yet
  applied: they need the model's native size);
- :func:`expand_prompt_job` -> the concrete :class:`~huabi.core.request.GenerationRequest` values of
  one job (MJ applied, seed resolved, wildcards and chaos expanded);
- :func:`edit_job` -> the request and :class:`~huabi.core.request.EditOptions` of an edit.

Field names are the request dataclasses' own (:data:`REQUEST_FIELDS`, :data:`EDIT_FIELDS`), so an
interface never keeps its own list.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huabi.core.request import EditOptions, GenerationRequest
from huabi.errors import HuabiError

# The fields a caller may set directly (the rest are derived: extra, controlnets via units).
REQUEST_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(GenerationRequest) if f.name not in ("extra", "controlnets")
)
EDIT_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(EditOptions) if f.name not in ("init_image", "mask_image")
)
HIRES_SETTINGS = ("hires_scale", "hires_upscaler", "hires_steps", "hires_denoise", "hires_resize_px")
REFINER_HIRES_PASSES = {"first": "first pass", "second": "second pass", "both": "both passes"}
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")


@dataclass(frozen=True)
class PromptJob:
    """One prompt's request plus its Midjourney parameters (applied once the model's native size is known)."""

    request: GenerationRequest
    mj: Any  # huabi.core.midjourney.MJParams
    grid: bool  # Midjourney-style: save a grid of the results


@dataclass(frozen=True)
class ControlInput:
    """ControlNet units as an interface collected them: ``units`` (dicts of ControlUnit fields) start
    new units and replace recorded ones; ``fill`` (``{"image": [...], "mask": [...]}``) fills the units
    of a ``--from`` request in order."""

    units: tuple[Mapping[str, Any], ...] = ()
    fill: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    errors: tuple[str, ...] = ()  # syntax errors the interface found, reported as the first one


# ---------------------------------------------------------------------------- small parsers


def parse_size(text: str, what: str = "size", example: str = "512x768") -> tuple[int, int]:
    """``WIDTHxHEIGHT`` (``x`` or ``×``) -> (width, height)."""
    parts = str(text).lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise HuabiError(f"{what}: expected WIDTHxHEIGHT such as {example}, got {text!r}")
    return int(parts[0]), int(parts[1])


def split_lora_spec(spec: str, what: str = "--lora") -> tuple[str, tuple[float, ...]]:
    """``NAME[:W[:W2]]`` -> (name, weights); numbers are taken from the end so paths keep their text."""
    parts = spec.split(":")
    weights: list[float] = []
    while len(parts) > 1 and len(weights) < 2 and _NUMBER.fullmatch(parts[-1].strip()):
        weights.insert(0, float(parts.pop()))
    name = ":".join(parts).strip()
    if not name:
        raise HuabiError(f"{what}: expected NAME[:WEIGHT], got {spec!r}")
    if len(parts) > 1 and "/" not in name:
        raise HuabiError(f"{what}: {spec!r}: the weight after ':' must be a number")
    return name, tuple(weights)


def lora_tag(spec: str) -> str:
    name, weights = split_lora_spec(spec)
    return "<lora:" + ":".join([name, *(f"{w:g}" for w in weights)]) + ">"


def prompt_with_loras(prompt: str, specs: Sequence[str]) -> str:
    """The prompt with one ``<lora:...>`` tag per spec appended (A1111 appends its default LoRA the same way)."""
    tags = "".join(lora_tag(spec) for spec in specs)
    if not tags:
        return prompt
    return f"{prompt} {tags}" if prompt and not prompt.endswith(" ") else prompt + tags


def user_styles_file() -> Path:
    home = os.environ.get("HUABI_HOME")
    return (Path(home) if home else Path.home() / "huabi") / "styles.csv"


def default_styles_file() -> Path:
    """The user's styles.csv ($HUABI_HOME or ~/huabi) when it exists, else huabi's built-in one
    (Cinematic, Photographic, Anime, ...: A1111's format, in src/huabi/assets/styles.csv)."""
    from huabi.service.model_files import builtin_styles_file

    user = user_styles_file()
    return user if user.exists() else builtin_styles_file()


def read_styles(path: Path) -> dict:
    from huabi.core.styles import parse_styles_csv

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HuabiError(f"styles: {path}: no such file (--style needs a styles.csv; pass --styles-file PATH)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise HuabiError(f"styles: {path}: cannot read it ({getattr(err, 'strerror', None) or err})") from err
    return parse_styles_csv(text, source=str(path))


# User-level names of a ControlNet unit's settings -> (ControlUnit field, converter). The CLI's
# ``--control-NAME`` flags and the server's unit objects both use these names.
CONTROL_UNIT_OPTIONS: dict[str, tuple[str, type]] = {
    "image": ("image", str),
    "module": ("module", str),
    "weight": ("weight", float),
    "start": ("guidance_start", float),
    "end": ("guidance_end", float),
    "mode": ("control_mode", str),
    "resize": ("resize_mode", str),
    "res": ("processor_res", int),
    "threshold_a": ("threshold_a", float),
    "threshold_b": ("threshold_b", float),
    "mask": ("mask", str),
}


def with_sizes(values: Mapping[str, Any], *, size: str | None = None, hires_resize: str | None = None,
               seed_resize_from: str | None = None) -> dict[str, Any]:
    """``values`` plus the request fields of the ``WIDTHxHEIGHT`` texts given (None: not given)."""
    fields = dict(values)
    for text, field, example in ((hires_resize, "hires_resize_px", "1024x1024"),
                                 (seed_resize_from, "seed_resize_from_px", "512x512")):
        if text is not None:
            fields[field] = parse_size(text, field.removesuffix("_px").replace("_", " "), example)
    if size is not None:
        fields["width_px"], fields["height_px"] = parse_size(size)
    return fields


# ---------------------------------------------------------------------------- shared pieces


def request_fields(values: Mapping[str, Any], allowed: Sequence[str] = REQUEST_FIELDS) -> dict[str, Any]:
    """The request fields set in ``values`` (None means "not given"); unknown names are an error."""
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise HuabiError(f"request: unknown field {unknown[0]!r}; valid: {', '.join(allowed)}")
    return {name: value for name, value in values.items() if value is not None}


def generation_overrides(values: Mapping[str, Any]) -> dict[str, Any]:
    """Request fields from user-level values, with the implications A1111 users expect:
    a hires setting on its own turns the hires fix on; ``refiner_hires_pass`` may be first/second/both."""
    fields = request_fields(values)
    if any(fields.get(name) is not None for name in HIRES_SETTINGS):
        fields["hires"] = True
    if "refiner_hires_pass" in fields:
        fields["refiner_hires_pass"] = REFINER_HIRES_PASSES.get(fields["refiner_hires_pass"],
                                                               fields["refiner_hires_pass"])
    return fields


def with_controls(request: GenerationRequest, control: ControlInput | None) -> GenerationRequest:
    """``request`` with the ControlNet units asked for (a --from request keeps its recorded ones, filled in)."""
    if control is None:
        return request
    from huabi.core.control import ControlUnit

    if control.errors:
        raise HuabiError(control.errors[0])
    fill = {name: list(values) for name, values in control.fill.items() if values}
    if control.units:
        if fill:
            raise HuabiError("--control-image: give it after --controlnet MODEL (it sets that unit)")
        units = tuple(ControlUnit(**unit) for unit in control.units)
    else:
        result = list(request.controlnets)
        for name, values in fill.items():
            if len(values) > len(result):
                raise HuabiError(
                    f"--control-{name}: {len(values)} given but there are {len(result)} ControlNet units "
                    "(start a unit with --controlnet MODEL)"
                )
            for index, value in enumerate(values):
                result[index] = dataclasses.replace(result[index], **{name: value})
        units = tuple(result)
    return request if units == request.controlnets else request.replace(controlnets=units)


# ---------------------------------------------------------------------------- text to image


def prompt_jobs(
    prompts: Sequence[str | None],
    values: Mapping[str, Any] | None = None,
    *,
    from_infotext: str | None = None,
    styles: Sequence[str] = (),
    styles_file: Path | None = None,
    loras: Sequence[str] = (),
    mj_grid: bool = False,
    control: ControlInput | None = None,
) -> list[PromptJob]:
    """One job per prompt: ``values`` (request fields; None = not given) over ``from_infotext``'s
    parameters, styles applied, ``--lora`` specs appended as tags, Midjourney parameters parsed off
    the prompt. A prompt of None (with ``from_infotext``) keeps the recorded prompt."""
    from huabi.core.infotext import request_from_infotext
    from huabi.core.midjourney import MJ_BATCH_SIZE, MJParams, parse_midjourney
    from huabi.core.styles import apply_styles

    if not prompts:
        raise HuabiError("prompt: give a prompt, --prompt-file FILE or --from IMAGE")
    if any(prompt is None for prompt in prompts) and from_infotext is None:
        raise HuabiError("prompt: give a prompt, --prompt-file FILE or --from IMAGE")
    overrides = generation_overrides(values or {})
    style_table = None
    if styles:
        styles_file = styles_file or default_styles_file()
        style_table = read_styles(styles_file)
    jobs = []
    for prompt in prompts:
        fields = dict(overrides)
        mj = MJParams()
        if prompt is not None:
            fields["prompt"], mj = parse_midjourney(prompt)
        grid = bool(mj_grid) or mj.used
        if grid and "batch_size" not in fields:
            fields["batch_size"] = MJ_BATCH_SIZE
        if from_infotext is not None:
            request = request_from_infotext(from_infotext, **fields)
        else:
            request = GenerationRequest(**fields)
        request = with_controls(request, control)
        if style_table is not None:
            prompt_text, negative = apply_styles(request.prompt, request.negative_prompt, style_table, list(styles),
                                                 source=str(styles_file))
            request = request.replace(prompt=prompt_text, negative_prompt=negative)
        if loras:  # --lora flags become tags, recorded with the prompt
            request = request.replace(prompt=prompt_with_loras(request.prompt, loras))
        jobs.append(PromptJob(request, mj, grid))
    return jobs


def expand_prompt_job(
    job: PromptJob, native_size_px: int, *, wildcards_dir: Path | None = None, combinatorial: bool = False,
) -> list[GenerationRequest]:
    """The concrete requests of one job: MJ parameters applied, seed resolved, wildcards and chaos expanded."""
    from huabi.core.midjourney import apply_to_request, chaos_requests
    from huabi.service.wildcards import default_wildcards_dir, expand_request

    request = apply_to_request(job.request, job.mj, native_size_px).with_resolved_seed()
    expanded = expand_request(request, wildcards_dir=wildcards_dir or default_wildcards_dir(),
                              combinatorial=bool(combinatorial))
    if job.mj.chaos:
        expanded = [varied for each in expanded for varied in chaos_requests(each, job.mj.chaos)]
    return expanded


# ---------------------------------------------------------------------------- edits


def edit_job(
    init_image: str | Path,
    prompt: str | None,
    values: Mapping[str, Any] | None = None,
    edit_values: Mapping[str, Any] | None = None,
    *,
    mask_image: str | Path | None = None,
    from_infotext: str | None = None,
    control: ControlInput | None = None,
) -> tuple[GenerationRequest, EditOptions]:
    """The request and edit options of an edit, validated before any model loads.

    ``values``: request fields; ``edit_values``: :class:`EditOptions` fields (``outpaint`` may be
    the ``left=N,...`` text, ``resize_mode`` any spelling A1111 uses). With ``from_infotext`` the
    recorded parameters come back and the given ones override them; a recorded outpaint's
    canvas size is turned back into the working size.
    """
    from huabi.core.infotext import EDIT_KEYS, HIRES_KEYS, edit_fields_from_infotext, request_from_infotext
    from huabi.core.request import parse_outpaint
    from huabi.service.images import canonical_resize_mode

    fields = request_fields(values or {})
    if prompt is not None:
        fields["prompt"] = prompt
    given = request_fields(edit_values or {}, EDIT_FIELDS)
    if isinstance(given.get("outpaint"), str):
        given["outpaint"] = parse_outpaint(given["outpaint"])
    if given.get("resize_mode") is not None:
        given["resize_mode"] = canonical_resize_mode(given["resize_mode"])
    edit_fields: dict[str, Any] = {}
    if from_infotext is not None:
        request = request_from_infotext(from_infotext, **fields)
        edit_fields = edit_fields_from_infotext(from_infotext)
        # The edit keys live in EditOptions now; left in extra they would outlive a changed option.
        # A text-to-image PNG's hires fix does not apply to an edit (A1111's img2img has none).
        dropped = set(EDIT_KEYS) | set(HIRES_KEYS)
        request = request.replace(hires=False,
                                  extra=tuple((key, value) for key, value in request.extra if key not in dropped))
        outpaint = edit_fields.get("outpaint")
        if outpaint is not None and "outpaint" not in given and "width_px" not in fields and request.width_px:
            # "Size" records the outpainted canvas; the working size is the image's before extension.
            left, right, up, down = outpaint
            request = request.replace(width_px=request.width_px - left - right,
                                      height_px=request.height_px - up - down)
    elif prompt is None:
        raise HuabiError("prompt: give a prompt, or --from PNG to reuse an edited image's parameters")
    else:
        request = GenerationRequest(**fields)
    edit_fields.update(given)
    if given.get("image_cfg_scale") is not None:
        edit_fields["instruct"] = True  # an image scale on its own means an instruct edit
    if "denoising_strength" not in edit_fields:
        # InstructPix2Pix starts from pure noise (strength 1); plain img2img keeps A1111's 0.75.
        edit_fields["denoising_strength"] = 1.0 if edit_fields.get("instruct") else 0.75
    options = EditOptions(
        init_image=str(init_image),
        mask_image=str(mask_image) if mask_image is not None else None,
        **edit_fields,
    )
    return with_controls(request, control), options


def with_flow_extras(request, args):
    """``request`` with ``--distilled-cfg`` / ``--shift`` recorded as Forge's infotext keys (flags win over --from)."""
    values = {"Distilled CFG Scale": getattr(args, "distilled_cfg", None), "Shift": getattr(args, "shift", None)}
    values = {key: value for key, value in values.items() if value is not None}
    if not values:
        return request
    for key, value in values.items():
        if value <= 0:
            raise HuabiError(f"{key}: must be > 0, got {value:g}")
    kept = tuple((key, value) for key, value in request.extra if key not in values)
    return request.replace(extra=kept + tuple((key, f"{value:g}") for key, value in values.items()))

