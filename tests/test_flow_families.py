"""SD3/SD3.5/FLUX.1: detection, every file layout against diffusers' own loader, the pipeline against
diffusers' pipelines, seeds, img2img/inpaint, memory options. Tiny random models (tests/flow_fixtures.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flow_fixtures import TinyFlowModel, plain_clip
from huabi.core.flow import flow_sigmas, flux_mu, shift_sigmas
from huabi.core.noise import initial_noise
from huabi.errors import HuabiError
from huabi.models.flow_load import load_flow_model, read_transformer_gguf, write_transformer_gguf
from huabi.models.transformer_families import TransformerFamily as F
from huabi.models.transformer_families import detect_transformer
from huabi.pipelines.flow import (
    FlowRequest,
    clip_tokenizer,
    flow_generate,
    pack_latents,
    t5_tokenizer,
    unpack_latents,
)

ALL = [F.FLUX_DEV, F.FLUX_SCHNELL, F.SD3_MEDIUM, F.SD35_MEDIUM, F.SD35_LARGE]
PROMPT = "a red apple on a wooden table"
# Latents of random tiny models reach |x| ~ 100-250; float32 pipelines differing only in the order
# of a few operations (sigma in float64 vs float32) agree to ~1e-6 of that.
RELATIVE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def models():
    return {family: TinyFlowModel(family) for family in ALL}


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= RELATIVE_TOLERANCE * scale, f"max diff {diff} vs scale {scale}"


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize("family", ALL)
def test_detects_each_family_in_both_prefix_layouts(models, family):
    original = models[family].transformer_original()
    assert detect_transformer(original).family is family
    prefixed = {"model.diffusion_model." + k: v for k, v in original.items()}
    found = detect_transformer(prefixed)
    assert found.family is family and found.prefix == "model.diffusion_model."
    diffusers_names = models[family].transformer.state_dict()
    assert detect_transformer(diffusers_names).family is family


def test_dev_and_schnell_differ_only_by_guidance_embedder(models):
    dev = models[F.FLUX_DEV].transformer_original()
    without = {k: v for k, v in dev.items() if not k.startswith("guidance_in.")}
    assert detect_transformer(without).family is F.FLUX_SCHNELL


def test_unknown_variants_are_one_line_errors(models):
    dev = dict(models[F.FLUX_DEV].transformer_original())
    dev["img_in.weight"] = torch.zeros(64, 128)
    with pytest.raises(HuabiError, match=r"FLUX.1 Depth/Canny .* not supported") as info:
        detect_transformer(dev, source="flux1-depth-dev.safetensors")
    assert "\n" not in str(info.value)
    dev["img_in.weight"] = torch.zeros(64, 96)
    with pytest.raises(HuabiError, match="96 input channels is an unknown variant"):
        detect_transformer(dev)
    with pytest.raises(HuabiError, match="not an SD3 or FLUX transformer"):
        detect_transformer({"input_blocks.0.0.weight": torch.zeros(1)})


# --------------------------------------------------------------------------- loading vs diffusers' loader


def _diffusers_single_file(model: TinyFlowModel, path, tmp_path, **kwargs):
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel

    config = model.write_diffusers_config(tmp_path / "config")
    cls = FluxTransformer2DModel if model.family.is_flux else SD3Transformer2DModel
    transformer = cls.from_single_file(str(path), config=str(config), subfolder="transformer", **kwargs)
    return transformer, AutoencoderKL, config


@pytest.mark.parametrize("family", ALL)
def test_all_in_one_file_equals_diffusers_from_single_file(models, family, tmp_path):
    """SD3: diffusers' ``from_single_file`` on the same file. FLUX: diffusers' single-file converter
    hard-codes FLUX's full width (3072), so the FLUX table is checked against it at full width in
    ``test_flux_table_equals_diffusers_converter_at_full_width``; here the round trip through huabi's
    own writer must give the diffusers module's tensors back."""
    model = models[family]
    path = model.write_all_in_one(tmp_path / f"{family.value}.safetensors")
    bundle = load_flow_model(path, low_memory=False)
    if family.is_flux:
        reference = model.transformer
        from diffusers import AutoencoderKL

        config = model.write_diffusers_config(tmp_path / "config")
    else:
        reference, AutoencoderKL, config = _diffusers_single_file(model, path, tmp_path, torch_dtype=torch.float32)
    ours, theirs = bundle.transformer.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    vae_ref = AutoencoderKL.from_single_file(str(path), config=str(config), subfolder="vae").state_dict()
    vae_ours = bundle.vae.state_dict()
    assert set(vae_ours) == set(vae_ref)
    assert all(torch.equal(vae_ours[k], vae_ref[k]) for k in vae_ref)
    encoders = bundle.encoders()
    for ours_module, source in ((encoders.clip_l, model.clip_l), (encoders.clip_g, model.clip_g), (encoders.t5, model.t5)):
        if source is None:
            continue
        reference_sd = source.state_dict()
        ours_sd = ours_module.state_dict()
        for key, value in reference_sd.items():
            assert torch.equal(ours_sd[key], value), key


