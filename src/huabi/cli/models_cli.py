"""Model-file commands: ``huabi convert``, ``huabi inspect``, ``huabi merge``, ``huabi quantize``.

Arguments in, one call into ``huabi.models`` out, a short report printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from huabi.errors import HuabiError


def add_parsers(commands) -> None:
    convert = commands.add_parser("convert", help="convert a checkpoint: .ckpt <-> .safetensors <-> diffusers folder, dtype, pruning")
    convert.add_argument("src", type=Path, help="checkpoint file (.safetensors/.ckpt/.pt), diffusers folder, or GGUF UNet with --base")
    convert.add_argument("--out", type=Path, required=True,
                         help="output: NAME.safetensors, NAME.ckpt, or a folder name without extension (diffusers)")
    convert.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="cast floating weights (default: keep)")
    convert.add_argument("--prune", action="store_true",
                         help="keep only inference weights (drops model_ema.*, optimizer and other training state)")
    convert.add_argument("--use-ema", action="store_true", help="replace the UNet weights with the file's EMA weights")
    convert.add_argument("--base", type=Path, metavar="CHECKPOINT",
                         help="for a GGUF UNet source: the checkpoint whose text encoders and VAE complete it")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output")

    inspect = commands.add_parser("inspect", help="describe a model file: family, dtype, size, hashes, metadata")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.add_argument("--full", action="store_true", help="do not shorten long metadata values")
    inspect.add_argument("--no-hash", action="store_true", help="skip hashing (fast on big files)")

    merge = commands.add_parser("merge", help="merge checkpoints: weighted sum, add difference, per-block weights")
    merge.add_argument("models", nargs="+", type=Path, metavar="MODEL", help="A B (weighted sum) or A B C (add difference)")
    merge.add_argument("--mode", default="weighted-sum", choices=("weighted-sum", "add-difference"))
    merge.add_argument("--alpha", "-M", type=float, default=0.5, metavar="M",
                       help="multiplier M: A*(1-M)+B*M or A+(B-C)*M (default 0.5); BASE weight with --mbw")
    merge.add_argument("--mbw", metavar="W,W,...",
                       help="per-block UNet weights IN00..,M00,OUT.. (25 for SD1/SD2, 19 for SDXL; one more = BASE first)")
    merge.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="output dtype (default: A's)")
    merge.add_argument("--out", type=Path, required=True, help="output .safetensors")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output")

    quantize = commands.add_parser("quantize", help="write a checkpoint's UNet (SD1/SDXL) or transformer (SD3/FLUX) "
                                                  "as a GGUF file (ComfyUI-GGUF layout)")
    quantize.add_argument("src", type=Path, help="checkpoint file or diffusers folder")
    quantize.add_argument("--type", dest="qtype", default="Q8_0", metavar="TYPE",
                          help="Q8_0 (default), Q5_1, Q5_0, Q4_1, Q4_0, F16, BF16, F32")
    quantize.add_argument("--out", type=Path, required=True, help="output .gguf")
    quantize.add_argument("--overwrite", action="store_true", help="replace an existing output")


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def cmd_convert(args: argparse.Namespace) -> int:
    from huabi.models.convert_file import ConvertOptions, convert_checkpoint

    options = ConvertOptions(dtype=args.dtype, prune=args.prune, use_ema=args.use_ema, base=args.base)
    result = convert_checkpoint(args.src, args.out, options, overwrite=args.overwrite)
    dropped = f", {result.dropped} pruned" if result.dropped else ""
    what = "diffusers folder" if result.path.is_dir() else f"{result.tensors_out} tensors{dropped}"
    print(f"{result.path}\t{what}\t{_mib(_size(args.src))} -> {_mib(_size(result.path))}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from huabi.models.inspect import format_inspection, inspect_file

    info = inspect_file(args.file, with_hashes=not args.no_hash)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False, default=str))
    else:
        print(format_inspection(info, full=args.full))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from huabi.models.merge import MergeSpec, merge_checkpoints, parse_block_weights

    blocks = parse_block_weights(args.mbw) if args.mbw else None
    spec = MergeSpec(mode=args.mode, alpha=args.alpha, block_weights=blocks, dtype=args.dtype)
    path, metadata = merge_checkpoints(args.models, spec, args.out, overwrite=args.overwrite)
    recipe = json.loads(metadata["sd_merge_recipe"])
    print(f"{path}\t{recipe['interp_method']}, M={recipe['multiplier']}" + (", per-block weights" if blocks else ""))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from huabi.models.formats import read_state_dict
    from huabi.models.gguf_io import write_gguf_unet

    if not args.src.exists():
        raise HuabiError(f"quantize: {args.src}: no such file or folder")
    if args.out.exists() and not args.overwrite:
        raise HuabiError(f"quantize: {args.out} already exists (pass --overwrite to replace it)")
    if args.src.suffix.lower() == ".gguf":
        raise HuabiError(f"quantize: {args.src.name} is already GGUF; quantize from the original checkpoint")
    from huabi.models.flow_load import is_flow_model

    if is_flow_model(args.src):  # SD3/FLUX: the transformer alone, as ComfyUI-GGUF's flux/sd3 files
        from huabi.models.flow_quantize import quantize_flow_transformer

        counts, family = quantize_flow_transformer(args.src, args.out, args.qtype)
        summary = ", ".join(f"{name}: {count}" for name, count in sorted(counts.items()))
        print(f"{args.out}\t{family.label} transformer\t{summary}\t{_mib(_size(args.out))}")
        return 0
    tensors, _ = read_state_dict(args.src)
    counts = write_gguf_unet(tensors, args.out, args.qtype, source=args.src.name,
                             extra_metadata={"general.name": args.src.stem})
    summary = ", ".join(f"{name}: {count}" for name, count in sorted(counts.items()))
    print(f"{args.out}\t{summary}\t{_mib(_size(args.out))}")
    return 0


COMMANDS = {"convert": cmd_convert, "inspect": cmd_inspect, "merge": cmd_merge, "quantize": cmd_quantize}
