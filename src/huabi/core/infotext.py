"""A1111-compatible "infotext": the generation parameters stored with each image.

The format, as A1111 WebUI writes it into a PNG's ``parameters`` text chunk::

    a red apple, (masterpiece:1.2)
    Negative prompt: blurry, lowres
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x512, ...

- the prompt (one or more lines);
- ``Negative prompt: ...`` (left out when empty; may span several lines);
- one last line of ``Key: value`` pairs joined by ``", "``. A value holding a
  comma, a colon or a newline is written as a JSON string; a key whose value
  equals the key is written bare.

This module is pure string work (no I/O): ``format_infotext`` writes it from a
``GenerationRequest``, ``parse_infotext`` reads any A1111-style string, and
``request_from_infotext`` turns one back into a request. A huabi infotext
survives parse -> request -> format unchanged; a foreign one keeps every key
(unknown keys ride along in ``GenerationRequest.extra``).

Known differences from A1111, chosen on purpose:
- "Schedule type" is left out when it is Automatic (A1111 >= 1.10 writes
  "Schedule type: Automatic"; both parse the same).
- An old combined sampler name such as "DPM++ 2M Karras" is split into sampler
  "DPM++ 2M" and schedule "Karras"; A1111 turns the schedule into "Automatic"
  when it is that sampler's default, which huabi cannot know at this layer.
- Lines of the prompt are read back stripped, as A1111 reads them, so only
  prompts without outer spaces on a line round-trip byte for byte.
- A prompt-only last line is told apart from a parameters line more strictly
  (every segment must be ``Key: value``), so prompts with ``(word:1.2)``
  weights are never mistaken for parameters.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from huabi.core.names import SCHEDULE_NAMES
from huabi.core.request import GenerationRequest
from huabi.errors import HuabiError

NEGATIVE_PREFIX = "Negative prompt:"

# The keys of A1111's create_infotext in the order it writes them, followed by
# the keys its own features add through extra_generation_params, in the order
# those features run (hires set-up, then extra networks, then conditioning,
# then the refiner during sampling). Unknown keys go after these, "Version" and
# "User" close the line.
KNOWN_KEY_ORDER: tuple[str, ...] = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "Hypernet",
    "Hypernet hash",
    "Hypernet strength",
    "FP8 weight",
    "Cache FP16 weight for LoRA",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Conditional mask weight",
    "Clip skip",
    "ENSD",
    "Token merging ratio",
    "Token merging ratio hr",
    "Init image hash",
    "RNG",
    "NGMS",
    "Tiling",
    "Mask blur",
    "Inpaint area",
    "Masked area padding",
    "Masked content",
    "Hires checkpoint",
    "Hires sampler",
    "Hires schedule type",
    "Hires prompt",
    "Hires negative prompt",
    "Hires CFG Scale",
    "Hires upscale",
    "Hires resize",
    "Hires steps",
    "Hires upscaler",
    "Lora hashes",
    "TI hashes",
    # huabi's IP-Adapter keys (sd-webui-controlnet folds them into "ControlNet N" units).
    "IP-Adapter",
    "IP-Adapter hash",
    "IP-Adapter image",
    "IP-Adapter weight",
    "IP-Adapter encoder",
    "Emphasis",
    "Schedule max sigma",
    "Schedule min sigma",
    "Schedule rho",
    "Hires refiner",
    "Refiner",
    "Refiner switch at",
)
_TAIL_KEYS: tuple[str, ...] = ("Version", "User")

# Keys written from GenerationRequest fields; they may not also come as extras.
_FIELD_KEYS = frozenset(
    {"Prompt", "Negative prompt", "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Clip skip",
     "Tiling", "Variation seed", "Variation seed strength", "Seed resize from"}
)
# Written from the request's hires fields when hires fix is on (copies in ``extra`` are then
# dropped); a parsed infotext with an upscaler huabi can run turns hires fix back on.
HIRES_KEYS = ("Hires upscale", "Hires resize", "Hires steps", "Hires upscaler")
# Keys describing what was actually loaded and which program wrote the text.
# They are written from format_infotext's arguments only; copies that a parsed
# request carries in ``extra`` are records of the source image, never re-emitted.
_RUN_KEYS = frozenset({"Model hash", "Model", "VAE hash", "VAE", "Version"})

# A1111's key grammar: a word character, then word characters, spaces, '-' or '/'.
_KEY_RE = re.compile(r"\w[\w \-/]*")
_SPACES_RE = re.compile(r"[ \t]*")
# How A1111 reads a pair (found anywhere in the line, unmatched text skipped):
# key of 2+ key characters, ':', then a JSON-style quoted string or text up to
# the next comma. Used only as a lenient fallback for odd lines.
_A1111_PAIR_RE = re.compile(
    r"""\s*(\w[\w /-]+):\s*("(?:[^"\\]|\\.)+"|[^,]*)(?:,|$)"""
)
_SIZE_RE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")
_JSON = json.JSONDecoder()


