"""The built-in model's speed: a batch of 4, 20 steps of DPM++ 2M (CFG 7) at native size.

    .venv/bin/python bench/bench_mini.py [--model PATH] [--dtype fp32|bf16]

huabi is timed against diffusers' own StableDiffusionPipeline driving the same
modules in the same run. The target for huabi-mini on 2 CPU cores is under 3 s
for the whole batch (prompt encoding, 20 steps, decoding 4 images).
"""

from __future__ import annotations

import argparse
import json

import torch

from harness import compare, print_report


def main() -> None:
    from huabi.service.engine import Engine

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="default: the built-in model")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    engine = Engine(device="cpu", dtype=args.dtype)
    bundle = engine.load(args.model)
    with torch.inference_mode():
        result = compare(bundle, steps=args.steps, size_px=bundle.native_size_px, batch=args.batch, rounds=args.rounds)
    result["model"] = bundle.name
    print_report(result)
    whole = result["huabi"]["total_s"] + result["huabi"]["decode_s"]
    print(f"huabi: {whole:.2f} s for the batch (target < 3 s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
