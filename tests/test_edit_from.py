"""``huabi edit --from PNG``: every edit parameter from the infotext, explicit flags overriding; exact redo."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from cli_runner import run
from huabi.core.infotext import edit_fields_from_infotext, parse_infotext
from huabi.errors import HuabiError
from huabi.service.pngio import read_infotext
from test_edit_cli import mask_png
from test_img2img import gradient_image


def edit(capsys, *argv) -> Path:
    code, out, err = run(capsys, "edit", *argv, "--quiet")
    assert code == 0, err
    [path] = [Path(line) for line in out.splitlines()]
    return path


@pytest.fixture()
def init_png(tmp_path) -> Path:
    path = tmp_path / "init.png"
    gradient_image(64, 64).save(path)
    return path


def assert_redone(first: Path, again: Path) -> None:
    assert Image.open(again).tobytes() == Image.open(first).tobytes()
    assert read_infotext(again) == read_infotext(first)


def test_img2img_redone_exactly(capsys, tiny_sd1_file, init_png, tmp_path):
    first = edit(capsys, init_png, "a red apple", "--model", tiny_sd1_file, "--steps", "3", "--strength", "0.45",
                 "--resize-mode", "crop", "--size", "64x48", "--sampler", "Euler a", "--seed", "11", "--cfg", "5",
                 "-n", "blurry", "--out", tmp_path / "a")
    again = edit(capsys, init_png, "--from", first, "--model", tiny_sd1_file, "--out", tmp_path / "b")
    assert_redone(first, again)
    # An explicit flag wins over the infotext; the rest still comes from it.
    changed = edit(capsys, init_png, "--from", first, "--model", tiny_sd1_file, "--strength", "0.9",
                   "--out", tmp_path / "c")
    params = parse_infotext(read_infotext(changed)).params
    assert params["Denoising strength"] == "0.9" and params["Resize mode"] == "Crop and resize"
    assert params["Sampler"] == "Euler a" and params["Seed"] == "11" and params["Size"] == "64x48"
    assert Image.open(changed).tobytes() != Image.open(first).tobytes()


def test_inpaint_only_masked_redone_exactly(capsys, tiny_sd1_file, init_png, tmp_path):
    mask = mask_png(tmp_path)
    first = edit(capsys, init_png, "a red hat", "--model", tiny_sd1_file, "--steps", "3", "--mask", mask,
                 "--mask-blur", "3", "--masked-content", "latent-noise", "--inpaint-area", "masked", "--padding", "12",
                 "--invert-mask", "--strength", "0.8", "--seed", "4", "--out", tmp_path / "a")
    params = parse_infotext(read_infotext(first)).params
    assert params["Mask mode"] == "Inpaint not masked" and params["Masked area padding"] == "12"
    again = edit(capsys, init_png, "--from", first, "--mask", mask, "--model", tiny_sd1_file, "--out", tmp_path / "b")
    assert_redone(first, again)


def test_outpaint_redone_exactly(capsys, tiny_sd1_file, init_png, tmp_path):
    first = edit(capsys, init_png, "a beach", "--model", tiny_sd1_file, "--steps", "3", "--outpaint", "left=16,down=8",
                 "--strength", "1", "--seed", "6", "--out", tmp_path / "a")
    assert Image.open(first).size == (80, 72)
    # "Size" records the extended canvas; --from works back to the image's own size before extending it.
    again = edit(capsys, init_png, "--from", first, "--model", tiny_sd1_file, "--out", tmp_path / "b")
    assert_redone(first, again)


def test_edit_fields_from_a1111_style_infotext():
    text = ("a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, "
            "Denoising strength: 0.6, Mask blur: 8, Inpaint area: Only masked, Masked area padding: 64, "
            "Masked content: latent nothing, Resize mode: Resize and fill, Mask mode: Inpaint masked")
    assert edit_fields_from_infotext(text) == {
        "denoising_strength": 0.6, "resize_mode": "fill", "inpaint_area": "masked", "invert_mask": False,
        "mask_blur_px": 8, "masked_content": "latent nothing", "padding_px": 64,
    }
    instruct = "make it snowy\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Image CFG scale: 1.5, Seed: 1"
    assert edit_fields_from_infotext(instruct) == {"instruct": True, "image_cfg_scale": 1.5}
    with pytest.raises(HuabiError, match=r"^infotext: Resize mode: unknown 'Just resize \(latent upscale\)'; "
                                         r"valid: Just resize, Crop and resize, Resize and fill$"):
        edit_fields_from_infotext("x\nSteps: 2, Seed: 1, Resize mode: Just resize (latent upscale)")
    with pytest.raises(HuabiError, match=r"^infotext: Mask blur: expected an integer, got 'soft'$"):
        edit_fields_from_infotext("x\nSteps: 2, Seed: 1, Mask blur: soft")


def test_bad_from_inputs(capsys, tiny_sd1_file, init_png, tmp_path):
    code, _out, err = run(capsys, "edit", init_png, "--model", tiny_sd1_file, "--quiet", "--out", tmp_path)
    assert code == 2 and err.strip() == "huabi: error: prompt: give a prompt, or --from PNG to reuse an edited image's parameters"
    code, _out, err = run(capsys, "edit", init_png, "--from", init_png, "--model", tiny_sd1_file, "--quiet",
                          "--out", tmp_path)
    assert code == 2 and err.strip() == f"huabi: error: {init_png}: no generation parameters in this image"
    missing = tmp_path / "missing.png"
    code, _out, err = run(capsys, "edit", init_png, "--from", missing, "--quiet", "--out", tmp_path)
    assert code == 2 and err.strip() == f"huabi: error: {missing}: no such file"


def test_from_a_hires_txt2img_png_edits_without_hires(capsys, tiny_sd1_file, init_png, tmp_path):
    code, out, err = run(capsys, "generate", "a red apple", "--model", tiny_sd1_file, "--steps", "2", "--size", "64x64",
                         "--hires", "--hires-scale", "1.5", "--hires-denoise", "0.3", "--seed", "2", "--quiet",
                         "--out", tmp_path / "gen")
    assert code == 0, err
    [generated] = [Path(line) for line in out.splitlines()]
    edited = edit(capsys, init_png, "--from", generated, "--model", tiny_sd1_file, "--strength", "0.5",
                  "--out", tmp_path / "edit")
    params = parse_infotext(read_infotext(edited)).params
    assert not any(key.startswith("Hires") for key in params)
    assert params["Denoising strength"] == "0.5" and params["Size"] == "64x64" and params["Seed"] == "2"
    assert Image.open(edited).size == (64, 64)
