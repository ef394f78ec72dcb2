"""OpenVINO backend memory: the torch UNet kept beside the compiled graph vs released,
a first run (conversion) vs a later one (graphs cached on disk), against diffusers.

Writes a mid-size SD1-architecture checkpoint (A1111 single-file layout, random seeded
weights: UNet at half the SD1.5 widths, ~1/4 of its parameters; full-size VAE and
CLIP-L; ``--full``: the full SD1.5 UNet) to a temporary folder, then runs the same
generation in separate child processes (peak RSS of a process only grows, so each mode
gets its own):

- ``torch``: ``--backend torch`` (the reference),
- ``openvino-kept``: ``--backend openvino`` with the torch UNet's weights kept resident
  (what huabi did before),
- ``openvino-released``: ``--backend openvino`` as it is now: after conversion the
  torch UNet's parameters go to the meta device (service/unet_weights.py),
- ``openvino-cached``: the same in a new process that finds ``openvino-released``'s
  converted graphs and compiled blobs on disk (a user's every run after the first),
- ``auto``: ``--backend auto`` (the default) in a new process that finds
  ``openvino-released``'s cache: which backend auto picks at this model size and this
  machine's free memory, and what it costs,
- ``diffusers``: diffusers' StableDiffusionPipeline (SDXL: StableDiffusionXLPipeline) in
  fp32 on the same file's weights (read by huabi's loader into diffusers modules), DPM++ 2M
  Karras, the same jobs (``--dtype`` does not apply to it: it is the fp32 reference of issue 20).

``--family sdxl`` writes a full-size SDXL checkpoint instead (2.6 B UNet parameters, both text
encoders; use ``--size 1024``).

For each: the peak RSS of the whole process (load + conversion + compile + first job),
the peak RSS during a second identical job (the steady state a user of the server
lives in), the RSS after it (each also as its anonymous part, ``RssAnon``: resident memory
counts the mapped weight file's and IR's clean pages, which the kernel can drop; anonymous
memory is what the process really holds), and the seconds of both jobs; the OpenVINO modes also
report a third job with a ``--tile`` request (falls back to torch: the released mode
reads the UNet back from the file) and a fourth back in OpenVINO. Images of the modes
are compared (mean absolute pixel difference from torch). Seconds per step: the median
interval between step callbacks after the first (text encoding and decode excluded).

    .venv/bin/python bench/bench_openvino_memory.py [--size 256] [--steps 2] [--dtype bf16]
    .venv/bin/python bench/bench_openvino_memory.py --family sdxl --size 1024 --steps 3 --no-fallback-jobs \
        --modes diffusers,torch,openvino-released,auto
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

import numpy as np

from harness import PeakRSS, anon_bytes

MODES = ("torch", "openvino-kept", "openvino-released")
ALL_MODES = ("diffusers", *MODES, "openvino-cached", "auto")


def write_checkpoint(path: Path, *, family: str = "sd15", full: bool = False) -> int:
    """A mid-size (``full``: full-size) SD1 or a full-size SDXL checkpoint (A1111 layout) at
    ``path``; returns its parameter count."""
    import torch
    from safetensors.torch import save_file

    from bench_cpu import build_bundle
    from huabi.models.convert import unet_to_original, vae_to_original
    from huabi.models.text_encoders import text_encoders_to_original

    half_widths = {"block_out_channels": [160, 320, 640, 640]} if family == "sd15" and not full else None
    bundle = build_bundle(family, torch.float32, unet_overrides=half_widths)  # seeded random reference weights
    params = sum(p.numel() for m in (bundle.unet, bundle.vae, *bundle.text_encoders) for p in m.parameters())
    # fp16 on disk, as most shared checkpoints are (converted part by part: SDXL's fp32 copy is 13 GB)
    half_precision = lambda tensors: {k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}  # noqa: E731
    tensors = {"model.diffusion_model." + k: v for k, v in
               half_precision(unet_to_original(bundle.unet.state_dict(), bundle.unet.config)).items()}
    bundle.unet = None
    tensors.update({"first_stage_model." + k: v for k, v in half_precision(vae_to_original(bundle.vae.state_dict())).items()})
    tensors.update(half_precision(text_encoders_to_original(bundle.text_encoders, bundle.family)))
    del bundle
    save_file(tensors, str(path))
    return params


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def step_seconds(marks: list[float]) -> float | None:
    """Median interval between step callbacks after the first (None with fewer than 2 steps)."""
    intervals = [b - a for a, b in zip(marks, marks[1:])]
    return float(np.median(intervals)) if intervals else None


def child(mode: str, model: Path, out: Path, *, size: int, steps: int, dtype: str, fallback_jobs: bool = True) -> None:
    """One mode in this process; writes its numbers (and images as .npy) next to ``out``."""
    from huabi.core.infotext import parse_infotext
    from huabi.core.request import GenerationRequest
    from huabi.service.engine import Engine

    if mode == "diffusers":
        return diffusers_child(model, out, size=size, steps=steps)
    backend = {"torch": "torch", "auto": "auto"}.get(mode, "openvino")
    if backend == "auto":
        os.environ.pop("HUABI_AUTO_BACKEND", None)  # auto decides, as for a user
    engine = Engine(device="cpu", dtype=dtype, backend=backend)
    if mode == "openvino-kept":
        engine.backend.release_torch_weights = False
    jobs = [("first", {}), ("second", {})]
    if backend != "torch" and fallback_jobs:
        jobs += [("tile (torch fallback)", {"tile": True}), ("back to OpenVINO", {})]
    result: dict = {"mode": mode, "jobs": []}
    for name, fields in jobs:
        request = GenerationRequest(prompt="a lighthouse on a cliff at sunset", negative_prompt="", model=str(model),
                                    steps=steps, width_px=size, height_px=size, seed=1234, sampler="DPM++ 2M",
                                    schedule="Karras", **fields)
        marks: list[float] = []
        with PeakRSS() as peak:
            start = time.perf_counter()
            [image] = engine.generate(request, on_progress=lambda _done, _total: marks.append(time.perf_counter()))
            seconds = time.perf_counter() - start
        np.save(out.with_name(f"{out.stem}-{len(result['jobs'])}.npy"), np.asarray(image.image, dtype=np.int16))
        ran = parse_infotext(image.infotext).params.get("Backend", "torch")
        result["jobs"].append({"job": name, "seconds": seconds, "s_per_step": step_seconds(marks[:steps]),
                               "backend": ran, "peak_gib": peak.peak_bytes / 2**30,
                               "rss_after_gib": rss_bytes() / 2**30, "anon_peak_gib": peak.peak_anon_bytes / 2**30,
                               "anon_after_gib": anon_bytes() / 2**30})
    result["process_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    weights = engine.backend._weights
    result["unet_reloads"] = weights.reloads if weights is not None else 0
    result["conversions"] = engine.backend.runtime.conversions if engine.backend.runtime is not None else 0
    out.write_text(json.dumps(result))


def diffusers_child(model: Path, out: Path, *, size: int, steps: int) -> None:
    """The fp32 diffusers reference: two identical jobs, as the engine modes' first two."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from huabi.models.family import ModelFamily
    from huabi.models.load import load_model

    bundle = load_model(model, dtype=torch.float32, compute_hash=False)
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            steps_offset=1, algorithm_type="dpmsolver++", solver_order=2,
                                            use_karras_sigmas=True)
    sdxl = bundle.family is ModelFamily.SDXL
    if sdxl:
        pipe = StableDiffusionXLPipeline(vae=bundle.vae, text_encoder=bundle.text_encoders[0],
                                         text_encoder_2=bundle.text_encoders[1], tokenizer=bundle.tokenizers[0],
                                         tokenizer_2=bundle.tokenizers[1], unet=bundle.unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=bundle.vae, text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0],
                                       unet=bundle.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    del bundle
    result: dict = {"mode": "diffusers", "jobs": []}
    for name in ("first", "second"):
        marks: list[float] = []

        def on_step_end(_pipe, _i, _t, kwargs):
            marks.append(time.perf_counter())
            return kwargs

        with PeakRSS() as peak, torch.inference_mode():
            start = time.perf_counter()
            # A1111 and huabi zero an empty SDXL negative; diffusers does that for negative_prompt=None only.
            [image] = pipe("a lighthouse on a cliff at sunset", negative_prompt=None if sdxl else "",
                           num_inference_steps=steps, guidance_scale=7.0, height=size, width=size,
                           generator=torch.Generator("cpu").manual_seed(1234), output_type="np",
                           callback_on_step_end=on_step_end).images
            seconds = time.perf_counter() - start
        np.save(out.with_name(f"{out.stem}-{len(result['jobs'])}.npy"), (image * 255).round().astype(np.int16))
        result["jobs"].append({"job": name, "seconds": seconds, "s_per_step": step_seconds(marks),
                               "backend": "diffusers", "peak_gib": peak.peak_bytes / 2**30,
                               "rss_after_gib": rss_bytes() / 2**30, "anon_peak_gib": peak.peak_anon_bytes / 2**30,
                               "anon_after_gib": anon_bytes() / 2**30})
    result["process_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result["unet_reloads"] = result["conversions"] = 0
    out.write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dtype", default="bf16", help="the engine's --dtype (bf16: what auto picks on this CPU)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(ALL_MODES)}")
    parser.add_argument("--full", action="store_true", help="the full-size SD1.5 UNet (default: half widths)")
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sd15", help="sdxl: a full-size SDXL checkpoint")
    parser.add_argument("--no-fallback-jobs", action="store_true",
                        help="skip the OpenVINO modes' tile (torch fallback) and back-to-OpenVINO jobs")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, model, out = args.child
        child(mode, Path(model), Path(out), size=args.size, steps=args.steps, dtype=args.dtype,
              fallback_jobs=not args.no_fallback_jobs)
        return

    from huabi.service.device_choice import read_cpu_info

    cpu = read_cpu_info()
    print(f"CPU: {cpu.model_name}; flags: {' '.join(cpu.relevant_flags)}; load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="huabi-ovmem-") as work:
        work_dir = Path(work)
        model = work_dir / f"bench_{args.family}.safetensors"
        started = time.perf_counter()
        params = write_checkpoint(model, family=args.family, full=args.full)
        kind = "full-size SDXL" if args.family == "sdxl" else f"{'full' if args.full else 'mid'}-size SD1"
        print(f"wrote a {kind} checkpoint ({params / 1e6:.0f}M parameters, {model.stat().st_size / 2**30:.2f} GiB "
              f"fp16) in {time.perf_counter() - started:.1f} s; {args.size}x{args.size}, {args.steps} steps, "
              f"--dtype {args.dtype}", flush=True)
        env = {**os.environ, "HUABI_CACHE_DIR": str(work_dir / "cache"), "HF_HUB_OFFLINE": "1"}
        results = []
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            out = work_dir / f"{mode}.json"
            # a fresh OpenVINO cache per mode: each converts once, as a first run does; "openvino-cached"
            # starts where "openvino-released" left its cache
            shares = mode in ("openvino-cached", "auto")
            cache = work_dir / ("cache-openvino-released" if shares else f"cache-{mode}")
            subprocess.run([sys.executable, __file__, "--child", mode, str(model), str(out), "--size", str(args.size),
                            "--steps", str(args.steps), "--dtype", args.dtype,
                            *(["--no-fallback-jobs"] if args.no_fallback_jobs else [])],
                           env={**env, "HUABI_CACHE_DIR": str(cache)}, check=True)
            result = json.loads(out.read_text())
            result["images"] = [np.load(work_dir / f"{mode}-{i}.npy") for i in range(len(result["jobs"]))]
            results.append(result)
            for job in result["jobs"]:
                per_step = f"{job['s_per_step']:6.2f} s/step" if job.get("s_per_step") else " " * 13
                print(f"{mode:18} {job['job']:24} {job['seconds']:7.1f} s {per_step} ({job['backend']})  "
                      f"peak {job['peak_gib']:5.2f} GiB (anonymous {job['anon_peak_gib']:5.2f})  after "
                      f"{job['rss_after_gib']:5.2f} GiB (anonymous {job['anon_after_gib']:5.2f})", flush=True)
            print(f"{mode:18} process peak {result['process_peak_gib']:.2f} GiB; conversions {result['conversions']}; "
                  f"UNet read back {result['unet_reloads']} times", flush=True)
    reference = next((r for r in results if r["mode"] == "torch"), results[0])
    baseline = next((r for r in results if r["mode"] == "diffusers"), None)
    print()
    print(f"{'mode':18} {'process peak GiB':>16} {'2nd job peak GiB':>16} {'anon':>6} {'RSS after GiB':>13} {'anon':>6} "
          f"{'2nd job s':>9} {'s/step':>7} {'|diff| vs torch':>15}"
          + (f" {'peaks vs diffusers':>18} {'anon vs diffusers':>17} {'speed vs diffusers':>18}" if baseline else ""))
    for r in results:
        second = r["jobs"][1]
        diff = float(np.abs(r["images"][1] - reference["images"][1]).mean())
        r["mean_abs_pixel_diff_vs_torch"] = diff
        per_step = second.get("s_per_step") or float("nan")
        line = (f"{r['mode']:18} {r['process_peak_gib']:16.2f} {second['peak_gib']:16.2f} {second['anon_peak_gib']:6.2f} "
                f"{second['rss_after_gib']:13.2f} {second['anon_after_gib']:6.2f} {second['seconds']:9.1f} {per_step:7.2f} "
                f"{diff:15.2f}")
        if baseline:
            r["process_peak_vs_diffusers"] = r["process_peak_gib"] / baseline["process_peak_gib"]
            r["second_job_peak_vs_diffusers"] = second["peak_gib"] / baseline["jobs"][1]["peak_gib"]
            reference_step = baseline["jobs"][1].get("s_per_step") or float("nan")
            r["second_job_anon_peak_vs_diffusers"] = second["anon_peak_gib"] / baseline["jobs"][1]["anon_peak_gib"]
            r["step_speed_vs_diffusers"] = reference_step / per_step
            line += (f" {r['process_peak_vs_diffusers']:8.2f} / {r['second_job_peak_vs_diffusers']:.2f}"
                     f" {r['second_job_anon_peak_vs_diffusers']:17.2f} {r['step_speed_vs_diffusers']:17.2f}x")
        print(line)
    for r in results:
        if len(r["images"]) >= 3:  # the tile fallback ran in torch; the last job is OpenVINO again
            print(f"{r['mode']}: last OpenVINO job vs second: |diff| max "
                  f"{int(np.abs(r['images'][3] - r['images'][1]).max())}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"cpu": cpu.model_name, "flags": list(cpu.relevant_flags), "family": args.family, "size_px": args.size,
                       "steps": args.steps, "dtype": args.dtype, "parameters": params,
                       "results": [{k: v for k, v in r.items() if k != "images"} for r in results]}, handle, indent=2)


if __name__ == "__main__":
    main()
