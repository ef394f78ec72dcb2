"""``--backend compile``: the UNet through torch.compile with frozen weights gives eager's images;
a LoRA change recompiles (frozen weights would otherwise be stale); run-time UNet patches run eagerly."""

from __future__ import annotations

import numpy as np
import pytest

from huabi.core.request import GenerationRequest
from huabi.models.family import ModelFamily

pytestmark = pytest.mark.slow  # inductor compiles C++ kernels: minutes on a loaded 2-core machine

from huabi.backends.compiled import compiler_available  # noqa: E402
from huabi.service.engine import Engine  # noqa: E402

if not compiler_available():
    pytest.skip("torch.compile needs a C++ compiler", allow_module_level=True)

# Pixels 0..255. Compiled fp32 kernels reorder sums: rounding-level differences only.
MEAN_TOL = 0.5
MAX_TOL = 8


def images(engine: Engine, model, prompt: str = "a red apple", **fields) -> tuple[np.ndarray, list]:
    request = GenerationRequest(prompt=prompt, negative_prompt="blurry", model=str(model), steps=2,
                                width_px=64, height_px=64, seed=11, batch_size=1, **fields)
    results = engine.generate(request)
    return np.stack([np.asarray(r.image, dtype=np.int16) for r in results]), results


def test_compiled_unet_matches_eager_and_recompiles_for_a_lora_change(tiny_sd1_file, tmp_path, caplog):
    from huabi.models.load import load_model
    from test_lora import kohya_lora_state_dict, write_lora

    models = tmp_path / "models"
    write_lora(models / "Lora" / "style.safetensors",
               kohya_lora_state_dict(load_model(tiny_sd1_file, compute_hash=False), seed=11, scale=0.3))
    eager = Engine(device="cpu", dtype="fp32", models_dir=models)
    engine = Engine(device="cpu", dtype="fp32", models_dir=models, backend="compile")
    with caplog.at_level("WARNING", logger="huabi"):
        compiled, results = images(engine, tiny_sd1_file)
    assert "torch.compile: UNet compiled and run once in" in caplog.text
    reference, _ = images(eager, tiny_sd1_file)
    difference = np.abs(compiled - reference)
    assert difference.mean() < MEAN_TOL and difference.max() <= MAX_TOL, (difference.mean(), difference.max())
    assert "Backend: torch.compile" in results[0].infotext
    again, _ = images(engine, tiny_sd1_file)  # same shape, same weights: no new compile
    assert np.array_equal(again, compiled) and engine.backend.compiled_unets.compiles == 1

    prompt = "a red apple <lora:style:0.8>"
    styled, _ = images(engine, tiny_sd1_file, prompt=prompt)
    assert engine.backend.compiled_unets.compiles == 2  # the frozen weights changed: recompiled
    styled_reference, _ = images(eager, tiny_sd1_file, prompt=prompt)
    assert np.abs(styled - styled_reference).mean() < MEAN_TOL
    assert np.abs(styled - compiled).mean() > np.abs(styled - styled_reference).mean()  # the LoRA is in (not stale)


def test_run_time_unet_patches_run_eagerly(tiny_model_factory, caplog):
    model = tiny_model_factory(ModelFamily.SD1)
    engine = Engine(device="cpu", dtype="fp32", backend="compile")
    with caplog.at_level("WARNING", logger="huabi"):
        tiled, results = images(engine, model, tile=True)
    assert "torch.compile cannot run seamless tiling (circular padding); this job runs in eager torch" in caplog.text
    assert "Backend" not in results[0].infotext and engine.backend.compiled_unets.compiles == 0
    reference, _ = images(Engine(device="cpu", dtype="fp32"), model, tile=True)
    assert np.array_equal(tiled, reference)
