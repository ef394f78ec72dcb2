"""OpenVINO backend: the torch UNet's weights are released after conversion and read back
from the model file only when torch needs them (a new LoRA set, a torch fallback job),
with the same images as before and as torch."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from huabi.core.request import GenerationRequest
from huabi.errors import HuabiError

pytest.importorskip("openvino")
pytestmark = pytest.mark.slow  # each conversion traces the model: ~10 s per graph on a loaded 2-core machine

from huabi.service.engine import Engine  # noqa: E402

FP32_MEAN_TOL = 0.5  # as in test_openvino_backend: OpenVINO fp32 vs torch differ by kernel rounding only


def images(engine: Engine, model, prompt: str = "a red apple", **fields) -> np.ndarray:
    request = GenerationRequest(prompt=prompt, negative_prompt="blurry", model=str(model), steps=3,
                                width_px=64, height_px=64, seed=11, batch_size=2, **fields)
    return np.stack([np.asarray(r.image, dtype=np.int16) for r in engine.generate(request)])


def unet_is_released(engine: Engine, model) -> bool:
    params = list(engine.load(str(model)).unet.parameters())
    assert all(p.is_meta for p in params) or not any(p.is_meta for p in params)  # all or nothing
    return params[0].is_meta


@pytest.fixture
def lora_setup(tiny_sd1_file, tmp_path, monkeypatch):
    """A private copy of the tiny SD1 file (tests may touch it) and a LoRA for it."""
    from huabi.models.load import load_model
    from test_lora import kohya_lora_state_dict, write_lora

    monkeypatch.setenv("HUABI_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "model.safetensors"
    shutil.copyfile(tiny_sd1_file, model)
    models = tmp_path / "models"
    base = load_model(model, compute_hash=False)
    write_lora(models / "Lora" / "style.safetensors", kohya_lora_state_dict(base, seed=11, scale=0.3))
    return model, models


def test_weights_are_released_after_conversion_and_images_do_not_change(lora_setup):
    model, models = lora_setup
    reference = images(Engine(device="cpu", dtype="fp32", models_dir=models), model)
    engine = Engine(device="cpu", dtype="fp32", models_dir=models, backend="openvino")
    first = images(engine, model)
    assert unet_is_released(engine, model)
    second = images(engine, model)
    assert np.array_equal(first, second)
    assert engine.backend.runtime.conversions == 2 and engine.backend._weights.reloads == 0
    assert np.abs(first - reference).mean() < FP32_MEAN_TOL


def test_lora_changes_read_the_weights_back_and_reconvert(lora_setup):
    model, models = lora_setup
    torch_engine = Engine(device="cpu", dtype="fp32", models_dir=models)
    engine = Engine(device="cpu", dtype="fp32", models_dir=models, backend="openvino")
    plain = images(engine, model)
    styled = images(engine, model, prompt="a red apple <lora:style:0.8>")
    weights = engine.backend._weights
    assert (engine.backend.runtime.conversions, weights.reloads) == (3, 1)  # a new UNet graph from reloaded weights
    assert unet_is_released(engine, model)
    assert np.abs(styled - images(torch_engine, model, prompt="a red apple <lora:style:0.8>")).mean() < FP32_MEAN_TOL
    assert np.abs(styled - plain).max() > 0
    # Sets seen before need neither the weights nor a conversion.
    assert np.array_equal(images(engine, model), plain)
    assert np.array_equal(images(engine, model, prompt="a red apple <lora:style:0.8>"), styled)
    assert (engine.backend.runtime.conversions, weights.reloads) == (3, 1)
    # Another strength is another set: read back (base weights + the new set), converted.
    weaker = images(engine, model, prompt="a red apple <lora:style:0.4>")
    assert (engine.backend.runtime.conversions, weights.reloads) == (4, 2)
    reference = images(torch_engine, model, prompt="a red apple <lora:style:0.4>")
    assert np.abs(weaker - reference).mean() < FP32_MEAN_TOL


def test_torch_fallback_reads_the_weights_back_with_the_active_lora(lora_setup):
    model, models = lora_setup
    prompt = "a red apple <lora:style:0.8>"
    engine = Engine(device="cpu", dtype="fp32", models_dir=models, backend="openvino")
    converted = images(engine, model, prompt=prompt)
    assert unet_is_released(engine, model)
    # --tile cannot run in OpenVINO: torch needs the UNet (with the LoRA) again.
    tiled = images(engine, model, prompt=prompt, tile=True)
    reference = images(Engine(device="cpu", dtype="fp32", models_dir=models), model, prompt=prompt, tile=True)
    assert np.array_equal(tiled, reference)
    assert engine.backend._weights.reloads == 1 and not unet_is_released(engine, model)
    # Back in OpenVINO: released again, same graph, same image.
    assert np.array_equal(images(engine, model, prompt=prompt), converted)
    assert unet_is_released(engine, model) and engine.backend.runtime.conversions == 2


def test_model_file_changed_after_release_is_a_clear_error(lora_setup):
    model, models = lora_setup
    engine = Engine(device="cpu", dtype="fp32", models_dir=models, backend="openvino")
    images(engine, model)
    stat = model.stat()
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(HuabiError, match="changed on disk after it was loaded"):
        images(engine, model, prompt="a red apple <lora:style:0.8>")


def test_kept_weights_mode_keeps_them(lora_setup):
    model, models = lora_setup
    engine = Engine(device="cpu", dtype="fp32", models_dir=models, backend="openvino")
    engine.backend.release_torch_weights = False
    images(engine, model)
    assert not unet_is_released(engine, model)


def test_ip_adapter_after_release_runs_in_torch_with_the_weights_back(lora_setup, tmp_path):
    from huabi.models.load import load_model
    from test_ip_adapter import adapter_tensors, sample_image, tiny_vision_model, write_adapter

    model, models = lora_setup
    tiny_vision_model().save_pretrained(models / "clip_vision" / "tiny-vit")
    write_adapter(models / "ipadapter" / "ip-adapter_tiny_sd15.safetensors",
                  adapter_tensors(load_model(model, compute_hash=False).unet, seed=1))
    sample_image(1).save(tmp_path / "prompt.png")
    fields = {"ip_adapter": "ip-adapter_tiny_sd15", "ip_image": str(tmp_path / "prompt.png")}
    engine = Engine(device="cpu", dtype="fp32", models_dir=models, backend="openvino")
    images(engine, model)
    assert unet_is_released(engine, model)
    prompted = images(engine, model, **fields)  # IP-Adapter cannot run in OpenVINO: torch, weights read back
    reference = images(Engine(device="cpu", dtype="fp32", models_dir=models), model, **fields)
    assert np.array_equal(prompted, reference)
    assert engine.backend._weights.reloads == 1
