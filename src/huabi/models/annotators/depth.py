"""Depth and normal annotators: Depth Anything (v1, v2) and MiDaS v3 DPT-Hybrid (depth and normal).

The networks are transformers' own ports, not huabi code: Depth Anything is
``DepthAnythingForDepthEstimation`` (DINOv2 ViT + DPT head) and MiDaS is
``DPTForDepthEstimation`` with ``is_hybrid=True`` (BiT-ResNet + ViT + DPT head).
transformers is already a runtime dependency and keeps these architectures
tested, so huabi only does what is specific to the user's files:

* read the original checkpoints (sd-webui-controlnet's file names, the original
  repositories' key layout) safely, infer the model size from the tensor shapes
  (so ViT-S/B/L Depth Anything files all work), and rename the keys to
  transformers' layout (the mapping transformers' own conversion scripts apply:
  ``convert_depth_anything_to_hf.py`` and ``convert_dpt_hybrid_to_pytorch.py``;
  written here from their key tables). Loading is strict: a missing or unexpected
  key is one error line naming the file and a few keys, and nothing half-loads.
* pre- and post-process as sd-webui-controlnet does:

=====================  ======================================================================
``depth_anything``     ``depth_anything_vitl14.pth`` (or ``_vitb14`` / ``_vits14``): the image,
                       edge-padded to a multiple of 64 (A1111's ``resize_image_with_pad``), is
                       scaled so both sides are >= 518 and multiples of 14 (cubic) and
                       ImageNet-normalised; the depth is resized back (bilinear), min-max scaled
                       to 0-255 grey (truncated, as ``astype(uint8)``), the padding cropped.
                       One difference: A1111 feeds the network BGR (its detector converts its
                       RGB input "BGR2RGB"); huabi feeds RGB, the order the model was trained on.
``depth_anything_v2``  ``depth_anything_v2_vitl.safetensors`` (A1111's download) or
                       ``depth_anything_v2_vitl.pth`` (the original release; ``vitb`` / ``vits``
                       too): same steps.
``depth_midas``        ``dpt_hybrid-midas-501f0c75.pt``: the padded image scaled to [-1, 1]; depth
                       min-max scaled to 0-255 grey.  No thresholds.
``normal_midas``       the same network; the normal is (Sobel x, Sobel y, 2 pi) of the raw depth,
                       normalised, with x and y zeroed where the 0-1 depth is below Threshold A
                       ("Normal Background Threshold", 0.4), mapped to 0-255 as
                       ``n * 127.5 + 127.5`` in R, G, B order as sd-webui-controlnet (controlnet_aux
                       returns it flipped to B, G, R).
=====================  ======================================================================

ZoeDepth is in ``zoe.py``; segmentation (OneFormer, UniFormer) is not implemented.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from huabi.errors import HuabiError
from huabi.models.annotators import Annotator, read_annotator_weights
from huabi.models.convert import state_dict_mismatch

# sd-webui-controlnet's ViT-L file first; the smaller releases work too (the size comes from the shapes).
DEPTH_ANYTHING_FILE = "depth_anything_vitl14.pth|depth_anything_vitb14.pth|depth_anything_vits14.pth"
# A1111's extension downloads a safetensors copy of ViT-L; the original release is a .pth.
DEPTH_ANYTHING_V2_FILE = "|".join(f"depth_anything_v2_{size}.{suffix}" for size in ("vitl", "vitb", "vits")
                                  for suffix in ("safetensors", "pth"))
MIDAS_FILE = "dpt_hybrid-midas-501f0c75.pt"

DEPTH_ANYTHING_SIZE = 518  # the short side the network sees (lower bound), a multiple of 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD_MULTIPLE = 64  # A1111's resize_image_with_pad
MIDAS_NORMAL_Z = 2.0 * math.pi  # sd-webui-controlnet's ``a``: the normal's z component
HEAD_DIM = 64  # every DINOv2 / ViT size these files come in uses 64-wide attention heads

# Depth Anything v2 reads these ViT blocks (0-based) per depth; v1 reads the last four.
DEPTH_ANYTHING_V2_LAYERS = {12: (2, 5, 8, 11), 24: (4, 11, 17, 23), 40: (9, 19, 29, 39)}
# MiDaS DPT-Hybrid reads two BiT stages and these ViT blocks (0-based) per depth.
MIDAS_HYBRID_LAYERS = {12: (8, 11)}


# --------------------------------------------------------------------------- shared helpers


def _fail(path: Path, what: str, missing: list[str], unexpected: list[str]) -> HuabiError:
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} keys, e.g. {', '.join(missing[:3])}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} keys, e.g. {', '.join(sorted(unexpected)[:3])}")
    return HuabiError(f"{path.name}: not a {what} checkpoint ({'; '.join(parts)})")


def _require(tensors: dict[str, torch.Tensor], path: Path, what: str, *names: str) -> None:
    missing = [name for name in names if name not in tensors]
    if missing:
        raise _fail(path, what, missing, [])


def _strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix copies re-saved from a DataParallel wrapper carry."""
    if tensors and all(key.startswith(prefix) for key in tensors):
        return {key[len(prefix):]: value for key, value in tensors.items()}
    return tensors


