"""Make the demo LoRA shipped as ``src/huabi/assets/loras/demo.safetensors``.

    PYTHONPATH=src .venv/bin/python scripts/make_demo_lora.py [--out src/huabi/assets/loras/demo.safetensors]

The README's LoRA examples (``<lora:demo:0.8>``, ``huabi merge-lora huabi-mini demo:0.8``) need a
LoRA every user has, so huabi ships a small real one, a *cyanotype* style, made here entirely
with huabi's own tools and offline:

1. ``huabi generate`` draws 16 pictures with the built-in huabi-mini (16 everyday prompts, seeds
   1-16, DPM++ 2M, 20 steps);
2. each is turned into a cyanotype (grey levels mapped from Prussian blue to paper white) and
   captioned with its own prompt, in kohya's folder layout (``4_cyanotype/``, ``.txt`` captions);
3. ``huabi train lora`` trains on them: rank 4, alpha 4, UNet and text encoder, 300 steps at
   128 px, batch 4, lr 3e-3, seed 7, saved in fp16 (~0.4 MB).

Since the captions are the plain prompts, the LoRA learns "the same picture, as a cyanotype": with
``<lora:demo:0.8>`` most subjects turn blue and white (an apple, a house, a cat; huabi-mini's faces
resist it), with their shapes loosened. Deterministic on one
machine (one thread); another CPU may differ in the last bits, which changes the file's hash but
not what it does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "src" / "huabi" / "assets" / "loras" / "demo.safetensors"
PROMPTS = ("a red apple", "a cat", "a house", "a tree", "a smiling face", "a rocket", "a blue car", "a yellow star",
           "a green heart", "a dog", "a flower", "a fish", "a sun", "a bird", "a cake", "a guitar")
PAPER, PRUSSIAN_BLUE = (246, 244, 236), (16, 48, 110)


def cyanotype(image: Image.Image) -> Image.Image:
    return ImageOps.colorize(ImageOps.autocontrast(ImageOps.grayscale(image)), black=PRUSSIAN_BLUE, white=PAPER)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)

    from huabi.cli.main import main as huabi

    with tempfile.TemporaryDirectory(prefix="huabi-demo-lora-") as work:
        pictures, data = Path(work) / "pictures", Path(work) / "data" / "4_cyanotype"
        data.mkdir(parents=True)
        for seed, prompt in enumerate(PROMPTS, start=1):
            if huabi(["generate", prompt, "--seed", str(seed), "--steps", "20", "--dtype", "fp32",
                      "--out", str(pictures), "--quiet"]) != 0:
                return 1
            made = next(pictures.glob(f"*-{seed}.png"))
            cyanotype(Image.open(made).convert("RGB")).save(data / f"{seed:02d}.png")
            (data / f"{seed:02d}.txt").write_text(prompt, encoding="utf-8")
        made = Path(work) / "demo.safetensors"
        code = huabi([
            "train", "lora", str(data.parent), "--output", str(made), "--caption-extension", ".txt",
            "--max-train-steps", str(args.steps), "--network-dim", "4", "--network-alpha", "4",
            "--resolution", "128", "--min-bucket-reso", "64", "--learning-rate", "3e-3",
            "--train-batch-size", "4", "--seed", "7", "--save-precision", "fp16", "--threads", "1",
            "--training-comment", "huabi demo LoRA (cyanotype style): scripts/make_demo_lora.py",
        ])
        if code == 0:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            partial = args.out.with_name(args.out.name + ".partial")
            shutil.copyfile(made, partial)
            os.replace(partial, args.out)
            print(args.out)
    return code


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
