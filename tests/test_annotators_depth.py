"""Depth / normal annotators (Depth Anything v1/v2, MiDaS DPT-Hybrid) on random weights in the original key layout.

The reference network is transformers' own port (``DepthAnythingForDepthEstimation``,
``DPTForDepthEstimation`` hybrid) built here from an explicit config and given
random weights in transformers' layout; this file then writes those same weights
in the ORIGINAL checkpoints' layout (the inverse of the renames transformers'
conversion scripts ``convert_depth_anything_to_hf.py`` / ``convert_dpt_hybrid_to_pytorch.py``
apply, written out here independently of huabi's forward mapping), saves them as
a ``.pth`` and runs huabi's public path on them.  huabi's network output must
equal the reference's exactly (same ops, same weights).

Pre/post-processing is checked against the original code where it can run:
controlnet_aux 0.0.10 (``setup.sh --dev`` downloads the wheel into
``<venv>/huabi-reference``): MiDaS' ``Resize``/``NormalizeImage``/``PrepareForNet``
(the transform Depth Anything's repo reuses) and ``MidasDetector.__call__`` (the
depth min-max and the Sobel normal), read out of the wheel.  controlnet_aux's
MiDaS/ZoeDepth networks need timm (not installed: it would move the pinned torch)
and 0.0.10 has no Depth Anything, so the networks are compared to transformers only.
"""

from __future__ import annotations

import ast
import glob
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from huabi.errors import HuabiError

transformers = pytest.importorskip("transformers")

WHEEL_GLOB = "controlnet_aux-0.0.10-*.whl"
REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- controlnet_aux from its wheel


def _wheel() -> str | None:
    found = sorted(glob.glob(str(Path(sys.prefix) / "huabi-reference" / WHEEL_GLOB)))
    return found[0] if found else None


def _wheel_source(member: str) -> str:
    wheel = _wheel()
    if wheel is None:
        pytest.skip("controlnet_aux 0.0.10 wheel not downloaded (bash setup.sh --dev)")
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(member).decode("utf-8")


