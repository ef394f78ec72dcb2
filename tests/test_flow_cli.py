"""SD3/FLUX through the CLI and today's Engine: split files found in the models folder, Forge-style
infotext, --from reproduces, edit (img2img/inpaint), the memory guard, one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flow_fixtures import TinyFlowModel
from huabi.cli.main import main
from huabi.models.transformer_families import TransformerFamily as F
from huabi.service.pngio import read_infotext


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow_models")
    flux = TinyFlowModel(F.FLUX_DEV)
    flux.write_parts(root)  # text_encoders/clip_l, t5xxl_fp16; vae/ae
    flux.write_transformer(root / "flux1-dev-tiny.safetensors")  # BFL layout, no prefix
    TinyFlowModel(F.SD35_MEDIUM).write_all_in_one(root / "sd3.5_medium-tiny.safetensors")
    return root


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_flux_generate_writes_forge_infotext_and_from_reproduces(models_dir, tmp_path, capsys):
    code, out, err = _run(["generate", "a red apple", "--model", "flux1-dev-tiny", "--models-dir", str(models_dir),
                           "--size", "64x64", "--steps", "3", "--sampler", "Euler", "--seed", "7", "--distilled-cfg", "4",
                           "--quiet", "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    first = out.split()[0]
    infotext = read_infotext(first)
    assert "Steps: 3, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Seed: 7, Size: 64x64" in infotext
    assert "Model: flux1-dev-tiny, Distilled CFG Scale: 4, Module 1: ae, Module 2: clip_l, Module 3: t5xxl_fp16" in infotext
    code, out, err = _run(["generate", "--from", first, "--models-dir", str(models_dir), "--quiet", "--out", str(tmp_path / "b")], capsys)
    assert code == 0, err
    again = out.split()[0]
    assert read_infotext(again) == infotext
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


def test_sd35_generate_with_cfg_batch_and_edit(models_dir, tmp_path, capsys):
    code, out, err = _run(["generate", "a red apple", "-n", "blurry", "--model", "sd3.5_medium-tiny", "--models-dir", str(models_dir),
                           "--size", "64x64", "--steps", "3", "--cfg", "4.5", "--seed", "3", "--batch-size", "2", "--shift", "2.5",
                           "--quiet", "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    paths = out.split()
    assert len(paths) == 2
    infotext = read_infotext(paths[1])
    assert "CFG scale: 4.5, Seed: 4, Size: 64x64" in infotext and "Shift: 2.5" in infotext
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 0).save(mask)
    code, out, err = _run(["edit", paths[0], "a green apple", "--model", "sd3.5_medium-tiny", "--models-dir", str(models_dir),
                           "--strength", "0.5", "--steps", "4", "--seed", "1", "--mask", str(mask), "--mask-blur", "0",
                           "--quiet", "--out", str(tmp_path / "e")], capsys)
    assert code == 0, err
    edited = np.asarray(Image.open(out.split()[0])).astype(int)
    original = np.asarray(Image.open(paths[0])).astype(int)
    # an all-black mask repaints nothing: only the VAE round trip remains
    assert "Denoising strength: 0.5" in read_infotext(out.split()[0])
    assert edited.shape == original.shape


def test_missing_text_encoder_and_memory_guard_are_one_line_errors(models_dir, tmp_path, capsys, monkeypatch):
    lonely = tmp_path / "flux1-schnell.safetensors"
    TinyFlowModel(F.FLUX_SCHNELL).write_transformer(lonely)
    code, _, err = _run(["generate", "x", "--model", str(lonely), "--models-dir", str(tmp_path / "empty"), "--quiet",
                         "--out", str(tmp_path / "o")], capsys)
    assert code != 0 and err.count("\n") == 1
    assert "FLUX.1 schnell transformer without clip_l" in err and "t5xxl" in err
    import huabi.service.devices as devices_module

    monkeypatch.setattr(devices_module, "available_memory_bytes", lambda device: 1_000_000)
    code, _, err = _run(["generate", "x", "--model", "flux1-dev-tiny", "--models-dir", str(models_dir), "--quiet",
                         "--out", str(tmp_path / "o")], capsys)
    assert code != 0 and err.count("\n") == 1
    assert "needs about" in err and "GGUF Q8_0/Q4_0 or fp8" in err
