"""GGUF UNet files: ComfyUI-GGUF / stable-diffusion.cpp layouts, `huabi quantize`, loading with a base checkpoint."""

from __future__ import annotations

import hashlib
import shutil
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from huabi.cli.main import main
from huabi.core.request import GenerationRequest
from huabi.errors import HuabiError
from huabi.models.family import ModelFamily
from huabi.models.formats import read_state_dict
from huabi.models.gguf_io import ORIG_SHAPE_PREFIX, read_gguf, read_gguf_metadata, write_gguf_unet
from huabi.models.convert import unet_to_diffusers
from huabi.models.load import build_unet, load_model
from huabi.service.engine import Engine

UNET = "model.diffusion_model."

# UNet output relative error (L2) on the tiny random models, measured 2026-11 (see README):
# sd1 F16 6.8e-4, BF16 5.9e-3, Q8_0 1.6e-2, Q5_1 0.12, Q5_0 0.13, Q4_1 0.22, Q4_0 0.26.
# Bounds here are about 2x those numbers; quantization is deterministic, so they are stable.
UNET_REL_BOUNDS = {"F16": 2e-3, "BF16": 1.5e-2, "Q8_0": 4e-2, "Q5_1": 0.25, "Q5_0": 0.3, "Q4_1": 0.45, "Q4_0": 0.5}


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _unet_output(bundle, family):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 77, int(bundle.unet.config.cross_attention_dim), generator=generator)
    extra = {}
    if family is ModelFamily.SDXL:
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 64, generator=generator), "time_ids": torch.randn(1, 6, generator=generator)}}
    with torch.no_grad():
        return bundle.unet(x, torch.tensor([500]), encoder_hidden_states=context, **extra).sample


@pytest.fixture(scope="module")
def sd1_state(tiny_sd1_file):
    return read_state_dict(tiny_sd1_file)[0]


def test_f32_gguf_round_trip_is_bit_identical(tiny_sd1_file, sd1_state, tmp_path):
    out = tmp_path / "unet-F32.gguf"
    before = _sha(tiny_sd1_file)
    counts = write_gguf_unet(sd1_state, out, "F32", source=tiny_sd1_file.name)
    assert counts == {"F32": sum(1 for k in sd1_state if k.startswith(UNET))}
    tensors, metadata = read_gguf(out)
    unet = {k: v for k, v in sd1_state.items() if k.startswith(UNET)}
    assert set(tensors) == set(unet)
    assert all(torch.equal(tensors[k], unet[k]) and tensors[k].dtype == unet[k].dtype for k in unet)
    assert metadata["gguf.architecture"] == "sd1"
    assert _sha(tiny_sd1_file) == before  # input untouched
    from huabi.models.formats import new_file_mode

    assert out.stat().st_mode & 0o777 == new_file_mode()  # not the temp file's 0o600


def test_comfyui_layout_written(sd1_state, tmp_path):
    out = tmp_path / "unet-Q8_0.gguf"
    write_gguf_unet(sd1_state, out, "Q8_0", source="tiny")
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "sd1"
    names = {t.name: t for t in reader.tensors}
    assert "input_blocks.0.0.weight" in names and not any(n.startswith(UNET) for n in names)  # ComfyUI: no prefix
    types = {t.tensor_type.name for t in reader.tensors}
    assert "Q8_0" in types
    for name, tensor in names.items():
        original = sd1_state[UNET + name]
        if original.ndim == 1 or original.numel() <= 1024:
            assert tensor.tensor_type.name == "F32", name  # biases, norms, small tensors stay F32
    # 3x3 convs cannot be cut into 32-value blocks: flattened to rows of 256, real shape recorded
    conv = "input_blocks.1.0.in_layers.2.weight"
    assert list(reader.fields[ORIG_SHAPE_PREFIX + conv].contents()) == list(sd1_state[UNET + conv].shape)
    assert names[conv].tensor_type.name == "Q8_0"


def _decode_q8_0(raw: np.ndarray) -> np.ndarray:
    """Independent Q8_0 decoder (GGML's block: fp16 scale d, then 32 int8 q; value = d*q)."""
    blocks = raw.reshape(-1, 34)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    quants = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (scale * quants).reshape(-1)


