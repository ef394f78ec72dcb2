"""Upscaler model files: ESRGAN / Real-ESRGAN (RRDBNet) and Real-ESRGAN's compact SRVGG net.

Why our own architectures instead of ``spandrel``: spandrel's package
``__init__`` imports every architecture it knows, and its LaMa and
RestoreFormer modules import ``torchvision``, which we must not install (it
replaces the pinned torch with a multi-GB CUDA build). So ``import spandrel``
fails without torchvision, and the two architectures behind nearly every
``.pth`` upscaler people use are small enough to define here.

Recognised key layouts (detected from names and shapes only):

* old ESRGAN (``RRDB_ESRGAN_x4.pth``, most community "4x_*.pth"):
  ``model.0`` first conv, ``model.1.sub.N.RDB{1,2,3}.conv{1..5}.0`` blocks,
  ``model.1.sub.<last>`` trunk conv, then per 2x stage an upsample conv every
  3 indices, an HR conv and the last conv;
* new Real-ESRGAN / BasicSR (``RealESRGAN_x4plus.pth``): ``conv_first``,
  ``body.N.rdb{1,2,3}.conv{1..5}``, ``conv_body``, ``conv_up1..k``, ``conv_hr``,
  ``conv_last``; x2/x1 models take pixel-unshuffled input (12 / 48 channels);
* compact (``realesr-general-x4v3.pth``, ``realesr-animevideov3.pth``):
  ``body.0`` conv, PReLU ``body.1``, then conv/PReLU pairs, last conv to
  ``3 * scale**2`` channels and a pixel shuffle, plus the nearest-upsampled input.

Files load with safetensors or ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from huabi.errors import HuabiError

UPSCALER_SUFFIXES = (".pth", ".pt", ".safetensors")


# --------------------------------------------------------------------------- architectures


class _DenseBlock(nn.Module):
    """Five 3x3 convs, each seeing every earlier output; scaled residual (ESRGAN's RDB)."""

    def __init__(self, features: int, growth: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(features + i * growth, growth if i < 4 else features, 3, padding=1) for i in range(5)
        )

    def forward(self, x: Tensor) -> Tensor:
        seen = [x]
        for index, conv in enumerate(self.convs):
            out = conv(torch.cat(seen, dim=1))
            if index < 4:
                seen.append(F.leaky_relu(out, 0.2))
        return x + 0.2 * out


class _RRDB(nn.Module):
    def __init__(self, features: int, growth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_DenseBlock(features, growth) for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for block in self.blocks:
            out = block(out)
        return x + 0.2 * out


class RRDBNet(nn.Module):
    """ESRGAN's generator: RRDB trunk at input resolution, then nearest 2x + conv stages.

    ``unshuffle`` > 1: the input is pixel-unshuffled by that factor first (Real-ESRGAN's
    x2/x1 models), so the net's overall scale is ``2**up_stages / unshuffle``.
    """

    def __init__(self, *, in_channels: int = 3, out_channels: int = 3, features: int = 64, growth: int = 32,
                 blocks: int = 23, up_stages: int = 2, unshuffle: int = 1) -> None:
        super().__init__()
        self.unshuffle = unshuffle
        self.conv_first = nn.Conv2d(in_channels * unshuffle**2, features, 3, padding=1)
        self.body = nn.ModuleList(_RRDB(features, growth) for _ in range(blocks))
        self.conv_body = nn.Conv2d(features, features, 3, padding=1)
        self.conv_up = nn.ModuleList(nn.Conv2d(features, features, 3, padding=1) for _ in range(up_stages))
        self.conv_hr = nn.Conv2d(features, features, 3, padding=1)
        self.conv_last = nn.Conv2d(features, out_channels, 3, padding=1)

    @property
    def scale(self) -> int:
        return 2 ** len(self.conv_up) // self.unshuffle

    def forward(self, x: Tensor) -> Tensor:
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        features = self.conv_first(x)
        trunk = features
        for block in self.body:
            trunk = block(trunk)
        features = features + self.conv_body(trunk)
        for conv in self.conv_up:
            features = F.leaky_relu(conv(F.interpolate(features, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(features), 0.2))


class CompactNet(nn.Module):
    """Real-ESRGAN's SRVGGNetCompact: plain conv + PReLU chain at input size, pixel shuffle out."""

    def __init__(self, *, in_channels: int = 3, out_channels: int = 3, features: int = 64, convs: int = 16,
                 scale: int = 4) -> None:
        super().__init__()
        self._scale = scale
        layers: list[nn.Module] = [nn.Conv2d(in_channels, features, 3, padding=1), nn.PReLU(features)]
        for _ in range(convs):
            layers += [nn.Conv2d(features, features, 3, padding=1), nn.PReLU(features)]
        layers.append(nn.Conv2d(features, out_channels * scale**2, 3, padding=1))
        self.body = nn.Sequential(*layers)

    @property
    def scale(self) -> int:
        return self._scale

    def forward(self, x: Tensor) -> Tensor:
        out = F.pixel_shuffle(self.body(x), self._scale)
        return out + F.interpolate(x, scale_factor=self._scale, mode="nearest")


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class UpscalerModel:
    """A loaded upscaler: ``module`` maps [B, 3, H, W] in [0, 1] to [B, 3, H*scale, W*scale]."""

    name: str  # the file's stem, as A1111 names model upscalers
    module: nn.Module
    scale: int
    architecture: str  # "ESRGAN", "RealESRGAN" or "Compact"
    layout: str  # "old ESRGAN", "RealESRGAN" or "compact"
    receptive_radius_px: int  # input pixels of context each output pixel depends on (tiling margin)


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of an upscaler file; pickles only through ``weights_only=True``."""
    if not path.is_file():
        raise HuabiError(f"upscaler: {path}: no such file")
    if path.suffix not in UPSCALER_SUFFIXES:
        raise HuabiError(f"upscaler: {path.name}: expected one of {', '.join(UPSCALER_SUFFIXES)}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, or a pickle with code in it
        raise HuabiError(f"upscaler: {path.name}: cannot be read as a weights file ({type(err).__name__})") from None
    # Real-ESRGAN releases wrap the weights: {"params_ema": {...}} or {"params": {...}}.
    for wrapper in ("params_ema", "params", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise HuabiError(f"upscaler: {path.name}: not a state dict of tensors")
    return {str(k): v for k, v in state.items()}


def build_upscaler(state: dict[str, Tensor], *, name: str = "upscaler") -> UpscalerModel:
    """Detect the layout of ``state`` and return the matching module with its weights loaded."""
    if "model.0.weight" in state and any(k.startswith("model.1.sub.") for k in state):
        return _build_old_esrgan(state, name)
    if "conv_first.weight" in state and "body.0.rdb1.conv1.weight" in state:
        return _build_realesrgan(state, name)
    if "body.0.weight" in state and "body.1.weight" in state and state["body.1.weight"].ndim == 1:
        return _build_compact(state, name)
    sample = ", ".join(sorted(state)[:4])
    raise HuabiError(
        f"upscaler: {name}: unknown upscaler file layout (keys start {sample}); "
        "supported: ESRGAN (model.0...), Real-ESRGAN (conv_first/body.N.rdb...), compact (body.N)"
    )


def load_upscaler(path: str | Path, *, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> UpscalerModel:
    """Read, detect and load an upscaler file onto ``device``/``dtype`` in eval mode."""
    path = Path(path).expanduser()
    model = build_upscaler(read_state_dict(path), name=path.stem)
    model.module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model


_RDB_CONV = re.compile(r"^(\d+)\.(?:RDB|rdb)([123])\.conv([1-5])\.(?:0\.)?(weight|bias)$")


def _rrdb_keys(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Block weights under ``prefix`` renamed to ours: ``body.N.blocks.B.convs.C.weight``."""
    renamed = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        match = _RDB_CONV.match(key[len(prefix):])
        if match:
            block, rdb, conv, kind = match.groups()
            renamed[f"body.{block}.blocks.{int(rdb) - 1}.convs.{int(conv) - 1}.{kind}"] = value
    return renamed


def _load(module: nn.Module, ours: dict[str, Tensor], state: dict[str, Tensor], name: str, layout: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(ours))
    if missing or len(ours) != len(state):
        raise HuabiError(
            f"upscaler: {name}: {layout} layout but keys do not match it "
            f"({len(missing)} missing, e.g. {missing[:1]}; {len(state) - len(ours)} unused)"
        )
    for key, value in ours.items():
        if value.shape != expected[key].shape:
            raise HuabiError(f"upscaler: {name}: {key}: shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")
    module.load_state_dict({k: v.float() for k, v in ours.items()})


def _count_blocks(state: dict[str, Tensor], prefix: str) -> int:
    indices = {int(m.group(1)) for k in state if k.startswith(prefix) and (m := _RDB_CONV.match(k[len(prefix):]))}
    if not indices or indices != set(range(max(indices) + 1)):
        raise HuabiError(f"upscaler: RRDB blocks under {prefix!r} are missing or not numbered 0..N")
    return max(indices) + 1


def _rrdb_radius(blocks: int, up_stages: int) -> int:
    # Each 3x3 conv adds one input pixel of context: first conv, 15 per RRDB, trunk conv;
    # convs after upsampling add a fraction of an input pixel each.
    return 2 + 15 * blocks + up_stages + 2


def _build_old_esrgan(state: dict[str, Tensor], name: str) -> UpscalerModel:
    blocks = _count_blocks(state, "model.1.sub.")
    top_indices = sorted({int(k.split(".")[1]) for k in state if re.match(r"^model\.\d+\.weight$", k)})
    last = top_indices[-1]  # conv_last sits at 4 + 3 * up_stages
    if (last - 4) % 3 or last < 4:
        raise HuabiError(f"upscaler: {name}: old ESRGAN layout with an unexpected last layer model.{last}")
    up_stages = (last - 4) // 3
    first = state["model.0.weight"]
    features, in_channels = first.shape[0], first.shape[1]
    growth = state["model.1.sub.0.RDB1.conv1.0.weight"].shape[0]
    out_channels = state[f"model.{last}.weight"].shape[0]
    module = RRDBNet(in_channels=in_channels, out_channels=out_channels, features=features, growth=growth,
                     blocks=blocks, up_stages=up_stages)
    ours = _rrdb_keys(state, "model.1.sub.")
    table = {"conv_first": "model.0", "conv_body": f"model.1.sub.{blocks}", "conv_hr": f"model.{last - 2}",
             "conv_last": f"model.{last}"}
    table.update({f"conv_up.{i}": f"model.{3 + 3 * i}" for i in range(up_stages)})
    for our_name, their_name in table.items():
        for kind in ("weight", "bias"):
            if f"{their_name}.{kind}" in state:
                ours[f"{our_name}.{kind}"] = state[f"{their_name}.{kind}"]
    _load(module, ours, state, name, "old ESRGAN")
    return UpscalerModel(name, module, module.scale, "ESRGAN", "old ESRGAN", _rrdb_radius(blocks, up_stages))


def _build_realesrgan(state: dict[str, Tensor], name: str) -> UpscalerModel:
    blocks = _count_blocks(state, "body.")
    up_stages = len([k for k in state if re.match(r"^conv_up\d+\.weight$", k)])
    out_channels = state["conv_last.weight"].shape[0]
    first = state["conv_first.weight"]
    features, packed_in = first.shape[0], first.shape[1]
    unshuffle = math.isqrt(packed_in // out_channels) if packed_in % out_channels == 0 else 0
    if unshuffle < 1 or unshuffle**2 * out_channels != packed_in:
        raise HuabiError(f"upscaler: {name}: conv_first takes {packed_in} channels, not 3 times a square")
    growth = state["body.0.rdb1.conv1.weight"].shape[0]
    module = RRDBNet(in_channels=packed_in // unshuffle**2, out_channels=out_channels, features=features,
                     growth=growth, blocks=blocks, up_stages=up_stages, unshuffle=unshuffle)
    ours = _rrdb_keys(state, "body.")
    table = {"conv_first": "conv_first", "conv_body": "conv_body", "conv_hr": "conv_hr", "conv_last": "conv_last"}
    table.update({f"conv_up.{i}": f"conv_up{i + 1}" for i in range(up_stages)})
    for our_name, their_name in table.items():
        for kind in ("weight", "bias"):
            if f"{their_name}.{kind}" in state:
                ours[f"{our_name}.{kind}"] = state[f"{their_name}.{kind}"]
    _load(module, ours, state, name, "RealESRGAN")
    if module.scale < 1:
        raise HuabiError(f"upscaler: {name}: {up_stages} upsampling stages with a {unshuffle}x unshuffle is not an upscaler")
    radius = _rrdb_radius(blocks, up_stages) * unshuffle
    return UpscalerModel(name, module, module.scale, "RealESRGAN", "RealESRGAN", radius)


def _build_compact(state: dict[str, Tensor], name: str) -> UpscalerModel:
    conv_indices = sorted(int(k.split(".")[1]) for k in state if re.match(r"^body\.\d+\.weight$", k)
                          and state[k].ndim == 4)
    first, last = state["body.0.weight"], state[f"body.{conv_indices[-1]}.weight"]
    in_channels, features = first.shape[1], first.shape[0]
    convs = len(conv_indices) - 2
    scale_sq = last.shape[0] // in_channels
    scale = math.isqrt(scale_sq)
    if convs < 0 or scale < 1 or scale * scale * in_channels != last.shape[0]:
        raise HuabiError(f"upscaler: {name}: compact layout with a last conv of {last.shape[0]} channels")
    module = CompactNet(in_channels=in_channels, out_channels=in_channels, features=features, convs=convs, scale=scale)
    _load(module, dict(state), state, name, "compact")
    return UpscalerModel(name, module, scale, "Compact", "compact", convs + 2)


__all__ = [
    "CompactNet",
    "RRDBNet",
    "UPSCALER_SUFFIXES",
    "UpscalerModel",
    "build_upscaler",
    "load_upscaler",
    "read_state_dict",
]
