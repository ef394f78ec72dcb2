"""Text-to-image runs end to end on every family, variant and layout huabi loads."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from huabi.core.infotext import parse_infotext
from huabi.core.request import GenerationRequest
from huabi.models.family import ModelFamily, Prediction, UNetVariant
from huabi.service.engine import Engine

CASES = {
    "sd1 single": (ModelFamily.SD1, UNetVariant.BASE, Prediction.EPSILON, "single"),
    "sd1 diffusers folder": (ModelFamily.SD1, UNetVariant.BASE, Prediction.EPSILON, "diffusers"),
    "sd1 inpainting": (ModelFamily.SD1, UNetVariant.INPAINT, Prediction.EPSILON, "single"),
    "sd1 instruct-pix2pix": (ModelFamily.SD1, UNetVariant.INSTRUCT_PIX2PIX, Prediction.EPSILON, "single"),
    "sd2 v-prediction": (ModelFamily.SD2, UNetVariant.BASE, Prediction.V, "single"),
    "sd2 eps diffusers folder": (ModelFamily.SD2, UNetVariant.BASE, Prediction.EPSILON, "diffusers"),
    "sdxl base": (ModelFamily.SDXL, UNetVariant.BASE, Prediction.EPSILON, "single"),
    "sdxl refiner": (ModelFamily.SDXL_REFINER, UNetVariant.BASE, Prediction.EPSILON, "single"),
    "huabi-mini layout": (ModelFamily.HUABI_MINI, UNetVariant.BASE, Prediction.EPSILON, "single"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_generate_runs_on_family(tiny_model_factory, tmp_path, case):
    family, variant, prediction, layout = CASES[case]
    path = tiny_model_factory(family, variant, prediction, layout)
    engine = Engine(device="cpu", dtype="fp32")
    bundle = engine.load(str(path))
    assert (bundle.family, bundle.variant, bundle.prediction) == (family, variant, prediction)
    request = GenerationRequest("a red apple, still life", negative_prompt="blurry", steps=2, seed=3,
                                width_px=64, height_px=64, sampler="Euler a", model=str(path))
    [result] = engine.generate(request, out_dir=tmp_path)
    pixels = np.asarray(Image.open(result.path).convert("RGB"))
    assert pixels.shape == (64, 64, 3)
    assert pixels.std() > 0  # not a blank image
    assert parse_infotext(result.infotext).params["Seed"] == "3"


def test_bf16_on_cpu_runs_and_stays_close_to_fp32(tiny_sd1_file):
    request = GenerationRequest("a red apple", steps=3, seed=11, width_px=64, height_px=64, model=str(tiny_sd1_file))
    [fp32] = Engine(device="cpu", dtype="fp32").generate(request)
    [bf16] = Engine(device="cpu", dtype="bf16").generate(request)
    difference = np.abs(np.asarray(fp32.image, dtype=np.int16) - np.asarray(bf16.image, dtype=np.int16))
    # bf16 keeps 8 mantissa bits; on this random tiny model images stay within a few levels on average.
    assert difference.mean() < 12