@dataclass(frozen=True)
class ParsedInfotext:
    """An infotext split into its parts; ``params`` keeps every key, in order, unquoted."""

    prompt: str
    negative_prompt: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def has_parameters(self) -> bool:
        return bool(self.params)

    @property
    def sampler(self) -> str | None:
        """The sampler name with any old-style schedule suffix removed."""
        if "Sampler" not in self.params:
            return None
        return split_sampler_schedule(self.params["Sampler"], self.params.get("Schedule type"))[0]

    @property
    def schedule(self) -> str:
        """The schedule type, from "Schedule type" or an old "<sampler> Karras" name."""
        return split_sampler_schedule(self.params.get("Sampler", ""), self.params.get("Schedule type"))[1]


def split_sampler_schedule(sampler: str, schedule: str | None) -> tuple[str, str]:
    """Split an old combined name ("DPM++ 2M Karras") into (sampler, schedule).

    As in A1111, a schedule suffix in the sampler name wins over a separate
    "Schedule type"; with neither, the schedule is "Automatic".
    """
    sampler = sampler.strip()
    found = (schedule or "").strip() or "Automatic"
    lowered = sampler.lower()
    # Longest names first so "SGM Uniform" is not cut as "Uniform".
    for name in sorted(SCHEDULE_NAMES, key=len, reverse=True):
        for spelling in {name, name.lower().replace(" ", "_")}:
            suffix = " " + spelling.lower()
            if lowered.endswith(suffix) and len(lowered) > len(suffix):
                return sampler[: -len(suffix)].rstrip(), name
    return sampler, found


def quote(value: str) -> str:
    """Write a value so the parameters line reads back to exactly ``value``.

    A1111 quotes values holding ',', ':' or a newline; huabi also quotes a value
    that starts with '"', is empty, or has outer spaces, since those would not
    read back unchanged (A1111 reads all of them back correctly).
    """
    needs_quotes = (
        any(ch in value for ch in ",:\n\r")
        or value.startswith('"')
        or value != value.strip()
        or value == ""
    )
    return json.dumps(value, ensure_ascii=False) if needs_quotes else value


