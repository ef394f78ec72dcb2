"""Key tables: bit-identical round trips, full coverage, and full-size config inference.

Full-size checks build the real SD1/SD2/SDXL/refiner UNets and VAEs on the
meta device (shapes only, no memory) from the reference configs, convert their
keys to the original layout, and check huabi infers the same configs back.
"""

from __future__ import annotations

import pytest
import torch

from huabi.errors import HuabiError
from huabi.models.configs import (
    REFERENCE_UNET_CONFIGS,
    REFERENCE_VAE_CONFIGS,
    unet_config_from_original,
    vae_config_from_vae,
)
from huabi.models.convert import (
    unet_key_table,
    unet_to_diffusers,
    unet_to_original,
    vae_to_diffusers,
    vae_to_original,
)
from huabi.models.detect import detect
from huabi.models.family import ModelFamily, Prediction
from tiny_models import build_tiny_parts, tiny_original_state_dict

FAMILIES = list(ModelFamily)


def _assert_identical(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert set(left) == set(right)
    for key, tensor in left.items():
        assert tensor.shape == right[key].shape, key
        assert tensor.dtype == right[key].dtype, key
        assert torch.equal(tensor, right[key]), key


@pytest.fixture(scope="module")
def tiny_parts():
    return {family: build_tiny_parts(family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.value)
def test_unet_round_trips_bit_identical(tiny_parts, family):
    parts = tiny_parts[family]
    diffusers_sd = parts.unet.state_dict()
    original = unet_to_original(diffusers_sd, parts.unet_config)
    assert all(not k.startswith(("down_blocks", "up_blocks", "mid_block")) for k in original)
    _assert_identical(unet_to_diffusers(original, parts.unet_config), diffusers_sd)
    # and original -> diffusers -> original
    _assert_identical(unet_to_original(unet_to_diffusers(original, parts.unet_config), parts.unet_config), original)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.value)
def test_vae_round_trips_bit_identical(tiny_parts, family):
    diffusers_sd = tiny_parts[family].vae.state_dict()
    original = vae_to_original(diffusers_sd)
    assert original["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)  # 1x1 conv in the original
    assert "decoder.up.0.block.0.conv1.weight" in original and "decoder.up.3.upsample.conv.weight" in original
    _assert_identical(vae_to_diffusers(original), diffusers_sd)
    _assert_identical(vae_to_original(vae_to_diffusers(original)), original)


def test_unknown_unet_key_is_named(tiny_parts):
    parts = tiny_parts[ModelFamily.SD1]
    original = unet_to_original(parts.unet.state_dict(), parts.unet_config)
    original["input_blocks.99.0.in_layers.0.weight"] = torch.zeros(1)
    with pytest.raises(HuabiError, match=r"UNet \(original -> diffusers\): 1 keys have no conversion, e.g. input_blocks\.99\.0"):
        unet_to_diffusers(original, parts.unet_config)


def test_unknown_vae_key_is_named(tiny_parts):
    original = vae_to_original(tiny_parts[ModelFamily.SD1].vae.state_dict())
    original["decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(HuabiError, match=r"VAE \(original -> diffusers\): 1 keys have no conversion, e.g. decoder\.extra\.weight"):
        vae_to_diffusers(original)


def test_tables_have_one_row_per_prefix():
    for config in REFERENCE_UNET_CONFIGS.values():
        rows = unet_key_table(config)
        assert len({o for o, _ in rows}) == len(rows)
        assert len({d for _, d in rows}) == len(rows)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.value)
def test_tiny_configs_inferred_from_shapes(tiny_parts, family):
    parts = tiny_parts[family]
    state_dict = tiny_original_state_dict(parts)
    detected = detect(state_dict)
    assert unet_config_from_original(state_dict, detected) == parts.unet_config


# --------------------------------------------------------------------------- full size, meta device

# Text-encoder stubs: only their prefixes (and bigG's projection width) matter to detection/config.
_TEXT_STUBS = {
    "sd1": {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)},
    "sd2": {"cond_stage_model.model.token_embedding.weight": (49408, 1024)},
    "sdxl": {
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
    },
    "sdxl_refiner": {
        "conditioner.embedders.0.model.token_embedding.weight": (49408, 1280),
        "conditioner.embedders.0.model.text_projection": (1280, 1280),
    },
}


def _full_size_original(unet_name: str, vae_name: str) -> tuple[dict[str, torch.Tensor], dict, torch.nn.Module, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**REFERENCE_UNET_CONFIGS[unet_name])
        vae = AutoencoderKL(**REFERENCE_VAE_CONFIGS[vae_name])
    state_dict = {"model.diffusion_model." + k: v for k, v in unet_to_original(unet.state_dict(), REFERENCE_UNET_CONFIGS[unet_name]).items()}
    state_dict.update({"first_stage_model." + k: v for k, v in vae_to_original(vae.state_dict()).items()})
    stub_key = unet_name.split("_")[0] if unet_name.startswith("sd2") else unet_name
    for key, shape in _TEXT_STUBS[stub_key].items():
        state_dict[key] = torch.empty(shape, device="meta")
    return state_dict, REFERENCE_UNET_CONFIGS[unet_name], unet, vae


@pytest.mark.parametrize(
    ("unet_name", "vae_name", "family", "prediction"),
    [
        ("sd1", "sd1", ModelFamily.SD1, Prediction.EPSILON),
        ("sd2_eps", "sd1", ModelFamily.SD2, Prediction.EPSILON),
        ("sd2_v", "sd2_v", ModelFamily.SD2, Prediction.V),
        ("sdxl", "sdxl", ModelFamily.SDXL, Prediction.EPSILON),
        ("sdxl_refiner", "sdxl", ModelFamily.SDXL_REFINER, Prediction.EPSILON),
    ],
)
def test_full_size_configs_inferred_from_shapes(unet_name, vae_name, family, prediction):
    state_dict, reference, unet, vae = _full_size_original(unet_name, vae_name)
    if prediction is Prediction.V:
        state_dict["v_pred"] = torch.empty(0, device="meta")
    detected = detect(state_dict)
    assert (detected.family, detected.prediction) == (family, prediction)
    assert unet_config_from_original(state_dict, detected) == reference

    # Every key and shape converts both ways against the real architecture.
    unet_original = {k[len("model.diffusion_model."):]: v for k, v in state_dict.items() if k.startswith("model.diffusion_model.")}
    back = unet_to_diffusers(unet_original, reference)
    expected = unet.state_dict()
    assert set(back) == set(expected)
    assert all(back[k].shape == expected[k].shape for k in expected)

    vae_original = {k[len("first_stage_model."):]: v for k, v in state_dict.items() if k.startswith("first_stage_model.")}
    vae_reference = REFERENCE_VAE_CONFIGS[vae_name]
    inferred_vae = vae_config_from_vae(vae_original, scaling_factor=vae_reference["scaling_factor"], sample_size=vae_reference["sample_size"])
    assert inferred_vae == vae_reference
    vae_back = vae_to_diffusers(vae_original)
    assert {k: tuple(v.shape) for k, v in vae_back.items()} == {k: tuple(v.shape) for k, v in vae.state_dict().items()}


def test_full_size_sd1_original_key_names():
    """Spot-check well-known SD1 original key names (as in every sd-v1-5 file)."""
    state_dict, *_ = _full_size_original("sd1", "sd1")
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.11.1.proj_out.weight",
        "model.diffusion_model.out.2.weight",
        "model.diffusion_model.time_embed.2.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.encoder.mid.attn_1.proj_out.weight",
        "first_stage_model.encoder.down.0.downsample.conv.weight",
    ):
        assert key in state_dict, key
    assert tuple(state_dict["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape) == (320, 768)
    assert len([k for k in state_dict if k.startswith("model.diffusion_model.")]) == 686


@pytest.mark.parametrize(
    ("family", "prediction"),
    [(ModelFamily.SD1, Prediction.EPSILON), (ModelFamily.SD2, Prediction.V), (ModelFamily.SDXL, Prediction.EPSILON), (ModelFamily.SDXL_REFINER, Prediction.EPSILON)],
    ids=lambda v: v.value,
)
def test_reference_configs_build_a_detectable_full_size_checkpoint(family, prediction):
    """reference_configs -> meta modules -> original layout (with engineer C's text converters) -> detect/infer back."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from huabi.models.configs import reference_configs
    from huabi.models.text_encoders import text_encoders_to_original

    configs = reference_configs(family, prediction)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        encoders = [
            (CLIPTextModelWithProjection if configs[name]["hidden_act"] == "gelu" else CLIPTextModel)(CLIPTextConfig(**configs[name]))
            for name in ("text_encoder", "text_encoder_2") if name in configs
        ]
    state_dict = {"model.diffusion_model." + k: v for k, v in unet_to_original(unet.state_dict(), configs["unet"]).items()}
    state_dict.update({"first_stage_model." + k: v for k, v in vae_to_original(vae.state_dict()).items()})
    state_dict.update(text_encoders_to_original(encoders, family))
    if prediction is Prediction.V:
        state_dict["v_pred"] = torch.empty(0, device="meta")
    detected = detect(state_dict)
    assert (detected.family, detected.prediction) == (family, prediction)
    assert unet_config_from_original(state_dict, detected) == configs["unet"]


def test_mini_has_no_reference_config():
    from huabi.models.configs import reference_configs

    with pytest.raises(HuabiError, match=r"huabi_mini: no full-size reference config"):
        reference_configs(ModelFamily.HUABI_MINI)
