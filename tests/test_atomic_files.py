"""models/files.py: the one atomic-write helper (temp file beside the target + os.replace)."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from huabi.models.files import atomic_path, atomic_write_bytes, atomic_write_text, new_file_mode


def test_writes_replace_the_file_whole_with_the_usual_mode(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(os.stat(target).st_mode) == new_file_mode()
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]  # no temp file left


def test_a_failing_writer_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "weights.pt"
    torch.save({"x": torch.ones(2)}, target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as temp:
            temp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["weights.pt"]


def test_path_writers_get_a_name_with_the_targets_suffix(tmp_path):
    with atomic_path(tmp_path / "model.safetensors") as temp:
        assert temp.parent == tmp_path and temp.suffix == ".safetensors" and temp.exists()
        torch.save({}, temp)
    assert (tmp_path / "model.safetensors").exists()
