"""ZoeDepth annotator (``depth_zoe``, huabi.models.annotators.zoe) on tiny random weights.

The network is transformers' ``ZoeDepthForDepthEstimation``; what huabi adds is the
original file layout (``{"model": ...}``, ``core.core.pretrained.model.blocks...``,
BEiT's fused qkv with ``q_bias``/``v_bias``), the strict load and the processing.
The reference for the processing is controlnet_aux 0.0.10's own code executed
from its wheel (``<venv>/huabi-reference``): ``ZoeDetector.__call__`` (percentiles,
inversion), ``DepthModel.infer`` (reflect padding, mirrored pass, bicubic resize,
crop) and MiDaS's ``PrepForMidas``/``Resize`` ("minimal" resize to 384x512 multiples
of 32, [-1, 1]); only the BEiT network itself (timm-based in the wheel) is
transformers' port, fed the same random weights.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from huabi.errors import HuabiError

transformers = pytest.importorskip("transformers")

from test_annotators_depth import _image, _randomise, _wheel_module, _wheel_source  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
ZOE_FILE = "ZoeD_M12_N.pt"
BEIT = "core.core.pretrained.model"


# --------------------------------------------------------------------------- tiny model, both layouts


def tiny_zoe(seed: int = 0):
    """transformers' ZoeDepth (tiny BEiT) with random weights and the same weights in the original layout."""
    from transformers import BeitConfig, ZoeDepthConfig, ZoeDepthForDepthEstimation

    backbone = BeitConfig(image_size=64, patch_size=16, num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                          num_attention_heads=2, use_relative_position_bias=True, use_absolute_position_embeddings=False,
                          use_mean_pooling=True, layer_norm_eps=1e-6, reshape_hidden_states=False,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = ZoeDepthConfig(backbone_config=backbone, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                            num_relative_features=8, bottleneck_features=16, bin_embedding_dim=16,
                            num_attractors=[4, 2, 2, 1], bin_centers_type="softplus",
                            bin_configurations=[{"name": "nyu", "n_bins": 8, "min_depth": 1e-3, "max_depth": 10.0}])
    model = ZoeDepthForDepthEstimation(config).eval()
    _randomise(model, seed)
    return model, zoe_to_original(model.state_dict(), layers=4)


def zoe_to_original(hf: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """transformers' ZoeDepth state dict -> the ZoeDepth repository's (convert_zoedepth_to_hf's renames, inverted),
    with timm's extras the release carries (classifier, fc_norm, relative_position_index, binomial constants)."""
    hf = dict(hf)
    out: dict[str, torch.Tensor] = {}
    for i in range(layers):
        source = f"backbone.beit.layers.{i}"
        target = f"{BEIT}.blocks.{i}"
        out[f"{target}.attn.qkv.weight"] = torch.cat([hf.pop(f"{source}.attention.{p}_proj.weight") for p in "qkv"])
        out[f"{target}.attn.q_bias"] = hf.pop(f"{source}.attention.q_proj.bias")
        out[f"{target}.attn.v_bias"] = hf.pop(f"{source}.attention.v_proj.bias")
        out[f"{target}.attn.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
    renames = [  # applied in order to every remaining key
        (r"^backbone\.beit\.embeddings\.patch_embeddings\.projection", f"{BEIT}.patch_embed.proj"),
        (r"^backbone\.beit\.embeddings\.cls_token", f"{BEIT}.cls_token"),
        (r"^backbone\.beit\.layers\.", f"{BEIT}.blocks."),
        (r"relative_position_bias\.relative_position_bias_table", "attn.relative_position_bias_table"),
        (r"layernorm_before", "norm1"), (r"layernorm_after", "norm2"),
        (r"lambda_(\d)", r"gamma_\1"), (r"attention\.o_proj", "attn.proj"),
        (r"^neck\.reassemble_stage\.readout_projects\.(\d)\.0",
         lambda m: f"core.core.pretrained.act_postprocess{int(m.group(1)) + 1}.0.project.0"),
        (r"^neck\.reassemble_stage\.layers\.(\d)\.projection",
         lambda m: f"core.core.pretrained.act_postprocess{int(m.group(1)) + 1}.3"),
        (r"^neck\.reassemble_stage\.layers\.(\d)\.resize",
         lambda m: f"core.core.pretrained.act_postprocess{int(m.group(1)) + 1}.4"),
        (r"^neck\.convs\.(\d)", lambda m: f"core.core.scratch.layer{int(m.group(1)) + 1}_rn"),
        (r"^neck\.fusion_stage\.layers\.(\d)", lambda m: f"core.core.scratch.refinenet{4 - int(m.group(1))}"),
        (r"\.projection\.", ".out_conv."), (r"residual_layer(\d)\.convolution(\d)", r"resConfUnit\1.conv\2"),
        (r"^relative_head\.conv(\d)", lambda m: f"core.core.scratch.output_conv.{2 * (int(m.group(1)) - 1)}"),
        (r"^metric_head\.", ""),
        (r"^(seed_bin_regressor|seed_projector|projectors\.\d|attractors\.\d)\.conv(\d)",
         lambda m: f"{m.group(1)}._net.{2 * (int(m.group(2)) - 1)}"),
    ]
    for key, value in hf.items():
        name = key
        for pattern, replacement in renames:
            name = re.sub(pattern, replacement, name)
        out[name] = value
    out[f"{BEIT}.fc_norm.weight"] = torch.ones(32)
    out[f"{BEIT}.fc_norm.bias"] = torch.zeros(32)
    out[f"{BEIT}.head.weight"] = torch.zeros(1000, 32)
    out[f"{BEIT}.head.bias"] = torch.zeros(1000)
    out["conditional_log_binomial.log_binomial_transform.k_idx"] = torch.arange(8).view(1, -1, 1, 1)
    out["conditional_log_binomial.log_binomial_transform.K_minus_1"] = torch.tensor([7]).view(1, -1, 1, 1)
    return out


def _save(state: dict[str, torch.Tensor], folder: Path, name: str = ZOE_FILE) -> Path:
    path = folder / "annotators" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, path)  # the release nests its weights under "model"
    return path


def test_original_layout_has_the_release_key_names():
    _, original = tiny_zoe()
    expected = {
        f"{BEIT}.blocks.0.attn.qkv.weight", f"{BEIT}.blocks.0.attn.q_bias", f"{BEIT}.blocks.3.gamma_2",
        f"{BEIT}.blocks.1.attn.relative_position_bias_table", "core.core.pretrained.act_postprocess1.0.project.0.weight",
        "core.core.pretrained.act_postprocess1.4.weight", "core.core.pretrained.act_postprocess4.4.bias",
        "core.core.scratch.layer4_rn.weight", "core.core.scratch.refinenet4.resConfUnit1.conv2.bias",
        "core.core.scratch.refinenet1.out_conv.weight", "core.core.scratch.output_conv.4.weight", "conv2.weight",
        "seed_bin_regressor._net.2.weight", "seed_projector._net.0.bias", "projectors.3._net.2.weight",
        "attractors.0._net.0.weight", "conditional_log_binomial.mlp.2.bias", f"{BEIT}.patch_embed.proj.weight",
        f"{BEIT}.blocks.2.mlp.fc1.weight", f"{BEIT}.blocks.2.norm1.bias", f"{BEIT}.blocks.2.attn.proj.weight",
    }
    assert expected <= set(original)
    assert not [key for key in original if "act_postprocess3.4" in key]
    assert all(key.startswith(("core.core.", "conv2.", "seed_", "projectors.", "attractors.", "conditional_log"))
               for key in original)


def test_network_equals_transformers_on_converted_weights(tmp_path):
    from huabi.models.annotators.zoe import load_zoe

    reference, original = tiny_zoe(seed=1)
    net = load_zoe(_save(original, tmp_path), torch.device("cpu"))
    pixels = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        ours = net.model(pixel_values=pixels).predicted_depth
        theirs = reference(pixel_values=pixels).predicted_depth
    assert ours.shape == (1, 96, 128)
    assert float(theirs.std()) > 0  # not a constant map
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_release_sizes_are_recognised():
    """ZoeD_M12_N's real sizes (transformers' conversion config: BEiT-L/16-384, 24 blocks read at 6/12/18/24,
    neck 256-1024, 64 bins, 128-wide bin embeddings, attractors 16/8/4/1), built on meta: shape inference,
    conversion and the strict load's shape check all agree."""
    from transformers import BeitConfig, ZoeDepthConfig, ZoeDepthForDepthEstimation

    from huabi.models.annotators.zoe import ZoeShape, convert_zoe, zoe_config, zoe_shape

    backbone = BeitConfig(image_size=384, num_hidden_layers=24, hidden_size=1024, intermediate_size=4096,
                          num_attention_heads=16, use_relative_position_bias=True, reshape_hidden_states=False,
                          out_features=["stage6", "stage12", "stage18", "stage24"])
    config = ZoeDepthConfig(backbone_config=backbone, neck_hidden_sizes=[256, 512, 1024, 1024], bin_centers_type="softplus",
                            bin_configurations=[{"name": "nyu", "n_bins": 64, "min_depth": 1e-3, "max_depth": 10.0}])
    with torch.device("meta"):
        expected = ZoeDepthForDepthEstimation(config).state_dict()
    original = zoe_to_original(expected, layers=24)
    assert tuple(original[f"{BEIT}.blocks.0.attn.relative_position_bias_table"].shape) == (2212, 16)
    shape = zoe_shape(original, Path(ZOE_FILE))
    assert shape == ZoeShape(hidden=1024, layers=24, heads=16, intermediate=4096, patch=16, image_size=384,
                             neck=(256, 512, 1024, 1024), fusion=256, relative_features=32, bottleneck=256, bins=64,
                             bin_embedding=128, attractors=(16, 8, 4, 1))
    ours = zoe_config(shape)
    assert ours.backbone_config.out_indices == [6, 12, 18, 24]
    converted, unexpected = convert_zoe(original, shape)
    assert unexpected == []
    with torch.device("meta"):
        built = ZoeDepthForDepthEstimation(ours).state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in built.items()}


# --------------------------------------------------------------------------- controlnet_aux's processing


@pytest.fixture(scope="module")
def aux_zoe_detector():
    """controlnet_aux's ZoeDetector, its DepthModel.infer and MiDaS's PrepForMidas, executed from the wheel.

    Their files import torchvision (for ``Normalize`` / ``ToTensor``) and timm at top level; only the
    classes are executed, with ``Normalize`` given as the (x - mean) / std it is.
    """
    import cv2
    import torch.nn.functional as F
    from einops import rearrange
    from PIL import Image

    util = _wheel_module("controlnet_aux/util.py", "aux_util")

    def classes(member: str, names: set[str], namespace: dict) -> dict:
        tree = ast.parse(_wheel_source(member))
        body = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name in names]
        assert {node.name for node in body} == names
        exec(compile(ast.Module(body=body, type_ignores=[]), member, "exec"), namespace)
        return namespace

    class Normalize:
        def __init__(self, mean, std):
            self.mean = torch.tensor(mean).view(1, -1, 1, 1)
            self.std = torch.tensor(std).view(1, -1, 1, 1)

        def __call__(self, x):
            return (x - self.mean) / self.std

    base = {"np": np, "torch": torch, "nn": torch.nn, "F": F, "cv2": cv2, "rearrange": rearrange, "Image": Image,
            "HWC3": util.HWC3, "resize_image": util.resize_image, "Normalize": Normalize, "Union": object}
    namespace = classes("controlnet_aux/zoe/zoedepth/models/base_models/midas.py", {"Resize", "PrepForMidas"}, dict(base))
    namespace = classes("controlnet_aux/zoe/zoedepth/models/depth_model.py", {"DepthModel"}, namespace)
    namespace = classes("controlnet_aux/zoe/__init__.py", {"ZoeDetector"}, namespace)
    return namespace


