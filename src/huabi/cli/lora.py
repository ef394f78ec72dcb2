"""LoRA on the command line: the ``--lora NAME[:W]`` flag and ``huabi merge-lora``.

    huabi generate "a castle <lora:watercolor:0.8>"          # a tag in the prompt
    huabi generate "a castle" --lora watercolor:0.8          # the same, as a flag
    huabi merge-lora base.safetensors watercolor:0.8 ink:0.3 --out merged.safetensors

A ``--lora`` flag is appended to the prompt as the tag it stands for, so the
infotext records it like a tag and ``generate --from`` redoes the image.
Only argument parsing lives here; nothing heavy is imported at parse time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from huabi.service.requests import lora_tag, prompt_with_loras, split_lora_spec  # noqa: F401 -- also here, as before


def add_lora_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lora", dest="loras", action="append", default=[], metavar="NAME[:W]",
                        help="apply a LoRA/LyCORIS (name in MODELS/Lora or MODELS/LyCORIS, or a path) with "
                             "weight W (default 1; NAME:TE:UNET for separate text-encoder/UNet weights); "
                             "repeatable; same as <lora:NAME:W> in the prompt")


# --------------------------------------------------------------------------- merge-lora


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    merge = commands.add_parser("merge-lora", help="bake LoRAs into a checkpoint (original single-file layout)")
    merge.add_argument("base", help="base checkpoint: path, or a name/hash in the models folder")
    merge.add_argument("loras", nargs="+", metavar="LORA[:W]",
                       help="LoRA/LyCORIS file or name (MODELS/Lora, MODELS/LyCORIS) with weight W (default 1; "
                            "LORA:TE:UNET for separate weights)")
    merge.add_argument("--out", type=Path, required=True, help="output .safetensors (never one of the inputs)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    merge.add_argument("--dtype", default="auto", help="auto (the base file's), fp32, fp16, bf16")
    merge.add_argument("--models-dir", type=Path, help="models folder (default: $HUABI_MODELS_DIR or ~/huabi/models)")
    return merge


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from huabi.service.adapters import merge_loras

    specs = [split_lora_spec(spec, "merge-lora") for spec in args.loras]
    path = merge_loras(args.base, specs, args.out, dtype=args.dtype, models_dir=args.models_dir,
                       overwrite=args.overwrite)
    print(path)
    return 0
