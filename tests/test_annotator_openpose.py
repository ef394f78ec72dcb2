"""OpenPose annotators against controlnet_aux 0.0.10's open_pose code (the lllyasviel annotator A1111 runs).

The reference comes from the wheel ``setup.sh --dev`` downloads into ``<venv>/huabi-reference``
(never installed: it pulls torchvision). Its ``model.py``/``util.py``/``body.py`` import cleanly and
are loaded as files; ``hand.py``, ``face.py`` and ``__init__.py`` import skimage, torchvision and
huggingface_hub at the top, so their classes (``Hand``, ``FaceNet``/``Face``, ``OpenposeDetector``,
``draw_poses``) are compiled from the wheel's source into a namespace holding only what those
classes use.  Two stand-ins, for packages the venv lacks: skimage's ``label(connectivity=2)`` is
scipy's ``label`` with a full 3x3 structure (the same 8-connected components), and matplotlib's
``hsv_to_rgb`` (hand bone colours) is the standard library's ``colorsys`` one; the real packages
are used when installed.

Networks: the same random weights, written with the real files' key names, go into both, outputs
compared in float32 (1e-5 of the output's scale).  Post-processing: random weights give no people,
so a scripted network returns rendered heatmaps/affinity fields of known people; both pipelines
run on them and the final maps must be identical bytes.
"""

from __future__ import annotations

import re

import ast
import colorsys
import glob
import importlib
import importlib.util
import logging
import math
import os
import pickle
import subprocess
import sys
import types
import warnings
import zipfile
from pathlib import Path
from typing import List, NamedTuple, Tuple, Union

import numpy as np
import pytest
import torch
from PIL import Image

from huabi.errors import HuabiError
from huabi.models.annotators import openpose as op

WHEEL_GLOB = "controlnet_aux-0.0.10-*.whl"
PACKAGE = "controlnet_aux/open_pose/"


def _wheel() -> str | None:
    candidates = [os.environ.get("HUABI_CONTROLNET_AUX_WHEEL", "")]
    candidates += sorted(glob.glob(str(Path(sys.prefix) / "huabi-reference" / WHEEL_GLOB)))
    return next((c for c in candidates if c and os.path.isfile(c) and zipfile.is_zipfile(c)), None)


def _compile_definitions(source: str, names: set[str], filename: str):
    """Only the named top-level classes, functions and assignments of a module's source."""
    tree = ast.parse(source)
    keep = [node for node in tree.body
            if (isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in names)
            or (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in names for t in node.targets))]
    assert {getattr(n, "name", None) or n.targets[0].id for n in keep} == names, filename
    return compile(ast.Module(body=keep, type_ignores=[]), filename, "exec")


def _label_8_connected(binary, return_num=True, connectivity=2):
    from scipy.ndimage import label

    assert return_num and connectivity == binary.ndim == 2
    return label(binary, structure=np.ones((3, 3), dtype=int))


