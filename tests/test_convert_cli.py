"""`huabi convert`: .ckpt <-> .safetensors <-> diffusers folder, dtype, pruning; lossless round trips; same images."""

from __future__ import annotations

import hashlib
import os
import stat

import numpy as np
import pytest
import torch

from huabi.cli.main import main
from huabi.core.request import GenerationRequest
from huabi.errors import HuabiError
from huabi.models.convert_file import ConvertOptions, convert_checkpoint
from huabi.models.family import ModelFamily, Prediction
from huabi.models.formats import read_pickle_checkpoint, read_safetensors, read_state_dict
from huabi.service.engine import Engine


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_identical(left: dict, right: dict) -> None:
    assert set(left) == set(right), sorted(set(left) ^ set(right))[:5]
    for key in left:
        assert left[key].dtype == right[key].dtype, key
        assert torch.equal(left[key], right[key]), key


def test_safetensors_ckpt_round_trip_is_bit_identical(tiny_sd1_file, tmp_path, capsys):
    before = _sha(tiny_sd1_file)
    ckpt = tmp_path / "model.ckpt"
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(tiny_sd1_file), "--out", str(ckpt)]) == 0
    assert main(["convert", str(ckpt), "--out", str(back)]) == 0
    out = capsys.readouterr().out
    assert f"{back}\t424 tensors" in out
    original, metadata = read_safetensors(tiny_sd1_file)
    loaded = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert set(loaded) == {"state_dict"}  # LDM/A1111 nesting
    _assert_identical(original, read_pickle_checkpoint(ckpt))
    _assert_identical(original, read_safetensors(back)[0])
    assert _sha(back) == before  # even the file bytes (same tensors, same metadata)
    from huabi.models.formats import new_file_mode

    for path in (ckpt, back):  # written via a temp file, but with a normal file's permissions
        assert stat.S_IMODE(path.stat().st_mode) == new_file_mode() == 0o666 & ~_umask()
    assert _sha(tiny_sd1_file) == before


def test_training_checkpoint_nesting_and_pruning(tiny_sd1_file, tmp_path):
    """An LDM training .ckpt: state_dict nested next to optimizer state, EMA weights beside the UNet."""
    tensors, _ = read_safetensors(tiny_sd1_file)
    unet_keys = [k for k in tensors if k.startswith("model.diffusion_model.")]
    ema = {"model_ema." + k[len("model."):].replace(".", ""): tensors[k] + 1 for k in unet_keys}
    ema["model_ema.num_updates"] = torch.tensor(7)
    schedule = {"betas": torch.linspace(0.1, 0.2, 1000, dtype=torch.float32), "alphas_cumprod": torch.linspace(1, 0.1, 1000)}
    training = {
        "state_dict": {**tensors, **ema, **schedule, "loss.logvar": torch.zeros(1000)},
        "global_step": 1234,
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}}],
        "epoch": 3,
    }
    ckpt = tmp_path / "train.ckpt"
    torch.save(training, ckpt)
    full = tmp_path / "full.safetensors"
    pruned = tmp_path / "pruned.safetensors"
    emaed = tmp_path / "ema.safetensors"
    assert convert_checkpoint(ckpt, full).tensors_out == len(tensors) + len(ema) + len(schedule) + 1
    result = convert_checkpoint(ckpt, pruned, ConvertOptions(prune=True))
    assert result.dropped == len(ema) + 1  # EMA and the loss buffer; the schedule stays (A1111 keeps it)
    _assert_identical(read_safetensors(pruned)[0], {**tensors, **schedule})
    convert_checkpoint(ckpt, emaed, ConvertOptions(prune=True, use_ema=True))
    swapped = read_safetensors(emaed)[0]
    for key in unet_keys:
        assert torch.equal(swapped[key], tensors[key] + 1)
    assert torch.equal(swapped["first_stage_model.decoder.conv_out.weight"], tensors["first_stage_model.decoder.conv_out.weight"])
    with pytest.raises(HuabiError, match=r"^full.safetensors: --use-ema: the file has no EMA weights|^.*--use-ema"):
        convert_checkpoint(pruned, tmp_path / "x.safetensors", ConvertOptions(use_ema=True))


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_dtype_conversion(tiny_mini_file, tmp_path, dtype, torch_dtype):
    out = tmp_path / f"mini-{dtype}.safetensors"
    assert main(["convert", str(tiny_mini_file), "--out", str(out), "--dtype", dtype]) == 0
    original = read_safetensors(tiny_mini_file)[0]
    converted = read_safetensors(out)[0]
    assert set(original) == set(converted)
    for key, tensor in original.items():
        if key.startswith("huabi.") or not tensor.is_floating_point():
            assert torch.equal(converted[key], tensor) and converted[key].dtype == tensor.dtype, key  # markers untouched
        else:
            assert converted[key].dtype == torch_dtype and torch.equal(converted[key], tensor.to(torch_dtype)), key
    # fp16 -> fp32 -> fp16 is lossless
    wide = tmp_path / "wide.safetensors"
    narrow = tmp_path / "narrow.safetensors"
    convert_checkpoint(out, wide, ConvertOptions(dtype="fp32"))
    convert_checkpoint(wide, narrow, ConvertOptions(dtype=dtype))
    _assert_identical(read_safetensors(narrow)[0], converted)


