"""Make the README's editing figure with the built-in model, through the real CLI.

    .venv/bin/python scripts/docs_edit_images.py [--out docs/images/editing-huabi-mini.png] [--dtype fp32]

Runs the same ``huabi generate`` / ``huabi edit`` / ``huabi upscale`` commands a user
would (printed as they run), then lays the results out side by side, each labelled
with its command. Nothing is retouched: panels are only enlarged (nearest neighbour)
to a common height so the pixels stay visible. Every command runs with ``--dtype fp32`` by
default: ``auto`` picks bf16 on CPUs with native bf16, and the figure should not depend on the CPU
that drew it (the thread count still can change the last bits: OMP_NUM_THREADS=1 for the README's).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from huabi.service.xyz import draw_xyz_grid

PANEL_HEIGHT = 256
LABEL_PX = 18  # one size for every panel (by default it grows with the cell's width)


def run_huabi(args: list[str], workdir: Path, dtype: str | None) -> Path:
    """Run one huabi command (with ``--dtype`` when given); return the image it printed as its last line."""
    args = [*args, "--dtype", dtype] if dtype else args
    command = [str(Path(sys.executable).parent / "huabi"), *args, "--quiet"]
    print("$ huabi " + shlex.join(args), flush=True)
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"huabi {args[0]} failed: {done.stderr.strip()}")
    return workdir / done.stdout.strip().splitlines()[-1]


def centre_mask(size: tuple[int, int], box_px: int) -> Image.Image:
    mask = Image.new("L", size, 0)
    w, h = size
    left, top = (w - box_px) // 2, (h - box_px) // 2
    ImageDraw.Draw(mask).rectangle((left, top, left + box_px - 1, top + box_px - 1), fill=255)
    return mask


def panel(image: Image.Image, label: str) -> Image.Image:
    """The image enlarged to PANEL_HEIGHT, labelled as the xyz grids are (wrapped to its width)."""
    scale = PANEL_HEIGHT / image.height
    shown = image.convert("RGB").resize((round(image.width * scale), PANEL_HEIGHT), Image.NEAREST)
    return draw_xyz_grid([[shown]], [label], [""], font_px=LABEL_PX)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images/editing-huabi-mini.png"))
    parser.add_argument("--prompt", default="a red apple")
    parser.add_argument("--edit-prompt", default="a green apple", help="the img2img prompt")
    parser.add_argument("--inpaint-prompt", default="a smiling face")
    parser.add_argument("--hires-denoise", default="0.35", help="low: at 256 px huabi-mini is outside the 128 px it was trained at")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--dtype", default="fp32", help="passed to every command (default fp32: the same figure on any CPU)")
    args = parser.parse_args()
    seed = str(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = run_huabi(["generate", args.prompt, "--seed", seed, "--out", "base"], work, args.dtype)
        base_image = Image.open(base)
        mask = centre_mask(base_image.size, base_image.width // 2)
        mask.save(work / "mask.png")
        results = [
            (base_image, f'generate "{args.prompt}"'),
            (run_huabi(["edit", str(base), args.edit_prompt, "--strength", "0.6", "--seed", seed, "--out", "img2img"], work, args.dtype),
             f'edit "{args.edit_prompt}" --strength 0.6'),
            (Image.composite(Image.new("RGB", base_image.size, "white"), base_image.convert("RGB"), mask),
             "mask (white = repaint)"),
            (run_huabi(["edit", str(base), args.inpaint_prompt, "--mask", "mask.png", "--seed", seed, "--out", "inpaint"], work, args.dtype),
             f'edit "{args.inpaint_prompt}" --mask (inpainting)'),
            (run_huabi(["edit", str(base), args.prompt, "--outpaint", "left=64,right=64", "--seed", seed, "--out", "outpaint"], work, args.dtype),
             "edit --outpaint left=64,right=64"),
            (run_huabi(["generate", args.prompt, "--seed", seed, "--hires", "--hires-scale", "2", "--hires-denoise", args.hires_denoise, "--out", "hires"], work, args.dtype),
             f"generate --hires --hires-scale 2 --hires-denoise {args.hires_denoise} (256 px)"),
            (run_huabi(["upscale", str(base), "--scale", "2", "--out", "upscaled"], work, None),
             "upscale --scale 2 (Lanczos, 256 px)"),
        ]
        panels = [panel(Image.open(item) if isinstance(item, Path) else item, label) for item, label in results]
        gap = 8
        height = max(p.height for p in panels)
        sheet = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), height), "white")
        x = 0
        for p in panels:
            sheet.paste(p, (x, height - p.height))
            x += p.width + gap
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = args.out.with_name("." + args.out.name + ".tmp.png")
        sheet.save(tmp_out)
        tmp_out.replace(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
