"""torch.compile (inductor) on the CPU vs eager bf16, for the SD1.5 UNet, in one process.

Issue 20 asks whether ``torch.compile`` makes a CFG step faster on the CPU. This script
builds the full-size SD1.5 UNet architecture (random weights, seeded), and times one
UNet call at the shape a CFG step runs (batch 2, 64x64 latents for 512x512, 77 tokens)
in each variant, all in the same process so only ratios are compared:

- ``eager-bf16``: what ``--dtype auto`` runs today on a bf16 CPU (bf16 weights,
  channels_last). The reference.
- ``compile-bf16``: ``torch.compile`` of the same module (inductor, static shapes).
- ``compile-bf16-freeze``: the same with ``torch._inductor.config.freezing = True``
  (weights become constants: folded, prepacked for oneDNN).
- ``compile-autocast-freeze``: fp32 weights under ``torch.autocast("cpu", bf16)``,
  frozen (the casts fold into the constants).
- ``eager-fp32`` (optional, ``--fp32``): the fp32 reference of the issue.

For each: the first call's seconds (compile + one run; inductor's on-disk cache is a
fresh temporary folder unless ``--cache-dir`` is given, so this is the cold cost),
seconds per call after warm-up (median of ``--steps``), the ratio against eager bf16,
and the max / mean absolute difference of the output from eager bf16 on the same
inputs (and from eager fp32 with ``--fp32``). Peak RSS is sampled during each variant.

    .venv/bin/python bench/bench_compile.py --steps 3 [--variants eager-bf16,compile-bf16-freeze]
    .venv/bin/python bench/bench_compile.py --scale mid --steps 2     # quicker, smaller widths
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from harness import PeakRSS

VARIANTS = ("eager-bf16", "compile-bf16", "compile-bf16-freeze", "compile-autocast-freeze")


def build_unet(scale: str) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    from huabi.models.configs import reference_configs
    from huabi.models.family import ModelFamily

    config = reference_configs(ModelFamily.SD1)["unet"]
    if scale == "mid":  # half the widths: ~1/4 of the parameters, same depth and attention layout
        config["block_out_channels"] = [160, 320, 640, 640]
    elif scale == "tiny":
        config.update(block_out_channels=[32, 64, 64, 64], layers_per_block=1, attention_head_dim=2,
                      cross_attention_dim=32)
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(config).eval().requires_grad_(False)


def inputs_for(unet: torch.nn.Module, batch: int, latent: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, int(unet.config.in_channels), latent, latent, generator=generator)
    timestep = torch.full((batch,), 500.0)
    context = torch.randn(batch, 77, int(unet.config.cross_attention_dim), generator=generator)
    return sample, timestep, context


@contextlib.contextmanager
def inductor_settings(freezing: bool):
    import torch._inductor.config as inductor_config

    previous = inductor_config.freezing
    inductor_config.freezing = freezing
    try:
        yield
    finally:
        inductor_config.freezing = previous


def run_variant(name: str, fp32_unet: torch.nn.Module, inputs, *, steps: int) -> dict:
    """Build the variant's module from the fp32 UNet, call it ``steps + 2`` times, time it."""
    compiled = name.startswith("compile")
    autocast = "autocast" in name
    dtype = torch.float32 if (autocast or name == "eager-fp32") else torch.bfloat16
    module = copy.deepcopy(fp32_unet).to(dtype).to(memory_format=torch.channels_last)
    sample, timestep, context = inputs
    sample = sample.to(dtype).contiguous(memory_format=torch.channels_last)
    context = context.to(dtype)

    def call(unet):
        with torch.inference_mode(), (torch.autocast("cpu", dtype=torch.bfloat16) if autocast
                                      else contextlib.nullcontext()):
            return unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]

    runner = module
    times: list[float] = []
    with PeakRSS() as peak, inductor_settings("freeze" in name):
        if compiled:
            torch._dynamo.reset()
            runner = torch.compile(module, dynamic=False)
        start = time.perf_counter()
        out = call(runner)
        first_s = time.perf_counter() - start
        call(runner)  # warm-up: oneDNN primitive caches, allocator
        for _ in range(steps):
            start = time.perf_counter()
            out = call(runner)
            times.append(time.perf_counter() - start)
    result = {"variant": name, "first_call_s": first_s, "step_times_s": times,
              "s_per_step": statistics.median(times), "peak_gib": peak.peak_bytes / 2**30,
              "output": out.float().clone()}
    print(f"{name}: first call {first_s:.1f} s, steps {', '.join(f'{t:.2f}' for t in times)} s, "
          f"peak {result['peak_gib']:.2f} GiB", flush=True)
    del runner, module, out
    torch._dynamo.reset()
    gc.collect()
    return result