@pytest.mark.parametrize(
    "family,prediction",
    [(ModelFamily.SD1, Prediction.EPSILON), (ModelFamily.SD2, Prediction.V), (ModelFamily.SDXL, Prediction.EPSILON),
     (ModelFamily.HUABI_MINI, Prediction.EPSILON)],
)
def test_single_file_diffusers_round_trip_is_bit_identical(tiny_model_factory, tmp_path, family, prediction):
    src = tiny_model_factory(family, prediction=prediction)
    folder = tmp_path / "as-diffusers"
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(src), "--out", str(folder)]) == 0
    assert (folder / "model_index.json").exists() and (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert main(["convert", str(folder), "--out", str(back)]) == 0
    original = read_safetensors(src)[0]
    converted = read_safetensors(back)[0]
    _assert_identical(original, converted)


def test_diffusers_folder_to_single_file_matches_the_single_file(tiny_model_factory, tmp_path):
    folder = tiny_model_factory(ModelFamily.SDXL, layout="diffusers")
    single = tiny_model_factory(ModelFamily.SDXL)
    out = tmp_path / "sdxl.safetensors"
    convert_checkpoint(folder, out)
    _assert_identical(read_safetensors(out)[0], read_state_dict(single)[0])


def test_converted_files_make_the_same_image(tiny_sd1_file, tmp_path):
    ckpt = tmp_path / "m.ckpt"
    folder = tmp_path / "m-diffusers"
    half = tmp_path / "m-fp16.safetensors"
    convert_checkpoint(tiny_sd1_file, ckpt)
    convert_checkpoint(ckpt, folder)
    convert_checkpoint(tiny_sd1_file, half, ConvertOptions(dtype="fp16"))
    engine = Engine(device="cpu", dtype="fp32")
    request = GenerationRequest(prompt="a red apple", seed=11, steps=3, width_px=64, height_px=64, model=str(tiny_sd1_file))
    reference = np.asarray(engine.generate(request)[0].image)
    for path in (ckpt, folder):
        assert np.array_equal(np.asarray(engine.generate(request.replace(model=str(path)))[0].image), reference), path
    # fp16 weights computed in fp32: close, not equal
    halved = np.asarray(engine.generate(request.replace(model=str(half)))[0].image).astype(int)
    assert np.abs(halved - reference.astype(int)).mean() < 1.0


def test_bad_inputs_are_one_line_errors_and_leave_files_alone(tiny_sd1_file, tmp_path, capsys):
    before = _sha(tiny_sd1_file)
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep me")
    truncated = tmp_path / "truncated.safetensors"  # cut inside the JSON header
    truncated.write_bytes(tiny_sd1_file.read_bytes()[:5000])
    short = tmp_path / "short.safetensors"  # cut inside the tensor data (an incomplete download)
    short.write_bytes(tiny_sd1_file.read_bytes()[:-1000])
    cases = [
        (["convert", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "o.safetensors")], "convert: " + str(tmp_path / "missing.ckpt") + ": no such file or folder"),
        (["convert", str(tiny_sd1_file), "--out", str(tmp_path / "o.onnx")], "convert: output o.onnx: unknown format '.onnx'"),
        (["convert", str(tiny_sd1_file), "--out", str(existing)], "convert: " + str(existing) + " already exists (pass --overwrite to replace it)"),
        (["convert", str(tiny_sd1_file), "--out", str(tiny_sd1_file), "--overwrite"], "is the input; choose another name"),
        (["convert", str(truncated), "--out", str(tmp_path / "o.safetensors")],
         "truncated.safetensors: not a safetensors file or truncated: header length 53752 does not fit in a 5000-byte file"),
        (["convert", str(short), "--out", str(tmp_path / "o.safetensors")], "short.safetensors: truncated safetensors file: tensor data needs"),
        (["convert", str(tiny_sd1_file), "--out", str(tmp_path / "o.safetensors"), "--use-ema"], "--use-ema: the file has no EMA weights"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("huabi: error: ") and message in err and err.count("\n") == 1, (argv, err)
    assert existing.read_bytes() == b"keep me"
    assert _sha(tiny_sd1_file) == before
    assert not (tmp_path / "o.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    # --overwrite replaces
    assert main(["convert", str(tiny_sd1_file), "--out", str(existing), "--overwrite"]) == 0
    assert _sha(existing) == before


def test_gguf_unet_with_base_to_checkpoint(tiny_sd1_file, tmp_path, capsys):
    """A GGUF UNet plus its base becomes an ordinary checkpoint (dequantized UNet, the base's other parts)."""
    from huabi.models.gguf_io import read_gguf, write_gguf_unet

    original = read_safetensors(tiny_sd1_file)[0]
    gguf_path = tmp_path / "unet-Q8_0.gguf"
    write_gguf_unet(original, gguf_path, "Q8_0", source="tiny")
    out = tmp_path / "full.safetensors"
    assert main(["convert", str(gguf_path), "--base", str(tiny_sd1_file), "--out", str(out)]) == 0
    converted, metadata = read_safetensors(out)
    unet = read_gguf(gguf_path)[0]
    assert set(converted) == set(original) and not any(k.startswith("gguf.") for k in metadata)
    for key, tensor in converted.items():
        assert torch.equal(tensor, unet[key] if key in unet else original[key]), key
    folder = tmp_path / "full-diffusers"
    assert main(["convert", str(gguf_path), "--base", str(tiny_sd1_file), "--out", str(folder)]) == 0
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    capsys.readouterr()
    assert main(["convert", str(gguf_path), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "unet-Q8_0.gguf: a GGUF UNet file has no text encoder or VAE; pass the checkpoint" in capsys.readouterr().err
    assert main(["convert", str(tiny_sd1_file), "--base", str(tiny_sd1_file), "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "convert: --base is for a GGUF UNet source; tiny_sd1_base_epsilon.safetensors is not one" in capsys.readouterr().err
