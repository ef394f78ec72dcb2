"""An SD 1.x ControlNet whose layout does not fit the loaded model (here the built-in huabi-mini, an
SD1-family model with attention at fewer levels) is one line that says so, not a bare conversion error."""

from __future__ import annotations

import torch
from diffusers import ControlNetModel
from PIL import Image

from huabi.cli.main import main
from huabi.models.controlnet import save_controlnet_original
from huabi.models.load import load_model
from tiny_models import randomize_


def test_sd1_controlnet_on_huabi_mini_names_the_mismatch(tiny_sd1_file, tmp_path, capsys):
    unet = load_model(tiny_sd1_file, compute_hash=False).unet
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    randomize_(controlnet, torch.Generator().manual_seed(9))
    path = tmp_path / "models" / "ControlNet" / "sd15_canny.safetensors"
    save_controlnet_original(controlnet, path)
    Image.new("RGB", (64, 64), "white").save(tmp_path / "house.png")
    code = main(["generate", "a house", "--steps", "1", "--size", "64x64", "--controlnet", str(path), "--control-image",
                 str(tmp_path / "house.png"), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("huabi: error: ") and err.endswith("(a sd1 ControlNet of another size than the loaded model?)")
