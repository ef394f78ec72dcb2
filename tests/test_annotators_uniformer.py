"""ADE20K segmentation (``seg_ufade20k``, huabi.models.annotators.uniformer) on random weights.

No importable reference network: controlnet_aux 0.0.10 does not vendor the
uniformer/mmseg code (its wheel has no ``uniformer`` package; sd-webui-controlnet's
copy needs mmcv).  So, on the same random weights in the real key layout:

- the UperNet head against transformers' ``UperNetHead`` (an independent port of
  mmseg's decode head), keys renamed as transformers' converter does
  (``bn`` -> ``batch_norm``, ``conv_seg`` -> ``classifier``);
- the whole network against a functional forward written here from the tensor
  names and the UniFormer paper (explicit softmax attention, no nn.Module);
- the map against mmseg's ``inference_segmentor`` steps re-expressed (mmcv's
  keep-ratio rescale into 2048 x 512 with cv2 bilinear, ``to_rgb`` on the RGB image
  sd-webui-controlnet passes, ImageNet mean/std, logits resized to the input
  then to the original, argmax) and controlnet_aux's own ``ade_palette()`` read
  from its wheel.
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

from test_annotators_depth import _image, _wheel_module  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
FILE = "upernet_global_small.pth"
# A narrow UniFormer with the real names: attention stages need multiples of 64 channels (64 per head).
TINY = dict(embed_dims=(32, 48, 64, 128), depths=(1, 2, 2, 1), mlp_ratio=4, channels=32)
EPS_PATCH, EPS_BLOCK = 1e-5, 1e-6


def random_state(seed: int = 0, **config) -> dict[str, torch.Tensor]:
    from huabi.models.annotators.uniformer import UniformerConfig, UniformerUperNet

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in UniformerUperNet(UniformerConfig(**(config or TINY))).state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100)
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=generator) + 0.5
        elif key.endswith("running_mean"):
            state[key] = torch.randn(value.shape, generator=generator) * 0.1
        elif value.ndim == 1 and key.endswith("weight"):
            state[key] = 1.0 + torch.randn(value.shape, generator=generator) * 0.1
        elif value.ndim == 1:
            state[key] = torch.randn(value.shape, generator=generator) * 0.1
        else:
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=generator) * (2.0 / fan_in) ** 0.5
    return state


def mmseg_file(state: dict[str, torch.Tensor], seed: int = 9) -> dict:
    """The file as mmseg saves it: meta beside state_dict, the auxiliary FCN head's weights included."""
    generator = torch.Generator().manual_seed(seed)
    third = state["backbone.patch_embed3.proj.weight"].shape[0]
    auxiliary = {"auxiliary_head.conv_seg.weight": torch.randn(150, 16, 1, 1, generator=generator),
                 "auxiliary_head.conv_seg.bias": torch.zeros(150),
                 "auxiliary_head.convs.0.conv.weight": torch.randn(16, third, 3, 3, generator=generator),
                 "auxiliary_head.convs.0.bn.weight": torch.ones(16)}
    return {"meta": {"mmseg_version": "0.11.0", "epoch": 160, "CLASSES": ("wall", "building")},
            "state_dict": {**state, **auxiliary}}


def _save(content, folder: Path, name: str = FILE) -> Path:
    path = folder / "annotators" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(content, path)
    return path


# --------------------------------------------------------------------------- functional reference