def _wheel_module(member: str, name: str) -> types.ModuleType:
    """Execute one self-contained file of the wheel (numpy/cv2/torch imports only) as a module."""
    module = types.ModuleType(name)
    module.__file__ = member
    exec(compile(_wheel_source(member), member, "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def aux_transforms():
    return _wheel_module("controlnet_aux/midas/midas/transforms.py", "aux_midas_transforms")


@pytest.fixture(scope="module")
def aux_midas_detector():
    """controlnet_aux's MidasDetector class, its file's other imports (timm, hub) left out: only __call__ runs."""
    import cv2
    from einops import rearrange
    from PIL import Image

    util = _wheel_module("controlnet_aux/util.py", "aux_util")
    source = _wheel_source("controlnet_aux/midas/__init__.py")
    tree = ast.parse(source)
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "MidasDetector"]
    namespace = {"np": np, "cv2": cv2, "torch": torch, "rearrange": rearrange, "Image": Image,
                 "HWC3": util.HWC3, "resize_image": util.resize_image}
    exec(compile(ast.Module(body=classes, type_ignores=[]), "controlnet_aux/midas/__init__.py", "exec"), namespace)
    return namespace["MidasDetector"]


# --------------------------------------------------------------------------- random weights, both layouts


def _randomise(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            noise = torch.randn(tensor.shape, generator=generator) * 0.1
            is_norm_scale = name.endswith("weight") and tensor.ndim == 1
            tensor.copy_(noise + (1.0 if is_norm_scale else 0.0))


def _fuse_qkv(hf: dict[str, torch.Tensor], prefix: str, names: tuple[str, str, str]) -> dict[str, torch.Tensor]:
    return {
        "weight": torch.cat([hf.pop(f"{prefix}.{n}.weight") for n in names]),
        "bias": torch.cat([hf.pop(f"{prefix}.{n}.bias") for n in names]),
    }


def depth_anything_to_original(hf: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """transformers' Depth Anything state dict -> the Depth-Anything repo's layout (the script's renames, inverted)."""
    hf = dict(hf)
    original: dict[str, torch.Tensor] = {}
    for i in range(layers):
        fused = _fuse_qkv(hf, f"backbone.encoder.layer.{i}.attention", ("q_proj", "k_proj", "v_proj"))
        original[f"pretrained.blocks.{i}.attn.qkv.weight"] = fused["weight"]
        original[f"pretrained.blocks.{i}.attn.qkv.bias"] = fused["bias"]
    rules = [
        ("backbone.embeddings.cls_token", "pretrained.cls_token"),
        ("backbone.embeddings.mask_token", "pretrained.mask_token"),
        ("backbone.embeddings.position_embeddings", "pretrained.pos_embed"),
        ("backbone.embeddings.patch_embeddings.projection.", "pretrained.patch_embed.proj."),
        ("backbone.layernorm.", "pretrained.norm."),
        ("head.conv1.", "depth_head.scratch.output_conv1."),
        ("head.conv2.", "depth_head.scratch.output_conv2.0."),
        ("head.conv3.", "depth_head.scratch.output_conv2.2."),
    ]
    for key, value in hf.items():
        new = key
        for old, replacement in rules:
            if key.startswith(old):
                new = replacement + key[len(old):]
                break
        else:
            if key.startswith("backbone.encoder.layer."):
                new = (key.replace("backbone.encoder.layer.", "pretrained.blocks.")
                       .replace("layer_scale1.lambda1", "ls1.gamma").replace("layer_scale2.lambda1", "ls2.gamma")
                       .replace("attention.o_proj", "attn.proj"))
            elif key.startswith("neck.reassemble_stage.layers."):
                index = key.split(".")[3]
                kind = "projects" if ".projection." in key else "resize_layers"
                new = f"depth_head.{kind}.{index}.{key.rsplit('.', 1)[1]}"
            elif key.startswith("neck.convs."):
                new = f"depth_head.scratch.layer{int(key.split('.')[2]) + 1}_rn.weight"
            elif key.startswith("neck.fusion_stage.layers."):
                parts = key.split(".")
                refine = 4 - int(parts[3])  # fusion layer 0 is refinenet4 (the script's {1: 3, 2: 2, 3: 1, 4: 0})
                rest = ".".join(parts[4:])
                rest = (rest.replace("projection", "out_conv").replace("residual_layer", "resConfUnit")
                        .replace("convolution", "conv"))
                new = f"depth_head.scratch.refinenet{refine}.{rest}"
            else:
                raise AssertionError(f"unmapped transformers key {key}")
        original[new] = value
    return original


def dpt_hybrid_to_original(hf: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """transformers' DPT-Hybrid state dict -> MiDaS v3's layout (the script's rename_key, inverted)."""
    hf = dict(hf)
    original: dict[str, torch.Tensor] = {}
    for i in range(layers):
        fused = _fuse_qkv(hf, f"dpt.encoder.layer.{i}.attention.attention", ("query", "key", "value"))
        original[f"pretrained.model.blocks.{i}.attn.qkv.weight"] = fused["weight"]
        original[f"pretrained.model.blocks.{i}.attn.qkv.bias"] = fused["bias"]
    backbone = "pretrained.model.patch_embed.backbone"
    for key, value in hf.items():
        if key.startswith("dpt.embeddings.backbone.bit.embedder."):
            new = key.replace("dpt.embeddings.backbone.bit.embedder.", f"{backbone}.stem.").replace("convolution", "conv")
        elif key.startswith("dpt.embeddings.backbone.bit.encoder.stages."):
            new = key.replace("dpt.embeddings.backbone.bit.encoder.", f"{backbone}.").replace(".layers.", ".blocks.")
        elif key.startswith("dpt.embeddings.projection."):
            new = key.replace("dpt.embeddings.projection.", "pretrained.model.patch_embed.proj.")
        elif key == "dpt.embeddings.cls_token":
            new = "pretrained.model.cls_token"
        elif key == "dpt.embeddings.position_embeddings":
            new = "pretrained.model.pos_embed"
        elif key.startswith("dpt.layernorm."):
            new = key.replace("dpt.layernorm.", "pretrained.model.norm.")
        elif key.startswith("dpt.encoder.layer."):
            new = (key.replace("dpt.encoder.layer.", "pretrained.model.blocks.")
                   .replace("attention.output.dense", "attn.proj").replace("intermediate.dense", "mlp.fc1")
                   .replace("output.dense", "mlp.fc2").replace("layernorm_before", "norm1")
                   .replace("layernorm_after", "norm2"))
        elif key.startswith("neck.reassemble_stage.readout_projects."):
            index = int(key.split(".")[3])
            new = f"pretrained.act_postprocess{index + 1}.0.project.0.{key.rsplit('.', 1)[1]}"
        elif key.startswith("neck.reassemble_stage.layers."):
            index = int(key.split(".")[3])
            slot = 3 if ".projection." in key else 4
            new = f"pretrained.act_postprocess{index + 1}.{slot}.{key.rsplit('.', 1)[1]}"
        elif key.startswith("neck.convs."):
            new = f"scratch.layer{int(key.split('.')[2]) + 1}_rn.weight"
        elif key.startswith("neck.fusion_stage.layers."):
            parts = key.split(".")
            rest = ".".join(parts[4:])
            rest = (rest.replace("projection", "out_conv").replace("residual_layer", "resConfUnit")
                    .replace("convolution", "conv"))
            new = f"scratch.refinenet{4 - int(parts[3])}.{rest}"
        elif key.startswith("head.head."):
            new = key.replace("head.head.", "scratch.output_conv.")
        else:
            raise AssertionError(f"unmapped transformers key {key}")
        original[new] = value
    # timm's ImageNet classifier: in the real file, unused by DPT
    original["pretrained.model.head.weight"] = torch.zeros(1000, hf["dpt.layernorm.weight"].shape[0])
    original["pretrained.model.head.bias"] = torch.zeros(1000)
    return original


def tiny_depth_anything(version: int, seed: int = 0):
    """A small DINOv2 + DPT-head Depth Anything (ViT width 128, 8 blocks) with random weights.

    v1 reads the last four blocks; v2 (sizes no release uses) every second block ending at the last."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    layers = 8
    out_indices = [5, 6, 7, 8] if version == 1 else [2, 4, 6, 8]  # stage numbers: 0 is the embeddings
    backbone = Dinov2Config(hidden_size=128, num_hidden_layers=layers, num_attention_heads=2, mlp_ratio=2,
                            patch_size=14, image_size=14 * 5, layer_norm_eps=1e-6, layerscale_value=1.0,
                            out_indices=out_indices, apply_layernorm=True, reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=128, patch_size=14,
                                 neck_hidden_sizes=[16, 32, 64, 64], fusion_hidden_size=32, head_hidden_size=8)
    model = DepthAnythingForDepthEstimation(config).eval()
    _randomise(model, seed)
    return model, depth_anything_to_original(model.state_dict(), layers)


def tiny_dpt_hybrid(seed: int = 0):
    """A small MiDaS DPT-Hybrid (BiT 1-1-1 blocks, ViT width 128, 4 blocks) with random weights."""
    from transformers import BitConfig, DPTConfig, DPTForDepthEstimation

    backbone = BitConfig(global_padding="same", layer_type="bottleneck", embedding_size=32, depths=[1, 2, 1],
                         hidden_sizes=[128, 128, 256], out_features=["stage1", "stage2", "stage3"],
                         embedding_dynamic_padding=True)
    config = DPTConfig(is_hybrid=True, backbone_config=backbone, hidden_size=128, num_hidden_layers=4,
                       num_attention_heads=2, intermediate_size=256, image_size=64, patch_size=16,
                       layer_norm_eps=1e-6, backbone_out_indices=[0, 1, 2, 3], reassemble_factors=[1, 1, 1, 0.5],
                       neck_hidden_sizes=[128, 128, 128, 128], fusion_hidden_size=32, readout_type="project",
                       use_batch_norm_in_fusion_residual=False, backbone_featmap_shape=[1, 256, 4, 4])
    model = DPTForDepthEstimation(config).eval()
    _randomise(model, seed)
    return model, dpt_hybrid_to_original(model.state_dict(), 4)


def _image(height: int, width: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=2)
    return np.clip(smooth + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


def _save(state: dict[str, torch.Tensor], folder: Path, name: str) -> Path:
    path = folder / "annotators" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


# --------------------------------------------------------------------------- Depth Anything


@pytest.mark.parametrize("version", [1, 2])
def test_depth_anything_network_equals_transformers_on_converted_weights(tmp_path, version):
    from huabi.models.annotators.depth import depth_anything_raw, load_depth_anything

    reference, original = tiny_depth_anything(version)
    path = _save(original, tmp_path, "depth_anything_vitl14.pth")
    net = load_depth_anything(path, torch.device("cpu"), version=version)
    image = _image(50, 78)
    from huabi.models.annotators.depth import depth_anything_pixels

    pixels = depth_anything_pixels(image)
    with torch.inference_mode():
        ours = depth_anything_raw(net, image)
        theirs = reference(pixel_values=pixels).predicted_depth
        theirs = torch.nn.functional.interpolate(theirs[None], (50, 78), mode="bilinear", align_corners=False)[0, 0]
    assert ours.shape == (50, 78)
    assert float(theirs.abs().max()) > 0  # not a dead network
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_depth_anything_input_transform_equals_midas_resize(aux_transforms):
    import cv2

    from huabi.models.annotators.depth import IMAGENET_MEAN, IMAGENET_STD, depth_anything_pixels

    compose = [
        aux_transforms.Resize(518, 518, resize_target=False, keep_aspect_ratio=True, ensure_multiple_of=14,
                              resize_method="lower_bound", image_interpolation_method=cv2.INTER_CUBIC),
        aux_transforms.NormalizeImage(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
        aux_transforms.PrepareForNet(),
    ]
    for height, width in [(512, 512), (512, 768), (768, 512), (448, 1000), (100, 37)]:
        image = _image(height, width, seed=height + width)
        sample = {"image": image / 255.0}
        for step in compose:
            sample = step(sample)
        expected = torch.from_numpy(sample["image"])[None]
        ours = depth_anything_pixels(image)
        assert ours.shape == expected.shape, (height, width)
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@pytest.mark.parametrize("version", [1, 2])
def test_depth_anything_map_through_detect_map(tmp_path, aux_transforms, version):
    """The public path (detect_map: processor-res resize, weights lookup, load, detect) against
    sd-webui-controlnet's steps: edge-pad to 64, MiDaS Resize chain, network, bilinear back,
    min-max * 255 truncated to uint8, crop, grey RGB."""
    import cv2
    from PIL import Image

    from huabi.core.control import ControlUnit
    from huabi.models.annotators.depth import IMAGENET_MEAN, IMAGENET_STD
    from huabi.service.control import detect_map

    reference, original = tiny_depth_anything(version, seed=3)
    name = "depth_anything_vits14.pth" if version == 1 else "depth_anything_v2_vitl.pth"  # any listed name
    _save(original, tmp_path / "models", name)
    image = _image(96, 150)
    image_path = tmp_path / "in.png"
    Image.fromarray(image).save(image_path)
    module = "depth_anything" if version == 1 else "depth_anything_v2"
    unit = ControlUnit(model="x", image=str(image_path), module=module, processor_res=96)
    ours = detect_map(unit, models_dir=tmp_path / "models")

    padded = np.pad(image, [[0, 128 - 96], [0, 192 - 150], [0, 0]], mode="edge")
    sample = {"image": padded / 255.0}
    for step in (aux_transforms.Resize(518, 518, resize_target=False, keep_aspect_ratio=True, ensure_multiple_of=14,
                                       resize_method="lower_bound", image_interpolation_method=cv2.INTER_CUBIC),
                 aux_transforms.NormalizeImage(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
                 aux_transforms.PrepareForNet()):
        sample = step(sample)
    with torch.inference_mode():
        depth = reference(pixel_values=torch.from_numpy(sample["image"])[None]).predicted_depth
        depth = torch.nn.functional.interpolate(depth[None], (128, 192), mode="bilinear", align_corners=False)[0, 0]
        depth = (depth - depth.min()) / (depth.max() - depth.min()) * 255.0
    expected = depth.numpy().astype(np.uint8)[:96, :150]
    assert ours.shape == (96, 150, 3) and ours.dtype == np.float32
    assert np.array_equal(ours[:, :, 0], ours[:, :, 2])
    assert np.array_equal(np.round(ours[:, :, 0] * 255).astype(np.uint8), expected)
    assert expected.max() > expected.min()


# --------------------------------------------------------------------------- MiDaS


def test_midas_network_equals_transformers_on_converted_weights(tmp_path):
    from huabi.models.annotators.depth import load_midas, midas_raw

    reference, original = tiny_dpt_hybrid()
    path = _save(original, tmp_path, "dpt_hybrid-midas-501f0c75.pt")
    net = load_midas(path, torch.device("cpu"))
    # transformers' own forward takes square inputs only: the built size and a larger one
    # (position embeddings resized).  Non-square inputs run the same modules (see the next test).
    for height, width in [(64, 64), (128, 128)]:
        image = _image(height, width)
        pixels = torch.from_numpy(image).float().permute(2, 0, 1)[None] / 127.5 - 1.0
        with torch.inference_mode():
            ours = midas_raw(net, image)
            reference.dpt.embeddings.image_size = (height, width)
            theirs = reference(pixel_values=pixels).predicted_depth[0]
        assert ours.shape == (height, width)
        assert float(theirs.abs().max()) > 0
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("module", ["depth_midas", "normal_midas"])
def test_midas_maps_equal_controlnet_aux_detector(tmp_path, aux_midas_detector, module):
    """depth_midas / normal_midas through detect_map against controlnet_aux's MidasDetector.__call__
    run with transformers' own forward on the same weights (its own depth min-max and Sobel normal
    code).  The image is square (transformers' forward needs it) and a multiple of 64 at the
    processor resolution, so neither side resizes or pads."""
    from PIL import Image

    from huabi.core.control import ControlUnit
    from huabi.service.control import detect_map

    reference, original = tiny_dpt_hybrid(seed=5)
    _save(original, tmp_path / "models", "dpt_hybrid-midas-501f0c75.pt")
    image = _image(128, 128, seed=7)
    image_path = tmp_path / "in.png"
    Image.fromarray(image).save(image_path)
    threshold = 0.25
    unit = ControlUnit(model="x", image=str(image_path), module=module, processor_res=128,
                       threshold_a=threshold if module == "normal_midas" else None)
    ours = detect_map(unit, models_dir=tmp_path / "models")

    class Wrapped(torch.nn.Module):  # MiDaSInference's interface: [1, 3, H, W] in [-1, 1] -> [1, H, W]
        def __init__(self):
            super().__init__()
            self.net = reference

        def forward(self, pixels):
            self.net.dpt.embeddings.image_size = tuple(pixels.shape[-2:])
            return self.net(pixel_values=pixels).predicted_depth

    detector = aux_midas_detector(Wrapped())
    with torch.inference_mode():
        depth, normal = detector(image, bg_th=threshold, depth_and_normal=True, detect_resolution=128,
                                 image_resolution=128)
    if module == "depth_midas":
        expected = depth
    else:
        expected = normal[:, :, ::-1]  # controlnet_aux flips to BGR; sd-webui-controlnet keeps x, y, z as R, G, B
    got = np.round(ours * 255).astype(np.uint8)
    assert got.shape == expected.shape == (128, 128, 3)
    assert np.array_equal(got, expected)
    if module == "normal_midas":
        assert (got[:, :, 0] != 127).any() and (got[:, :, 0] == 127).any()  # foreground has slope, background flat


def test_midas_pads_to_64_and_crops(tmp_path):
    from huabi.models.annotators.depth import detect_midas_depth, load_midas, midas_raw

    reference, original = tiny_dpt_hybrid(seed=2)
    path = _save(original, tmp_path, "dpt_hybrid-midas-501f0c75.pt")
    net = load_midas(path, torch.device("cpu"))
    image = _image(70, 150)  # padded to 128 x 192: a non-square grid through the neck
    with torch.inference_mode():
        ours = detect_midas_depth(net, image, None, None)
        padded = np.pad(image, [[0, 58], [0, 42], [0, 0]], mode="edge")
        depth = midas_raw(net, padded)
    assert depth.shape == (128, 192)
    depth = (depth - depth.min()) / (depth - depth.min()).max()
    expected = (depth.numpy() * 255).clip(0, 255).astype(np.uint8)[:70, :150]
    assert ours.shape == (70, 150, 3)
    assert np.array_equal(np.round(ours[:, :, 1] * 255).astype(np.uint8), expected)


# --------------------------------------------------------------------------- real checkpoints' layouts


def _meta_original(model_cls, config, to_original, layers):
    with torch.device("meta"):
        model = model_cls(config)
    return to_original(model.state_dict(), layers)


@pytest.mark.parametrize("size, hidden, layers, neck, fusion, version", [
    ("vits", 384, 12, (48, 96, 192, 384), 64, 1),
    ("vitb", 768, 12, (96, 192, 384, 768), 128, 1),
    ("vitl", 1024, 24, (256, 512, 1024, 1024), 256, 1),
    ("vitl", 1024, 24, (256, 512, 1024, 1024), 256, 2),
])
def test_real_depth_anything_layouts_are_recognised(size, hidden, layers, neck, fusion, version):
    """The released files' keys/shapes (as transformers' conversion script lists them): the key count
    (5 embedding keys + 14 per block + 2 final norm + 64 DPT head = the script's renames plus the
    fused qkv pairs), the size inferred, every key placed, every shape right."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    from huabi.models.annotators.depth import (convert_depth_anything, depth_anything_config, depth_anything_layers,
                                               depth_anything_shape)

    out = [layers - 3, layers - 2, layers - 1, layers] if version == 1 else (
        [3, 6, 9, 12] if layers == 12 else [5, 12, 18, 24])  # the v1 script; v2's intermediate_layer_idx
    backbone = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                            patch_size=14, image_size=518, out_indices=out, apply_layernorm=True,
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=hidden, patch_size=14,
                                 neck_hidden_sizes=list(neck), fusion_hidden_size=fusion)
    original = _meta_original(DepthAnythingForDepthEstimation, config, depth_anything_to_original, layers)
    assert len(original) == 5 + 14 * layers + 2 + 64
    assert tuple(original["pretrained.pos_embed"].shape) == (1, 1370, hidden)
    assert tuple(original["pretrained.blocks.0.attn.qkv.weight"].shape) == (3 * hidden, hidden)
    assert tuple(original["depth_head.scratch.refinenet1.out_conv.weight"].shape) == (fusion, fusion, 1, 1)
    shape = depth_anything_shape(original, Path(f"depth_anything_{size}14.pth"))
    assert (shape.hidden, shape.layers, shape.intermediate, shape.image_size, shape.neck, shape.fusion) == (
        hidden, layers, 4 * hidden, 518, neck, fusion)
    assert [i + 1 for i in depth_anything_layers(layers, version)] == out
    ours = depth_anything_config(shape, version)
    assert ours.backbone_config.num_attention_heads == hidden // 64
    with torch.device("meta"):
        expected = DepthAnythingForDepthEstimation(ours).state_dict()
    converted, unexpected = convert_depth_anything(original, shape.layers, shape.hidden)
    assert unexpected == []
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in expected.items()}


