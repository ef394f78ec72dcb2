"""End-to-end tests of ``huabi edit`` on a tiny random-weight SD1 checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_runner import run
from huabi.core.infotext import parse_infotext
from huabi.service.pngio import read_infotext
from test_img2img import gradient_image


@pytest.fixture()
def init_png(tmp_path) -> Path:
    path = tmp_path / "init.png"
    gradient_image(64, 64).save(path)
    return path


def mask_png(tmp_path: Path, size: tuple[int, int] = (64, 64), white: bool = True) -> Path:
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    if white:
        array[size[1] // 4: size[1] // 2, size[0] // 4: size[0] // 2] = 255
    path = tmp_path / f"mask-{size[0]}x{size[1]}-{int(white)}.png"
    Image.fromarray(array).save(path)
    return path


def edit(capsys, model, init, out, *extra) -> list[Path]:
    code, stdout, stderr = run(capsys, "edit", init, "a red apple", "--model", model, "--steps", "3",
                               "--out", out, "--quiet", "--seed", "5", *extra)
    assert code == 0, stderr
    return [Path(line) for line in stdout.splitlines()]


def test_img2img_writes_pngs_with_infotext(capsys, tiny_sd1_file, init_png, tmp_path):
    paths = edit(capsys, tiny_sd1_file, init_png, tmp_path / "out", "--strength", "0.5", "--batch-size", "2",
                 "--resize-mode", "crop", "--size", "64x48")
    assert [p.name for p in paths] == ["00000-5.png", "00001-6.png"]
    assert Image.open(paths[0]).size == (64, 48)
    params = parse_infotext(read_infotext(paths[1])).params
    assert params["Denoising strength"] == "0.5"
    assert params["Resize mode"] == "Crop and resize"
    assert params["Size"] == "64x48"
    assert params["Seed"] == "6"


def test_inpaint_cli_keeps_unmasked_pixels(capsys, tiny_sd1_file, init_png, tmp_path):
    mask = mask_png(tmp_path, (32, 32))  # half size: stretched to the image, as A1111 does
    paths = edit(capsys, tiny_sd1_file, init_png, tmp_path / "out", "--mask", mask, "--mask-blur", "2",
                 "--masked-content", "latent-noise", "--inpaint-area", "masked", "--padding", "8")
    result = np.asarray(Image.open(paths[0]).convert("RGB"))
    original = np.asarray(Image.open(init_png).convert("RGB"))
    # The 8x8 square stretched (bilinear) covers 15..32; the 2 px blur reaches 5 px more: 10..37.
    keep = np.ones((64, 64), dtype=bool)
    keep[10:38, 10:38] = False
    assert np.array_equal(result[keep], original[keep])
    assert not np.array_equal(result, original)
    params = parse_infotext(read_infotext(paths[0])).params
    assert params["Mask blur"] == "2"
    assert params["Inpaint area"] == "Only masked"
    assert params["Masked area padding"] == "8"
    assert params["Masked content"] == "latent noise"


def test_outpaint_cli(capsys, tiny_sd1_file, init_png, tmp_path):
    paths = edit(capsys, tiny_sd1_file, init_png, tmp_path / "out", "--outpaint", "right=16,up=8", "--strength", "1")
    result = np.asarray(Image.open(paths[0]).convert("RGB"))
    assert result.shape == (72, 80, 3)
    original = np.asarray(Image.open(init_png).convert("RGB"))
    # Kept beyond the 8 px overlap plus the default 4 px blur's reach (kernel half-width 10).
    assert np.array_equal(result[8 + 18:, :64 - 18], original[18:, :46])
    assert result[:8].std() > 3  # the new strip is painted, not blank
    assert parse_infotext(read_infotext(paths[0])).params["Outpaint"] == "right=16,up=8"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--strength", "1.5"), "huabi: error: denoising strength: must be from 0 to 1, got 1.5"),
        (("--instruct",), "huabi: error: instruct: tiny_sd1_base_epsilon is not an InstructPix2Pix model"),
        (("--resize-mode", "zoom"), "huabi: error: resize mode: unknown mode 'zoom'; valid: just, crop, fill"),
        (("--masked-content", "blur"), "huabi: error: masked content: unknown 'blur'"),
        (("--outpaint", "left=12"), "huabi: error: outpaint left: must be a multiple of 8, got 12"),
        (("--mask", "MISSING"), "huabi: error: mask: "),
    ],
)
def test_bad_flags(capsys, tiny_sd1_file, init_png, tmp_path, extra, message):
    extra = tuple(str(tmp_path / "nope.png") if e == "MISSING" else e for e in extra)
    code, _out, err = run(capsys, "edit", init_png, "x", "--model", tiny_sd1_file, "--out", tmp_path, "--quiet", *extra)
    assert code == 2
    assert err.strip().startswith(message)
    assert len(err.strip().splitlines()) == 1


def test_bad_files(capsys, tiny_sd1_file, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    code, _out, err = run(capsys, "edit", notes, "x", "--model", tiny_sd1_file, "--quiet", "--out", tmp_path)
    assert code == 2 and err.strip() == f"huabi: error: image: {notes}: not a readable image (UnidentifiedImageError)"
    init = tmp_path / "init.png"
    gradient_image().save(init)
    black = mask_png(tmp_path, white=False)
    code, _out, err = run(capsys, "edit", init, "x", "--model", tiny_sd1_file, "--mask", black, "--quiet",
                          "--out", tmp_path, "--steps", "2")
    assert code == 2
    assert err.strip() == ("huabi: error: mask: nothing to inpaint: the mask is all black "
                           "(white marks the area to repaint)")
