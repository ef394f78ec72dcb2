"""Midjourney-style prompt parameters: parsing, mapping onto a request, chaos variation."""

from __future__ import annotations

import pytest

from huabi.core.midjourney import (
    KNOWN_PARAMETERS,
    MJParams,
    apply_to_request,
    aspect_size_px,
    chaos_requests,
    parse_midjourney,
    stylize_cfg_scale,
    top_level_parts,
)
from huabi.core.request import GenerationRequest
from huabi.errors import HuabiError


def test_plain_prompt_has_no_parameters():
    assert parse_midjourney("a red apple, (shiny:1.2), [a:b:5]") == ("a red apple, (shiny:1.2), [a:b:5]", MJParams())
    # Dashes inside words or without a letter after them are prompt text.
    assert parse_midjourney("a well-made x--y -- 5")[1].used is False


def test_every_parameter_parses():
    prompt, params = parse_midjourney(
        "a castle, (gold:1.2) --ar 3:2 --no fog, cars --seed 42 --chaos 30 --tile --q .5 --s 250 "
        "--iw 1.5 --v 6.1 --niji 6 --style raw"
    )
    assert prompt == "a castle, (gold:1.2)"
    assert params.aspect == (3, 2)
    assert params.no == ("fog", "cars")
    assert params.seed == 42
    assert params.chaos == 30
    assert params.tile is True
    assert params.quality == 0.5
    assert params.stylize == 250
    assert params.image_weight == 1.5
    assert (params.version, params.niji, params.style) == ("6.1", "6", "raw")
    assert params.ignored == ("--v 6.1", "--niji 6", "--style raw")
    assert params.used


def test_aliases_long_dash_and_repeats():
    prompt, params = parse_midjourney("sky —aspect 16:9 --c 10 --quality 2 --stylize 0 --no a --no b --version 5 --niji")
    assert prompt == "sky"
    assert params.aspect == (16, 9)
    assert (params.chaos, params.quality, params.stylize) == (10, 2.0, 0)
    assert params.no == ("a", "b")  # --no collects
    assert params.niji == ""  # bare --niji
    assert parse_midjourney("x --seed 1 --seed 2")[1].seed == 2  # the last one wins


def test_aspect_size_keeps_native_pixel_count_on_a_64_grid():
    assert aspect_size_px((3, 2), 512) == (640, 448)
    assert aspect_size_px((2, 3), 512) == (448, 640)
    assert aspect_size_px((16, 9), 512) == (704, 384)
    assert aspect_size_px((16, 9), 1024) == (1344, 768)  # SDXL's own bucket
    assert aspect_size_px((1, 1), 768) == (768, 768)
    assert aspect_size_px((8, 1), 512) == (1472, 192)


def test_aspect_size_on_a_small_model_uses_its_own_grid():
    # huabi-mini (native 128): SD1's sizes at a quarter scale, not 128x128 for every ratio
    assert aspect_size_px((3, 2), 128) == (160, 112)
    assert aspect_size_px((2, 3), 128) == (112, 160)
    assert aspect_size_px((16, 9), 128) == (176, 96)
    assert aspect_size_px((1, 1), 128) == (128, 128)
    assert aspect_size_px((8, 1), 128) == (368, 48)
    assert aspect_size_px((8, 1), 64) == (184, 24)  # never below one grid step (native / 8)
    for ratio in [(3, 2), (4, 3), (7, 5), (21, 9), (9, 16)]:
        width_px, height_px = aspect_size_px(ratio, 128)
        assert width_px % 16 == 0 and height_px % 16 == 0
        assert width_px / height_px != 1.0
        assert abs(width_px * height_px / 128**2 - 1) < 0.15
        assert abs((width_px / height_px) / (ratio[0] / ratio[1]) - 1) < 0.10
    for ratio in [(3, 2), (4, 3), (7, 5), (21, 9), (9, 16)]:
        width_px, height_px = aspect_size_px(ratio, 512)
        assert width_px % 64 == 0 and height_px % 64 == 0
        # Pixel count within 15% of native, ratio within 10% of asked (64-px rounding at 512 native).
        assert abs(width_px * height_px / 512**2 - 1) < 0.15
        assert abs((width_px / height_px) / (ratio[0] / ratio[1]) - 1) < 0.10


def test_apply_to_request_maps_each_parameter():
    _, params = parse_midjourney("x --ar 3:2 --no fog, cars --seed 9 --tile --q 2 --s 1000")
    base = GenerationRequest("x", negative_prompt="blurry", steps=15, cfg_scale=7.0, width_px=64, height_px=64)
    request = apply_to_request(base, params, native_size_px=512)
    assert (request.width_px, request.height_px) == (640, 448)  # --ar wins over --size
    assert request.negative_prompt == "blurry, fog, cars"
    assert request.seed == 9
    assert request.tile is True
    assert request.steps == 30
    assert request.cfg_scale == 3.5
    assert apply_to_request(GenerationRequest("x"), parse_midjourney("x --no fog")[1], 512).negative_prompt == "fog"
    assert apply_to_request(GenerationRequest("x", steps=3), parse_midjourney("x --q .25")[1], 512).steps == 1
    assert apply_to_request(base, MJParams(), 512) is base