@pytest.mark.parametrize("guidance", [True, False])
def test_flux_table_equals_diffusers_converter_at_full_width(guidance):
    """FLUX.1's real width (3072, MLP 12288) with one double and one single block. Tensors are
    row-distinct expanded views (every conversion op splits, swaps or joins rows), so the check
    costs a few hundred MB instead of 1.4 GB per block."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from huabi.models.transformer_families import flux_to_diffusers

    hidden, mlp, generator = 3072, 12288, torch.Generator().manual_seed(0)

    def rows(n: int, cols: int | None) -> torch.Tensor:
        column = torch.randn(n, generator=generator, dtype=torch.float32).to(torch.bfloat16)
        return column if cols is None else column[:, None].expand(n, cols)

    original = {}
    def linear(name, out_dim, in_dim):
        original[name + ".weight"], original[name + ".bias"] = rows(out_dim, in_dim), rows(out_dim, None)
    linear("img_in", hidden, 64); linear("txt_in", hidden, 4096)
    for part in ["time_in", "vector_in"] + (["guidance_in"] if guidance else []):
        linear(f"{part}.in_layer", hidden, 768 if part == "vector_in" else 256); linear(f"{part}.out_layer", hidden, hidden)
    for side in ("img", "txt"):
        d = f"double_blocks.0.{side}"
        linear(f"{d}_mod.lin", 6 * hidden, hidden); linear(f"{d}_attn.qkv", 3 * hidden, hidden); linear(f"{d}_attn.proj", hidden, hidden)
        linear(f"{d}_mlp.0", mlp, hidden); linear(f"{d}_mlp.2", hidden, mlp)
        original[f"{d}_attn.norm.query_norm.scale"] = rows(128, None)
        original[f"{d}_attn.norm.key_norm.scale"] = rows(128, None)
    linear("single_blocks.0.modulation.lin", 3 * hidden, hidden); linear("single_blocks.0.linear1", 3 * hidden + mlp, hidden)
    linear("single_blocks.0.linear2", hidden, hidden + mlp)
    original["single_blocks.0.norm.query_norm.scale"] = rows(128, None)
    original["single_blocks.0.norm.key_norm.scale"] = rows(128, None)
    linear("final_layer.linear", 64, hidden); linear("final_layer.adaLN_modulation.1", 2 * hidden, hidden)

    ours = flux_to_diffusers(original)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert ours[key].shape == value.shape and torch.equal(ours[key], value), key


def test_bfl_transformer_with_split_parts_found_in_models_folder(models, tmp_path):
    model = models[F.FLUX_DEV]
    model.write_parts(tmp_path / "models")
    transformer_path = model.write_transformer(tmp_path / "models" / "flux1-dev.safetensors")  # BFL names, no prefix
    bundle = load_flow_model(transformer_path, models_dir=tmp_path / "models")
    assert bundle.family is F.FLUX_DEV
    assert bundle.modules == ("ae", "clip_l", "t5xxl_fp16")
    theirs = model.transformer.state_dict()
    assert all(torch.equal(bundle.transformer.state_dict()[k], v) for k, v in theirs.items())


def test_split_parts_by_explicit_paths_and_missing_part_message(models, tmp_path):
    model = models[F.SD35_LARGE]
    parts = model.write_parts(tmp_path / "parts")
    path = model.write_transformer(tmp_path / "sd3.5_large.safetensors", prefix="model.diffusion_model.")
    bundle = load_flow_model(path, clip_l=parts["clip_l"], clip_g=parts["clip_g"], t5xxl=parts["t5xxl"], vae=parts["vae"])
    assert bundle.family is F.SD35_LARGE and bundle.encoders().t5 is not None
    with pytest.raises(HuabiError, match=r"SD3.5 Large transformer without clip_l .*clip_g .*VAE") as info:
        load_flow_model(path)
    assert "\n" not in str(info.value)
    flux = models[F.FLUX_SCHNELL].write_transformer(tmp_path / "schnell.safetensors")
    with pytest.raises(HuabiError, match=r"FLUX.1 schnell transformer without clip_l .*t5xxl .*ae.safetensors"):
        load_flow_model(flux)


def test_fp8_transformer_and_t5_stay_fp8_and_upcast_per_layer(models, tmp_path):
    model = models[F.FLUX_DEV]
    parts = model.write_parts(tmp_path / "models", t5_dtype=torch.float8_e4m3fn)
    path = model.write_transformer(tmp_path / "flux1-dev-fp8.safetensors", dtype=torch.float8_e4m3fn)
    bundle = load_flow_model(path, clip_l=parts["clip_l"], t5xxl=parts["t5xxl"], vae=parts["vae"])
    attention = bundle.transformer.transformer_blocks[0].attn.to_q
    stored = attention.parametrizations.weight.original
    assert stored.dtype == torch.float8_e4m3fn and attention.weight.dtype == torch.float32
    # every tensor: the diffusers module's value rounded to fp8 (the file) and upcast (at use)
    ours = {k.replace(".parametrizations.weight.original", ".weight"): v for k, v in bundle.transformer.state_dict().items()}
    for key, value in model.transformer.state_dict().items():
        expected = value.to(torch.float8_e4m3fn).float() if value.ndim >= 2 else value
        assert torch.equal(ours[key].float(), expected), key
    t5 = bundle.encoders().t5
    assert t5.encoder.block[0].layer[0].SelfAttention.q.parametrizations.weight.original.dtype == torch.float8_e4m3fn
    result = flow_generate(bundle, FlowRequest(PROMPT, steps=2, width_px=64, height_px=64, max_t5_tokens=16), [1])
    assert result.images[0].size == (64, 64)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_gguf_transformer_on_the_fly_equals_dequantized(models, tmp_path, qtype):
    model = models[F.FLUX_DEV]
    parts = model.write_parts(tmp_path / "models")
    gguf_path = tmp_path / f"flux1-dev-{qtype}.gguf"
    counts = write_transformer_gguf(model.transformer_original(), gguf_path, qtype, arch="flux")
    assert counts[qtype] > 0
    request = FlowRequest(PROMPT, steps=2, width_px=64, height_px=64, max_t5_tokens=16)
    packed = load_flow_model(gguf_path, models_dir=tmp_path / "models", gguf_on_the_fly=True)
    plain = load_flow_model(gguf_path, models_dir=tmp_path / "models", gguf_on_the_fly=False)
    assert packed.family is F.FLUX_DEV
    a = flow_generate(packed, request, [3], decode=False).latents
    b = flow_generate(plain, request, [3], decode=False).latents
    _close(a, b)
    # the packed weights, dequantized by diffusers' torch kernels, equal the gguf package's numpy dequantizer
    for name, module in packed.transformer.named_modules():
        if hasattr(module, "parametrizations") and "weight" in module.parametrizations:
            assert torch.equal(module.weight, plain.transformer.get_submodule(name).weight), name
    tensors, metadata, _ = read_transformer_gguf(gguf_path, on_the_fly=False)
    assert metadata["gguf.architecture"] == "flux" and "double_blocks.0.img_attn.qkv.weight" in tensors


def test_diffusers_folder_loads(models, tmp_path):
    model = models[F.SD3_MEDIUM]
    folder = model.write_diffusers_folder(tmp_path / "sd3-medium-diffusers")
    bundle = load_flow_model(folder)
    assert bundle.family is F.SD3_MEDIUM
    assert all(torch.equal(bundle.transformer.state_dict()[k], v) for k, v in model.transformer.state_dict().items())


# --------------------------------------------------------------------------- sigmas


def test_flow_sigmas_match_diffusers_schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sd3.set_timesteps(28)
    assert torch.allclose(flow_sigmas(28, shift=3.0, schedule="Uniform").float(), sd3.sigmas, atol=1e-6)
    flux = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)
    mu = flux_mu(4096)
    assert mu == pytest.approx(1.15)
    flux.set_timesteps(sigmas=np.linspace(1.0, 1 / 20, 20), mu=mu)
    ours = flow_sigmas(20, shift=float(np.exp(mu)), schedule="Simple")
    assert torch.allclose(ours.float(), flux.sigmas, atol=1e-6)
    assert shift_sigmas(torch.tensor([0.0, 1.0]), 3.0).tolist() == [0.0, 1.0]


# --------------------------------------------------------------------------- whole pipeline vs diffusers


def _flux_reference(model: TinyFlowModel, prompt: str, seeds, *, steps: int, guidance: float, t5_tokens: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    if model.family is F.FLUX_SCHNELL:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipe = FluxPipeline(scheduler=scheduler, vae=model.vae, text_encoder=plain_clip(model.clip_l), tokenizer=clip_tokenizer(True),
                        text_encoder_2=model.t5, tokenizer_2=t5_tokenizer(), transformer=model.transformer)
    pipe.set_progress_bar_config(disable=True)
    noise = initial_noise(seeds, (16, 8, 8))
    out = pipe(prompt, height=64, width=64, num_inference_steps=steps, guidance_scale=guidance, latents=pack_latents(noise),
               output_type="latent", max_sequence_length=t5_tokens, num_images_per_prompt=len(seeds)).images
    return unpack_latents(out, 8, 8)


@pytest.mark.parametrize("family", [F.FLUX_DEV, F.FLUX_SCHNELL])
def test_flux_pipeline_equals_diffusers(models, family, tmp_path):
    model = models[family]
    bundle = load_flow_model(model.write_all_in_one(tmp_path / "flux.safetensors"))
    request = FlowRequest(PROMPT, steps=4, width_px=64, height_px=64, distilled_guidance=4.0, max_t5_tokens=32)
    ours = flow_generate(bundle, request, [7, 8], decode=False).latents
    _close(ours, _flux_reference(model, PROMPT, [7, 8], steps=4, guidance=4.0, t5_tokens=32))


@pytest.mark.parametrize("family,with_t5", [(F.SD3_MEDIUM, True), (F.SD35_MEDIUM, False), (F.SD35_LARGE, True)])
def test_sd3_pipeline_with_cfg_equals_diffusers(models, family, with_t5, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    model = models[family]
    bundle = load_flow_model(model.write_all_in_one(tmp_path / "sd3.safetensors", with_t5=with_t5))
    request = FlowRequest(PROMPT, negative_prompt="blurry", cfg_scale=5.0, steps=4, width_px=64, height_px=64, max_t5_tokens=32)
    ours = flow_generate(bundle, request, [7], decode=False).latents
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=model.vae, text_encoder=model.clip_l, tokenizer=clip_tokenizer(True),
        text_encoder_2=model.clip_g, tokenizer_2=clip_tokenizer(False), text_encoder_3=model.t5 if with_t5 else None,
        tokenizer_3=t5_tokenizer() if with_t5 else None, transformer=model.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(PROMPT, negative_prompt="blurry", height=64, width=64, num_inference_steps=4, guidance_scale=5.0,
                     latents=initial_noise([7], (16, 8, 8)), output_type="latent", max_sequence_length=32,
                     sigmas=np.linspace(1.0, 1 / 4, 4)).images
    _close(ours, reference)


@pytest.mark.parametrize("family", [F.FLUX_DEV, F.SD3_MEDIUM])
@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "Heun", "DPM++ 2M"])
def test_image_i_of_a_batch_equals_single_run_with_seed_plus_i(models, family, sampler, tmp_path):
    # float64: batch-size-dependent float32 rounding (matmul blocking) is amplified by random weights
    bundle = load_flow_model(models[family].write_all_in_one(tmp_path / "m.safetensors"), dtype=torch.float64)
    request = FlowRequest(PROMPT, steps=3, sampler=sampler, width_px=64, height_px=64, max_t5_tokens=16, cfg_scale=1.0 if family.is_flux else 3.0)
    batch = flow_generate(bundle, request, [100, 101, 102], decode=False).latents
    single = flow_generate(bundle, request, [102], decode=False).latents
    assert (batch[2:3] - single).abs().max().item() <= 1e-9 * single.abs().max().item()
    assert not torch.allclose(batch[0], batch[1])


def test_img2img_starts_at_the_strength_sigma_and_inpaint_keeps_the_outside(models, tmp_path):
    model = models[F.FLUX_SCHNELL]
    bundle = load_flow_model(model.write_all_in_one(tmp_path / "m.safetensors"))
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    request = FlowRequest(PROMPT, steps=4, width_px=64, height_px=64, max_t5_tokens=16)
    result = flow_generate(bundle, request, [5], init_image=image, strength=0.5)
    assert len(result.sigmas) == 3 and result.sigmas[0] == pytest.approx(0.5)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    from huabi.pipelines.flow import encode_image

    init_latent = encode_image(bundle, image, "cpu")
    inpainted = flow_generate(bundle, request, [5], init_image=image, strength=1.0, mask=mask, decode=False).latents
    assert torch.allclose(inpainted[..., 5:], init_latent[..., 5:], atol=1e-6)  # column 4 is the soft edge
    assert not torch.allclose(inpainted[..., :4], init_latent[..., :4], atol=1e-3)


def test_low_memory_mode_loads_text_encoders_per_job(models, tmp_path):
    bundle = load_flow_model(models[F.FLUX_DEV].write_all_in_one(tmp_path / "m.safetensors"), low_memory=True)
    assert bundle.text_encoders is None
    request = FlowRequest(PROMPT, steps=2, width_px=64, height_px=64, max_t5_tokens=16)
    kept = load_flow_model(tmp_path / "m.safetensors")
    _close(flow_generate(bundle, request, [1], decode=False).latents, flow_generate(kept, request, [1], decode=False).latents)


def test_request_validation_messages():
    with pytest.raises(HuabiError, match="multiple of 16"):
        FlowRequest(PROMPT, width_px=72)
    with pytest.raises(HuabiError, match="not available for SD3/FLUX"):
        FlowRequest(PROMPT, sampler="DDIM")
    with pytest.raises(HuabiError, match="not a flow-matching schedule"):
        FlowRequest(PROMPT, schedule="Karras")


def test_t5_tokenizer_matches_sentencepiece():
    spm = pytest.importorskip("sentencepiece")
    from importlib import resources

    processor = spm.SentencePieceProcessor(model_file=str(resources.files("huabi") / "assets" / "t5_tokenizer" / "spiece.model"))
    tokenizer = t5_tokenizer()
    for text in ["a red apple on a wooden table", "Photo of a CAT, 4k, (masterpiece:1.2)", "naïve café — 東京 2026!"]:
        ours = tokenizer(text).input_ids
        assert ours == processor.encode(text) + [1], text  # T5 appends </s> (id 1)


# --------------------------------------------------------------------------- full-size configs (meta tensors)


@pytest.mark.parametrize("family", ALL)
def test_full_size_shipped_configs_detect_and_infer_back(family):
    """The shipped full-size config, built on the meta device, written in the original layout:
    detection names the family and the config inferred from the shapes is the shipped one."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel

    from huabi.models.flow_load import flow_vae_config, flux_config_from_diffusers, reference_config, sd3_config_from_diffusers
    from huabi.models.transformer_families import flux_to_original, sd3_to_original

    shipped = reference_config(f"{family.value}_transformer")
    cls = FluxTransformer2DModel if family.is_flux else SD3Transformer2DModel
    with torch.device("meta"):
        module = cls(**shipped)
    diffusers_sd = dict(module.state_dict())
    original = flux_to_original(diffusers_sd) if family.is_flux else sd3_to_original(diffusers_sd)
    assert detect_transformer({"model.diffusion_model." + k: v for k, v in original.items()}).family is family
    inferred = (flux_config_from_diffusers if family.is_flux else sd3_config_from_diffusers)(diffusers_sd)
    for key, value in inferred.items():
        want = shipped[key]
        assert (list(value) if isinstance(value, (list, tuple)) else value) == want, key
    vae_name = "flux_vae" if family.is_flux else "sd3_vae"
    with torch.device("meta"):
        vae = AutoencoderKL(**reference_config(vae_name))
    assert flow_vae_config(vae.state_dict(), family) == reference_config(vae_name)


