"""Reading/writing weight files: safetensors validation, safe pickles, diffusers folders, atomic writes."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from huabi.errors import HuabiError
from huabi.models.formats import read_state_dict, write_safetensors_atomic


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 4, generator=generator), "b.bias": torch.arange(5, dtype=torch.int64)}


def _assert_same(left, right):
    assert set(left) == set(right)
    assert all(torch.equal(left[k], right[k]) and left[k].dtype == right[k].dtype for k in left)


def test_safetensors_with_metadata(tmp_path):
    path = write_safetensors_atomic(tmp_path / "m.safetensors", _tensors(), {"modelspec.prediction_type": "v"})
    tensors, metadata = read_state_dict(path)
    _assert_same(tensors, _tensors())
    assert metadata == {"modelspec.prediction_type": "v"}
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind


def test_truncated_safetensors_refused(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file(_tensors(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(HuabiError, match=r"^cut\.safetensors: truncated safetensors file: tensor data needs 88 bytes but only 78 are present \(incomplete download\?\)$"):
        read_state_dict(path)


def test_non_safetensors_refused(tmp_path):
    path = tmp_path / "fake.safetensors"
    path.write_bytes(b"<html>404 not found</html>" * 10)
    with pytest.raises(HuabiError, match=r"fake\.safetensors: not a safetensors file or truncated: header length \d+ does not fit in a 260-byte file"):
        read_state_dict(path)
    path.write_bytes((5).to_bytes(8, "little") + b"nope!")
    with pytest.raises(HuabiError, match=r"fake\.safetensors: not a safetensors file: header is not valid JSON"):
        read_state_dict(path)
    path.write_bytes(b"abc")
    with pytest.raises(HuabiError, match=r"fake\.safetensors: not a safetensors file: only 3 bytes"):
        read_state_dict(path)


def test_empty_and_missing_and_unsupported(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(HuabiError, match=r"^empty\.safetensors: file is empty \(0 bytes\)$"):
        read_state_dict(tmp_path / "empty.safetensors")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(HuabiError, match=r"^empty\.ckpt: file is empty \(0 bytes\)$"):
        read_state_dict(tmp_path / "empty.ckpt")
    with pytest.raises(HuabiError, match=r"nothere\.safetensors: model file not found$"):
        read_state_dict(tmp_path / "nothere.safetensors")
    (tmp_path / "model.onnx").write_bytes(b"ONNX")
    with pytest.raises(HuabiError, match=r"model\.onnx: unsupported model file type '\.onnx'"):
        read_state_dict(tmp_path / "model.onnx")
    (tmp_path / "folder").mkdir()
    with pytest.raises(HuabiError, match=r"folder: directory is not a diffusers model folder \(no model_index\.json\)$"):
        read_state_dict(tmp_path / "folder")


def test_ckpt_state_dict_nesting(tmp_path):
    path = tmp_path / "nested.ckpt"
    torch.save({"state_dict": _tensors(), "global_step": 470000, "epoch": np.int64(3)}, path)
    tensors, metadata = read_state_dict(path)
    _assert_same(tensors, _tensors())
    assert metadata == {}
    torch.save(_tensors(), tmp_path / "flat.pt")
    _assert_same(read_state_dict(tmp_path / "flat.pt")[0], _tensors())


class Payload:
    """A custom class: unpickling it would import (and could run) arbitrary code."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_ckpt_with_code_refused(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _tensors(), "hook": Payload()}, path)
    with pytest.raises(
        HuabiError,
        match=r"^evil\.ckpt: this checkpoint needs code execution to load .* huabi never executes code from a model file; convert it to \.safetensors",
    ):
        read_state_dict(path)
    assert "must never run" not in capsys.readouterr().out


def test_ckpt_with_lightning_callback_loads_without_lightning(tmp_path):
    """Original SD1.x .ckpt files pickle a PyTorch Lightning callback; its *name* is allow-listed as inert data."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.monitor = "val/loss"

    ModelCheckpoint.__module__ = module.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", module.__name__]
    for name in names[:-1]:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[module.__name__] = module
    try:
        torch.save({"state_dict": _tensors(), "callbacks": {"ModelCheckpoint": ModelCheckpoint()}}, tmp_path / "sd.ckpt")
    finally:
        for name in names:
            del sys.modules[name]
    _assert_same(read_state_dict(tmp_path / "sd.ckpt")[0], _tensors())


def test_garbage_ckpt_and_tensorless_ckpt(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"\x00\x01garbage" * 20)
    with pytest.raises(HuabiError, match=r"^junk\.ckpt: not a readable PyTorch checkpoint"):
        read_state_dict(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {"step": 3}}, tmp_path / "none.ckpt")
    with pytest.raises(HuabiError, match=r"^none\.ckpt: not a model checkpoint: it contains no tensors$"):
        read_state_dict(tmp_path / "none.ckpt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(HuabiError, match=r"^list\.pt: not a model checkpoint: it holds a list, not a dict of tensors$"):
        read_state_dict(tmp_path / "list.pt")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.safetensors"
    write_safetensors_atomic(target, _tensors())
    before = target.read_bytes()
    with pytest.raises(HuabiError, match=r"out\.safetensors: safetensors metadata must map str to str; got 'step': int"):
        write_safetensors_atomic(target, _tensors(), {"step": 3})  # type: ignore[dict-item]
    with pytest.raises(Exception):
        write_safetensors_atomic(target, {"x": torch.zeros(2), "y": "not a tensor"})  # type: ignore[dict-item]
    assert target.read_bytes() == before  # old file untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]  # no temp files


def test_shared_storage_tensors_are_written(tmp_path):
    base = torch.arange(6.0)
    write_safetensors_atomic(tmp_path / "s.safetensors", {"a": base, "b": base})
    tensors, _ = read_state_dict(tmp_path / "s.safetensors")
    assert torch.equal(tensors["a"], tensors["b"])


def test_diffusers_folder_missing_component(tmp_path):
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    (folder / "unet").mkdir()
    with pytest.raises(HuabiError, match=r"pipe: diffusers folder has no vae/ component$"):
        read_state_dict(folder)
    (folder / "model_index.json").write_text("{not json")
    with pytest.raises(HuabiError, match=r"model_index\.json: not valid JSON"):
        read_state_dict(folder)


def test_diffusers_folder_reads_as_original_layout(tiny_model_factory):
    from huabi.models.family import ModelFamily

    single, _ = read_state_dict(tiny_model_factory(ModelFamily.SDXL))
    folder, metadata = read_state_dict(tiny_model_factory(ModelFamily.SDXL, layout="diffusers"))
    assert metadata == {"huabi.source_format": "diffusers", "modelspec.prediction_type": "epsilon"}
    _assert_same(single, folder)


from tiny_models import tiny_model_factory  # noqa: E402,F401  (fixture)
