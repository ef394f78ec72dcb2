"""Anime face segmentation (``seg_anime_face``, huabi.models.annotators.anime_face) on random weights.

No importable reference: controlnet_aux 0.0.10 has no anime-face code and
sd-webui-controlnet's ``UNet`` builds on torchvision's MobileNetV2 (torchvision
cannot sit beside the pinned torch).  The network is checked against a
functional forward written here from the checkpoint's tensor names and
MobileNetV2's published layout (strides, depthwise convs, residuals), the map
against sd-webui-controlnet's steps re-expressed (pad to 64, short side 512 PIL
bicubic, [0, 1], per-pixel argmax over ``rearrange(seg, 'h w c -> w c h')``, its
palette).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from huabi.errors import HuabiError

from test_annotators_depth import _image  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
FILE = "UNet.pth"
# sd-webui-controlnet's colours by name, in its PALETTE order.
A1111_PALETTE = [(255, 255, 0), (0, 0, 255), (255, 0, 0), (255, 255, 255), (0, 255, 0), (0, 255, 255), (255, 0, 255)]
# MobileNetV2 (Sandler et al. 2018, table 2): the features[i] that start a stride-2 stage.
STRIDE_TWO = {0, 2, 4, 7, 14}
ENCODER = {0: (0, 1), 1: (2, 3), 2: (4, 5, 6), 3: tuple(range(7, 14)), 4: (14, 15, 16)}  # stage -> features[i]


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    from huabi.models.annotators.anime_face import AnimeFaceUNet

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in AnimeFaceUNet().state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100)
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=generator) + 0.5
        elif key.endswith("running_mean"):
            state[key] = torch.randn(value.shape, generator=generator) * 0.1
        elif value.ndim == 1 and key.endswith("weight"):
            state[key] = 1.0 + torch.randn(value.shape, generator=generator) * 0.1
        else:
            fan_in = value[0].numel() if value.ndim > 1 else 1
            state[key] = torch.randn(value.shape, generator=generator) * (2.0 / fan_in) ** 0.5
    return state


def _save(state: dict[str, torch.Tensor], folder: Path, name: str = FILE) -> Path:
    path = folder / "annotators" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def functional_unet(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    def bn(x, p):
        return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                            False, 0.0, 1e-5)

    def conv(x, p, stride=1):
        weight = sd[f"{p}.weight"]
        groups = x.shape[1] if weight.shape[1] == 1 and x.shape[1] > 1 else 1
        return F.conv2d(x, weight, sd.get(f"{p}.bias"), stride, weight.shape[-1] // 2, 1, groups)

    def conv_bn_relu6(x, p, stride=1):
        return torch.clamp(bn(conv(x, f"{p}.0", stride), f"{p}.1"), 0, 6)

    skips = []
    for stage, indices in ENCODER.items():
        for position, index in enumerate(indices):
            p = f"en_block{stage}.{position}"
            stride = 2 if index in STRIDE_TWO else 1
            if index == 0:
                x = conv_bn_relu6(x, p, stride)
                continue
            expands = f"{p}.conv.3.weight" in sd
            y = conv_bn_relu6(x, f"{p}.conv.0") if expands else x
            dw = f"{p}.conv.1" if expands else f"{p}.conv.0"
            y = conv_bn_relu6(y, dw, stride)
            last = 2 if expands else 1
            y = bn(conv(y, f"{p}.conv.{last}"), f"{p}.conv.{last + 1}")
            x = x + y if stride == 1 and x.shape == y.shape else y
        skips.append(x)
    x = skips.pop()
    for stage in (4, 3, 2, 1):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = F.leaky_relu(F.instance_norm(conv(x, f"de_block{stage}.1")), 0.1)
        skip = skips.pop()
        x = torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True), skip], dim=1)
    x = conv(F.interpolate(x, scale_factor=2, mode="nearest"), "de_block0.1")
    return torch.softmax(x, dim=1)


def test_key_layout_is_torchvision_mobilenet_under_en_blocks():
    keys = set(random_state())
    for key in ["en_block0.0.0.weight", "en_block0.0.1.running_var", "en_block0.1.conv.0.0.weight",
                "en_block0.1.conv.1.weight", "en_block0.1.conv.2.bias", "en_block1.0.conv.3.num_batches_tracked",
                "en_block3.6.conv.1.0.weight", "en_block4.2.conv.2.weight", "de_block4.1.weight", "de_block0.1.bias"]:
        assert key in keys, key
    assert not any(key.startswith("en_block4.3") or key.startswith("de_block1.2") for key in keys)
    state = random_state()
    assert tuple(state["en_block3.0.conv.1.0.weight"].shape) == (192, 1, 3, 3)  # depthwise, 32 * 6
    assert tuple(state["en_block4.2.conv.2.weight"].shape) == (160, 960, 1, 1)
    assert tuple(state["de_block0.1.weight"].shape) == (7, 32, 3, 3)


@pytest.mark.parametrize("size", [(64, 96), (70, 45)])
def test_network_equals_functional_forward(tmp_path, size):
    from huabi.models.annotators.anime_face import load_anime_face

    state = random_state(seed=1)
    net = load_anime_face(_save({f"module.{k}": v for k, v in state.items()}, tmp_path), torch.device("cpu"))
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ours = net.model(x)
        theirs = functional_unet(state, x)
    assert ours.shape == (1, 7, *(side + side % 2 for side in size))  # stride-2 stem, x2 at the end: even sides
    assert float(theirs.amax(dim=1).min()) < 0.9  # not saturated to one class
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def _a1111_map(state, image: np.ndarray) -> np.ndarray:
    """sd-webui-controlnet's __call__ steps on an already padded image: uint8 [h, w, 3] at the 512 scale."""
    from einops import rearrange
    from PIL import Image

    height, width = image.shape[:2]
    short, long = min(height, width), max(height, width)
    new_long = int(512 * long / short)
    size = (new_long, 512) if width >= height else (512, new_long)  # PIL (width, height)
    resized = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))
    x = torch.from_numpy(resized.transpose(2, 0, 1).copy()).float()[None] / 255.0
    with torch.inference_mode():
        seg = functional_unet(state, x)[0].numpy()
    rows = rearrange(seg, "h w c -> w c h")
    return np.array([[A1111_PALETTE[np.argmax(value)] for value in row] for row in rows]).astype(np.uint8)