def _decode_q4_0(raw: np.ndarray) -> np.ndarray:
    """Independent Q4_0 decoder: fp16 d, 16 bytes; low nibbles are values 0-15, high nibbles 16-31; value = d*(q-8)."""
    blocks = raw.reshape(-1, 18)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    packed = blocks[:, 2:]
    low, high = (packed & 0x0F).astype(np.int8) - 8, (packed >> 4).astype(np.int8) - 8
    return (scale * np.concatenate([low, high], axis=1).astype(np.float32)).reshape(-1)


@pytest.mark.parametrize("qtype,decode", [("Q8_0", _decode_q8_0), ("Q4_0", _decode_q4_0)])
def test_dequantized_values_match_an_independent_decoder(sd1_state, tmp_path, qtype, decode):
    out = tmp_path / f"unet-{qtype}.gguf"
    write_gguf_unet(sd1_state, out, qtype, source="tiny")
    tensors, _ = read_gguf(out)
    checked = 0
    for tensor in gguf.GGUFReader(str(out)).tensors:
        if tensor.tensor_type.name != qtype:
            continue
        expected = decode(np.asarray(tensor.data))
        ours = tensors[UNET + tensor.name].reshape(-1).numpy()
        np.testing.assert_array_equal(ours, expected)
        checked += 1
    assert checked > 40


@pytest.mark.parametrize("family", [ModelFamily.SD1, ModelFamily.SDXL])
def test_quantized_unet_error_per_type(tiny_model_factory, tmp_path, family):
    src = tiny_model_factory(family)
    state = read_state_dict(src)[0]
    reference_bundle = load_model(src, compute_hash=False)
    reference = _unet_output(reference_bundle, family)
    errors = {}
    config = dict(reference_bundle.unet.config)
    types = UNET_REL_BOUNDS if family is ModelFamily.SD1 else {t: UNET_REL_BOUNDS[t] for t in ("F16", "Q8_0", "Q5_1", "Q4_0")}
    for qtype in types:
        out = tmp_path / f"{family.value}-{qtype}.gguf"
        write_gguf_unet(state, out, qtype, source=src.name)
        unet_sd = {k[len(UNET):]: v for k, v in read_gguf(out)[0].items()}
        unet = build_unet(config, unet_to_diffusers(unet_sd, config))  # only the UNet: the rest is the base's
        errors[qtype] = float((_unet_output(SimpleNamespace(unet=unet), family) - reference).norm() / reference.norm())
    # SDXL's deeper tiny UNet amplifies more: allow it 1.7x
    scale = 1.0 if family is ModelFamily.SD1 else 1.7
    for qtype in types:
        assert 0 < errors[qtype] < UNET_REL_BOUNDS[qtype] * scale, (qtype, errors)
    assert errors["F16"] < errors["Q8_0"] < errors["Q5_1"] < errors["Q4_0"]


def test_generate_with_gguf_and_base_then_from_redoes_it(tiny_sd1_file, sd1_state, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    gguf_path = models / "tiny-Q8_0.gguf"
    assert main(["quantize", str(tiny_sd1_file), "--type", "Q8_0", "--out", str(gguf_path)]) == 0
    out = tmp_path / "out"
    args = ["--steps", "3", "--size", "64x64", "--seed", "5", "--quiet", "--models-dir", str(models), "--base", str(tiny_sd1_file)]
    assert main(["generate", "a red apple", "--model", str(gguf_path), "--out", str(out), *args]) == 0
    first = sorted(out.glob("*.png"))[0]
    from huabi.service.pngio import read_infotext

    infotext = read_infotext(first)
    assert "Model: tiny-Q8_0" in infotext
    base_hash = hashlib.sha256(tiny_sd1_file.read_bytes()).hexdigest()[:10]
    assert f"GGUF base: {tiny_sd1_file.stem}, GGUF base hash: {base_hash}" in infotext  # what --base to pass again
    # --from finds the GGUF by name in the models folder; --base takes the recorded base hash
    shutil.copy(tiny_sd1_file, models / "base.safetensors")
    again = tmp_path / "again"
    assert main(["generate", "--from", str(first), "--out", str(again), "--quiet", "--models-dir", str(models), "--base", base_hash]) == 0
    second = sorted(again.glob("*.png"))[0]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))


