"""VAE colour fidelity per hue band: exact on identical pixels, names a VAE that greys a hue."""

from __future__ import annotations

import colorsys

import pytest
import torch

from huabi.train.vae import colour_fidelity, format_colour_fidelity, rgb_to_hsv


def _image(rgb: tuple[int, int, int], size: int = 16) -> torch.Tensor:
    """One [1, 3, size, size] image of a flat colour, in [-1, 1]."""
    return (torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1).expand(1, 3, size, size).clone()


def test_rgb_to_hsv_matches_colorsys():
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, 8, 8, generator=generator) * 2 - 1
    hue, sat, val = rgb_to_hsv(pixels)
    for y in range(8):
        for x in range(8):
            r, g, b = ((pixels[0, :, y, x] + 1) / 2).tolist()
            h, s, v = colorsys.rgb_to_hsv(r, g, b)
            assert hue[0, y, x].item() == pytest.approx(h * 360, abs=1e-3)
            assert sat[0, y, x].item() == pytest.approx(s, abs=1e-5)
            assert val[0, y, x].item() == pytest.approx(v, abs=1e-6)


def test_identical_pixels_keep_every_hue():
    original = torch.cat([_image((220, 30, 30)), _image((40, 180, 60)), _image((30, 60, 220)), _image((250, 250, 250))])
    report = colour_fidelity(original, original.clone())
    assert set(report) == {"red", "green", "blue"}  # white is not a coloured pixel
    for row in report.values():
        assert row["hue_kept"] == 1.0 and row["saturation_kept"] == pytest.approx(1.0)
        assert row["pixels"] == 256


def test_a_vae_that_greys_green_is_named():
    original = torch.cat([_image((40, 180, 60)), _image((220, 30, 30))])
    greyed = torch.cat([_image((110, 105, 100)), _image((225, 80, 20))])  # green -> grey-brown, red -> orange-red
    report = colour_fidelity(original, greyed)
    assert report["green"]["hue_kept"] == 0.0 and report["green"]["saturation_kept"] < 0.15
    assert report["red"]["hue_kept"] == 1.0  # a 19-degree drift is within 30
    assert format_colour_fidelity(report).startswith("red 1.00/")


def test_bands_with_too_few_pixels_are_left_out():
    original = _image((40, 180, 60), size=4)  # 16 pixels
    assert colour_fidelity(original, original, min_pixels=100) == {}
    assert set(colour_fidelity(original, original, min_pixels=16)) == {"green"}


