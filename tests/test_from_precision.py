"""``--from`` reproduces the precision and backend an image was made with.

An image made in bf16 (or in OpenVINO) differs from the fp32 torch image of the same seed by a
pixel or two; ``--from`` with ``--dtype auto`` / ``--backend auto`` takes the recorded Dtype/Backend
so the same seed gives the same picture whatever this machine's fastest path is. Explicit flags win.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from huabi.backends import available_backends
from huabi.core.infotext import parse_infotext
from huabi.service.cpu_backend import recorded_precision
from huabi.service.pngio import read_infotext
from cli_runner import run
from test_cli import pixels

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
OPENVINO = "openvino" in available_backends()


@pytest.mark.parametrize("params, device, expected", [
    ({}, CPU, ("fp32", "torch")),  # nothing recorded: the CPU's reference precision
    ({}, CUDA, ("fp16", "torch")),  # ... and CUDA's
    ({"Dtype": "bf16"}, CPU, ("bf16", "torch")),
    ({"Dtype": "bf16"}, CUDA, ("bf16", "torch")),
    ({"Dtype": "fp32"}, CUDA, ("fp32", "torch")),
    ({"Dtype": "fp16"}, CPU, ("fp32", "torch")),  # the CPU has no fp16: nearest it can run
    ({"Dtype": "int4"}, CPU, ("fp32", "torch")),  # not a precision huabi writes
    ({"Dtype": "bf16", "Backend": "OpenVINO"}, CUDA, ("bf16", "torch")),  # OpenVINO runs on the CPU only
    ({"Backend": "something else"}, CPU, ("fp32", "torch")),
])
def test_recorded_precision_table(params, device, expected):
    assert recorded_precision(params, device) == expected


@pytest.mark.skipif(not OPENVINO, reason="openvino not installed")
def test_recorded_openvino_backends_on_the_cpu():
    assert recorded_precision({"Dtype": "bf16", "Backend": "OpenVINO"}, CPU) == ("bf16", "openvino")
    assert recorded_precision({"Backend": "OpenVINO int8"}, CPU) == ("fp32", "openvino-int8")


def test_from_reproduces_a_bf16_image_and_an_explicit_dtype_wins(capsys, tiny_sd1_file, tmp_path):
    # The suite pins --dtype auto to fp32 (HUABI_AUTO_DTYPE), so only the recorded value can make bf16 here.
    code, out, err = run(capsys, "generate", "a red apple", "--model", tiny_sd1_file, "--steps", "3", "--size", "64x64",
                         "--seed", "11", "--dtype", "bf16", "--out", tmp_path / "a", "--quiet")
    assert code == 0, err
    original = Path(out.strip())
    assert parse_infotext(read_infotext(original)).params["Dtype"] == "bf16"

    code, out, err = run(capsys, "generate", "--from", original, "--model", tiny_sd1_file, "--out", tmp_path / "b", "--quiet")
    assert code == 0, err
    again = Path(out.strip())
    assert f"huabi: note: {original}: --dtype bf16 --backend torch as the image was made" in err
    assert np.array_equal(pixels(original), pixels(again))
    assert read_infotext(again) == read_infotext(original)

    code, out, err = run(capsys, "generate", "--from", original, "--model", tiny_sd1_file, "--dtype", "fp32",
                         "--backend", "torch", "--out", tmp_path / "c", "--quiet")
    assert code == 0, err
    fp32 = Path(out.strip())
    assert "as the image was made" not in err
    assert "Dtype" not in parse_infotext(read_infotext(fp32)).params
    assert not np.array_equal(pixels(original), pixels(fp32))  # bf16 and fp32 differ: the recorded value mattered


def test_edit_from_takes_the_recorded_dtype(capsys, tiny_sd1_file, tmp_path):
    source = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(source)
    code, out, err = run(capsys, "edit", source, "a blue apple", "--model", tiny_sd1_file, "--steps", "3", "--seed", "4",
                         "--dtype", "bf16", "--out", tmp_path / "a", "--quiet")
    assert code == 0, err
    original = Path(out.strip())
    code, out, err = run(capsys, "edit", source, "--from", original, "--model", tiny_sd1_file, "--out", tmp_path / "b",
                         "--quiet")
    assert code == 0, err
    assert "--dtype bf16" in err
    assert np.array_equal(pixels(original), pixels(Path(out.strip())))
