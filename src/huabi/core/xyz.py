"""The X/Y/Z plot (A1111's "X/Y/Z plot" script): axis parsing and the job grid. Pure, no I/O.

An axis is written ``"TYPE: VALUES"`` (``"Steps: 10, 20, 30"``, ``"CFG scale: 3-9 (+3)"``).
VALUES follow A1111's syntax:

- a comma-separated list, read as CSV so ``"a, b", c`` is two values; each value is stripped;
- for whole-number axes (Seed, Steps, Clip skip) an item may be a range ``1-5`` (both ends
  included), ``1-10 (+2)`` (step, may be negative: ``10-1 (-3)``) or ``1-10 [4]`` (that many
  values evenly spread from the first to the last, rounded down as A1111 does);
- CFG scale accepts the same ranges with decimals: ``3-9 (+1.5)``, ``1-2 [3]``;
- Prompt S/R: the first value is the search string; each value replaces it in the prompt and
  the negative prompt, so the first cell keeps the prompt unchanged;
- Seed ``-1`` is replaced by its own random seed once, before any image is made, and a base
  seed of -1 is resolved once for every cell, so rows and columns are comparable (A1111 with
  "Keep -1 for seeds" off).

``plan_xyz`` turns a base request and three axes into cells in *run order*: Z outermost, then
Y, then X, except that a Checkpoint axis is moved outermost so every model loads once (A1111
orders by the cost of switching a value the same way). Each cell knows its grid position.
"""

from __future__ import annotations

import csv
import itertools
import math
import random
import re
from dataclasses import dataclass

from huabi.core.names import (
    SAMPLER_NAMES,
    SCHEDULE_NAMES,
    canonical_sampler_name,
    canonical_schedule_name,
)
from huabi.core.request import MAX_SEED, GenerationRequest
from huabi.errors import HuabiError

MAX_XYZ_CELLS = 256  # more images than this is almost always a typo in a range

AXIS_TYPES: tuple[str, ...] = (
    "Nothing",
    "Seed",
    "Steps",
    "CFG scale",
    "Sampler",
    "Schedule type",
    "Prompt S/R",
    "Checkpoint name",
    "Clip skip",
    "Size",
)

# Other spellings people type (lower case) -> the A1111 label.
_AXIS_ALIASES = {
    "cfg": "CFG scale",
    "schedule": "Schedule type",
    "scheduler": "Schedule type",
    "prompt sr": "Prompt S/R",
    "s/r": "Prompt S/R",
    "checkpoint": "Checkpoint name",
    "model": "Checkpoint name",
    "clipskip": "Clip skip",
}

_INT_AXES = frozenset({"Seed", "Steps", "Clip skip"})
_CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")

