"""``normal_bae`` (Bae et al.'s surface normals, ``scannet.pt``) against lllyasviel's code in controlnet_aux 0.0.10.

The network reference is controlnet_aux's vendored BAE model (``normalbae/nets``:
its NNET, decoder and the pure-torch geffnet EfficientNet it builds the encoder
from), taken out of the wheel into a stand-in package.  Its detector
(``normalbae/__init__.py``) imports torchvision for one ``transforms.Normalize``;
the test runs that file's own source with that import replaced by the two-line
per-channel ``(x - mean) / std`` (what Normalize computes on a tensor), so
everything else -- pre-processing, which output is used, the 8-bit conversion --
is the reference's.  Helpers shared with the line annotators' tests come from
``test_annotators_lines``.
"""

from __future__ import annotations

import sys
import types
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from test_annotators_lines import RunsCode, _a1111_order, _he_init_, _photo, _save_png, _wheel

from huabi.cli.main import EXIT_ERROR, main
from huabi.core.control import ControlUnit
from huabi.service.control import detect_map

PACKAGE = "normalbae_reference"
NETS = "controlnet_aux/normalbae/nets/"


def _reference_normalize(mean, std):
    """torchvision.transforms.Normalize on a tensor: per-channel (x - mean) / std."""
    def normalize(x: torch.Tensor) -> torch.Tensor:
        return (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    return normalize


@pytest.fixture(scope="module")
def bae(tmp_path_factory):
    """Random BAE weights saved as scannet.pt, the reference network with the same weights, and its detector."""
    import importlib
    import importlib.util

    wheel = _wheel()
    if wheel is None:
        pytest.skip("controlnet_aux wheel not found (bash setup.sh --dev downloads it; or set HUABI_CONTROLNET_AUX_WHEEL)")
    if importlib.util.find_spec("einops") is None:
        pytest.skip("einops not installed (pip install -e .[dev])")
    root = tmp_path_factory.mktemp("normalbae_reference")
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.startswith(NETS) and name.endswith(".py"):
                target = root / PACKAGE / name[len("controlnet_aux/normalbae/"):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))
        detector_source = archive.read("controlnet_aux/normalbae/__init__.py").decode()
        (root / PACKAGE / "util.py").write_bytes(archive.read("controlnet_aux/util.py"))
    (root / PACKAGE / "__init__.py").write_text("")
    sys.path.insert(0, str(root))
    try:
        nnet = importlib.import_module(f"{PACKAGE}.nets.NNET")
        util = importlib.import_module(f"{PACKAGE}.util")
        args = SimpleNamespace(mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4,
                               importance_ratio=0.7)
        net = nnet.NNET(args)  # builds geffnet's tf_efficientnet_b5_ap through torch.hub's local loader
    finally:
        sys.path.remove(str(root))
        # The reference's packages leave with it (the loaded classes keep what they need).
        for name in [name for name in sys.modules if name.split(".")[0] in (PACKAGE, "geffnet")]:
            del sys.modules[name]

    detector_module = types.ModuleType(f"{PACKAGE}_detector")
    detector_module.__dict__.update(NNET=nnet.NNET, HWC3=util.HWC3, resize_image=util.resize_image,
                                    transforms=SimpleNamespace(Normalize=_reference_normalize))
    kept = [line for line in detector_source.splitlines()
            if not line.startswith(("import torchvision", "from huggingface_hub", "from ..util", "from .nets"))]
    assert len(kept) == len(detector_source.splitlines()) - 4, "controlnet_aux's normalbae imports changed"
    exec(compile("\n".join(kept), "controlnet_aux/normalbae/__init__.py", "exec"), detector_module.__dict__)

    _he_init_(net, seed=21)
    generator = torch.Generator().manual_seed(22)
    with torch.no_grad():
        for layer in net.modules():
            if isinstance(layer, torch.nn.Conv1d):  # the refinement MLPs: random too, so every stage matters
                he_std = (2.0 / layer.weight[0].numel()) ** 0.5
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * he_std)
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.1)
    # Half precision on disk halves the ~290 MB file; the reference gets the same rounded weights.
    state = {key: value.half() if value.is_floating_point() else value for key, value in net.state_dict().items()}
    net.load_state_dict({key: value.float() if value.is_floating_point() else value for key, value in state.items()})
    net.eval()
    models = tmp_path_factory.mktemp("normalbae_models")
    path = models / "annotators" / "scannet.pt"
    path.parent.mkdir(parents=True)
    # The released file nests the names: {"model": {"module.<name>": ...}} (a DataParallel training run).
    torch.save({"model": {f"module.{key}": value for key, value in state.items()}}, path)
    return SimpleNamespace(models=models, net=net, detector=detector_module.NormalBaeDetector(net))


