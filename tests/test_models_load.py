"""load_model / save: against diffusers' own single-file loader, both layouts, VAE swap, prediction, saving."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from huabi.errors import HuabiError
from huabi.models.family import ModelFamily, Prediction, UNetVariant
from huabi.models.formats import read_state_dict
from huabi.models.hashes import HashCache
from huabi.models.load import is_v_prediction_sd2, load_model, scaled_linear_alphas_cumprod
from huabi.models.save import ModelParts, save_diffusers_folder, save_single_file
from tiny_models import TINY_MINI_MARKERS, build_tiny_parts, tiny_model_factory  # noqa: F401 (fixture)


def _assert_modules_identical(left: torch.nn.Module, right: torch.nn.Module) -> None:
    a, b = left.state_dict(), right.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.fixture()
def cache(tmp_path) -> HashCache:
    return HashCache(tmp_path / "hashes.json")


@pytest.mark.parametrize("family", [ModelFamily.SD1, ModelFamily.SD2, ModelFamily.SDXL], ids=lambda f: f.value)
def test_single_file_matches_diffusers_from_single_file(tiny_model_factory, family, cache, monkeypatch):
    """Independent implementation: diffusers' own LDM->diffusers conversion. Tolerance: exact (torch.equal)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    single = tiny_model_factory(family, prediction=Prediction.V if family is ModelFamily.SD2 else Prediction.EPSILON)
    config_folder = tiny_model_factory(family, prediction=Prediction.V if family is ModelFamily.SD2 else Prediction.EPSILON, layout="diffusers")
    reference_unet = UNet2DConditionModel.from_single_file(str(single), config=str(config_folder), subfolder="unet", local_files_only=True)
    reference_vae = AutoencoderKL.from_single_file(str(single), config=str(config_folder), subfolder="vae", local_files_only=True)
    bundle = load_model(single, hash_cache=cache)
    _assert_modules_identical(bundle.unet, reference_unet)
    _assert_modules_identical(bundle.vae, reference_vae)
    for key in ("block_out_channels", "cross_attention_dim", "transformer_layers_per_block", "use_linear_projection", "addition_time_embed_dim"):
        assert bundle.unet.config[key] == reference_unet.config[key], key