_INT = r"[+-]?\d+"
_FLOAT = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_INT_STEP_RANGE = re.compile(rf"^({_INT})\s*-\s*({_INT})(?:\s*\(\s*({_INT})\s*\))?$")
_INT_COUNT_RANGE = re.compile(rf"^({_INT})\s*-\s*({_INT})\s*\[\s*(\d+)\s*\]$")
_FLOAT_STEP_RANGE = re.compile(rf"^({_FLOAT})\s*-\s*({_FLOAT})(?:\s*\(\s*({_FLOAT})\s*\))?$")
_FLOAT_COUNT_RANGE = re.compile(rf"^({_FLOAT})\s*-\s*({_FLOAT})\s*\[\s*(\d+)\s*\]$")
_SIZE = re.compile(r"^(\d+)\s*[x×]\s*(\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class Axis:
    """One axis: its A1111 type, the values as typed, and the parsed values."""

    type: str
    values_text: str
    values: tuple
    name: str = "X"  # which axis (X, Y or Z), for messages

    def __len__(self) -> int:
        return len(self.values)

    @property
    def used(self) -> bool:
        return self.type != "Nothing"

    def labels(self) -> list[str]:
        """The text drawn next to each row/column, as A1111 writes it."""
        return [axis_label(self.type, value) for value in self.values]


def nothing_axis(name: str) -> Axis:
    return Axis("Nothing", "", ("",), name)


def canonical_axis_type(text: str, *, name: str = "X") -> str:
    key = " ".join(text.strip().lower().split())
    for axis_type in AXIS_TYPES:
        if key == axis_type.lower():
            return axis_type
    if key in _AXIS_ALIASES:
        return _AXIS_ALIASES[key]
    raise HuabiError(f"xyz: unknown {name} axis type {text.strip()!r}; valid: {', '.join(AXIS_TYPES)}")


def parse_axis_spec(spec: str | None, *, name: str = "X") -> Axis:
    """``"Steps: 10, 20"`` -> Axis. None, "" and "Nothing" give the empty axis."""
    if spec is None or not spec.strip():
        return nothing_axis(name)
    type_text, colon, values_text = spec.partition(":")
    if not colon:
        if " ".join(type_text.lower().split()) == "nothing":
            return nothing_axis(name)
        raise HuabiError(
            f"xyz: --{name.lower()} expects 'TYPE: VALUES' such as 'Steps: 10, 20', got {spec.strip()!r}"
        )
    return parse_axis(type_text, values_text, name=name)


def parse_axis(axis_type: str, values_text: str, *, name: str = "X") -> Axis:
    """Parse VALUES for an axis of type ``axis_type`` (see the module notes for the syntax)."""
    axis_type = canonical_axis_type(axis_type, name=name)
    if axis_type == "Nothing":
        return nothing_axis(name)
    where = f"xyz: {name} axis {axis_type}"
    items = split_values(values_text)
    if not items:
        raise HuabiError(f"{where}: no values given")
    values: list
    if axis_type in _INT_AXES:
        values = [v for item in items for v in _int_item(item, where)]
    elif axis_type == "CFG scale":
        values = [v for item in items for v in _float_item(item, where)]
    elif axis_type == "Sampler":
        values = [_sampler(item, where) for item in items]
    elif axis_type == "Schedule type":
        values = [_schedule(item, where) for item in items]
    elif axis_type == "Size":
        values = [_size(item, where) for item in items]
    else:  # Prompt S/R, Checkpoint name: text as given
        values = items
    if len(values) > MAX_XYZ_CELLS:
        raise HuabiError(f"{where}: {len(values)} values; at most {MAX_XYZ_CELLS} images per plot")
    return Axis(axis_type, values_text.strip(), tuple(values), name)


def split_values(text: str) -> list[str]:
    """Comma-separated values, CSV-style (quotes may hold commas), stripped, empties dropped."""
    try:
        rows = list(csv.reader([text], skipinitialspace=True))
    except csv.Error as err:
        raise HuabiError(f"xyz: cannot read values {text!r} ({err})") from None
    return [value.strip() for row in rows for value in row if value.strip()]


def _int_item(item: str, where: str) -> list[int]:
    match = _INT_COUNT_RANGE.match(item)
    if match:
        start, end, count = (int(g) for g in match.groups())
        return [int(v) for v in _spread(start, end, count, where)]
    match = _INT_STEP_RANGE.match(item)
    if match:
        start, end = int(match.group(1)), int(match.group(2))
        step = int(match.group(3)) if match.group(3) else 1
        if step == 0:
            raise HuabiError(f"{where}: range {item!r} has step 0")
        length = (end - start) // step + 1
        _check_range_length(item, length, where)
        return [start + i * step for i in range(length)]
    try:
        return [int(item)]
    except ValueError:
        raise HuabiError(f"{where}: {item!r} is not a whole number or a range such as 1-5") from None


def _float_item(item: str, where: str) -> list[float]:
    match = _FLOAT_COUNT_RANGE.match(item)
    if match:
        return _spread(float(match.group(1)), float(match.group(2)), int(match.group(3)), where)
    match = _FLOAT_STEP_RANGE.match(item)
    if match:
        start, end = float(match.group(1)), float(match.group(2))
        step = float(match.group(3)) if match.group(3) else 1.0
        if step == 0:
            raise HuabiError(f"{where}: range {item!r} has step 0")
        # A small tolerance so 3-9 (+1.5) ends at 9 despite binary fractions.
        length = math.floor((end - start) / step + 1e-9) + 1
        _check_range_length(item, length, where)
        return [round(start + i * step, 10) for i in range(length)]
    try:
        return [float(item)]
    except ValueError:
        raise HuabiError(f"{where}: {item!r} is not a number or a range such as 3-9 (+3)") from None


def _spread(start: float, end: float, count: int, where: str) -> list[float]:
    """``count`` values from ``start`` to ``end`` inclusive, evenly spaced (numpy's linspace)."""
    _check_range_length(f"{start}-{end} [{count}]", count, where)
    if count == 1:
        return [start]
    return [round(start + (end - start) * i / (count - 1), 10) for i in range(count)]


def _check_range_length(item: str, length: int, where: str) -> None:
    if length < 1:
        raise HuabiError(f"{where}: range {item!r} gives no values")
    if length > MAX_XYZ_CELLS:
        raise HuabiError(f"{where}: range {item!r} gives {length} values; at most {MAX_XYZ_CELLS} images per plot")


def _sampler(item: str, where: str) -> str:
    name = canonical_sampler_name(item)
    if name is None:
        raise HuabiError(f"{where}: unknown sampler {item!r}; valid: {', '.join(SAMPLER_NAMES)}")
    return name


def _schedule(item: str, where: str) -> str:
    name = canonical_schedule_name(item)
    if name is None:
        raise HuabiError(f"{where}: unknown schedule type {item!r}; valid: {', '.join(SCHEDULE_NAMES)}")
    return name


def _size(item: str, where: str) -> tuple[int, int]:
    match = _SIZE.match(item)
    if match is None:
        raise HuabiError(f"{where}: expected WIDTHxHEIGHT such as 512x768, got {item!r}")
    return int(match.group(1)), int(match.group(2))


def axis_label(axis_type: str, value: object) -> str:
    """A1111's labels: "Steps: 20" for numbers, the bare name for samplers and S/R text."""
    if axis_type == "Nothing":
        return ""
    if axis_type in ("Sampler", "Schedule type", "Prompt S/R"):
        return str(value)
    if axis_type == "Checkpoint name":
        # The file name without folder or weight-file suffix, as A1111 shows checkpoints.
        base = str(value).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        for suffix in _CHECKPOINT_SUFFIXES:
            if base.lower().endswith(suffix):
                return base[: -len(suffix)]
        return base
    if axis_type == "Size":
        width_px, height_px = value  # type: ignore[misc]
        return f"Size: {width_px}x{height_px}"
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # CFG 7.0 is written "7", as in infotext
    return f"{axis_type}: {value}"


def resolve_seed_axis(axis: Axis, rng: random.Random) -> Axis:
    """Replace each -1 on a Seed axis by its own random seed (done once, before any image)."""
    if axis.type != "Seed" or -1 not in axis.values:
        return axis
    values = tuple(rng.randrange(MAX_SEED) if seed == -1 else seed for seed in axis.values)
    return Axis(axis.type, axis.values_text, values, axis.name)


def apply_axis_value(request: GenerationRequest, axis: Axis, index: int) -> GenerationRequest:
    """The request with value ``index`` of ``axis`` applied (validated by GenerationRequest)."""
    value = axis.values[index]
    where = f"xyz: {axis.name} axis {axis.type}"
    try:
        if axis.type == "Nothing":
            return request
        if axis.type == "Seed":
            return request.replace(seed=value)
        if axis.type == "Steps":
            return request.replace(steps=value)
        if axis.type == "CFG scale":
            return request.replace(cfg_scale=value)
        if axis.type == "Sampler":
            return request.replace(sampler=value)
        if axis.type == "Schedule type":
            return request.replace(schedule=value)
        if axis.type == "Clip skip":
            return request.replace(clip_skip=value)
        if axis.type == "Size":
            return request.replace(width_px=value[0], height_px=value[1])
        if axis.type == "Checkpoint name":
            return request.replace(model=value)
        if axis.type == "Prompt S/R":
            search = axis.values[0]
            return request.replace(
                prompt=request.prompt.replace(search, value),
                negative_prompt=request.negative_prompt.replace(search, value),
            )
    except HuabiError as err:
        raise HuabiError(f"{where}: {err}") from None
    raise HuabiError(f"xyz: axis type {axis.type!r} has no rule")  # unreachable: types are closed


@dataclass(frozen=True)
class XYZCell:
    """One image of the plot: where it goes in the grid and what to generate."""

    x_index: int
    y_index: int
    z_index: int
    request: GenerationRequest


@dataclass(frozen=True)
class XYZPlan:
    base: GenerationRequest  # with its seed resolved
    x: Axis
    y: Axis
    z: Axis
    cells: tuple[XYZCell, ...]  # in run order

    def cell_at(self, x_index: int, y_index: int, z_index: int) -> XYZCell:
        for cell in self.cells:
            if (cell.x_index, cell.y_index, cell.z_index) == (x_index, y_index, z_index):
                return cell
        raise IndexError((x_index, y_index, z_index))

    def infotext_params(self) -> list[tuple[str, str]]:
        """What the grid's infotext records about the plot, in A1111's key names."""
        params = [("Script", "X/Y/Z plot")]
        for axis in (self.x, self.y, self.z):
            if not axis.used:
                continue
            params.append((f"{axis.name} Type", axis.type))
            params.append((f"{axis.name} Values", axis.values_text))
            if axis.type == "Seed":
                params.append((f"Fixed {axis.name} Values", ", ".join(str(v) for v in axis.values)))
        return params


def plan_xyz(
    base: GenerationRequest,
    x: Axis,
    y: Axis | None = None,
    z: Axis | None = None,
    *,
    rng: random.Random | None = None,
    max_cells: int = MAX_XYZ_CELLS,
) -> XYZPlan:
    """Every cell's request, validated, in run order (see the module notes)."""
    rng = rng or random.Random()
    axes = [
        Axis(axis.type, axis.values_text, axis.values, name)
        for axis, name in ((x, "X"), (y or nothing_axis("Y"), "Y"), (z or nothing_axis("Z"), "Z"))
    ]
    seen: dict[str, str] = {}
    for axis in axes:
        if axis.used and axis.type != "Prompt S/R":
            if axis.type in seen:
                raise HuabiError(f"xyz: the {seen[axis.type]} and {axis.name} axes both vary {axis.type}")
            seen[axis.type] = axis.name
    count = len(axes[0]) * len(axes[1]) * len(axes[2]) * base.batch_size * base.batch_count
    if count > max_cells:
        raise HuabiError(
            f"xyz: the plot has {count} images ({' x '.join(str(len(a)) for a in axes)}); "
            f"at most {max_cells} per plot"
        )
    base = base.with_resolved_seed(rng)
    x, y, z = (resolve_seed_axis(axis, rng) for axis in axes)
    for axis in (x, y, z):
        if axis.type == "Prompt S/R":
            search = axis.values[0]
            if search not in base.prompt and search not in base.negative_prompt:
                raise HuabiError(
                    f"xyz: {axis.name} axis Prompt S/R: {search!r} is not in the prompt or negative prompt"
                )

    # Z outermost, X innermost; a Checkpoint axis goes outermost so each model loads once.
    order = [z, y, x]
    order.sort(key=lambda axis: 0 if axis.type == "Checkpoint name" else 1)  # stable
    cells = []
    for indices in itertools.product(*(range(len(axis)) for axis in order)):
        position = {axis.name: index for axis, index in zip(order, indices)}
        request = base
        for axis in (x, y, z):  # X's value first, then Y, then Z, as A1111 applies them
            request = apply_axis_value(request, axis, position[axis.name])
        cells.append(XYZCell(position["X"], position["Y"], position["Z"], request))
    return XYZPlan(base=base, x=x, y=y, z=z, cells=tuple(cells))
