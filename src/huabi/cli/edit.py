"""``huabi edit``: image to image, inpainting and outpainting from the command line.

    huabi edit photo.png "a watercolour painting" --strength 0.6
    huabi edit photo.png "a red hat" --mask hat.png --mask-blur 4 --inpaint-area masked
    huabi edit photo.png "a beach at sunset" --outpaint left=128,up=64
    huabi edit photo.png "make it snowy" --instruct --image-cfg-scale 1.5
    huabi edit photo.png --from edited.png          # every parameter from edited.png's infotext

Only argument parsing lives here; the request is built by :func:`huabi.service.requests.edit_job`
and run by the engine. This module
imports nothing heavy: the ``huabi`` parser is built on every command.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``edit`` on the ``huabi`` sub-command parser."""
    from huabi.cli.common import (
        add_model_options,
        add_attention_adapter_options,
        add_output_options,
        add_refiner_options,
        add_sampling_options,
    )

    edit = commands.add_parser("edit", help="image to image, inpainting (--mask) and outpainting (--outpaint)")
    edit.add_argument("image", type=Path, help="the image to start from")
    edit.add_argument("prompt", nargs="?", help="the prompt (or the instruction with --instruct; optional with --from)")
    edit.add_argument("--from", dest="from_image", type=Path, metavar="PNG",
                      help="reuse every parameter in PNG's infotext (strength, mask settings, ...); other flags "
                           "override them; IMAGE and --mask are still given here")
    edit.add_argument("-n", "--negative", dest="negative_prompt", help="negative prompt")
    # Defaults are None so that explicit flags can override a --from infotext; EditOptions holds the defaults.
    edit.add_argument("--strength", type=float,
                      help="denoising strength 0..1: 0 keeps the image, 1 repaints it fully (default 0.75; "
                           "1 with --instruct: from pure noise, as InstructPix2Pix does)")
    edit.add_argument("--mask", type=Path, help="mask image: white = repaint, black = keep (stretched to the image "
                                                "if its size differs)")
    edit.add_argument("--mask-blur", type=int, help="mask blur in pixels (default 4)")
    edit.add_argument("--masked-content",
                      help="what the masked area starts from: fill, original, latent-noise, latent-nothing "
                           "(default original)")
    edit.add_argument("--inpaint-area", help="whole (picture) or masked (only the masked box, "
                                             "upscaled to the working size)")
    edit.add_argument("--padding", type=int, help="pixels around the mask for --inpaint-area masked (default 32)")
    edit.add_argument("--invert-mask", action="store_true", default=None, help="repaint the black part instead")
    edit.add_argument("--resize-mode", help="just, crop or fill (A1111's three modes) when --size "
                                            "differs from the image")
    edit.add_argument("--outpaint", metavar="left=N,right=N,up=N,down=N",
                      help="extend the canvas by these pixels (multiples of 8) and paint the new area")
    edit.add_argument("--instruct", action="store_true", default=None,
                      help="InstructPix2Pix: the prompt is an instruction (\"make it snowy\"); needs an "
                           "instruct-pix2pix --model")
    edit.add_argument("--image-cfg-scale", type=float, metavar="S",
                      help="InstructPix2Pix image guidance scale (default 1.5; --cfg is the text scale)")
    add_refiner_options(edit)
    add_attention_adapter_options(edit)
    add_sampling_options(edit, size_help="WIDTHxHEIGHT working size, multiples of 8 (default: the image's, rounded to 8)")
    edit.add_argument("--batch-size", type=int)
    edit.add_argument("--batch-count", type=int)
    edit.add_argument("--clip-skip", type=int)
    from huabi.cli.control import add_control_options

    add_control_options(edit)
    add_model_options(edit)
    from huabi.cli.flow_options import add_flow_options

    add_flow_options(edit)
    add_output_options(edit)
    return edit


def request_from_args(args: argparse.Namespace, recorded_text: str | None = None):  # -> tuple[GenerationRequest, EditOptions]
    """The request and edit options from the flags (and --from's infotext: ``recorded_text`` when the
    caller has read it already), validated before any model loads."""
    from huabi.cli.control import control_input
    from huabi.cli.common import request_values
    from huabi.service.pngio import read_infotext
    from huabi.service.requests import edit_job

    edit_values = {
        "denoising_strength": args.strength, "resize_mode": args.resize_mode, "mask_blur_px": args.mask_blur,
        "masked_content": args.masked_content, "inpaint_area": args.inpaint_area, "padding_px": args.padding,
        "invert_mask": args.invert_mask, "outpaint": args.outpaint, "instruct": args.instruct,
        "image_cfg_scale": args.image_cfg_scale,
    }
    return edit_job(
        args.image, args.prompt, request_values(args), edit_values, mask_image=args.mask,
        from_infotext=(recorded_text if recorded_text is not None else read_infotext(args.from_image))
        if args.from_image is not None else None,
        control=control_input(args),
    )


def cmd_edit(args: argparse.Namespace) -> int:
    from huabi.cli.common import (ProgressBar, gallery_recorder, keep_and_record, make_studio, print_saved_paths,
                                  use_recorded_precision)
    from huabi.service.pngio import read_infotext
    from huabi.service.requests import with_flow_extras
    from huabi.service.engine import Job
    from huabi.service.outputs import check_output_folder

    check_output_folder(args.out)  # fail before any model loads, not after the run
    recorded_text = read_infotext(args.from_image) if args.from_image is not None else None
    request, options = request_from_args(args, recorded_text)
    if recorded_text is not None:
        use_recorded_precision(args, recorded_text, args.from_image)
    studio = make_studio(args)
    request = with_flow_extras(request, args)
    progress = ProgressBar(enabled=not args.quiet)
    saved: list = []
    recorder = gallery_recorder()
    try:
        results = studio.run(Job(request, options), out_dir=args.out, on_event=progress.update,
                             on_saved=keep_and_record(saved, recorder))
    except KeyboardInterrupt:
        progress.close()
        print_saved_paths(saved)
        raise
    finally:
        progress.close()
        recorder.close()
    for result in results:
        print(result.path)
    return 0