def format_value(value: object) -> str:
    """A1111's spelling of a value: 7.0 -> "7", 0.75 -> "0.75", True -> "True"."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        return repr(value)
    return str(value)


def format_infotext(
    request: GenerationRequest,
    *,
    seed: int,
    width_px: int,
    height_px: int,
    model_name: str | None,
    model_hash: str | None,
    extra: Mapping[str, object] = {},
    version: str,
    variation_seed: int | None = None,
) -> str:
    """The infotext of one image made from ``request``.

    ``seed``, ``width_px`` and ``height_px`` are this image's own (each image of
    a batch has its own seed). ``model_name``/``model_hash`` name the checkpoint
    that was actually loaded (None leaves the key out). ``extra`` adds run-time
    keys such as "VAE", "VAE hash", "Denoising strength", "Hires upscale",
    "Lora hashes"; it wins over ``request.extra`` for the same key. Values of
    ``None`` are left out. Keys come in A1111's order (``KNOWN_KEY_ORDER``);
    keys A1111 does not know follow in the order given, then "Version". An
    unknown key in ``request.extra`` (read from an existing infotext) instead
    stays just before the known key that followed it there, so a parsed A1111
    line is written back in its own order. ``variation_seed`` is this image's
    own variation seed (default ``request.variation_seed``); as in A1111 the
    variation keys appear only when the strength is not 0.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise HuabiError(f"infotext: seed must be a concrete non-negative integer, got {seed!r}")
    for name, side in (("width_px", width_px), ("height_px", height_px)):
        if not isinstance(side, int) or isinstance(side, bool) or side < 1:
            raise HuabiError(f"infotext: {name} must be a positive integer, got {side!r}")

    params: dict[str, object] = {
        "Steps": request.steps,
        "Sampler": request.sampler,
        "Schedule type": None if request.schedule == "Automatic" else request.schedule,
        "CFG scale": float(request.cfg_scale),
        "Seed": seed,
        "Size": f"{width_px}x{height_px}",
        "Model hash": model_hash,
        "Model": model_name,
        "Variation seed": None,
        "Variation seed strength": None,
        "Seed resize from": None,
        "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
        "Tiling": True if request.tile else None,
        "Version": version,
    }
    if request.variation_strength != 0:
        image_variation_seed = request.variation_seed if variation_seed is None else variation_seed
        if not isinstance(image_variation_seed, int) or isinstance(image_variation_seed, bool) or image_variation_seed < 0:
            raise HuabiError(
                f"infotext: variation seed must be a concrete non-negative integer, got {image_variation_seed!r}"
            )
        params["Variation seed"] = image_variation_seed
        params["Variation seed strength"] = float(request.variation_strength)
    if request.seed_resize_from_px is not None:
        params["Seed resize from"] = f"{request.seed_resize_from_px[0]}x{request.seed_resize_from_px[1]}"
    if request.hires:
        # As A1111 writes them: the scale or the resize, steps only when set, the hires strength.
        params["Denoising strength"] = float(request.hires_denoise)
        if request.hires_resize_px is None:
            params["Hires upscale"] = float(request.hires_scale)
        else:
            params["Hires resize"] = f"{request.hires_resize_px[0]}x{request.hires_resize_px[1]}"
        if request.hires_steps:
            params["Hires steps"] = request.hires_steps
        params["Hires upscaler"] = request.hires_upscaler
    rank = {key: (_rank_of(key), 0) for key in params}
    for key, _ in request.extra:
        _check_extra_key(key, "request.extra")
    # An unknown key read from an existing infotext stays just before the known
    # key that followed it there, so a real A1111 line is written back unchanged.
    next_known = None
    for index in range(len(request.extra) - 1, -1, -1):
        key, value = request.extra[index]
        if _is_known(key):
            next_known = _rank_of(key)
            rank.setdefault(key, (next_known, 0))
        else:
            anchor = next_known if next_known is not None else _UNKNOWN_RANK
            rank.setdefault(key, (anchor - 0.5, index))
    for key, value in request.extra:
        if key in _RUN_KEYS:  # records of the source image are not re-emitted
            continue
        if request.hires and (key in HIRES_KEYS or key == "Denoising strength"):
            continue  # written from the hires fields above
        params[key] = value
    for index, (key, value) in enumerate(extra.items()):
        _check_extra_key(key, "extra")
        if key in _RUN_KEYS - {"VAE", "VAE hash"}:
            raise HuabiError(f"infotext: extra key {key!r} is set by format_infotext's own arguments")
        params[key] = value
        rank.setdefault(key, (_rank_of(key), len(request.extra) + index))

    ordered = sorted(params.items(), key=lambda kv: rank[kv[0]])

    parts = []
    for key, value in ordered:
        if value is None:
            continue
        text = format_value(value)
        parts.append(key if text == key else f"{key}: {quote(text)}")

    negative = f"\n{NEGATIVE_PREFIX} {request.negative_prompt}" if request.negative_prompt else ""
    return f"{request.prompt}{negative}\n{', '.join(parts)}".strip()