def _count_blocks(tensors: dict[str, torch.Tensor], pattern: str) -> int:
    found = {int(match.group(1)) for key in tensors if (match := re.fullmatch(pattern, key))}
    if not found:
        return 0
    if found != set(range(max(found) + 1)):
        return -1
    return max(found) + 1


def _split_qkv(fused: torch.Tensor, kind: str, hidden: int, names: tuple[str, str, str],
               out: dict[str, torch.Tensor], prefix: str) -> None:
    """A fused [q; k; v] projection (rows stacked) -> transformers' three separate ones."""
    for index, name in enumerate(names):
        out[f"{prefix}.{name}.{kind}"] = fused[index * hidden:(index + 1) * hidden]


def _load_strict(model: torch.nn.Module, converted: dict[str, torch.Tensor], path: Path, what: str,
                 unexpected: list[str], original_names: dict[str, str]) -> None:
    """Load ``converted`` into the meta-device ``model`` or raise one line; nothing half-loads.

    ``original_names``: transformers key -> the file's key, so errors name what the file lacks.
    """
    expected = model.state_dict()
    stray = dict.fromkeys(unexpected)  # file keys the conversion did not take: reported with the rest
    problem = state_dict_mismatch(expected, {**converted, **stray}, shown_names=original_names)
    if problem:
        raise HuabiError(f"{path.name}: not a {what} checkpoint ({problem})")
    model.load_state_dict({key: value.to(torch.float32) for key, value in converted.items()}, strict=True,
                          assign=True)


def _parse_shapes(parse: Any, tensors: dict[str, torch.Tensor], path: Path, what: str) -> Any:
    """``parse(tensors, path)``, a tensor of the wrong rank reported as one line, not a traceback."""
    try:
        return parse(tensors, path)
    except HuabiError:
        raise
    except (IndexError, ValueError, TypeError, ZeroDivisionError):
        raise HuabiError(f"{path.name}: not a {what} checkpoint (tensor shapes do not fit the architecture)") from None


def _reverse(names: dict[str, str], layers: int, qkv: str, split: str, parts: tuple[str, str, str]) -> dict[str, str]:
    """transformers key -> original key, the split q/k/v pointing at the fused qkv they come from."""
    reverse = {target: source for source, target in names.items()}
    for layer in range(layers):
        for part in parts:
            for kind in ("weight", "bias"):
                reverse[f"{split.format(layer, part)}.{kind}"] = f"{qkv.format(layer)}.{kind}"
    return reverse


def pad_to_multiple(image: np.ndarray, multiple: int = PAD_MULTIPLE) -> np.ndarray:
    """Edge-pad bottom/right to a multiple of ``multiple`` (A1111's ``resize_image_with_pad``)."""
    height, width = image.shape[:2]
    pad_h = -height % multiple
    pad_w = -width % multiple
    return np.pad(image, [[0, pad_h], [0, pad_w], [0, 0]], mode="edge")


def _to_grey_map(depth_uint8: np.ndarray) -> np.ndarray:
    return np.repeat(depth_uint8[:, :, None], 3, axis=2).astype(np.float32) / 255.0