def _aux_model(namespace: dict, reference: torch.nn.Module) -> torch.nn.Module:
    """ZoeDepth as the wheel runs it (MidasCore's prep with the ZoeD_N infer config), transformers' network inside."""

    class AuxZoe(namespace["DepthModel"]):
        def __init__(self):
            super().__init__()
            self.prep = namespace["PrepForMidas"](resize_mode="minimal", keep_aspect_ratio=True, img_size=[384, 512])
            self.net = reference

        def forward(self, x):
            return {"metric_depth": self.net(pixel_values=self.prep(x)).predicted_depth[:, None]}

    return AuxZoe().eval()


def test_input_size_is_midas_minimal_resize(aux_zoe_detector):
    from huabi.models.annotators.zoe import zoe_input_size

    resize = aux_zoe_detector["Resize"](512, 384, keep_aspect_ratio=True, ensure_multiple_of=32, resize_method="minimal")
    for height, width in [(176, 250), (560, 560), (600, 830), (830, 600), (100, 37), (1100, 700), (384, 512)]:
        assert zoe_input_size(height, width) == tuple(resize.get_size(width, height)[::-1]), (height, width)


@pytest.mark.parametrize("size", [(96, 150), (128, 128)])
def test_map_through_detect_map_equals_controlnet_aux(tmp_path, aux_zoe_detector, size):
    """detect_map (resize to processor res, lookup, load, pad to 64, detect, crop) against
    ZoeDetector.__call__ on the same padded image with the same weights."""
    from PIL import Image

    from huabi.core.control import ControlUnit
    from huabi.service.control import detect_map

    reference, original = tiny_zoe(seed=2)
    _save(original, tmp_path / "models")
    height, width = size
    image = _image(height, width, seed=5)
    image_path = tmp_path / "in.png"
    Image.fromarray(image).save(image_path)
    unit = ControlUnit(model="x", image=str(image_path), module="depth_zoe", processor_res=min(size))
    ours = detect_map(unit, models_dir=tmp_path / "models")

    padded = np.pad(image, [[0, -height % 64], [0, -width % 64], [0, 0]], mode="edge")
    detector = aux_zoe_detector["ZoeDetector"](_aux_model(aux_zoe_detector, reference))
    expected = detector(padded, detect_resolution=min(padded.shape[:2]), image_resolution=min(padded.shape[:2]))
    assert expected.shape == padded.shape
    expected = expected[:height, :width, 0]
    assert ours.shape == (height, width, 3) and ours.dtype == np.float32
    assert np.array_equal(ours[:, :, 0], ours[:, :, 1]) and np.array_equal(ours[:, :, 0], ours[:, :, 2])
    grey = np.round(ours[:, :, 0] * 255).astype(np.uint8)
    assert int(expected.max()) - int(expected.min()) > 50  # a real map, not flat
    assert np.array_equal(grey, expected)  # byte-equal: same float32 operations in the same order


