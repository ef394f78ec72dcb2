"""``huabi upscale``: stand-alone upscaling (A1111's extras tab, single image).

    huabi upscale photo.png --scale 2                        # Lanczos
    huabi upscale photo.png --scale 4 --model 4x-UltraSharp.pth --tile 256

Only argument parsing lives here; the work is in ``huabi.service.upscale``
and model files are read by ``huabi.models.upscalers``. Imports nothing heavy
at module level: the ``huabi`` parser is built on every command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from huabi.cli.common import output_folder

DEFAULT_TILE_PX = 256  # keep in step with huabi.service.upscale.DEFAULT_TILE_PX (not imported: torch)


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``upscale`` on the ``huabi`` sub-command parser."""
    upscale = commands.add_parser("upscale", help="upscale an image: Lanczos, or an ESRGAN-family model file")
    upscale.add_argument("image", type=Path, help="the image to upscale (its infotext is kept)")
    upscale.add_argument("--scale", type=float, default=2.0, help="upscale factor from 1 to 8 (default: 2)")
    upscale.add_argument("--model", type=Path, metavar="PATH",
                         help="ESRGAN / Real-ESRGAN / compact upscaler .pth or .safetensors (default: Lanczos)")
    upscale.add_argument("--tile", dest="tile_px", type=int, default=DEFAULT_TILE_PX, metavar="PX",
                         help=f"model tile size in input pixels; smaller uses less memory (default: {DEFAULT_TILE_PX})")
    upscale.add_argument("--out", type=output_folder, default=Path("outputs"), help="output folder (default: ./outputs)")
    upscale.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    upscale.add_argument("--quiet", action="store_true", help="no progress bar")
    return upscale


def cmd_upscale(args: argparse.Namespace) -> int:
    from huabi.cli.common import ProgressBar
    from huabi.errors import HuabiError
    from huabi.service.upscale import check_scale, next_output_path, open_image, save_upscaled, upscale_image

    from huabi.service.outputs import check_output_folder

    check_scale(args.scale)  # bad input fails before any model loads
    check_output_folder(args.out)
    image = open_image(args.image)
    try:
        from huabi.service.pngio import read_infotext

        parameters: str | None = read_infotext(args.image)
    except HuabiError:
        parameters = None  # an image without generation parameters upscales just the same
    model = None
    device = "cpu"
    if args.model is not None:
        from huabi.models.upscalers import load_upscaler
        from huabi.service.engine import resolve_device

        device = resolve_device(args.device)
        model = load_upscaler(args.model, device=device)
    progress = ProgressBar(enabled=not args.quiet and model is not None)
    try:
        result = upscale_image(image, args.scale, model=model, tile_px=args.tile_px, device=device,
                               on_tile=progress.update)
    finally:
        progress.close()
    path = save_upscaled(result, next_output_path(args.out, args.image), parameters)
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    from huabi.cli.main import main

    sys.exit(main(["upscale", *sys.argv[1:]]))