def _min_max_uint8(depth: torch.Tensor) -> np.ndarray:
    """``(d - min) / (max - min) * 255`` truncated to uint8, as sd-webui-controlnet; a flat map is black."""
    low, high = depth.min(), depth.max()
    if not bool(high > low):
        return np.zeros(tuple(depth.shape), dtype=np.uint8)
    scaled = (depth - low) / (high - low) * 255.0
    return scaled.float().cpu().numpy().astype(np.uint8)


# The checkpoint helpers other annotators built on transformers' ports reuse (zoe.py), under public names.
require_keys = _require
strip_prefix = _strip_prefix
count_blocks = _count_blocks
load_strict = _load_strict
parse_shapes = _parse_shapes
grey_map = _to_grey_map


# --------------------------------------------------------------------------- Depth Anything


@dataclass(frozen=True)
class DepthAnythingShape:
    """What the checkpoint's tensor shapes say about the model."""

    hidden: int
    layers: int
    intermediate: int
    patch: int
    image_size: int
    neck: tuple[int, int, int, int]
    fusion: int
    head_hidden: int


def depth_anything_shape(tensors: dict[str, torch.Tensor], path: Path) -> DepthAnythingShape:
    what = "Depth Anything"
    if "pretrained.blocks.0.mlp.w12.weight" in tensors:
        raise HuabiError(f"{path.name}: Depth Anything ViT-G (SwiGLU) checkpoints are not supported; use ViT-S/B/L")
    _require(tensors, path, what, "pretrained.cls_token", "pretrained.pos_embed", "pretrained.patch_embed.proj.weight",
             "pretrained.blocks.0.mlp.fc1.weight", "depth_head.scratch.layer1_rn.weight",
             "depth_head.scratch.output_conv2.0.weight", *(f"depth_head.projects.{i}.weight" for i in range(4)))
    layers = _count_blocks(tensors, r"pretrained\.blocks\.(\d+)\.norm1\.weight")
    if layers < 4:
        raise HuabiError(f"{path.name}: not a Depth Anything checkpoint (needs at least 4 numbered transformer blocks)")
    hidden = int(tensors["pretrained.cls_token"].shape[-1])
    patch = int(tensors["pretrained.patch_embed.proj.weight"].shape[-1])
    positions = int(tensors["pretrained.pos_embed"].shape[1]) - 1
    grid = math.isqrt(positions)
    intermediate = int(tensors["pretrained.blocks.0.mlp.fc1.weight"].shape[0])
    if grid * grid != positions or hidden % min(hidden, HEAD_DIM) or intermediate % hidden:
        raise HuabiError(f"{path.name}: not a Depth Anything checkpoint (pos_embed {tuple(tensors['pretrained.pos_embed'].shape)})")
    return DepthAnythingShape(
        hidden=hidden,
        layers=layers,
        intermediate=intermediate,
        patch=patch,
        image_size=grid * patch,
        neck=tuple(int(tensors[f"depth_head.projects.{i}.weight"].shape[0]) for i in range(4)),
        fusion=int(tensors["depth_head.scratch.layer1_rn.weight"].shape[0]),
        head_hidden=int(tensors["depth_head.scratch.output_conv2.0.weight"].shape[0]),
    )


def depth_anything_layers(layers: int, version: int) -> tuple[int, ...]:
    """The ViT blocks (0-based) the DPT head reads."""
    if version == 1:
        return tuple(range(layers - 4, layers))
    if layers in DEPTH_ANYTHING_V2_LAYERS:
        return DEPTH_ANYTHING_V2_LAYERS[layers]
    step = layers // 4  # sizes no release uses: evenly spaced, ending at the last block
    return tuple(layers - 1 - step * k for k in (3, 2, 1, 0))


def depth_anything_config(shape: DepthAnythingShape, version: int):
    from transformers import DepthAnythingConfig, Dinov2Config

    backbone = Dinov2Config(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=max(1, shape.hidden // HEAD_DIM),
        mlp_ratio=shape.intermediate // shape.hidden,
        patch_size=shape.patch,
        image_size=shape.image_size,
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
        out_indices=[index + 1 for index in depth_anything_layers(shape.layers, version)],  # stage 0 is the stem
        apply_layernorm=True,
        reshape_hidden_states=False,
    )
    return DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=shape.hidden,
        patch_size=shape.patch,
        neck_hidden_sizes=list(shape.neck),
        fusion_hidden_size=shape.fusion,
        head_hidden_size=shape.head_hidden,
        depth_estimation_type="relative",
    )