def load_reference(wheel: str, folder: Path) -> types.SimpleNamespace:
    """The reference modules: ``body``, ``util``, ``model`` and Hand/FaceNet/Face/OpenposeDetector/draw_poses."""
    folder.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as archive:
        sources = {name: archive.read(PACKAGE + name).decode() for name in
                   ("model.py", "util.py", "body.py", "hand.py", "face.py", "__init__.py")}
    for name in ("model.py", "util.py", "body.py"):
        (folder / name).write_text(sources[name])
    (folder / "__init__.py").write_text("")
    spec = importlib.util.spec_from_file_location(folder.name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[folder.name] = package
    spec.loader.exec_module(package)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # body.py: scipy.ndimage.filters
        util = importlib.import_module(f"{folder.name}.util")  # first, as the package does (util <-> body)
        body = importlib.import_module(f"{folder.name}.body")
    model = importlib.import_module(f"{folder.name}.model")
    from scipy.ndimage import gaussian_filter
    import cv2
    import torch.nn.functional as F
    from torch.nn import Conv2d, MaxPool2d, Module, ReLU, init

    try:
        from skimage.measure import label
    except ImportError:
        label = _label_8_connected
    ns = dict(cv2=cv2, np=np, torch=torch, F=F, gaussian_filter=gaussian_filter, label=label, util=util,
              handpose_model=model.handpose_model, Conv2d=Conv2d, MaxPool2d=MaxPool2d, Module=Module, ReLU=ReLU,
              init=init, logging=logging, List=List, NamedTuple=NamedTuple, Tuple=Tuple, Union=Union,
              Body=body.Body, BodyResult=body.BodyResult, Keypoint=body.Keypoint)
    exec(_compile_definitions(sources["hand.py"], {"Hand"}, "hand.py"), ns)
    exec(_compile_definitions(sources["face.py"], {"FaceNet", "params", "Face"}, "face.py"), ns)
    exec(_compile_definitions(sources["__init__.py"], {"HandResult", "FaceResult", "PoseResult", "draw_poses",
                                                        "OpenposeDetector"}, "__init__.py"), ns)
    return types.SimpleNamespace(body=body, util=util, model=model, **{k: ns[k] for k in
                                 ("Hand", "FaceNet", "Face", "OpenposeDetector", "draw_poses")})


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    wheel = _wheel()
    if wheel is None:
        pytest.skip("controlnet_aux wheel not found (bash setup.sh --dev downloads it; "
                    "or set HUABI_CONTROLNET_AUX_WHEEL)")
    folder = tmp_path_factory.mktemp("controlnet_aux") / "reference_open_pose"
    yield load_reference(wheel, folder)
    for key in [k for k in sys.modules if k == folder.name or k.startswith(folder.name + ".")]:
        sys.modules.pop(key)


@pytest.fixture
def hsv_colours(monkeypatch):
    """matplotlib.colors.hsv_to_rgb for the reference's hand drawing (colorsys when matplotlib is absent)."""
    if importlib.util.find_spec("matplotlib") is None:
        colors = types.SimpleNamespace(hsv_to_rgb=lambda hsv: np.array(colorsys.hsv_to_rgb(*hsv)))
        monkeypatch.setitem(sys.modules, "matplotlib", types.SimpleNamespace(colors=colors))


# --------------------------------------------------------------------------- weights in the files' layout


def _file_state_dict(reference_net: torch.nn.Module, *, strip_block: bool) -> dict[str, torch.Tensor]:
    """The reference model's random weights under the released file's key names.

    body_pose_model.pth / hand_pose_model.pth store ``conv1_1.weight`` where the
    reference model has ``model0.conv1_1.weight`` (its loader strips the block name);
    facenet.pth stores the FaceNet's own keys.
    """
    state = reference_net.state_dict()
    if strip_block:
        return {key.split(".", 1)[1]: value.clone() for key, value in state.items()}
    return {key: value.clone() for key, value in state.items()}


def _randomise(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            # Scaled so activations keep their size through ~30 layers (He-style fan-in scaling).
            fan_in = param[0].numel() if param.ndim > 1 else 1
            std = math.sqrt(2.0 / fan_in) if param.ndim > 1 else 0.05
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return net.eval()


@pytest.fixture(scope="module")
def weight_files(ref, tmp_path_factory):
    """Random weights of the three networks saved as .pth files with the real key names."""
    folder = tmp_path_factory.mktemp("weights")
    files = {}
    for file_name, net, strip, seed in ((op.BODY_FILE, ref.model.bodypose_model(), True, 1),
                                        (op.HAND_FILE, ref.model.handpose_model(), True, 2),
                                        (op.FACE_FILE, ref.FaceNet(), False, 3)):
        path = folder / file_name
        torch.save(_file_state_dict(_randomise(net, seed), strip_block=strip), path)
        files[file_name] = path
    return files


def test_state_dict_keys_and_shapes_are_the_released_files(ref):
    with torch.device("meta"):  # names and shapes only
        nets = ((op.BodyPoseNet(), ref.model.bodypose_model(), True),
                (op.CascadeHeatmapNet(op.HAND_HEATMAPS), ref.model.handpose_model(), True),
                (op.CascadeHeatmapNet(op.FACE_HEATMAPS), ref.FaceNet(), False))
    for ours, theirs, strip in nets:
        expected = {k: tuple(v.shape) for k, v in _file_state_dict(theirs, strip_block=strip).items()}
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected


@pytest.mark.parametrize("which", ["body", "hand", "face"])
def test_networks_match_the_reference_on_the_same_weights(ref, weight_files, which):
    torch.manual_seed(0)
    x = torch.rand(1, 3, 72, 56) - 0.5
    if which == "body":
        ours = op.load_strict(op.BodyPoseNet(), weight_files[op.BODY_FILE], what="body")
        theirs = ref.body.Body(str(weight_files[op.BODY_FILE])).model
        with torch.no_grad():
            expected, got = theirs(x), ours(x)
    elif which == "hand":
        ours = op.load_strict(op.CascadeHeatmapNet(op.HAND_HEATMAPS), weight_files[op.HAND_FILE], what="hand")
        theirs = ref.Hand(str(weight_files[op.HAND_FILE])).model
        with torch.no_grad():
            expected, got = (theirs(x),), (ours(x),)
    else:
        ours = op.load_strict(op.CascadeHeatmapNet(op.FACE_HEATMAPS), weight_files[op.FACE_FILE], what="face")
        theirs = ref.Face(str(weight_files[op.FACE_FILE])).model
        with torch.no_grad():
            expected, got = (theirs(x)[-1],), (ours(x),)
    for e, g in zip(expected, got):
        assert g.shape == e.shape
        scale = float(e.abs().max())
        assert scale > 1e-3  # the random weights give a non-trivial output
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5 * scale)


# --------------------------------------------------------------------------- post-processing on scripted maps

# Two people in normalised image coordinates (COCO order); the second lacks its left arm and right ear.
PEOPLE = (
    [(0.30, 0.18), (0.30, 0.30), (0.22, 0.30), (0.18, 0.45), (0.16, 0.58), (0.38, 0.30), (0.42, 0.45),
     (0.44, 0.58), (0.25, 0.58), (0.25, 0.75), (0.25, 0.92), (0.35, 0.58), (0.35, 0.75), (0.35, 0.92),
     (0.28, 0.16), (0.32, 0.16), (0.26, 0.18), (0.34, 0.18)],
    [(0.72, 0.22), (0.72, 0.34), (0.64, 0.34), (0.60, 0.48), (0.57, 0.62), (0.80, 0.34), None,
     None, (0.67, 0.62), (0.67, 0.78), (0.66, 0.93), (0.77, 0.62), (0.78, 0.78), (0.79, 0.93),
     (0.70, 0.20), (0.74, 0.20), None, (0.76, 0.22)],
)


def _blob(h: int, w: int, cx: float, cy: float, sigma: float) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    return np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma ** 2))


