"""Built-in ControlNet preprocessors (classic filters, no downloaded weights)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from huabi.core.preprocess import MODULES, map_to_uint8, module_spec, run_preprocessor
from huabi.errors import HuabiError


def square_image(size: int = 128) -> np.ndarray:
    image = np.full((size, size, 3), 255, dtype=np.uint8)
    image[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = (40, 80, 120)
    return image


def test_every_module_gives_a_float_map():
    image = square_image()
    mask = np.zeros((128, 128), dtype=np.uint8)
    mask[:10] = 255
    for name in MODULES:
        if MODULES[name].is_network:
            continue  # annotator weights needed: tests/test_annotators_*.py run those
        detected = run_preprocessor(name, image, processor_res=128, mask=mask)
        assert detected.dtype == np.float32 and detected.ndim == 3 and detected.shape[2] == 3, name
        assert detected.min() >= -1.0 and detected.max() <= 1.0, name


def test_none_and_invert():
    image = square_image()
    assert np.array_equal(run_preprocessor("none", image), image.astype(np.float32) / 255)
    assert np.array_equal(run_preprocessor("invert", image), (255 - image).astype(np.float32) / 255)


def test_canny_is_opencv_canny_with_thresholds():
    image = square_image()
    detected = run_preprocessor("canny", image, processor_res=128, threshold_a=50, threshold_b=150)
    expected = cv2.Canny(image, 50, 150).astype(np.float32) / 255
    assert np.array_equal(detected[..., 0], expected) and np.array_equal(detected[..., 2], expected)
    assert set(np.unique(detected)) == {0.0, 1.0}
    # Defaults are A1111's 100 / 200; a soft gradient edge shows up only with low thresholds.
    ramp = np.tile(np.linspace(0, 255, 128).astype(np.uint8)[None, :, None], (128, 1, 3))
    assert run_preprocessor("canny", ramp, processor_res=128).max() == 0
    assert run_preprocessor("canny", ramp, processor_res=128, threshold_a=1, threshold_b=2).max() == 1


def test_processor_res_sets_the_short_side():
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    assert run_preprocessor("canny", image, processor_res=64).shape == (64, 128, 3)
    assert run_preprocessor("none", image, processor_res=64).shape == (100, 200, 3)  # ready-made maps untouched


def test_softedge_and_scribble_follow_edges():
    image = square_image()
    soft = run_preprocessor("softedge_sobel", image, processor_res=128)[..., 0]
    assert soft[64, 32] > 0.5 and soft[64, 64] == 0 and soft[5, 5] == 0  # on the edge / inside / outside
    assert np.unique(soft).size > 10  # soft: many grey levels, not just 0/1
    line = np.full((128, 128, 3), 255, dtype=np.uint8)
    line[60:63, :] = 0  # a dark pencil line on white paper
    strokes = run_preprocessor("scribble_xdog", line, processor_res=128)[..., 0]
    assert strokes[61, 64] == 1.0 and strokes[10, 64] == 0.0
    assert set(np.unique(strokes)) == {0.0, 1.0}


def test_tile_blur_and_color_grid():
    image = np.random.default_rng(0).integers(0, 256, (128, 192, 3), dtype=np.uint8)
    assert run_preprocessor("tile_resample", image).shape == (128, 192, 3)
    assert run_preprocessor("tile_resample", image, threshold_a=2).shape == (64, 96, 3)
    flat = np.full((64, 64, 3), 90, dtype=np.uint8)
    assert np.allclose(run_preprocessor("blur_gaussian", flat, processor_res=64), 90 / 255)
    grid = run_preprocessor("color", image, processor_res=128)
    assert grid.shape == (128, 192, 3)
    cells = grid.reshape(2, 64, 3, 64, 3)  # 2 x 3 cells of 64 px, each one colour
    assert np.all(cells == cells[:, :1, :, :1, :])


def test_shuffle_is_seeded():
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    first = run_preprocessor("shuffle", image, processor_res=64, seed=3)
    assert np.array_equal(first, run_preprocessor("shuffle", image, processor_res=64, seed=3))
    assert not np.array_equal(first, run_preprocessor("shuffle", image, processor_res=64, seed=4))
    assert not np.array_equal(first, image.astype(np.float32) / 255)


def test_inpaint_only_marks_masked_pixels():
    image = square_image(64)
    mask = np.zeros((32, 32), dtype=np.uint8)  # another size: stretched to the image
    mask[:16] = 255
    detected = run_preprocessor("inpaint_only", image, mask=mask)
    assert np.all(detected[:32] == -1.0)
    assert np.array_equal(detected[32:], image[32:].astype(np.float32) / 255)
    assert map_to_uint8(detected)[0, 0].tolist() == [0, 0, 0]
    with pytest.raises(HuabiError, match="inpaint_only: needs a mask"):
        run_preprocessor("inpaint_only", image)


def test_names_and_bad_inputs():
    assert module_spec("t2ia_color_grid").name == "color"
    assert module_spec("Canny").name == "canny"
    with pytest.raises(HuabiError, match=r"^control module: unknown preprocessor 'no_such_module'; built in: none, invert, canny"):
        module_spec("no_such_module")
    with pytest.raises(HuabiError, match=r"control threshold B \(canny high threshold\): must be from 1 to 255, got 0"):
        run_preprocessor("canny", square_image(), threshold_b=0)
    with pytest.raises(HuabiError, match="control image: expected an 8-bit RGB image"):
        run_preprocessor("canny", np.zeros((8, 8), dtype=np.uint8))
