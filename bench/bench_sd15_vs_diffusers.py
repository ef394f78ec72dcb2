"""huabi vs diffusers on the same full-size SD1.5-architecture model (random weights).

Both pipelines run in this process on the *same* module objects, the same
sampler (DPM++ 2M with Karras sigmas, CFG 7) and the same size, so the ratio
measures only the pipelines' own overhead and numerics path. Reports seconds
per denoising step, VAE decode time, peak resident memory during each run, and
the ratios huabi / diffusers.

    .venv/bin/python bench/bench_sd15_vs_diffusers.py --steps 4 --size 512 --dtype bf16

On these 2-core CPUs one CFG step of this UNet is ~1.35 TFLOP; two cores peak
near 0.45 TFLOP/s in bf16, so ~3 s per step is the floor.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from dataclasses import dataclass

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class PeakRSS:
    """Samples this process's resident memory every few ms while active."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def current_bytes() -> int:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakRSS":
        self.peak_bytes = self.current_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.current_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self.current_bytes())


@dataclass
class Timing:
    denoise_s: float
    decode_s: float
    peak_gib: float


def build_sd15_modules(dtype: torch.dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from huabi.models.configs import reference_configs
    from huabi.models.family import ModelFamily
    from huabi.models.text_encoders import load_tokenizers

    torch.manual_seed(0)
    configs = reference_configs(ModelFamily.SD1)
    unet = UNet2DConditionModel.from_config(configs["unet"]).to(dtype).eval()
    vae = AutoencoderKL.from_config(configs["vae"]).to(dtype).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])).to(dtype).eval()
    [tokenizer] = load_tokenizers(ModelFamily.SD1)
    return unet, vae, text_encoder, tokenizer


def run_diffusers(unet, vae, text_encoder, tokenizer, *, prompt, steps, size, seed) -> Timing:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    with PeakRSS() as peak, torch.inference_mode():
        start = time.perf_counter()
        latents = pipe(prompt, negative_prompt="", num_inference_steps=steps, guidance_scale=7.0,
                       height=size, width=size, generator=generator, output_type="latent").images
        denoised = time.perf_counter()
        vae.decode(latents / vae.config.scaling_factor, return_dict=False)
        decoded = time.perf_counter()
    return Timing(denoised - start, decoded - denoised, peak.peak_bytes / 2**30)


def run_huabi(unet, vae, text_encoder, tokenizer, *, prompt, steps, size, seed) -> Timing:
    from huabi.core.schedules import scaled_linear_alphas_cumprod
    from huabi.models.bundle import ModelBundle
    from huabi.models.family import ModelFamily, Prediction, UNetVariant
    from huabi.pipelines.common import decode_latents, denoise, encode_guidance, latent_shape

    bundle = ModelBundle(
        family=ModelFamily.SD1, prediction=Prediction.EPSILON, variant=UNetVariant.BASE,
        unet=unet, vae=vae, text_encoders=[text_encoder], tokenizers=[tokenizer],
        alphas_cumprod=scaled_linear_alphas_cumprod(), native_size_px=512, name="bench-sd15",
    )
    device = torch.device("cpu")
    with PeakRSS() as peak:
        start = time.perf_counter()
        guidance = encode_guidance(bundle, prompt, "", clip_skip=1, width_px=size, height_px=size, device=device)
        latents = denoise(bundle, guidance, sampler_name="DPM++ 2M", schedule_name="Karras", steps=steps,
                          cfg_scale=7.0, seeds=[seed], shape=latent_shape(bundle, size, size), device=device)
        denoised = time.perf_counter()
        decode_latents(bundle, latents)
        decoded = time.perf_counter()
    return Timing(denoised - start, decoded - denoised, peak.peak_bytes / 2**30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    t0 = time.perf_counter()
    modules = build_sd15_modules(dtype)
    build_s = time.perf_counter() - t0
    common = dict(prompt="a lighthouse on a cliff at sunset", steps=args.steps, size=args.size, seed=1234)
    run_huabi(*modules, **{**common, "steps": 1})  # warm-up: first-call allocations and kernel selection
    diffusers_t = run_diffusers(*modules, **common)
    huabi_t = run_huabi(*modules, **common)
    result = {
        "model": "SD1.5 architecture, random weights",
        "size": args.size, "steps": args.steps, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "build_s": round(build_s, 1),
        "diffusers": {"s_per_step": diffusers_t.denoise_s / args.steps, "decode_s": diffusers_t.decode_s,
                      "peak_gib": diffusers_t.peak_gib},
        "huabi": {"s_per_step": huabi_t.denoise_s / args.steps, "decode_s": huabi_t.decode_s,
                  "peak_gib": huabi_t.peak_gib},
    }
    result["ratio_s_per_step"] = result["huabi"]["s_per_step"] / result["diffusers"]["s_per_step"]
    result["ratio_decode"] = huabi_t.decode_s / diffusers_t.decode_s
    result["ratio_peak"] = huabi_t.peak_gib / diffusers_t.peak_gib
    print(f"{'':10} {'s/step':>8} {'decode s':>9} {'peak GiB':>9}")
    for name in ("diffusers", "huabi"):
        row = result[name]
        print(f"{name:10} {row['s_per_step']:8.2f} {row['decode_s']:9.2f} {row['peak_gib']:9.2f}")
    print(f"{'ratio':10} {result['ratio_s_per_step']:8.3f} {result['ratio_decode']:9.3f} {result['ratio_peak']:9.3f}"
          "   (huabi / diffusers; < 1 is faster or smaller)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