class ScriptedBody(torch.nn.Module):
    """Stands in for the trained body net: heatmaps and affinity fields of PEOPLE at the input's size."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # both pipelines ask the net for its device

    def forward(self, x):
        h, w = x.shape[2] // 8, x.shape[3] // 8
        heat = np.zeros((op.BODY_HEATMAPS, h, w), dtype=np.float32)
        paf = np.zeros((op.PAF_CHANNELS, h, w), dtype=np.float32)
        ys, xs = np.mgrid[0:h, 0:w]
        for person in PEOPLE:
            cells = [None if p is None else (p[0] * w, p[1] * h) for p in person]
            for part, cell in enumerate(cells):
                if cell is not None:
                    heat[part] = np.maximum(heat[part], 0.9 * _blob(h, w, cell[0], cell[1], 1.0))
            for (a, b), (cx, cy) in zip(op.LIMBS, op.LIMB_PAF_CHANNELS):
                if cells[a] is None or cells[b] is None:
                    continue
                (xa, ya), (xb, yb) = cells[a], cells[b]
                length = math.hypot(xb - xa, yb - ya)
                ux, uy = (xb - xa) / length, (yb - ya) / length
                along = (xs - xa) * ux + (ys - ya) * uy
                across = np.abs((xs - xa) * uy - (ys - ya) * ux)
                on_limb = (along >= -1) & (along <= length + 1) & (across <= 1.0)
                paf[cx][on_limb], paf[cy][on_limb] = ux, uy
        heat[op.BODY_HEATMAPS - 1] = 1 - heat[:-1].max(axis=0)
        return torch.from_numpy(paf)[None], torch.from_numpy(heat)[None]


class ScriptedHeatmaps(torch.nn.Module):
    """Stands in for the hand/face net: one blob per keypoint on a ring, at the input's size."""

    def __init__(self, channels: int, *, as_list: bool = False):
        super().__init__()
        self.channels, self.as_list = channels, as_list
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        h, w = x.shape[2] // 8, x.shape[3] // 8
        maps = np.zeros((self.channels, h, w), dtype=np.float32)
        for part in range(self.channels - 1):
            angle = 2 * math.pi * part / (self.channels - 1)
            cx, cy = w * (0.5 + 0.3 * math.cos(angle)), h * (0.5 + 0.3 * math.sin(angle))
            maps[part] = 0.8 * _blob(h, w, cx, cy, max(1.0, w / 40))
        maps[-1] = 0.5  # background channel
        out = torch.from_numpy(maps)[None]
        return [out] if self.as_list else out