def test_real_midas_hybrid_layout_is_recognised():
    """dpt_hybrid-midas-501f0c75.pt: ViT-B/16 on a BiT-R50 (3, 4, 9 blocks), neck 256/512/768/768."""
    from transformers import DPTConfig, DPTForDepthEstimation

    from huabi.models.annotators.depth import convert_midas, midas_config, midas_shape

    config = DPTConfig(is_hybrid=True, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072, image_size=384, patch_size=16, backbone_out_indices=[2, 5, 8, 11],
                       reassemble_factors=[1, 1, 1, 0.5], neck_hidden_sizes=[256, 512, 768, 768],
                       fusion_hidden_size=256, readout_type="project", use_batch_norm_in_fusion_residual=False)
    original = _meta_original(DPTForDepthEstimation, config, dpt_hybrid_to_original, 12)
    backbone_keys = [k for k in original if k.startswith("pretrained.model.patch_embed.backbone.")]
    # stem conv + GroupNorm (3); per bottleneck 3 convs + 3 norms (9), plus the first block's downsample (3)
    assert len(backbone_keys) == 3 + 9 * (3 + 4 + 9) + 3 * 3
    # + cls/pos/patch projection (4), 12 ViT blocks of 12, final norm (2), timm's classifier (2),
    # readout projections of stages 3-4 (4), their 1x1 convs and stage 4's resize (6), scratch convs (4),
    # four refinenets of 10, the output convs (6)
    assert len(original) == len(backbone_keys) + 4 + 12 * 12 + 2 + 2 + 4 + 6 + 4 + 4 * 10 + 6 == 368
    assert tuple(original["pretrained.model.pos_embed"].shape) == (1, 577, 768)
    assert tuple(original["pretrained.model.patch_embed.proj.weight"].shape) == (768, 1024, 1, 1)
    assert tuple(original["pretrained.act_postprocess3.0.project.0.weight"].shape) == (768, 1536)
    shape = midas_shape(original, Path("dpt_hybrid-midas-501f0c75.pt"))
    assert shape.stage_depths == (3, 4, 9) and shape.stage_widths == (256, 512, 1024) and shape.stem == 64
    assert (shape.hidden, shape.layers, shape.image_size, shape.neck, shape.fusion) == (
        768, 12, 384, (256, 512, 768, 768), 256)
    ours = midas_config(shape)
    assert list(ours.backbone_out_indices[2:]) == [8, 11]
    with torch.device("meta"):
        expected = DPTForDepthEstimation(ours).state_dict()
    converted, unexpected = convert_midas(original, shape)
    assert unexpected == []
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in expected.items()}