_KNOWN_RANK = {key: float(rank) for rank, key in enumerate(KNOWN_KEY_ORDER)}
_UNKNOWN_RANK = float(len(KNOWN_KEY_ORDER))
_TAIL_RANK = {key: _UNKNOWN_RANK + 1 + rank for rank, key in enumerate(_TAIL_KEYS)}


def _is_known(key: str) -> bool:
    return key in _KNOWN_RANK or key in _TAIL_RANK


def _rank_of(key: str) -> float:
    """Where a key goes: A1111's known keys in order, unknown keys, then the tail."""
    return _KNOWN_RANK.get(key, _TAIL_RANK.get(key, _UNKNOWN_RANK))


def _check_extra_key(key: object, where: str) -> None:
    if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None or key != key.strip():
        raise HuabiError(
            f"infotext: {where} key {key!r} is not a valid infotext key "
            "(a letter or digit, then letters, digits, spaces, '-' or '/')"
        )
    if key in _FIELD_KEYS:
        raise HuabiError(f"infotext: {where} key {key!r} is written from the request's own field; set it there")


def parse_infotext(text: str) -> ParsedInfotext:
    """Split an A1111-style infotext into prompt, negative prompt and parameters.

    Lines are stripped (as A1111 does); Windows line endings are accepted. A
    text whose last line is not a parameters line is all prompt, with empty
    ``params``.
    """
    if not isinstance(text, str):
        raise HuabiError(f"infotext: expected text, got {type(text).__name__}")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").strip().split("\n")
    pairs = _parse_parameters_line(lines[-1])
    if pairs is not None:
        lines = lines[:-1]

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    return ParsedInfotext(
        prompt="\n".join(prompt_lines),
        negative_prompt="\n".join(negative_lines),
        params=dict(pairs or ()),
    )


def _parse_parameters_line(line: str) -> list[tuple[str, str]] | None:
    """The ``(key, value)`` pairs of a parameters line, or None if ``line`` is prompt text."""
    pairs = _scan_pairs(line)
    if pairs is not None:
        valued = sum(1 for key, value in pairs if key != value)
        if valued >= 3 or any(key == "Steps" for key, _ in pairs):
            return pairs
        return None
    # A line our strict reader rejects (say, a key with '+' in it): read it the
    # way A1111 does, but only if it clearly is a parameters line.
    found = _A1111_PAIR_RE.findall(line)
    if len(found) >= 3 and any(key.strip() == "Steps" for key, _ in found):
        return [(key.strip(), _unquote(value.strip())) for key, value in found]
    return None


def _scan_pairs(line: str) -> list[tuple[str, str]] | None:
    """Read ``Key: value, Key: "quoted", Bare`` left to right; None unless it all parses."""
    pairs: list[tuple[str, str]] = []
    pos = 0
    end = len(line)
    while True:
        pos = _SPACES_RE.match(line, pos).end()
        if pos >= end:
            return pairs or None
        key_match = _KEY_RE.match(line, pos)
        if key_match is None:
            return None
        key = key_match.group().rstrip()
        pos = key_match.end()
        if pos >= end or line[pos] == ",":  # a bare key, written when value == key
            pairs.append((key, key))
            pos += 1
            continue
        if line[pos] != ":":
            return None
        pos = _SPACES_RE.match(line, pos + 1).end()
        value = None
        if pos < end and line[pos] == '"':
            try:
                decoded, after = _JSON.raw_decode(line, pos)
            except ValueError:
                decoded = None
            if isinstance(decoded, str):
                after = _SPACES_RE.match(line, after).end()
                if after >= end or line[after] == ",":
                    value, pos = decoded, after
        if value is None:
            comma = line.find(",", pos)
            comma = end if comma < 0 else comma
            value, pos = line[pos:comma].strip(), comma
        pairs.append((key, value))
        pos += 1  # past the comma (or past the end)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        if isinstance(decoded, str):
            return decoded
    return value