def test_f32_gguf_gives_the_checkpoints_image(tiny_sd1_file, sd1_state, tmp_path):
    out = tmp_path / "unet-F32.gguf"
    write_gguf_unet(sd1_state, out, "F32", source="tiny")
    engine = Engine(device="cpu", dtype="fp32", base_model=tiny_sd1_file)
    request = GenerationRequest(prompt="a cat", seed=3, steps=3, width_px=64, height_px=64, model=str(tiny_sd1_file))
    reference = np.asarray(engine.generate(request)[0].image)
    quantized = np.asarray(engine.generate(request.replace(model=str(out)))[0].image)
    assert np.array_equal(reference, quantized)


def test_stable_diffusion_cpp_layout_full_model(tiny_sd1_file, sd1_state, tmp_path):
    """sd.cpp keeps original prefixed names and may carry the VAE and text encoders: loads without --base."""
    out = tmp_path / "sdcpp.gguf"
    writer = gguf.GGUFWriter(path=None, arch="stable-diffusion")
    for name, tensor in sd1_state.items():
        values = tensor.numpy()
        if tensor.is_floating_point() and tensor.ndim > 1:
            values = values.astype(np.float16)  # sd.cpp's f16 conversion; 1-D tensors stay f32
        writer.add_tensor(name, values)
    writer.write_header_to_file(path=str(out))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    bundle = load_model(out, compute_hash=False)
    reference = load_model(tiny_sd1_file, compute_hash=False)
    assert bundle.family is ModelFamily.SD1
    assert torch.equal(bundle.vae.decoder.conv_out.weight, reference.vae.decoder.conv_out.weight.half().float())
    got = bundle.unet.conv_in.weight
    assert torch.equal(got, reference.unet.conv_in.weight.half().float())


def _write_custom(path, arch, tensors):
    writer = gguf.GGUFWriter(path=None, arch=arch)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unknown_architecture_is_one_line_error(tmp_path):
    path = tmp_path / "flux-Q8_0.gguf"
    _write_custom(path, "flux", {"double_blocks.0.img_attn.proj.weight": np.zeros((64, 64), np.float32)})
    with pytest.raises(HuabiError, match=r"^flux-Q8_0.gguf: GGUF architecture 'flux' is not a Stable Diffusion UNet huabi can run \(known: sd1, sdxl\)$"):
        read_gguf(path)