def test_the_script_reports_each_hue_of_a_folder_on_the_builtin_model(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    script = Path(__file__).resolve().parents[1] / "scripts" / "vae_colour.py"
    data = tmp_path / "data"
    data.mkdir()
    for name, rgb in (("red", (220, 30, 30)), ("green", (40, 180, 60)), ("blue", (30, 60, 220)), ("white", (255, 255, 255))):
        Image.new("RGB", (128, 128), rgb).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text(f"a {name} square\n", encoding="utf-8")
    out = tmp_path / "colour.json"
    done = subprocess.run([sys.executable, str(script), "--data", str(data), "--count", "4", "--json", str(out), "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["images"] == 4 and report["size_px"] == 128 and 0 < report["psnr_db"] < 100
    assert set(report["hues"]) == {"red", "green", "blue"}
    assert all(row["pixels"] == 128 * 128 for row in report["hues"].values())
    assert "| green | 16,384 |" in done.stdout
    bad = subprocess.run([sys.executable, str(script), "--data", str(data), "--count", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --count must be >= 1, got 0"
    # --picture: the named items above their reconstructions
    picture = tmp_path / "colours.png"
    shown = subprocess.run([sys.executable, str(script), "--data", str(data), "--count", "1", "--threads", "1",
                            "--picture", str(picture), "--items", "a blue square;a red square"], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    sheet = Image.open(picture).convert("RGB")
    assert sheet.size == (256, 256)
    assert sheet.getpixel((64, 64)) == (30, 60, 220) and sheet.getpixel((192, 64)) == (220, 30, 30)  # originals, in order
    assert sheet.getpixel((192, 192))[0] > 150  # the red square's reconstruction is still red
    missing = subprocess.run([sys.executable, str(script), "--data", str(data), "--picture", str(tmp_path / "x.png"), "--items", "a cat"],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and missing.stderr.strip() == f"error: --items: no item called 'a cat' in {data}"
    assert not (tmp_path / "x.png").exists()


def test_the_chroma_term_is_zero_for_greys_and_counts_a_lost_green():

    from huabi.train.vae import VAEModelConfig, VAETrainConfig, opponent_chroma, vae_loss

    grey = _image((120, 120, 120))
    assert torch.count_nonzero(opponent_chroma(grey)) == 0
    green, greyed = _image((40, 180, 60)), _image((110, 105, 100))
    assert float((opponent_chroma(greyed) - opponent_chroma(green)).abs().mean()) > 0.3
    with pytest.raises(Exception, match="chroma_weight"):
        VAETrainConfig(steps=1, batch_size=1, lr=1e-4, chroma_weight=-1.0).validate()
    vae = VAEModelConfig(block_out_channels=(32, 32), layers_per_block=1).build(seed=0)
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plain, plain_metrics = vae_loss(vae, pixels, VAETrainConfig(steps=1, batch_size=1, lr=1e-4), torch.Generator().manual_seed(1))
    weighted, metrics = vae_loss(vae, pixels, VAETrainConfig(steps=1, batch_size=1, lr=1e-4, chroma_weight=2.0), torch.Generator().manual_seed(1))
    assert "chroma" not in plain_metrics and metrics["chroma"] > 0
    assert float(weighted.detach()) == pytest.approx(float(plain.detach()) + 2.0 * metrics["chroma"], rel=1e-5)


def test_the_script_reads_a_vae_in_training(tmp_path):
    """--vae: a VAE stage's final.pt and its running state.pt give the same report for the same weights."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    from huabi.train.common import atomic_torch_save, config_dict
    from huabi.train.vae import VAEModelConfig

    script = Path(__file__).resolve().parents[1] / "scripts" / "vae_colour.py"
    data = tmp_path / "data"
    data.mkdir()
    for name, rgb in (("red", (220, 30, 30)), ("green", (40, 180, 60))):
        Image.new("RGB", (32, 32), rgb).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text(f"a {name} square\n", encoding="utf-8")
    config = VAEModelConfig(block_out_channels=(32, 32), layers_per_block=1)
    weights = config.build(seed=3).state_dict()
    atomic_torch_save({"model_config": config_dict(config), "state_dict": weights}, tmp_path / "final.pt")
    atomic_torch_save({"format": 1, "config": {"model": config_dict(config)}, "modules": {"vae": weights}}, tmp_path / "state.pt")
    reports = []
    for name in ("final.pt", "state.pt"):
        out = tmp_path / f"{name}.json"
        done = subprocess.run([sys.executable, str(script), "--vae", str(tmp_path / name), "--size", "32", "--data", str(data),
                               "--count", "2", "--json", str(out), "--threads", "1"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        reports.append(json.loads(out.read_text()))
    assert reports[0]["size_px"] == 32 and set(reports[0]["hues"]) == {"red", "green"}
    assert reports[0]["hues"] == reports[1]["hues"] and reports[0]["psnr_db"] == reports[1]["psnr_db"]
    atomic_torch_save({"something": 1}, tmp_path / "other.pt")
    bad = subprocess.run([sys.executable, str(script), "--vae", str(tmp_path / "other.pt"), "--data", str(data)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "is neither a VAE stage's final.pt nor its state.pt" in bad.stderr
    both = subprocess.run([sys.executable, str(script), "--vae", str(tmp_path / "final.pt"), "--model", "x.safetensors", "--data", str(data)],
                          capture_output=True, text=True, timeout=300)
    assert both.returncode == 2 and both.stderr.strip() == "error: give --model or --vae, not both"
