"""``huabi edit``: image to image, inpainting and outpainting from the command line.

    huabi edit photo.png "a watercolour painting" --strength 0.6
    huabi edit photo.png "a red hat" --mask hat.png --mask-blur 4 --inpaint-area masked
    huabi edit photo.png "a beach at sunset" --outpaint left=128,up=64
    huabi edit photo.png "make it snowy" --instruct --image-cfg-scale 1.5
    huabi edit photo.png --from edited.png          # every parameter from edited.png's infotext

Only argument parsing lives here; the work is ``Engine.edit``. This module
imports nothing heavy: the ``huabi`` parser is built on every command.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``edit`` on the ``huabi`` sub-command parser."""
    from huabi.cli.main import (  # at call time: main imports this module
        _add_model_options,
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
    _add_model_options(edit)
    from huabi.cli.flow_options import add_flow_options

    add_flow_options(edit)
    add_output_options(edit)
    return edit


def request_from_args(args: argparse.Namespace):  # -> tuple[GenerationRequest, EditOptions]
    """The request and edit options from the flags (and --from's infotext), validated before any model loads."""
    from huabi.cli.main import parse_size
    from huabi.core.infotext import EDIT_KEYS, HIRES_KEYS, edit_fields_from_infotext, request_from_infotext
    from huabi.core.request import EditOptions, GenerationRequest, parse_outpaint
    from huabi.errors import HuabiError
    from huabi.service.images import canonical_resize_mode
    from huabi.service.pngio import read_infotext

    fields = {
        name: getattr(args, name)
        for name in ("negative_prompt", "steps", "cfg_scale", "sampler", "schedule", "seed", "batch_size",
                     "batch_count", "clip_skip", "model", "vae", "refiner", "refiner_switch_at",
                     "hypernetwork", "hypernetwork_strength", "ip_adapter", "ip_image", "ip_weight", "ip_image_encoder")
        if getattr(args, name, None) is not None
    }
    if args.size is not None:
        fields["width_px"], fields["height_px"] = parse_size(args.size)
    if args.prompt is not None:
        fields["prompt"] = args.prompt
    edit_fields: dict[str, object] = {}
    if args.from_image is not None:
        text = read_infotext(args.from_image)
        request = request_from_infotext(text, **fields)
        edit_fields = edit_fields_from_infotext(text)
        # The edit keys live in EditOptions now; left in extra they would outlive a changed option.
        # A text-to-image PNG's hires fix does not apply to an edit (A1111's img2img has none).
        dropped = set(EDIT_KEYS) | set(HIRES_KEYS)
        request = request.replace(hires=False,
                                  extra=tuple((key, value) for key, value in request.extra if key not in dropped))
        outpaint = edit_fields.get("outpaint")
        if outpaint is not None and args.outpaint is None and args.size is None and request.width_px:
            # "Size" records the outpainted canvas; the working size is the image's before extension.
            left, right, up, down = outpaint
            request = request.replace(width_px=request.width_px - left - right,
                                      height_px=request.height_px - up - down)
    elif args.prompt is None:
        raise HuabiError("prompt: give a prompt, or --from PNG to reuse an edited image's parameters")
    else:
        request = GenerationRequest(**fields)
    overrides = {
        "denoising_strength": args.strength,
        "resize_mode": canonical_resize_mode(args.resize_mode) if args.resize_mode is not None else None,
        "mask_blur_px": args.mask_blur,
        "masked_content": args.masked_content,
        "inpaint_area": args.inpaint_area,
        "padding_px": args.padding,
        "invert_mask": args.invert_mask,
        "outpaint": parse_outpaint(args.outpaint) if args.outpaint is not None else None,
        "instruct": args.instruct,
        "image_cfg_scale": args.image_cfg_scale,
    }
    edit_fields.update({name: value for name, value in overrides.items() if value is not None})
    if args.image_cfg_scale is not None:
        edit_fields["instruct"] = True  # an image scale on its own means an instruct edit
    if "denoising_strength" not in edit_fields:
        # InstructPix2Pix starts from pure noise (strength 1); plain img2img keeps A1111's 0.75.
        edit_fields["denoising_strength"] = 1.0 if edit_fields.get("instruct") else 0.75
    options = EditOptions(
        init_image=str(args.image),
        mask_image=str(args.mask) if args.mask is not None else None,
        **edit_fields,
    )
    from huabi.cli.control import apply_control_args

    request = apply_control_args(request, args)
    return request, options


def cmd_edit(args: argparse.Namespace) -> int:
    from huabi.cli.flow_options import text_encoder_files, with_flow_extras
    from huabi.cli.main import _ProgressBar
    from huabi.service.engine import Engine

    from huabi.cli.main import print_saved_paths
    from huabi.service.outputs import check_output_folder

    check_output_folder(args.out)  # fail before any model loads, not after the run
    request, options = request_from_args(args)
    engine = Engine(device=args.device, dtype=args.dtype, models_dir=args.models_dir, base_model=getattr(args, "base", None),
                    gguf_on_the_fly=getattr(args, "gguf_on_the_fly", False), backend=getattr(args, "backend", "torch"),
                    vae_decoder=getattr(args, "vae_decoder", "full"), vae_tiling=getattr(args, "vae_tiling", False),
                    text_encoder_files=text_encoder_files(args))
    request = with_flow_extras(request, args)
    progress = _ProgressBar(enabled=not args.quiet)
    saved: list = []
    try:
        results = engine.edit(request, options, out_dir=args.out, on_progress=progress.update, on_saved=saved.append)
    except KeyboardInterrupt:
        progress.close()
        print_saved_paths(saved)
        raise
    finally:
        progress.close()
    for result in results:
        print(result.path)
    return 0
