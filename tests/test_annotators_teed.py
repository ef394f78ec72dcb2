"""``softedge_teed`` (TEED, ``7_model.pth``) against controlnet_aux 0.0.10's TED and TEEDdetector.

controlnet_aux's ``teed`` package (ted.py, Fsmish.py, Xsmish.py and the detector in its
``__init__``, which sd-webui-controlnet's TEEDDector matches line for line) and its
``util.py`` are taken out of the wheel into a stand-in package, as in
``test_annotators_lines``; random weights with the real names are saved as 7_model.pth
and loaded through the public path.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from test_annotators_lines import RunsCode, _a1111_order, _grey, _he_init_, _huabi_map, _photo, _save_png, _wheel

from huabi.cli.main import EXIT_ERROR, main
from huabi.core.preprocess import module_spec
from huabi.errors import HuabiError

PACKAGE = "teed_reference"
FILES = ("util.py", "teed/__init__.py", "teed/ted.py", "teed/Fsmish.py", "teed/Xsmish.py")


@pytest.fixture(scope="module")
def teed(tmp_path_factory):
    wheel = _wheel()
    if wheel is None:
        pytest.skip("controlnet_aux wheel not found (bash setup.sh --dev downloads it; or set HUABI_CONTROLNET_AUX_WHEEL)")
    for needed in ("einops", "huggingface_hub"):
        if importlib.util.find_spec(needed) is None:
            pytest.skip(f"{needed} not installed (pip install -e .[dev])")
    root = tmp_path_factory.mktemp("teed_reference")
    with zipfile.ZipFile(wheel) as archive:
        for name in FILES:
            target = root / PACKAGE / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(f"controlnet_aux/{name}"))
    (root / PACKAGE / "__init__.py").write_text("")
    sys.path.insert(0, str(root))
    try:
        reference = importlib.import_module(f"{PACKAGE}.teed")
    finally:
        sys.path.remove(str(root))
    net = reference.TED()
    _he_init_(net, seed=41)
    with torch.no_grad():
        for side in (net.up_block_1, net.up_block_2, net.up_block_3):
            side.features[-1].weight.mul_(0.5)  # logits of a few units: edge maps with many grey levels
    models = tmp_path_factory.mktemp("teed_models")
    path = models / "annotators" / "TEED" / "7_model.pth"  # A1111's downloads/TEED/ layout
    path.parent.mkdir(parents=True)
    torch.save(net.state_dict(), path)
    yield SimpleNamespace(models=models, net=net.eval(), detector=reference.TEEDdetector(net.eval()))
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]


def test_teed_network_matches_reference(teed):
    from huabi.models.annotators.teed import TEED_FILE, load_teed

    ours = load_teed({TEED_FILE: teed.models / "annotators" / "TEED" / TEED_FILE}, torch.device("cpu"))
    image = torch.from_numpy(_photo(64, 128, seed=3)).float().permute(2, 0, 1)[None]
    with torch.no_grad():
        mine, theirs = ours(image), teed.net(image)
    assert [tuple(m.shape) for m in mine] == [(1, 1, 64, 128)] * 4
    for m, t in zip(mine, theirs, strict=True):
        torch.testing.assert_close(m, t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [None, 0, 5])
def test_teed_maps_match_reference(teed, tmp_path, steps):
    for h, w in ((128, 192), (100, 150)):
        image = _photo(h, w, seed=h + 7)
        ours = _huabi_map(tmp_path, teed.models, "softedge_teed", image, threshold_a=steps)

        def reference(padded):
            side = min(padded.shape[:2])
            return _grey(teed.detector(padded, detect_resolution=side, safe_steps=2 if steps is None else steps,
                                       output_type="np"))

        theirs = _a1111_order(reference, image)
        assert np.array_equal(ours, theirs), f"steps={steps} {h}x{w}: {np.count_nonzero(ours != theirs)} pixels differ"
        levels = len(np.unique(ours))
        assert levels > 50 if steps == 0 else 2 <= levels <= (3 if steps is None else 6)


def test_safe_steps_are_checked():
    spec = module_spec("te_hed")
    assert spec.name == "softedge_teed" and spec.check_thresholds(None, None) == (2.0, None)
    with pytest.raises(HuabiError, match=r"Safe Steps.*0 to 10"):
        spec.check_thresholds(11, None)


def test_preprocess_command_runs_te_hed_alias(teed, tmp_path, capsys):
    image = _photo(70, 90, seed=9)
    out = tmp_path / "edges.png"
    code = main(["preprocess", _save_png(tmp_path, image), "--module", "te_hed", "--res", "70", "--threshold-a", "0",
                 "--out", str(out), "--models-dir", str(teed.models)])
    assert code == 0, capsys.readouterr().err
    written = np.asarray(Image.open(out).convert("RGB"))
    assert np.array_equal(written[..., 0], _huabi_map(tmp_path, teed.models, "softedge_teed", image, threshold_a=0))


def _preprocess_error(tmp_path: Path, models: Path, capsys) -> str:
    out = tmp_path / "map.png"
    code = main(["preprocess", _save_png(tmp_path, _photo(64, 64)), "--module", "softedge_teed", "--out", str(out),
                 "--models-dir", str(models)])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_ERROR and "\n" not in err and not out.exists()
    return err


def test_missing_file_is_one_line_naming_it(tmp_path, capsys):
    err = _preprocess_error(tmp_path, tmp_path / "models", capsys)
    assert "softedge_teed" in err and str(tmp_path / "models" / "annotators" / "7_model.pth") in err


def test_wrong_file_is_one_line_naming_keys(tmp_path, capsys):
    from huabi.models.annotators.lines import LineartGenerator

    models = tmp_path / "models"
    (models / "annotators").mkdir(parents=True)
    torch.save(LineartGenerator().state_dict(), models / "annotators" / "7_model.pth")
    err = _preprocess_error(tmp_path, models, capsys)
    assert "7_model.pth" in err and "softedge_teed" in err and "block_1.conv1.weight" in err and "model0.1.weight" in err


def test_pickle_with_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "ran"
    models = tmp_path / "models"
    (models / "annotators").mkdir(parents=True)
    torch.save({"block_1.conv1.weight": torch.ones(1), "x": RunsCode(marker)}, models / "annotators" / "7_model.pth")
    err = _preprocess_error(tmp_path, models, capsys)
    assert "7_model.pth" in err and not marker.exists()