def functional_backbone(sd: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    def channels_ln(x, p, eps):
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], sd[f"{p}.weight"], sd[f"{p}.bias"], eps).permute(0, 3, 1, 2)

    def bn(x, p):
        return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                            False, 0.0, 1e-5)

    def conv(x, p, stride=1, groups=1):
        weight = sd[f"{p}.weight"]
        return F.conv2d(x, weight, sd[f"{p}.bias"], stride, weight.shape[-1] // 2 if stride == 1 else 0, 1, groups)

    def linear(x, p):
        return x @ sd[f"{p}.weight"].T + sd[f"{p}.bias"]

    outputs = []
    for stage in range(1, 5):
        patch = 4 if stage == 1 else 2
        x = channels_ln(conv(x, f"backbone.patch_embed{stage}.proj", stride=patch), f"backbone.patch_embed{stage}.norm",
                        EPS_PATCH)
        dim = x.shape[1]
        index = 0
        while f"backbone.blocks{stage}.{index}.pos_embed.weight" in sd:
            p = f"backbone.blocks{stage}.{index}"
            x = x + conv(x, f"{p}.pos_embed", groups=dim)
            if stage <= 2:  # local: 1x1, depthwise 5x5, 1x1 on BN; conv MLP on BN
                x = x + conv(conv(conv(bn(x, f"{p}.norm1"), f"{p}.conv1"), f"{p}.attn", groups=dim), f"{p}.conv2")
                x = x + conv(F.gelu(conv(bn(x, f"{p}.norm2"), f"{p}.mlp.fc1")), f"{p}.mlp.fc2")
            else:  # global: multi-head self-attention over all H*W tokens, 64 channels a head
                n, c, h, w = x.shape
                t = x.flatten(2).transpose(1, 2)
                y = F.layer_norm(t, (c,), sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"], EPS_BLOCK)
                q, k, v = linear(y, f"{p}.attn.qkv").split(c, dim=-1)
                heads = c // 64
                q, k, v = (z.reshape(n, h * w, heads, 64).transpose(1, 2) for z in (q, k, v))
                weights = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1)
                t = t + linear((weights @ v).transpose(1, 2).reshape(n, h * w, c), f"{p}.attn.proj")
                y = F.layer_norm(t, (c,), sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"], EPS_BLOCK)
                t = t + linear(F.gelu(linear(y, f"{p}.mlp.fc1")), f"{p}.mlp.fc2")
                x = t.transpose(1, 2).reshape(n, c, h, w)
            index += 1
        outputs.append(channels_ln(x, f"backbone.norm{stage}", EPS_BLOCK))
    return outputs


def transformers_head(state: dict[str, torch.Tensor]):
    """transformers' UperNetHead loaded with the decode_head weights (its converter's renames)."""
    from types import SimpleNamespace

    upernet = pytest.importorskip("transformers.models.upernet.modeling_upernet")
    dims = [int(state[f"backbone.patch_embed{stage}.proj.weight"].shape[0]) for stage in range(1, 5)]
    classes, channels = state["decode_head.conv_seg.weight"].shape[:2]
    head = upernet.UperNetHead(SimpleNamespace(pool_scales=(1, 2, 3, 6), hidden_size=int(channels),
                                               num_labels=int(classes)), in_channels=dims)
    renamed = {key[len("decode_head."):].replace(".bn.", ".batch_norm.").replace("conv_seg", "classifier"): value
               for key, value in state.items() if key.startswith("decode_head.")}
    head.load_state_dict(renamed, strict=True)
    return head.eval()


def reference_logits(state: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return transformers_head(state)(functional_backbone(state, pixels))


# --------------------------------------------------------------------------- tests


def test_default_config_has_upernet_global_small_key_layout():
    from huabi.models.annotators.uniformer import UniformerConfig, UniformerUperNet

    with torch.device("meta"):
        shapes = {key: tuple(value.shape) for key, value in UniformerUperNet(UniformerConfig()).state_dict().items()}
    expected = {
        "backbone.patch_embed1.proj.weight": (64, 3, 4, 4), "backbone.patch_embed1.norm.bias": (64,),
        "backbone.patch_embed4.proj.weight": (512, 320, 2, 2),
        "backbone.blocks1.2.pos_embed.weight": (64, 1, 3, 3), "backbone.blocks1.2.norm1.running_var": (64,),
        "backbone.blocks2.3.attn.weight": (128, 1, 5, 5), "backbone.blocks2.3.conv2.weight": (128, 128, 1, 1),
        "backbone.blocks2.0.mlp.fc1.weight": (512, 128, 1, 1),
        "backbone.blocks3.7.attn.qkv.weight": (960, 320), "backbone.blocks3.7.attn.qkv.bias": (960,),
        "backbone.blocks4.2.mlp.fc1.weight": (2048, 512), "backbone.blocks4.2.attn.proj.weight": (512, 512),
        "backbone.norm3.weight": (320,), "backbone.norm4.bias": (512,),
        "decode_head.psp_modules.3.1.conv.weight": (512, 512, 1, 1), "decode_head.psp_modules.0.1.bn.running_mean": (512,),
        "decode_head.bottleneck.conv.weight": (512, 512 + 4 * 512, 3, 3),
        "decode_head.lateral_convs.2.conv.weight": (512, 320, 1, 1), "decode_head.fpn_convs.0.conv.weight": (512, 512, 3, 3),
        "decode_head.fpn_bottleneck.conv.weight": (512, 4 * 512, 3, 3), "decode_head.conv_seg.weight": (150, 512, 1, 1),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    assert not any(key.startswith(("backbone.blocks1.3", "backbone.blocks3.8", "backbone.head", "decode_head.fpn_convs.3"))
                   for key in shapes)
    assert "decode_head.conv_seg.bias" in shapes and "decode_head.bottleneck.conv.bias" not in shapes


def test_palette_is_controlnet_aux_ade_palette():
    from huabi.models.annotators.uniformer import ADE20K_PALETTE

    util = _wheel_module("controlnet_aux/util.py", "aux_util")
    assert ADE20K_PALETTE.shape == (150, 3)
    assert np.array_equal(ADE20K_PALETTE, np.array(util.ade_palette(), dtype=np.uint8))


def test_head_equals_transformers_upernet_head():
    from huabi.models.annotators.uniformer import UniformerConfig, UniformerUperNet

    state = random_state(seed=1)
    model = UniformerUperNet(UniformerConfig(**TINY)).eval()
    model.load_state_dict(state, strict=True)
    generator = torch.Generator().manual_seed(2)
    features = [torch.randn(1, dim, 24 // 2 ** i, 40 // 2 ** i, generator=generator) for i, dim in enumerate(TINY["embed_dims"])]
    with torch.inference_mode():
        ours = model.decode_head(features)
        theirs = transformers_head(state)(features)
    assert ours.shape == (1, 150, 24, 40)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(64, 96), (96, 64)])
def test_network_equals_functional_forward(tmp_path, size):
    from huabi.models.annotators.uniformer import load_uniformer

    state = random_state(seed=3)
    net = load_uniformer(_save(mmseg_file(state), tmp_path), torch.device("cpu"))
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        features = net.model.backbone(x)
        ours = net.model(x)
    reference_features = functional_backbone(state, x)
    for feature, reference in zip(features, reference_features):
        torch.testing.assert_close(feature, reference, rtol=1e-5, atol=1e-5)
    theirs = reference_logits(state, x)
    assert ours.shape == (1, 150, size[0] // 4, size[1] // 4)
    assert float(theirs.std()) > 0.1  # not a degenerate constant output
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def mmseg_map(state: dict[str, torch.Tensor], image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mmseg's whole-image inference on an (already padded) RGB image as sd-webui-controlnet calls it:
    (RGB map via controlnet_aux's palette, top-2 logit gap per pixel)."""
    import cv2

    util = _wheel_module("controlnet_aux/util.py", "aux_util")
    height, width = image.shape[:2]
    scale = min(2048 / max(height, width), 512 / min(height, width))  # mmcv rescale_size, keep ratio
    new_w, new_h = int(width * scale + 0.5), int(height * scale + 0.5)
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR) if (new_h, new_w) != (height, width) else image
    as_rgb = resized[:, :, ::-1].astype(np.float32)  # Normalize(to_rgb=True) on an image that was RGB already
    normalised = (as_rgb - np.array([123.675, 116.28, 103.53], np.float32)) / np.array([58.395, 57.12, 57.375], np.float32)
    pixels = torch.from_numpy(normalised.transpose(2, 0, 1).copy())[None]
    logits = reference_logits(state, pixels)
    logits = F.interpolate(logits, size=(new_h, new_w), mode="bilinear", align_corners=False)
    logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    probabilities = torch.softmax(logits, dim=1)[0]
    labels = probabilities.argmax(dim=0).numpy()
    top2 = torch.topk(logits[0], 2, dim=0).values
    palette = np.array(util.ade_palette(), dtype=np.uint8)
    return palette[labels], (top2[0] - top2[1]).numpy()


def _assert_maps_match(ours: np.ndarray, expected: np.ndarray, gap: np.ndarray) -> None:
    ours_u8 = np.round(ours * 255).astype(np.uint8)
    differs = np.any(ours_u8 != expected, axis=2)
    # A different class only where the reference's two best logits are within float32 noise.
    assert not np.any(differs & (gap > 1e-4)), int(differs.sum())
    assert differs.mean() < 1e-3


def test_map_equals_mmseg_inference_at_512(tmp_path):
    from PIL import Image

    from huabi.core.control import ControlUnit
    from huabi.service.control import detect_map

    state = random_state(seed=5)
    _save(mmseg_file(state), tmp_path / "models")
    image = _image(256, 384, seed=6)  # multiples of 64: no pad; short side 256 -> upscaled x2 as mmseg does
    image_path = tmp_path / "in.png"
    Image.fromarray(image).save(image_path)
    unit = ControlUnit(model="x", image=str(image_path), module="seg_ufade20k", processor_res=256)
    ours = detect_map(unit, models_dir=tmp_path / "models")
    expected, gap = mmseg_map(state, image)
    assert ours.shape == (256, 384, 3) and ours.dtype == np.float32
    _assert_maps_match(ours, expected, gap)
    assert len(np.unique(expected.reshape(-1, 3), axis=0)) >= 3  # several classes painted


def test_map_pads_to_64_and_crops(tmp_path):
    from PIL import Image

    from huabi.core.control import ControlUnit
    from huabi.service.control import detect_map

    state = random_state(seed=7)
    _save(mmseg_file(state), tmp_path / "models")
    image = _image(96, 150, seed=8)
    image_path = tmp_path / "in.png"
    Image.fromarray(image).save(image_path)
    unit = ControlUnit(model="x", image=str(image_path), module="seg_ufade20k", processor_res=96)
    ours = detect_map(unit, models_dir=tmp_path / "models")
    padded = np.pad(image, [[0, 128 - 96], [0, 192 - 150], [0, 0]], mode="edge")
    expected, gap = mmseg_map(state, padded)
    assert ours.shape == (96, 150, 3)
    _assert_maps_match(ours, expected[:96, :150], gap[:96, :150])


def test_missing_file_is_one_line_naming_it(tmp_path):
    from huabi.models.annotators import run_annotator

    with pytest.raises(HuabiError) as caught:
        run_annotator("seg_ufade20k", _image(64, 64), threshold_a=None, threshold_b=None, models_dir=tmp_path)
    message = str(caught.value)
    assert "\n" not in message and FILE in message and str(tmp_path / "annotators") in message


def test_wrong_files_are_refused_with_keys_named(tmp_path):
    from huabi.models.annotators.uniformer import load_uniformer

    state = random_state()
    missing = dict(state)
    missing.pop("backbone.blocks3.1.attn.proj.bias")
    unexpected = {**state, "backbone.head.weight": torch.zeros(1)}
    wrong_shape = {**state, "decode_head.fpn_convs.1.conv.weight": torch.zeros(32, 32, 1, 1)}
    coco = {**state, "decode_head.conv_seg.weight": torch.zeros(171, 32, 1, 1), "decode_head.conv_seg.bias": torch.zeros(171)}
    cases = [(missing, "backbone.blocks3.1.attn.proj.bias"), (unexpected, "backbone.head.weight"),
             (wrong_shape, "decode_head.fpn_convs.1.conv.weight"), (coco, "171 classes"),
             ({"en_block0.0.0.weight": torch.zeros(1)}, "backbone.patch_embed1.proj.weight")]
    for index, (bad, expected) in enumerate(cases):
        path = tmp_path / f"case{index}.pth"
        torch.save({"state_dict": bad}, path)
        with pytest.raises(HuabiError) as caught:
            load_uniformer(path, torch.device("cpu"))
        message = str(caught.value)
        assert "\n" not in message and path.name in message and expected in message, message


def test_batchnorm_step_counters_are_optional(tmp_path):
    from huabi.models.annotators.uniformer import load_uniformer

    state = random_state(seed=11)
    without = {key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}
    assert len(without) < len(state)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(12))
    with torch.inference_mode():
        full = load_uniformer(_save(mmseg_file(state), tmp_path / "a"), torch.device("cpu")).model(x)
        lean = load_uniformer(_save(mmseg_file(without), tmp_path / "b"), torch.device("cpu")).model(x)
    torch.testing.assert_close(full, lean, rtol=0, atol=0)


def test_code_carrying_pickle_is_refused(tmp_path):
    from huabi.models.annotators.uniformer import load_uniformer

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / FILE
    torch.save({"meta": Payload(), "state_dict": random_state()}, path)
    with pytest.raises(HuabiError) as caught:
        load_uniformer(path, torch.device("cpu"))
    assert "\n" not in str(caught.value)
    assert not marker.exists()


def test_module_is_registered_as_sd_webui_controlnet_names_it():
    from huabi.core.preprocess import module_spec
    from huabi.models.annotators import annotator_registry

    spec = module_spec("seg_ufade20k")
    assert spec.is_network and spec.uses_res and spec.threshold_a is None and spec.threshold_b is None
    assert module_spec("segmentation").name == "seg_ufade20k"
    assert annotator_registry()["seg_ufade20k"].weight_files == (FILE,)


def test_preprocess_cli_writes_the_map(tmp_path):
    from PIL import Image

    from huabi.models.annotators.uniformer import ADE20K_PALETTE

    _save(mmseg_file(random_state(seed=10)), tmp_path / "models")
    image_path = tmp_path / "in.png"
    Image.fromarray(_image(64, 96)).save(image_path)
    out = tmp_path / "seg.png"
    result = subprocess.run(
        [sys.executable, "-m", "huabi.cli.main", "preprocess", str(image_path), "--module", "segmentation",
         "--out", str(out), "--models-dir", str(tmp_path / "models"), "--res", "64"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    written = np.asarray(Image.open(out))
    assert written.shape == (64, 96, 3)
    colours = {tuple(c) for c in written.reshape(-1, 3)}
    assert colours <= {tuple(c) for c in ADE20K_PALETTE} and len(colours) >= 2


def test_missing_file_through_cli_is_one_line(tmp_path):
    from PIL import Image

    image_path = tmp_path / "in.png"
    Image.fromarray(_image(64, 64)).save(image_path)
    result = subprocess.run(
        [sys.executable, "-m", "huabi.cli.main", "preprocess", str(image_path), "--module", "seg_ufade20k",
         "--out", str(tmp_path / "seg.png"), "--models-dir", str(tmp_path / "models")],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
    )
    assert result.returncode != 0
    assert FILE in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "seg.png").exists()
