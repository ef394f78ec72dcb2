"""FLUX.1 dev on a scaled-down transformer: seconds per step and peak memory, huabi vs diffusers.

The transformer has FLUX.1's real layout and widths (3072 channels, 24 heads of 128, MLP 12288,
T5 context 4096, pooled 768, guidance embedder) but only ``--double`` double blocks and ``--single``
single blocks of the real 19 + 38 (default 1 + 2: about 0.6 B of the 11.9 B parameters). T5 has the
real width and one block; CLIP-L the real width and one layer; the VAE is tiny (decoding is not
timed). Weights are random; files are written once, in BFL's layout (bf16 safetensors) and as
ComfyUI-GGUF Q8_0 and Q4_0 files, then each configuration runs in its own process so peak memory
(resident set, sampled every 5 ms, weights included) is its own:

* ``diffusers-bf16``: ``FluxPipeline`` with ``FluxTransformer2DModel.from_single_file`` (local config);
* ``huabi-bf16``: ``huabi.models.flow_load.load_flow_model`` + ``huabi.pipelines.flow.flow_generate``;
* ``diffusers-Q8_0`` / ``diffusers-Q4_0``: diffusers' GGUF loader (``GGUFQuantizationConfig``, dequantized per use);
* ``huabi-Q8_0`` / ``huabi-Q4_0``: huabi's GGUF reader, weights packed and dequantized per use.

Seconds per step are the mean over the steps after the first (the first includes one-off work).
Ratios are huabi / diffusers for the same weights in the same run. Usage:
``python bench/bench_flux.py --steps 3 --size 256`` (results as a table and JSON).
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PROMPT = "a lighthouse on a cliff at sunset"
CONFIGS = ("diffusers-bf16", "huabi-bf16", "diffusers-Q8_0", "huabi-Q8_0", "diffusers-Q4_0", "huabi-Q4_0")


def build_files(folder: Path, double: int, single: int) -> None:
    """Random weights in FLUX's real layout, written as BFL bf16 + GGUF Q8_0/Q4_0 + parts + a config folder."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from huabi.models.convert import vae_to_original
    from huabi.models.flow_load import write_transformer_gguf
    from huabi.models.transformer_families import flux_to_original

    torch.manual_seed(0)
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(num_layers=double, num_single_layers=single, guidance_embeds=True)
    generator = torch.Generator().manual_seed(1)
    weights = {}
    for name, tensor in transformer.state_dict().items():
        scale = (1.0 / tensor.shape[-1]) ** 0.5 if tensor.ndim > 1 else 0.02
        values = torch.randn(tensor.shape, generator=generator) * scale
        if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm_added" in name:
            values = values + 1.0
        weights[name] = values.to(torch.bfloat16)
    original = flux_to_original(weights)
    save_file({k: v.contiguous() for k, v in original.items()}, str(folder / "flux-bench-bf16.safetensors"))
    for qtype in ("Q8_0", "Q4_0"):
        write_transformer_gguf({k: v.float() for k, v in original.items()}, folder / f"flux-bench-{qtype}.gguf", qtype, arch="flux")
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    (folder / "config" / "transformer").mkdir(parents=True)
    (folder / "config" / "transformer" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **config}))
    (folder / "config" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    del weights, original, transformer

    parts = folder / "text_encoders"
    parts.mkdir()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=1,
                                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in clip.state_dict().items()}, str(parts / "clip_l.safetensors"))
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    t5_sd = {k: v.to(torch.bfloat16).contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(t5_sd, str(parts / "t5xxl_fp16.safetensors"))
    (folder / "vae").mkdir()
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        block_out_channels=[32] * 4, layers_per_block=1, latent_channels=16, use_quant_conv=False,
                        use_post_quant_conv=False)
    save_file({k: v.contiguous() for k, v in vae_to_original(vae.state_dict()).items()}, str(folder / "vae" / "ae.safetensors"))
    (folder / "config" / "vae").mkdir()
    vae_config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    vae_config.update(scaling_factor=0.3611, shift_factor=0.1159)
    (folder / "config" / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **vae_config}))


