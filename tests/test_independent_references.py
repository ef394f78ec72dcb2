"""The pipeline glue checked against independent references on the same inputs (issue 22).

Each test here kills one mutant that the rest of the suite let live (see
scripts/mutate.py): the reference is computed without huabi's own helpers.

* Inpaint paste-back: A1111's mask blur (``cv2.GaussianBlur`` on the 8-bit mask,
  x then y, kernel ``2*int(2.5*r+0.5)+1``) and overlay (original with alpha
  ``255 - mask`` alpha-composited by Pillow over the generated image), from the
  user's mask, not huabi's returned one. Both round to 8 bits at different points
  (cv2 after each pass, huabi once), so pixels may differ by 1 level (measured: at
  most 1); asserted <= 2 levels, while a hard threshold or a missing blur moves
  edge pixels by tens of levels.
* 9-channel inpainting: the UNet's extra channels against diffusers'
  ``VaeImageProcessor`` / ``StableDiffusionInpaintPipeline.prepare_mask_latents``
  (mask binarised at 0.5, masked image ``image * (mask < 0.5)``, nearest resize),
  with the VAE's mode (``retrieve_latents(..., sample_mode="argmax")``) because
  huabi encodes deterministically. float32, same modules: asserted 1e-5 relative.
* v-prediction: huabi's sampler vs ``StableDiffusionPipeline`` with a
  ``prediction_type="v_prediction"`` scheduler on the tiny SD2-v model, same
  prompt embeddings, noise and Karras sigmas. Same tolerance as the eps
  txt2img comparison (2e-5 relative to the largest latent).
* Hires second pass: every sigma the second pass's denoiser sees equals the ones
  A1111's "fixed steps" rule (its hires fix always uses it) picks from an independently
  computed (diffusers) Karras schedule of ``int(S / min(d, 0.999))`` steps: the last S
  (huabi computes the schedule in float32, diffusers in float64: measured 6e-6 relative;
  asserted 1e-5).
* Two LoRAs with weights: diffusers' ``set_adapters([a, b], [wa, wb])`` +
  ``fuse_lora`` vs huabi's patched weights (1e-6 absolute, as for one LoRA).
* img2img encode: diffusers' ``VaeImageProcessor.preprocess`` (pixels to [-1, 1])
  and ``AutoencoderKL.encode(...).latent_dist.mode() * scaling_factor`` vs huabi's
  init latent, through ``encode_image`` and through ``img2img`` itself
  (strength 0 returns the init latent). Asserted 1e-5 relative.

Measured on the tiny models (float32, CPU): overlay at most 1 level; masked-image latent
3.1e-6; v-prediction latents 2.5e-6; init latent 2.6e-6 (all relative to the largest value); two
LoRAs 6.0e-8 absolute on every weight.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from huabi.core.request import EditOptions, GenerationRequest
from huabi.models.family import ModelFamily, Prediction, UNetVariant
from huabi.models.load import load_model

CPU = torch.device("cpu")
SIZE_PX = 64
SEED = 1234
RELATIVE_TOLERANCE = 1e-5
SCHEDULER_BASE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max()).item()


def test_image() -> Image.Image:
    """A smooth colour gradient with a diagonal, so any wrong pixel mapping shows."""
    y, x = np.mgrid[0:SIZE_PX, 0:SIZE_PX].astype(np.float32)
    rgb = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


test_image.__test__ = False  # a helper, not a test


def square_mask(left: int = 24, top: int = 24, right: int = 40, bottom: int = 40) -> Image.Image:
    """White (repaint) square away from the border, so no blur kernel reaches an edge."""
    mask = np.zeros((SIZE_PX, SIZE_PX), dtype=np.uint8)
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask)


@pytest.fixture(scope="module")
def sd1_bundle(tiny_sd1_file):
    return load_model(tiny_sd1_file, compute_hash=False)


# --------------------------------------------------------------------------- inpaint blend


def a1111_blurred_mask(mask: Image.Image, radius: int) -> np.ndarray:
    """A1111's mask blur: separable cv2 Gaussian on the 8-bit mask, x pass then y pass."""
    array = np.array(mask.convert("L"))
    kernel = 2 * int(2.5 * radius + 0.5) + 1
    array = cv2.GaussianBlur(array, (kernel, 1), radius)
    return cv2.GaussianBlur(array, (1, kernel), radius)