def depth_anything_key_map(layers: int) -> dict[str, str]:
    """Original (Depth-Anything repo) key -> transformers key, all but the fused qkv projections."""
    names = {
        "pretrained.cls_token": "backbone.embeddings.cls_token",
        "pretrained.mask_token": "backbone.embeddings.mask_token",
        "pretrained.pos_embed": "backbone.embeddings.position_embeddings",
        "pretrained.norm.weight": "backbone.layernorm.weight",
        "pretrained.norm.bias": "backbone.layernorm.bias",
        "depth_head.scratch.output_conv1.weight": "head.conv1.weight",
        "depth_head.scratch.output_conv1.bias": "head.conv1.bias",
        "depth_head.scratch.output_conv2.0.weight": "head.conv2.weight",
        "depth_head.scratch.output_conv2.0.bias": "head.conv2.bias",
        "depth_head.scratch.output_conv2.2.weight": "head.conv3.weight",
        "depth_head.scratch.output_conv2.2.bias": "head.conv3.bias",
    }
    parameter_pairs = {
        "pretrained.patch_embed.proj": "backbone.embeddings.patch_embeddings.projection",
    }
    for i in range(layers):
        source, target = f"pretrained.blocks.{i}", f"backbone.encoder.layer.{i}"
        names[f"{source}.ls1.gamma"] = f"{target}.layer_scale1.lambda1"
        names[f"{source}.ls2.gamma"] = f"{target}.layer_scale2.lambda1"
        for part in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            parameter_pairs[f"{source}.{part}"] = f"{target}.{part}"
        parameter_pairs[f"{source}.attn.proj"] = f"{target}.attention.o_proj"
    for i in range(4):
        parameter_pairs[f"depth_head.projects.{i}"] = f"neck.reassemble_stage.layers.{i}.projection"
        if i != 2:  # the third stage keeps its resolution: no resize layer
            parameter_pairs[f"depth_head.resize_layers.{i}"] = f"neck.reassemble_stage.layers.{i}.resize"
        names[f"depth_head.scratch.layer{i + 1}_rn.weight"] = f"neck.convs.{i}.weight"
    for refine in range(1, 5):  # refinenet4 fuses first: transformers numbers the fusion layers the other way
        source, target = f"depth_head.scratch.refinenet{refine}", f"neck.fusion_stage.layers.{4 - refine}"
        parameter_pairs[f"{source}.out_conv"] = f"{target}.projection"
        for unit in (1, 2):
            for conv in (1, 2):
                parameter_pairs[f"{source}.resConfUnit{unit}.conv{conv}"] = f"{target}.residual_layer{unit}.convolution{conv}"
    for source, target in parameter_pairs.items():
        names[f"{source}.weight"] = f"{target}.weight"
        names[f"{source}.bias"] = f"{target}.bias"
    return names