def test_stylize_cfg_curve():
    assert stylize_cfg_scale(7.0, 100) == 7.0  # Midjourney's default leaves the CFG scale alone
    assert stylize_cfg_scale(7.0, 0) == 10.5
    assert stylize_cfg_scale(7.0, 1000) == 3.5
    assert stylize_cfg_scale(1.5, 1000) == 1.0  # never below 1 (no guidance)
    values = [stylize_cfg_scale(7.0, s) for s in range(0, 1001, 50)]
    assert values == sorted(values, reverse=True)


def test_image_weight_needs_an_image_prompt():
    _, params = parse_midjourney("x --iw 2")
    with pytest.raises(HuabiError, match=r"--iw needs an image prompt"):
        apply_to_request(GenerationRequest("x"), params, 512)
    assert apply_to_request(GenerationRequest("x"), params, 512, has_image_prompt=True).prompt == "x"


def test_chaos_zero_is_the_plain_batch_split_per_image():
    request = GenerationRequest("a, b, c", seed=100, batch_size=2, batch_count=2, cfg_scale=7.0)
    varied = chaos_requests(request, 0)
    assert [r.seed for r in varied] == [100, 101, 102, 103]
    assert all(r.prompt == "a, b, c" and r.cfg_scale == 7.0 and r.batch_size == 1 for r in varied)
    assert all(dict(r.extra)["Chaos"] == "0" for r in varied)


def test_chaos_varies_cfg_and_prompt_order_reproducibly():
    request = GenerationRequest("red apple, (shiny:1.2), on a table, [oil:paint:5]", seed=7, batch_size=8)
    varied = chaos_requests(request, 100)
    assert varied == chaos_requests(request, 100)  # deterministic
    alone = chaos_requests(request.replace(seed=10, batch_size=1), 100)[0]
    assert alone.prompt == varied[3].prompt and alone.cfg_scale == varied[3].cfg_scale  # depends on the image's own seed
    cfgs = [r.cfg_scale for r in varied]
    assert all(1.0 + 6.0 * 0.2 - 1e-9 <= c <= 7.0 for c in cfgs) and len(set(cfgs)) > 4
    assert any(r.prompt != request.prompt for r in varied)
    for r in varied:  # shuffled parts, weights kept whole
        assert sorted(r.prompt.split(", ")) == sorted(request.prompt.split(", "))
    mild = [r.cfg_scale for r in chaos_requests(request, 10)]
    assert all(7.0 - 6.0 * 0.08 - 1e-9 <= c <= 7.0 for c in mild)


def test_top_level_parts_keep_brackets_whole():
    assert top_level_parts("a, (b, c:1.2), [d, e], {f, g},") == ["a", "(b, c:1.2)", "[d, e]", "{f, g}"]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("x --zoom 2", "prompt: unknown parameter --zoom; known: --ar, --aspect, --no"),
        ("x --ar 3x2", "prompt: --ar expects WIDTH:HEIGHT with positive whole numbers, e.g. 3:2, got '3x2'"),
        ("x --ar 0:2", "--ar expects WIDTH:HEIGHT"),
        ("x --ar", "--ar expects WIDTH:HEIGHT"),
        ("x --ar 20:1", "aspect ratios from 1:8 to 8:1 are supported"),
        ("x --chaos 101", "prompt: --chaos must be a whole number from 0 to 100, got 101"),
        ("x --c -1", "--c must be a whole number from 0 to 100, got -1"),
        ("x --chaos lots", "prompt: --chaos expects a number, got 'lots'"),
        ("x --q 3", "prompt: --q must be one of .25, .5, 1, 2, got 3"),
        ("x --quality", "prompt: --quality expects a number, got ''"),
        ("x --s 1001", "prompt: --s must be a whole number from 0 to 1000, got 1001"),
        ("x --seed 4294967296", "--seed must be a whole number from 0 to 4294967295"),
        ("x --seed 1.5", "--seed must be a whole number"),
        ("x --iw 4", "prompt: --iw must be a number from 0 to 3, got 4"),
        ("x --tile yes", "prompt: --tile takes no value, got 'yes'"),
        ("x --no", "prompt: --no needs the things to leave out"),
        ("x --no , ,", "prompt: --no needs the things to leave out"),
        ("x --v six", "prompt: --v expects a version number such as 6, got 'six'"),
        ("x --niji new", "prompt: --niji expects a version number or nothing, got 'new'"),
        ("x --style", "prompt: --style expects one word such as raw, got ''"),
    ],
)
def test_bad_parameters_are_one_line_errors(prompt, expected):
    with pytest.raises(HuabiError) as caught:
        parse_midjourney(prompt)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_parameter_lists_all_known():
    with pytest.raises(HuabiError) as caught:
        parse_midjourney("x --upbeta")
    assert all(name in str(caught.value) for name in KNOWN_PARAMETERS)


def test_chaos_request_bad_value():
    with pytest.raises(HuabiError, match=r"chaos: must be a whole number from 0 to 100, got 200"):
        chaos_requests(GenerationRequest("x", seed=1), 200)