def interleaved(names: list[str], fp32_unet: torch.nn.Module, inputs, *, rounds: int) -> list[dict]:
    """Build every variant first (compiling what compiles), then time one call of each in turn,
    ``rounds`` times: a shared machine's changing load then hits every variant alike."""
    sample, timestep, context = inputs
    prepared = []
    for name in names:
        autocast = "autocast" in name
        dtype = torch.float32 if (autocast or name == "eager-fp32") else torch.bfloat16
        module = copy.deepcopy(fp32_unet).to(dtype).to(memory_format=torch.channels_last)
        x = sample.to(dtype).contiguous(memory_format=torch.channels_last)
        c = context.to(dtype)

        def call(unet=module, x=x, c=c, autocast=autocast, freeze="freeze" in name):
            with torch.inference_mode(), inductor_settings(freeze), (
                    torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()):
                return unet(x, timestep, encoder_hidden_states=c, return_dict=False)[0]

        runner = torch.compile(module, dynamic=False) if name.startswith("compile") else module
        start = time.perf_counter()
        out = call(runner)
        first_s = time.perf_counter() - start
        call(runner)  # warm-up
        print(f"{name}: first call {first_s:.1f} s", flush=True)
        prepared.append({"variant": name, "call": (lambda r=runner, f=call: f(r)), "first_call_s": first_s,
                         "step_times_s": [], "output": out.float().clone(), "peak_gib": float("nan")})
    for round_index in range(rounds):
        for entry in prepared:
            start = time.perf_counter()
            entry["call"]()
            entry["step_times_s"].append(time.perf_counter() - start)
        print(f"round {round_index + 1}: " + ", ".join(f"{e['variant']} {e['step_times_s'][-1]:.2f} s" for e in prepared)
              + f" (load average {os.getloadavg()[0]:.2f})", flush=True)
    for entry in prepared:
        entry.pop("call")
        entry["s_per_step"] = statistics.median(entry["step_times_s"])
    return prepared


def main() -> None:
    from huabi.service.device_choice import read_cpu_info

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=["full", "mid", "tiny"], default="full")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--batch", type=int, default=2, help="2 = one CFG step")
    parser.add_argument("--steps", type=int, default=3, help="timed calls per variant, after two untimed ones")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)}, eager-fp32")
    parser.add_argument("--fp32", action="store_true", help="also eager fp32 (reference for the differences)")
    parser.add_argument("--cache-dir", help="inductor's on-disk cache (default: a fresh temporary folder)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--interleave", action="store_true",
                        help="build all variants, then time them call by call in turn (fair under a changing load; "
                             "no per-variant peak RSS)")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "eager-bf16" not in variants:
        variants.insert(0, "eager-bf16")  # the reference every ratio is taken against
    if args.fp32 and "eager-fp32" not in variants:
        variants.insert(0, "eager-fp32")
    unknown = set(variants) - set(VARIANTS) - {"eager-fp32"}
    if unknown:
        sys.exit(f"bench_compile: unknown variants {sorted(unknown)}")
    cache = args.cache_dir or tempfile.mkdtemp(prefix="huabi-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # read when inductor first compiles

    cpu = read_cpu_info()
    print(f"CPU: {cpu.model_name}; flags: {' '.join(cpu.relevant_flags)}; {torch.get_num_threads()} threads; "
          f"torch {torch.__version__}; load average {os.getloadavg()[0]:.2f}", flush=True)
    start = time.perf_counter()
    unet = build_unet(args.scale)
    params = sum(p.numel() for p in unet.parameters())
    print(f"built SD1.5 UNet ({args.scale}: {params / 1e6:.0f}M parameters) in {time.perf_counter() - start:.1f} s; "
          f"batch {args.batch}, {args.size}x{args.size} ({args.size // 8}x{args.size // 8} latents)", flush=True)
    inputs = inputs_for(unet, args.batch, args.size // 8)

    if args.interleave:
        results = interleaved(variants, unet, inputs, rounds=args.steps)
    else:
        results = [run_variant(name, unet, inputs, steps=args.steps) for name in variants]
    reference = next(r for r in results if r["variant"] == "eager-bf16")
    fp32 = next((r for r in results if r["variant"] == "eager-fp32"), None)
    print()
    print(f"{'variant':26} {'first call s':>12} {'s/step':>8} {'vs eager bf16':>13} {'peak GiB':>9} "
          f"{'max|d| bf16':>11} {'mean|d| bf16':>12}" + (f" {'max|d| fp32':>11}" if fp32 else ""))
    for r in results:
        diff = (r["output"] - reference["output"]).abs()
        r.update(speedup_vs_eager_bf16=reference["s_per_step"] / r["s_per_step"], max_abs_diff_vs_eager_bf16=float(diff.max()),
                 mean_abs_diff_vs_eager_bf16=float(diff.mean()))
        line = (f"{r['variant']:26} {r['first_call_s']:12.1f} {r['s_per_step']:8.2f} {r['speedup_vs_eager_bf16']:12.2f}x "
                f"{r['peak_gib']:9.2f} {r['max_abs_diff_vs_eager_bf16']:11.4f} {r['mean_abs_diff_vs_eager_bf16']:12.5f}")
        if fp32 is not None:
            r["max_abs_diff_vs_eager_fp32"] = float((r["output"] - fp32["output"]).abs().max())
            line += f" {r['max_abs_diff_vs_eager_fp32']:11.4f}"
        print(line)
    print(f"output scale: std of eager bf16 output {float(reference['output'].std()):.4f}; "
          f"load average now {os.getloadavg()[0]:.2f}")
    if args.json:
        header = {"cpu": cpu.model_name, "flags": list(cpu.relevant_flags), "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "scale": args.scale, "parameters": params, "batch": args.batch,
                  "size_px": args.size, "load_average_end": os.getloadavg()[0]}
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({**header, "results": [{k: v for k, v in r.items() if k != "output"} for r in results]},
                      out, indent=2)


if __name__ == "__main__":
    main()
