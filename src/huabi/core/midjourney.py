"""Midjourney-style parameters at the end of a prompt: ``a castle --ar 3:2 --no fog --chaos 30``.

Pure text and arithmetic (no I/O). ``parse_midjourney`` splits a prompt into
the prompt text and an ``MJParams``; ``apply_to_request`` turns those into
fields of a ``GenerationRequest``; ``chaos_requests`` spreads one request into
per-image requests when ``--chaos`` is used.

What each parameter does in huabi (Midjourney's own models are not available,
so each is mapped to the Stable Diffusion control that has the same effect):

- ``--ar W:H`` / ``--aspect W:H``: a size with about the model's native pixel
  count (native_size_px squared) and that aspect ratio. Each side is
  ``sqrt(native² · W/H)`` (resp. ``· H/W``) rounded to the nearest multiple of the
  grid, at least one grid step. The grid is 64 px, or native/8 for models under 512 px
  (SD1's 64 at 512, scaled: huabi-mini's 128 -> 16). Native 512, ``--ar 3:2`` -> 640x448;
  ``--ar 16:9`` -> 704x384; native 1024, ``--ar 16:9`` -> 1344x768 (SDXL's own bucket);
  native 128, ``--ar 3:2`` -> 160x112.
- ``--no a, b``: appended to the negative prompt with ", ".
- ``--seed N``: the seed, 0 to 4294967295 (Midjourney's range).
- ``--chaos N`` / ``--c N``, 0 to 100: more varied images within a batch. With
  t = N/100, every image of the batch gets its own CFG scale and prompt,
  drawn from a ``random.Random`` seeded with that image's seed (so any one
  image is reproducible alone): the CFG scale is pulled toward 1 (no
  guidance) by a uniform fraction of up to 0.8·t, and with probability t the
  comma-separated parts of the prompt are shuffled (CLIP weighs early tokens
  more, so the emphasis moves). Weaker guidance and shifted emphasis let the
  images stray further from the prompt, as Midjourney's chaos does. Each
  image's infotext records its own CFG scale and prompt plus ``Chaos: N``.
- ``--tile``: a seamless, tileable image (circular padding; ``Tiling: True``).
- ``--q`` / ``--quality`` .25, .5, 1 or 2: multiplies the step count (rounded,
  at least 1).
- ``--s N`` / ``--stylize N``, 0 to 1000 (Midjourney's default 100): lower CFG
  scale for more stylisation, as a higher stylize makes Midjourney follow the
  prompt less literally and its own aesthetic more. The CFG scale is
  multiplied by a factor that falls linearly from 1.5 at 0 to 1.0 at 100 and
  to 0.5 at 1000 (never below 1.0). Without ``--s`` the CFG scale is untouched.
- ``--iw N`` (0 to 3): image-prompt weight: the IP-Adapter weight of the
  request's image prompt (``--ip-adapter`` with ``--ip-image``); an error
  without one.
- ``--v N`` / ``--version N``, ``--niji [N]``, ``--style NAME`` (e.g. raw):
  choose one of Midjourney's own models or looks. Accepted and ignored (huabi
  uses the model you load); ``MJParams.ignored`` lists them so interfaces can
  say so.

Parameters start at the first `` --name`` (or `` —name``, the long dash that
some keyboards make of "--") preceded by whitespace or the start of the
prompt; everything from there on must be known parameters: an unknown one is
an error listing the known ones, never silently part of the prompt. A
parameter given twice: the last one wins, except ``--no``, which collects.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

from huabi.core.request import MAX_SEED, MAX_SIDE_PX, GenerationRequest
from huabi.errors import HuabiError

MJ_BATCH_SIZE = 4  # Midjourney returns four images per prompt, shown as a 2x2 grid
MJ_MAX_SEED = MAX_SEED  # the one seed rule of GenerationRequest
SIZE_STEP_PX = 64
QUALITY_VALUES = (0.25, 0.5, 1.0, 2.0)
CHAOS_MAX_CFG_PULL = 0.8  # at --chaos 100 an image's CFG scale may fall up to 80% of the way to 1

# Canonical name -> spellings accepted after "--".
_ALIASES: dict[str, tuple[str, ...]] = {
    "ar": ("ar", "aspect"),
    "no": ("no",),
    "seed": ("seed",),
    "chaos": ("chaos", "c"),
    "tile": ("tile",),
    "quality": ("q", "quality"),
    "stylize": ("s", "stylize"),
    "iw": ("iw",),
    "version": ("v", "version"),
    "niji": ("niji",),
    "style": ("style",),
}
_SPELLING = {spelling: name for name, spellings in _ALIASES.items() for spelling in spellings}
_FIELD = {"ar": "aspect", "iw": "image_weight"}  # canonical name -> MJParams field, where they differ
KNOWN_PARAMETERS = tuple(f"--{s}" for spellings in _ALIASES.values() for s in spellings)

# A parameter starts with "--" (or an em/en dash) right after whitespace or the start.
_PARAM_START = re.compile(r"(?:(?<=\s)|^)(?:--|—|–)(?=[A-Za-z])")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


@dataclass(frozen=True)
class MJParams:
    """The parameters found in a prompt; None (or empty) means "not given"."""

    aspect: tuple[int, int] | None = None
    no: tuple[str, ...] = ()
    seed: int | None = None
    chaos: int | None = None
    tile: bool = False
    quality: float | None = None
    stylize: int | None = None
    image_weight: float | None = None
    version: str | None = None
    niji: str | None = None  # "" for a bare --niji
    style: str | None = None
    given: tuple[str, ...] = field(default=())  # the parameters as typed, in order

    @property
    def used(self) -> bool:
        return bool(self.given)

    @property
    def ignored(self) -> tuple[str, ...]:
        """Parameters accepted but without effect in huabi, as typed."""
        return tuple(text for text in self.given if _SPELLING[text.split()[0][2:].lower()] in ("version", "niji", "style"))


def parse_midjourney(prompt: str) -> tuple[str, MJParams]:
    """Split ``prompt`` into the prompt text and its trailing Midjourney parameters."""
    if not isinstance(prompt, str):
        raise HuabiError("prompt: must be text")
    starts = [m.start() for m in _PARAM_START.finditer(prompt)]
    if not starts:
        return prompt, MJParams()
    clean = prompt[: starts[0]].strip()
    values: dict[str, object] = {}
    no: list[str] = []
    given: list[str] = []
    for begin, end in zip(starts, starts[1:] + [len(prompt)]):
        chunk = prompt[begin:end].strip()
        dashes = 2 if chunk.startswith("--") else 1
        name_match = re.match(r"[A-Za-z]+", chunk[dashes:])
        spelled = name_match.group()
        value = chunk[dashes + len(spelled):].strip()
        canonical = _SPELLING.get(spelled.lower())
        if canonical is None:
            raise HuabiError(
                f"prompt: unknown parameter --{spelled}; known: {', '.join(KNOWN_PARAMETERS)}"
            )
        given.append(f"--{spelled.lower()}" + (f" {value}" if value else ""))
        if canonical == "no":
            no.extend(part.strip() for part in value.split(",") if part.strip())
            if not value.strip(" ,"):
                raise HuabiError("prompt: --no needs the things to leave out, e.g. --no cars, fog")
            continue
        values[_FIELD.get(canonical, canonical)] = _parse_value(canonical, spelled, value)
    return clean, MJParams(no=tuple(no), given=tuple(given), **values)


def _parse_value(name: str, spelled: str, value: str) -> object:
    flag = f"--{spelled}"
    if name == "tile":
        if value:
            raise HuabiError(f"prompt: {flag} takes no value, got {value!r}")
        return True
    if name == "ar":
        match = re.fullmatch(r"(\d+)\s*:\s*(\d+)", value)
        if match is None or int(match.group(1)) == 0 or int(match.group(2)) == 0:
            raise HuabiError(f"prompt: {flag} expects WIDTH:HEIGHT with positive whole numbers, e.g. 3:2, got {value!r}")
        ratio_w, ratio_h = int(match.group(1)), int(match.group(2))
        if max(ratio_w, ratio_h) / min(ratio_w, ratio_h) > 8:
            raise HuabiError(f"prompt: {flag} {value}: aspect ratios from 1:8 to 8:1 are supported")
        return (ratio_w, ratio_h)
    if name == "niji":
        if value and not _NUMBER.fullmatch(value):
            raise HuabiError(f"prompt: {flag} expects a version number or nothing, got {value!r}")
        return value
    if name == "style":
        if not re.fullmatch(r"[A-Za-z][\w-]*", value):
            raise HuabiError(f"prompt: {flag} expects one word such as raw, got {value!r}")
        return value.lower()
    if name == "version":
        if not _NUMBER.fullmatch(value):
            raise HuabiError(f"prompt: {flag} expects a version number such as 6, got {value!r}")
        return value
    if not _NUMBER.fullmatch(value):
        raise HuabiError(f"prompt: {flag} expects a number, got {value!r}")
    number = float(value)
    if name == "seed":
        if not number.is_integer() or not 0 <= number <= MJ_MAX_SEED:
            raise HuabiError(f"prompt: {flag} must be a whole number from 0 to {MJ_MAX_SEED}, got {value}")
        return int(number)
    if name == "chaos":
        if not number.is_integer() or not 0 <= number <= 100:
            raise HuabiError(f"prompt: {flag} must be a whole number from 0 to 100, got {value}")
        return int(number)
    if name == "quality":
        if number not in QUALITY_VALUES:
            raise HuabiError(f"prompt: {flag} must be one of .25, .5, 1, 2, got {value}")
        return number
    if name == "stylize":
        if not number.is_integer() or not 0 <= number <= 1000:
            raise HuabiError(f"prompt: {flag} must be a whole number from 0 to 1000, got {value}")
        return int(number)
    if name == "iw":
        if not 0 <= number <= 3:
            raise HuabiError(f"prompt: {flag} must be a number from 0 to 3, got {value}")
        return number
    raise AssertionError(name)  # every canonical name is handled above


def aspect_size_px(aspect: tuple[int, int], native_size_px: int) -> tuple[int, int]:
    """(width_px, height_px) with about native_size_px² pixels and the given W:H ratio."""
    # A fixed 64 px grid would snap every ratio back to 128x128 on a 128 px model.
    grid_px = max(8, min(SIZE_STEP_PX, native_size_px // 8))
    ratio_w, ratio_h = aspect
    area = native_size_px * native_size_px
    width_px = math.sqrt(area * ratio_w / ratio_h)
    height_px = math.sqrt(area * ratio_h / ratio_w)

    def snap(side: float) -> int:
        return min(MAX_SIDE_PX, max(grid_px, grid_px * round(side / grid_px)))

    return snap(width_px), snap(height_px)


def stylize_cfg_scale(cfg_scale: float, stylize: int) -> float:
    """The CFG scale for ``--stylize``: x1.5 at 0, x1 at 100 (the default), x0.5 at 1000; at least 1."""
    if stylize <= 100:
        factor = 1.5 - 0.5 * stylize / 100
    else:
        factor = 1.0 - 0.5 * (stylize - 100) / 900
    return round(max(1.0, cfg_scale * factor), 2)


def apply_to_request(
    request: GenerationRequest,
    params: MJParams,
    native_size_px: int,
    *,
    has_image_prompt: bool = False,
) -> GenerationRequest:
    """``request`` with the parameters applied (the prompt text itself is left as it is).

    ``--chaos`` is recorded but not applied here: it needs concrete seeds, see
    ``chaos_requests``.
    """
    has_image_prompt = has_image_prompt or request.ip_image is not None
    if params.image_weight is not None and not has_image_prompt:
        raise HuabiError("prompt: --iw needs an image prompt (--ip-adapter with --ip-image; image weight has nothing to weigh)")
    changes: dict[str, object] = {}
    if params.image_weight is not None:
        changes["ip_weight"] = params.image_weight  # the image prompt's weight is the IP-Adapter weight
    if params.aspect is not None:
        changes["width_px"], changes["height_px"] = aspect_size_px(params.aspect, native_size_px)
    if params.no:
        joined = ", ".join(params.no)
        changes["negative_prompt"] = f"{request.negative_prompt}, {joined}" if request.negative_prompt else joined
    if params.seed is not None:
        changes["seed"] = params.seed
    if params.tile:
        changes["tile"] = True
    if params.quality is not None:
        changes["steps"] = max(1, round(request.steps * params.quality))
    if params.stylize is not None:
        changes["cfg_scale"] = stylize_cfg_scale(request.cfg_scale, params.stylize)
    return request.replace(**changes) if changes else request


def chaos_requests(request: GenerationRequest, chaos: int) -> list[GenerationRequest]:
    """One single-image request per image of ``request``, each varied by ``--chaos`` (see the module notes).

    ``request.seed`` must be concrete. Image i keeps the seed it would have had
    (seed + i), so chaos 0 gives the same pixels as the plain batch.
    """
    if not isinstance(chaos, int) or not 0 <= chaos <= 100:
        raise HuabiError(f"chaos: must be a whole number from 0 to 100, got {chaos!r}")
    amount = chaos / 100
    extra = tuple((k, v) for k, v in request.extra if k != "Chaos") + (("Chaos", str(chaos)),)
    varied = []
    for seed in (s for batch in request.image_seeds() for s in batch):
        rng = random.Random(seed)
        pull = rng.random() * CHAOS_MAX_CFG_PULL * amount
        cfg_scale = round(request.cfg_scale - (request.cfg_scale - 1.0) * pull, 2) if request.cfg_scale > 1 else request.cfg_scale
        prompt = request.prompt
        if rng.random() < amount:
            parts = top_level_parts(prompt)
            rng.shuffle(parts)
            prompt = ", ".join(part for part in parts if part)
        varied.append(
            request.replace(prompt=prompt, cfg_scale=cfg_scale, seed=seed, batch_size=1, batch_count=1, extra=extra)
        )
    return varied


def top_level_parts(prompt: str) -> list[str]:
    """The comma-separated parts of ``prompt``, not splitting inside (), [] or {} (weights stay whole)."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for char in prompt:
        if char in "([{":
            depth += 1
        elif char in ")]}" and depth > 0:
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    parts.append("".join(current).strip())
    return [part for part in parts if part]