# A1111 settings huabi does not implement. ``request_from_infotext`` drops them (they would
# otherwise be written into the new image's infotext as if applied); see ``unimplemented_keys``.
UNIMPLEMENTED_KEYS = ("ENSD", "Token merging ratio", "Token merging ratio hr", "NGMS", "Face restoration",
                      "FP8 weight", "Cache FP16 weight for LoRA")


def unimplemented_keys(text: str) -> list[str]:
    """The keys of an infotext that ``request_from_infotext`` drops because huabi does not apply them."""
    params = parse_infotext(text).params
    return [key for key in params if key in UNIMPLEMENTED_KEYS]


def request_from_infotext(text: str, **overrides: object) -> GenerationRequest:
    """A ``GenerationRequest`` that redoes the image described by ``text``.

    Mapped keys: Steps, Sampler (an old "DPM++ 2M Karras" is split), Schedule
    type, CFG scale, Seed, Size -> width_px/height_px, Clip skip (missing: 1),
    VAE -> vae (by name), Tiling -> tile. "Model hash" goes into ``model`` when present, else
    "Model"; the service resolves a hash or name to a file. Every other key,
    and the records "Model", "Model hash", "VAE hash" and "Version", is kept in
    ``extra`` in its original order, except ``UNIMPLEMENTED_KEYS`` (dropped); ``format_infotext`` re-emits the former
    and writes the records afresh from what was actually loaded.
    ``overrides`` replace fields (``model=...`` also drops the recorded model
    keys, ``vae=...`` the VAE ones).
    """
    parsed = parse_infotext(text)
    if "Steps" not in parsed.params:
        raise HuabiError(
            "infotext: no generation parameters found (the last line needs 'Steps: ...'; "
            "a prompt alone cannot redo an image)"
        )
    params = parsed.params
    fields: dict[str, object] = {
        "prompt": parsed.prompt,
        "negative_prompt": parsed.negative_prompt,
        "steps": _int_param(params, "Steps"),
        "clip_skip": _int_param(params, "Clip skip") if "Clip skip" in params else 1,
    }
    if "Sampler" in params:
        fields["sampler"], fields["schedule"] = split_sampler_schedule(
            params["Sampler"], params.get("Schedule type")
        )
    elif "Schedule type" in params:
        fields["schedule"] = params["Schedule type"]
    if "CFG scale" in params:
        fields["cfg_scale"] = _float_param(params, "CFG scale")
    if "Seed" in params:
        fields["seed"] = _int_param(params, "Seed")
    if "Size" in params:
        size = _SIZE_RE.match(params["Size"])
        if size is None:
            raise HuabiError(f"infotext: Size: expected WIDTHxHEIGHT, got {params['Size']!r}")
        fields["width_px"], fields["height_px"] = int(size.group(1)), int(size.group(2))
    model = params.get("Model hash") or params.get("Model")
    if model:
        fields["model"] = model
    if params.get("VAE"):
        fields["vae"] = params["VAE"]
    if "Tiling" in params:
        tiling = params["Tiling"].strip()
        if tiling not in ("True", "False"):
            raise HuabiError(f"infotext: Tiling: expected True or False, got {tiling!r}")
        fields["tile"] = tiling == "True"
    if "Variation seed strength" in params:
        fields["variation_strength"] = _float_param(params, "Variation seed strength")
    if "Variation seed" in params:
        fields["variation_seed"] = _int_param(params, "Variation seed")
    if "Seed resize from" in params:
        resize = re.match(r"^\s*(-?\d+)\s*x\s*(-?\d+)\s*$", params["Seed resize from"])
        if resize is None:
            raise HuabiError(f"infotext: Seed resize from: expected WIDTHxHEIGHT, got {params['Seed resize from']!r}")
        # A1111 writes the key only when both sides are positive; "-1x-1" means off.
        if int(resize.group(1)) > 0 and int(resize.group(2)) > 0:
            fields["seed_resize_from_px"] = (int(resize.group(1)), int(resize.group(2)))

    mapped = {"Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Clip skip", "VAE", "Tiling",
              "Variation seed", "Variation seed strength", "Seed resize from"}
    if params.get("Refiner"):
        # A1111 writes "name [short hash]": the hash finds the file, as "Model hash" does. The keys
        # also stay in ``extra`` (a foreign text keeps its spelling); a run writes them afresh.
        fields["refiner"] = _refiner_reference(params["Refiner"])
        if "Refiner switch at" in params:
            fields["refiner_switch_at"] = _float_param(params, "Refiner switch at")
        if "Hires refiner" in params:
            fields["refiner_hires_pass"] = params["Hires refiner"].strip()
    # Hypernetwork setting (A1111's keys) and IP-Adapter (huabi's keys); their hashes stay in extra.
    for key, name in (("Hypernet", "hypernetwork"), ("IP-Adapter", "ip_adapter"), ("IP-Adapter image", "ip_image"),
                      ("IP-Adapter encoder", "ip_image_encoder")):
        if params.get(key, "").strip() not in ("", "None"):
            fields[name] = params[key].strip()
            mapped.add(key)
    if "Hypernet" in mapped and "Hypernet strength" in params:
        fields["hypernetwork_strength"] = _float_param(params, "Hypernet strength")
        mapped.add("Hypernet strength")
    if "IP-Adapter" in mapped and "IP-Adapter weight" in params:
        fields["ip_weight"] = _float_param(params, "IP-Adapter weight")
        mapped.add("IP-Adapter weight")
    # A1111 always writes "Hires upscaler" with hires fix on; without it the keys are just kept.
    if "Hires upscaler" in params and _runnable_upscaler(params["Hires upscaler"]):
        # Hires fix back on. The keys also stay in ``extra``, so an A1111 text keeps its
        # own spelling while hires is off (an override); with it on they are written afresh.
        fields["hires"] = True
        if "Denoising strength" in params:  # with hires keys it is the second pass's strength
            fields["hires_denoise"] = _float_param(params, "Denoising strength")
        if "Hires upscale" in params:
            fields["hires_scale"] = _float_param(params, "Hires upscale")
        if "Hires resize" in params:
            resize = _SIZE_RE.match(params["Hires resize"])
            if resize is None:
                raise HuabiError(f"infotext: Hires resize: expected WIDTHxHEIGHT, got {params['Hires resize']!r}")
            if int(resize.group(1)) > 0 and int(resize.group(2)) > 0:
                fields["hires_resize_px"] = (int(resize.group(1)), int(resize.group(2)))
        if "Hires steps" in params:
            fields["hires_steps"] = _int_param(params, "Hires steps")
        if "Hires upscaler" in params:
            fields["hires_upscaler"] = params["Hires upscaler"]
    # ControlNet units (sd-webui-controlnet's "ControlNet N" keys); the control images are not in the PNG.
    control_keys = [key for key in params if re.fullmatch(r"ControlNet \d+", key)]
    if control_keys:
        from huabi.core.control import parse_unit_infotext

        fields["controlnets"] = tuple(parse_unit_infotext(params[key]) for key in control_keys)
        mapped.update(control_keys)
    # Settings huabi does not apply: copying them would claim the new image used them.
    dropped: set[str] = set(UNIMPLEMENTED_KEYS)
    if "model" in overrides:
        dropped |= {"Model", "Model hash"}
    if "vae" in overrides:
        dropped |= {"VAE hash"}
    fields["extra"] = tuple(
        (key, value) for key, value in params.items() if key not in mapped and key not in dropped
    )

    valid_fields = set(GenerationRequest.__dataclass_fields__)
    for name, value in overrides.items():
        if name not in valid_fields:
            raise HuabiError(f"request_from_infotext: unknown field {name!r}; valid: {', '.join(sorted(valid_fields))}")
        fields[name] = value
    return GenerationRequest(**fields)


