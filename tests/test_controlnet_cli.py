"""ControlNet end to end: CLI flags -> engine -> PNG infotext -> generate --from, edit, hires, preprocess."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image

from tiny_models import randomize_

from huabi.cli.main import EXIT_ERROR, main
from huabi.core.control import ControlMode, ControlUnit, ResizeMode, format_unit_infotext, parse_unit_infotext
from huabi.core.infotext import parse_infotext, request_from_infotext
from huabi.core.request import GenerationRequest
from huabi.errors import HuabiError
from huabi.models.controlnet import save_controlnet_original
from huabi.models.load import load_model
from huabi.service.pngio import read_infotext

A1111_VALUE = ("Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1, Resize Mode: Crop and Resize, "
               "Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 1, "
               "Pixel Perfect: False, Control Mode: Balanced")


@pytest.fixture(scope="module")
def setup(tiny_sd1_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("cn_cli")
    models = root / "models"
    bundle = load_model(tiny_sd1_file)
    controlnet = ControlNetModel.from_unet(bundle.unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    randomize_(controlnet, torch.Generator().manual_seed(9))
    save_controlnet_original(controlnet, models / "ControlNet" / "tiny_cn.safetensors")
    rng = np.random.default_rng(0)
    picture = np.zeros((64, 64, 3), dtype=np.uint8)
    picture[16:48, 16:48] = 255
    picture[24:40, 24:40] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    image = root / "control.png"
    Image.fromarray(picture).save(image)
    other = root / "other.png"
    Image.fromarray(np.roll(picture, (9, -13), axis=(0, 1))).save(other)  # other edges, not just other colours
    return tiny_sd1_file, models, image, other, root


def run(setup, out, *extra: str, command: str = "generate", prompt: str = "a red house") -> list:
    model, models, _image, _other, _root = setup
    argv = [command]
    if command == "edit":
        argv.append(extra[0])
        extra = extra[1:]
    argv += [prompt, "--model", str(model), "--models-dir", str(models), "--steps", "3", "--seed", "5",
             "--sampler", "Euler", "--out", str(out), "--quiet", *extra]
    assert main(argv) == 0
    return sorted(out.glob("*.png"))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_generate_records_infotext_and_from_redoes_it(setup, tmp_path, capsys):
    _model, _models, image, other, _root = setup
    [plain] = run(setup, tmp_path / "plain", "--size", "64x64")
    [first] = run(setup, tmp_path / "cn", "--size", "64x64", "--controlnet", "tiny_cn", "--control-image", str(image),
                  "--control-module", "canny", "--control-weight", "1.5", "--control-end", "0.8",
                  "--control-mode", "prompt")
    text = read_infotext(first)
    value = parse_infotext(text).params["ControlNet 0"]
    assert value.startswith("Module: canny, Model: tiny_cn [")
    assert ("Weight: 1.5, Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 100, Threshold B: 200, "
            "Guidance Start: 0, Guidance End: 0.8, Pixel Perfect: False, Control Mode: My prompt is more important") in value
    assert np.abs(pixels(first) - pixels(plain)).max() > 0  # the control changed the image

    [again] = _from(setup, tmp_path / "again", first, "--control-image", str(image))
    assert np.array_equal(pixels(again), pixels(first))
    assert parse_infotext(read_infotext(again)).params["ControlNet 0"] == value

    # A control image with edges everywhere: the tiny random ControlNet's response to a few moved
    # edges can vanish in 8-bit rounding on some CPUs, a dense edge map cannot.
    busy = tmp_path / "busy.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(busy)
    [changed] = _from(setup, tmp_path / "changed", first, "--control-image", str(busy))
    assert not np.array_equal(pixels(changed), pixels(first))

    capsys.readouterr()
    assert main(["generate", "--from", str(first), "--models-dir", str(setup[1]), "--model", str(setup[0]),
                 "--out", str(tmp_path / "x"), "--quiet"]) == EXIT_ERROR
    assert "controlnet 0: no control image; give --control-image" in capsys.readouterr().err


def _from(setup, out, png, *extra):
    model, models, *_ = setup
    assert main(["generate", "--from", str(png), "--model", str(model), "--models-dir", str(models),
                 "--out", str(out), "--quiet", *extra]) == 0
    return sorted(out.glob("*.png"))


def test_two_units_edit_and_hires(setup, tmp_path):
    _model, _models, image, other, root = setup
    [two] = run(setup, tmp_path / "two", "--size", "64x64",
                "--controlnet", "tiny_cn", "--control-image", str(image), "--control-module", "scribble_xdog",
                "--controlnet", str(setup[1] / "ControlNet" / "tiny_cn.safetensors"), "--control-image", str(other),
                "--control-module", "color", "--control-resize", "fill", "--control-mode", "control")
    params = parse_infotext(read_infotext(two)).params
    assert "Module: scribble_xdog" in params["ControlNet 0"] and "Threshold A: 32" in params["ControlNet 0"]
    assert "Resize Mode: Resize and Fill" in params["ControlNet 1"]
    assert "Control Mode: ControlNet is more important" in params["ControlNet 1"]

    # edit (img2img): a unit without an image uses the edit's image.
    [edited] = run(setup, tmp_path / "edit", str(image), "--strength", "0.6", "--controlnet", "tiny_cn",
                   "--control-module", "canny", command="edit")
    assert "ControlNet 0" in parse_infotext(read_infotext(edited)).params
    # inpaint with the inpaint_only module and the edit's own mask.
    mask = root / "mask.png"
    Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16)).save(mask)
    [inpainted] = run(setup, tmp_path / "inpaint", str(image), "--mask", str(mask), "--controlnet", "tiny_cn",
                      "--control-module", "inpaint_only", command="edit")
    assert "Module: inpaint_only" in parse_infotext(read_infotext(inpainted)).params["ControlNet 0"]
    # hires: the second pass gets its own, larger hint.
    [hires] = run(setup, tmp_path / "hires", "--size", "64x64", "--hires", "--hires-scale", "1.5",
                  "--controlnet", "tiny_cn", "--control-image", str(image), "--control-module", "canny")
    assert Image.open(hires).size == (96, 96)


def test_preprocess_command(setup, tmp_path):
    _model, _models, image, _other, _root = setup
    out = tmp_path / "edges.png"
    assert main(["preprocess", str(image), "--module", "canny", "--res", "64", "--out", str(out)]) == 0
    edges = np.asarray(Image.open(out))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) <= {0, 255} and edges.max() == 255


def test_bad_inputs(setup, tmp_path, capsys):
    model, models, image, _other, _root = setup
    cases = [
        (["--control-image", str(image)], "--control-image: 1 given but there are 0 ControlNet units"),
        (["--control-weight", "0.5"], "--control-weight: give it after --controlnet MODEL"),
        (["--controlnet", "tiny_cn", "--control-image", str(image), "--control-weight", "3"], "control weight: must be from 0 to 2"),
        (["--controlnet", "tiny_cn", "--control-image", str(image), "--control-module", "animal_openpose"],
         "control module: unknown preprocessor 'animal_openpose'"),
        (["--controlnet", "tiny_cn", "--control-image", str(image), "--control-module", "openpose"],
         "preprocessor openpose: needs the annotator weights body_pose_model.pth"),
        (["--controlnet", "tiny_cn", "--control-image", str(image), "--control-start", "0.8", "--control-end", "0.2"],
         "control start: 0.8 is after control end 0.2"),
        (["--controlnet", "tiny_cn", "--control-image", str(image), "--control-mode", "loud"], "control mode: unknown 'loud'"),
        (["--controlnet", "tiny_cn", "--control-image", str(image), "--control-resize", "stretch"],
         "control resize mode: unknown 'stretch'"),
        (["--controlnet", "tiny_cn", "--control-image", str(image), "--control-res", "10"],
         "control processor res: must be an integer from 64 to 4096, got 10"),
        (["--controlnet", "nope", "--control-image", str(image)], "controlnet: no ControlNet 'nope'"),
        (["--controlnet", "tiny_cn", "--control-image", str(tmp_path / "missing.png")], "control image 0:"),
        (["--controlnet", "tiny_cn", "--control-image", str(image), "--control-image", str(image)],
         "--control-image: given twice for controlnet 0"),
        (["--controlnet", "tiny_cn", "--control-image", str(image), "--control-module", "canny",
          "--control-threshold-a", "999"], "control threshold A (canny low threshold): must be from 1 to 255"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        code = main(["generate", "x", "--model", str(model), "--models-dir", str(models), "--steps", "1",
                     "--size", "64x64", "--out", str(tmp_path / "o"), "--quiet", *extra])
        err = capsys.readouterr().err
        assert code == EXIT_ERROR and message in err, (extra, err)
        assert err.startswith("huabi: error: ") and err.count("\n") == 1
    with pytest.raises(HuabiError, match="controlnets: must be a tuple of ControlUnit"):
        GenerationRequest("x", controlnets=("canny",))


def test_infotext_unit_round_trip_with_a1111_text():
    unit = parse_unit_infotext(A1111_VALUE)
    assert unit == ControlUnit(model="control_v11p_sd15_canny", module="canny", threshold_a=100, threshold_b=200)
    assert format_unit_infotext(unit, "control_v11p_sd15_canny [d14c016b]") == A1111_VALUE
    text = f'a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, ControlNet 0: "{A1111_VALUE}"'
    request = request_from_infotext(text)
    assert request.controlnets == (unit,) and request.extra == ()
    other = parse_unit_infotext("Module: none, Model: depth, Weight: 0.45, Resize Mode: Just Resize, "
                                "Processor Res: 768, Guidance Start: 0.1, Guidance End: 0.9, Pixel Perfect: False, "
                                "Control Mode: ControlNet is more important")
    assert (other.weight, other.resize_mode, other.processor_res, other.control_mode) == (
        0.45, ResizeMode.JUST_RESIZE, 768, ControlMode.CONTROL)
    assert other.threshold_a is None
    with pytest.raises(HuabiError, match="ControlNet infotext: cannot read 'canny' \\(expected 'Key: value'\\)"):
        parse_unit_infotext("canny, Weight: 1")
    with pytest.raises(HuabiError, match="ControlNet infotext: no Model"):
        parse_unit_infotext("Module: canny, Weight: 1")
    with pytest.raises(HuabiError, match="ControlNet infotext: Weight is not a number: 'heavy'"):
        parse_unit_infotext("Module: canny, Model: x, Weight: heavy")


def test_only_masked_inpaint_crops_the_control_image(setup, tmp_path):
    from huabi.service.control import detect_map

    _model, _models, image, _other, root = setup
    big = np.zeros((128, 128, 3), dtype=np.uint8)
    big[:64, :64] = 200  # the top-left quarter: the box below, at twice the size
    control = root / "big_control.png"
    Image.fromarray(big).save(control)
    unit = ControlUnit(model="m", image=str(control))
    cropped = detect_map(unit, crop=((0, 0, 32, 32), (64, 64)))
    assert cropped.shape == (64, 64, 3) and np.all(cropped == np.float32(200 / 255))
    # End to end: "Only masked" inpainting with a unit runs and records it.
    mask = root / "small_mask.png"
    small = np.zeros((64, 64), np.uint8)
    small[20:30, 20:30] = 255
    Image.fromarray(small).save(mask)
    [out] = run(setup, tmp_path / "masked", str(image), "--mask", str(mask), "--inpaint-area", "masked",
                "--controlnet", "tiny_cn", "--control-image", str(control), command="edit")
    assert "ControlNet 0" in parse_infotext(read_infotext(out)).params
