"""The untrained placeholder that stands in for huabi-mini until the trained model ships."""

from __future__ import annotations

import os

import pytest

from huabi.cli.main import main
from huabi.models.detect import detect_file
from huabi.models.family import ModelFamily
from huabi.service.engine import builtin_model_path, placeholder_model_path
from huabi.train.placeholder import ARCHITECTURE_KEY, write_placeholder_model
from huabi.models.formats import read_safetensors_header


def test_placeholder_is_huabi_mini_and_rebuilt_only_when_stale(tmp_path):
    path = write_placeholder_model(tmp_path / "p.safetensors")
    assert detect_file(path).family is ModelFamily.HUABI_MINI
    mtime = os.stat(path).st_mtime_ns
    assert write_placeholder_model(path) == path and os.stat(path).st_mtime_ns == mtime  # up to date: kept
    header = read_safetensors_header(path)
    assert ARCHITECTURE_KEY in header["__metadata__"]
    path.write_bytes(b"stale")  # e.g. written by an older recipe, or damaged
    write_placeholder_model(path)
    assert detect_file(path).family is ModelFamily.HUABI_MINI


def test_generate_without_model_uses_placeholder_and_says_so(capsys, tmp_path):
    if builtin_model_path().exists():
        pytest.skip("the trained huabi-mini ships: nothing stands in for it")
    assert main(["make-placeholder"]) == 0
    assert placeholder_model_path().exists()
    code = main(["generate", "a red apple", "--steps", "1", "--size", "64x64", "--out", str(tmp_path), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0
    assert "UNTRAINED placeholder" in captured.err
    assert len(list(tmp_path.glob("*.png"))) == 1
