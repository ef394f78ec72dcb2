"""huabi vs diffusers on the same full-size SD1.5-architecture model (random weights).

    .venv/bin/python bench/bench_sd15_vs_diffusers.py --steps 4 --size 512 --dtype fp32

Reports seconds per denoising step (prompt encoding included), VAE decode time,
peak resident memory and the huabi/diffusers ratios, measured in the same run.
On these 2-core CPUs one CFG step of this UNet is ~1.35 TFLOP; two cores peak
near 0.45 TFLOP/s in bf16, so ~3 s per step is the floor.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from harness import compare, print_report


def build_sd15_bundle(dtype: torch.dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from huabi.core.schedules import scaled_linear_alphas_cumprod
    from huabi.models.bundle import ModelBundle
    from huabi.models.configs import reference_configs
    from huabi.models.family import ModelFamily, Prediction, UNetVariant
    from huabi.models.tokenizer import load_tokenizers

    torch.manual_seed(0)
    configs = reference_configs(ModelFamily.SD1)
    unet = UNet2DConditionModel.from_config(configs["unet"]).to(dtype).eval()
    vae = AutoencoderKL.from_config(configs["vae"]).to(dtype).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])).to(dtype).eval()
    return ModelBundle(
        family=ModelFamily.SD1, prediction=Prediction.EPSILON, variant=UNetVariant.BASE,
        unet=unet, vae=vae, text_encoders=[text_encoder], tokenizers=load_tokenizers(ModelFamily.SD1),
        alphas_cumprod=scaled_linear_alphas_cumprod(), native_size_px=512, name="bench-sd15",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    started = time.perf_counter()
    bundle = build_sd15_bundle({"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
    print(f"built SD1.5-architecture model in {time.perf_counter() - started:.1f} s")
    result = compare(bundle, steps=args.steps, size_px=args.size, batch=1, rounds=args.rounds)
    result["model"] = "SD1.5 architecture, random weights"
    print_report(result)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