# --------------------------------------------------------------------------- errors


def test_missing_file_is_one_line_naming_it(tmp_path):
    from huabi.models.annotators import run_annotator

    for module, name in [("depth_anything", "depth_anything_vitl14.pth or depth_anything_vitb14.pth"),
                         ("depth_anything_v2", "depth_anything_v2_vitl.safetensors or depth_anything_v2_vitl.pth"),
                         ("depth_midas", "dpt_hybrid-midas-501f0c75.pt"),
                         ("normal_midas", "dpt_hybrid-midas-501f0c75.pt")]:
        with pytest.raises(HuabiError) as caught:
            run_annotator(module, _image(64, 64), threshold_a=None, threshold_b=None, models_dir=tmp_path)
        message = str(caught.value)
        assert "\n" not in message and name in message and str(tmp_path / "annotators") in message


def test_wrong_files_are_refused_with_keys_named(tmp_path):
    from huabi.models.annotators.depth import load_depth_anything, load_midas

    _, depth_anything = tiny_depth_anything(1)
    _, midas = tiny_dpt_hybrid()
    cases = []
    broken = dict(depth_anything)
    broken.pop("depth_head.scratch.refinenet2.out_conv.bias")
    broken["depth_head.extra.weight"] = torch.zeros(1)
    cases.append((load_depth_anything, broken, "refinenet2.out_conv", {"version": 1}))
    cases.append((load_depth_anything, midas, "pretrained.cls_token", {"version": 1}))  # MiDaS file as Depth Anything
    no_qkv = dict(midas)
    no_qkv.pop("pretrained.model.blocks.1.attn.qkv.bias")
    cases.append((load_midas, no_qkv, "pretrained.model.blocks.1.attn.qkv", {}))
    cases.append((load_midas, depth_anything, "pretrained.model.cls_token", {}))
    wrong_shape = dict(depth_anything)
    wrong_shape["depth_head.scratch.output_conv1.weight"] = torch.zeros(3, 3, 3, 3)
    cases.append((load_depth_anything, wrong_shape, "output_conv1", {"version": 1}))
    for index, (loader, state, expected, kwargs) in enumerate(cases):
        path = tmp_path / f"case{index}.pth"
        torch.save(state, path)
        with pytest.raises(HuabiError) as caught:
            loader(path, torch.device("cpu"), **kwargs)
        message = str(caught.value)
        assert "\n" not in message and path.name in message and expected in message, message


