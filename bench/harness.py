"""Shared timing harness: huabi vs diffusers' own pipeline on the same ModelBundle.

Both pipelines drive the *same* module objects with the same sampler (DPM++ 2M,
Karras sigmas), CFG, size and batch, in one process, so the ratio measures only
the pipelines. Peak memory is the process's resident set, sampled every 5 ms
while each run is active (it includes the shared weights).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "a lighthouse on a cliff at sunset"
CFG_SCALE = 7.0


def anon_bytes() -> int:
    """This process's anonymous resident memory (``RssAnon``): what it has allocated, without the
    pages of files it maps (safetensors weights, OpenVINO's IR), which are clean and which the
    kernel drops under pressure. Resident = anonymous + file + shared memory."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Samples this process's resident memory (and its anonymous part) every few ms while active."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.peak_anon_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def current_bytes() -> int:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakRSS":
        self.peak_bytes = self.current_bytes()
        self.peak_anon_bytes = anon_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.current_bytes())
            self.peak_anon_bytes = max(self.peak_anon_bytes, anon_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self.current_bytes())
        self.peak_anon_bytes = max(self.peak_anon_bytes, anon_bytes())


@dataclass
class Timing:
    total_s: float  # prompt encoding + denoising, as a user waits for it
    decode_s: float
    peak_gib: float
    steps: int

    @property
    def s_per_step(self) -> float:
        return self.total_s / self.steps


def run_diffusers(bundle, *, steps: int, size_px: int, batch: int, seed: int) -> Timing:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True,
    )
    pipe = StableDiffusionPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0], unet=bundle.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    with PeakRSS() as peak, torch.inference_mode():
        start = time.perf_counter()
        latents = pipe(PROMPT, negative_prompt="", num_inference_steps=steps, guidance_scale=CFG_SCALE,
                       height=size_px, width=size_px, num_images_per_prompt=batch, generator=generator,
                       output_type="latent").images
        denoised = time.perf_counter()
        images = bundle.vae.decode(latents / bundle.vae.config.scaling_factor, return_dict=False)[0]
        pipe.image_processor.postprocess(images, output_type="pil")  # to PIL, as huabi's decode does
        decoded = time.perf_counter()
    return Timing(denoised - start, decoded - denoised, peak.peak_bytes / 2**30, steps)


def run_huabi(bundle, *, steps: int, size_px: int, batch: int, seed: int) -> Timing:
    from huabi.pipelines.common import decode_latents, denoise, encode_guidance, latent_shape

    device = next(bundle.unet.parameters()).device
    with PeakRSS() as peak:
        start = time.perf_counter()
        guidance = encode_guidance(bundle, PROMPT, "", clip_skip=1, width_px=size_px, height_px=size_px, device=device)
        latents = denoise(bundle, guidance, sampler_name="DPM++ 2M", schedule_name="Karras", steps=steps,
                          cfg_scale=CFG_SCALE, seeds=[seed + i for i in range(batch)],
                          shape=latent_shape(bundle, size_px, size_px), device=device)
        denoised = time.perf_counter()
        decode_latents(bundle, latents)
        decoded = time.perf_counter()
    return Timing(denoised - start, decoded - denoised, peak.peak_bytes / 2**30, steps)


def compare(bundle, *, steps: int, size_px: int, batch: int, seed: int = 1234, rounds: int = 2) -> dict:
    """Warm up both, then alternate the two pipelines ``rounds`` times and keep each one's best run."""
    common = dict(size_px=size_px, batch=batch, seed=seed)
    run_huabi(bundle, steps=1, **common)
    run_diffusers(bundle, steps=1, **common)
    best: dict[str, Timing] = {}
    for _ in range(rounds):
        for name, run in (("diffusers", run_diffusers), ("huabi", run_huabi)):
            timing = run(bundle, steps=steps, **common)
            if name not in best or timing.total_s + timing.decode_s < best[name].total_s + best[name].decode_s:
                best[name] = timing
    ours, theirs = best["huabi"], best["diffusers"]
    return {
        "steps": steps, "size_px": size_px, "batch": batch, "threads": torch.get_num_threads(),
        "dtype": str(next(bundle.unet.parameters()).dtype).replace("torch.", ""),
        "diffusers": {**asdict(theirs), "s_per_step": theirs.s_per_step},
        "huabi": {**asdict(ours), "s_per_step": ours.s_per_step},
        "ratio_s_per_step": ours.s_per_step / theirs.s_per_step,
        "ratio_decode": ours.decode_s / theirs.decode_s,
        "ratio_peak": ours.peak_gib / theirs.peak_gib,
    }


def print_report(result: dict) -> None:
    print(f"{result['batch']} image(s), {result['steps']} steps of DPM++ 2M Karras, CFG {CFG_SCALE}, "
          f"{result['size_px']}px, {result['dtype']}, {result['threads']} threads")
    print(f"{'':10} {'s/step':>8} {'total s':>8} {'decode s':>9} {'peak GiB':>9}")
    for name in ("diffusers", "huabi"):
        row = result[name]
        print(f"{name:10} {row['s_per_step']:8.3f} {row['total_s']:8.2f} {row['decode_s']:9.2f} {row['peak_gib']:9.2f}")
    print(f"{'ratio':10} {result['ratio_s_per_step']:8.3f} {'':8} {result['ratio_decode']:9.3f} {result['ratio_peak']:9.3f}"
          "   (huabi / diffusers; < 1 is faster or smaller)")
