"""ADE20K semantic segmentation (``seg_ufade20k``, ``upernet_global_small.pth``).

The network is UniFormer-S (Li et al. 2022, "UniFormer: Unifying Convolution
and Self-attention") under an UperNet head (Xiao et al. 2018), trained with
mmsegmentation, which sd-webui-controlnet ships.  Written here from the
checkpoint's key layout (mmseg's ``backbone.`` / ``decode_head.`` prefixes):

- four stages, each a patch embedding (strided conv, kernel = stride = 4 then 2,
  LayerNorm over channels) and blocks; stages 1-2 are convolutional blocks
  (depthwise 3x3 position conv, BatchNorm, 1x1 -> depthwise 5x5 "local
  aggregation" -> 1x1, BatchNorm, 1x1 conv MLP with GELU), stages 3-4 global
  self-attention blocks (the same position conv, then pre-norm multi-head
  attention and MLP, LayerNorm eps 1e-6, 64 channels per head); each stage's
  output goes through its own LayerNorm (eps 1e-6);
- UperNet: a pyramid pooling module (average pools to 1, 2, 3, 6, a 1x1
  conv-BN-ReLU each, bilinear back) on the last stage, lateral 1x1 convs on the
  others, a top-down path of bilinear upsampling and sums, 3x3 convs, all levels
  upsampled to 1/4 and fused by a 3x3 conv, a 1x1 classifier over 150 classes.

The stage widths, depths and head width are read from the file (tests use a
narrow copy with the same names).  The training-only auxiliary head's weights
(``auxiliary_head.*``) are accepted and ignored, BatchNorm step counters may be absent; everything
else loads strictly.

Processing as sd-webui-controlnet (mmseg's ``inference_segmentor`` + its
``show_result_pyplot`` at opacity 1): the image, edge-padded to a multiple of
64, rescaled (bilinear, keep ratio) to fit 2048 x 512 (a no-op at the usual
resolutions), its channels reversed (the extension hands an RGB image to a
pipeline that expects BGR and converts it "to RGB"), normalised with ImageNet's
mean/std in 0-255; the logits resized (bilinear) to the network input then to
the padded image, per pixel the most likely class painted with the ADE20K
palette, the padding cropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from huabi.errors import HuabiError
from huabi.models.annotators import Annotator, read_annotator_weights
from huabi.models.annotators.depth import pad_to_multiple
from huabi.models.convert import state_dict_mismatch

UNIFORMER_FILE = "upernet_global_small.pth"
HEAD_DIM = 64
POOL_SCALES = (1, 2, 3, 6)
# mmseg's ADE20K test pipeline: keep-ratio rescale into (long 2048, short 512); ImageNet mean/std in 0-255.
MAX_LONG, MAX_SHORT = 2048, 512
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
AUXILIARY_PREFIX = "auxiliary_head."
# The ADE20K palette (RGB, class order of the dataset's 150 classes), six hex digits a class.
_PALETTE_HEX = (
    "787878b4787806e6e650323204c8037878508c8c8ccc05ffe6e6e604fa07e005ffebff0796053d78784608ff33ff0652"
    "8fff8cccff04ff3307cc46030066c83de6faff06330b66ffff0747ff09e00907e6dcdcdcff095c7009ff08ffd607ffe0"
    "ffb8060aff47ff290a07ffffe0ff086608ffff3d06ffc207ff7a0800ff14ff0829ff05990633ffeb0cffa0961400a3ff"
    "8c8c8cfa0a0f14ff001fff00ff1f00ffe00099ff000000ffff470000ebff00adff1f00ff0bc8c8ff520000fff5003dff"
    "00ff7000ff85ff0000ffa300ff6600c2ff00008fff33ff000052ff00ff2900ffad0a00ffadff0000ff99ff5c00ff00ff"
    "ff00f5ff0066ffad00ff0014ffb8b8001fff00ff3d0047ffff00cc00ffc200ff52000aff0070ff3300ff00c2ff007aff"
    "00ffa3ff990000ff0aff70008fff005200ffa3ff00ffeb0008b8aa8500ff00ff5cb800ffff001f00b8ff00d6ffff0070"
    "5cff0000e0ff70e0ff46b8a0a300ff9900ff47ff00ff00a3ffcc00ff008f00ffeb85ff00ff00ebf500ffff007afff500"
    "0abed4d6ff0000ccff1400ffffff000099ff0029ff00ffcc2900ff29ff00ad00ff00f5ff4700ff7a00ff00ffb8005cff"
    "b8ff000085ffffd60019c2c266ff005c00ff"
)
ADE20K_PALETTE = np.frombuffer(bytes.fromhex(_PALETTE_HEX), dtype=np.uint8).reshape(-1, 3)
CLASSES = len(ADE20K_PALETTE)


@dataclass(frozen=True)
class UniformerConfig:
    """Stage widths/depths, MLP width and UperNet width; the defaults are upernet_global_small's."""

    embed_dims: tuple[int, ...] = (64, 128, 320, 512)
    depths: tuple[int, ...] = (3, 4, 8, 3)
    mlp_ratio: int = 4
    channels: int = 512
    classes: int = CLASSES

    def __post_init__(self) -> None:
        if len(self.embed_dims) != 4 or len(self.depths) != 4:
            raise ValueError("UniFormer has four stages")
        if any(dim % HEAD_DIM for dim in self.embed_dims[2:]):
            raise ValueError(f"attention stage widths must be multiples of {HEAD_DIM}")


