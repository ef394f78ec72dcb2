"""InstructPix2Pix: three-way guidance, unscaled image latent, against diffusers' pipeline; CLI and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cli_runner import run
from huabi.core.guidance import UNetInputs
from huabi.core.infotext import parse_infotext
from huabi.core.request import EditOptions
from huabi.errors import HuabiError
from huabi.models.family import ModelFamily, UNetVariant
from huabi.models.load import load_model
from huabi.pipelines.common import denoise, encode_guidance, latent_shape
from huabi.pipelines.instruct import InstructCFGDenoiser, instruct_image_latent, instruct_pix2pix
from huabi.service.pngio import read_infotext
from test_img2img import gradient_image

CPU = torch.device("cpu")
# Measured max|ours - theirs| / max|theirs| = 3.1e-6 (Euler/Karras, 5 steps, seed 77); the same bound as the
# txt2img and img2img comparisons.
RELATIVE_TOLERANCE = 2e-5


@pytest.fixture(scope="module")
def ip2p_file(tiny_model_factory) -> Path:
    return tiny_model_factory(ModelFamily.SD1, UNetVariant.INSTRUCT_PIX2PIX)


@pytest.fixture(scope="module")
def ip2p(ip2p_file):
    bundle = load_model(ip2p_file, device=CPU, dtype=torch.float32, compute_hash=False)
    assert bundle.variant is UNetVariant.INSTRUCT_PIX2PIX
    return bundle


def test_matches_diffusers_instruct_pix2pix_pipeline(ip2p):
    """Same model, instruction, image latent, noise and Euler/Karras sigmas as diffusers'
    StableDiffusionInstructPix2PixPipeline: diffusers takes a 4-channel ``image`` as the image
    latent as is, so both get our unscaled VAE mode; it starts from ``latents * init_noise_sigma``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=ip2p.vae, text_encoder=ip2p.text_encoders[0], tokenizer=ip2p.tokenizers[0], unet=ip2p.unet,
        scheduler=EulerDiscreteScheduler(use_karras_sigmas=True, beta_start=0.00085, beta_end=0.012,
                                         beta_schedule="scaled_linear"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    image_latent = instruct_image_latent(ip2p, gradient_image(), CPU)
    guidance = encode_guidance(ip2p, "make it snowy", "blurry", clip_skip=1, width_px=64, height_px=64, device=CPU)
    ours = denoise(
        ip2p, guidance, sampler_name="Euler", schedule_name="Karras", steps=5, cfg_scale=7.5, seeds=[77],
        shape=latent_shape(ip2p, 64, 64), device=CPU, image_channels=image_latent,
        guided_denoiser=lambda m, c, u, s: InstructCFGDenoiser(m, c, u, s, 1.5),
    )
    pipe.scheduler.set_timesteps(5)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(77))
    start = noise * float(pipe.scheduler.sigmas[0]) / float(pipe.scheduler.init_noise_sigma)
    with torch.inference_mode():
        theirs = pipe("make it snowy", image=image_latent, num_inference_steps=5, guidance_scale=7.5,
                      image_guidance_scale=1.5, negative_prompt="blurry", latents=start,
                      output_type="latent").images
    relative = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    print(f"relative difference {relative:.2e}")
    assert relative < RELATIVE_TOLERANCE


def test_image_latent_is_the_unscaled_mode(ip2p):
    image = gradient_image()
    latent = instruct_image_latent(ip2p, image, CPU)
    from huabi.pipelines.img2img import encode_image

    scaled = encode_image(ip2p, image, CPU)  # mean * scaling factor (img2img's start)
    torch.testing.assert_close(latent * ip2p.latent_scaling_factor, scaled, rtol=1e-6, atol=1e-6)
    # Plain img2img on an instruct model (direct pipeline use) feeds the same unscaled latent.
    from huabi.pipelines.img2img import img2img_image_channels

    torch.testing.assert_close(img2img_image_channels(ip2p, scaled, 2), latent.expand(2, -1, -1, -1))