def _normal_map(tmp_path: Path, models: Path, image: np.ndarray) -> np.ndarray:
    """huabi's normal_bae map through the service's public path, as uint8 RGB."""
    control = ControlUnit("unused", image=_save_png(tmp_path, image), module="normal_bae",
                          processor_res=min(image.shape[:2]))
    detected = detect_map(control, models_dir=models, device="cpu")
    assert detected.dtype == np.float32 and detected.shape == image.shape
    as_uint8 = np.round(detected * 255.0)
    assert np.abs(detected * 255.0 - as_uint8).max() < 1e-3  # 8-bit levels, like A1111's maps
    return as_uint8.astype(np.uint8)


def test_normal_bae_network_matches_reference(bae):
    from huabi.models.annotators.normalbae import NORMAL_BAE_FILE, load_normal_bae, network_input

    ours = load_normal_bae({NORMAL_BAE_FILE: bae.models / "annotators" / NORMAL_BAE_FILE}, torch.device("cpu"))
    image = network_input(_photo(64, 128, seed=2), torch.device("cpu"))
    with torch.no_grad():
        mine, theirs = ours(image), bae.net(image)[0]
    assert [tuple(m.shape) for m in mine] == [(1, 4, 8, 16), (1, 4, 16, 32), (1, 4, 32, 64), (1, 4, 64, 128)]
    for m, t in zip(mine, theirs, strict=True):
        torch.testing.assert_close(m, t, rtol=1e-5, atol=1e-5)
    assert mine[-1][0, :3].std(dim=(1, 2)).min() > 0.05  # normals that vary over the image, not a constant


@pytest.mark.parametrize("h, w", [(128, 192), (100, 150)])
def test_normal_bae_maps_match_reference(bae, tmp_path, h, w):
    image = _photo(h, w, seed=h + 3)
    ours = _normal_map(tmp_path, bae.models, image)

    def reference(padded):
        side = min(padded.shape[:2])
        return bae.detector(padded, detect_resolution=side, image_resolution=side, output_type="np")

    theirs = _a1111_order(reference, image)
    assert np.array_equal(ours, theirs), f"{h}x{w}: {np.count_nonzero(ours != theirs)} values differ"
    # An RGB normal map: (n + 1) / 2 of unit vectors, so the decoded lengths are 1 up to 8-bit truncation.
    length = np.linalg.norm(ours.astype(np.float64) / 255.0 * 2.0 - 1.0, axis=2)
    assert np.abs(length - 1.0).max() < 0.03
    assert len(np.unique(ours.reshape(-1, 3), axis=0)) > 500


def test_preprocess_command_writes_the_normal_map(bae, tmp_path, capsys):
    image = _photo(70, 90, seed=4)
    out = tmp_path / "normals.png"
    code = main(["preprocess", _save_png(tmp_path, image), "--module", "normal_bae", "--res", "70", "--out", str(out),
                 "--models-dir", str(bae.models)])
    assert code == 0, capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), _normal_map(tmp_path, bae.models, image))


def _preprocess_error(tmp_path: Path, models: Path, capsys) -> str:
    out = tmp_path / "map.png"
    code = main(["preprocess", _save_png(tmp_path, _photo(64, 64)), "--module", "normal_bae", "--out", str(out),
                 "--models-dir", str(models)])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_ERROR and "\n" not in err and not out.exists()
    return err


def test_missing_scannet_is_one_line_naming_it(tmp_path, capsys):
    err = _preprocess_error(tmp_path, tmp_path / "models", capsys)
    assert "normal_bae" in err and str(tmp_path / "models" / "annotators" / "scannet.pt") in err


def test_wrong_file_is_one_line_naming_keys(tmp_path, capsys):
    from huabi.models.annotators.lines import LineartGenerator

    models = tmp_path / "models"
    (models / "annotators").mkdir(parents=True)
    torch.save({"model": LineartGenerator().state_dict()}, models / "annotators" / "scannet.pt")
    err = _preprocess_error(tmp_path, models, capsys)
    assert "scannet.pt" in err and "normal_bae" in err
    assert "encoder.original_model.conv_stem.weight" in err and "model0.1.weight" in err


def test_pickle_with_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "ran"
    models = tmp_path / "models"
    (models / "annotators").mkdir(parents=True)
    torch.save({"model": {"payload": RunsCode(marker)}}, models / "annotators" / "scannet.pt")
    err = _preprocess_error(tmp_path, models, capsys)
    assert "scannet.pt" in err and not marker.exists()


def test_model_wrapper_is_unwrapped_only_when_alone(tmp_path):
    from huabi.models.formats import read_state_dict

    path = tmp_path / "wrapped.pt"
    torch.save({"model": {"a": torch.ones(2)}, "epoch": 3}, path)
    assert list(read_state_dict(path)[0]) == ["a"]
    torch.save({"model": {"a": torch.ones(2)}, "b": torch.zeros(1)}, path)
    assert list(read_state_dict(path)[0]) == ["b"]  # a plain state dict that has a "model" entry stays as it is
