"""huabi on the CPU it finds vs diffusers' default fp32 pipeline, in the same run.

    .venv/bin/python bench/bench_cpu.py --steps 3                 # SD1.5 architecture, 512x512
    .venv/bin/python bench/bench_cpu.py --family sdxl --steps 1   # SDXL architecture, 1024x1024

Same full-size architecture (random weights, seeded), same sampler (DPM++ 2M Karras),
same steps, CFG 7, same seed, one process:

1. diffusers' StableDiffusion(XL)Pipeline in fp32 (the reference)
2. huabi with ``--backend openvino`` (precision hint from huabi's per-machine choice),
   with the conversion time reported separately; and ``openvino-int8`` when NNCF is
   installed (``--int8``)
3. huabi ``--backend torch`` (bf16 or fp32 as ``--dtype auto`` chose for this CPU,
   channels_last as the engine loads it)

``--backend auto`` (huabi's default) is one of 2 and 3 for a model of this size: the
header says which (service/backend_choice.py: a cached per-machine probe decides), and
the "huabi auto" line of the summary repeats that row.
4. the 4-step LCM check: one 512x512 image, LCM sampler, CFG 1, end to end (prompt
   encoding, 4 steps, decode; load excluded) against 2x (4 x slowest single UNet step +
   one decode) measured in the same dtype.

As the engine does, the torch UNet's weights are released during the OpenVINO runs (the
converted graph holds its own copy); ``--keep-torch-unet`` keeps them, as huabi did before.

Seconds per step are the median of the per-step times (the first step, which also
builds oneDNN/OpenVINO kernels, is in the total but not in the median). Peak memory
is the process's resident set sampled every 5 ms during each run (it includes the
weights then resident). Image difference: mean absolute difference in 0..255 pixels
from diffusers' fp32 image for the same seed. CPU flags are printed with the results.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from harness import CFG_SCALE, PROMPT, PeakRSS

SEED = 1234


@dataclass
class Run:
    name: str
    dtype: str
    step_times: list[float]
    total_s: float  # prompt encoding + all steps
    decode_s: float
    peak_gib: float
    image: np.ndarray = field(repr=False)
    setup_s: float = 0.0  # OpenVINO conversion (first use) before the run

    @property
    def s_per_step(self) -> float:
        steady = self.step_times[1:] or self.step_times
        return statistics.median(steady)


# --tiny: the SD1 layout at toy widths, so tests/test_bench_smoke.py can run this script end to end
# in seconds (benches are not run by CI otherwise, and one rotted unnoticed). Not a measurement.
TINY_UNET = {"block_out_channels": [32, 32, 64, 64], "attention_head_dim": 2, "cross_attention_dim": 64}
TINY_VAE = {"block_out_channels": [32, 32, 64, 64]}


def build_bundle(family: str, dtype: torch.dtype, *, tiny: bool = False, unet_overrides: dict | None = None):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from huabi.core.schedules import scaled_linear_alphas_cumprod
    from huabi.models.bundle import ModelBundle
    from huabi.models.configs import reference_configs
    from huabi.models.family import ModelFamily, Prediction, UNetVariant
    from huabi.models.tokenizer import load_tokenizers

    torch.manual_seed(0)
    model_family = ModelFamily.SDXL if family == "sdxl" else ModelFamily.SD1
    configs = reference_configs(model_family)
    if tiny:
        from huabi.models.text_encoders import tiny_text_encoder_configs

        configs = {"unet": {**configs["unet"], **TINY_UNET}, "vae": {**configs["vae"], **TINY_VAE},
                   "text_encoder": tiny_text_encoder_configs(model_family)[0].to_dict()}
    unet = UNet2DConditionModel.from_config({**configs["unet"], **(unet_overrides or {})}).to(dtype).eval()
    vae = AutoencoderKL.from_config(configs["vae"]).to(dtype).eval()
    encoders = [CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])).to(dtype).eval()]
    if model_family is ModelFamily.SDXL:
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])).to(dtype).eval())
    return ModelBundle(
        family=model_family, prediction=Prediction.EPSILON, variant=UNetVariant.BASE, unet=unet, vae=vae,
        text_encoders=encoders, tokenizers=load_tokenizers(model_family),
        alphas_cumprod=scaled_linear_alphas_cumprod(), native_size_px=1024 if family == "sdxl" else 512,
        name=f"bench-{family}",
    )


def run_diffusers(bundle, *, steps: int, size_px: int) -> Run:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True,
    )
    if len(bundle.text_encoders) == 2:
        pipe = StableDiffusionXLPipeline(
            vae=bundle.vae, text_encoder=bundle.text_encoders[0], text_encoder_2=bundle.text_encoders[1],
            tokenizer=bundle.tokenizers[0], tokenizer_2=bundle.tokenizers[1], unet=bundle.unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=True)
    else:
        pipe = StableDiffusionPipeline(
            vae=bundle.vae, text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0], unet=bundle.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    marks: list[float] = []

    def on_step_end(_pipe, _i, _t, kwargs):
        marks.append(time.perf_counter())
        return kwargs

    generator = torch.Generator("cpu").manual_seed(SEED)
    with PeakRSS() as peak, torch.inference_mode():
        start = time.perf_counter()
        # A1111 (and huabi) zero an all-empty SDXL negative; diffusers does that for negative_prompt=None only.
        negative = None if len(bundle.text_encoders) == 2 else ""
        latents = pipe(PROMPT, negative_prompt=negative, num_inference_steps=steps, guidance_scale=CFG_SCALE,
                       height=size_px, width=size_px, generator=generator, output_type="latent",
                       callback_on_step_end=on_step_end).images
        denoised = time.perf_counter()
        decoded = bundle.vae.decode(latents / bundle.vae.config.scaling_factor, return_dict=False)[0]
        [image] = pipe.image_processor.postprocess(decoded, output_type="np")
        done = time.perf_counter()
    return Run("diffusers fp32", "fp32", _step_times(start, marks), denoised - start, done - denoised,
               peak.peak_bytes / 2**30, (image * 255).round().astype(np.int16))


def _step_times(start: float, marks: list[float]) -> list[float]:
    return [b - a for a, b in zip([start, *marks[:-1]], marks)]


def run_huabi(bundle, name: str, *, steps: int, size_px: int, sampler: str = "DPM++ 2M",
              schedule: str = "Karras", cfg_scale: float = CFG_SCALE) -> Run:
    from huabi.pipelines.common import decode_latents, denoise, encode_guidance, latent_shape
    from huabi.service.device_choice import dtype_name

    marks: list[float] = []
    with PeakRSS() as peak:
        start = time.perf_counter()
        guidance = encode_guidance(bundle, PROMPT, "", clip_skip=1, width_px=size_px, height_px=size_px,
                                   device=torch.device("cpu"))
        encoded = time.perf_counter()
        latents = denoise(bundle, guidance, sampler_name=sampler, schedule_name=schedule, steps=steps,
                          cfg_scale=cfg_scale, seeds=[SEED], shape=latent_shape(bundle, size_px, size_px),
                          device=torch.device("cpu"), on_step=lambda _event: marks.append(time.perf_counter()))
        denoised = time.perf_counter()
        [image] = decode_latents(bundle, latents)
        done = time.perf_counter()
    dtype = dtype_name(next(bundle.unet.parameters()).dtype)
    return Run(name, dtype, _step_times(encoded, marks), denoised - start, done - denoised, peak.peak_bytes / 2**30,
               np.asarray(image, dtype=np.int16))


def convert_in_place(bundle, dtype: torch.dtype) -> None:
    """The auto dtype as the engine loads it: weights cast, UNet/VAE channels_last."""
    for module in (bundle.unet, bundle.vae, *bundle.text_encoders):
        module.to(dtype)
    bundle.unet.to(memory_format=torch.channels_last)
    bundle.vae.to(memory_format=torch.channels_last)
    gc.collect()


def main(argv: list[str] | None = None) -> None:
    from huabi.service.device_choice import auto_dtype, dtype_name, read_cpu_info

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--size", type=int, help="default: 512 (sd15) or 1024 (sdxl)")
    parser.add_argument("--skip-openvino", action="store_true")
    parser.add_argument("--int8", action="store_true", help="also OpenVINO weight-only int8 (needs nncf)")
    parser.add_argument("--keep-torch-unet", action="store_true",
                        help="keep the torch UNet's weights resident during the OpenVINO runs (huabi before it released them)")
    parser.add_argument("--skip-lcm", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--tiny", action="store_true", help="toy widths (SD1.5 layout): a smoke test, not a measurement")
    args = parser.parse_args(argv)
    if args.tiny and args.family != "sd15":
        parser.error("--tiny is for --family sd15")
    size_px = args.size or (1024 if args.family == "sdxl" else 512)

    cpu = read_cpu_info()
    choice = auto_dtype(torch.device("cpu"), cpu=cpu)
    header = {"cpu": cpu.model_name, "flags": list(cpu.relevant_flags), "physical_cores": cpu.physical_cores,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "auto": choice.reason,
              "family": args.family, "size_px": size_px, "steps": args.steps, "cfg": CFG_SCALE}
    print(f"CPU: {cpu.model_name}; flags: {' '.join(cpu.relevant_flags)}; {torch.get_num_threads()} threads; "
          f"torch {torch.__version__}")
    print(f"auto: {choice.reason}")
    from huabi.service.backend_choice import auto_backend_report

    backend_lines = auto_backend_report(torch.device("cpu"), choice.dtype, cpu, torch.get_num_threads())
    header["auto_backend"] = backend_lines
    print("\n".join(backend_lines))
    auto_openvino = "-> full-size SD1/SD2/SDXL models: OpenVINO" in backend_lines[-1]
    started = time.perf_counter()
    bundle = build_bundle(args.family, torch.float32, tiny=args.tiny)
    print(f"built {args.family} architecture (random weights) in {time.perf_counter() - started:.1f} s", flush=True)

    runs: list[Run] = [run_diffusers(bundle, steps=args.steps, size_px=size_px)]
    _print_run(runs[0], runs[0])

    backends = [] if args.skip_openvino else ["openvino"] + (["openvino-int8"] if args.int8 else [])
    for backend in backends:
        import tempfile
        from pathlib import Path

        from huabi.service.cpu_backend import BackendChoice, convert_bundle

        with tempfile.TemporaryDirectory(prefix="huabi-bench-ov-") as cache:
            choice_backend = BackendChoice(backend, dtype=choice.dtype, cache_dir=Path(cache))
            start = time.perf_counter()
            converted = convert_bundle(choice_backend.runtime, bundle)
            setup_s = time.perf_counter() - start
            saved_unet = None if args.keep_torch_unet else release_torch_unet(bundle.unet, Path(cache))
            run = run_huabi(converted, f"huabi {backend}", steps=args.steps, size_px=size_px)
            if saved_unet is not None:  # the next runs need the torch UNet again
                from safetensors.torch import load_file

                bundle.unet.load_state_dict(load_file(str(saved_unet)), strict=True, assign=True)
            run.setup_s = setup_s
            run.dtype = f"{choice_backend.runtime.precision} hint" + (" int8 weights" if choice_backend.int8 else "")
            runs.append(run)
            _print_run(run, runs[0])
            del converted, choice_backend
            gc.collect()

    convert_in_place(bundle, choice.dtype)
    auto = run_huabi(bundle, f"huabi torch ({dtype_name(choice.dtype)})", steps=args.steps, size_px=size_px)
    runs.append(auto)
    _print_run(auto, runs[0])

    lcm = None
    if not args.skip_lcm and args.family == "sd15":
        lcm = lcm_check(bundle, size_px)

    print()
    print(f"{'run':28} {'dtype':16} {'s/step':>8} {'ratio':>6} {'decode s':>9} {'ratio':>6} {'peak GiB':>9} "
          f"{'ratio':>6} {'|diff|':>7} {'setup s':>8}")
    reference = runs[0]
    for run in runs:
        print(f"{run.name:28} {run.dtype:16} {run.s_per_step:8.2f} {reference.s_per_step / run.s_per_step:5.2f}x "
              f"{run.decode_s:9.2f} {reference.decode_s / run.decode_s:5.2f}x {run.peak_gib:9.2f} "
              f"{run.peak_gib / reference.peak_gib:6.2f} {np.abs(run.image - reference.image).mean():7.2f} "
              f"{run.setup_s:8.1f}")
    picked = next((run for run in runs if run.name == "huabi openvino"), None) if auto_openvino else auto
    if picked is not None:
        print(f"{'huabi auto = ' + picked.name:28} {picked.dtype:16} {picked.s_per_step:8.2f} "
              f"{reference.s_per_step / picked.s_per_step:5.2f}x")
        header["auto_run"] = picked.name
    print("ratio: diffusers fp32 time / this run's time (> 1 is faster); peak ratio: this / diffusers (< 1 is smaller)")
    print("|diff|: mean absolute pixel difference (0..255) from diffusers fp32, same seed")
    if args.json:
        result = {**header, "runs": [{**{k: v for k, v in asdict(run).items() if k != "image"},
                                      "s_per_step": run.s_per_step,
                                      "speedup_per_step": reference.s_per_step / run.s_per_step,
                                      "speedup_decode": reference.decode_s / run.decode_s,
                                      "peak_ratio": run.peak_gib / reference.peak_gib,
                                      "mean_abs_pixel_diff": float(np.abs(run.image - reference.image).mean())}
                                     for run in runs], "lcm": lcm}
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)


def lcm_check(bundle, size_px: int) -> dict:
    """4 LCM steps end to end vs 2x (4 x slowest single UNet call + one decode), same dtype."""
    from huabi.pipelines.common import decode_latents

    dtype = next(bundle.unet.parameters()).dtype
    latent = size_px // 8
    sample = torch.randn(1, 4, latent, latent, dtype=dtype).contiguous(memory_format=torch.channels_last)
    context = torch.randn(1, 77, int(bundle.unet.config.cross_attention_dim), dtype=dtype)
    unet_times = []
    with torch.inference_mode():
        for _ in range(3):
            start = time.perf_counter()
            bundle.unet(sample, torch.tensor([500.0]), encoder_hidden_states=context, return_dict=False)
            unet_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        decode_latents(bundle, torch.randn(1, 4, latent, latent))
        decode_s = time.perf_counter() - start
    run = run_huabi(bundle, "LCM 4 steps", steps=4, size_px=size_px, sampler="LCM", schedule="Automatic",
                    cfg_scale=1.0)
    end_to_end = run.total_s + run.decode_s
    budget = 2 * (4 * max(unet_times) + decode_s)
    print(f"LCM 4 steps end to end: {end_to_end:.2f} s; slowest single UNet call {max(unet_times):.2f} s, "
          f"decode {decode_s:.2f} s; budget 2x(4 x step + decode) = {budget:.2f} s: "
          f"{'OK' if end_to_end <= budget else 'OVER'}", flush=True)
    return {"end_to_end_s": end_to_end, "unet_call_s": unet_times, "decode_s": decode_s, "budget_s": budget,
            "within": end_to_end <= budget}


def release_torch_unet(unet: torch.nn.Module, folder) -> object:
    """As the engine does after a conversion (service/unet_weights.py): the torch UNet's
    parameters go to the meta device. The engine reads them back from the model file; this
    in-memory model is saved to ``folder`` first (outside the timed run)."""
    from safetensors.torch import save_file

    from huabi.service.unet_weights import release_parameters

    path = folder / "torch_unet.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(path))
    release_parameters(unet)
    gc.collect()
    return path


def _print_run(run: Run, reference: Run) -> None:
    print(f"{run.name}: {run.s_per_step:.2f} s/step (steps {', '.join(f'{t:.2f}' for t in run.step_times)}), "
          f"decode {run.decode_s:.2f} s, peak {run.peak_gib:.2f} GiB"
          + (f", setup {run.setup_s:.1f} s" if run.setup_s else "")
          + (f", |diff| {np.abs(run.image - reference.image).mean():.2f}" if run is not reference else ""), flush=True)


if __name__ == "__main__":
    main()
