"""Detection of family / variant / prediction from both layouts, and the named errors."""

from __future__ import annotations

import pytest
import torch

from huabi.errors import HuabiError
from huabi.models.detect import detect
from huabi.models.family import ModelFamily, Prediction, UNetVariant
from huabi.models.formats import read_state_dict
from tiny_models import build_tiny_parts, tiny_model_factory, tiny_original_state_dict  # noqa: F401 (fixture)

CASES = [
    (ModelFamily.SD1, UNetVariant.BASE, Prediction.EPSILON),
    (ModelFamily.SD1, UNetVariant.INPAINT, Prediction.EPSILON),
    (ModelFamily.SD1, UNetVariant.INSTRUCT_PIX2PIX, Prediction.EPSILON),
    (ModelFamily.SD2, UNetVariant.BASE, Prediction.V),
    (ModelFamily.SDXL, UNetVariant.BASE, Prediction.EPSILON),
    (ModelFamily.SDXL_REFINER, UNetVariant.BASE, Prediction.EPSILON),
    (ModelFamily.HUABI_MINI, UNetVariant.BASE, Prediction.EPSILON),
]


def _ids(case) -> str:
    return "-".join(x.value for x in case)


@pytest.fixture(scope="module")
def sd1_state_dict() -> dict[str, torch.Tensor]:
    return tiny_original_state_dict(build_tiny_parts(ModelFamily.SD1))