def convert_depth_anything(tensors: dict[str, torch.Tensor], layers: int, hidden: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict in transformers' layout, and the keys that have no place in it."""
    names = depth_anything_key_map(layers)
    converted: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in tensors.items():
        match = re.fullmatch(r"pretrained\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key)
        if match and int(match.group(1)) < layers:
            _split_qkv(value, match.group(2), hidden, ("q_proj", "k_proj", "v_proj"), converted,
                       f"backbone.encoder.layer.{match.group(1)}.attention")
        elif key in names:
            converted[names[key]] = value
        else:
            unexpected.append(key)
    return converted, unexpected


@dataclass(frozen=True)
class LoadedDepthNet:
    model: Any
    kind: str  # "depth_anything" | "midas"
    device: torch.device


def load_depth_anything(path: Path, device: torch.device, *, version: int) -> LoadedDepthNet:
    from transformers import DepthAnythingForDepthEstimation

    what = f"Depth Anything{' v2' if version == 2 else ''}"
    tensors = _strip_prefix(read_annotator_weights(path), "module.")
    shape = _parse_shapes(depth_anything_shape, tensors, path, what)
    converted, unexpected = convert_depth_anything(tensors, shape.layers, shape.hidden)
    original_names = _reverse(depth_anything_key_map(shape.layers), shape.layers, "pretrained.blocks.{}.attn.qkv",
                              "backbone.encoder.layer.{}.attention.{}", ("q_proj", "k_proj", "v_proj"))
    with torch.device("meta"):
        model = DepthAnythingForDepthEstimation(depth_anything_config(shape, version))
    _load_strict(model, converted, path, what, unexpected, original_names)
    return LoadedDepthNet(model.to(device).eval(), "depth_anything", device)


def depth_anything_input_size(height: int, width: int, size: int = DEPTH_ANYTHING_SIZE, multiple: int = 14) -> tuple[int, int]:
    """(height, width) the network sees: both sides >= ``size``, aspect kept, multiples of ``multiple``.

    Depth Anything's ``Resize(keep_aspect_ratio=True, resize_method="lower_bound")``:
    one scale for both sides (the larger of the two needed), each side rounded to
    the multiple, rounded up instead when rounding would go below ``size``.
    """
    scale = max(size / height, size / width)

    def fit(value: float) -> int:
        rounded = int(np.round(value / multiple) * multiple)
        if rounded < size:
            rounded = int(np.ceil(value / multiple) * multiple)
        return rounded

    return fit(scale * height), fit(scale * width)


def depth_anything_pixels(image: np.ndarray) -> torch.Tensor:
    """uint8 RGB [H, W, 3] -> the normalised float32 [1, 3, h, w] network input."""
    import cv2

    height, width = depth_anything_input_size(*image.shape[:2])
    scaled = cv2.resize(image.astype(np.float64) / 255.0, (width, height), interpolation=cv2.INTER_CUBIC)
    normalised = (scaled - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)).astype(np.float32))[None]


def depth_anything_raw(net: LoadedDepthNet, image: np.ndarray) -> torch.Tensor:
    """The network's relative depth (larger = nearer) resized to the image, float32 [H, W]."""
    pixels = depth_anything_pixels(image).to(net.device)
    depth = net.model(pixel_values=pixels).predicted_depth  # [1, h, w]
    depth = torch.nn.functional.interpolate(depth[None], image.shape[:2], mode="bilinear", align_corners=False)
    return depth[0, 0]


def detect_depth_anything(net: LoadedDepthNet, image: np.ndarray, a: float | None, b: float | None) -> np.ndarray:
    height, width = image.shape[:2]
    depth = depth_anything_raw(net, pad_to_multiple(image))
    return _to_grey_map(_min_max_uint8(depth)[:height, :width])


# --------------------------------------------------------------------------- MiDaS DPT-Hybrid

MIDAS_BACKBONE = "pretrained.model.patch_embed.backbone"


@dataclass(frozen=True)
class MidasShape:
    hidden: int
    layers: int
    intermediate: int
    image_size: int
    stem: int
    stage_depths: tuple[int, ...]
    stage_widths: tuple[int, ...]
    neck: tuple[int, int, int, int]
    fusion: int


