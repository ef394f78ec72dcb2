"""Feature cache speed-up and bounded memory of ``huabi.eval`` on synthetic image folders.

    .venv/bin/python bench/bench_eval.py [--count 10000] [--small 1000] [--size 64] [--features PATH]

Writes ``count`` synthetic PNGs (coloured shapes) to a temporary folder, then runs feature
extraction (the part of ``huabi eval fid`` that reads images) in fresh child processes:

1. cold, ``small`` images   -- peak RSS with few images;
2. cold, ``count`` images   -- peak RSS with many: bounded memory means this stays close to (1)
                               (only the float32 feature rows, count x dim x 4 bytes, grow);
3. warm, ``count`` images   -- the same folder again: features come from the cache.

Reports wall times, the speed-up of (3) over (2) (target >= 5x), and peak RSS of each.
Timings are ratios measured in the same run; on a shared machine absolute times vary.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_images(folder: Path, count: int, size_px: int, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        image = Image.new("RGB", (size_px, size_px), tuple(int(c) for c in rng.integers(120, 256, 3)))
        draw = ImageDraw.Draw(image)
        x, y, extent = (int(v) for v in rng.integers(2, size_px // 2, 3))
        (draw.ellipse if i % 2 else draw.rectangle)((x, y, x + extent, y + extent), fill=tuple(int(c) for c in rng.integers(0, 200, 3)))
        image.save(folder / f"{i:05d}.png")


def child(args: argparse.Namespace) -> None:
    """One measured extraction in this (fresh) process; prints a JSON line."""
    import torch

    from huabi.eval.api import EvalOptions, Session
    from huabi.eval.folders import list_images

    torch.set_num_threads(args.threads)
    options = EvalOptions(features=args.features, device=args.device, batch_size=args.batch_size, cache_dir=Path(args.cache_dir))
    with Session(options) as session:  # the extractor loads before the clock starts
        paths = list_images(args.folder)[: args.take]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        vectors = session.vectors(paths, "bench")
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"images": len(paths), "seconds": seconds, "peak_rss_mb": peak / 1024, "rss_before_mb": before / 1024,
                      "features_mb": vectors.nbytes / 2**20, "dim": int(vectors.shape[1])}))


def run_child(args: argparse.Namespace, folder: Path, cache: Path, take: int) -> dict:
    command = [sys.executable, __file__, "--child", "--folder", str(folder), "--cache-dir", str(cache), "--take", str(take),
               "--device", args.device, "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    if args.features:
        command += ["--features", args.features]
    output = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--features", default=None, help="extractor weights (default: huabi-mini towers)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--take", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="huabi-bench-eval-") as tmp:
        folder, cache = Path(tmp) / "images", Path(tmp) / "cache"
        start = time.perf_counter()
        write_images(folder, args.count, args.size)
        print(f"wrote {args.count} synthetic {args.size}px PNGs in {time.perf_counter() - start:.1f} s")
        small = run_child(args, folder, Path(tmp) / "cache-small", args.small)
        cold = run_child(args, folder, cache, args.count)
        warm = run_child(args, folder, cache, args.count)
    for label, row in (("cold, small", small), ("cold, all", cold), ("warm (cached), all", warm)):
        print(f"{label:>20}: {row['images']:6d} images  {row['seconds']:8.2f} s  {row['images'] / row['seconds']:8.1f} img/s  "
              f"peak RSS {row['peak_rss_mb']:7.1f} MB (before extraction {row['rss_before_mb']:.1f} MB; features {row['features_mb']:.1f} MB)")
    print(f"cache speed-up (cold / warm, {args.count} images): {cold['seconds'] / warm['seconds']:.1f}x  (target >= 5x)")
    growth_small = small["peak_rss_mb"] - small["rss_before_mb"]
    growth_all = cold["peak_rss_mb"] - cold["rss_before_mb"]
    print(f"peak RSS growth during extraction: {growth_small:.1f} MB for {small['images']} images, {growth_all:.1f} MB for "
          f"{cold['images']} images ({cold['images'] / small['images']:.0f}x the images; feature rows alone grow by "
          f"{cold['features_mb'] - small['features_mb']:.1f} MB)")


if __name__ == "__main__":
    main()