def _reference_detector(ref):
    body = ref.body.Body.__new__(ref.body.Body)
    body.model = ScriptedBody()
    hand = ref.Hand.__new__(ref.Hand)
    hand.model = ScriptedHeatmaps(op.HAND_HEATMAPS)
    face = ref.Face.__new__(ref.Face)
    face.model = ScriptedHeatmaps(op.FACE_HEATMAPS, as_list=True)
    return ref.OpenposeDetector(body, hand, face)


def _scripted_nets():
    return op.OpenPoseNets(body=ScriptedBody(), hand=ScriptedHeatmaps(op.HAND_HEATMAPS),
                           face=ScriptedHeatmaps(op.FACE_HEATMAPS))


def _photo(height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(5)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("size", [(512, 512), (448, 360)])
def test_people_found_and_grouped_as_the_reference_does(ref, size):
    image = op.pad_to_64(_photo(*size))
    h, w = image.shape[:2]
    expected = _reference_detector(ref).detect_poses(image, include_hand=False, include_face=False)
    got = op.detect_people(_scripted_nets(), image, hands=False, face=False)
    assert len(got) == len(expected) == 2
    for ours, theirs in zip(got, expected):
        truth = min(PEOPLE, key=lambda person: abs(person[1][0] - ours.body[1][0]))  # the one with this neck
        assert ours.score == pytest.approx(float(theirs.body.total_score), rel=1e-12)
        assert ours.parts == int(theirs.body.total_parts) == sum(p is not None for p in truth)
        for point, keypoint, true_point in zip(ours.body, theirs.body.keypoints, truth):
            assert (point is None) == (keypoint is None) == (true_point is None)
            if point is not None:
                assert point == (keypoint.x, keypoint.y)
                # And the detector really found the rendered keypoint (within a cell of the 184 px run).
                assert abs(point[0] - true_point[0]) < 8 * 3 / 184 and abs(point[1] - true_point[1]) < 8 * 3 / 184


@pytest.mark.parametrize("module, flags", [
    ("openpose", dict(draw_body=True, include_hand=False, include_face=False)),
    ("openpose_hand", dict(draw_body=True, include_hand=True, include_face=False)),
    ("openpose_face", dict(draw_body=True, include_hand=False, include_face=True)),
    ("openpose_faceonly", dict(draw_body=False, include_hand=False, include_face=True)),
    ("openpose_full", dict(draw_body=True, include_hand=True, include_face=True)),
])
def test_final_maps_equal_the_reference_bytes(ref, hsv_colours, module, flags):
    image = _photo(448, 360)  # not a multiple of 64: padded for detection, cropped back
    padded = op.pad_to_64(image)
    poses = _reference_detector(ref).detect_poses(padded, flags["include_hand"], flags["include_face"])
    expected = ref.draw_poses(poses, padded.shape[0], padded.shape[1], draw_body=flags["draw_body"],
                              draw_hand=flags["include_hand"], draw_face=flags["include_face"])[:448, :360]
    annotator = next(a for a in op.ANNOTATORS if a.module == module)
    got = annotator.detect(_scripted_nets(), image, None, None)
    assert got.dtype == np.float32 and got.shape == (448, 360, 3)
    got_uint8 = np.round(got * 255).astype(np.uint8)
    np.testing.assert_array_equal(got_uint8, expected)
    # Not an empty canvas: what each module draws is there.
    colours = {tuple(int(v) for v in c) for c in got_uint8.reshape(-1, 3)}
    assert ((255, 0, 0) in colours) == flags["draw_body"]  # the nose's colour
    assert ((255, 255, 255) in colours) == flags["include_face"]  # face points
    if not flags["draw_body"]:
        assert colours == {(0, 0, 0), (255, 255, 255)}
    body_only = ref.draw_poses(poses, padded.shape[0], padded.shape[1], draw_hand=False, draw_face=False)[:448, :360]
    extra = (got_uint8 != body_only).any(axis=-1)
    assert extra.sum() > (300 if flags["include_hand"] or flags["include_face"] else -1) and (
        extra.any() == (flags["include_hand"] or flags["include_face"] or not flags["draw_body"]))


def test_hand_and_face_boxes_match_the_reference(ref):
    for person in PEOPLE:
        pixels = [None if p is None else (p[0] * 360, p[1] * 448) for p in person]
        keypoints = [None if p is None else ref.body.Keypoint(p[0], p[1]) for p in pixels]
        body = ref.body.BodyResult(keypoints=keypoints, total_score=0.0, total_parts=0)
        blank = np.zeros((448, 360, 3), np.uint8)
        assert op.hand_boxes(pixels, 448, 360) == ref.util.handDetect(body, blank)
        assert op.face_box(pixels, 448, 360) == ref.util.faceDetect(body, blank)


# --------------------------------------------------------------------------- the public path, errors


def _install(weight_files, models: Path, names) -> None:
    folder = models / "annotators" / "openpose"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(weight_files[name].read_bytes())


def test_cli_runs_openpose_on_random_weights_like_the_reference(ref, weight_files, tmp_path):
    """The real body network (random weights, A1111's downloads/openpose layout) through ``huabi preprocess``.

    Random weights "find" a handful of people; both pipelines must draw the same ones.
    (openpose_full on these weights would run the hand network at four sizes for each of
    them, minutes of CPU: hands/face are compared on scripted maps above.)
    """
    models = tmp_path / "models"
    _install(weight_files, models, (op.BODY_FILE,))
    photo = tmp_path / "photo.png"
    Image.fromarray(_photo(96, 80)).save(photo)
    out = tmp_path / "pose.png"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(op.__file__).parents[3])] + sys.path),
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "huabi.cli.main", "preprocess", str(photo),
                           "--module", "openpose", "--res", "64", "--out", str(out), "--models-dir", str(models)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    got = np.asarray(Image.open(out).convert("RGB"))
    assert got.shape == (77, 64, 3)  # short side 64 (80 x 96 -> 64 x 77)
    from huabi.core.preprocess import resize_short_side

    padded = op.pad_to_64(resize_short_side(_photo(96, 80), 64))
    detector = ref.OpenposeDetector(ref.body.Body(str(weight_files[op.BODY_FILE])))
    poses = detector.detect_poses(padded)
    assert len(poses) >= 2
    expected = ref.draw_poses(poses, padded.shape[0], padded.shape[1], draw_hand=False, draw_face=False)[:77, :64]
    assert (expected > 0).any()
    np.testing.assert_array_equal(got, expected)


