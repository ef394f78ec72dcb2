"""HED, line art and M-LSD preprocessors against lllyasviel's annotator code (controlnet_aux 0.0.10).

Random weights with the real key names and shapes are saved as sd-webui-controlnet's
files, loaded through the public path (``detect_map`` / ``huabi preprocess``), and the
maps compared with controlnet_aux's detectors run on the same weights and the same
pixels.  controlnet_aux is not installed (it pulls torchvision): ``setup.sh --dev``
downloads its wheel into ``<venv>/huabi-reference`` and the modules needed here are
taken out of the archive (its package ``__init__`` imports every detector, so a
stand-in package holds only the files used).

sd-webui-controlnet pads the resized image at the bottom/right with edge pixels to a
multiple of 64, runs the detector and crops; controlnet_aux instead resizes to a
multiple of 64.  Images that are already multiples of 64 are compared with its detector
as it is; other sizes with its detector run on the edge-padded image, then cropped
(A1111's order).
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from huabi.cli.main import EXIT_ERROR, main
from huabi.core.control import ControlUnit
from huabi.core.preprocess import module_spec, run_preprocessor
from huabi.errors import HuabiError
from huabi.service.control import detect_map

WHEEL_GLOB = "controlnet_aux-0.0.10-*.whl"
REFERENCE_FILES = (
    "util.py", "hed/__init__.py", "lineart/__init__.py", "lineart_anime/__init__.py",
    "lineart_standard/__init__.py", "mlsd/__init__.py", "mlsd/utils.py", "mlsd/models/__init__.py",
    "mlsd/models/mbv2_mlsd_large.py", "pidi/__init__.py", "pidi/model.py",
)
PACKAGE = "controlnet_aux_reference"


def _wheel() -> str | None:
    candidates = [os.environ.get("HUABI_CONTROLNET_AUX_WHEEL", "")]
    candidates += sorted(glob.glob(str(Path(sys.prefix) / "huabi-reference" / WHEEL_GLOB)))
    return next((c for c in candidates if c and os.path.isfile(c) and zipfile.is_zipfile(c)), None)


@pytest.fixture(scope="module")
def aux(tmp_path_factory):
    """controlnet_aux's hed, lineart, lineart_anime, lineart_standard, mlsd and pidi modules, out of the wheel."""
    wheel = _wheel()
    if wheel is None:
        pytest.skip("controlnet_aux wheel not found (bash setup.sh --dev downloads it; or set HUABI_CONTROLNET_AUX_WHEEL)")
    for needed in ("einops", "huggingface_hub"):
        if importlib.util.find_spec(needed) is None:
            pytest.skip(f"{needed} not installed (pip install -e .[dev])")
    root = tmp_path_factory.mktemp("controlnet_aux")
    with zipfile.ZipFile(wheel) as archive:
        for name in REFERENCE_FILES:
            target = root / PACKAGE / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(f"controlnet_aux/{name}"))
    (root / PACKAGE / "__init__.py").write_text("")
    sys.path.insert(0, str(root))
    try:
        loaded = {name: importlib.import_module(f"{PACKAGE}.{name}")
                  for name in ("util", "hed", "lineart", "lineart_anime", "lineart_standard", "mlsd", "mlsd.utils",
                               "mlsd.models.mbv2_mlsd_large", "pidi", "pidi.model")}
    finally:
        sys.path.remove(str(root))
    yield SimpleNamespace(**{name.replace(".", "_"): module for name, module in loaded.items()})
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A test image with edges at several scales: shapes on a gradient, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx * 255 / w, yy * 255 / h, np.full((h, w), 128.0)], axis=2)
    image[(yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (min(h, w) / 4) ** 2] = (240, 30, 30)
    image[h // 5:h // 5 + h // 6, w // 2:w - 8] = (20, 20, 20)
    image[:, (xx[0] % 37) < 2] = 255
    image += rng.normal(0, 12, image.shape)
    return image.clip(0, 255).astype(np.uint8)


def _save_png(tmp_path: Path, image: np.ndarray, name: str = "photo.png") -> str:
    path = tmp_path / name
    Image.fromarray(image).save(path)
    return str(path)


def _huabi_map(tmp_path: Path, models: Path, module: str, image: np.ndarray, **unit) -> np.ndarray:
    """The map through the service's public path, as 8-bit grey (every channel equal)."""
    control = ControlUnit("unused", image=_save_png(tmp_path, image), module=module,
                          processor_res=min(image.shape[:2]), **unit)
    detected = detect_map(control, models_dir=models, device="cpu")
    assert detected.dtype == np.float32 and detected.shape == image.shape
    assert np.array_equal(detected[..., 0], detected[..., 1]) and np.array_equal(detected[..., 0], detected[..., 2])
    as_uint8 = np.round(detected[..., 0] * 255.0)
    assert np.abs(detected[..., 0] * 255.0 - as_uint8).max() < 1e-3  # 8-bit levels, like A1111's maps
    return as_uint8.astype(np.uint8)


def _a1111_order(reference_fn, image: np.ndarray) -> np.ndarray:
    """Run ``reference_fn`` on the edge-padded image (a multiple of 64) and crop, as sd-webui-controlnet does."""
    h, w = image.shape[:2]
    padded = np.pad(image, [[0, -h % 64], [0, -w % 64], [0, 0]], mode="edge")
    result = reference_fn(padded)
    return result[:h, :w]


def _grey(reference_map: np.ndarray) -> np.ndarray:
    if reference_map.ndim == 3:
        assert np.array_equal(reference_map[..., 0], reference_map[..., 2])
        return reference_map[..., 0]
    return reference_map


def _he_init_(net: torch.nn.Module, seed: int) -> None:
    """Seeded He-normal conv weights, random biases and batch-norm statistics, so every layer matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.modules():
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                fan_in = layer.weight[0].numel() if isinstance(layer, torch.nn.Conv2d) else layer.weight[:, 0].numel()
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
                if layer.bias is not None:
                    layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.1)
            elif isinstance(layer, torch.nn.BatchNorm2d):
                layer.weight.copy_(1.0 + 0.2 * torch.randn(layer.weight.shape, generator=generator))
                layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=generator))
                layer.running_mean.copy_(0.1 * torch.randn(layer.running_mean.shape, generator=generator))
                layer.running_var.copy_(1.0 + 0.5 * torch.rand(layer.running_var.shape, generator=generator))


def _save(state: dict[str, torch.Tensor], models: Path, name: str, *, prefix: str = "") -> Path:
    path = models / "annotators" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({prefix + key: value.clone() for key, value in state.items()}, path)
    return path


# --------------------------------------------------------------------------- HED


@pytest.fixture(scope="module")
def hed(aux, tmp_path_factory):
    models = tmp_path_factory.mktemp("hed_models")
    torch.manual_seed(0)
    net = aux.hed.ControlNetHED_Apache2()
    _he_init_(net, seed=1)
    with torch.no_grad():
        net.norm.copy_(torch.tensor([120.0, 115.0, 100.0]).view(1, 3, 1, 1))
        for block in (net.block1, net.block2, net.block3, net.block4, net.block5):
            block.projection.weight.mul_(0.05)  # side outputs of a few units: a map with grey levels, not 0/255 only
    _save(net.state_dict(), models, "ControlNetHED.pth")
    return SimpleNamespace(models=models, net=net.float().eval(), detector=aux.hed.HEDdetector(net.float().eval()))


def test_hed_network_matches_reference(hed):
    from huabi.models.annotators.lines import HED_FILE, load_hed

    ours = load_hed({HED_FILE: hed.models / "annotators" / HED_FILE}, torch.device("cpu"))
    image = torch.from_numpy(_photo(64, 128)).float().permute(2, 0, 1)[None]
    with torch.no_grad():
        for mine, theirs in zip(ours(image), hed.net(image)):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module, safe", [("softedge_hed", False), ("softedge_hedsafe", True), ("hed", False)])
def test_hed_maps_match_reference(hed, tmp_path, module, safe):
    for h, w in ((128, 192), (100, 150)):
        image = _photo(h, w, seed=h)
        ours = _huabi_map(tmp_path, hed.models, module, image)

        def reference(padded):
            side = min(padded.shape[:2])
            return _grey(hed.detector(padded, detect_resolution=side, image_resolution=side, safe=safe, output_type="np"))

        theirs = _a1111_order(reference, image)
        assert np.array_equal(ours, theirs), f"{module} {h}x{w}: {np.count_nonzero(ours != theirs)} pixels differ"
        levels = np.unique(ours)
        assert (len(levels) <= 3) if safe else (len(levels) > 50)  # a real map, not a flat one


def test_scribble_hed_matches_reference_nms(hed, aux, tmp_path):
    import cv2

    image = _photo(100, 150, seed=5)
    soft = _huabi_map(tmp_path, hed.models, "softedge_hed", image)
    scribble = _huabi_map(tmp_path, hed.models, "scribble_hed", image)
    # sd-webui-controlnet's scribble_hed: its HED map, then nms (controlnet_aux.util.nms), blur, threshold.
    expected = cv2.GaussianBlur(aux.util.nms(soft, 127, 3.0), (0, 0), 3.0)
    expected[expected > 4] = 255
    expected[expected < 255] = 0
    assert np.array_equal(scribble, expected) and 0 < np.count_nonzero(scribble) < scribble.size


# --------------------------------------------------------------------------- line art


@pytest.fixture(scope="module")
def lineart(aux, tmp_path_factory):
    models = tmp_path_factory.mktemp("lineart_models")
    nets = []
    for seed, name in ((2, "sk_model.pth"), (3, "sk_model2.pth")):
        net = aux.lineart.Generator(3, 1, 3)
        _he_init_(net, seed=seed)
        with torch.no_grad():
            net.model4[1].weight.mul_(0.3)  # keep the sigmoid off its rails: many grey levels
        _save(net.state_dict(), models, name)
        nets.append(net.eval())
    return SimpleNamespace(models=models, detector=aux.lineart.LineartDetector(*nets))


@pytest.mark.parametrize("module, coarse", [("lineart_realistic", False), ("lineart", False), ("lineart_coarse", True)])
def test_lineart_maps_match_reference(lineart, tmp_path, module, coarse):
    for h, w in ((128, 128), (90, 140)):
        image = _photo(h, w, seed=w)
        ours = _huabi_map(tmp_path, lineart.models, module, image)

        def reference(padded):
            side = min(padded.shape[:2])
            # controlnet_aux inverts as sd-webui-controlnet does (255 - drawing): white lines on black.
            return _grey(lineart.detector(padded, coarse=coarse, detect_resolution=side, image_resolution=side,
                                          output_type="np"))

        theirs = _a1111_order(reference, image)
        assert np.array_equal(ours, theirs), f"{module} {h}x{w}: {np.count_nonzero(ours != theirs)} pixels differ"
        assert len(np.unique(ours)) > 30


def test_realistic_and_coarse_read_their_own_files(lineart, tmp_path):
    image = _photo(64, 64)
    assert not np.array_equal(_huabi_map(tmp_path, lineart.models, "lineart_realistic", image),
                              _huabi_map(tmp_path, lineart.models, "lineart_coarse", image))


@pytest.fixture(scope="module")
def anime(aux, tmp_path_factory):
    import functools

    models = tmp_path_factory.mktemp("anime_models")
    norm = functools.partial(torch.nn.InstanceNorm2d, affine=False, track_running_stats=False)
    net = aux.lineart_anime.UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False)
    _he_init_(net, seed=4)
    # Half precision on disk halves the 200 MB file; the reference gets the same rounded weights.
    state = {key: value.half() for key, value in net.state_dict().items()}
    net.load_state_dict({key: value.float() for key, value in state.items()})
    # sd-webui-controlnet strips the "module." that nn.DataParallel training left in netG.pth's names.
    _save(state, models, "netG.pth", prefix="module.")
    return SimpleNamespace(models=models, net=net.eval(), detector=aux.lineart_anime.LineartAnimeDetector(net.eval()))


def test_lineart_anime_network_matches_reference(anime):
    from huabi.models.annotators.lines import LINEART_ANIME_FILE, load_lineart_anime

    ours = load_lineart_anime({LINEART_ANIME_FILE: anime.models / "annotators" / LINEART_ANIME_FILE}, torch.device("cpu"))
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(image), anime.net(image), rtol=1e-5, atol=1e-5)


def test_lineart_anime_maps_match_reference(anime, tmp_path):
    for h, w in ((128, 192), (100, 70)):
        image = _photo(h, w, seed=3)
        ours = _huabi_map(tmp_path, anime.models, "lineart_anime", image)

        def reference(padded):
            side = min(padded.shape[:2])
            return _grey(anime.detector(padded, detect_resolution=side, image_resolution=side, output_type="np"))

        theirs = _a1111_order(reference, image)
        assert np.array_equal(ours, theirs), f"{h}x{w}: {np.count_nonzero(ours != theirs)} pixels differ"
        assert len(np.unique(ours)) > 20


@pytest.mark.parametrize("h, w", [(128, 192), (100, 150)])
def test_lineart_standard_matches_reference(aux, h, w):
    image = 255 - _photo(h, w, seed=9) // 2  # a light page with darker strokes
    ours = run_preprocessor("lineart_standard (from white bg & black line)", image, processor_res=min(h, w))
    ours = np.round(ours[..., 0] * 255).astype(np.uint8)

    def reference(padded):
        return _grey(aux.lineart_standard.LineartStandardDetector()(padded, detect_resolution=min(padded.shape[:2]),
                                                                     output_type="np"))

    assert np.array_equal(ours, _a1111_order(reference, image))
    assert len(np.unique(ours)) > 20
    blank = run_preprocessor("lineart_standard", np.full((64, 64, 3), 250, np.uint8), processor_res=64)
    assert not blank.any()  # a clean page: no lines (and no NaN from an empty median)


# --------------------------------------------------------------------------- M-LSD


@pytest.fixture(scope="module")
def mlsd(aux, tmp_path_factory):
    models = tmp_path_factory.mktemp("mlsd_models")
    net = aux.mlsd_models_mbv2_mlsd_large.MobileV2_MLSD_Large()
    _he_init_(net, seed=6)
    _save(net.state_dict(), models, "mlsd_large_512_fp32.pth")
    return SimpleNamespace(models=models, net=net.eval(), detector=aux.mlsd.MLSDdetector(net.eval()), utils=aux.mlsd_utils)


def test_mlsd_network_and_decoding_match_reference(mlsd):
    from huabi.models.annotators.mlsd import MLSD_FILE, decode_lines, load_mlsd, network_input

    ours = load_mlsd({MLSD_FILE: mlsd.models / "annotators" / MLSD_FILE}, torch.device("cpu"))
    image = _photo(128, 192)
    with torch.no_grad():
        output = ours(network_input(image))
        torch.testing.assert_close(output, mlsd.net(network_input(image)), rtol=1e-5, atol=1e-5)
        expected = mlsd.utils.pred_lines(image, mlsd.net, [128, 192], 0.1, 2.0)
        segments = decode_lines(output, 0.1, 2.0) * 2.0
    assert len(segments) > 10
    np.testing.assert_allclose(segments, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("a, b", [(None, None), (0.3, 5.0), (1.5, 0.1)])
def test_mlsd_maps_match_reference(mlsd, tmp_path, a, b):
    thr_v, thr_d = (0.1 if a is None else a), (0.1 if b is None else b)
    for h, w in ((128, 192), (100, 150)):
        image = _photo(h, w, seed=11)
        ours = _huabi_map(tmp_path, mlsd.models, "mlsd", image, threshold_a=a, threshold_b=b)

        def reference(padded):
            side = min(padded.shape[:2])
            return _grey(mlsd.detector(padded, thr_v=thr_v, thr_d=thr_d, detect_resolution=side, image_resolution=side,
                                       output_type="np"))

        theirs = _a1111_order(reference, image)
        assert np.array_equal(ours, theirs), f"{h}x{w} a={a} b={b}: {np.count_nonzero(ours != theirs)} pixels differ"
        assert set(np.unique(ours)) <= {0, 255}
        if a != 1.5:
            assert np.count_nonzero(ours) > 100
        else:
            assert not ours.any()  # no sigmoid score passes 1.5: a black map, as A1111 gives


def test_mlsd_thresholds_are_checked():
    spec = module_spec("mlsd")
    assert spec.check_thresholds(None, None) == (0.1, 0.1)
    with pytest.raises(HuabiError, match=r"MLSD Value Threshold.*0\.01 to 2"):
        spec.check_thresholds(2.5, None)
    with pytest.raises(HuabiError, match=r"MLSD Distance Threshold.*0\.01 to 20"):
        spec.check_thresholds(None, 25)


# --------------------------------------------------------------------------- PiDiNet


@pytest.fixture(scope="module")
def pidinet(aux, tmp_path_factory):
    models = tmp_path_factory.mktemp("pidinet_models")
    torch.manual_seed(7)
    net = aux.pidi_model.pidinet()
    _he_init_(net, seed=8)
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if name == "init_block.weight" or (name.startswith("block") and ".conv1." in name):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)  # the custom convs
        net.classifier.weight.mul_(0.3)
    # The released file nests the names in {"state_dict": {"module.<name>": ...}} (a DataParallel run).
    path = models / "annotators" / "table5_pidinet.pth"
    path.parent.mkdir(parents=True)
    torch.save({"epoch": 14, "state_dict": {f"module.{k}": v.clone() for k, v in net.state_dict().items()}}, path)
    return SimpleNamespace(models=models, net=net.eval(), detector=aux.pidi.PidiNetDetector(net.eval()))


def test_pidinet_network_matches_reference(pidinet):
    from huabi.models.annotators.pidinet import PIDINET_FILE, load_pidinet

    ours = load_pidinet({PIDINET_FILE: pidinet.models / "annotators" / PIDINET_FILE}, torch.device("cpu"))
    image = torch.rand(1, 3, 64, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for mine, theirs in zip(ours(image), pidinet.net(image), strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("module, safe", [("softedge_pidinet", False), ("pidinet", False), ("softedge_pidisafe", True)])
def test_pidinet_maps_match_reference(pidinet, tmp_path, module, safe):
    for h, w in ((128, 192), (100, 150)):
        image = _photo(h, w, seed=h + 1)
        ours = _huabi_map(tmp_path, pidinet.models, module, image)

        def reference(padded):
            side = min(padded.shape[:2])
            return _grey(pidinet.detector(padded, detect_resolution=side, image_resolution=side, safe=safe,
                                          output_type="np"))

        theirs = _a1111_order(reference, image)
        assert np.array_equal(ours, theirs), f"{module} {h}x{w}: {np.count_nonzero(ours != theirs)} pixels differ"
        levels = np.unique(ours)
        assert (len(levels) <= 3) if safe else (len(levels) > 50)


def test_t2ia_sketch_pidi_matches_reference_filter(pidinet, tmp_path):
    image = _photo(100, 150, seed=7)
    ours = _huabi_map(tmp_path, pidinet.models, "pidinet_sketch", image)

    def reference(padded):
        side = min(padded.shape[:2])
        return _grey(pidinet.detector(padded, detect_resolution=side, image_resolution=side, apply_filter=True,
                                      output_type="np"))

    assert np.array_equal(ours, _a1111_order(reference, image))
    assert set(np.unique(ours)) == {0, 255}


def test_scribble_pidinet_matches_reference_nms(pidinet, aux, tmp_path):
    import cv2

    image = _photo(100, 150, seed=6)
    soft = _huabi_map(tmp_path, pidinet.models, "softedge_pidinet", image)
    scribble = _huabi_map(tmp_path, pidinet.models, "scribble_pidinet", image)
    expected = cv2.GaussianBlur(aux.util.nms(soft, 127, 3.0), (0, 0), 3.0)
    expected[expected > 4] = 255
    expected[expected < 255] = 0
    assert np.array_equal(scribble, expected) and 0 < np.count_nonzero(scribble) < scribble.size


# --------------------------------------------------------------------------- the CLI and bad files


def test_preprocess_command_runs_a_network_module(hed, tmp_path, capsys):
    image = _photo(70, 90)
    out = tmp_path / "edges.png"
    code = main(["preprocess", _save_png(tmp_path, image), "--module", "hed", "--res", "70", "--out", str(out),
                 "--models-dir", str(hed.models)])
    assert code == 0, capsys.readouterr().err
    written = np.asarray(Image.open(out))
    assert written.shape == (70, 90, 3)
    assert np.array_equal(written[..., 0], _huabi_map(tmp_path, hed.models, "softedge_hed", image))


@pytest.mark.parametrize("module, file_name", [
    ("softedge_hed", "ControlNetHED.pth"), ("lineart_realistic", "sk_model.pth"), ("lineart_coarse", "sk_model2.pth"),
    ("lineart_anime", "netG.pth"), ("mlsd", "mlsd_large_512_fp32.pth"), ("softedge_pidinet", "table5_pidinet.pth"),
])
def test_missing_file_is_one_line_naming_it(tmp_path, capsys, module, file_name):
    out = tmp_path / "map.png"
    code = main(["preprocess", _save_png(tmp_path, _photo(64, 64)), "--module", module, "--out", str(out),
                 "--models-dir", str(tmp_path / "models")])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_ERROR and not out.exists()
    assert "\n" not in err and file_name in err and str(tmp_path / "models" / "annotators" / file_name) in err


def test_wrong_file_is_one_line_naming_keys(hed, tmp_path, capsys):
    models = tmp_path / "models"
    # The HED weights saved under the line-art file's name.
    (models / "annotators").mkdir(parents=True)
    (models / "annotators" / "sk_model.pth").write_bytes((hed.models / "annotators" / "ControlNetHED.pth").read_bytes())
    code = main(["preprocess", _save_png(tmp_path, _photo(64, 64)), "--module", "lineart", "--out",
                 str(tmp_path / "map.png"), "--models-dir", str(models)])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_ERROR and "\n" not in err
    assert "sk_model.pth" in err and "lineart_realistic" in err and "model0.1.weight" in err and "block1.convs.0.weight" in err


def test_wrong_shapes_refused_before_anything_loads(tmp_path):
    from huabi.models.annotators.lines import LineartGenerator, load_exact_state_dict

    net = LineartGenerator()
    before = {key: value.clone() for key, value in net.state_dict().items()}
    state = {key: torch.ones_like(value) for key, value in before.items()}
    state["model4.1.weight"] = torch.ones(3, 64, 7, 7)  # last in the file: everything before it would load first
    with pytest.raises(HuabiError, match=r"sk_model\.pth: .*model4\.1\.weight has shape \(3, 64, 7, 7\), expected \(1, 64, 7, 7\)"):
        load_exact_state_dict(net, state, tmp_path / "sk_model.pth", module="lineart_realistic")
    assert all(torch.equal(value, before[key]) for key, value in net.state_dict().items())


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "ran"
    models = tmp_path / "models"
    (models / "annotators").mkdir(parents=True)
    torch.save({"norm": torch.zeros(1, 3, 1, 1), "payload": RunsCode(marker)}, models / "annotators" / "ControlNetHED.pth")
    code = main(["preprocess", _save_png(tmp_path, _photo(64, 64)), "--module", "softedge_hed", "--out",
                 str(tmp_path / "map.png"), "--models-dir", str(models)])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_ERROR and "\n" not in err and "ControlNetHED.pth" in err
    assert not marker.exists()
