"""``huabi quantize`` for FLUX/SD3 transformers (ComfyUI-GGUF layout, read back by huabi's GGUF loader
and by diffusers' own GGUF loader), and ComfyUI's scaled fp8 files (``scale_weight`` beside each fp8
weight) for the transformer and the T5 encoder, on tiny random models."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from flow_fixtures import TinyFlowModel
from huabi.cli.main import main
from huabi.errors import HuabiError
from huabi.models.flow_load import load_flow_model, read_transformer_gguf
from huabi.models.transformer_families import TransformerFamily as F
from huabi.pipelines.flow import FlowRequest, flow_generate

PROMPT = "a red apple on a wooden table"
# Worst element error relative to the largest value of its 32-value block: Q8_0's step is 1/127 of
# it (error half a step: 0.4%); Q4_0 maps the block's extreme to -8 steps of 1/8 of it, so a value of
# the opposite sign near the extreme clamps at +7 (error up to one step: 12.5%); small margin.
BLOCK_ERROR = {"Q8_0": 0.005, "Q4_0": 0.13}


@pytest.fixture(scope="module")
def models():
    return {family: TinyFlowModel(family) for family in (F.FLUX_DEV, F.SD35_MEDIUM)}


def _quantize(capsys, src, out, qtype):
    code = main(["quantize", str(src), "--type", qtype, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("family,layout", [(F.FLUX_DEV, "bfl"), (F.FLUX_DEV, "diffusers"), (F.SD35_MEDIUM, "all-in-one")])
def test_quantize_writes_comfyui_gguf_that_round_trips_through_huabi(models, tmp_path, capsys, family, layout, qtype):
    model = models[family]
    if layout == "bfl":
        src = model.write_transformer(tmp_path / "flux1-dev.safetensors")
    elif layout == "diffusers":
        src = model.write_diffusers_folder(tmp_path / "flux1-dev-diffusers")
    else:
        src = model.write_all_in_one(tmp_path / "sd3.5_medium.safetensors")
    out = tmp_path / f"model-{qtype}.gguf"
    printed = _quantize(capsys, src, out, qtype)
    assert f"{family.label} transformer" in printed and f"{qtype}: " in printed
    tensors, metadata, _ = read_transformer_gguf(out, on_the_fly=False)
    assert metadata["gguf.architecture"] == ("flux" if family.is_flux else "sd3")
    original = model.transformer_original()
    assert set(tensors) == set(original)  # original names, no prefix: ComfyUI-GGUF's layout
    assert f"{qtype}:" in metadata["gguf.tensor_types"]
    for name, value in original.items():
        if value.ndim == 1:
            assert torch.equal(tensors[name], value.float()), name  # F32, exact
        else:
            bound = BLOCK_ERROR[qtype] * value.abs().max().item() + 1e-6
            assert (tensors[name] - value.float()).abs().max().item() <= bound, name
    # and it generates: huabi's loader with the parts from a models folder, packed weights on the fly
    parts = tmp_path / "parts"
    model.write_parts(parts)
    bundle = load_flow_model(out, models_dir=parts)
    plain = load_flow_model(src, models_dir=parts)
    request = FlowRequest(PROMPT, steps=2, width_px=64, height_px=64, max_t5_tokens=16,
                          cfg_scale=1.0 if family.is_flux else 3.0)
    quantized = flow_generate(bundle, request, [5], decode=False).latents
    reference = flow_generate(plain, request, [5], decode=False).latents
    assert torch.isfinite(quantized).all()
    relative = (quantized - reference).abs().max().item() / reference.abs().max().item()
    assert relative < (0.05 if qtype == "Q8_0" else 0.5), relative


def test_diffusers_gguf_loader_reads_huabi_quantized_sd3(models, tmp_path, capsys):
    # An independent reader of the community layout. (diffusers' FLUX single-file converter hard-codes
    # FLUX's full width of 3072, so it cannot read a tiny FLUX; its SD3 converter reads the shapes.)
    pytest.importorskip("gguf")
    from diffusers import GGUFQuantizationConfig, SD3Transformer2DModel

    model = models[F.SD35_MEDIUM]
    out = tmp_path / "sd3.5_medium-Q8_0.gguf"
    _quantize(capsys, model.write_all_in_one(tmp_path / "sd3.5_medium.safetensors"), out, "Q8_0")
    config = model.write_diffusers_config(tmp_path / "config")
    theirs = SD3Transformer2DModel.from_single_file(
        str(out), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        config=str(config), subfolder="transformer", torch_dtype=torch.float32, local_files_only=True)
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    ours = load_flow_model(out, models_dir=_parts(model, tmp_path), gguf_on_the_fly=False).transformer.state_dict()
    theirs_sd = theirs.state_dict()
    assert set(theirs_sd) == set(ours)
    for name, value in theirs_sd.items():
        value = dequantize_gguf_tensor(value) if hasattr(value, "quant_type") else value
        # diffusers keeps the (dequantized) pos_embed buffer in float16: compare it at float16's precision
        tolerance = 1e-3 if value.dtype == torch.float16 else 1e-6
        assert torch.allclose(value.float().reshape(ours[name].shape), ours[name].float(), atol=tolerance), name


def _parts(model, tmp_path):
    folder = tmp_path / "parts"
    if not folder.exists():
        model.write_parts(folder)
    return folder


def test_quantize_refusals_are_one_line(models, tmp_path, capsys):
    src = models[F.FLUX_DEV].write_transformer(tmp_path / "flux1-dev.safetensors")
    code = main(["quantize", str(src), "--type", "Q3_K", "--out", str(tmp_path / "x.gguf")])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "unknown type 'Q3_K'" in err


# --------------------------------------------------------------------------- scaled fp8


def _scaled_fp8(tensors: dict[str, torch.Tensor], prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ComfyUI's layout: fp8 ``X.weight`` = weight / scale, float32 ``X.scale_weight``; (file tensors, real weights)."""
    stored, real = {}, {}
    for name, value in tensors.items():
        if value.ndim == 2 and name.endswith(".weight") and "embed" not in name and "shared" not in name:
            scale = value.abs().max().float() / 448.0
            fp8 = (value.float() / scale).to(torch.float8_e4m3fn)
            stored[prefix + name] = fp8
            stored[prefix + name[: -len("weight")] + "scale_weight"] = scale.reshape(1)
            stored[prefix + name[: -len("weight")] + "scale_input"] = torch.ones(1)
            real[name] = fp8.float() * scale
        else:
            stored[prefix + name] = value
            real[name] = value
    stored[prefix + "scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    return stored, real


def test_scaled_fp8_transformer_and_t5_load_to_their_products_and_stay_fp8(models, tmp_path):
    model = models[F.FLUX_DEV]
    parts = model.write_parts(tmp_path / "models")
    stored, real = _scaled_fp8(model.transformer_original(), "model.diffusion_model.")
    path = tmp_path / "flux1-dev-fp8_scaled.safetensors"
    save_file({k: v.contiguous() for k, v in stored.items()}, str(path))
    t5_stored, t5_real = _scaled_fp8(model.t5_hf())
    t5_path = tmp_path / "models" / "text_encoders" / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    save_file({k: v.contiguous() for k, v in t5_stored.items()}, str(t5_path))
    bundle = load_flow_model(path, clip_l=parts["clip_l"], t5xxl=t5_path, vae=parts["vae"])
    to_q = bundle.transformer.transformer_blocks[0].attn.to_q
    assert to_q.parametrizations.weight.original.dtype == torch.float8_e4m3fn  # stays fp8 in memory
    # every weight at use equals fp8 * scale, through the BFL -> diffusers table (fused qkv split)
    from huabi.models.transformer_families import flux_to_diffusers

    expected = flux_to_diffusers(real)
    ours = {k.replace(".parametrizations.weight.original", ".weight"): v for k, v in bundle.transformer.state_dict().items()}
    for name, value in expected.items():
        module_name, _, attribute = name.rpartition(".")
        actual = getattr(bundle.transformer.get_submodule(module_name), attribute) if attribute == "weight" else ours[name]
        assert torch.allclose(actual.float(), value.float(), atol=1e-6, rtol=1e-6), name
    t5 = bundle.encoders().t5
    q = t5.encoder.block[0].layer[0].SelfAttention.q
    assert q.parametrizations.weight.original.dtype == torch.float8_e4m3fn
    assert torch.allclose(q.weight, t5_real["encoder.block.0.layer.0.SelfAttention.q.weight"].float(), atol=1e-6)
    # the whole pipeline equals one built from the real (unscaled) weights in float32
    plain_path = tmp_path / "flux1-dev-unscaled.safetensors"
    save_file({"model.diffusion_model." + k: v.float().contiguous() for k, v in real.items()}, str(plain_path))
    plain_t5 = tmp_path / "t5xxl_unscaled.safetensors"
    save_file({k: v.float().contiguous() for k, v in t5_real.items()}, str(plain_t5))
    plain = load_flow_model(plain_path, clip_l=parts["clip_l"], t5xxl=plain_t5, vae=parts["vae"])
    request = FlowRequest(PROMPT, steps=2, width_px=64, height_px=64, max_t5_tokens=16)
    a = flow_generate(bundle, request, [2], decode=False).latents
    b = flow_generate(plain, request, [2], decode=False).latents
    assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item()


def test_scale_without_weight_is_a_one_line_error(models, tmp_path):
    from huabi.models.flow_load import split_fp8_scales

    with pytest.raises(HuabiError, match="scale_weight has no weight beside it"):
        split_fp8_scales({"a.scale_weight": torch.ones(1)})