def test_full_module_loads_all_three_files(weight_files, tmp_path):
    """openpose_full through detect_map: body, hand and face files found and loaded strictly.

    The body file's last heatmap bias is pushed to -100 so nobody is found and the
    (slow, four-size) hand network is not run; the map is then black.
    """
    models = tmp_path / "models"
    _install(weight_files, models, (op.HAND_FILE, op.FACE_FILE))
    body = torch.load(weight_files[op.BODY_FILE])
    body["Mconv7_stage6_L2.bias"] = torch.full_like(body["Mconv7_stage6_L2.bias"], -100.0)
    torch.save(body, models / "annotators" / "openpose" / op.BODY_FILE)
    detected = _detect(models, "openpose_full")
    assert detected.shape == (64, 64, 3) and detected.dtype == np.float32 and not detected.any()
    (models / "annotators" / "openpose" / op.FACE_FILE).write_bytes(weight_files[op.HAND_FILE].read_bytes())
    with pytest.raises(HuabiError, match="not an OpenPose face model"):
        _detect(models, "openpose_full")


def _detect(models: Path, module: str = "openpose"):
    from huabi.service.control import detect_map
    from huabi.core.control import ControlUnit

    return detect_map(ControlUnit(model="unused", image=None, module=module, processor_res=64),
                      fallback_image=Image.fromarray(_photo(64, 64)), models_dir=models)