def test_full_size_t5_config_inferred_from_shapes():
    from transformers import T5Config, T5EncoderModel

    from huabi.models.flow_load import reference_config, t5_config_from_shapes

    shipped = reference_config("t5xxl")
    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**shipped, is_encoder_decoder=False))
    inferred = t5_config_from_shapes(model.state_dict())
    for key, value in shipped.items():
        assert getattr(inferred, key) == value, key


def test_flow_dpmpp_2m_equals_diffusers_dpm_solver_with_flow_sigmas():
    """huabi's flow DPM++ 2M against diffusers' DPMSolverMultistepScheduler(use_flow_sigmas=True) on a
    smooth analytic velocity field, same sigmas and start."""
    from diffusers import DPMSolverMultistepScheduler

    from huabi.core.flow import sample_dpmpp_2m_flow

    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0,
                                            algorithm_type="dpmsolver++", solver_order=2)
    scheduler.set_timesteps(8)
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(1, 4, 8, 8, generator=generator, dtype=torch.float64)
    noise = torch.randn(1, 4, 8, 8, generator=generator, dtype=torch.float64)

    def velocity(x, sigma: float):
        return torch.tanh(x) - 0.5 * target * sigma

    x = noise.clone()
    for i, timestep in enumerate(scheduler.timesteps):
        x = scheduler.step(velocity(x, float(scheduler.sigmas[i])), timestep, x).prev_sample

    def denoiser(x, sigma):
        return x - sigma.to(x.dtype).view(-1, 1, 1, 1) * velocity(x, float(sigma[0]))

    ours = sample_dpmpp_2m_flow(denoiser, noise.clone(), scheduler.sigmas.to(torch.float64))
    assert (ours - x).abs().max().item() < 1e-5
