"""CLI flags for the SD3/SD3.5 and FLUX.1 families (separate text encoder files, FLUX guidance, shift)."""

from __future__ import annotations

import argparse
from pathlib import Path

from huabi.errors import HuabiError


def add_flow_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SD3 / FLUX")
    group.add_argument("--clip-l", type=Path, metavar="FILE",
                       help="CLIP-L text encoder file for a FLUX/SD3 transformer file (default: clip_l*.safetensors "
                            "in the models folder's text_encoders/ or clip/)")
    group.add_argument("--clip-g", type=Path, metavar="FILE", help="CLIP-G text encoder file for an SD3/SD3.5 transformer file")
    group.add_argument("--t5xxl", type=Path, metavar="FILE",
                       help="T5-XXL text encoder file (t5xxl_fp16 or t5xxl_fp8_e4m3fn); required by FLUX, optional for SD3")
    group.add_argument("--distilled-cfg", type=float, metavar="G",
                       help="FLUX dev's distilled guidance (Forge's 'Distilled CFG Scale', default 3.5)")
    group.add_argument("--shift", type=float, metavar="S",
                       help="flow-matching schedule shift (default: SD3 3.0, FLUX dev by image size, schnell 1.0)")


def text_encoder_files(args: argparse.Namespace) -> dict[str, Path]:
    return {name: getattr(args, name) for name in ("clip_l", "clip_g", "t5xxl") if getattr(args, name, None)}