def a1111_overlay(original: Image.Image, generated: Image.Image, blurred_mask: np.ndarray) -> np.ndarray:
    """A1111's paste-back: the original, with alpha = inverted blurred mask, composited over the result."""
    overlay = original.convert("RGBA")
    overlay.putalpha(Image.fromarray(255 - blurred_mask))
    return np.asarray(Image.alpha_composite(generated.convert("RGBA"), overlay).convert("RGB"))


@pytest.mark.parametrize("radius", [4, 2])
def test_inpaint_paste_back_is_a1111s_soft_blend(sd1_bundle, monkeypatch, radius):
    import huabi.pipelines.inpaint as inpaint_module

    decoded: list[Image.Image] = []
    real_decode = inpaint_module.decode_latents

    def recording_decode(bundle, latents):  # a spy: records the generated pixels, changes nothing
        images = real_decode(bundle, latents)
        decoded.extend(images)
        return images

    monkeypatch.setattr(inpaint_module, "decode_latents", recording_decode)
    image, mask = test_image(), square_mask()
    options = EditOptions(init_image="x.png", mask_blur_px=radius, denoising_strength=0.9)
    request = GenerationRequest("a red apple", steps=3, sampler="Euler", schedule="Karras", cfg_scale=5.0)
    result = inpaint_module.inpaint(sd1_bundle, request, image, mask, [SEED], options, device=CPU)
    [generated] = decoded
    expected = a1111_overlay(image, generated, a1111_blurred_mask(mask, radius))
    ours = np.asarray(result.images[0]).astype(int)
    difference = np.abs(ours - expected.astype(int))
    print(f"blur {radius}: max |huabi - A1111 overlay| = {difference.max()} levels")
    assert difference.max() <= 2
    # The blend zone must really blend: generated and original differ there.
    ring = (a1111_blurred_mask(mask, radius) > 0) & (a1111_blurred_mask(mask, radius) < 255)
    assert np.abs(np.asarray(generated).astype(int) - np.asarray(image).astype(int))[ring].mean() > 10


# --------------------------------------------------------------------------- 9-channel inpainting


def test_inpainting_model_channels_match_diffusers(tiny_model_factory, monkeypatch):
    from diffusers import EulerDiscreteScheduler, StableDiffusionInpaintPipeline
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    import huabi.pipelines.inpaint as inpaint_module

    bundle = load_model(tiny_model_factory(ModelFamily.SD1, UNetVariant.INPAINT), compute_hash=False)
    assert bundle.variant is UNetVariant.INPAINT
    seen: dict = {}
    real_img2img = inpaint_module.img2img

    def recording_img2img(*args, **kwargs):  # a spy on what the pipeline hands the UNet
        seen["channels"] = kwargs["image_channels"]
        return real_img2img(*args, **kwargs)

    monkeypatch.setattr(inpaint_module, "img2img", recording_img2img)
    image, mask = test_image(), square_mask(16, 24, 48, 40)
    options = EditOptions(init_image="x.png", mask_blur_px=0, denoising_strength=1.0)
    request = GenerationRequest("a red apple", steps=2, sampler="Euler", schedule="Karras")
    inpaint_module.inpaint(bundle, request, image, mask, [SEED], options, device=CPU)

    pipe = StableDiffusionInpaintPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0], unet=bundle.unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER_BASE), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    init = pipe.image_processor.preprocess(image, height=SIZE_PX, width=SIZE_PX).float()
    mask_t = pipe.mask_processor.preprocess(mask, height=SIZE_PX, width=SIZE_PX).float()
    masked_image = init * (mask_t < 0.5)
    with torch.inference_mode():
        masked_latent = retrieve_latents(pipe.vae.encode(masked_image), sample_mode="argmax")
        masked_latent = masked_latent * pipe.vae.config.scaling_factor
        small_mask, masked_latent = pipe.prepare_mask_latents(
            mask_t, masked_latent, 1, SIZE_PX, SIZE_PX, torch.float32, CPU, None, False)
    reference = torch.cat([small_mask, masked_latent], dim=1)
    ours = seen["channels"]
    assert ours.shape == reference.shape
    assert torch.equal(ours[:, :1], reference[:, :1]), "mask channel differs from diffusers'"
    difference = relative_difference(ours[:, 1:], reference[:, 1:])
    print(f"masked-image latent: relative difference vs diffusers {difference:.2e}")
    assert difference < RELATIVE_TOLERANCE


# --------------------------------------------------------------------------- v-prediction


