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


def test_no_overwrite_keeps_a_file_that_is_there_and_leaves_no_temp(tmp_path):
    from huabi.models.files import atomic_write

    target = tmp_path / "out.png"
    target.write_bytes(b"theirs")
    with pytest.raises(FileExistsError):
        atomic_write(target, lambda handle: handle.write(b"ours"), overwrite=False)
    assert target.read_bytes() == b"theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    fresh = atomic_write(tmp_path / "new.png", lambda handle: handle.write(b"ours"), suffix=".tmp", overwrite=False)
    assert fresh.read_bytes() == b"ours" and stat.S_IMODE(os.stat(fresh).st_mode) == new_file_mode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.png", "out.png"]


def test_copy_and_torch_save_go_through_the_same_writer(tmp_path):
    from huabi.models.files import atomic_copy, atomic_torch_save

    source = tmp_path / "log.txt"
    source.write_bytes(b"x" * 3_000_000)  # more than one copy chunk
    atomic_copy(source, tmp_path / "repo" / "log.txt")
    assert (tmp_path / "repo" / "log.txt").read_bytes() == source.read_bytes()
    atomic_torch_save({"step": 7, "w": torch.arange(3)}, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt")
    assert loaded["step"] == 7 and torch.equal(loaded["w"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "repo", "state.pt"]


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    from huabi.models.files import atomic_folder

    target = tmp_path / "pipeline"
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as staging:
            (staging / "unet").mkdir()
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(target) as staging:
        (staging / "model_index.json").write_text("{}")
    with pytest.raises(FileExistsError):
        with atomic_folder(target) as staging:
            (staging / "other").write_text("x")
    assert [p.name for p in target.iterdir()] == ["model_index.json"]
    with atomic_folder(target, overwrite=True) as staging:
        (staging / "new.json").write_text("{}")
    assert [p.name for p in target.iterdir()] == ["new.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline"]  # no staging or old folder left


def test_grid_names_are_claimed_like_image_names(tmp_path):
    from PIL import Image

    from huabi.service.grids import next_grid_path
    from huabi.service.pngio import save_png

    (tmp_path / "grid-0004.png").write_bytes(b"")
    first, second = next_grid_path(tmp_path), next_grid_path(tmp_path)  # two runs asking at once
    assert (first.name, second.name) == ("grid-0005.png", "grid-0006.png")
    assert first.exists() and first.stat().st_size == 0  # claimed: nobody else gets the name
    save_png(Image.new("RGB", (4, 4)), first, "a grid\nSteps: 1")
    assert first.stat().st_size > 0
    assert next_grid_path(tmp_path, "xyz_grid-").name == "xyz_grid-0000.png"


def test_unsynced_writes_are_still_whole_files(tmp_path):
    """fsync=False (dataset builds) skips only the flush to disk, never the temp file + rename."""
    target = tmp_path / "0001.png"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new" * 1000, fsync=False)
    assert target.read_bytes() == b"new" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["0001.png"]
