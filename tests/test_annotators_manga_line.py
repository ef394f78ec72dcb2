"""``lineart_anime_denoise`` (the manga line network, ``erika.pth``).

No importable reference exists: controlnet_aux 0.0.10 has no manga_line module
(sd-webui-controlnet's ``annotator/manga_line`` is not on PyPI), so the network is
checked against an independent functional forward written here straight from the
checkpoint's tensor names (every layer read from the state dict by name, plain
``F.batch_norm`` / ``F.conv2d`` / nearest upsampling), following sd-webui-controlnet's
published behaviour: pre-activated convs (BN eps 1e-3, LeakyReLU 0.2), the last unit of
each encoder stage strided, decoder stages upsampling in their first unit and adding the
encoder output of the same size, grey 0..255 in, ``255 - output`` truncated to 8 bits
out, on the image edge-padded to a multiple of 64.  The map is then checked end to end
through ``detect_map`` and the CLI.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from test_annotators_lines import RunsCode, _a1111_order, _huabi_map, _photo, _save_png
from torch.nn import functional as F

from huabi.cli.main import EXIT_ERROR, main

ENCODER_UNITS = (2, 3, 5, 7, 12)
DECODER_UNITS = (7, 5, 3, 2)


def _pre_activated(state, prefix, x, *, stride=1, upsample=False):
    x = F.batch_norm(x, state[f"{prefix}.model.0.running_mean"], state[f"{prefix}.model.0.running_var"],
                     state[f"{prefix}.model.0.weight"], state[f"{prefix}.model.0.bias"], eps=1e-3)
    x = F.leaky_relu(x, 0.2)
    weight = state[f"{prefix}.model.2.weight"]
    x = F.conv2d(x, weight, state[f"{prefix}.model.2.bias"], stride=stride, padding=weight.shape[-1] // 2)
    return F.interpolate(x, scale_factor=2, mode="nearest") if upsample else x


def _unit(state, prefix, x, *, stride=1, upsample=False):
    y = _pre_activated(state, f"{prefix}.residual", _pre_activated(state, f"{prefix}.conv1", x, stride=stride,
                                                                    upsample=upsample))
    if f"{prefix}.shortcut.model.0.weight" in state:
        x = F.conv2d(x, state[f"{prefix}.shortcut.model.0.weight"], state[f"{prefix}.shortcut.model.0.bias"], stride=stride)
        if upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
    return x + y


def _reference_page(state: dict[str, torch.Tensor], grey: torch.Tensor) -> torch.Tensor:
    """The network's output for a grey [1, 1, H, W] page in 0..255, computed from the state dict's names alone."""
    def units_in(block):
        return 1 + max(int(m.group(1)) for k in state if (m := re.match(rf"{block}\.model\.(\d+)\.", k)))

    skips, x = [], grey
    for b, count in enumerate(ENCODER_UNITS):
        assert units_in(f"block{b}") == count
        for u in range(count):
            x = _unit(state, f"block{b}.model.{u}", x, stride=2 if (b > 0 and u == count - 1) else 1)
        skips.append(x)
    for b, count in enumerate(DECODER_UNITS, start=5):
        assert units_in(f"block{b}") == count
        for u in range(count):
            x = _unit(state, f"block{b}.model.{u}", x, upsample=u == 0)
        x = x + skips[3 - (b - 5)]
    for u in range(units_in("block9")):
        x = _unit(state, f"block9.model.{u}", x)
    return _pre_activated(state, "conv15", x)


@pytest.fixture(scope="module")
def manga(tmp_path_factory):
    from huabi.models.annotators.manga_line import MangaLineNet

    generator = torch.Generator().manual_seed(31)
    state = {}
    for name, value in MangaLineNet().state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = value
        elif name.endswith("running_var"):
            state[name] = 1.0 + 0.5 * torch.rand(value.shape, generator=generator)
        elif name.endswith(".0.weight") and value.ndim == 1:  # batch-norm scales
            state[name] = 1.0 + 0.2 * torch.randn(value.shape, generator=generator)
        elif value.ndim == 4:  # convs, He-normal
            state[name] = torch.randn(value.shape, generator=generator) * (2.0 / value[0].numel()) ** 0.5
        else:
            state[name] = 0.1 * torch.randn(value.shape, generator=generator)
    # The first norm sees 0..255 grey: centre it, as a trained net's statistics would.
    state["block0.model.0.conv1.model.0.running_mean"] = torch.tensor([128.0])
    state["block0.model.0.conv1.model.0.running_var"] = torch.tensor([64.0 ** 2])
    state["block0.model.0.shortcut.model.0.weight"] /= 128.0
    # Scale the last conv so the page spans grey levels around 128 rather than sitting on 0 or 255.
    grey = torch.tensor(np.array(Image.fromarray(_photo(128, 128, seed=1)).convert("L"))).float()[None, None]
    with torch.no_grad():
        raw = _reference_page(state, grey)
    scale, bias = 60.0 / raw.std(), state["conv15.model.2.bias"]
    state["conv15.model.2.weight"] = state["conv15.model.2.weight"] * scale
    state["conv15.model.2.bias"] = 128.0 - scale * (raw.mean() - bias)
    models = tmp_path_factory.mktemp("manga_models")
    path = models / "annotators" / "erika.pth"
    path.parent.mkdir(parents=True)
    # Names carry DataParallel's "module." (sd-webui-controlnet strips it when loading).
    torch.save({f"module.{name}": value for name, value in state.items()}, path)
    return SimpleNamespace(models=models, state=state)


def test_manga_line_network_matches_functional_reference(manga):
    from huabi.models.annotators.manga_line import MANGA_LINE_FILE, load_manga_line

    net = load_manga_line({MANGA_LINE_FILE: manga.models / "annotators" / MANGA_LINE_FILE}, torch.device("cpu"))
    grey = torch.rand(1, 1, 64, 96, generator=torch.Generator().manual_seed(2)) * 255
    with torch.no_grad():
        ours, theirs = net(grey), _reference_page(manga.state, grey)
    assert ours.shape == (1, 1, 64, 96)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-3)  # outputs are in 0..255 units
    assert ours.std() > 10


@pytest.mark.parametrize("h, w", [(128, 192), (100, 150)])
def test_lineart_anime_denoise_map(manga, tmp_path, h, w):
    import cv2

    image = _photo(h, w, seed=w)
    ours = _huabi_map(tmp_path, manga.models, "lineart_anime_denoise", image)

    def reference(padded):
        grey = torch.from_numpy(cv2.cvtColor(padded, cv2.COLOR_RGB2GRAY)).float()[None, None]
        with torch.no_grad():
            page = _reference_page(manga.state, grey)[0, 0].numpy()
        return (255 - page).clip(0, 255).astype(np.uint8)

    theirs = _a1111_order(reference, image)
    assert np.array_equal(ours, theirs), f"{h}x{w}: {np.count_nonzero(ours != theirs)} pixels differ"
    assert len(np.unique(ours)) > 50


def test_preprocess_command_runs_lineart_anime_denoise(manga, tmp_path, capsys):
    image = _photo(70, 90, seed=8)
    out = tmp_path / "lines.png"
    code = main(["preprocess", _save_png(tmp_path, image), "--module", "lineart_anime_denoise", "--res", "70",
                 "--out", str(out), "--models-dir", str(manga.models)])
    assert code == 0, capsys.readouterr().err
    written = np.asarray(Image.open(out).convert("RGB"))
    assert np.array_equal(written[..., 0], _huabi_map(tmp_path, manga.models, "lineart_anime_denoise", image))


def _preprocess_error(tmp_path: Path, models: Path, capsys) -> str:
    out = tmp_path / "map.png"
    code = main(["preprocess", _save_png(tmp_path, _photo(64, 64)), "--module", "lineart_anime_denoise", "--out",
                 str(out), "--models-dir", str(models)])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_ERROR and "\n" not in err and not out.exists()
    return err


def test_missing_erika_is_one_line_naming_it(tmp_path, capsys):
    err = _preprocess_error(tmp_path, tmp_path / "models", capsys)
    assert "lineart_anime_denoise" in err and str(tmp_path / "models" / "annotators" / "erika.pth") in err


def test_wrong_file_is_one_line_naming_keys(tmp_path, capsys):
    from huabi.models.annotators.lines import LineartGenerator

    models = tmp_path / "models"
    (models / "annotators").mkdir(parents=True)
    torch.save(LineartGenerator().state_dict(), models / "annotators" / "erika.pth")
    err = _preprocess_error(tmp_path, models, capsys)
    assert "erika.pth" in err and "lineart_anime_denoise" in err
    assert "block0.model.0.conv1.model.0.weight" in err and "model0.1.weight" in err


def test_pickle_with_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "ran"
    models = tmp_path / "models"
    (models / "annotators").mkdir(parents=True)
    torch.save({"block0.model.0.conv1.model.0.weight": torch.ones(1), "x": RunsCode(marker)},
               models / "annotators" / "erika.pth")
    err = _preprocess_error(tmp_path, models, capsys)
    assert "erika.pth" in err and not marker.exists()
