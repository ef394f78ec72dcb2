"""Seconds per LoRA training step: huabi's network vs a plain diffusers + peft loop, same model, batch, precision.

    .venv/bin/python bench/bench_train_lora.py --model sd15 --steps 2        # full-size SD1.5 UNet at 512, random weights
    .venv/bin/python bench/bench_train_lora.py --model mini --steps 10       # huabi-mini at 128, batch 4

One step = UNet forward on noisy latents with cached text embeddings, MSE loss on the
noise, backward, AdamW step, exactly what ``huabi train lora --network-train-unet-only``
does per step after caching. Both sides train the same modules (kohya's set: attention,
feed-forward and proj_in/out of every transformer block) at the same rank and alpha, on the
same UNet weights, inputs and precision. Each implementation runs in its own child process
(so peak resident memory is its own), alternating, in the same invocation; the report gives
median s/step, peak RSS and the huabi/peft ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def build_unet(model: str):
    import torch

    if model == "sd15":
        from diffusers import UNet2DConditionModel

        from huabi.models.configs import reference_configs
        from huabi.models.family import ModelFamily

        torch.manual_seed(0)
        return UNet2DConditionModel.from_config(reference_configs(ModelFamily.SD1)["unet"]).eval(), 512, 768
    from huabi.models.load import load_model
    from huabi.train.user_train import builtin_model

    bundle = load_model(builtin_model(), compute_hash=False)
    return bundle.unet, bundle.native_size_px, bundle.unet.config.cross_attention_dim


def child(args) -> None:
    import torch

    from huabi.models.family import ModelFamily
    from huabi.train.common import autocast
    from huabi.train.networks import Network, NetworkConfig, find_targets

    torch.set_num_threads(args.threads)
    unet, size_px, width = build_unet(args.model)
    unet.requires_grad_(False)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    config = NetworkConfig(dim=args.rank, alpha=args.rank, train_text_encoder=False)
    targets = find_targets(unet, [], ModelFamily.SD1, config)
    if args.impl == "huabi":
        network = Network(targets, config).attach()
        params = list(network.parameters())
    else:
        from peft import LoraConfig

        names = {id(module): name for name, module in unet.named_modules()}
        target_names = [names[id(module)] for _kohya, module in targets]
        unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=target_names))
        params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    latent = size_px // 8
    latents = torch.randn(args.batch, 4, latent, latent, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    context = torch.randn(args.batch, 77, width, generator=generator)
    timesteps = torch.randint(0, 1000, (args.batch,), generator=generator)
    times = []
    for step in range(args.steps + 1):  # the first step warms up
        started = time.perf_counter()
        with autocast("cpu", args.precision):
            prediction = unet(latents + noise, timesteps, encoder_hidden_states=context).sample.float()
        loss = torch.nn.functional.mse_loss(prediction, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - started)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"impl": args.impl, "s_per_step": statistics.median(times), "steps": times, "peak_rss_mb": round(peak_mb),
                      "trainable": sum(p.numel() for p in params), "modules": len(targets), "loss": float(loss)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["sd15", "mini"], default="mini")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=None, help="default: 1 for sd15, 4 for mini")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="alternating child runs per implementation")
    parser.add_argument("--impl", choices=["huabi", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.batch is None:
        args.batch = 1 if args.model == "sd15" else 4
    if args.impl:
        child(args)
        return
    results: dict[str, list[dict]] = {"huabi": [], "peft": []}
    for _round in range(args.rounds):
        for impl in ("huabi", "peft"):
            command = [sys.executable, __file__, "--impl", impl, "--model", args.model, "--steps", str(args.steps),
                       "--batch", str(args.batch), "--rank", str(args.rank), "--precision", args.precision,
                       "--threads", str(args.threads)] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            results[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {impl: {"s_per_step": statistics.median(r["s_per_step"] for r in runs),
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "trainable": runs[0]["trainable"],
                      "modules": runs[0]["modules"]} for impl, runs in results.items()}
    summary["ratio_huabi_over_peft"] = round(summary["huabi"]["s_per_step"] / summary["peft"]["s_per_step"], 3)
    summary["settings"] = {k: v for k, v in vars(args).items() if k not in ("impl", "json")}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": results}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