def test_code_carrying_pickle_is_refused(tmp_path):
    from huabi.models.annotators.depth import load_midas

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "dpt_hybrid-midas-501f0c75.pt"
    torch.save({"pretrained.model.cls_token": Payload()}, path)
    with pytest.raises(HuabiError) as caught:
        load_midas(path, torch.device("cpu"))
    assert "\n" not in str(caught.value)
    assert not marker.exists()


def test_module_names_and_thresholds_are_sd_webui_controlnet_s():
    from huabi.core.preprocess import module_spec

    assert module_spec("depth").name == "depth_midas" and module_spec("depth_midas").threshold_a is None
    assert module_spec("normal_map").name == "normal_midas"
    assert module_spec("normal_midas").threshold_a == ("Normal Background Threshold", 0.4, 0.0, 1.0)
    with pytest.raises(HuabiError, match="Normal Background Threshold"):
        module_spec("normal_midas").check_thresholds(1.5, None)
    for name in ("depth_anything", "depth_anything_v2"):
        spec = module_spec(name)
        assert spec.is_network and spec.uses_res and spec.threshold_a is None


def test_preprocess_cli_writes_the_depth_map(tmp_path):
    from PIL import Image

    _, original = tiny_depth_anything(2, seed=9)
    _save(original, tmp_path / "models", "depth_anything_v2_vitl.pth")  # the original release name
    image_path = tmp_path / "in.png"
    Image.fromarray(_image(64, 96)).save(image_path)
    out = tmp_path / "depth.png"
    result = subprocess.run(
        [sys.executable, "-m", "huabi.cli.main", "preprocess", str(image_path), "--module", "depth_anything_v2",
         "--out", str(out), "--models-dir", str(tmp_path / "models"), "--res", "64"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    written = np.asarray(Image.open(out))
    assert written.shape == (64, 96, 3) and written.max() == 255 and written.min() == 0


def test_alternative_file_names_first_listed_wins_per_folder(tmp_path):
    from huabi.models.annotators import find_annotator_file
    from huabi.models.annotators.depth import DEPTH_ANYTHING_V2_FILE

    models = tmp_path / "webui" / "models"
    downloads = tmp_path / "webui" / "extensions" / "sd-webui-controlnet" / "annotator" / "downloads"
    a1111 = downloads / "depth_anything_v2" / "depth_anything_v2_vitl.safetensors"
    a1111.parent.mkdir(parents=True)
    a1111.write_bytes(b"x")
    assert find_annotator_file(DEPTH_ANYTHING_V2_FILE, models, module="depth_anything_v2") == a1111
    small = models / "annotators" / "depth_anything_v2_vits.pth"
    small.parent.mkdir(parents=True)
    small.write_bytes(b"x")
    assert find_annotator_file(DEPTH_ANYTHING_V2_FILE, models, module="depth_anything_v2") == small  # huabi folder first
    large = models / "annotators" / "sub" / "depth_anything_v2_vitl.pth"
    large.parent.mkdir()
    large.write_bytes(b"x")
    assert find_annotator_file(DEPTH_ANYTHING_V2_FILE, models, module="depth_anything_v2") == large  # ViT-L first


def test_depth_anything_v2_safetensors_in_half_precision(tmp_path):
    """A1111's depth_anything_v2_vitl.safetensors layout, stored as float16: runs in float32, equal to the
    reference holding the same (float16-rounded) weights."""
    from safetensors.torch import save_file

    from huabi.models.annotators import run_annotator

    reference, _ = tiny_depth_anything(2, seed=11)
    with torch.no_grad():
        for tensor in reference.state_dict().values():
            tensor.copy_(tensor.half().float())
    original = depth_anything_to_original(reference.state_dict(), 8)
    path = tmp_path / "annotators" / "depth_anything_v2" / "depth_anything_v2_vitl.safetensors"
    path.parent.mkdir(parents=True)
    save_file({key: value.half().contiguous() for key, value in original.items()}, str(path))
    image = _image(64, 64, seed=4)
    ours = run_annotator("depth_anything_v2", image, threshold_a=None, threshold_b=None, models_dir=tmp_path)
    from huabi.models.annotators.depth import depth_anything_pixels

    with torch.inference_mode():
        depth = reference(pixel_values=depth_anything_pixels(image)).predicted_depth
        depth = torch.nn.functional.interpolate(depth[None], (64, 64), mode="bilinear", align_corners=False)[0, 0]
        depth = (depth - depth.min()) / (depth.max() - depth.min()) * 255.0
    assert np.array_equal(np.round(ours[:, :, 0] * 255).astype(np.uint8), depth.numpy().astype(np.uint8))


def test_preprocess_cli_missing_weights_is_one_error_line(tmp_path):
    from PIL import Image

    image_path = tmp_path / "in.png"
    Image.fromarray(_image(64, 64)).save(image_path)
    out = tmp_path / "normal.png"
    result = subprocess.run(
        [sys.executable, "-m", "huabi.cli.main", "preprocess", str(image_path), "--module", "normal_midas",
         "--out", str(out), "--models-dir", str(tmp_path / "models")],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
    )
    assert result.returncode != 0 and not out.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "dpt_hybrid-midas-501f0c75.pt" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_malformed_shapes_are_one_line(tmp_path):
    from huabi.models.annotators.depth import load_depth_anything, load_midas

    _, depth_anything = tiny_depth_anything(1)
    _, midas = tiny_dpt_hybrid()
    for loader, state, key, kwargs in [(load_depth_anything, depth_anything, "pretrained.pos_embed", {"version": 2}),
                                       (load_midas, midas, "pretrained.model.pos_embed", {}),
                                       (load_midas, midas, "scratch.layer1_rn.weight", {})]:
        state = dict(state)
        state[key] = torch.zeros(3)
        path = tmp_path / "bad.pth"
        torch.save(state, path)
        with pytest.raises(HuabiError) as caught:
            loader(path, torch.device("cpu"), **kwargs)
        assert "\n" not in str(caught.value) and "bad.pth" in str(caught.value)
