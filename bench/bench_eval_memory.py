"""Peak memory of the whole ``huabi eval fid REAL GEN`` command as the folders grow (flat-memory check).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_eval_memory.py [--counts 1000,10000] [--size 32] [--features PATH]

Writes ``max(counts)`` synthetic PNGs for each side (coloured shapes on a coloured ground,
seeded; REAL and GEN differ) to a temporary folder. For every count N, a folder pair holding the
first N images of each side (symbolic links, so nothing is copied) is measured by running the
real command line, ``huabi eval fid REAL GEN --no-cache --quiet --json FILE``, in a fresh child
process; the child's peak RSS comes from ``wait4`` (``ru_maxrss``), so it counts everything the
command does: loading the extractor, reading and decoding the files, features, statistics.

Bounded memory means the peak grows only by what must be kept: the float32 feature rows
(2 x N x dim x 4 bytes) and the list of paths. The report prints the peak per count, the slope
in MB per 1,000 images (least squares over the counts) and that unavoidable growth for comparison.
On a shared machine the RSS figures are stable, the times are not (they are printed for scale).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import write_images  # noqa: E402  (synthetic shapes; seed picks the set)

CLI = "import sys; from huabi.cli.main import main; sys.exit(main())"


def linked_subset(source: Path, target: Path, count: int) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in sorted(os.listdir(source))[:count]:
        (target / name).symlink_to(source / name)
    return target


def measure(real: Path, gen: Path, json_path: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-c", CLI, "eval", "fid", str(real), str(gen), "--no-cache", "--quiet", "--json", str(json_path),
               "--device", "cpu", "--batch-size", str(args.batch_size)]
    if args.features:
        command += ["--features", args.features]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _pid, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    stdout, stderr = child.stdout.read(), child.stderr.read()
    child.stdout.close()
    child.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"huabi eval fid failed:\n{stderr}")
    result = json.loads(json_path.read_text(encoding="utf-8"))
    return {"images_per_side": len(os.listdir(real)), "peak_rss_mb": usage.ru_maxrss / 1024, "seconds": seconds,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "fid": result["value"], "feature_dim": result.get("details", {}).get("feature_dim"), "last_line": stdout.strip().splitlines()[-1]}


def slope(points: list[tuple[float, float]]) -> float:
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1000,10000", help="images per side, comma-separated")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (small: the extractor resizes)")
    parser.add_argument("--features", default=None, help="extractor weights (default: huabi-mini towers)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    counts = sorted(int(c) for c in args.counts.split(","))
    if len(counts) < 2 or counts[0] < 2:
        raise SystemExit("--counts needs at least two counts >= 2")
    rows = []
    with tempfile.TemporaryDirectory(prefix="huabi-bench-eval-memory-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        write_images(root / "pool_real", counts[-1], args.size, seed=0)
        write_images(root / "pool_gen", counts[-1], args.size, seed=1)
        print(f"wrote 2 x {counts[-1]} synthetic {args.size}px PNGs in {time.perf_counter() - started:.1f} s", flush=True)
        for count in counts:
            real = linked_subset(root / "pool_real", root / f"real_{count}", count)
            gen = linked_subset(root / "pool_gen", root / f"gen_{count}", count)
            row = measure(real, gen, root / f"fid_{count}.json", args)
            rows.append(row)
            print(f"{count:6d} images per side: peak RSS {row['peak_rss_mb']:7.1f} MB  {row['seconds']:7.1f} s wall  {row['cpu_seconds']:7.1f} s CPU  "
                  f"FID {row['fid']:.4f}", flush=True)
    per_thousand = 1000 * slope([(r["images_per_side"], r["peak_rss_mb"]) for r in rows])
    dim = rows[-1]["feature_dim"] or 0
    needed = 2 * 1000 * dim * 4 / 2**20
    print(f"slope: {per_thousand:.2f} MB per 1,000 images per side (feature rows alone: {needed:.2f} MB per 1,000 at dim {dim}); "
          f"{counts[0]} -> {counts[-1]}: {rows[0]['peak_rss_mb']:.1f} -> {rows[-1]['peak_rss_mb']:.1f} MB")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "slope_mb_per_1000": per_thousand, "feature_rows_mb_per_1000": needed},
                                        indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