@pytest.mark.parametrize(
    ("family", "prediction", "native_px", "scaling", "encoders"),
    [
        (ModelFamily.SD1, Prediction.EPSILON, 512, 0.18215, 1),
        (ModelFamily.SD2, Prediction.V, 768, 0.18215, 1),
        (ModelFamily.SDXL, Prediction.EPSILON, 1024, 0.13025, 2),
        (ModelFamily.SDXL_REFINER, Prediction.EPSILON, 1024, 0.13025, 1),
        (ModelFamily.HUABI_MINI, Prediction.EPSILON, 128, 0.5, 1),
    ],
    ids=lambda v: getattr(v, "value", str(v)),
)
def test_bundle_fields(tiny_model_factory, family, prediction, native_px, scaling, encoders, cache):
    path = tiny_model_factory(family, prediction=prediction)
    bundle = load_model(path, hash_cache=cache)
    assert (bundle.family, bundle.prediction, bundle.variant) == (family, prediction, UNetVariant.BASE)
    assert bundle.native_size_px == native_px
    assert bundle.latent_scaling_factor == scaling and bundle.vae_scale_factor == 8 and bundle.latent_channels == 4
    assert len(bundle.text_encoders) == len(bundle.tokenizers) == encoders
    assert bundle.name == path.stem and bundle.path == path
    assert bundle.short_hash == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert bundle.alphas_cumprod.dtype == torch.float64 and bundle.alphas_cumprod.shape == (1000,)
    assert torch.equal(bundle.alphas_cumprod, scaled_linear_alphas_cumprod())
    assert not bundle.unet.training and not any(p.requires_grad for p in bundle.unet.parameters())
    if family is ModelFamily.HUABI_MINI:
        head_dim = TINY_MINI_MARKERS["huabi.attention_head_dim"]
        assert bundle.unet.config.attention_head_dim == [32 // head_dim, 64 // head_dim]


def test_tiny_unet_runs_after_load(tiny_model_factory, cache):
    bundle = load_model(tiny_model_factory(ModelFamily.SDXL), hash_cache=cache)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, bundle.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    added = {"text_embeds": torch.zeros(1, 64), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        out = bundle.unet(latent, torch.tensor([500]), encoder_hidden_states=context, added_cond_kwargs=added).sample
    assert out.shape == latent.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("family", [ModelFamily.SD1, ModelFamily.SDXL, ModelFamily.SDXL_REFINER, ModelFamily.HUABI_MINI], ids=lambda f: f.value)
def test_diffusers_folder_loads_same_weights(tiny_model_factory, family, cache):
    from_file = load_model(tiny_model_factory(family), compute_hash=False)
    from_folder = load_model(tiny_model_factory(family, layout="diffusers"), hash_cache=cache)
    _assert_modules_identical(from_folder.unet, from_file.unet)
    _assert_modules_identical(from_folder.vae, from_file.vae)
    for a, b in zip(from_folder.text_encoders, from_file.text_encoders, strict=True):
        _assert_modules_identical(a, b)
    assert (from_folder.family, from_folder.prediction, from_folder.native_size_px) == (family, from_file.prediction, from_file.native_size_px)
    unet_file = tiny_model_factory(family, layout="diffusers") / "unet" / "diffusion_pytorch_model.safetensors"
    assert from_folder.short_hash == hashlib.sha256(unet_file.read_bytes()).hexdigest()[:10]


def test_variants_load(tiny_model_factory):
    for variant, channels in ((UNetVariant.INPAINT, 9), (UNetVariant.INSTRUCT_PIX2PIX, 8)):
        bundle = load_model(tiny_model_factory(ModelFamily.SD1, variant), compute_hash=False)
        assert bundle.variant is variant and bundle.unet.config.in_channels == channels


# --------------------------------------------------------------------------- prediction


def test_v_prediction_test_follows_a1111_rule():
    """mean(unet(0.5, t=999) - 0.5) < -1 means v. A conv_out bias of -10 forces it; random weights stay eps."""
    parts = build_tiny_parts(ModelFamily.SD2)
    assert not is_v_prediction_sd2(parts.unet)
    with torch.no_grad():
        parts.unet.conv_out.bias.fill_(-10.0)
    assert is_v_prediction_sd2(parts.unet)


def test_sd2_without_marker_runs_the_test_and_override_wins(tiny_model_factory):
    path = tiny_model_factory(ModelFamily.SD2, prediction=Prediction.EPSILON)
    bundle = load_model(path, compute_hash=False)
    assert bundle.prediction is (Prediction.V if is_v_prediction_sd2(bundle.unet) else Prediction.EPSILON)
    assert bundle.prediction is Prediction.EPSILON and bundle.native_size_px == 512
    forced = load_model(path, prediction=Prediction.V, compute_hash=False)
    assert forced.prediction is Prediction.V and forced.native_size_px == 768 and forced.unet.config.sample_size == 96
    v_file = tiny_model_factory(ModelFamily.SD2, prediction=Prediction.V)
    assert load_model(v_file, prediction=Prediction.EPSILON, compute_hash=False).prediction is Prediction.EPSILON


def test_alphas_cumprod_from_checkpoint(tiny_model_factory, tmp_path):
    tensors, _ = read_state_dict(tiny_model_factory(ModelFamily.SD1))
    custom = torch.linspace(0.999, 0.01, 1000, dtype=torch.float32)
    save_file({**tensors, "alphas_cumprod": custom}, str(tmp_path / "sched.safetensors"))
    bundle = load_model(tmp_path / "sched.safetensors", compute_hash=False)
    assert torch.equal(bundle.alphas_cumprod, custom.double())


def test_dtype_parameter(tiny_model_factory):
    bundle = load_model(tiny_model_factory(ModelFamily.SD1), dtype=torch.bfloat16, compute_hash=False)
    assert {p.dtype for p in bundle.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bundle.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bundle.text_encoders[0].parameters()} == {torch.bfloat16}


# --------------------------------------------------------------------------- VAE replacement


@pytest.mark.parametrize("form", ["original", "prefixed", "diffusers_file", "diffusers_folder"])
def test_vae_replacement(tiny_model_factory, tmp_path, form, cache):
    other = build_tiny_parts(ModelFamily.SD1, seed=7)
    if form == "diffusers_folder":
        vae_path = tmp_path / "myvae"
        other.vae.save_pretrained(vae_path)
    else:
        from huabi.models.convert import vae_to_original

        diffusers_sd = {k: v.contiguous() for k, v in other.vae.state_dict().items()}
        tensors = {
            "original": lambda: vae_to_original(diffusers_sd),
            "prefixed": lambda: {"first_stage_model." + k: v for k, v in vae_to_original(diffusers_sd).items()},
            "diffusers_file": lambda: diffusers_sd,
        }[form]()
        vae_path = tmp_path / "myvae.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(vae_path))
    bundle = load_model(tiny_model_factory(ModelFamily.SD1), vae=vae_path, hash_cache=cache)
    _assert_modules_identical(bundle.vae, other.vae)
    assert bundle.vae_name == "myvae"
    if form != "diffusers_folder":
        assert bundle.vae_short_hash == hashlib.sha256(vae_path.read_bytes()).hexdigest()[:10]


def test_bad_vae_file(tiny_model_factory, tmp_path):
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(tmp_path / "notvae.safetensors"))
    with pytest.raises(HuabiError, match=r"notvae\.safetensors: not a VAE file: no encoder\.\*/decoder\.\* tensors"):
        load_model(tiny_model_factory(ModelFamily.SD1), vae=tmp_path / "notvae.safetensors", compute_hash=False)


# --------------------------------------------------------------------------- bad checkpoints


def test_checkpoint_without_vae(tiny_model_factory, tmp_path):
    tensors, _ = read_state_dict(tiny_model_factory(ModelFamily.SD1))
    save_file({k: v for k, v in tensors.items() if not k.startswith("first_stage_model.")}, str(tmp_path / "novae.safetensors"))
    with pytest.raises(HuabiError, match=r"novae\.safetensors: checkpoint has no VAE weights .*pass a VAE file with vae="):
        load_model(tmp_path / "novae.safetensors", compute_hash=False)


def test_wrong_shape_is_named(tiny_model_factory, tmp_path):
    tensors, _ = read_state_dict(tiny_model_factory(ModelFamily.SD1))
    tensors["model.diffusion_model.time_embed.2.bias"] = torch.zeros(7)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(HuabiError, match=r"UNet: weights do not match the inferred architecture: time_embedding\.linear_2\.bias has shape \(7,\), expected \(128,\)"):
        load_model(tmp_path / "bad.safetensors", compute_hash=False)


def test_missing_unet_tensor_is_named(tiny_model_factory, tmp_path):
    tensors, _ = read_state_dict(tiny_model_factory(ModelFamily.SD1))
    del tensors["model.diffusion_model.middle_block.2.out_layers.3.weight"]
    save_file(tensors, str(tmp_path / "hole.safetensors"))
    with pytest.raises(HuabiError, match=r"UNet: weights do not match the inferred architecture: missing 1 keys, e\.g\. mid_block\.resnets\.1\.conv2\.weight"):
        load_model(tmp_path / "hole.safetensors", compute_hash=False)


def test_ckpt_loads_end_to_end(tiny_model_factory, tmp_path):
    tensors, _ = read_state_dict(tiny_model_factory(ModelFamily.SD1))
    torch.save({"state_dict": tensors, "global_step": 1}, tmp_path / "old.ckpt")
    bundle = load_model(tmp_path / "old.ckpt", compute_hash=False)
    assert bundle.family is ModelFamily.SD1 and bundle.name == "old"


def test_consuming_build_frees_each_source_tensor_and_loads_the_same(tiny_model_factory, monkeypatch):
    """load_model hands its converted UNet/VAE dicts over (``consume``): the dict is emptied as each
    tensor is cast (no second full copy of a checkpoint read into memory), the module is the same."""
    import weakref

    from huabi.models import load as load_module

    given: list = []
    original = load_module.build_module

    def watching(model_class, config, weights, **kwargs):
        refs = [weakref.ref(t) for t in weights.values()]
        given.append((kwargs["what"], kwargs.get("consume"), weights, refs))
        return original(model_class, config, weights, **kwargs)

    monkeypatch.setattr(load_module, "build_module", watching)
    path = tiny_model_factory(ModelFamily.SD1)
    consumed = load_model(path, dtype=torch.bfloat16, compute_hash=False)  # a cast: every tensor is a new one
    assert {what for what, consume, _, _ in given} == {"UNet", "VAE"} and all(consume for _, consume, _, _ in given)
    for _what, _consume, weights, refs in given:
        assert weights == {} and all(ref() is None for ref in refs)  # nothing keeps the file's tensors alive
    monkeypatch.setattr(load_module, "build_module",
                        lambda *a, **k: original(*a, **{**k, "consume": False}))
    copied = load_model(path, dtype=torch.bfloat16, compute_hash=False)
    for a, b in ((consumed.unet, copied.unet), (consumed.vae, copied.vae)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


# --------------------------------------------------------------------------- saving


@pytest.mark.parametrize("family", [ModelFamily.SD1, ModelFamily.SD2, ModelFamily.SDXL, ModelFamily.SDXL_REFINER, ModelFamily.HUABI_MINI], ids=lambda f: f.value)
def test_save_single_file_round_trip(tiny_model_factory, tmp_path, family):
    source = tiny_model_factory(family, prediction=Prediction.V if family is ModelFamily.SD2 else Prediction.EPSILON)
    bundle = load_model(source, compute_hash=False)
    out = save_single_file(bundle, tmp_path / "resaved.safetensors")
    original, _ = read_state_dict(source)
    written, metadata = read_state_dict(out)
    assert set(written) == set(original)
    assert all(torch.equal(written[k], original[k]) and written[k].dtype == original[k].dtype for k in original)
    assert metadata["modelspec.prediction_type"] == ("v" if family is ModelFamily.SD2 else "epsilon")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resaved.safetensors"]


def test_save_parts_with_dtype_and_extras(tmp_path):
    parts = build_tiny_parts(ModelFamily.HUABI_MINI)
    model = ModelParts(ModelFamily.HUABI_MINI, parts.unet, parts.vae, parts.text_encoders, native_size_px=128)
    out = save_single_file(model, tmp_path / "mini.safetensors", dtype=torch.float16, metadata={"huabi.trained_steps": "100"},
                           extra_tensors={"huabi.version": torch.tensor(2)})
    written, metadata = read_state_dict(out)
    assert written["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert written["huabi.version"].item() == 2 and written["huabi.native_size_px"].item() == 128
    assert written["huabi.vae_scaling_factor"].item() == 0.5
    assert written["huabi.attention_head_dim"].item() == 16
    assert metadata["huabi.trained_steps"] == "100"
    bundle = load_model(out, compute_hash=False)
    assert bundle.family is ModelFamily.HUABI_MINI and bundle.unet.dtype == torch.float32
    with pytest.raises(HuabiError, match=r"extra tensor 'model\.diffusion_model\.out\.2\.bias' would overwrite a model weight"):
        save_single_file(model, tmp_path / "x.safetensors", extra_tensors={"model.diffusion_model.out.2.bias": torch.zeros(4)})
    with pytest.raises(HuabiError, match=r"x\.ckpt: huabi writes single files as \.safetensors only"):
        save_single_file(model, tmp_path / "x.ckpt")
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.ckpt").exists()


def test_vae_group_count_travels_with_a_huabi_mini_file(tmp_path):
    """Group counts are not visible in shapes: a huabi-mini VAE with 8 groups is marked, and loads as 8."""
    from diffusers import AutoencoderKL

    from tiny_models import randomize_, tiny_vae_config

    parts = build_tiny_parts(ModelFamily.HUABI_MINI)
    vae = randomize_(AutoencoderKL(**{**tiny_vae_config(ModelFamily.HUABI_MINI), "norm_num_groups": 8}), torch.Generator().manual_seed(3)).eval()
    model = ModelParts(ModelFamily.HUABI_MINI, parts.unet, vae, parts.text_encoders, native_size_px=128)
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        expected = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    out = save_single_file(model, tmp_path / "mini.safetensors")
    written, _ = read_state_dict(out)
    assert written["huabi.vae_norm_num_groups"].dtype == torch.int64 and written["huabi.vae_norm_num_groups"].item() == 8
    for again in (load_model(out, compute_hash=False), load_model(save_diffusers_folder(model, tmp_path / "folder"), compute_hash=False)):
        assert again.vae.config.norm_num_groups == 8
        with torch.no_grad():
            got = again.vae.decode(again.vae.encode(pixels).latent_dist.mean).sample
        assert torch.allclose(got, expected, rtol=0, atol=1e-5)
    # without the marker the same weights build SD's 32 groups and decode otherwise (the marker is needed)
    unmarked = tmp_path / "unmarked.safetensors"
    save_file({k: v for k, v in written.items() if k != "huabi.vae_norm_num_groups"}, str(unmarked))
    plain = load_model(unmarked, compute_hash=False)
    assert plain.vae.config.norm_num_groups == 32
    with torch.no_grad():
        assert (plain.vae.decode(plain.vae.encode(pixels).latent_dist.mean).sample - expected).abs().max() > 1e-2
    # SD's 32 groups add no marker: files of earlier models stay byte-for-byte as they were
    assert "huabi.vae_norm_num_groups" not in read_state_dict(save_single_file(load_model(unmarked, compute_hash=False), tmp_path / "again.safetensors"))[0]
    # a swapped-in VAE (vae=) keeps its own layout, not the checkpoint's: the 8-group VAE from a marked
    # file or a diffusers vae folder into an unmarked (32-group) checkpoint, and a 32-group VAE file into the 8-group one
    for source in (out, tmp_path / "folder" / "vae", tmp_path / "folder"):
        swapped = load_model(unmarked, vae=source, compute_hash=False)
        assert swapped.vae.config.norm_num_groups == 8, source
        with torch.no_grad():
            got = swapped.vae.decode(swapped.vae.encode(pixels).latent_dist.mean).sample
        assert torch.allclose(got, expected, rtol=0, atol=1e-5)
    sd_vae = tmp_path / "sd-vae.safetensors"
    save_file({k[len("first_stage_model."):]: v for k, v in written.items() if k.startswith("first_stage_model.")}, str(sd_vae))
    assert load_model(out, vae=sd_vae, compute_hash=False).vae.config.norm_num_groups == 32
    config_path = tmp_path / "folder" / "vae" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text(encoding="utf-8")), "norm_num_groups": "eight"}), encoding="utf-8")
    with pytest.raises(HuabiError, match=r"^.*config\.json: norm_num_groups must be a positive integer, got 'eight'$"):
        load_model(unmarked, vae=tmp_path / "folder" / "vae", compute_hash=False)


def test_save_diffusers_folder_round_trip(tiny_model_factory, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    bundle = load_model(tiny_model_factory(ModelFamily.SDXL), compute_hash=False)
    bundle.alphas_cumprod = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)  # non-standard schedule travels too
    folder = save_diffusers_folder(bundle, tmp_path / "xl")
    again = load_model(folder, compute_hash=False)
    for name in ("unet", "vae"):
        _assert_modules_identical(getattr(again, name), getattr(bundle, name))
    assert torch.allclose(again.alphas_cumprod, bundle.alphas_cumprod, rtol=0, atol=1e-12)
    # diffusers itself can open the folder offline
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True)
    _assert_modules_identical(pipe.unet, bundle.unet)
    with pytest.raises(HuabiError, match=r"xl: already exists \(pass overwrite=True to replace it\)"):
        save_diffusers_folder(bundle, folder)
    save_diffusers_folder(bundle, folder, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["xl"]


def test_load_missing_path(tmp_path):
    with pytest.raises(HuabiError, match=r"missing\.safetensors: model file not found"):
        load_model(tmp_path / "missing.safetensors")
    assert not os.listdir(tmp_path)
