"""How faithfully a model's VAE keeps colours, per hue band, on a captioned folder.

    .venv/bin/python scripts/vae_colour.py [--model FILE | --vae FILE] [--data DIR] [--count 512] [--json OUT]
        [--picture OUT.jpg --items "red apple;green heart;..."]

Every k-th image of the folder (``--count`` in all) is encoded and decoded (latent means, fp32)
at the model's native size; printed: PSNR and, per hue band of the originals' clearly coloured
pixels, the share whose hue survives within 30 degrees and the saturation kept
(``huabi.train.vae.colour_fidelity``). Without ``--model``: the built-in huabi-mini. ``--vae`` takes a
VAE in training instead: a VAE stage's ``final.pt`` or its running ``state.pt`` (``--size``, default 128).
``--picture`` also writes the named items (first caption line, exact) above their reconstructions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def training_vae(path: Path):
    """The VAE of a VAE stage's ``final.pt`` or of its running ``state.pt`` (its last save)."""
    from huabi.errors import HuabiError
    from huabi.train.common import load_torch_file
    from huabi.train.vae import vae_from_record

    record = load_torch_file(path, what="VAE file")
    if isinstance(record, dict) and "modules" in record and "vae" in record["modules"]:
        record = {"model_config": record["config"]["model"], "state_dict": record["modules"]["vae"]}
    if not isinstance(record, dict) or "model_config" not in record or "state_dict" not in record:
        raise HuabiError(f"{path} is neither a VAE stage's final.pt nor its state.pt")
    return vae_from_record(record)


def write_picture(path: Path, folder, names: list[str], vae, size: int) -> None:
    """The items called ``names`` (in order) in a row above their reconstructions by ``vae``."""
    from PIL import Image

    from huabi.errors import HuabiError
    from huabi.eval.faithfulness import to_pixels
    from huabi.models.files import atomic_path
    from huabi.pipelines.common import to_pil
    from huabi.train.vae import reconstruct

    by_name = {}
    for index, item in enumerate(folder.items):
        by_name.setdefault(item.captions[0] if item.captions else "", index)
    missing = [name for name in names if name not in by_name]
    if missing or not names:
        raise HuabiError(f"--items: no item called {', '.join(map(repr, missing)) or 'anything'} in {folder.root}")
    pixels = to_pixels([folder.load_image(by_name[name], size) for name in names], size)
    rows = (pixels, reconstruct(vae, pixels))
    sheet = Image.new("RGB", (size * len(names), size * 2), "white")
    for row, batch in enumerate(rows):
        for column, image in enumerate(batch):
            sheet.paste(to_pil(image), (column * size, row * size))
    with atomic_path(path) as temporary:
        sheet.save(temporary, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG", quality=92)


def main() -> int:
    from huabi.data.folder import CaptionedFolder
    from huabi.errors import HuabiError
    from huabi.eval.faithfulness import to_pixels
    from huabi.models.load import load_model
    from huabi.service.engine import builtin_model_path
    from huabi.train.recipe import DEFAULT_DATA_DIR
    from huabi.train.vae import colour_fidelity, psnr, reconstruct

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the built-in huabi-mini")
    parser.add_argument("--vae", type=Path, default=None, help="a VAE stage's final.pt or state.pt instead of a model")
    parser.add_argument("--size", type=int, default=128, help="with --vae: the image size")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--count", type=int, default=512)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--picture", type=Path, default=None, help="write originals above reconstructions of --items here")
    parser.add_argument("--items", default="red apple;green heart;purple heart;evergreen tree;cat;pizza",
                        help="';'-separated item names (first caption line) for --picture")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.count < 1:
            raise HuabiError(f"--count must be >= 1, got {args.count}")
        if args.vae is not None and args.model is not None:
            raise HuabiError("give --model or --vae, not both")
        if args.vae is not None:
            vae, size = training_vae(args.vae), args.size
        else:
            model = load_model(args.model or builtin_model_path(), compute_hash=False)
            vae, size = model.vae.float(), int(model.native_size_px)
        folder = CaptionedFolder(args.data)
        step = max(1, len(folder.items) // args.count)
        picked = list(range(0, len(folder.items), step))[: args.count]
        pixels = to_pixels([folder.load_image(i, size) for i in picked], size)
        reconstruction = reconstruct(vae, pixels)
        if args.picture is not None:
            write_picture(args.picture, folder, [name.strip() for name in args.items.split(";") if name.strip()], vae, size)
    except HuabiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = {"model": str(args.vae or args.model or "huabi-mini (built-in)"), "data": str(args.data), "images": len(picked),
              "size_px": size, "psnr_db": round(psnr(pixels, reconstruction), 2), "hues": colour_fidelity(pixels, reconstruction)}
    print(f"{report['images']} images at {size} px, PSNR {report['psnr_db']} dB")
    print("| hue | coloured pixels | hue within 30 deg | saturation kept |\n|---|---:|---:|---:|")
    for name, row in report["hues"].items():
        print(f"| {name} | {row['pixels']:,} | {row['hue_kept']:.0%} | {row['saturation_kept']:.2f} |")
    if args.json is not None:
        from huabi.train.common import atomic_write_text

        atomic_write_text(args.json, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
