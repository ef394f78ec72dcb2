"""ZoeDepth annotator (``depth_zoe``): metric depth from ``ZoeD_M12_N.pt``.

The network is transformers' ``ZoeDepthForDepthEstimation`` (BEiT-L/16-384 +
DPT neck + MiDaS relative head + ZoeDepth's metric bins head), not huabi code.
huabi only handles the user's file and the processing around the network:

* the file (the ZoeDepth release sd-webui-controlnet downloads) nests its
  weights under ``"model"`` (``read_annotator_weights`` unwraps it); the keys
  are the original repository's (``core.core.pretrained.model.blocks.N...``
  for timm's BEiT, ``core.core.scratch...`` for the DPT neck and head, the
  metric head at the top level) and are renamed to transformers' layout as
  transformers' ``convert_zoedepth_to_hf.py`` does (BEiT's fused ``qkv`` with its
  separate ``q_bias``/``v_bias`` split into three projections; timm's
  classifier, ``fc_norm``, ``relative_position_index`` and the binomial
  constants dropped: transformers recomputes them).  The sizes come from the
  tensor shapes; loading is strict (one error line naming the file and keys).
* pre- and post-processing as sd-webui-controlnet's ``ZoeDetector`` with the
  model's ``infer``: the image (edge-padded to a multiple of 64) in [0, 1],
  reflect-padded by ``int(sqrt(side / 2) * 3)`` on each side, resized
  (bilinear, corners aligned) to the multiple of 32 nearest 384x512 keeping the
  aspect ratio (MiDaS's "minimal" resize), normalised to [-1, 1]; the metric
  depth resized back (bicubic), the padding cropped; the same for the mirrored
  image and the two averaged.  Then the 2nd and 85th percentiles map to 1 and 0
  (near is bright), ``* 255`` clipped to uint8 grey.

Only the NYU (``_N``) release is supported: its bin centres use softplus and
its depth range is 0.001-10 m, which the file does not record.  BEiT's layer
norms use eps 1e-6 as timm's original (transformers' conversion kept 1e-12).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from huabi.errors import HuabiError
from huabi.models.annotators import Annotator, read_annotator_weights
from huabi.models.annotators.depth import (
    LoadedDepthNet,
    count_blocks,
    grey_map,
    load_strict,
    pad_to_multiple,
    parse_shapes,
    require_keys,
    strip_prefix,
)

ZOE_FILE = "ZoeD_M12_N.pt"
WHAT = "ZoeDepth"
BEIT = "core.core.pretrained.model"
SCRATCH = "core.core.scratch"
ZOE_NET_SIZE = (384, 512)  # (height, width) the MiDaS core aims for
ZOE_MULTIPLE = 32
PAD_FACTOR = 3.0  # ZoeDepth's padding augmentation: int(sqrt(side / 2) * 3)
NEAR_PERCENTILE, FAR_PERCENTILE = 2, 85  # sd-webui-controlnet's ZoeDetector normalisation
# ZoeD_N (NYU): softplus bin centres, depth range in metres (not stored in the file).
ZOE_MIN_DEPTH, ZOE_MAX_DEPTH = 1e-3, 10.0
# In the file, unused by the depth network (timm's ImageNet classifier, constant buffers).
IGNORED = re.compile(
    rf"{re.escape(BEIT)}\.(head|fc_norm)\.(weight|bias)"
    rf"|{re.escape(BEIT)}\.blocks\.\d+\.attn\.relative_position_index"
    r"|conditional_log_binomial\.log_binomial_transform\.(k_idx|K_minus_1)"
)


@dataclass(frozen=True)
class ZoeShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    patch: int
    image_size: int
    neck: tuple[int, int, int, int]
    fusion: int
    relative_features: int
    bottleneck: int
    bins: int
    bin_embedding: int
    attractors: tuple[int, ...]


def zoe_shape(tensors: dict[str, torch.Tensor], path: Path) -> ZoeShape:
    require_keys(tensors, path, WHAT, f"{BEIT}.cls_token", f"{BEIT}.patch_embed.proj.weight",
             f"{BEIT}.blocks.0.mlp.fc1.weight", f"{BEIT}.blocks.0.attn.relative_position_bias_table",
             f"{SCRATCH}.layer1_rn.weight", f"{SCRATCH}.output_conv.2.weight", "conv2.weight",
             "seed_bin_regressor._net.2.weight", "seed_projector._net.2.weight",
             *(f"core.core.pretrained.act_postprocess{i}.3.weight" for i in range(1, 5)))
    layers = count_blocks(tensors, rf"{re.escape(BEIT)}\.blocks\.(\d+)\.norm1\.weight")
    attractors = count_blocks(tensors, r"attractors\.(\d+)\._net\.2\.weight")
    if layers < 4 or attractors != 4:
        raise HuabiError(f"{path.name}: not a ZoeDepth checkpoint (needs numbered BEiT blocks and 4 attractors)")
    hidden = int(tensors[f"{BEIT}.cls_token"].shape[-1])
    patch = int(tensors[f"{BEIT}.patch_embed.proj.weight"].shape[-1])
    table = tensors[f"{BEIT}.blocks.0.attn.relative_position_bias_table"]
    span = math.isqrt(int(table.shape[0]) - 3)  # (2 * window - 1) ** 2 + 3 rows
    heads = int(table.shape[1])
    if span * span + 3 != table.shape[0] or span % 2 == 0 or hidden % heads:
        raise HuabiError(f"{path.name}: not a ZoeDepth checkpoint (relative_position_bias_table {tuple(table.shape)})")
    return ZoeShape(
        hidden=hidden,
        layers=layers,
        heads=heads,
        intermediate=int(tensors[f"{BEIT}.blocks.0.mlp.fc1.weight"].shape[0]),
        patch=patch,
        image_size=(span + 1) // 2 * patch,
        neck=tuple(int(tensors[f"core.core.pretrained.act_postprocess{i}.3.weight"].shape[0]) for i in range(1, 5)),
        fusion=int(tensors[f"{SCRATCH}.layer1_rn.weight"].shape[0]),
        relative_features=int(tensors[f"{SCRATCH}.output_conv.2.weight"].shape[0]),
        bottleneck=int(tensors["conv2.weight"].shape[0]),
        bins=int(tensors["seed_bin_regressor._net.2.weight"].shape[0]),
        bin_embedding=int(tensors["seed_projector._net.2.weight"].shape[0]),
        attractors=tuple(int(tensors[f"attractors.{i}._net.2.weight"].shape[0]) for i in range(4)),
    )


def zoe_layers(layers: int) -> tuple[int, ...]:
    """The BEiT blocks (0-based) the DPT neck reads: MiDaS's hooks 5, 11, 17, 23 for 24 blocks."""
    return tuple((k + 1) * layers // 4 - 1 for k in range(4))


def zoe_config(shape: ZoeShape):
    from transformers import BeitConfig, ZoeDepthConfig

    backbone = BeitConfig(
        image_size=shape.image_size,
        patch_size=shape.patch,
        num_hidden_layers=shape.layers,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        use_relative_position_bias=True,
        use_absolute_position_embeddings=False,
        use_mean_pooling=True,
        layer_norm_eps=1e-6,  # timm's BEiT, the original
        reshape_hidden_states=False,
        out_features=[f"stage{index + 1}" for index in zoe_layers(shape.layers)],
    )
    return ZoeDepthConfig(
        backbone_config=backbone,
        neck_hidden_sizes=list(shape.neck),
        fusion_hidden_size=shape.fusion,
        num_relative_features=shape.relative_features,
        bottleneck_features=shape.bottleneck,
        bin_embedding_dim=shape.bin_embedding,
        num_attractors=list(shape.attractors),
        bin_centers_type="softplus",
        bin_configurations=[{"name": "nyu", "n_bins": shape.bins, "min_depth": ZOE_MIN_DEPTH,
                             "max_depth": ZOE_MAX_DEPTH}],
    )


def zoe_key_map(shape: ZoeShape) -> dict[str, str]:
    """Original (ZoeDepth repo) key -> transformers key, all but BEiT's fused qkv."""
    names = {
        f"{BEIT}.cls_token": "backbone.beit.embeddings.cls_token",
        f"{BEIT}.patch_embed.proj.weight": "backbone.beit.embeddings.patch_embeddings.projection.weight",
        f"{BEIT}.patch_embed.proj.bias": "backbone.beit.embeddings.patch_embeddings.projection.bias",
    }
    pairs: dict[str, str] = {}
    for i in range(shape.layers):
        source, target = f"{BEIT}.blocks.{i}", f"backbone.beit.layers.{i}"
        names[f"{source}.gamma_1"] = f"{target}.lambda_1"
        names[f"{source}.gamma_2"] = f"{target}.lambda_2"
        names[f"{source}.attn.q_bias"] = f"{target}.attention.q_proj.bias"
        names[f"{source}.attn.v_bias"] = f"{target}.attention.v_proj.bias"
        names[f"{source}.attn.relative_position_bias_table"] = (
            f"{target}.relative_position_bias.relative_position_bias_table")
        pairs[f"{source}.attn.proj"] = f"{target}.attention.o_proj"
        pairs[f"{source}.norm1"] = f"{target}.layernorm_before"
        pairs[f"{source}.norm2"] = f"{target}.layernorm_after"
        pairs[f"{source}.mlp.fc1"] = f"{target}.mlp.fc1"
        pairs[f"{source}.mlp.fc2"] = f"{target}.mlp.fc2"
    for stage in range(1, 5):
        source, target = f"core.core.pretrained.act_postprocess{stage}", "neck.reassemble_stage"
        pairs[f"{source}.0.project.0"] = f"{target}.readout_projects.{stage - 1}.0"
        pairs[f"{source}.3"] = f"{target}.layers.{stage - 1}.projection"
        if stage != 3:  # stage 3 keeps the patch grid: no resize layer
            pairs[f"{source}.4"] = f"{target}.layers.{stage - 1}.resize"
        names[f"{SCRATCH}.layer{stage}_rn.weight"] = f"neck.convs.{stage - 1}.weight"
        refine, fusion = f"{SCRATCH}.refinenet{stage}", f"neck.fusion_stage.layers.{4 - stage}"
        pairs[f"{refine}.out_conv"] = f"{fusion}.projection"
        for unit in (1, 2):
            for conv in (1, 2):
                pairs[f"{refine}.resConfUnit{unit}.conv{conv}"] = f"{fusion}.residual_layer{unit}.convolution{conv}"
    for index, conv in ((0, "conv1"), (2, "conv2"), (4, "conv3")):
        pairs[f"{SCRATCH}.output_conv.{index}"] = f"relative_head.{conv}"
    pairs["conv2"] = "metric_head.conv2"
    mlps = ["seed_bin_regressor", "seed_projector"] + [f"projectors.{i}" for i in range(4)]
    mlps += [f"attractors.{i}" for i in range(4)]
    for mlp in mlps:
        pairs[f"{mlp}._net.0"] = f"metric_head.{mlp}.conv1"
        pairs[f"{mlp}._net.2"] = f"metric_head.{mlp}.conv2"
    for index in (0, 2):
        pairs[f"conditional_log_binomial.mlp.{index}"] = f"metric_head.conditional_log_binomial.mlp.{index}"
    for source, target in pairs.items():
        names[f"{source}.weight"] = f"{target}.weight"
        names[f"{source}.bias"] = f"{target}.bias"
    return names


def convert_zoe(tensors: dict[str, torch.Tensor], shape: ZoeShape) -> tuple[dict[str, torch.Tensor], list[str]]:
    names = zoe_key_map(shape)
    converted: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in tensors.items():
        match = re.fullmatch(rf"{re.escape(BEIT)}\.blocks\.(\d+)\.attn\.qkv\.weight", key)
        if match and int(match.group(1)) < shape.layers:
            target = f"backbone.beit.layers.{match.group(1)}.attention"
            for index, part in enumerate(("q_proj", "k_proj", "v_proj")):
                converted[f"{target}.{part}.weight"] = value[index * shape.hidden:(index + 1) * shape.hidden]
        elif key in names:
            converted[names[key]] = value
        elif not IGNORED.fullmatch(key):
            unexpected.append(key)
    return converted, unexpected


def _materialise_buffers(model: torch.nn.Module) -> None:
    """The binomial constants are non-persistent buffers: not in the file, left on meta by the load."""
    for module in model.modules():
        if hasattr(module, "k_idx") and hasattr(module, "k_minus_1") and hasattr(module, "k"):
            module.k_idx = torch.arange(0, module.k).view(1, -1, 1, 1)
            module.k_minus_1 = torch.tensor([module.k - 1]).view(1, -1, 1, 1)
    left = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if left:
        raise HuabiError(f"ZoeDepth: buffers without values after loading ({', '.join(left[:3])})")


def load_zoe(path: Path, device: torch.device) -> LoadedDepthNet:
    from transformers import ZoeDepthForDepthEstimation

    tensors = strip_prefix(read_annotator_weights(path), "module.")
    shape = parse_shapes(zoe_shape, tensors, path, WHAT)
    converted, unexpected = convert_zoe(tensors, shape)
    original_names = {target: source for source, target in zoe_key_map(shape).items()}
    for layer in range(shape.layers):
        for part in ("q_proj", "k_proj", "v_proj"):
            original_names[f"backbone.beit.layers.{layer}.attention.{part}.weight"] = f"{BEIT}.blocks.{layer}.attn.qkv.weight"
    with torch.device("meta"):
        model = ZoeDepthForDepthEstimation(zoe_config(shape))
    load_strict(model, converted, path, WHAT, unexpected, original_names)
    _materialise_buffers(model)
    return LoadedDepthNet(model.to(device).eval(), "zoe", device)


# --------------------------------------------------------------------------- processing


def zoe_input_size(height: int, width: int, target: tuple[int, int] = ZOE_NET_SIZE,
                   multiple: int = ZOE_MULTIPLE) -> tuple[int, int]:
    """MiDaS's "minimal" keep-aspect resize: one scale (the one nearer 1), sides rounded to ``multiple``."""
    scale_h, scale_w = target[0] / height, target[1] / width
    scale = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h
    return (int(np.round(scale * height / multiple) * multiple), int(np.round(scale * width / multiple) * multiple))


def zoe_padding(height: int, width: int) -> tuple[int, int]:
    return int(np.sqrt(height / 2) * PAD_FACTOR), int(np.sqrt(width / 2) * PAD_FACTOR)


def zoe_metric_depth(model: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """One pass of ZoeDepth's padded inference: [1, 3, H, W] in [0, 1] -> metric depth [1, 1, H, W]."""
    functional = torch.nn.functional
    pad_h, pad_w = zoe_padding(*image.shape[-2:])
    padded = functional.pad(image, [pad_w, pad_w, pad_h, pad_h], mode="reflect")
    size = zoe_input_size(*padded.shape[-2:])
    pixels = functional.interpolate(padded, size, mode="bilinear", align_corners=True) * 2.0 - 1.0
    depth = model(pixel_values=pixels).predicted_depth[:, None]
    if depth.shape[-2:] != padded.shape[-2:]:
        depth = functional.interpolate(depth, padded.shape[-2:], mode="bicubic", align_corners=False)
    height, width = depth.shape[-2:]
    return depth[:, :, pad_h:height - pad_h, pad_w:width - pad_w]


def zoe_raw(net: LoadedDepthNet, image: np.ndarray) -> torch.Tensor:
    """Metric depth (metres, larger = farther), the mirrored pass averaged in: float32 [H, W]."""
    pixels = torch.from_numpy(np.ascontiguousarray(image)).float().to(net.device).permute(2, 0, 1)[None] / 255.0
    depth = zoe_metric_depth(net.model, pixels)
    mirrored = zoe_metric_depth(net.model, torch.flip(pixels, dims=[3]))
    return ((depth + torch.flip(mirrored, dims=[3])) / 2.0)[0, 0]


def zoe_grey(depth: np.ndarray) -> np.ndarray:
    """sd-webui-controlnet's ZoeDetector map: percentiles 2 / 85 -> 1 / 0 (near bright), uint8."""
    depth = depth.astype(np.float32)
    near = np.percentile(depth, NEAR_PERCENTILE)
    far = np.percentile(depth, FAR_PERCENTILE)
    unit = depth.copy()  # in place, as the original: the arithmetic stays float32
    unit -= near
    if far > near:
        unit /= far - near
    unit = 1.0 - unit
    return (unit * 255.0).clip(0, 255).astype(np.uint8)


def detect_zoe(net: LoadedDepthNet, image: np.ndarray, a: float | None, b: float | None) -> np.ndarray:
    height, width = image.shape[:2]
    depth = zoe_raw(net, pad_to_multiple(image)).float().cpu().numpy()
    return grey_map(zoe_grey(depth)[:height, :width])


ANNOTATORS = (
    Annotator("depth_zoe", (ZOE_FILE,), lambda paths, device: load_zoe(paths[ZOE_FILE], device), detect_zoe),
)
