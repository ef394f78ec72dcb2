"""ControlNet flags for ``generate`` / ``edit``, and ``huabi preprocess``.

Syntax: every ``--controlnet MODEL`` starts a unit; the ``--control-*`` flags
after it (until the next ``--controlnet``) set that unit::

    huabi generate "a house" --controlnet canny_sd15 --control-image house.png --control-module canny \\
        --controlnet depth_sd15 --control-image depth.png --control-weight 0.6 --control-end 0.8

With ``--from IMAGE`` the units recorded in IMAGE's infotext come back, but
their control images are not in the PNG: give ``--control-image`` once per
recorded unit, in order, *without* ``--controlnet`` (``--controlnet`` flags
replace the recorded units instead).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from huabi.service.requests import CONTROL_UNIT_OPTIONS

# flag -> (ControlUnit field, converter): --control-NAME for each of the service's unit option names.
_UNIT_FLAGS: dict[str, tuple[str, type]] = {
    "--control-" + name.replace("_", "-"): spec for name, spec in CONTROL_UNIT_OPTIONS.items()
}
_LOOSE_ALLOWED = ("image", "mask")  # fill the units of a --from infotext, in order


class _UnitAction(argparse.Action):
    """Collects ``--controlnet`` units in order into ``namespace.control_units``."""

    def __call__(self, parser, namespace, values, option_string=None):
        units = getattr(namespace, "control_units", None)
        if units is None:
            units = []
            setattr(namespace, "control_units", units)
        loose = getattr(namespace, "control_loose", None)
        if loose is None:
            loose = {name: [] for name in _LOOSE_ALLOWED}
            setattr(namespace, "control_loose", loose)
        if option_string == "--controlnet":
            units.append({"model": values})
            return
        field, convert = _UNIT_FLAGS[option_string]
        try:
            value = convert(values)
        except ValueError:
            parser.error(f"argument {option_string}: invalid value {values!r}")
        # Errors wait for the request builder (with_controls): the CLI reports HuabiErrors as "huabi: error: ...".
        errors = getattr(namespace, "control_errors", None) or []
        setattr(namespace, "control_errors", errors)
        if not units:
            if field not in _LOOSE_ALLOWED:
                errors.append(f"{option_string}: give it after --controlnet MODEL (it sets that unit)")
            else:
                loose[field].append(value)
            return
        if field in units[-1]:
            errors.append(f"{option_string}: given twice for controlnet {len(units) - 1} ({units[-1]['model']})")
        units[-1][field] = value


def add_control_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "ControlNet", "each --controlnet MODEL starts a unit; the --control-* flags after it set that unit"
    )
    group.add_argument("--controlnet", action=_UnitAction, metavar="MODEL", dest="control_marker",
                       help="ControlNet file/folder path, or its name in the models folder's ControlNet/ (repeatable)")
    group.add_argument("--control-image", action=_UnitAction, metavar="IMAGE", dest="control_marker",
                       help="the control image (with --from and no --controlnet: once per recorded unit, in order)")
    group.add_argument("--control-module", action=_UnitAction, metavar="NAME", dest="control_marker",
                       help="preprocessor: none (default: a ready-made map), invert, canny, softedge_sobel, "
                            "scribble_xdog, tile_resample, blur_gaussian, color, shuffle, inpaint_only")
    group.add_argument("--control-weight", action=_UnitAction, metavar="W", dest="control_marker",
                       help="weight 0..2 (default 1)")
    group.add_argument("--control-start", action=_UnitAction, metavar="F", dest="control_marker",
                       help="guidance start, fraction of the steps (default 0)")
    group.add_argument("--control-end", action=_UnitAction, metavar="F", dest="control_marker",
                       help="guidance end, fraction of the steps (default 1)")
    group.add_argument("--control-mode", action=_UnitAction, metavar="MODE", dest="control_marker",
                       help="balanced (default), prompt (My prompt is more important), "
                            "control (ControlNet is more important)")
    group.add_argument("--control-resize", action=_UnitAction, metavar="MODE", dest="control_marker",
                       help="how the map fits the image: crop (Crop and Resize, default), just (Just Resize), "
                            "fill (Resize and Fill)")
    group.add_argument("--control-res", action=_UnitAction, metavar="PX", dest="control_marker",
                       help="preprocessor resolution: short side in pixels (default 512)")
    group.add_argument("--control-threshold-a", action=_UnitAction, metavar="A", dest="control_marker",
                       help="module parameter A (canny: low threshold 100; scribble_xdog: 32; tile_resample: "
                            "rate 1; blur_gaussian/softedge_sobel: sigma)")
    group.add_argument("--control-threshold-b", action=_UnitAction, metavar="B", dest="control_marker",
                       help="module parameter B (canny: high threshold 200)")
    group.add_argument("--control-mask", action=_UnitAction, metavar="MASK", dest="control_marker",
                       help="inpaint_only: the mask (white = repaint; edit uses its --mask by default)")


def control_input(args: argparse.Namespace):
    """The ControlNet flags as the service's :class:`huabi.service.requests.ControlInput` (None: no flags)."""
    from huabi.service.requests import ControlInput

    units = getattr(args, "control_units", None) or []
    loose = getattr(args, "control_loose", None) or {}
    errors = getattr(args, "control_errors", None) or []
    if not (units or errors or any(loose.values())):
        return None
    return ControlInput(units=tuple(units), fill={name: tuple(values) for name, values in loose.items()},
                        errors=tuple(errors))


def apply_control_args(request, args: argparse.Namespace):
    """``request`` with the ControlNet units of the flags (a --from request keeps its recorded ones)."""
    from huabi.service.requests import with_controls

    return with_controls(request, control_input(args))


# ------------------------------------------------------------------------------ huabi preprocess

def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    pre = commands.add_parser("preprocess", help="preview a ControlNet preprocessor's map of an image")
    pre.add_argument("image", type=Path)
    pre.add_argument("--module", default="canny", help="preprocessor name (default canny; see generate --help)")
    pre.add_argument("--out", type=Path, required=True,
                     help="output image (.png, .jpg or .webp), or an existing folder (gets IMAGE-MODULE.png)")
    pre.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    pre.add_argument("--res", type=int, default=512, help="preprocessor resolution, short side in pixels (default 512)")
    pre.add_argument("--threshold-a", type=float, help="module parameter A")
    pre.add_argument("--threshold-b", type=float, help="module parameter B")
    pre.add_argument("--mask", help="inpaint_only: mask image (white = repaint)")
    pre.add_argument("--seed", type=int, default=0, help="shuffle: random seed (default 0)")
    pre.add_argument("--models-dir", type=Path,
                     help="models folder whose annotators/ holds network preprocessors' weights "
                          "(default: $HUABI_MODELS_DIR or ~/huabi/models)")
    pre.add_argument("--device", default="cpu", help="network preprocessors run here: cpu (default), cuda, cuda:N")
    return pre


def cmd_preprocess(args: argparse.Namespace) -> int:
    from huabi.core.control import ControlUnit
    from huabi.service.control import preview_map

    unit = ControlUnit(model="preview", image=str(args.image), module=args.module, processor_res=args.res,
                       threshold_a=args.threshold_a, threshold_b=args.threshold_b, mask=args.mask)
    print(preview_map(unit, args.out, seed=args.seed, overwrite=args.overwrite, models_dir=args.models_dir,
                      device=args.device))
    return 0