class PatchEmbed(nn.Module):
    """Non-overlapping strided conv, then LayerNorm over channels."""

    def __init__(self, inputs: int, outputs: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(inputs, outputs, patch, stride=patch)
        self.norm = nn.LayerNorm(outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TokenMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ConvBlock(nn.Module):
    """Local UniFormer block: position conv, depthwise 5x5 aggregation between 1x1s, conv MLP."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.BatchNorm2d(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = ConvMlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.conv2(self.attn(self.conv1(self.norm1(x))))
        return x + self.mlp(self.norm2(x))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.proj(attended.transpose(1, 2).reshape(batch, tokens, dim))


class AttentionBlock(nn.Module):
    """Global UniFormer block: position conv, then a pre-norm transformer layer over all positions."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, dim // HEAD_DIM)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TokenMlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        tokens = tokens + self.attn(self.norm1(tokens))
        tokens = tokens + self.mlp(self.norm2(tokens))
        return tokens.transpose(1, 2).reshape(batch, channels, height, width)


class UniformerBackbone(nn.Module):
    """Four stages; returns each stage's LayerNorm-ed feature map (strides 4, 8, 16, 32)."""

    def __init__(self, config: UniformerConfig) -> None:
        super().__init__()
        inputs = 3
        for stage, (dim, depth) in enumerate(zip(config.embed_dims, config.depths), start=1):
            block = ConvBlock if stage <= 2 else AttentionBlock
            setattr(self, f"patch_embed{stage}", PatchEmbed(inputs, dim, 4 if stage == 1 else 2))
            setattr(self, f"blocks{stage}", nn.ModuleList(block(dim, dim * config.mlp_ratio) for _ in range(depth)))
            setattr(self, f"norm{stage}", nn.LayerNorm(dim, eps=1e-6))
            inputs = dim

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in range(1, 5):
            x = getattr(self, f"patch_embed{stage}")(x)
            for block in getattr(self, f"blocks{stage}"):
                x = block(x)
            features.append(getattr(self, f"norm{stage}")(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        return features


class ConvBnRelu(nn.Module):
    """mmcv's ConvModule with BN: bias-free conv, BatchNorm, ReLU (names ``conv``, ``bn``)."""

    def __init__(self, inputs: int, outputs: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(inputs, outputs, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _resize(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UperHead(nn.Module):
    def __init__(self, config: UniformerConfig) -> None:
        super().__init__()
        channels, dims = config.channels, config.embed_dims
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvBnRelu(dims[-1], channels, 1)) for scale in POOL_SCALES)
        self.bottleneck = ConvBnRelu(dims[-1] + len(POOL_SCALES) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBnRelu(dim, channels, 1) for dim in dims[:-1])
        self.fpn_convs = nn.ModuleList(ConvBnRelu(channels, channels, 3) for _ in dims[:-1])
        self.fpn_bottleneck = ConvBnRelu(len(dims) * channels, channels, 3)
        self.conv_seg = nn.Conv2d(channels, config.classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        top = features[-1]
        pooled = [top] + [_resize(branch(top), top.shape[2:]) for branch in self.psp_modules]
        laterals = [conv(feature) for conv, feature in zip(self.lateral_convs, features)]
        laterals.append(self.bottleneck(torch.cat(pooled, dim=1)))
        for level in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[level - 1] = laterals[level - 1] + _resize(laterals[level], laterals[level - 1].shape[2:])
        outputs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        outputs = [outputs[0]] + [_resize(output, outputs[0].shape[2:]) for output in outputs[1:]]
        return self.conv_seg(self.fpn_bottleneck(torch.cat(outputs, dim=1)))


class UniformerUperNet(nn.Module):
    """Image [N, 3, H, W] (normalised) -> class logits [N, classes, H/4, W/4]; names as in the checkpoint."""

    def __init__(self, config: UniformerConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = UniformerBackbone(config)
        self.decode_head = UperHead(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.backbone(x))


def _not_uniformer(path: Path, detail: str) -> HuabiError:
    return HuabiError(f"{path.name}: not a UniFormer-UperNet ADE20K checkpoint ({detail})")


def config_from_state(tensors: dict[str, torch.Tensor], path: Path) -> UniformerConfig:
    """Widths and depths read from the tensor shapes (the file's own architecture, checked afterwards)."""
    try:
        dims = tuple(int(tensors[f"backbone.patch_embed{stage}.proj.weight"].shape[0]) for stage in range(1, 5))
        depths = tuple(len({key.split(".")[2] for key in tensors if key.startswith(f"backbone.blocks{stage}.")})
                       for stage in range(1, 5))
        hidden = int(tensors["backbone.blocks1.0.mlp.fc1.weight"].shape[0])
        classes, channels = (int(side) for side in tensors["decode_head.conv_seg.weight"].shape[:2])
        config = UniformerConfig(dims, depths, hidden // dims[0], channels, classes)
    except (KeyError, ValueError, IndexError, ZeroDivisionError) as error:
        raise _not_uniformer(path, f"cannot read its layout: {error}") from None
    if classes != CLASSES:
        raise _not_uniformer(path, f"{classes} classes, expected ADE20K's {CLASSES}")
    return config


@dataclass(frozen=True)
class LoadedUniformer:
    model: UniformerUperNet
    device: torch.device


def load_uniformer(path: Path, device: torch.device) -> LoadedUniformer:
    tensors = read_annotator_weights(path)  # mmseg's {"meta", "state_dict"} is unwrapped by the reader
    tensors = {key: value for key, value in tensors.items() if not key.startswith(AUXILIARY_PREFIX)}
    model = UniformerUperNet(config_from_state(tensors, path))
    expected = model.state_dict()
    # BatchNorm's step counter is unused at inference; files saved without it load all the same.
    tensors.update({key: value for key, value in expected.items()
                    if key.endswith("num_batches_tracked") and key not in tensors})
    problem = state_dict_mismatch(expected, tensors)
    if problem:
        raise _not_uniformer(path, problem)
    model.load_state_dict({key: value.to(expected[key].dtype) for key, value in tensors.items()}, strict=True)
    return LoadedUniformer(model.to(device).eval(), device)


def network_input_size(height: int, width: int) -> tuple[int, int]:
    """mmcv's keep-ratio rescale into (2048, 512): (height, width), rounded half up."""
    scale = min(MAX_LONG / max(height, width), MAX_SHORT / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def uniformer_pixels(image: np.ndarray) -> torch.Tensor:
    """uint8 RGB [H, W, 3] -> normalised [1, 3, h, w] float32 at the network size, channels reversed."""
    import cv2

    height, width = network_input_size(*image.shape[:2])
    if (height, width) != image.shape[:2]:
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    pixels = (image[:, :, ::-1].astype(np.float32) - np.float32(PIXEL_MEAN)) / np.float32(PIXEL_STD)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]


def segment_classes(net: LoadedUniformer, image: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> int64 [H, W] ADE20K class per pixel."""
    pixels = uniformer_pixels(image).to(net.device)
    dtype = next(net.model.parameters()).dtype
    with torch.inference_mode():
        logits = net.model(pixels.to(dtype)).float()
        logits = _resize(_resize(logits, pixels.shape[2:]), image.shape[:2])
    return logits[0].argmax(dim=0).cpu().numpy()


def detect_uniformer(net: LoadedUniformer, image: np.ndarray, a: float | None, b: float | None) -> np.ndarray:
    height, width = image.shape[:2]
    classes = segment_classes(net, pad_to_multiple(image))
    return ADE20K_PALETTE[classes[:height, :width]].astype(np.float32) / 255.0


ANNOTATORS = (
    Annotator("seg_ufade20k", (UNIFORMER_FILE,),
              lambda paths, device: load_uniformer(paths[UNIFORMER_FILE], device), detect_uniformer),
)