def _runnable_upscaler(name: str) -> bool:
    """Whether huabi can run a recorded hires upscaler (A1111's model names such as
    "R-ESRGAN 4x+" are not files huabi knows: such a text keeps hires off, its keys kept)."""
    from huabi.core.request import HIRES_UPSCALER_NAMES, is_upscaler_path

    return name in HIRES_UPSCALER_NAMES or is_upscaler_path(name)


def _int_param(params: Mapping[str, str], key: str) -> int:
    value = params[key].strip()
    try:
        return int(value)
    except ValueError:
        raise HuabiError(f"infotext: {key}: expected an integer, got {value!r}") from None


def _float_param(params: Mapping[str, str], key: str) -> float:
    value = params[key].strip()
    try:
        number = float(value)
    except ValueError:
        raise HuabiError(f"infotext: {key}: expected a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise HuabiError(f"infotext: {key}: expected a finite number, got {value!r}")
    return number


def _refiner_reference(title: str) -> str:
    """The model reference in a "Refiner" value: the hash of ``name [hash]``, else the name."""
    title = title.strip()
    if title.endswith("]") and " [" in title:
        name, _sep, hashed = title[:-1].rpartition(" [")
        return hashed.strip() or name.strip()
    return title


# Keys ``huabi edit`` writes (A1111's img2img/inpaint keys plus huabi's Outpaint), read back by edit --from.
EDIT_KEYS = ("Denoising strength", "Resize mode", "Mask blur", "Mask mode", "Masked content", "Inpaint area",
             "Masked area padding", "Outpaint", "Image CFG scale")
_RESIZE_MODE_NAMES = {"Just resize": "just", "Crop and resize": "crop", "Resize and fill": "fill"}
_INPAINT_AREA_NAMES = {"Whole picture": "whole", "Only masked": "masked"}
_MASK_MODE_NAMES = {"Inpaint masked": False, "Inpaint not masked": True}


def edit_fields_from_infotext(text: str) -> dict[str, object]:
    """``EditOptions`` fields (init image and mask excepted) recorded in an edited image's infotext.

    "Image CFG scale" means an InstructPix2Pix edit (``instruct=True``), as A1111
    writes it only for those models. Keys that are absent are left out (defaults apply).
    """
    from huabi.core.request import parse_outpaint

    params = parse_infotext(text).params
    fields: dict[str, object] = {}
    if "Denoising strength" in params:
        fields["denoising_strength"] = _float_param(params, "Denoising strength")
    for key, name, table in (("Resize mode", "resize_mode", _RESIZE_MODE_NAMES),
                             ("Inpaint area", "inpaint_area", _INPAINT_AREA_NAMES),
                             ("Mask mode", "invert_mask", _MASK_MODE_NAMES)):
        if key in params:
            value = params[key].strip()
            if value not in table:
                raise HuabiError(f"infotext: {key}: unknown {value!r}; valid: {', '.join(table)}")
            fields[name] = table[value]
    if "Mask blur" in params:
        fields["mask_blur_px"] = _int_param(params, "Mask blur")
    if "Masked content" in params:
        fields["masked_content"] = params["Masked content"].strip()
    if "Masked area padding" in params:
        fields["padding_px"] = _int_param(params, "Masked area padding")
    if "Outpaint" in params:
        fields["outpaint"] = parse_outpaint(params["Outpaint"])
    if "Image CFG scale" in params:
        fields["instruct"] = True
        fields["image_cfg_scale"] = _float_param(params, "Image CFG scale")
    return fields
