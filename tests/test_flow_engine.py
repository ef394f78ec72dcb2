"""SD3/FLUX on the engine's shared path: one job entry, the same batch loop (progress events with
phases, live previews, interrupt/skip), LoRA as a patch kept between jobs and restored bit for bit,
X/Y/Z grids, and the hires fix against diffusers' FluxPipeline + FluxImg2ImgPipeline (the second pass by
A1111's fixed-steps rule: diffusers run with ``int(S / strength)`` steps at that strength, whose last S run)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from flow_fixtures import TinyFlowModel, plain_clip
from huabi.core.flow import flow_sigmas, flux_shift_for
from huabi.core.noise import initial_noise
from huabi.core.request import EditOptions, GenerationRequest
from huabi.errors import HuabiError
from huabi.models.transformer_families import TransformerFamily as F
from huabi.pipelines.flow import clip_tokenizer, pack_latents, t5_tokenizer, unpack_latents
from huabi.service.engine import Engine, Job
from huabi.service.progress import Cancellation
from huabi.service.pngio import read_infotext

RELATIVE_TOLERANCE = 1e-4  # as tests/test_flow_families.py: float32 pipelines, |latent| ~ 100


@pytest.fixture(scope="module")
def flux():
    return TinyFlowModel(F.FLUX_DEV)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, flux):
    root = tmp_path_factory.mktemp("flow_engine")
    flux.write_parts(root)
    flux.write_transformer(root / "flux1-dev-tiny.safetensors")
    TinyFlowModel(F.SD3_MEDIUM).write_all_in_one(root / "sd3-tiny.safetensors")
    # A diffusers-layout LoRA on the double block's image query projection.
    generator = torch.Generator().manual_seed(9)
    (root / "Lora").mkdir()
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 64, generator=generator),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(64, 4, generator=generator),
               "transformer.transformer_blocks.0.attn.to_q.alpha": torch.tensor(4.0)},
              str(root / "Lora" / "tiny_flux_lora.safetensors"))
    return root


@pytest.fixture()
def engine(models_dir):
    return Engine(device="cpu", dtype="fp32", models_dir=models_dir)


def _request(**changes) -> GenerationRequest:
    base = dict(prompt="a red apple", model="flux1-dev-tiny", width_px=64, height_px=64, steps=3, sampler="Euler",
                seed=11, cfg_scale=1.0)
    base.update(changes)
    return GenerationRequest(**base)


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= RELATIVE_TOLERANCE * scale, f"max diff {diff} vs scale {scale}"


def test_progress_events_previews_and_saved_callbacks_come_from_the_shared_loop(engine, tmp_path):
    events, previews, saved = [], [], []
    images = engine.run(Job(_request(batch_count=2)), out_dir=tmp_path, on_event=events.append,
                        on_preview=lambda done, total, pictures: previews.append((done, total, pictures)),
                        on_saved=saved.append)
    assert len(images) == 2 and [image.seed for image in images] == [11, 12]
    assert [(e.step, e.total, e.batch, e.batch_count) for e in events] == [
        (1, 6, 0, 2), (2, 6, 0, 2), (3, 6, 0, 2), (4, 6, 1, 2), (5, 6, 1, 2), (6, 6, 1, 2)]
    assert all(e.latent is not None and e.latent.shape == (1, 16, 8, 8) for e in events)
    assert [p[:2] for p in previews] == [(e.step, e.total) for e in events]
    assert previews[0][2][0].size == (8, 8)  # cheap preview at latent resolution, factors fitted to the VAE
    assert [item.path for item in saved] == [image.path for image in images] and all(p.exists() for p in saved_paths(saved))


def saved_paths(saved):
    return [item.path for item in saved]


def test_cheap_preview_factors_are_fitted_to_the_loaded_flow_vae(engine):
    # Only the wiring can be checked on a random tiny VAE (far from linear): the previewer uses the
    # least-squares factors of the bundle's own VAE for its 16 latent channels.
    from huabi.service.previews import fitted_latent_rgb, make_previewer

    bundle = engine.load("flux1-dev-tiny")
    previewer = make_previewer("cheap", bundle)
    assert previewer.mapping == fitted_latent_rgb(bundle) and len(previewer.mapping.factors) == 16
    assert previewer(torch.zeros(2, 16, 8, 8))[1].size == (8, 8)


def test_interrupt_stops_further_batches_and_skip_ends_one(engine):
    cancel = Cancellation()

    def on_event(event):
        if event.step == 1:
            cancel.interrupt()

    images = engine.run(Job(_request(batch_count=3)), on_event=on_event, cancel=cancel)
    assert len(images) == 1  # the running batch ends early with its latest estimate; no more batches
    cancel = Cancellation()
    steps_seen = []

    def on_skip(event):
        steps_seen.append((event.batch, event.step))
        if event.batch == 0 and event.step == 1:
            cancel.skip()

    images = engine.run(Job(_request(batch_count=2)), on_event=on_skip, cancel=cancel)
    assert len(images) == 2 and (0, 2) not in steps_seen and (1, 6) in steps_seen


def test_lora_is_a_patch_kept_between_jobs_and_restored_bit_for_bit(engine, models_dir):
    bundle = engine.load("flux1-dev-tiny")
    weight = bundle.transformer.transformer_blocks[0].attn.to_q.weight
    base = weight.detach().clone()
    plain = engine.run(Job(_request()))[0]
    with_lora = engine.run(Job(_request(prompt="a red apple <lora:tiny_flux_lora:0.5>")))[0]
    assert "Lora hashes: \"tiny_flux_lora: " in with_lora.infotext
    lora = {k: v for k, v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(models_dir / "Lora" / "tiny_flux_lora.safetensors")).items()}
    up = lora["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
    down = lora["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
    expected = base + 0.5 * (4.0 / 4) * up @ down
    assert torch.allclose(weight, expected, atol=1e-5)  # merged, and kept after the job (reused by the next)
    again = engine.run(Job(_request(prompt="a red apple <lora:tiny_flux_lora:0.5>")))[0]
    assert np.array_equal(np.asarray(again.image), np.asarray(with_lora.image))
    back = engine.run(Job(_request()))[0]
    assert torch.equal(weight, base)  # a job without the tag gets the base weights back bit for bit
    assert np.array_equal(np.asarray(back.image), np.asarray(plain.image))
    assert not np.array_equal(np.asarray(with_lora.image), np.asarray(plain.image))
    assert "Lora hashes" not in back.infotext


def test_xyz_grid_runs_flux_cells_through_the_engine(models_dir, tmp_path, capsys):
    from huabi.cli.main import main

    code = main(["xyz", "a red apple", "--model", "flux1-dev-tiny", "--models-dir", str(models_dir), "--size", "64x64",
                 "--sampler", "Euler", "--seed", "3", "--x", "Steps: 1, 2", "--quiet", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    grids = sorted(tmp_path.rglob("xyz_grid-*.png"))
    assert grids, captured.out
    assert "Steps: 1" in read_infotext(sorted(p for p in tmp_path.rglob("*.png") if "grid" not in p.name)[0])


def test_refusals_are_one_line_and_name_the_feature(engine):
    with pytest.raises(HuabiError, match="FLUX.1 dev: refiner not supported"):
        engine.run(Job(_request(refiner="sd3-tiny")))
    with pytest.raises(HuabiError, match="outpainting needs a FLUX.1 Fill model"):
        engine.prepare(Job(_request(), EditOptions(init_image="x.png", outpaint=(16, 0, 0, 0))),
                       images=(Image.new("RGB", (64, 64)), None))


# --------------------------------------------------------------------------- hires fix vs diffusers


def _pipes(model: TinyFlowModel):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxPipeline

    def scheduler():
        return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096)

    parts = dict(vae=model.vae, text_encoder=plain_clip(model.clip_l), tokenizer=clip_tokenizer(True),
                 text_encoder_2=model.t5, tokenizer_2=t5_tokenizer(), transformer=model.transformer)
    first = FluxPipeline(scheduler=scheduler(), **parts)
    second = FluxImg2ImgPipeline(scheduler=scheduler(), **parts)
    for pipe in (first, second):
        pipe.set_progress_bar_config(disable=True)
    return first, second


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix_equals_diffusers_txt2img_then_img2img(engine, flux, upscaler):
    from huabi.pipelines.flow import decode_latents, encode_image

    steps, hires_steps, denoise, guidance, seeds = 4, 4, 0.5, 3.5, [21]
    request = _request(prompt="a red apple", steps=steps, seed=seeds[0], hires=True, hires_scale=2.0,
                       hires_upscaler=upscaler, hires_steps=hires_steps, hires_denoise=denoise,
                       extra=(("Distilled CFG Scale", str(guidance)),))
    prepared = engine.prepare(Job(request))
    bundle = prepared.bundle
    events = []
    ours = prepared.plan.run_batch(bundle, seeds, None, events.append, prepared.embeddings)
    assert ours.images[0].size == (128, 128) and (ours.width_px, ours.height_px) == (64, 64)
    assert [e.phase for e in events] == ["first pass"] * 4 + ["hires"] * 4  # fixed steps: exactly hires_steps
    assert [e.step for e in events] == list(range(1, 9))

    first, second = _pipes(flux)
    max_t5 = 512  # FLUX dev's T5 length, as the engine runs it
    first_latents = unpack_latents(first("a red apple", height=64, width=64, num_inference_steps=steps,
                                         guidance_scale=guidance, latents=pack_latents(initial_noise(seeds, (16, 8, 8))),
                                         output_type="latent", max_sequence_length=max_t5).images, 8, 8)
    if upscaler == "Latent":
        upscaled = torch.nn.functional.interpolate(first_latents.float(), size=(16, 16), mode="bilinear")
    else:
        image = decode_latents(bundle, first_latents)[0].resize((128, 128), Image.LANCZOS)
        upscaled = encode_image(bundle, image, "cpu")
    # A1111's fixed-steps rule through diffusers: FluxImg2ImgPipeline with int(S / strength) steps at that
    # strength runs the last int(N * strength) = S of them; the start sigma is that schedule's (N - S)th.
    schedule_length = int(hires_steps / denoise)
    sigmas = flow_sigmas(schedule_length, shift=flux_shift_for(128, 128))
    start = float(sigmas[schedule_length - hires_steps])
    noised = (1 - start) * upscaled + start * initial_noise(seeds, (16, 16, 16))
    reference = second("a red apple", image=Image.new("RGB", (128, 128)), height=128, width=128, strength=denoise,
                       num_inference_steps=schedule_length, guidance_scale=guidance,
                       latents=pack_latents(noised.float()), output_type="latent", max_sequence_length=max_t5).images
    from huabi.pipelines.flow import FlowRequest, flow_generate

    # our final latent, recomputed without decoding, equals diffusers' (images are decoded from it)
    flow_first = FlowRequest("a red apple", steps=steps, width_px=64, height_px=64, distilled_guidance=guidance)
    flow_second = FlowRequest("a red apple", steps=hires_steps, width_px=128, height_px=128, distilled_guidance=guidance)
    from huabi.service.flow_plans import _flow_hires_plan, flow_hires_upscale

    our_first = flow_generate(bundle, flow_first, seeds, decode=False).latents
    _close(our_first, first_latents)
    our_up = flow_hires_upscale(bundle, our_first, upscaler, _flow_hires_plan(request, 64, 64), None, torch.device("cpu"))
    ours_final = flow_generate(bundle, flow_second, seeds, init_latent=our_up, strength=denoise, decode=False,
                               fixed_steps=True).latents
    _close(ours_final, unpack_latents(reference, 16, 16))
    assert np.array_equal(np.asarray(decode_latents(bundle, ours_final)[0]), np.asarray(ours.images[0]))


def test_hires_infotext_and_from_reproduce(models_dir, tmp_path, capsys):
    from huabi.cli.main import main

    code = main(["generate", "a red apple", "--model", "sd3-tiny", "--models-dir", str(models_dir), "--size", "64x64",
                 "--steps", "2", "--seed", "4", "--cfg", "3", "--hires", "--hires-scale", "1.5", "--hires-steps", "2",
                 "--hires-denoise", "0.6", "--quiet", "--out", str(tmp_path / "a")])
    out = capsys.readouterr().out
    assert code == 0
    first = out.split()[0]
    infotext = read_infotext(first)
    assert Image.open(first).size == (96, 96)
    assert "Size: 64x64" in infotext and "Denoising strength: 0.6" in infotext and "Hires upscale: 1.5" in infotext
    code = main(["generate", "--from", first, "--models-dir", str(models_dir), "--quiet", "--out", str(tmp_path / "b")])
    again = capsys.readouterr().out.split()[0]
    assert code == 0 and read_infotext(again) == infotext
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


def test_backend_vae_choices_for_flow_models(models_dir, tmp_path):
    # Tiled decoding works on the 16-channel VAE (an image wider than one 512-pixel tile); huabi's TAESD
    # decodes SD1/SDXL latents only, so --vae-decoder taesd is refused for SD3/FLUX in one line.
    tiled = Engine(device="cpu", dtype="fp32", models_dir=models_dir, vae_tiling=True)
    image = tiled.run(Job(_request(width_px=576, height_px=32, steps=1)))[0]
    assert image.image.size == (576, 32)
    from huabi.service.previews import with_vae

    bundle = tiled.load("flux1-dev-tiny")
    with pytest.raises(HuabiError, match="taesd:PATH decodes SD1/SDXL latents"):
        with_vae(bundle, tiny_decoder=object())