def test_map_at_resolution_512_equals_sd_webui_controlnet(tmp_path):
    from PIL import Image

    from huabi.core.control import ControlUnit
    from huabi.service.control import detect_map

    state = random_state(seed=3)
    _save(state, tmp_path / "models")
    image = _image(512, 640, seed=4)  # already multiples of 64: no pad
    image_path = tmp_path / "in.png"
    Image.fromarray(image).save(image_path)
    unit = ControlUnit(model="x", image=str(image_path), module="seg_anime_face", processor_res=512)
    ours = detect_map(unit, models_dir=tmp_path / "models")
    expected = _a1111_map(state, image)
    assert ours.shape == (512, 640, 3) and ours.dtype == np.float32
    assert np.array_equal(np.round(ours * 255).astype(np.uint8), expected)
    assert len(np.unique(expected.reshape(-1, 3), axis=0)) >= 3  # several classes painted


def test_map_at_other_resolutions_is_resized_back_and_cropped(tmp_path):
    import cv2
    from PIL import Image

    from huabi.core.control import ControlUnit
    from huabi.service.control import detect_map

    state = random_state(seed=5)
    _save(state, tmp_path / "models")
    image = _image(96, 150, seed=6)
    image_path = tmp_path / "in.png"
    Image.fromarray(image).save(image_path)
    unit = ControlUnit(model="x", image=str(image_path), module="seg_anime_face", processor_res=96)
    ours = detect_map(unit, models_dir=tmp_path / "models")
    padded = np.pad(image, [[0, 128 - 96], [0, 192 - 150], [0, 0]], mode="edge")
    full = _a1111_map(state, padded)
    assert full.shape == (512, 768, 3)
    expected = cv2.resize(full, (192, 128), interpolation=cv2.INTER_NEAREST)[:96, :150]
    assert np.array_equal(np.round(ours * 255).astype(np.uint8), expected)


def test_missing_file_is_one_line_naming_it(tmp_path):
    from huabi.models.annotators import run_annotator

    with pytest.raises(HuabiError) as caught:
        run_annotator("seg_anime_face", _image(64, 64), threshold_a=None, threshold_b=None, models_dir=tmp_path)
    message = str(caught.value)
    assert "\n" not in message and FILE in message and str(tmp_path / "annotators") in message


def test_wrong_files_are_refused_with_keys_named(tmp_path):
    from huabi.models.annotators.anime_face import load_anime_face

    state = random_state()
    broken = dict(state)
    broken.pop("en_block2.1.conv.1.1.running_mean")
    broken["de_block5.1.weight"] = torch.zeros(1)
    wrong_shape = dict(state)
    wrong_shape["de_block3.1.weight"] = torch.zeros(32, 96, 3, 3)
    for index, (bad, expected) in enumerate([(broken, "en_block2.1.conv.1.1.running_mean"), (broken, "de_block5"),
                                             (wrong_shape, "de_block3.1.weight"),
                                             ({"pretrained.model.cls_token": torch.zeros(1)}, "en_block0.0.0.weight")]):
        path = tmp_path / f"case{index}.pth"
        torch.save(bad, path)
        with pytest.raises(HuabiError) as caught:
            load_anime_face(path, torch.device("cpu"))
        message = str(caught.value)
        assert "\n" not in message and path.name in message and expected in message, message


def test_code_carrying_pickle_is_refused(tmp_path):
    from huabi.models.annotators.anime_face import load_anime_face

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / FILE
    torch.save({"en_block0.0.0.weight": Payload()}, path)
    with pytest.raises(HuabiError) as caught:
        load_anime_face(path, torch.device("cpu"))
    assert "\n" not in str(caught.value)
    assert not marker.exists()


def test_module_is_registered_as_sd_webui_controlnet_names_it():
    from huabi.core.preprocess import module_spec
    from huabi.models.annotators import annotator_registry

    spec = module_spec("seg_anime_face")
    assert spec.is_network and spec.uses_res and spec.threshold_a is None and spec.threshold_b is None
    assert module_spec("anime_face_segment").name == "seg_anime_face"
    assert annotator_registry()["seg_anime_face"].weight_files == (FILE,)


def test_preprocess_cli_writes_the_map(tmp_path):
    from PIL import Image

    _save(random_state(seed=7), tmp_path / "models")
    image_path = tmp_path / "in.png"
    Image.fromarray(_image(64, 96)).save(image_path)
    out = tmp_path / "seg.png"
    result = subprocess.run(
        [sys.executable, "-m", "huabi.cli.main", "preprocess", str(image_path), "--module", "seg_anime_face",
         "--out", str(out), "--models-dir", str(tmp_path / "models"), "--res", "64"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    written = np.asarray(Image.open(out))
    assert written.shape == (64, 96, 3)
    colours = {tuple(c) for c in written.reshape(-1, 3)}
    assert colours <= set(A1111_PALETTE) and len(colours) >= 2