@pytest.mark.parametrize("layout", ["single", "diffusers"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_detects_family_variant_prediction(tiny_model_factory, case, layout):
    family, variant, prediction = case
    tensors, metadata = read_state_dict(tiny_model_factory(family, variant, prediction, layout=layout))
    found = detect(tensors, metadata=metadata)
    assert (found.family, found.variant, found.prediction) == case
    assert found.prediction_known
    assert found.has_vae


def test_sd2_without_marker_needs_the_runtime_test():
    state_dict = tiny_original_state_dict(build_tiny_parts(ModelFamily.SD2))
    found = detect(state_dict)
    assert (found.family, found.prediction, found.prediction_known, found.prediction_source) == (
        ModelFamily.SD2, Prediction.EPSILON, False, "unknown")
    assert found.linear_projection and found.context_dim == 64


def test_prediction_from_metadata(sd1_state_dict):
    assert detect(sd1_state_dict, metadata={"modelspec.prediction_type": "v"}).prediction is Prediction.V
    found = detect(sd1_state_dict, metadata={"modelspec.prediction_type": "epsilon"})
    assert (found.prediction, found.prediction_source) == (Prediction.EPSILON, "metadata")
    with pytest.raises(HuabiError, match=r"model\.safetensors: metadata modelspec\.prediction_type='flow' is not 'epsilon' or 'v'"):
        detect(sd1_state_dict, metadata={"modelspec.prediction_type": "flow"}, source="model.safetensors")


def test_v_pred_key(sd1_state_dict):
    found = detect({**sd1_state_dict, "v_pred": torch.zeros(0)})
    assert (found.prediction, found.prediction_source) == (Prediction.V, "v_pred key")


def test_structure_not_size_decides(sd1_state_dict):
    found = detect(sd1_state_dict)
    assert found.family is ModelFamily.SD1 and found.context_dim == 64 and not found.linear_projection


# --------------------------------------------------------------------------- errors


def test_empty_file_message():
    with pytest.raises(HuabiError, match=r"^empty\.safetensors: not a Stable Diffusion checkpoint: found 0 tensors, none under model\.diffusion_model\.; it contains no tensors$"):
        detect({}, source="empty.safetensors")


def test_lora_is_named():
    lora = {f"lora_unet_down_blocks_0_attentions_0_proj_in.lora_{d}.weight": torch.zeros(4, 4) for d in ("up", "down")}
    with pytest.raises(HuabiError, match=r"style\.safetensors: not a Stable Diffusion checkpoint: found 2 tensors, none under model\.diffusion_model\.; looks like a LoRA/LyCORIS file.*first keys: lora_unet_"):
        detect(lora, source="style.safetensors")


def test_vae_only_is_named(sd1_state_dict):
    vae = {k[len("first_stage_model."):]: v for k, v in sd1_state_dict.items() if k.startswith("first_stage_model.")}
    with pytest.raises(HuabiError, match=r"vae\.pt: not a Stable Diffusion checkpoint: found \d+ tensors.*looks like a VAE-only file \(pass it as vae=, not as the model\)"):
        detect(vae, source="vae.pt")
    prefixed = {k: v for k, v in sd1_state_dict.items() if k.startswith("first_stage_model.")}
    with pytest.raises(HuabiError, match="looks like a VAE-only file"):
        detect(prefixed)


def test_embedding_and_controlnet_and_unknown_are_named():
    with pytest.raises(HuabiError, match="looks like a textual-inversion embedding"):
        detect({"emb_params": torch.zeros(2, 768)})
    with pytest.raises(HuabiError, match="looks like a ControlNet"):
        detect({"control_model.input_hint_block.0.weight": torch.zeros(1)})
    with pytest.raises(HuabiError, match=r"found 312 tensors, none under model\.diffusion_model\.; unrecognised layout; first keys: w0, w1, w2, \.\.\."):
        detect({f"w{i}": torch.zeros(1) for i in range(312)})


def test_unet_without_text_encoder(sd1_state_dict):
    unet_only = {k: v for k, v in sd1_state_dict.items() if k.startswith("model.diffusion_model.")}
    with pytest.raises(HuabiError, match=r"m\.ckpt: has a UNet but no text encoder weights"):
        detect(unet_only, source="m.ckpt")


def test_unknown_input_channels(sd1_state_dict):
    broken = dict(sd1_state_dict)
    broken["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 5, 3, 3)
    with pytest.raises(HuabiError, match=r"UNet takes 5 input channels; huabi knows 4 \(base\), 9 \(inpainting\), 8 \(instruct-pix2pix\)"):
        detect(broken)


def test_mixed_layouts_refused(sd1_state_dict):
    # SD1 UNet (conv proj_in) with an OpenCLIP (SD2) text encoder
    mixed = {k: v for k, v in sd1_state_dict.items() if not k.startswith("cond_stage_model.")}
    mixed["cond_stage_model.model.token_embedding.weight"] = torch.zeros(49408, 64)
    with pytest.raises(HuabiError, match=r"OpenCLIP text encoder \(SD2\) but the UNet's proj_in is a conv \(SD1 layout\)"):
        detect(mixed)
    with pytest.raises(HuabiError, match=r"UNet has SDXL label_emb but sd1 text encoders"):
        detect({**sd1_state_dict, "model.diffusion_model.label_emb.0.0.weight": torch.zeros(32, 80)})


def test_marker_on_wrong_layout():
    sdxl = tiny_original_state_dict(build_tiny_parts(ModelFamily.SDXL))
    with pytest.raises(HuabiError, match=r"has the huabi\.version marker but a sdxl layout; huabi-mini is SD1 layout"):
        detect({**sdxl, "huabi.version": torch.tensor(1)})


def test_marker_must_be_int_scalar(sd1_state_dict):
    with pytest.raises(HuabiError, match=r"huabi\.version must be an int64 scalar"):
        detect({**sd1_state_dict, "huabi.version": torch.tensor(1.0)})


def test_detect_file_reads_only_the_header(tiny_model_factory):
    from huabi.models.inspect import describe_model_file, detect_file
    from huabi.models.formats import read_state_dict_shapes

    path = tiny_model_factory(ModelFamily.HUABI_MINI)
    shapes, _ = read_state_dict_shapes(path)
    assert shapes["model.diffusion_model.out.2.weight"].is_meta
    assert shapes["huabi.version"].item() == 1  # markers are read for real
    assert detect_file(path) == detect(*read_state_dict(path)[:1])
    assert describe_model_file(path) == "huabi_mini base epsilon"
    assert describe_model_file(tiny_model_factory(ModelFamily.SD2)) == "sd2 base prediction decided at load"
    assert describe_model_file(tiny_model_factory(ModelFamily.SDXL, layout="diffusers")) == "sdxl base epsilon"