def midas_shape(tensors: dict[str, torch.Tensor], path: Path) -> MidasShape:
    what = "MiDaS DPT-Hybrid"
    _require(tensors, path, what, "pretrained.model.cls_token", "pretrained.model.pos_embed",
             f"{MIDAS_BACKBONE}.stem.conv.weight", "pretrained.model.blocks.0.mlp.fc1.weight",
             "pretrained.act_postprocess3.3.weight", "pretrained.act_postprocess4.3.weight",
             *(f"scratch.layer{i}_rn.weight" for i in range(1, 5)))
    layers = _count_blocks(tensors, r"pretrained\.model\.blocks\.(\d+)\.norm1\.weight")
    stages = _count_blocks(tensors, rf"{re.escape(MIDAS_BACKBONE)}\.stages\.(\d+)\.blocks\.0\.conv1\.weight")
    if layers < 4 or stages < 1:
        raise HuabiError(f"{path.name}: not a MiDaS DPT-Hybrid checkpoint (no numbered ViT blocks / ResNet stages)")
    depths, widths = [], []
    for stage in range(stages):
        count = _count_blocks(tensors, rf"{re.escape(MIDAS_BACKBONE)}\.stages\.{stage}\.blocks\.(\d+)\.conv1\.weight")
        depths.append(count)
        widths.append(int(tensors[f"{MIDAS_BACKBONE}.stages.{stage}.blocks.0.conv3.weight"].shape[0]))
    middle = int(tensors[f"{MIDAS_BACKBONE}.stages.0.blocks.0.conv1.weight"].shape[0])
    if middle * 4 != widths[0]:  # BiT bottlenecks are a quarter of the stage width (transformers fixes it)
        raise HuabiError(f"{path.name}: not a MiDaS DPT-Hybrid checkpoint (bottleneck width {middle} of {widths[0]})")
    positions = int(tensors["pretrained.model.pos_embed"].shape[1]) - 1
    grid = math.isqrt(positions)
    if grid * grid != positions or min(depths) < 1:
        raise HuabiError(f"{path.name}: not a MiDaS DPT-Hybrid checkpoint (pos_embed / ResNet stages)")
    neck = tuple(int(tensors[f"scratch.layer{i}_rn.weight"].shape[1]) for i in range(1, 5))
    return MidasShape(
        hidden=int(tensors["pretrained.model.cls_token"].shape[-1]),
        layers=layers,
        intermediate=int(tensors["pretrained.model.blocks.0.mlp.fc1.weight"].shape[0]),
        image_size=grid * 16,
        stem=int(tensors[f"{MIDAS_BACKBONE}.stem.conv.weight"].shape[0]),
        stage_depths=tuple(depths),
        stage_widths=tuple(widths),
        neck=neck,
        fusion=int(tensors["scratch.layer1_rn.weight"].shape[0]),
    )


