"""huabi's upscaler networks against spandrel's own architectures on the same weight files (issue 22).

The README says huabi's ESRGAN / Real-ESRGAN / compact networks give spandrel's outputs; the other
upscaler tests compare huabi with itself. Here the weights are written as a user's file would be
(key names from the published layouts: old ESRGAN ``model.N``, BasicSR ``conv_first``/``body.N.rdbK``,
SRVGGNetCompact ``body.N``), filled with seeded random numbers, and the same file is loaded by huabi
(:func:`huabi.models.upscalers.load_upscaler`) and by spandrel's architecture detection
(``ESRGANArch().load`` / ``CompactArch().load``, which read layout, scale and sizes from the keys
themselves) and run on the same input.

spandrel's package ``__init__`` imports every architecture and two of them import torchvision (which
must not be installed beside the pinned torch), so :func:`spandrel_module` imports the two architecture
modules the test needs through a bare ``spandrel`` package entry (no code of spandrel is changed; the
entries are removed afterwards). setup.sh --dev installs spandrel with --no-deps; without it these skip.

Tolerances: the same float32 convolutions in the same order: measured max |huabi - spandrel| = 0 on
every layout; asserted 1e-6 absolute (outputs are O(1)). huabi's tiled image path (8-bit in and out,
feathered tiles) against spandrel's whole-image call rounded to 8 bits: at most 2/255 per channel, the
bound the tiled-vs-untiled test states.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from huabi.models.upscalers import load_upscaler
from huabi.service.upscale import upscale_with_model


@pytest.fixture(scope="module")
def spandrel_module():
    """``name -> spandrel.architectures.<name>`` imported without spandrel's package ``__init__``."""
    spec = importlib.util.find_spec("spandrel")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("reference package spandrel not installed (bash setup.sh --dev installs it with --no-deps)")
    if importlib.util.find_spec("einops") is None:
        pytest.skip("spandrel needs einops (pip install -e .[dev])")
    before = set(sys.modules)
    had_spandrel = sys.modules.get("spandrel")
    package = types.ModuleType("spandrel")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["spandrel"] = package
    try:
        yield lambda name: importlib.import_module(f"spandrel.architectures.{name}")
    finally:
        for name in set(sys.modules) - before:
            if name == "spandrel" or name.startswith("spandrel."):
                del sys.modules[name]
        if had_spandrel is not None:
            sys.modules["spandrel"] = had_spandrel
        else:
            sys.modules.pop("spandrel", None)
    assert "torchvision" not in sys.modules


def _random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for key, shape in shapes.items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        weights[key] = torch.randn(shape, generator=generator) * (0.5 / fan_in**0.5 if len(shape) > 1 else 0.1)
        if key.endswith(".weight") and len(shape) == 1:  # PReLU slopes: positive, as trained ones are
            weights[key] = weights[key].abs() + 0.1
    return weights


def _rdb_shapes(prefix: str, features: int, growth: int, suffix: str) -> dict[str, tuple[int, ...]]:
    """Five convs of one residual dense block: conv k sees features + (k-1)*growth channels."""
    shapes = {}
    for k in range(1, 6):
        out = growth if k < 5 else features
        shapes[f"{prefix}conv{k}{suffix}.weight"] = (out, features + (k - 1) * growth, 3, 3)
        shapes[f"{prefix}conv{k}{suffix}.bias"] = (out,)
    return shapes


def old_esrgan_shapes(*, features: int, growth: int, blocks: int, up_stages: int) -> dict[str, tuple[int, ...]]:
    """The original ESRGAN file layout (``RRDB_ESRGAN_x4.pth``): a ``model`` Sequential."""
    conv = lambda out, inp: ((out, inp, 3, 3), (out,))  # noqa: E731
    shapes: dict[str, tuple[int, ...]] = {}
    shapes["model.0.weight"], shapes["model.0.bias"] = conv(features, 3)
    for block in range(blocks):
        for rdb in range(1, 4):
            shapes.update(_rdb_shapes(f"model.1.sub.{block}.RDB{rdb}.", features, growth, ".0"))
    shapes[f"model.1.sub.{blocks}.weight"], shapes[f"model.1.sub.{blocks}.bias"] = conv(features, features)
    for stage in range(up_stages):
        index = 3 + 3 * stage
        shapes[f"model.{index}.weight"], shapes[f"model.{index}.bias"] = conv(features, features)
    hr, last = 2 + 3 * up_stages, 4 + 3 * up_stages
    shapes[f"model.{hr}.weight"], shapes[f"model.{hr}.bias"] = conv(features, features)
    shapes[f"model.{last}.weight"], shapes[f"model.{last}.bias"] = conv(3, features)
    return shapes