def run_one(name: str, folder: Path, steps: int, size: int, t5_tokens: int) -> dict:
    import torch

    from harness import PeakRSS

    torch.manual_seed(0)
    kind, weights = name.split("-")
    main = folder / ("flux-bench-bf16.safetensors" if weights == "bf16" else f"flux-bench-{weights}.gguf")
    stamps: list[float] = []
    with PeakRSS() as peak:
        started = time.perf_counter()
        if kind == "huabi":
            from huabi.models.flow_load import load_flow_model
            from huabi.pipelines.flow import FlowRequest, flow_generate

            bundle = load_flow_model(main, models_dir=folder, dtype=torch.bfloat16, gguf_on_the_fly=True)
            loaded = time.perf_counter()
            request = FlowRequest(PROMPT, steps=steps, width_px=size, height_px=size, max_t5_tokens=t5_tokens)
            flow_generate(bundle, request, [1], on_step=lambda done, total: stamps.append(time.perf_counter()), decode=False)
        else:
            from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, GGUFQuantizationConfig
            from huabi.models.flow_load import TensorSource, build_t5
            from huabi.pipelines.flow import clip_tokenizer, t5_tokenizer

            kwargs = {"torch_dtype": torch.bfloat16}
            if weights != "bf16":
                kwargs["quantization_config"] = GGUFQuantizationConfig(compute_dtype=torch.bfloat16)
            transformer = FluxTransformer2DModel.from_single_file(str(main), config=str(folder / "config"), subfolder="transformer", **kwargs)
            vae = AutoencoderKL.from_single_file(str(folder / "vae" / "ae.safetensors"), config=str(folder / "config"), subfolder="vae",
                                                 torch_dtype=torch.bfloat16)
            from huabi.models.flow_load import _clip_from_hf  # the parts are plain state dicts: built as huabi does

            source = TensorSource([folder / "text_encoders" / "clip_l.safetensors"])
            clip_model = _clip_from_hf({k: source[k] for k in source}, prefix="", activation="quick_gelu", pad_id=49407, dtype=torch.bfloat16)
            t5_source = TensorSource([folder / "text_encoders" / "t5xxl_fp16.safetensors"])
            t5_model = build_t5({k: t5_source[k] for k in t5_source}, device="cpu", dtype=torch.bfloat16)
            scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                        base_image_seq_len=256, max_image_seq_len=4096)
            pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip_model, tokenizer=clip_tokenizer(True),
                                text_encoder_2=t5_model, tokenizer_2=t5_tokenizer(), transformer=transformer)
            pipe.set_progress_bar_config(disable=True)
            loaded = time.perf_counter()

            def callback(pipeline, step, timestep, tensors):
                stamps.append(time.perf_counter())
                return tensors

            pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=3.5, output_type="latent",
                 max_sequence_length=t5_tokens, generator=torch.Generator().manual_seed(1), callback_on_step_end=callback)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {
        "config": name,
        "load_s": round(loaded - started, 2),
        "s_per_step": round(sum(gaps) / len(gaps), 3) if gaps else None,
        "peak_gib": round(peak.peak_bytes / 2**30, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--t5-tokens", type=int, default=64)
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=2)
    parser.add_argument("--only", nargs="*", choices=CONFIGS, help="run only these configurations")
    parser.add_argument("--files", type=Path, help="keep the generated model files in this folder and reuse them")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.folder, args.steps, args.size, args.t5_tokens)))
        return
    with tempfile.TemporaryDirectory(prefix="bench_flux_") as tmp:
        folder = args.files or Path(tmp)
        started = time.perf_counter()
        if not (folder / "flux-bench-bf16.safetensors").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            build_files(folder, args.double, args.single)
        print(f"files written in {time.perf_counter() - started:.1f} s: "
              + ", ".join(f"{p.name} {p.stat().st_size / 2**20:.0f} MiB" for p in sorted(folder.glob("flux-bench-*"))), flush=True)
        results = {}
        for name in args.only or CONFIGS:
            command = [sys.executable, __file__, "--one", name, "--folder", str(folder), "--steps", str(args.steps),
                       "--size", str(args.size), "--t5-tokens", str(args.t5_tokens)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"{name}: failed\n{done.stderr[-2000:]}", flush=True)
                continue
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(results[name]), flush=True)
    print(f"\nFLUX scaled down ({args.double} double + {args.single} single blocks at full width), {args.size}x{args.size}, "
          f"{args.steps} steps, bf16 compute, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"{'weights':8} {'diffusers s/step':>17} {'huabi s/step':>13} {'ratio':>6} {'diffusers peak GiB':>19} {'huabi peak GiB':>15}")
    for weights in ("bf16", "Q8_0", "Q4_0"):
        theirs, ours = results.get(f"diffusers-{weights}"), results.get(f"huabi-{weights}")
        if not theirs or not ours or not theirs["s_per_step"] or not ours["s_per_step"]:
            continue
        print(f"{weights:8} {theirs['s_per_step']:>17} {ours['s_per_step']:>13} {ours['s_per_step'] / theirs['s_per_step']:>6.2f} "
              f"{theirs['peak_gib']:>19} {ours['peak_gib']:>15}")


if __name__ == "__main__":
    main()
