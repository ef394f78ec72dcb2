"""Mutation testing for huabi: deliberate bugs that the test suite must catch.

Each mutant is (name, file under src/, exact original snippet, replacement, tests).
For every mutant the script copies src/ to a temporary folder, applies that one
change there (the real tree is never written to), and runs the mutant's tests
with PYTHONPATH pointing at the copy. A failing run kills the mutant; a passing
run means the suite missed a real bug. A snippet that is not found exactly once
is reported as "stale" (the code moved on: update the list), not as a kill.

    python scripts/mutate.py                 # every mutant, its own tests
    python scripts/mutate.py --list          # names and tests, nothing run
    python scripts/mutate.py inpaint-hard-threshold lora-last-only
    python scripts/mutate.py --exclude tests/test_independent_references.py   # "before" run
    python scripts/mutate.py --baseline      # first check the tests pass on the real tree

Runs on one torch thread by default (OMP_NUM_THREADS=1); a full run takes
several minutes on a shared 2-core machine (each mutant pays pytest's start-up).
Exit status: 0 if every mutant was killed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFS = "tests/test_independent_references.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to src/
    original: str
    replacement: str
    tests: tuple[str, ...]  # pytest targets (files or node ids), relative to the repository


MUTANTS: tuple[Mutant, ...] = (
    # ---- the six from issue 22's table
    Mutant("inpaint-hard-threshold", "huabi/pipelines/inpaint.py",
           "alpha = np.round(soft_mask.cpu().numpy() * 255.0)[..., None] / 255.0",
           "alpha = (soft_mask.cpu().numpy() > 0.5).astype(np.float32)[..., None]",
           (REFS + "::test_inpaint_paste_back_is_a1111s_soft_blend", "tests/test_inpaint.py")),
    Mutant("inpaint-no-mask-blur", "huabi/pipelines/inpaint.py",
           "return blur_mask(tensor, options.mask_blur_px)",
           "return tensor",
           (REFS + "::test_inpaint_paste_back_is_a1111s_soft_blend", "tests/test_inpaint.py")),
    Mutant("inpaint-9ch-mask-inverted-latent-zeroed", "huabi/pipelines/inpaint.py",
           "image_channels = torch.cat([small_mask, masked_latent], dim=1)",
           "image_channels = torch.cat([1 - small_mask, torch.zeros_like(masked_latent)], dim=1)",
           (REFS + "::test_inpainting_model_channels_match_diffusers", "tests/test_inpaint.py")),
    Mutant("v-prediction-c_out-sign", "huabi/core/guidance.py",
           "c_out = -sigma_b / torch.sqrt(sigma_b**2 + 1.0)",
           "c_out = sigma_b / torch.sqrt(sigma_b**2 + 1.0)",
           (REFS + "::test_v_prediction_sampling_matches_diffusers", "tests/test_generate_families.py")),
    Mutant("hires-ignores-denoise", "huabi/pipelines/hires.py",
           "denoising_strength=float(request.hires_denoise),",
           "denoising_strength=1.0,",
           (REFS + "::test_hires_second_pass_starts_at_the_documented_sigma", "tests/test_hires.py")),
    Mutant("hires-plain-img2img-steps", "huabi/pipelines/hires.py",
           "fixed_steps=True, patches=patches, pass_name=HIRES_PASS,",
           "fixed_steps=False, patches=patches, pass_name=HIRES_PASS,",
           (REFS + "::test_hires_second_pass_follows_a1111_fixed_steps_rule", "tests/test_hires.py")),
    Mutant("lora-last-only", "huabi/models/lora.py",
           "delta = old_delta + delta",
           "delta = delta",
           (REFS + "::test_two_weighted_loras_match_diffusers_set_adapters", "tests/test_lora.py")),
    Mutant("img2img-pixels-0-1", "huabi/pipelines/img2img.py",
           'np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0',
           'np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0',
           (REFS + "::test_img2img_init_latent_matches_diffusers_vae_encode", "tests/test_img2img.py")),
    # ---- samplers, CFG, prompt encoding, LoRA scale, infotext, seeds
    Mutant("euler-step-10pct", "huabi/core/samplers.py",
           "x = x + (x - denoised) * ((s[i + 1] - s[i]) / s[i])",
           "x = x + (x - denoised) * ((s[i + 1] - s[i]) / s[i]) * 1.1",
           ("tests/test_samplers.py",)),
    Mutant("dpmpp-2m-coefficient", "huabi/core/samplers.py",
           "half_over_r = h / (2.0 * h_last)",
           "half_over_r = h / (2.2 * h_last)",
           ("tests/test_samplers.py",)),
    Mutant("cfg-scale-minus-one", "huabi/core/guidance.py",
           "return denoised_uncond + (outputs[1] - denoised_uncond) * self.scale",
           "return denoised_uncond + (outputs[1] - denoised_uncond) * (self.scale - 1.0)",
           ("tests/test_txt2img_vs_diffusers.py",)),
    Mutant("clip-skip-off-by-one", "huabi/core/conditioning.py",
           "_final_layer_norm(encoder)(out.hidden_states[-clip_skip])",
           "_final_layer_norm(encoder)(out.hidden_states[-clip_skip - 1])",
           ("tests/test_prompt_conditioning.py", "tests/test_conditioning.py")),
    Mutant("emphasis-no-mean-restore", "huabi/core/conditioning.py",
           "return scaled * (original_mean / scaled.mean(dim=(1, 2), keepdim=True))",
           "return scaled",
           ("tests/test_prompt_conditioning.py", "tests/test_conditioning.py")),
    Mutant("sde-noise-10pct-low", "huabi/core/samplers.py",
           "sigma_next * math.sqrt(-math.expm1(-2.0 * (eta * h))) * s_noise",
           "sigma_next * math.sqrt(-math.expm1(-2.0 * (eta * h))) * s_noise * 0.9",
           ("tests/test_samplers.py", "tests/test_new_samplers_schedules.py")),
    Mutant("lora-ignores-alpha", "huabi/models/lora.py",
           "scale = module.alpha / rank if module.alpha is not None and rank else 1.0",
           "scale = 1.0",
           ("tests/test_lora.py",)),
    Mutant("infotext-seed-of-request", "huabi/core/infotext.py",
           '"Seed": seed,',
           '"Seed": request.seed,',
           ("tests/test_infotext.py",)),
    Mutant("infotext-clip-skip-dropped", "huabi/core/infotext.py",
           '"Clip skip": request.clip_skip if request.clip_skip > 1 else None,',
           '"Clip skip": None,',
           ("tests/test_infotext.py",)),
    Mutant("seeds-not-counting-up", "huabi/core/request.py",
           "[self.seed + step * (batch * self.batch_size + i) for i in range(self.batch_size)]",
           "[self.seed + step * i for i in range(self.batch_size)]",
           ("tests/test_request.py", "tests/test_noise.py")),
    Mutant("merge-lora-default-weight-half", "huabi/service/adapters.py",
           "te_weight = weights[0] if weights else 1.0",
           "te_weight = weights[0] if weights else 0.5",
           ("tests/test_reference_merge_lora.py", "tests/test_lora_engine.py")),
    Mutant("merge-lora-te-unet-swapped", "huabi/service/adapters.py",
           "uses.append(LoraUse(name, find_lora_file(name, folders), te_weight, unet_weight))",
           "uses.append(LoraUse(name, find_lora_file(name, folders), unet_weight, te_weight))",
           ("tests/test_reference_merge_lora.py", "tests/test_lora_engine.py")),
    Mutant("openclip-bang-is-padding", "huabi/models/tokenizer.py",
           "split_special_tokens=pad_token == OPEN_CLIP_PAD_TOKEN,",
           "split_special_tokens=False,",
           ("tests/test_reference_clip_tokenizer.py", "tests/test_tokenizer.py", "tests/test_conditioning.py")),
    # ---- prompt chunking (A1111's tokenize_line)
    Mutant("chunk-comma-backtrack-19", "huabi/core/conditioning.py",
           "and len(current.ids) - last_comma <= comma_backtrack",
           "and len(current.ids) - last_comma < comma_backtrack",
           ("tests/test_reference_prompt_chunks.py", "tests/test_conditioning.py", "tests/test_prompt_conditioning.py")),
    Mutant("chunk-double-break-no-empty-chunk", "huabi/core/conditioning.py",
           "if not units and index > 0 and index == len(segments) - 1:",
           "if not units and index > 0:",
           ("tests/test_reference_prompt_chunks.py", "tests/test_conditioning.py", "tests/test_prompt_conditioning.py")),
    # ---- IP-Adapter (its maths is diffusers' processor; the old test compared with diffusers itself)
    Mutant("ip-adapter-k-v-swapped", "huabi/service/attention_adapters.py",
           'processor.load_state_dict({"to_k_ip.0.weight": k.to(torch.float32), "to_v_ip.0.weight": v.to(torch.float32)})',
           'processor.load_state_dict({"to_k_ip.0.weight": v.to(torch.float32), "to_v_ip.0.weight": k.to(torch.float32)})',
           ("tests/test_reference_ip_adapter.py", "tests/test_ip_adapter.py")),
    # ---- ControlNet units (the older two-unit test only asked for a different output)
    Mutant("controlnet-down-last-unit-only", "huabi/pipelines/control.py",
           "down = [a + b for a, b in zip(down, scaled[:-1], strict=True)]",
           "down = scaled[:-1]",
           ("tests/test_reference_multicontrol.py", "tests/test_controlnet.py")),
    Mutant("controlnet-mid-last-unit-only", "huabi/pipelines/control.py",
           "mid = mid + scaled[-1]",
           "mid = scaled[-1]",
           ("tests/test_reference_multicontrol.py", "tests/test_controlnet.py")),
    # ---- the memory guard
    Mutant("memory-guard-skips-hires-target", "huabi/service/plans.py",
           "engine.check_memory(bundle, hires_w, hires_h, request.batch_size)",
           "pass",
           ("tests/test_memory_guard.py", "tests/test_hires.py")),
    Mutant("memory-estimate-ignores-batch", "huabi/service/devices.py",
           "unet_bytes = 2 * batch_size * tokens",
           "unet_bytes = 2 * tokens",
           ("tests/test_memory_guard.py", "tests/test_device_choice.py")),
    Mutant("dtype-auto-threshold-strict", "huabi/service/device_choice.py",
           "if speedup >= BF16_MIN_SPEEDUP:",
           "if speedup > BF16_MIN_SPEEDUP:",
           ("tests/test_dtype_auto_rules.py", "tests/test_device_choice.py")),
    # ---- upscaler networks (the other upscaler tests compare huabi with itself)
    Mutant("rrdb-dense-residual-scale", "huabi/models/upscalers.py",
           "seen.append(F.leaky_relu(out, 0.2))\n        return x + 0.2 * out",
           "seen.append(F.leaky_relu(out, 0.2))\n        return x + 0.25 * out",
           ("tests/test_reference_spandrel.py", "tests/test_upscale.py")),
    Mutant("compact-no-nearest-skip", "huabi/models/upscalers.py",
           'return out + F.interpolate(x, scale_factor=self._scale, mode="nearest")',
           "return out",
           ("tests/test_reference_spandrel.py", "tests/test_upscale.py")),
    Mutant("noise-first-seed-only", "huabi/core/noise.py",
           "torch.randn(shape, generator=_cpu_generator(s)) for s in seeds",
           "torch.randn(shape, generator=_cpu_generator(seeds[0])) for s in seeds",
           ("tests/test_noise.py",)),
    # ---- one infotext, one schedule; reproducible files; one LoRA lookup
    Mutant("flow-hires-diffusers-steps", "huabi/service/flow_plans.py",
           "embeddings=embeddings, fixed_steps=True)",
           "embeddings=embeddings, fixed_steps=False)",
           ("tests/test_flow_hires_steps.py", "tests/test_flow_engine.py")),
    Mutant("safetensors-metadata-hash-order", "huabi/models/formats.py",
           "        _sort_header_metadata(temp)\n",
           "",
           ("tests/test_merge.py",)),
    Mutant("server-loras-own-list", "huabi/server/catalog.py",
           "lora_files(lora_folders(self.models_dir))",
           "lora_files(lora_folders(self.models_dir)[:-1])",
           ("tests/test_server_loras.py",)),
)


def apply(source_root: Path, mutant: Mutant) -> bool:
    """Apply ``mutant`` inside ``source_root`` (a copy of src/); False if its snippet is not there exactly once."""
    target = source_root / mutant.path
    text = target.read_text(encoding="utf-8")
    if text.count(mutant.original) != 1:
        return False
    target.write_text(text.replace(mutant.original, mutant.replacement), encoding="utf-8")
    return True


def run_tests(source_root: Path, tests: list[str], timeout_s: float) -> tuple[int, float]:
    env = dict(os.environ, PYTHONPATH=str(source_root), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore", *tests]
    started = time.monotonic()
    try:
        completed = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   timeout=timeout_s)
        code = completed.returncode
    except subprocess.TimeoutExpired:
        code = -1  # a mutant that hangs the suite counts as killed (a timeout is a failure)
    return code, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    parser.add_argument("--exclude", action="append", default=[],
                        help="leave out test targets starting with this (repeatable), e.g. to measure 'before'")
    parser.add_argument("--baseline", action="store_true", help="first run every chosen test on the unmutated copy")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant (default 900)")
    args = parser.parse_args(argv)

    known = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        print(f"mutate: unknown mutant(s) {', '.join(unknown)}; --list shows them", file=sys.stderr)
        return 2
    chosen = [known[n] for n in args.names] if args.names else list(MUTANTS)

    def tests_of(mutant: Mutant) -> list[str]:
        return [t for t in mutant.tests if not any(t.startswith(prefix) for prefix in args.exclude)]

    if args.list:
        for mutant in chosen:
            print(f"{mutant.name:42} {mutant.path:32} {' '.join(mutant.tests)}")
        return 0

    results: list[tuple[str, str, float]] = []
    with tempfile.TemporaryDirectory(prefix="huabi-mutate-") as scratch:
        pristine = Path(scratch) / "pristine"
        shutil.copytree(ROOT / "src", pristine, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        if args.baseline:
            every = sorted({t for m in chosen for t in tests_of(m)})
            code, seconds = run_tests(pristine, every, args.timeout * 4)
            print(f"baseline: {'pass' if code == 0 else f'FAIL (exit {code})'} in {seconds:.0f}s", flush=True)
            if code != 0:
                print("mutate: the tests fail without any mutant; fix that first", file=sys.stderr)
                return 2
        for mutant in chosen:
            tests = tests_of(mutant)
            work = Path(scratch) / "mutant"
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(pristine, work)  # a fresh copy per mutant: nothing leaks between them
            if not tests:
                outcome, seconds = "no tests", 0.0
            elif not apply(work, mutant):
                outcome, seconds = "stale", 0.0
            else:
                code, seconds = run_tests(work, tests, args.timeout)
                outcome = "survived" if code == 0 else ("killed (timeout)" if code == -1 else "killed")
            results.append((mutant.name, outcome, seconds))
            print(f"{mutant.name:42} {outcome:18} {seconds:6.0f}s", flush=True)

    counted = [r for r in results if r[1] not in ("stale", "no tests")]
    killed = sum(1 for r in counted if r[1].startswith("killed"))
    stale = [r[0] for r in results if r[1] == "stale"]
    print(f"kill rate: {killed}/{len(counted)}" + (f" ({100 * killed / len(counted):.0f}%)" if counted else ""))
    if stale:
        print(f"stale (snippet not found once; update the list): {', '.join(stale)}")
    return 0 if killed == len(counted) and not stale else 1


if __name__ == "__main__":
    sys.exit(main())
