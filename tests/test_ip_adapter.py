"""IP-Adapter: file layouts, image encoders, equality with diffusers' load_ip_adapter, wiring, errors.

Equivalence: the same tiny checkpoint (loaded by huabi, its modules then driven
by diffusers' own pipeline), the same IP-Adapter file read by diffusers'
``load_ip_adapter`` from disk, the same tiny CLIP image encoder, prompt, image,
noise and sigmas; CFG on, so the "no image" embeddings go through the
unconditional rows. Measured max|ours - theirs| / max|theirs| on the final
latents: SD1 base adapter 1.4e-6, SDXL plus (Resampler) adapter 2.2e-6;
asserted below 2e-5 as for plain txt2img. Weight 0 and ``--from`` are exact
(identical pixels); the UNet is bit-identical after use.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import save_file

from cli_runner import run
from huabi.core.infotext import parse_infotext, request_from_infotext
from huabi.core.request import GenerationRequest
from huabi.errors import HuabiError
from huabi.models.ip_adapter import load_image_encoder, load_ip_adapter
from huabi.models.load import load_model
from huabi.pipelines.common import denoise, encode_guidance, latent_shape
from huabi.service.attention_adapters import (
    AttentionAdapters,
    cross_attention_layers,
    prepare_image_prompt,
)
from huabi.service.engine import Engine
from huabi.service.pngio import read_infotext

CPU = torch.device("cpu")
PROMPT = "a lighthouse on a cliff"
NEGATIVE = "blurry"
SIZE_PX = 64
STEPS = 4
CFG = 6.0
SEED = 77
RELATIVE_TOLERANCE = 2e-5
ENCODER_HIDDEN = 32  # tiny CLIP vision tower: 32 wide, 2 layers, 32 px input, projection to 24
ENCODER_PROJECTION = 24


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def tiny_vision_model(heads: int = 2, seed: int = 0, act: str = "quick_gelu"):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=ENCODER_HIDDEN, intermediate_size=48, projection_dim=ENCODER_PROJECTION,
                              num_hidden_layers=2, num_attention_heads=heads, image_size=32, patch_size=8,
                              hidden_act=act)
    return CLIPVisionModelWithProjection(config).eval()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """A models folder with a tiny image encoder in clip_vision/ (a transformers folder)."""
    root = tmp_path_factory.mktemp("models")
    tiny_vision_model().save_pretrained(root / "clip_vision" / "tiny-vit")
    return root


def sample_image(seed: int = 0, size=(40, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def adapter_tensors(unet, *, kind: str = "base", seed: int = 0, context_width: int | None = None,
                    image_width: int | None = None) -> dict[str, torch.Tensor]:
    """A random IP-Adapter for ``unet`` in the published flat layout (image_proj.*, ip_adapter.N.*)."""
    generator = torch.Generator().manual_seed(seed)
    context = context_width or int(unet.config.cross_attention_dim)

    def rand(*shape, scale=None):
        fan_in = shape[-1] if len(shape) > 1 else 1
        return torch.randn(*shape, generator=generator) * (scale if scale is not None else fan_in ** -0.5)

    tensors: dict[str, torch.Tensor] = {}
    if kind == "base":
        width = image_width or ENCODER_PROJECTION
        tensors.update({"image_proj.proj.weight": rand(4 * context, width), "image_proj.proj.bias": rand(4 * context, scale=0.02),
                        "image_proj.norm.weight": 1 + rand(context, scale=0.1), "image_proj.norm.bias": rand(context, scale=0.02)})
    else:  # "plus": the Resampler (4 layers, 64-wide, one 64-dim head, 16 queries)
        width, hidden = image_width or ENCODER_HIDDEN, 64
        tensors.update({"image_proj.latents": rand(1, 16, hidden, scale=hidden ** -0.5),
                        "image_proj.proj_in.weight": rand(hidden, width), "image_proj.proj_in.bias": rand(hidden, scale=0.02),
                        "image_proj.proj_out.weight": rand(context, hidden), "image_proj.proj_out.bias": rand(context, scale=0.02),
                        "image_proj.norm_out.weight": 1 + rand(context, scale=0.1),
                        "image_proj.norm_out.bias": rand(context, scale=0.02)})
        for i in range(4):
            p = f"image_proj.layers.{i}."
            tensors.update({
                p + "0.norm1.weight": 1 + rand(hidden, scale=0.1), p + "0.norm1.bias": rand(hidden, scale=0.02),
                p + "0.norm2.weight": 1 + rand(hidden, scale=0.1), p + "0.norm2.bias": rand(hidden, scale=0.02),
                p + "0.to_q.weight": rand(64, hidden), p + "0.to_kv.weight": rand(128, hidden),
                p + "0.to_out.weight": rand(hidden, 64),
                p + "1.0.weight": 1 + rand(hidden, scale=0.1), p + "1.0.bias": rand(hidden, scale=0.02),
                p + "1.1.weight": rand(4 * hidden, hidden), p + "1.3.weight": rand(hidden, 4 * hidden),
            })
    for index, (_name, attn) in enumerate(cross_attention_layers(unet)):
        number = 2 * index + 1  # the original code numbered every attention processor; cross ones are odd
        tensors[f"ip_adapter.{number}.to_k_ip.weight"] = rand(attn.inner_dim, context)
        tensors[f"ip_adapter.{number}.to_v_ip.weight"] = rand(attn.inner_dim, context)
    return tensors


def write_adapter(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:  # .bin: nested dicts, as the authors' torch.save wrote them
        nested: dict[str, dict] = {"image_proj": {}, "ip_adapter": {}}
        for key, value in tensors.items():
            part, _, rest = key.partition(".")
            nested[part][rest] = value
        torch.save(nested, path)
    return path


# ---------------------------------------------------------------- equivalence with diffusers


def huabi_latents(bundle) -> torch.Tensor:
    guidance = encode_guidance(bundle, PROMPT, NEGATIVE, clip_skip=1, width_px=SIZE_PX, height_px=SIZE_PX, device=CPU)
    return denoise(bundle, guidance, sampler_name="Euler", schedule_name="Karras", steps=STEPS, cfg_scale=CFG,
                   seeds=[SEED], shape=latent_shape(bundle, SIZE_PX, SIZE_PX), device=CPU)


def diffusers_latents(pipe, bundle, image, weight: float) -> torch.Tensor:
    pipe.set_ip_adapter_scale(weight)
    pipe.scheduler.set_timesteps(STEPS)
    sigma_max = float(pipe.scheduler.sigmas[0])
    generator = torch.Generator("cpu").manual_seed(SEED)
    noise = torch.randn(latent_shape(bundle, SIZE_PX, SIZE_PX), generator=generator)[None]
    start = noise * sigma_max / float(pipe.scheduler.init_noise_sigma)
    with torch.inference_mode():
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, height=SIZE_PX,
                    width=SIZE_PX, latents=start, generator=generator, output_type="latent",
                    ip_adapter_image=image).images


def scheduler():
    return EulerDiscreteScheduler(use_karras_sigmas=True, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear")


def check_against_diffusers(bundle, pipe, adapter_path: Path, encoder_dir: Path, weight: float) -> None:
    weights = load_ip_adapter(adapter_path)
    encoder = load_image_encoder(encoder_dir, device=CPU, dtype=torch.float32)
    image = sample_image()
    state_before = {key: value.clone() for key, value in bundle.unet.state_dict().items()}
    processors_before = dict(bundle.unet.attn_processors)
    plain = huabi_latents(bundle)
    adapters = AttentionAdapters((), prepare_image_prompt(bundle, weights, encoder, image, weight))
    with adapters.applied(bundle) as job_bundle:
        ours = huabi_latents(job_bundle)
    # Restored: same processors, no image projection, same weights; the plain image again.
    assert dict(bundle.unet.attn_processors) == processors_before
    assert bundle.unet.encoder_hid_proj is None and bundle.unet.config.encoder_hid_dim_type is None
    assert all(torch.equal(value, state_before[key]) for key, value in bundle.unet.state_dict().items())
    assert torch.equal(huabi_latents(bundle), plain)
    assert relative_difference(ours, plain) > 1e-3  # the image prompt does something

    pipe.image_encoder = encoder.model
    pipe.feature_extractor = encoder.processor
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(adapter_path.parent), subfolder="", weight_name=adapter_path.name)
    try:
        theirs = diffusers_latents(pipe, bundle, image, weight)
    finally:
        pipe.unload_ip_adapter()
    print(f"relative difference {relative_difference(ours, theirs):.2e}")
    assert relative_difference(ours, theirs) < RELATIVE_TOLERANCE


def test_sd1_base_adapter_matches_diffusers_load_ip_adapter(tiny_sd1_file, models_dir, tmp_path):
    bundle = load_model(tiny_sd1_file)
    path = write_adapter(tmp_path / "ip-adapter_tiny_sd15.safetensors", adapter_tensors(bundle.unet))
    pipe = StableDiffusionPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0], unet=bundle.unet,
        scheduler=scheduler(), safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False,
    )
    check_against_diffusers(bundle, pipe, path, models_dir / "clip_vision" / "tiny-vit", weight=0.8)


def test_sdxl_plus_adapter_matches_diffusers_load_ip_adapter(tiny_sdxl_file, models_dir, tmp_path):
    bundle = load_model(tiny_sdxl_file)
    path = write_adapter(tmp_path / "ip-adapter-plus_tiny_sdxl.safetensors", adapter_tensors(bundle.unet, kind="plus"))
    assert load_ip_adapter(path).kind == "plus" and load_ip_adapter(path).num_tokens == 16
    pipe = StableDiffusionXLPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoders[0], text_encoder_2=bundle.text_encoders[1],
        tokenizer=bundle.tokenizers[0], tokenizer_2=bundle.tokenizers[1], unet=bundle.unet, scheduler=scheduler(),
        image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt=True,
    )
    check_against_diffusers(bundle, pipe, path, models_dir / "clip_vision" / "tiny-vit", weight=1.0)


# ---------------------------------------------------------------- files


def test_bin_and_safetensors_layouts_read_the_same(tiny_sd1_file, tmp_path):
    bundle = load_model(tiny_sd1_file)
    tensors = adapter_tensors(bundle.unet, seed=3)
    flat = load_ip_adapter(write_adapter(tmp_path / "a.safetensors", tensors))
    nested = load_ip_adapter(write_adapter(tmp_path / "a.bin", tensors))
    assert (flat.kind, flat.num_tokens, flat.context_width, flat.image_embed_width) == ("base", 4, 64, ENCODER_PROJECTION)
    assert flat.image_proj.keys() == nested.image_proj.keys()
    assert all(torch.equal(flat.image_proj[k], nested.image_proj[k]) for k in flat.image_proj)
    assert len(flat.layers) == len(nested.layers) == 4
    assert flat.short_hash == hashlib.sha256((tmp_path / "a.safetensors").read_bytes()).hexdigest()[:10]


def test_single_file_image_encoder_equals_the_folder(tmp_path):
    # A single file does not say its head count or activation: 1 head per 64 wide (at least 1) and
    # GELU, as the OpenCLIP towers (ViT-H, bigG) that IP-Adapters use have; quick GELU at 768/1024 (OpenAI's).
    model = tiny_vision_model(heads=1, seed=5, act="gelu")
    model.save_pretrained(tmp_path / "folder")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "file.safetensors"))
    from_folder = load_image_encoder(tmp_path / "folder", device=CPU, dtype=torch.float32)
    from_file = load_image_encoder(tmp_path / "file.safetensors", device=CPU, dtype=torch.float32)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        original = model(pixels).image_embeds
        assert torch.equal(from_folder.model(pixels).image_embeds, original)
        assert torch.equal(from_file.model(pixels).image_embeds, original)
    assert from_file.name == "file" and from_file.embed_width == ENCODER_PROJECTION


def test_bad_adapter_files_are_one_line_errors(tmp_path):
    save_file({"lora_unet_down.weight": torch.zeros(2, 2)}, str(tmp_path / "lora.safetensors"))
    save_file({"image_proj.perceiver_resampler.proj_in.weight": torch.zeros(2, 2),
               "ip_adapter.1.to_k_ip.weight": torch.zeros(2, 2)}, str(tmp_path / "faceid.safetensors"))
    save_file({"image_proj.proj.weight": torch.zeros(256, 24), "image_proj.norm.weight": torch.zeros(64),
               "ip_adapter.2.to_k_ip.weight": torch.zeros(32, 64), "ip_adapter.2.to_v_ip.weight": torch.zeros(32, 64)},
              str(tmp_path / "numbering.safetensors"))
    (tmp_path / "cut.bin").write_bytes(b"\x80\x04garbage")
    cases = {
        "lora.safetensors": r"^IP-Adapter lora: not an IP-Adapter file \(no image_proj/ip_adapter weights",
        "faceid.safetensors": r"^IP-Adapter faceid: FaceID adapters are not supported",
        "numbering.safetensors": r"^IP-Adapter numbering: attention layers numbered \[2\]\.\.\., expected 1, 3, 5",
        "cut.bin": r"^IP-Adapter cut\.bin: cannot read it safely",
    }
    for name, message in cases.items():
        with pytest.raises(HuabiError, match=message) as err:
            load_ip_adapter(tmp_path / name)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- engine, CLI, errors


def pixels(path_or_image) -> np.ndarray:
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def adapter_models(models_dir, tiny_sd1_file, tiny_sdxl_file) -> Path:
    """models_dir plus ipadapter/ with an SD1 base adapter and an SDXL one."""
    sd1 = load_model(tiny_sd1_file)
    sdxl = load_model(tiny_sdxl_file)
    write_adapter(models_dir / "ipadapter" / "ip-adapter_tiny_sd15.safetensors", adapter_tensors(sd1.unet, seed=1))
    write_adapter(models_dir / "ipadapter" / "ip-adapter_tiny_sdxl.bin", adapter_tensors(sdxl.unet, seed=2))
    write_adapter(models_dir / "ipadapter" / "ip-adapter_wide_sd15.safetensors",
                  adapter_tensors(sd1.unet, seed=4, image_width=1024))
    return models_dir


def test_cli_image_prompt_records_keys_and_from_reproduces(capsys, adapter_models, tiny_sd1_file, tmp_path):
    image_path = tmp_path / "prompt.png"
    sample_image(1).save(image_path)
    common = ["--model", tiny_sd1_file, "--models-dir", adapter_models, "--steps", "3", "--size", "64x64",
              "--seed", "9", "--quiet"]
    code, out, err = run(capsys, "generate", "a cat", "--ip-adapter", "ip-adapter_tiny_sd15", "--ip-image", image_path,
                         "--ip-weight", "0.6", "--out", tmp_path / "a", *common)
    assert code == 0, err
    made = Path(out.split()[0])
    params = parse_infotext(read_infotext(made)).params
    adapter_file = adapter_models / "ipadapter" / "ip-adapter_tiny_sd15.safetensors"
    assert params["IP-Adapter"] == "ip-adapter_tiny_sd15"
    assert params["IP-Adapter hash"] == hashlib.sha256(adapter_file.read_bytes()).hexdigest()[:10]
    assert params["IP-Adapter image"] == str(image_path.resolve())
    assert params["IP-Adapter weight"] == "0.6" and params["IP-Adapter encoder"] == "tiny-vit"
    request = request_from_infotext(read_infotext(made))
    assert (request.ip_adapter, request.ip_weight, request.ip_image_encoder) == ("ip-adapter_tiny_sd15", 0.6, "tiny-vit")

    code, out, err = run(capsys, "generate", "--from", made, "--models-dir", adapter_models, "--model", tiny_sd1_file,
                         "--out", tmp_path / "b", "--quiet")
    assert code == 0, err
    again = Path(out.split()[0])
    assert np.array_equal(pixels(again), pixels(made))
    assert read_infotext(again) == read_infotext(made)

    code, out, err = run(capsys, "generate", "a cat", "--out", tmp_path / "c", *common)
    plain = Path(out.split()[0])
    assert not np.array_equal(pixels(plain), pixels(made))
    assert "IP-Adapter" not in parse_infotext(read_infotext(plain)).params
    code, out, err = run(capsys, "generate", "a cat", "--ip-adapter", "ip-adapter_tiny_sd15", "--ip-image", image_path,
                         "--ip-weight", "0", "--out", tmp_path / "d", *common)
    assert code == 0, err
    assert np.array_equal(pixels(Path(out.split()[0])), pixels(plain))

    # Midjourney's --iw is the image prompt's weight.
    code, out, err = run(capsys, "generate", "a cat --iw 0.6 --seed 9", "--ip-adapter", "ip-adapter_tiny_sd15",
                         "--ip-image", image_path, "--batch-size", "1", "--out", tmp_path / "e",
                         *[a for a in common if a not in ("--seed", "9")])
    assert code == 0, err
    first = [line for line in out.split() if "grid" not in line][0]
    assert np.array_equal(pixels(Path(first)), pixels(made))


def test_engine_edit_uses_the_image_prompt(adapter_models, tiny_sd1_file, tmp_path):
    from huabi.core.request import EditOptions

    image_path = tmp_path / "prompt.png"
    sample_image(2).save(image_path)
    init_path = tmp_path / "init.png"
    sample_image(3, size=(64, 64)).save(init_path)
    engine = Engine(device="cpu", dtype="fp32", models_dir=adapter_models)
    base = GenerationRequest("a cat", steps=3, seed=4, model=str(tiny_sd1_file))
    options = EditOptions(str(init_path), denoising_strength=0.8)
    plain = engine.edit(base, options)[0]
    prompted = engine.edit(base.replace(ip_adapter="ip-adapter_tiny_sd15", ip_image=str(image_path)), options)[0]
    assert not np.array_equal(pixels(plain.image), pixels(prompted.image))
    assert "IP-Adapter: ip-adapter_tiny_sd15" in prompted.infotext


def test_bad_inputs_are_one_line_errors(capsys, adapter_models, tiny_sd1_file, tiny_sdxl_file, tmp_path):
    image_path = tmp_path / "prompt.png"
    sample_image().save(image_path)
    common = ["--models-dir", adapter_models, "--steps", "1", "--size", "64x64", "--quiet", "--out", tmp_path]
    cases = [
        (["--model", tiny_sd1_file, "--ip-adapter", "ip-adapter_tiny_sdxl", "--ip-image", image_path],
         "IP-Adapter ip-adapter_tiny_sdxl: made for a 128-wide context; this model is SD 1.x (64-wide)"),
        (["--model", tiny_sdxl_file, "--ip-adapter", "ip-adapter_tiny_sd15", "--ip-image", image_path],
         "IP-Adapter ip-adapter_tiny_sd15: made for a 64-wide context; this model is SDXL (128-wide)"),
        (["--model", tiny_sd1_file, "--ip-adapter", "ip-adapter_wide_sd15", "--ip-image", image_path,
          "--ip-image-encoder", "tiny-vit"],
         "IP-Adapter ip-adapter_wide_sd15: needs 1024-wide image embeddings but image encoder tiny-vit gives 24"),
        (["--model", tiny_sd1_file, "--ip-adapter", "ip-adapter_wide_sd15", "--ip-image", image_path],
         "IP-Adapter ip-adapter_wide_sd15: no image encoder in"),
        (["--model", tiny_sd1_file, "--ip-adapter", "nope", "--ip-image", image_path],
         "IP-Adapter nope: no such file, and none of that name in"),
        (["--model", tiny_sd1_file, "--ip-adapter", "ip-adapter_tiny_sd15", "--ip-image", tmp_path / "missing.png"],
         "IP-Adapter image: " + str(tmp_path / "missing.png") + ": no such file"),
        (["--model", tiny_sd1_file, "--ip-adapter", "ip-adapter_tiny_sd15"],
         "--ip-adapter: an IP-Adapter needs an image (--ip-image) and an image needs --ip-adapter"),
        (["--model", tiny_sd1_file, "--ip-adapter", "ip-adapter_tiny_sd15", "--ip-image", image_path, "--ip-weight", "4"],
         "--ip-weight: must be a number from 0 to 3, got 4.0"),
    ]
    for extra, message in cases:
        code, out, err = run(capsys, "generate", "a cat", *common, *extra)
        assert code == 2, (extra, err)
        assert err.strip().splitlines()[-1] == f"huabi: error: {message}" or f"huabi: error: {message}" in err, err
        assert len(err.strip().splitlines()) == 1, err