def midas_vit_layers(layers: int) -> tuple[int, int]:
    """The ViT blocks (0-based) DPT-Hybrid reads after its two ResNet stages."""
    return MIDAS_HYBRID_LAYERS.get(layers, (layers - 1 - layers // 4, layers - 1))


def midas_config(shape: MidasShape):
    from transformers import BitConfig, DPTConfig

    backbone = BitConfig(
        global_padding="same",
        layer_type="bottleneck",
        embedding_size=shape.stem,
        depths=list(shape.stage_depths),
        hidden_sizes=list(shape.stage_widths),
        out_features=[f"stage{i + 1}" for i in range(len(shape.stage_depths))],
        embedding_dynamic_padding=True,
    )
    grid = shape.image_size // 16
    return DPTConfig(
        is_hybrid=True,
        backbone_config=backbone,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=max(1, shape.hidden // HEAD_DIM),
        intermediate_size=shape.intermediate,
        image_size=shape.image_size,
        patch_size=16,
        layer_norm_eps=1e-6,  # timm's ViT (the original) uses 1e-6
        backbone_out_indices=[0, 1, *midas_vit_layers(shape.layers)],
        reassemble_factors=[1, 1, 1, 0.5],
        neck_hidden_sizes=list(shape.neck),
        fusion_hidden_size=shape.fusion,
        readout_type="project",
        use_batch_norm_in_fusion_residual=False,
        backbone_featmap_shape=[1, shape.stage_widths[-1], grid, grid],
    )


def midas_key_map(shape: MidasShape) -> dict[str, str]:
    """Original (MiDaS v3 / DPT) key -> transformers key, all but the fused qkv projections."""
    names = {
        "pretrained.model.cls_token": "dpt.embeddings.cls_token",
        "pretrained.model.pos_embed": "dpt.embeddings.position_embeddings",
        "pretrained.model.norm.weight": "dpt.layernorm.weight",
        "pretrained.model.norm.bias": "dpt.layernorm.bias",
        f"{MIDAS_BACKBONE}.stem.conv.weight": "dpt.embeddings.backbone.bit.embedder.convolution.weight",
        f"{MIDAS_BACKBONE}.stem.norm.weight": "dpt.embeddings.backbone.bit.embedder.norm.weight",
        f"{MIDAS_BACKBONE}.stem.norm.bias": "dpt.embeddings.backbone.bit.embedder.norm.bias",
    }
    pairs = {"pretrained.model.patch_embed.proj": "dpt.embeddings.projection"}
    for stage, depth in enumerate(shape.stage_depths):
        for block in range(depth):
            source = f"{MIDAS_BACKBONE}.stages.{stage}.blocks.{block}"
            target = f"dpt.embeddings.backbone.bit.encoder.stages.{stage}.layers.{block}"
            convs = ["conv1", "conv2", "conv3"] + (["downsample.conv"] if block == 0 else [])
            for conv in convs:
                names[f"{source}.{conv}.weight"] = f"{target}.{conv}.weight"
            for norm in ["norm1", "norm2", "norm3"] + (["downsample.norm"] if block == 0 else []):
                pairs[f"{source}.{norm}"] = f"{target}.{norm}"
    for i in range(shape.layers):
        source, target = f"pretrained.model.blocks.{i}", f"dpt.encoder.layer.{i}"
        pairs[f"{source}.attn.proj"] = f"{target}.attention.output.dense"
        pairs[f"{source}.mlp.fc1"] = f"{target}.intermediate.dense"
        pairs[f"{source}.mlp.fc2"] = f"{target}.output.dense"
        pairs[f"{source}.norm1"] = f"{target}.layernorm_before"
        pairs[f"{source}.norm2"] = f"{target}.layernorm_after"
    for stage in (3, 4):  # the two ResNet stages (1, 2) pass through unchanged: no keys
        pairs[f"pretrained.act_postprocess{stage}.0.project.0"] = f"neck.reassemble_stage.readout_projects.{stage - 1}.0"
        pairs[f"pretrained.act_postprocess{stage}.3"] = f"neck.reassemble_stage.layers.{stage - 1}.projection"
    pairs["pretrained.act_postprocess4.4"] = "neck.reassemble_stage.layers.3.resize"
    for i in range(4):
        names[f"scratch.layer{i + 1}_rn.weight"] = f"neck.convs.{i}.weight"
    for refine in range(1, 5):
        source, target = f"scratch.refinenet{refine}", f"neck.fusion_stage.layers.{4 - refine}"
        pairs[f"{source}.out_conv"] = f"{target}.projection"
        for unit in (1, 2):
            for conv in (1, 2):
                pairs[f"{source}.resConfUnit{unit}.conv{conv}"] = f"{target}.residual_layer{unit}.convolution{conv}"
    for index in (0, 2, 4):
        pairs[f"scratch.output_conv.{index}"] = f"head.head.{index}"
    for source, target in pairs.items():
        names[f"{source}.weight"] = f"{target}.weight"
        names[f"{source}.bias"] = f"{target}.bias"
    return names


# timm's ImageNet classifier of the ViT: in the file, unused by DPT (transformers' script drops it too).
MIDAS_IGNORED = ("pretrained.model.head.weight", "pretrained.model.head.bias")


def convert_midas(tensors: dict[str, torch.Tensor], shape: MidasShape) -> tuple[dict[str, torch.Tensor], list[str]]:
    names = midas_key_map(shape)
    converted: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in tensors.items():
        match = re.fullmatch(r"pretrained\.model\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key)
        if match and int(match.group(1)) < shape.layers:
            _split_qkv(value, match.group(2), shape.hidden, ("query", "key", "value"), converted,
                       f"dpt.encoder.layer.{match.group(1)}.attention.attention")
        elif key in names:
            converted[names[key]] = value
        elif key not in MIDAS_IGNORED:
            unexpected.append(key)
    return converted, unexpected


def load_midas(path: Path, device: torch.device) -> LoadedDepthNet:
    from transformers import DPTForDepthEstimation

    tensors = _strip_prefix(read_annotator_weights(path), "module.")
    shape = _parse_shapes(midas_shape, tensors, path, "MiDaS DPT-Hybrid")
    converted, unexpected = convert_midas(tensors, shape)
    original_names = _reverse(midas_key_map(shape), shape.layers, "pretrained.model.blocks.{}.attn.qkv",
                              "dpt.encoder.layer.{}.attention.attention.{}", ("query", "key", "value"))
    with torch.device("meta"):
        model = DPTForDepthEstimation(midas_config(shape))
    _load_strict(model, converted, path, "MiDaS DPT-Hybrid", unexpected, original_names)
    return LoadedDepthNet(model.to(device).eval(), "midas", device)


def midas_raw(net: LoadedDepthNet, image: np.ndarray) -> torch.Tensor:
    """MiDaS relative inverse depth for uint8 RGB [H, W, 3] (H, W multiples of 32), float32 [H, W]."""
    pixels = torch.from_numpy(np.ascontiguousarray(image)).float().to(net.device) / 127.5 - 1.0
    return dpt_hybrid_forward(net.model, pixels.permute(2, 0, 1)[None])[0]


def dpt_hybrid_forward(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    """``DPTForDepthEstimation.forward`` for a hybrid model, for any input size (multiples of 32).

    transformers' own forward refuses inputs other than the configured size and
    reshapes the ViT tokens into a square grid, so a 512x768 image (what A1111 feeds
    MiDaS) cannot go through it; its modules can.  Same modules, same order: the BiT +
    ViT embeddings (position embeddings resized to the grid), the ViT blocks, the
    two BiT stages and the chosen blocks into the neck with the real grid height and
    width, the head.
    """
    dpt = model.dpt
    embedded = dpt.embeddings(pixels, interpolate_pos_encoding=True)
    wanted = set(model.config.backbone_out_indices[2:])
    features = list(embedded.intermediate_activations)
    hidden = embedded.last_hidden_states
    for index, layer in enumerate(dpt.encoder.layer):
        if index > max(wanted):
            break
        hidden = layer(hidden)
        if index in wanted:
            features.append(hidden)
    patch = dpt.embeddings.patch_size
    fused = model.neck(features, pixels.shape[-2] // patch, pixels.shape[-1] // patch)
    return model.head(fused)


def midas_normal(depth: np.ndarray, background: float, z: float = MIDAS_NORMAL_Z) -> np.ndarray:
    """sd-webui-controlnet's normal from MiDaS depth: uint8 [H, W, 3]."""
    import cv2

    depth = depth.astype(np.float32)
    unit = depth - depth.min()
    top = unit.max()
    unit = unit / top if top > 0 else unit
    x = cv2.Sobel(depth, cv2.CV_32F, 1, 0, ksize=3)
    y = cv2.Sobel(depth, cv2.CV_32F, 0, 1, ksize=3)
    x[unit < background] = 0
    y[unit < background] = 0
    normal = np.stack([x, y, np.full_like(x, z)], axis=2)
    normal /= np.sqrt(np.sum(normal ** 2.0, axis=2, keepdims=True))
    return (normal * 127.5 + 127.5).clip(0, 255).astype(np.uint8)


def detect_midas_depth(net: LoadedDepthNet, image: np.ndarray, a: float | None, b: float | None) -> np.ndarray:
    height, width = image.shape[:2]
    depth = midas_raw(net, pad_to_multiple(image))
    unit = depth - depth.min()
    top = unit.max()
    unit = unit / top if bool(top > 0) else unit
    grey = (unit.cpu().numpy() * 255.0).clip(0, 255).astype(np.uint8)
    return _to_grey_map(grey[:height, :width])


def detect_midas_normal(net: LoadedDepthNet, image: np.ndarray, a: float | None, b: float | None) -> np.ndarray:
    height, width = image.shape[:2]
    depth = midas_raw(net, pad_to_multiple(image)).float().cpu().numpy()
    background = 0.4 if a is None else float(a)
    return midas_normal(depth, background)[:height, :width].astype(np.float32) / 255.0


ANNOTATORS = (
    Annotator("depth_anything", (DEPTH_ANYTHING_FILE,),
              lambda paths, device: load_depth_anything(paths[DEPTH_ANYTHING_FILE], device, version=1),
              detect_depth_anything),
    Annotator("depth_anything_v2", (DEPTH_ANYTHING_V2_FILE,),
              lambda paths, device: load_depth_anything(paths[DEPTH_ANYTHING_V2_FILE], device, version=2),
              detect_depth_anything),
    Annotator("depth_midas", (MIDAS_FILE,), lambda paths, device: load_midas(paths[MIDAS_FILE], device),
              detect_midas_depth),
    Annotator("normal_midas", (MIDAS_FILE,), lambda paths, device: load_midas(paths[MIDAS_FILE], device),
              detect_midas_normal),
)
