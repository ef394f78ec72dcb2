"""OpenVINO backend: tiny models of every family give PyTorch's images; the IR cache is
reused for the same weights and invalidated when the model or the LoRA set changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from huabi.core.request import GenerationRequest
from huabi.models.family import ModelFamily, UNetVariant

pytest.importorskip("openvino")
pytestmark = pytest.mark.slow  # each conversion traces the model: ~10 s per graph on a loaded 2-core machine

from huabi.service.engine import Engine  # noqa: E402

# Pixels are 0..255; OpenVINO fp32 differs from torch only by kernel rounding.
FP32_MEAN_TOL = 0.5
FP32_MAX_TOL = 8


def images(engine: Engine, model, prompt: str = "a red apple", **fields) -> tuple[np.ndarray, list]:
    request = GenerationRequest(prompt=prompt, negative_prompt="blurry", model=str(model), steps=3,
                                width_px=64, height_px=64, seed=11, batch_size=2, **fields)
    results = engine.generate(request)
    return np.stack([np.asarray(r.image, dtype=np.int16) for r in results]), results


@pytest.mark.parametrize("family", [ModelFamily.SD1, ModelFamily.SD2, ModelFamily.SDXL, ModelFamily.HUABI_MINI])
def test_openvino_matches_torch_for_every_family(family, tiny_model_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("HUABI_CACHE_DIR", str(tmp_path))
    model = tiny_model_factory(family)
    reference, _ = images(Engine(device="cpu", dtype="fp32"), model)
    engine = Engine(device="cpu", dtype="fp32", backend="openvino")
    converted, results = images(engine, model)
    difference = np.abs(converted - reference)
    assert difference.mean() < FP32_MEAN_TOL and difference.max() <= FP32_MAX_TOL, (difference.mean(), difference.max())
    assert "Backend: OpenVINO" in results[0].infotext
    assert engine.backend.runtime.conversions == 2  # UNet + VAE decoder, once for the whole batch


def test_openvino_bf16_precision_is_close_to_fp32(tiny_model_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("HUABI_CACHE_DIR", str(tmp_path))
    model = tiny_model_factory(ModelFamily.SD1)
    reference, _ = images(Engine(device="cpu", dtype="fp32"), model)
    engine = Engine(device="cpu", dtype="bf16", backend="openvino")
    assert engine.backend.runtime.precision == "bf16"
    converted, results = images(engine, model)
    torch_bf16, _ = images(Engine(device="cpu", dtype="bf16"), model)
    assert "Dtype: bf16, Backend: OpenVINO" in results[0].infotext
    # bf16 rounding: a few pixel steps on average, like torch's own bf16.
    assert np.abs(converted - reference).mean() < max(3.0, 2 * np.abs(torch_bf16 - reference).mean())


def test_inpainting_variant_and_img2img_run_in_openvino(tiny_model_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("HUABI_CACHE_DIR", str(tmp_path))
    model = tiny_model_factory(ModelFamily.SD1, UNetVariant.INPAINT)  # 9 input channels
    reference, _ = images(Engine(device="cpu", dtype="fp32"), model)
    converted, _ = images(Engine(device="cpu", dtype="fp32", backend="openvino"), model)
    assert np.abs(converted - reference).mean() < FP32_MEAN_TOL


def test_ir_cache_is_reused_and_invalidated_by_model_and_lora(tiny_model_factory, tmp_path, monkeypatch):
    from huabi.backends.openvino import weights_checksum

    monkeypatch.setenv("HUABI_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny_model_factory(ModelFamily.SD1)
    first = Engine(device="cpu", dtype="fp32", backend="openvino")
    images(first, model)
    assert first.backend.runtime.conversions == 2
    second = Engine(device="cpu", dtype="fp32", backend="openvino")  # a new process would see the same disk
    second.backend.release_torch_weights = False  # this test edits the torch weights by hand below
    images(second, model)
    assert second.backend.runtime.conversions == 0
    # Another model (other weights): new graphs.
    other = tiny_model_factory(ModelFamily.SD2)
    images(second, other)
    assert second.backend.runtime.conversions == 2
    # The same model with changed UNet weights (what a LoRA does): a new checksum, so a new UNet graph.
    bundle = second.load(str(model))
    before = weights_checksum(bundle.unet)
    with torch.no_grad():
        bundle.unet.conv_in.weight.add_(0.01)
    assert weights_checksum(bundle.unet) != before
    second.backend._converted = None  # what a changed LoRA set does (lora_state differs)
    second.backend._unet_keys.clear()  # (the graph key of a known LoRA set is remembered)
    images(second, model)
    assert second.backend.runtime.conversions == 3  # UNet again; the VAE decoder graph is still valid


def test_lora_set_change_reconverts_and_matches_torch(tiny_sd1_file, tmp_path, monkeypatch):
    from huabi.models.load import load_model
    from test_lora import kohya_lora_state_dict, write_lora

    monkeypatch.setenv("HUABI_CACHE_DIR", str(tmp_path / "cache"))
    models = tmp_path / "models"
    base = load_model(tiny_sd1_file, compute_hash=False)
    write_lora(models / "Lora" / "style.safetensors", kohya_lora_state_dict(base, seed=11, scale=0.3))
    torch_engine = Engine(device="cpu", dtype="fp32", models_dir=models)
    engine = Engine(device="cpu", dtype="fp32", models_dir=models, backend="openvino")
    plain, _ = images(engine, tiny_sd1_file)
    assert engine.backend.runtime.conversions == 2
    styled, results = images(engine, tiny_sd1_file, prompt="a red apple <lora:style:0.8>")
    assert engine.backend.runtime.conversions == 3  # LoRA merged into the UNet: a new UNet graph
    assert np.abs(styled - plain).max() > 0
    reference, _ = images(torch_engine, tiny_sd1_file, prompt="a red apple <lora:style:0.8>")
    assert np.abs(styled - reference).mean() < FP32_MEAN_TOL
    assert "Lora hashes" in results[0].infotext and "Backend: OpenVINO" in results[0].infotext
    again, _ = images(engine, tiny_sd1_file)  # back to the base set: its graph is on disk already
    assert engine.backend.runtime.conversions == 3
    assert np.abs(again - plain).max() == 0


def test_unsupported_features_fall_back_to_torch_with_a_message(tiny_model_factory, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HUABI_CACHE_DIR", str(tmp_path))
    model = tiny_model_factory(ModelFamily.SD1)
    engine = Engine(device="cpu", dtype="fp32", backend="openvino")
    with caplog.at_level("WARNING", logger="huabi"):
        tiled, results = images(engine, model, tile=True)
    assert "OpenVINO cannot run seamless tiling (circular padding); this job runs in torch" in caplog.text
    assert "Backend" not in results[0].infotext
    assert engine.backend.runtime.conversions == 0
    reference, _ = images(Engine(device="cpu", dtype="fp32"), model, tile=True)
    assert np.array_equal(tiled, reference)


def test_int8_weights_cost_a_measured_amount(tiny_model_factory, tmp_path, monkeypatch):
    pytest.importorskip("nncf")
    monkeypatch.setenv("HUABI_CACHE_DIR", str(tmp_path))
    model = tiny_model_factory(ModelFamily.SD1)
    reference, _ = images(Engine(device="cpu", dtype="fp32"), model)
    fp32_graph, _ = images(Engine(device="cpu", dtype="fp32", backend="openvino"), model)
    engine = Engine(device="cpu", dtype="fp32", backend="openvino-int8")
    int8, results = images(engine, model)
    assert "Backend: OpenVINO int8" in results[0].infotext
    assert sorted(p.name.split("-")[-1] for p in tmp_path.joinpath("openvino").iterdir() if p.name.startswith("unet")) \
        == ["fp32", "int8"]  # separate cache entries
    int8_error = np.abs(int8 - reference).mean()
    fp32_error = np.abs(fp32_graph - reference).mean()
    # Weight-only int8 changes the image more than fp32 OpenVINO does, but stays close.
    assert fp32_error < int8_error < 12, (fp32_error, int8_error)


def test_unknown_backend_is_a_clear_error():
    from huabi.errors import HuabiError

    with pytest.raises(HuabiError, match="backend: unknown backend 'tensorrt'; valid: auto, torch, openvino, openvino-int8"):
        Engine(device="cpu", dtype="fp32", backend="tensorrt")


def test_fp32_runs_store_fp16_weights_only_when_lossless(tiny_model_factory, tmp_path, monkeypatch):
    """With an f32 hint the IR is stored in fp16 when every weight survives fp16 unchanged (weights
    read from an fp16 file): the same images as an fp32 IR, in half the disk and memory. Other weights
    keep fp32."""
    from huabi.backends import openvino as ov_backend

    from safetensors.torch import load_file, save_file

    model = tmp_path / "fp16.safetensors"  # the tiny SD1 file stored in fp16, as most shared checkpoints are
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v
               for k, v in load_file(str(tiny_model_factory(ModelFamily.SD1))).items()}, str(model))
    bundle = Engine(device="cpu", dtype="fp32").load(str(model))
    runtime = ov_backend.OpenVINORuntime(tmp_path / "keys", precision="f32")
    assert ov_backend.fits_fp16(bundle.unet)  # read from fp16 into fp32: exact
    assert runtime.graph_key("unet", "h", bundle.unet, int8=False).endswith("-fp16")
    assert ov_backend.OpenVINORuntime(tmp_path / "keys", precision="f32", int8=True).graph_key(
        "unet", "h", bundle.unet, int8=True).endswith("-int8")
    with torch.no_grad():
        bundle.unet.conv_in.weight[0, 0, 0, 0] += 1e-6  # one value fp16 cannot hold
    assert not ov_backend.fits_fp16(bundle.unet)
    assert runtime.graph_key("unet", "h", bundle.unet, int8=False).endswith("-fp32")

    def run(cache, exact: bool):
        monkeypatch.setenv("HUABI_CACHE_DIR", str(tmp_path / cache))
        if not exact:
            monkeypatch.setattr(ov_backend, "fits_fp16", lambda module: False)
        engine = Engine(device="cpu", dtype="fp32", backend="openvino")
        pictures, _ = images(engine, model)
        monkeypatch.undo()
        formats = {p.name.rsplit("-", 1)[-1] for p in (tmp_path / cache).rglob("*") if p.is_dir() and "-" in p.name}
        return pictures, formats

    compact, compact_formats = run("compact", exact=True)
    full, full_formats = run("full", exact=False)
    assert "fp16" in compact_formats and "fp32" not in compact_formats and "fp16" not in full_formats
    assert np.abs(compact - full).max() <= 1  # the same graph: at most a rounding step between compilations