class _Recorder:
    """A fake UNet-level denoiser: returns each row's first context value as a constant image."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, inputs):
        self.calls.append(inputs)
        level = inputs.context[:, 0, 0] + (0 if inputs.channels is None else inputs.channels.flatten(1).mean(1))
        return level.reshape(-1, 1, 1, 1).expand_as(x).clone()


def test_three_way_combination():
    """eps = n + s_I (i - n) + s_T (t - i), on the x0 outputs, with zero channels for the image-free branch."""
    channels = torch.full((1, 4, 2, 2), 0.5)
    cond = UNetInputs(torch.full((1, 3, 2), 3.0), channels=channels)  # text branch -> 3.5
    uncond = UNetInputs(torch.full((1, 3, 2), 1.0), channels=channels)  # image branch -> 1.5, nothing -> 1.0
    model = _Recorder()
    denoiser = InstructCFGDenoiser(model, [(cond, 1.0)], uncond, 7.0, 1.5)
    out = denoiser(torch.zeros(1, 4, 2, 2), torch.tensor([1.0]))
    assert torch.allclose(out, torch.full_like(out, 1.0 + 1.5 * (1.5 - 1.0) + 7.0 * (3.5 - 1.5)))
    batched = model.calls[0]
    assert batched.context.shape[0] == 3 and torch.equal(batched.channels[2], torch.zeros(4, 2, 2))
    assert denoiser.step == 1


def test_pipeline_strengths(ip2p):
    from huabi.core.request import GenerationRequest

    request = GenerationRequest(prompt="make it snowy", steps=3, sampler="Euler", seed=3)
    image = gradient_image()
    full = instruct_pix2pix(ip2p, request, image, [3], device=CPU)
    again = instruct_pix2pix(ip2p, request, image, [3], device=CPU)
    assert torch.equal(full.latents, again.latents)
    partial = instruct_pix2pix(ip2p, request, image, [3], denoising_strength=0.5, device=CPU)
    assert not torch.equal(full.latents, partial.latents)
    none = instruct_pix2pix(ip2p, request, image, [3], denoising_strength=0.0, device=CPU)
    from huabi.pipelines.img2img import encode_image

    torch.testing.assert_close(none.latents, encode_image(ip2p, image, CPU))
    other_scale = instruct_pix2pix(ip2p, request, image, [3], image_cfg_scale=3.0, device=CPU)
    assert not torch.equal(full.latents, other_scale.latents)


def test_not_an_instruct_model_is_an_error(tiny_sd1_file):
    from huabi.core.request import GenerationRequest

    bundle = load_model(tiny_sd1_file, compute_hash=False)
    with pytest.raises(HuabiError, match=r"^instruct: .* is not an InstructPix2Pix model \(its UNet takes 4 input "
                                         r"channels, instruct-pix2pix takes 8\)"):
        instruct_pix2pix(bundle, GenerationRequest(prompt="x", steps=1), gradient_image(), [1], device=CPU)


def test_edit_options_validation():
    with pytest.raises(HuabiError, match=r"^image cfg scale: must be a number from 0 to 100, got -1"):
        EditOptions(init_image="a.png", instruct=True, image_cfg_scale=-1)
    with pytest.raises(HuabiError, match=r"^instruct: cannot be combined with a mask or outpainting"):
        EditOptions(init_image="a.png", instruct=True, mask_image="m.png")


def test_cli_instruct_edit_and_from(capsys, ip2p_file, tmp_path):
    init = tmp_path / "init.png"
    gradient_image().save(init)
    code, out, err = run(capsys, "edit", init, "make it snowy", "--instruct", "--image-cfg-scale", "1.25",
                         "--model", ip2p_file, "--steps", "3", "--seed", "9", "--out", tmp_path / "a", "--quiet")
    assert code == 0, err
    [path] = [Path(line) for line in out.splitlines()]
    params = parse_infotext(read_infotext(path)).params
    assert params["Image CFG scale"] == "1.25"
    assert params["Denoising strength"] == "1"
    # --from redoes it exactly (instruct mode comes back from "Image CFG scale").
    code, out, err = run(capsys, "edit", init, "--from", path, "--model", ip2p_file, "--out", tmp_path / "b", "--quiet")
    assert code == 0, err
    [again] = [Path(line) for line in out.splitlines()]
    from PIL import Image

    assert Image.open(again).tobytes() == Image.open(path).tobytes()
    assert read_infotext(again) == read_infotext(path)


def test_cli_instruct_on_plain_model_is_an_error(capsys, tiny_sd1_file, tmp_path):
    init = tmp_path / "init.png"
    gradient_image().save(init)
    code, _out, err = run(capsys, "edit", init, "make it snowy", "--instruct", "--model", tiny_sd1_file,
                          "--steps", "1", "--out", tmp_path, "--quiet")
    assert code == 2
    assert err.strip().startswith("huabi: error: instruct: ") and "is not an InstructPix2Pix model" in err
    assert len(err.strip().splitlines()) == 1