def test_bad_gguf_inputs(tiny_sd1_file, sd1_state, tmp_path, capsys):
    q8 = tmp_path / "unet.gguf"
    write_gguf_unet(sd1_state, q8, "Q8_0", source="tiny")
    # no --base
    with pytest.raises(HuabiError, match=r"unet.gguf: a GGUF UNet file has no text encoder or VAE; pass the checkpoint"):
        load_model(q8, compute_hash=False)
    # truncated
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(q8.read_bytes()[: q8.stat().st_size // 2])
    with pytest.raises(HuabiError, match=r"^truncated.gguf: unreadable or truncated GGUF file"):
        read_gguf(truncated)
    not_gguf = tmp_path / "fake.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 nothing")
    with pytest.raises(HuabiError, match=r"^fake.gguf: not a GGUF file"):
        read_gguf(not_gguf)
    nameless = tmp_path / "nameless.gguf"
    _write_custom(nameless, "sd1", {"weird.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(HuabiError, match=r"GGUF architecture 'sd1' but no input_blocks"):
        read_gguf(nameless)
    # CLI: unknown type, wrong suffix, existing output
    assert main(["quantize", str(tiny_sd1_file), "--type", "Q3_K", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "huabi: error: quantize: unknown type 'Q3_K'; valid: F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0" in capsys.readouterr().err
    assert main(["quantize", str(tiny_sd1_file), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "quantize: output x.safetensors must end in .gguf" in capsys.readouterr().err
    assert main(["quantize", str(tiny_sd1_file), "--out", str(q8)]) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    assert main(["generate", "x", "--model", str(q8), "--base", "nonexistent", "--models-dir", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err  # the message also lists what the models folder holds
    assert err.startswith(f"huabi: error: base: no model named or hashed 'nonexistent' in {tmp_path} (it holds: ")
    assert err.endswith("); pass --base PATH\n") and len(err.splitlines()) == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_base_of_another_family_is_refused(tiny_sd1_file, tiny_sdxl_file, sd1_state, tmp_path):
    q8 = tmp_path / "sd1-unet.gguf"
    write_gguf_unet(sd1_state, q8, "Q8_0", source="tiny")
    with pytest.raises(HuabiError, match=r"^sd1-unet.gguf: UNet does not match base tiny_sdxl_base_epsilon.safetensors: model\.diffusion_model\.\S+ "):
        load_model(q8, base=tiny_sdxl_file, compute_hash=False)


def test_metadata_and_listing(tiny_sd1_file, sd1_state, tmp_path):
    models = tmp_path / "models"
    out = models / "unet-Q4_0.gguf"
    write_gguf_unet(sd1_state, out, "Q4_0", source="tiny", extra_metadata={"general.name": "tiny"})
    metadata = read_gguf_metadata(out)
    assert metadata["general.architecture"] == "sd1" and metadata["general.name"] == "tiny"
    assert metadata["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    engine = Engine(device="cpu", dtype="fp32", models_dir=models)
    assert [e.name for e in engine.iter_models() if e.path.suffix == ".gguf"] == ["unet-Q4_0"]
    from huabi.models.inspect import describe_model_file

    assert describe_model_file(out) == "sd1 base GGUF UNet (Q4_0), needs --base"  # `huabi models` line


def test_on_the_fly_dequantization(tiny_sd1_file, sd1_state, tmp_path):
    """--gguf-on-the-fly: weights stay packed (less memory) and give the same pixels as dequantizing on load."""
    from huabi.models.gguf_io import DequantizeOnUse, has_packed_weights

    q8 = tmp_path / "models" / "unet-Q8_0.gguf"
    write_gguf_unet(sd1_state, q8, "Q8_0", source="tiny")
    on_load = load_model(q8, base=tiny_sd1_file, compute_hash=False)
    on_the_fly = load_model(q8, base=tiny_sd1_file, compute_hash=False, gguf_on_the_fly=True)
    assert has_packed_weights(on_the_fly.unet) and not has_packed_weights(on_load.unet)
    packed = [(name, m) for name, m in on_the_fly.unet.named_modules() if hasattr(m, "parametrizations")]
    assert len(packed) == 57  # every Q8_0 tensor of the file
    for name, module in packed:
        assert isinstance(module.parametrizations.weight[0], DequantizeOnUse)
        assert torch.equal(module.weight, on_load.unet.get_submodule(name).weight), name  # same float32 values
    resident = sum(p.numel() * p.element_size() for p in on_the_fly.unet.parameters())
    full = sum(p.numel() * p.element_size() for p in on_load.unet.parameters())
    assert resident < full / 2.5  # measured 3.0x smaller on this tiny UNet (Q8_0 is ~1.06 bytes per weight)

    request = GenerationRequest(prompt="a cat", seed=3, steps=3, width_px=64, height_px=64, model=str(q8))
    reference = np.asarray(Engine(device="cpu", dtype="fp32", base_model=tiny_sd1_file).generate(request)[0].image)
    engine = Engine(device="cpu", dtype="fp32", base_model=tiny_sd1_file, gguf_on_the_fly=True,
                    models_dir=tmp_path / "models")
    # same weights; the engine's channels_last layout applies to stored weights only, so convolution
    # kernels may differ in summation order: a level at most
    difference = np.abs(np.asarray(engine.generate(request)[0].image).astype(int) - reference.astype(int))
    assert difference.max() <= 1, difference.max()
    # LoRAs edit weights in place, which a weight recomputed from packed bytes would silently undo
    (tmp_path / "models" / "Lora").mkdir()
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 1)},
              str(tmp_path / "models" / "Lora" / "style.safetensors"))
    with pytest.raises(HuabiError, match=r"^LoRA: the model's GGUF weights are dequantized on the fly \(--gguf-on-the-fly\); load it without"):
        engine.generate(request.replace(prompt="a cat <lora:style:1>"))