def test_missing_hand_file_is_one_line_naming_it(weight_files, tmp_path):
    models = tmp_path / "models"
    _install(weight_files, models, (op.BODY_FILE,))
    with pytest.raises(HuabiError) as caught:
        _detect(models, "openpose_hand")
    message = str(caught.value)
    assert "\n" not in message and op.HAND_FILE in message and "openpose_hand" in message
    assert str(models / "annotators" / op.HAND_FILE) in message


def test_wrong_file_is_refused_before_loading_anything(weight_files, tmp_path):
    models = tmp_path / "models"
    folder = models / "annotators"
    folder.mkdir(parents=True)
    (folder / op.BODY_FILE).write_bytes(weight_files[op.HAND_FILE].read_bytes())  # the hand model, misnamed
    with pytest.raises(HuabiError) as caught:
        _detect(models)
    message = str(caught.value)
    assert "\n" not in message and op.BODY_FILE in message and "not an OpenPose body model" in message
    assert re.search(r"missing \d+ keys, e\.g\. .*; unexpected \d+ keys, e\.g\. ", message), message

    hand = torch.load(weight_files[op.HAND_FILE])
    hand["conv6_2_CPM.weight"] = hand["conv6_2_CPM.weight"][:21]  # right names, wrong shape
    torch.save(hand, folder / op.HAND_FILE)
    with pytest.raises(HuabiError, match=r"not an OpenPose hand model: conv6_2_CPM.weight has shape"):
        op.load_strict(op.CascadeHeatmapNet(op.HAND_HEATMAPS), folder / op.HAND_FILE, what="an OpenPose hand model")


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    models = tmp_path / "models"
    folder = models / "annotators"
    folder.mkdir(parents=True)
    marker = tmp_path / "ran"
    payload = _RunsCode()
    payload.marker = marker
    with open(folder / op.BODY_FILE, "wb") as handle:
        pickle.dump({"conv1_1.weight": payload}, handle, protocol=2)
    with pytest.raises(HuabiError) as caught:
        _detect(models)
    assert "\n" not in str(caught.value) and op.BODY_FILE in str(caught.value)
    assert not marker.exists()


# --------------------------------------------------------------------------- pose JSON (the pose editor's format)