def test_v_prediction_sampling_matches_diffusers(tiny_model_factory):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from huabi.pipelines.common import denoise, encode_guidance, latent_shape

    bundle = load_model(tiny_model_factory(ModelFamily.SD2, prediction=Prediction.V), compute_hash=False)
    assert bundle.prediction is Prediction.V
    steps, cfg = 5, 6.5
    guidance = encode_guidance(bundle, "a lighthouse", "blurry", clip_skip=1, width_px=SIZE_PX, height_px=SIZE_PX,
                               device=CPU)
    shape = latent_shape(bundle, SIZE_PX, SIZE_PX)
    ours = denoise(bundle, guidance, sampler_name="Euler", schedule_name="Karras", steps=steps, cfg_scale=cfg,
                   seeds=[SEED], shape=shape, device=CPU)

    conds, uncond = guidance.conditioning(steps)
    scheduler = EulerDiscreteScheduler(use_karras_sigmas=True, prediction_type="v_prediction", **SCHEDULER_BASE)
    pipe = StableDiffusionPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0], unet=bundle.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(steps)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))[None]
    start = noise * float(pipe.scheduler.sigmas[0]) / float(pipe.scheduler.init_noise_sigma)
    with torch.inference_mode():
        theirs = pipe(prompt_embeds=conds[0][0].at(0).context, negative_prompt_embeds=uncond.at(0).context,
                      num_inference_steps=steps, guidance_scale=cfg, height=SIZE_PX, width=SIZE_PX, latents=start,
                      output_type="latent").images
    difference = relative_difference(ours, theirs)
    print(f"v-prediction: relative difference vs diffusers {difference:.2e}")
    assert difference < 2e-5


# --------------------------------------------------------------------------- hires second pass


def _hires_second_pass_sigmas(bundle, **request_fields) -> list[float]:
    """Every sigma the hires second pass's denoiser is called with (Euler: one call per step)."""
    from huabi.pipelines.hires import hires_txt2img
    from huabi.pipelines.patches import HIRES_PASS, Patch

    calls: list[float] = []

    class RecordSigmas(Patch):
        def wrap(self, denoiser, denoise_pass):
            def recording(x, sigma):
                if denoise_pass.name == HIRES_PASS:
                    calls.append(float(sigma.flatten()[0]))
                return denoiser(x, sigma)
            return recording

    request = GenerationRequest("a red apple", sampler="Euler", schedule="Karras", width_px=SIZE_PX,
                                height_px=SIZE_PX, hires=True, hires_scale=1.5, **request_fields)
    hires_txt2img(bundle, request, [SEED], device=CPU, patches=(RecordSigmas(),))
    assert calls, "the second pass never called the denoiser"
    return calls


def _a1111_fixed_steps_tail(hires_steps: int, hires_denoise: float) -> list[float]:
    """A1111/Forge ``setup_img2img_steps(p, steps=S)`` then ``sigmas[steps - t_enc - 1:]``, written out:
    a Karras schedule (diffusers') of ``int(S / min(d, 0.999))`` steps, t_enc = S - 1."""
    from diffusers import EulerDiscreteScheduler

    schedule_steps = int(hires_steps / min(hires_denoise, 0.999))
    t_enc = hires_steps - 1
    reference = EulerDiscreteScheduler(use_karras_sigmas=True, **SCHEDULER_BASE)
    reference.set_timesteps(schedule_steps)
    return [float(sigma) for sigma in reference.sigmas[schedule_steps - t_enc - 1:-1]]  # the last (0) is no call


@pytest.mark.parametrize("hires_denoise", [0.45, 0.8])
def test_hires_second_pass_starts_at_the_documented_sigma(sd1_bundle, hires_denoise):
    """The second pass starts at sigma ``karras(int(S / d))[int(S / d) - S]``: A1111's fixed-steps rule,
    which its hires fix always uses (not plain img2img's ``karras(S)[S - int(d * S) - 1]``)."""
    hires_steps = 6
    second = _hires_second_pass_sigmas(sd1_bundle, steps=3, hires_steps=hires_steps, hires_denoise=hires_denoise)
    expected = _a1111_fixed_steps_tail(hires_steps, hires_denoise)[0]
    print(f"hires denoise {hires_denoise}: start sigma {second[0]:.6f}, expected {expected:.6f}")
    assert second[0] == pytest.approx(expected, rel=RELATIVE_TOLERANCE)
    assert len(second) == hires_steps  # Euler: one call per step, exactly S steps


