"""``huabi edit``: image to image, inpainting and outpainting from the command line.

    huabi edit photo.png "a watercolour painting" --strength 0.6
    huabi edit photo.png "a red hat" --mask hat.png --mask-blur 4 --inpaint-area masked
    huabi edit photo.png "a beach at sunset" --outpaint left=128,up=64

Only argument parsing lives here; the work is ``Engine.edit``. This module
imports nothing heavy: the ``huabi`` parser is built on every command.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``edit`` on the ``huabi`` sub-command parser."""
    from huabi.cli.main import _add_model_options, add_output_options, add_sampling_options  # at call time: main imports this module

    edit = commands.add_parser("edit", help="image to image, inpainting (--mask) and outpainting (--outpaint)")
    edit.add_argument("image", type=Path, help="the image to start from")
    edit.add_argument("prompt", help="the prompt")
    edit.add_argument("-n", "--negative", dest="negative_prompt", help="negative prompt")
    edit.add_argument("--strength", type=float, default=0.75,
                      help="denoising strength 0..1: 0 keeps the image, 1 repaints it fully (default 0.75)")
    edit.add_argument("--mask", type=Path, help="mask image: white = repaint, black = keep (stretched to the image "
                                                "if its size differs)")
    edit.add_argument("--mask-blur", type=int, default=4, help="mask blur in pixels (default 4)")
    edit.add_argument("--masked-content", default="original",
                      help="what the masked area starts from: fill, original, latent-noise, latent-nothing "
                           "(default original)")
    edit.add_argument("--inpaint-area", default="whole", help="whole (picture) or masked (only the masked box, "
                                                               "upscaled to the working size)")
    edit.add_argument("--padding", type=int, default=32, help="pixels around the mask for --inpaint-area masked")
    edit.add_argument("--invert-mask", action="store_true", help="repaint the black part instead")
    edit.add_argument("--resize-mode", default="just", help="just, crop or fill (A1111's three modes) when --size "
                                                            "differs from the image")
    edit.add_argument("--outpaint", metavar="left=N,right=N,up=N,down=N",
                      help="extend the canvas by these pixels (multiples of 8) and paint the new area")
    edit.add_argument("--instruct", action="store_true", help=argparse.SUPPRESS)
    add_sampling_options(edit, size_help="WIDTHxHEIGHT working size, multiples of 8 (default: the image's, rounded to 8)")
    edit.add_argument("--batch-size", type=int)
    edit.add_argument("--batch-count", type=int)
    edit.add_argument("--clip-skip", type=int)
    from huabi.cli.control import add_control_options

    add_control_options(edit)
    _add_model_options(edit)
    add_output_options(edit)
    return edit


def request_from_args(args: argparse.Namespace):  # -> tuple[GenerationRequest, EditOptions]
    """The request and edit options from the flags, validated before any model loads."""
    from huabi.cli.main import parse_size
    from huabi.core.request import EditOptions, GenerationRequest, parse_outpaint
    from huabi.errors import HuabiError
    from huabi.service.images import canonical_resize_mode

    if args.instruct:
        raise HuabiError("instruct: --instruct (InstructPix2Pix editing) is not available yet; "
                         "use --strength for plain image to image")
    fields = {
        name: getattr(args, name)
        for name in ("negative_prompt", "steps", "cfg_scale", "sampler", "schedule", "seed", "batch_size",
                     "batch_count", "clip_skip", "model", "vae")
        if getattr(args, name, None) is not None
    }
    if args.size is not None:
        fields["width_px"], fields["height_px"] = parse_size(args.size)
    request = GenerationRequest(prompt=args.prompt, **fields)
    options = EditOptions(
        init_image=str(args.image),
        denoising_strength=args.strength,
        resize_mode=canonical_resize_mode(args.resize_mode),
        mask_image=str(args.mask) if args.mask is not None else None,
        mask_blur_px=args.mask_blur,
        masked_content=args.masked_content,
        inpaint_area=args.inpaint_area,
        padding_px=args.padding,
        invert_mask=args.invert_mask,
        outpaint=parse_outpaint(args.outpaint) if args.outpaint is not None else None,
    )
    from huabi.cli.control import apply_control_args

    request = apply_control_args(request, args)
    return request, options


def cmd_edit(args: argparse.Namespace) -> int:
    from huabi.cli.main import _ProgressBar
    from huabi.service.engine import Engine

    request, options = request_from_args(args)
    engine = Engine(device=args.device, dtype=args.dtype, models_dir=args.models_dir, base_model=getattr(args, "base", None))
    progress = _ProgressBar(enabled=not args.quiet)
    try:
        results = engine.edit(request, options, out_dir=args.out, on_progress=progress.update)
    finally:
        progress.close()
    for result in results:
        print(result.path)
    return 0
