"""``huabi xyz``: A1111's X/Y/Z plot from the command line.

    huabi xyz "a red apple" --x "Steps: 10, 20, 30" --y "CFG scale: 3-9 (+3)" --z "Sampler: Euler, DPM++ 2M"

Only argument parsing lives here; the axes are parsed in ``huabi.core.xyz`` and
the plot runs in ``huabi.service.xyz``. This module imports nothing heavy: the
``huabi`` parser is built on every command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

AXIS_HELP = (
    "'TYPE: VALUES'. Types: Seed, Steps, CFG scale, Sampler, Schedule type, Prompt S/R, "
    "Checkpoint name, Clip skip, Size, Nothing. Values: a comma list (CSV quotes allowed), "
    "ranges 1-5, 1-10 (+2), 1-10 [4]"
)


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``xyz`` on the ``huabi`` sub-command parser."""
    from huabi.cli.common import add_model_options, add_output_options, add_sampling_options

    xyz = commands.add_parser("xyz", help="X/Y/Z plot: a grid of images over up to three varied parameters")
    xyz.add_argument("prompt", help="the prompt (Prompt S/R replaces text in it)")
    xyz.add_argument("--x", dest="x_axis", required=True, metavar="'TYPE: VALUES'", help="X axis (columns): " + AXIS_HELP)
    xyz.add_argument("--y", dest="y_axis", metavar="'TYPE: VALUES'", help="Y axis (rows)")
    xyz.add_argument("--z", dest="z_axis", metavar="'TYPE: VALUES'", help="Z axis (one grid per value)")
    xyz.add_argument("-n", "--negative", dest="negative_prompt", help="negative prompt")
    add_sampling_options(xyz, size_help="WIDTHxHEIGHT in pixels, multiples of 8 (default: the model's native size)",
                         seed_help="-1 for random: resolved once, the same for every cell")
    xyz.add_argument("--clip-skip", type=int)
    add_model_options(xyz)
    xyz.add_argument("--embeddings", dest="embeddings_dir", type=Path, metavar="DIR",
                     help="textual-inversion embeddings folder (default as for generate)")
    add_output_options(xyz)
    return xyz


def plan_from_args(args: argparse.Namespace):  # -> XYZPlan
    """The base request from the flags and the three axes, validated (no model is loaded)."""
    from huabi.cli.common import request_values
    from huabi.core.request import GenerationRequest
    from huabi.core.xyz import parse_axis_spec, plan_xyz
    from huabi.service.requests import request_fields

    base = GenerationRequest(prompt=args.prompt, **request_fields(request_values(args)))
    axes = [parse_axis_spec(spec, name=name) for spec, name in
            ((args.x_axis, "X"), (args.y_axis, "Y"), (args.z_axis, "Z"))]
    return plan_xyz(base, *axes)


def cmd_xyz(args: argparse.Namespace) -> int:
    from huabi.cli.common import ProgressBar
    from huabi.service.engine import Engine
    from huabi.service.xyz import run_xyz

    from huabi.service.outputs import check_output_folder

    plan = plan_from_args(args)  # bad axes fail here, before any model loads
    check_output_folder(args.out)
    engine = Engine(device=args.device, dtype=args.dtype, models_dir=args.models_dir,
                    embeddings_dir=args.embeddings_dir, base_model=getattr(args, "base", None),
                    gguf_on_the_fly=getattr(args, "gguf_on_the_fly", False))
    progress = ProgressBar(enabled=not args.quiet)
    try:
        result = run_xyz(engine, plan, out_dir=args.out, on_progress=progress.update)
    finally:
        progress.close()
    for cell in result.cells:
        print(cell.path)
    for path in result.grid_paths:
        print(path)
    return 0