@pytest.mark.parametrize(("steps", "hires_steps", "hires_denoise"), [(3, 6, 0.45), (4, 0, 0.3), (2, 5, 1.0)])
def test_hires_second_pass_follows_a1111_fixed_steps_rule(sd1_bundle, steps, hires_steps, hires_denoise):
    """A1111 (processing.py: ``sample_img2img(..., steps=self.hr_second_pass_steps or self.steps)``;
    sd_samplers_common.setup_img2img_steps with ``steps`` given): a schedule of ``int(S / min(d, 0.999))``
    steps of which the last S run, so the second pass always takes exactly S steps (S = the first
    pass's steps when ``Hires steps`` is 0; at d = 1 the plain S-step schedule). Every sigma compared,
    relative to the largest (the smallest sigmas carry float32 vs float64 rounding of sigma_min:
    measured 1.3e-5 relative on the last, 9e-7 of the first; neighbouring sigmas differ by > 10%)."""
    second = _hires_second_pass_sigmas(sd1_bundle, steps=steps, hires_steps=hires_steps, hires_denoise=hires_denoise)
    expected = _a1111_fixed_steps_tail(hires_steps or steps, hires_denoise)
    assert len(second) == len(expected) == (hires_steps or steps)
    assert second == pytest.approx(expected, rel=0, abs=RELATIVE_TOLERANCE * expected[0])


# --------------------------------------------------------------------------- two LoRAs


def test_two_weighted_loras_match_diffusers_set_adapters(tiny_sd1_file, tmp_path):
    from test_lora import _diffusers_pipe, all_tensors, kohya_lora_state_dict, max_difference, write_lora

    from huabi.service.adapters import LoraPatcher, LoraUse

    ours = load_model(tiny_sd1_file, compute_hash=False)
    theirs = load_model(tiny_sd1_file, compute_hash=False)
    first = write_lora(tmp_path / "first.safetensors", kohya_lora_state_dict(ours, seed=1))
    second = write_lora(tmp_path / "second.safetensors", kohya_lora_state_dict(ours, seed=2))
    weights = (0.7, -0.4)
    LoraPatcher().activate(ours, [LoraUse("first", first, weights[0], weights[0]),
                                  LoraUse("second", second, weights[1], weights[1])])

    pipe = _diffusers_pipe(theirs)
    pipe.load_lora_weights(str(first), adapter_name="first")
    pipe.load_lora_weights(str(second), adapter_name="second")
    pipe.set_adapters(["first", "second"], adapter_weights=list(weights))
    pipe.fuse_lora(adapter_names=["first", "second"])
    pipe.unload_lora_weights()
    difference = max_difference(all_tensors(ours), all_tensors(theirs))
    print(f"two LoRAs: max |huabi - diffusers| = {difference:.2e}")
    assert difference < 1e-6


# --------------------------------------------------------------------------- img2img encode


def diffusers_init_latent(bundle, image: Image.Image) -> torch.Tensor:
    from diffusers.image_processor import VaeImageProcessor

    pixels = VaeImageProcessor(vae_scale_factor=8).preprocess(image).float()  # [-1, 1]
    with torch.inference_mode():
        return bundle.vae.encode(pixels).latent_dist.mode() * bundle.vae.config.scaling_factor


def test_img2img_init_latent_matches_diffusers_vae_encode(sd1_bundle):
    from huabi.pipelines.img2img import encode_image, img2img

    image = test_image()
    reference = diffusers_init_latent(sd1_bundle, image)
    direct = encode_image(sd1_bundle, image, CPU)
    assert relative_difference(direct, reference) < RELATIVE_TOLERANCE
    request = GenerationRequest("a red apple", steps=3, sampler="Euler", schedule="Karras")
    result = img2img(sd1_bundle, request, image, [SEED], denoising_strength=0.0, device=CPU)
    difference = relative_difference(result.latents, reference)
    print(f"img2img init latent: relative difference vs diffusers {difference:.2e}")
    assert difference < RELATIVE_TOLERANCE


def test_vae_decode_matches_diffusers(sd1_bundle):
    from diffusers.image_processor import VaeImageProcessor

    from huabi.pipelines.common import decode_latents

    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(SEED))
    ours = decode_latents(sd1_bundle, latents)
    with torch.inference_mode():
        pixels = sd1_bundle.vae.decode(latents / sd1_bundle.vae.config.scaling_factor).sample
    theirs = VaeImageProcessor(vae_scale_factor=8).postprocess(pixels, output_type="pil")
    for mine, reference in zip(ours, theirs, strict=True):
        difference = np.abs(np.asarray(mine).astype(int) - np.asarray(reference).astype(int))
        # diffusers rounds (x / 2 + 0.5) * 255, huabi (x + 1) * 127.5: a tie may round either way.
        assert difference.max() <= 1
        assert (difference > 0).mean() < 0.01