def _pose_json(normalised: bool, height: int = 448, width: int = 360) -> dict:
    def flat(points, scale):
        return [v for p in points for v in ((0.0, 0.0, 0.0) if p is None else (p[0] * scale[0], p[1] * scale[1], 1.0))]

    scale = (1.0, 1.0) if normalised else (float(width), float(height))
    hand = [(0.2 + 0.01 * (i % 5), 0.6 + 0.01 * (i // 5)) for i in range(21)]
    hand[7] = None
    face = [(0.28 + 0.002 * i, 0.17 + 0.001 * i) for i in range(70)]
    people = [{"pose_keypoints_2d": flat(PEOPLE[0], scale), "hand_left_keypoints_2d": flat(hand, scale),
               "face_keypoints_2d": flat(face, scale)},
              {"pose_keypoints_2d": flat(PEOPLE[1], scale), "hand_right_keypoints_2d": None}]
    return {"people": people, "canvas_height": height, "canvas_width": width, "animals": []}


def _reference_json_map(ref, data: dict) -> np.ndarray:
    """The reference draw_poses on keypoints decoded as sd-webui-controlnet does (confidence 0 = absent)."""
    Keypoint = ref.body.Keypoint

    def decode(values):
        if not values:
            return None
        return [None if c < 1.0 else Keypoint(x, y) for x, y, c in zip(values[0::3], values[1::3], values[2::3])]

    poses = [types.SimpleNamespace(body=types.SimpleNamespace(keypoints=decode(p.get("pose_keypoints_2d"))),
                                   left_hand=decode(p.get("hand_left_keypoints_2d")),
                                   right_hand=decode(p.get("hand_right_keypoints_2d")),
                                   face=decode(p.get("face_keypoints_2d"))) for p in data["people"]]
    for pose in poses:  # the reference's hand/face drawing expects every point present: -1 = not drawn
        for name in ("left_hand", "right_hand", "face"):
            points = getattr(pose, name)
            if points:
                setattr(pose, name, [Keypoint(-1.0, -1.0) if p is None else p for p in points])
    return ref.draw_poses(poses, data["canvas_height"], data["canvas_width"])


def test_pose_json_draws_like_the_reference(ref, hsv_colours):
    data = _pose_json(normalised=True)
    expected = _reference_json_map(ref, data)
    np.testing.assert_array_equal(op.pose_map_from_json(data), expected)
    assert (expected > 0).any(axis=-1).sum() > 1000
    # Pixel coordinates (OpenPose's own output) draw the same skeleton, within a pixel of rounding.
    pixels = op.pose_map_from_json(_pose_json(normalised=False))
    assert (pixels != expected).any(axis=-1).mean() < 0.01


def test_pose_json_through_preprocess_and_its_errors(ref, hsv_colours, tmp_path, capsys):
    import json

    from huabi.cli.main import main

    pose = tmp_path / "pose.json"
    pose.write_text(json.dumps(_pose_json(normalised=True)))
    out = tmp_path / "map.png"
    assert main(["preprocess", str(pose), "--module", "none", "--out", str(out)]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")),
                                  _reference_json_map(ref, _pose_json(normalised=True)))
    bad = {"not json {": "not a pose JSON", json.dumps([1, 2]): "expected an object",
           json.dumps({"canvas_width": 0, "canvas_height": 5, "people": []}): "canvas_width must be",
           json.dumps({"canvas_width": 64, "canvas_height": 64, "people": [{"pose_keypoints_2d": [1, 2]}]}):
               "multiple of 3",
           json.dumps({"canvas_width": 64, "canvas_height": 64, "people": [{"pose_keypoints_2d": [1, 2, 1]}]}):
               "expected 18 points"}
    for index, (text, words) in enumerate(bad.items()):
        broken = tmp_path / f"broken{index}.json"
        broken.write_text(text)
        capsys.readouterr()
        assert main(["preprocess", str(broken), "--module", "none", "--out", str(tmp_path / f"x{index}.png")]) != 0
        err = capsys.readouterr().err
        assert words in err and str(broken) in err and err.count("\n") == 1, err
        assert not (tmp_path / f"x{index}.png").exists()