def basicsr_shapes(*, features: int, growth: int, blocks: int, scale: int) -> dict[str, tuple[int, ...]]:
    """BasicSR / Real-ESRGAN's RRDBNet (``RealESRGAN_x4plus.pth``): x2 and x1 pixel-unshuffle the input
    by 2 and 4, so ``conv_first`` sees 12 or 48 channels; two nearest-2x stages always."""
    unshuffle = {4: 1, 2: 2, 1: 4}[scale]
    conv = lambda out, inp: ((out, inp, 3, 3), (out,))  # noqa: E731
    shapes: dict[str, tuple[int, ...]] = {}
    shapes["conv_first.weight"], shapes["conv_first.bias"] = conv(features, 3 * unshuffle**2)
    for block in range(blocks):
        for rdb in range(1, 4):
            shapes.update(_rdb_shapes(f"body.{block}.rdb{rdb}.", features, growth, ""))
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = conv(features, features)
    shapes["conv_last.weight"], shapes["conv_last.bias"] = conv(3, features)
    return shapes


def compact_shapes(*, features: int, convs: int, scale: int) -> dict[str, tuple[int, ...]]:
    """SRVGGNetCompact (``realesr-general-x4v3.pth``): ``body`` = conv, PReLU, (conv, PReLU) * convs, conv."""
    shapes: dict[str, tuple[int, ...]] = {"body.0.weight": (features, 3, 3, 3), "body.0.bias": (features,),
                                          "body.1.weight": (features,)}
    for k in range(convs):
        shapes[f"body.{2 + 2 * k}.weight"], shapes[f"body.{2 + 2 * k}.bias"] = (features, features, 3, 3), (features,)
        shapes[f"body.{3 + 2 * k}.weight"] = (features,)
    last = 2 + 2 * convs
    shapes[f"body.{last}.weight"], shapes[f"body.{last}.bias"] = (3 * scale**2, features, 3, 3), (3 * scale**2,)
    return shapes


# spandrel's ESRGAN loader reads the feature count from the file but assumes ESRGAN's growth of 32 channels.
LAYOUTS = {
    "old ESRGAN x4": ("ESRGAN", lambda: old_esrgan_shapes(features=8, growth=32, blocks=2, up_stages=2), 4),
    "old ESRGAN x2": ("ESRGAN", lambda: old_esrgan_shapes(features=8, growth=32, blocks=1, up_stages=1), 2),
    "Real-ESRGAN x4": ("ESRGAN", lambda: basicsr_shapes(features=8, growth=32, blocks=2, scale=4), 4),
    "Real-ESRGAN x2": ("ESRGAN", lambda: basicsr_shapes(features=8, growth=32, blocks=2, scale=2), 2),
    "Real-ESRGAN x1": ("ESRGAN", lambda: basicsr_shapes(features=8, growth=32, blocks=1, scale=1), 1),
    "compact x4": ("Compact", lambda: compact_shapes(features=8, convs=3, scale=4), 4),
    "compact x2": ("Compact", lambda: compact_shapes(features=8, convs=2, scale=2), 2),
}


def _spandrel_model(spandrel_module, architecture: str, weights: dict[str, torch.Tensor]):
    module = spandrel_module(architecture)
    arch = getattr(module, f"{architecture}Arch")()
    return arch.load({k: v.clone() for k, v in weights.items()})


def _input(seed: int, height_px: int = 20, width_px: int = 24) -> torch.Tensor:
    return torch.rand((1, 3, height_px, width_px), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_network_matches_spandrel_on_the_same_file(spandrel_module, tmp_path, layout, suffix):
    architecture, shapes, scale = LAYOUTS[layout]
    weights = _random_weights(shapes(), seed=len(layout))
    path = tmp_path / f"up{suffix}"
    if suffix == ".pth":
        torch.save(weights, path)
    else:
        save_file(weights, str(path))
    ours = load_upscaler(path)
    theirs = _spandrel_model(spandrel_module, architecture, weights)
    assert ours.scale == theirs.scale == scale
    x = _input(seed=3)
    with torch.inference_mode():
        ours_out = ours.module(x)
        theirs_out = theirs.model.eval()(x)
    difference = (ours_out - theirs_out).abs().max().item()
    print(f"{layout}{suffix}: max |huabi - spandrel| = {difference:.2e}, output max {theirs_out.abs().max():.2f}")
    assert ours_out.shape == theirs_out.shape == (1, 3, 20 * scale, 24 * scale)
    assert difference <= 1e-6


@pytest.mark.parametrize("layout", ["Real-ESRGAN x4", "compact x2"])
def test_tiled_image_path_matches_spandrels_whole_image(spandrel_module, tmp_path, layout):
    """huabi's 8-bit image path in feathered tiles vs spandrel's model on the whole image."""
    architecture, shapes, scale = LAYOUTS[layout]
    weights = _random_weights(shapes(), seed=7)
    path = tmp_path / "up.safetensors"
    save_file(weights, str(path))
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    ours = np.asarray(upscale_with_model(Image.fromarray(pixels, "RGB"), load_upscaler(path), tile_px=24),
                      dtype=np.int16)
    theirs_model = _spandrel_model(spandrel_module, architecture, weights)
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.inference_mode():
        out = theirs_model.model.eval()(x)[0].clamp(0, 1).permute(1, 2, 0).numpy()
    theirs = np.round(out * 255.0).astype(np.int16)
    difference = np.abs(ours - theirs)
    print(f"{layout}: tiled huabi vs whole-image spandrel: max {difference.max()}/255, mean {difference.mean():.4f}")
    assert ours.shape == theirs.shape == (40 * scale, 56 * scale, 3)
    assert difference.max() <= 2
