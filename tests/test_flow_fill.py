"""FLUX.1 Fill: the masked-image latent and the folded mask as extra input channels, against diffusers'
FluxFillPipeline on a tiny random Fill model (384 input channels); ``huabi edit --mask`` and
``--outpaint`` with a Fill model through the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flow_fixtures import TinyFlowModel, plain_clip
from huabi.cli.main import main
from huabi.core.noise import initial_noise
from huabi.errors import HuabiError
from huabi.models.flow_load import load_flow_model
from huabi.models.transformer_families import TransformerFamily as F
from huabi.models.transformer_families import detect_transformer
from huabi.pipelines.flow import FlowRequest, clip_tokenizer, flow_generate, pack_latents, t5_tokenizer, unpack_latents
from huabi.service.pngio import read_infotext

PROMPT = "a red apple on a wooden table"
RELATIVE_TOLERANCE = 1e-4  # as tests/test_flow_families.py


@pytest.fixture(scope="module")
def fill():
    model = TinyFlowModel(F.FLUX_FILL)
    # diffusers' Fill pipeline encodes with a *sampled* latent (mean + std * noise); huabi uses the mean
    # (as Forge/ComfyUI do). A log-variance of -30 makes std ~3e-7 so both see the same latent.
    conv = model.vae.encoder.conv_out
    with torch.no_grad():
        conv.weight[16:].zero_()
        conv.bias[16:].fill_(-30.0)
    return model


def _image_and_mask():
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 16, 40, 56))
    return image, mask


def test_fill_model_is_detected_and_loads(fill, tmp_path):
    assert detect_transformer(fill.transformer_original()).family is F.FLUX_FILL
    bundle = load_flow_model(fill.write_all_in_one(tmp_path / "fill.safetensors"))
    assert bundle.family is F.FLUX_FILL and bundle.transformer.config.in_channels == 384


def test_fill_pipeline_equals_diffusers_flux_fill_pipeline(fill, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline

    bundle = load_flow_model(fill.write_all_in_one(tmp_path / "fill.safetensors"))
    image, mask = _image_and_mask()
    request = FlowRequest(PROMPT, steps=4, width_px=64, height_px=64, distilled_guidance=30.0, max_t5_tokens=32)
    seeds = [7, 8]
    ours = flow_generate(bundle, request, seeds, init_image=image, mask=mask, strength=1.0, decode=False).latents

    pipe = FluxFillPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                  base_image_seq_len=256, max_image_seq_len=4096),
        vae=fill.vae, text_encoder=plain_clip(fill.clip_l), tokenizer=clip_tokenizer(True), text_encoder_2=fill.t5,
        tokenizer_2=t5_tokenizer(), transformer=fill.transformer)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(PROMPT, image=image, mask_image=mask, height=64, width=64, num_inference_steps=4, guidance_scale=30.0,
                     latents=pack_latents(initial_noise(seeds, (16, 8, 8))), output_type="latent", max_sequence_length=32,
                     num_images_per_prompt=2).images
    reference = unpack_latents(reference, 8, 8)
    scale = reference.abs().max().item()
    assert (ours.float() - reference.float()).abs().max().item() <= RELATIVE_TOLERANCE * scale

    # the mask matters: another mask gives another image, and Fill without a mask is refused
    other = Image.new("L", (64, 64), 0)
    other.paste(255, (32, 0, 64, 64))
    moved = flow_generate(bundle, request, [7], init_image=image, mask=other, decode=False).latents
    assert not torch.allclose(moved, ours[:1], atol=1e-3 * scale)
    with pytest.raises(HuabiError, match="Fill repaints the masked part"):
        flow_generate(bundle, request, [7])


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, fill):
    root = tmp_path_factory.mktemp("fill_models")
    fill.write_parts(root)
    fill.write_transformer(root / "flux1-fill-dev-tiny.safetensors", prefix="model.diffusion_model.")
    return root


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_edit_inpaint_and_outpaint_with_a_fill_model(models_dir, tmp_path, capsys):
    image, mask = _image_and_mask()
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    common = ["--model", "flux1-fill-dev-tiny", "--models-dir", str(models_dir), "--steps", "3", "--seed", "5",
              "--strength", "1", "--quiet"]
    code, out, err = _run(["edit", str(tmp_path / "in.png"), "a green apple", "--mask", str(tmp_path / "mask.png"),
                           "--mask-blur", "0", *common, "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    infotext = read_infotext(out.split()[0])
    assert "Distilled CFG Scale: 30" in infotext and "Denoising strength: 1" in infotext and "Mask blur: 0" in infotext
    code, out, err = _run(["edit", str(tmp_path / "in.png"), "a green apple", "--outpaint", "left=32,down=16",
                           *common, "--out", str(tmp_path / "b")], capsys)
    assert code == 0, err
    result = Image.open(out.split()[0])
    assert result.size == (96, 80)
    # pasted back: away from the new strips (their 8-pixel overlap and the 4-pixel mask blur) the
    # original's pixels are kept exactly
    kept = np.asarray(result)[0:40, 56:96]
    assert np.array_equal(kept, np.asarray(image)[0:40, 24:64])
    assert not np.array_equal(np.asarray(result)[:, :24], np.zeros((80, 24, 3), np.uint8))
    assert "Outpaint: \"left=32,down=16\"" in read_infotext(out.split()[0])
    code, out, err = _run(["generate", "x", "--model", "flux1-fill-dev-tiny", "--models-dir", str(models_dir),
                           "--size", "64x64", "--quiet", "--out", str(tmp_path / "c")], capsys)
    assert code != 0 and err.count("\n") == 1 and "FLUX.1 Fill: it edits an image through a mask" in err