# --------------------------------------------------------------------------- errors, registry, CLI


def test_missing_file_is_one_line_naming_it(tmp_path):
    from huabi.models.annotators import run_annotator

    with pytest.raises(HuabiError) as caught:
        run_annotator("depth_zoe", _image(64, 64), threshold_a=None, threshold_b=None, models_dir=tmp_path)
    message = str(caught.value)
    assert "\n" not in message and ZOE_FILE in message and str(tmp_path / "annotators") in message


def test_wrong_files_are_refused_with_keys_named(tmp_path):
    from huabi.models.annotators.zoe import load_zoe

    _, original = tiny_zoe()
    cases = []
    broken = dict(original)
    broken.pop("core.core.scratch.refinenet2.out_conv.bias")
    broken["core.core.extra.weight"] = torch.zeros(1)
    cases.append((broken, "refinenet2.out_conv"))
    no_bias = dict(original)
    no_bias.pop(f"{BEIT}.blocks.1.attn.v_bias")
    cases.append((no_bias, "blocks.1.attn.v_bias"))
    cases.append(({"pretrained.model.cls_token": torch.zeros(1, 1, 8)}, f"{BEIT}.cls_token"))  # a MiDaS file
    wrong_shape = dict(original)
    wrong_shape["attractors.1._net.0.weight"] = torch.zeros(3, 3, 1, 1)
    cases.append((wrong_shape, "attractors.1._net.0.weight"))
    for index, (state, expected) in enumerate(cases):
        path = tmp_path / f"case{index}.pt"
        torch.save({"model": state}, path)
        with pytest.raises(HuabiError) as caught:
            load_zoe(path, torch.device("cpu"))
        message = str(caught.value)
        assert "\n" not in message and path.name in message and expected in message, message


