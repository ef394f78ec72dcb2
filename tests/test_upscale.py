"""``huabi upscale``: Lanczos, ESRGAN-family model files in every key layout, tiling, memory.

Tolerances: Lanczos is exact against Pillow (same call); a model loaded from
any layout gives exactly (``torch.equal``) the output of the module the weights
came from; tiled vs untiled model output: at most 2/255 per channel (8-bit
rounding of a feathered mix; measured max 1/255 on these tiny models), mean
below 0.05/255.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file

from huabi.cli.main import main
from huabi.errors import HuabiError
from huabi.models.upscalers import CompactNet, RRDBNet, build_upscaler, load_upscaler
from huabi.service.upscale import (
    band_bytes,
    check_scale,
    open_image,
    upscale_image,
    upscale_with_model,
)


def _random_image(width_px: int, height_px: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth-ish content plus noise, so upscalers see real structure.
    y, x = np.mgrid[0:height_px, 0:width_px]
    base = np.stack([(x * 3) % 256, (y * 5) % 256, ((x + y) * 2) % 256], axis=-1)
    noisy = base + rng.integers(-30, 30, size=base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def _randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return module.eval()


def _tiny_rrdb(seed: int = 1, **kw) -> RRDBNet:
    return _randomized(RRDBNet(features=8, growth=4, blocks=2, **kw), seed)


def _old_layout(net: RRDBNet) -> dict[str, torch.Tensor]:
    """Our weights under the old ESRGAN names (written independently of the loader's table)."""
    up = len(net.conv_up)
    out = {}
    for key, value in net.state_dict().items():
        parts = key.split(".")
        if parts[0] == "body":
            block, rdb, conv, kind = parts[1], int(parts[3]) + 1, int(parts[5]) + 1, parts[6]
            out[f"model.1.sub.{block}.RDB{rdb}.conv{conv}.0.{kind}"] = value
        elif parts[0] == "conv_up":
            out[f"model.{3 + 3 * int(parts[1])}.{parts[2]}"] = value
        else:
            index = {"conv_first": "0", "conv_body": f"1.sub.{len(net.body)}", "conv_hr": str(2 + 3 * up),
                     "conv_last": str(4 + 3 * up)}[parts[0]]
            out[f"model.{index}.{parts[1]}"] = value
    return out


def _new_layout(net: RRDBNet) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in net.state_dict().items():
        parts = key.split(".")
        if parts[0] == "body":
            out[f"body.{parts[1]}.rdb{int(parts[3]) + 1}.conv{int(parts[5]) + 1}.{parts[6]}"] = value
        elif parts[0] == "conv_up":
            out[f"conv_up{int(parts[1]) + 1}.{parts[2]}"] = value
        else:
            out[key] = value
    return out


def _forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return module(x)


# --------------------------------------------------------------------------- Lanczos


@pytest.mark.parametrize("scale", [1.0, 1.5, 2.0, 3.0])
def test_lanczos_is_pillows_resize(scale):
    image = _random_image(37, 29)
    result = upscale_image(image, scale)
    size = (int(37 * scale), int(29 * scale))
    assert result.image.size == size and result.upscaler == "Lanczos"
    assert np.array_equal(np.asarray(result.image), np.asarray(image.resize(size, resample=Image.LANCZOS)))


# --------------------------------------------------------------------------- model files


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("layout", ["old", "new"])
def test_rrdbnet_layouts_load_exactly(tmp_path, layout, suffix):
    net = _tiny_rrdb()
    state = _old_layout(net) if layout == "old" else _new_layout(net)
    if layout == "new":
        state = {"params_ema": state} if suffix == ".pth" else state  # Real-ESRGAN's release wrapper
    path = tmp_path / f"4x_tiny{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    model = load_upscaler(path)
    assert model.scale == 4 and model.name == "4x_tiny"
    assert model.layout == ("old ESRGAN" if layout == "old" else "RealESRGAN")
    x = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(_forward(model.module, x), _forward(net, x))


def test_realesrgan_x2_pixel_unshuffle_and_old_x2(tmp_path):
    net = _tiny_rrdb(unshuffle=2)
    model = build_upscaler(_new_layout(net), name="RealESRGAN_x2plus")
    assert model.scale == 2
    x = torch.rand(1, 3, 8, 12)
    assert _forward(model.module, x).shape == (1, 3, 16, 24)
    assert torch.equal(_forward(model.module, x), _forward(net, x))
    old_x2 = _tiny_rrdb(up_stages=1)
    assert build_upscaler(_old_layout(old_x2), name="2x").scale == 2


def test_compact_layout(tmp_path):
    net = _randomized(CompactNet(features=6, convs=2, scale=4), 5)
    path = tmp_path / "realesr-tiny.pth"
    torch.save({"params": net.state_dict()}, path)
    model = load_upscaler(path)
    assert (model.architecture, model.scale) == ("Compact", 4)
    x = torch.rand(1, 3, 9, 7)
    assert torch.equal(_forward(model.module, x), _forward(net, x))


# --------------------------------------------------------------------------- tiling


@pytest.mark.parametrize("kind", ["rrdb", "compact"])
def test_tiled_matches_untiled(kind):
    if kind == "rrdb":
        model = build_upscaler(_new_layout(_tiny_rrdb()), name="t")
    else:
        model = build_upscaler(_randomized(CompactNet(features=6, convs=2, scale=4), 5).state_dict(), name="t")
    image = _random_image(90, 70)
    whole = np.asarray(upscale_with_model(image, model, tile_px=512)).astype(int)
    tiled = np.asarray(upscale_with_model(image, model, tile_px=40, overlap_px=16)).astype(int)
    assert whole.shape == tiled.shape == (280, 360, 3)
    difference = np.abs(whole - tiled)
    assert difference.max() <= 2, difference.max()
    assert difference.mean() < 0.05, difference.mean()


def test_model_scale_reaches_the_asked_scale():
    model = build_upscaler(_randomized(CompactNet(features=4, convs=1, scale=2), 5).state_dict(), name="2x-c")
    image = _random_image(20, 16)
    result = upscale_image(image, 3.0, model=model, tile_px=64)  # 2x twice, then Lanczos down to 3x
    assert result.image.size == (60, 48) and result.upscaler == "2x-c"


def test_memory_bound_for_a_4096_output(tmp_path):
    """1024x1024 -> 4096x4096 with a tiny compact model: peak RSS growth within the stated bound."""
    script = textwrap.dedent(
        """
        import json, resource, sys, torch
        import numpy as np
        from PIL import Image
        from huabi.models.upscalers import CompactNet, build_upscaler
        from huabi.service.upscale import upscale_with_model
        torch.manual_seed(0)
        model = build_upscaler(CompactNet(features=4, convs=1, scale=4).state_dict(), name="m")
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8))
        upscale_with_model(Image.new("RGB", (64, 64)), model, tile_px=256)  # warm up torch's allocators
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = upscale_with_model(image, model, tile_px=256, overlap_px=16)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"size": list(out.size), "growth_kib": after - before}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["size"] == [4096, 4096]
    # Bound: uint8 output 48 MiB, its PIL copy 48 MiB, band accumulators band_bytes = 64 MiB,
    # input 3 MiB, one tile's tensors (~60 MiB at 256 px) -> under 280 MiB. A float32 whole-image
    # buffer alone would be 256 MiB more.
    assert band_bytes(1024, 4, 256) == 64 * 2**20
    assert report["growth_kib"] * 1024 < 280 * 2**20, report


# --------------------------------------------------------------------------- command line and errors


def test_cli_lanczos_keeps_infotext_and_adds_postprocess_keys(tmp_path, capsys):
    source = tmp_path / "in.png"
    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 3, Sampler: Euler, Seed: 7, Size: 40x30")
    _random_image(40, 30).save(source, pnginfo=info)
    assert main(["upscale", str(source), "--scale", "2", "--out", str(tmp_path / "out")]) == 0
    written = capsys.readouterr().out.strip()
    with Image.open(written) as result:
        result.load()
        assert result.size == (80, 60)
        assert result.text["parameters"] == "a cat\nSteps: 3, Sampler: Euler, Seed: 7, Size: 40x30"
        assert result.text["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    assert main(["upscale", str(source), "--out", str(tmp_path / "out")]) == 0  # never overwrites
    assert capsys.readouterr().out.strip().endswith("in-upscaled-1.png")


def test_cli_with_model_file(tmp_path, capsys):
    model_path = tmp_path / "4x-tiny.safetensors"
    save_file(_old_layout(_tiny_rrdb()), str(model_path))
    source = tmp_path / "plain.png"
    _random_image(24, 20).save(source)  # no infotext: still upscales
    assert main(["upscale", str(source), "--scale", "4", "--model", str(model_path), "--tile", "16",
                 "--out", str(tmp_path), "--quiet", "--device", "cpu"]) == 0
    with Image.open(capsys.readouterr().out.strip()) as result:
        result.load()
        assert result.size == (96, 80)
        assert "parameters" not in result.text
        assert result.text["postprocessing"] == "Postprocess upscale by: 4, Postprocess upscaler: 4x-tiny"


def test_bad_inputs(tmp_path, capsys):
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    with pytest.raises(HuabiError, match=r"image: .*notes.png: not a readable image \(UnidentifiedImageError\)$"):
        open_image(not_image)
    with pytest.raises(HuabiError, match=r"image: .*missing.png: no such file"):
        open_image(tmp_path / "missing.png")
    for scale in (0.5, 9, float("nan")):
        with pytest.raises(HuabiError, match="scale: must be a number from 1 to 8"):
            check_scale(scale)
    weird = tmp_path / "weird.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, weird)
    with pytest.raises(HuabiError, match=r"upscaler: weird: unknown upscaler file layout \(keys start encoder.weight\)"):
        load_upscaler(weird)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not safetensors")
    with pytest.raises(HuabiError, match="upscaler: broken.safetensors: cannot be read as a weights file"):
        load_upscaler(broken)
    with pytest.raises(HuabiError, match=r"upscaler: model.bin: expected one of .pth"):
        (tmp_path / "model.bin").write_bytes(b"")
        load_upscaler(tmp_path / "model.bin")
    truncated = _old_layout(_tiny_rrdb())
    del truncated["model.1.sub.0.RDB1.conv1.0.bias"]
    with pytest.raises(HuabiError, match="upscaler: cut: old ESRGAN layout but keys do not match it"):
        build_upscaler(truncated, name="cut")
    model = build_upscaler(_new_layout(_tiny_rrdb()), name="t")
    with pytest.raises(HuabiError, match="tile: must be an integer of at least 16 pixels"):
        upscale_with_model(_random_image(8, 8), model, tile_px=8)
    with pytest.raises(HuabiError, match=r"tile overlap: must be from 0 to half the tile \(16\)"):
        upscale_with_model(_random_image(8, 8), model, tile_px=32, overlap_px=20)
    # Through the command line: one line on stderr, exit code 2.
    assert main(["upscale", str(not_image)]) == 2
    assert main(["upscale", str(not_image), "--scale", "12"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [f"huabi: error: image: {not_image}: not a readable image (UnidentifiedImageError)",
                      "huabi: error: scale: must be a number from 1 to 8, got 12.0"]