def test_code_carrying_pickle_is_refused(tmp_path):
    from huabi.models.annotators.zoe import load_zoe

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / ZOE_FILE
    torch.save({"model": {f"{BEIT}.cls_token": Payload()}}, path)
    with pytest.raises(HuabiError) as caught:
        load_zoe(path, torch.device("cpu"))
    assert "\n" not in str(caught.value)
    assert not marker.exists()


def test_module_is_registered_as_sd_webui_controlnet_names_it():
    from huabi.core.preprocess import module_spec
    from huabi.models.annotators import annotator_registry

    spec = module_spec("depth_zoe")
    assert module_spec("zoe_depth").name == "depth_zoe"
    assert spec.is_network and spec.uses_res and spec.threshold_a is None and spec.threshold_b is None
    assert annotator_registry()["depth_zoe"].weight_files == (ZOE_FILE,)


def test_preprocess_cli_writes_the_depth_map(tmp_path):
    from PIL import Image

    _, original = tiny_zoe(seed=4)
    _save(original, tmp_path / "models")
    image_path = tmp_path / "in.png"
    Image.fromarray(_image(64, 96)).save(image_path)
    out = tmp_path / "depth.png"
    result = subprocess.run(
        [sys.executable, "-m", "huabi.cli.main", "preprocess", str(image_path), "--module", "depth_zoe",
         "--out", str(out), "--models-dir", str(tmp_path / "models"), "--res", "64"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    written = np.asarray(Image.open(out))
    assert written.shape == (64, 96, 3) and written.max() == 255 and written.min() == 0
