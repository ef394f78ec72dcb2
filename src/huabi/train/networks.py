"""Trainable networks on top of a frozen model: LoRA, LoCon (conv layers), LoHa and OFT.

The base modules are not replaced or edited: every adapter is attached with a forward hook
(``register_forward_hook``, torch's public API) that adds its change to the module's
output, and detached by removing the hook. Names follow kohya's sd-scripts so the saved
file is a kohya/LyCORIS file: ``lora_unet_<module>`` (diffusers module names for SD1/SD2/
huabi-mini, the original LDM names for SDXL, as kohya's SDXL trainer names them),
``lora_te_text_model_<module>`` (``lora_te1_``/``lora_te2_`` for SDXL's two encoders).

Which modules (kohya's defaults): in the UNet every Linear and 1x1 conv inside the
transformer blocks (attention q/k/v/out, feed-forward, proj_in/out); with ``conv_dim``
(LoCon) also the 3x3 convs of the ResNet blocks and the down/up samplers; in the text
encoders the Linear layers of attention and MLP.

Kinds and their maths (``scale = alpha / dim``):

* ``lora``: ``y += scale * up(dropout(down(x)))``; down is kaiming-uniform, up zeros.
* ``loha``: ``dW = (w1_a @ w1_b) * (w2_a @ w2_b) * scale`` (Hadamard product, LyCORIS init:
  ``w2_a`` zeros).
* ``lokr``: ``dW = kron(w1, w2_a @ w2_b) * scale`` with ``w1`` [out1, in1] (zeros at the start)
  and the low-rank ``w2`` [out/out1, in/in1], the factors as close to square roots as the sizes
  allow (LyCORIS LoKr; Linear and 1x1 conv layers).
* ``oft``: block-diagonal orthogonal ``R`` from the constrained Cayley transform of a
  skew-symmetric ``Q = B - B^T`` per block (``Q`` scaled down to Frobenius norm
  ``constraint`` if larger; ``R = (I + Q)(I - Q)^-1``), applied to the output channels:
  ``W'_k = R_k^T W_k`` for the ``k``-th block of output rows, so ``y'_k = R_k^T (y_k - b_k) + b_k``.
  Saved in LyCORIS's ``diag-oft`` layout: ``oft_diag`` [blocks, size, size] and ``alpha``
  (the constraint), which A1111's OFT reader loads.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from huabi.errors import HuabiError
from huabi.models.family import ModelFamily

NETWORK_KINDS = ("lora", "locon", "loha", "lokr", "oft")
UNET_BLOCK_CLASSES = ("Transformer2DModel",)
UNET_CONV_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_BLOCK_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


@dataclass(frozen=True)
class NetworkConfig:
    kind: str = "lora"  # lora (+ conv layers when conv_dim > 0, i.e. LoCon), loha, lokr, oft
    dim: int = 4  # rank (LoRA/LoHa/LoKr); OFT: the wanted number of blocks per layer
    alpha: float = 1.0  # LoRA/LoHa/LoKr: scale = alpha / dim; OFT: the Cayley constraint (0: unconstrained)
    conv_dim: int = 0  # LoCon/LoHa rank of 3x3 convs (0: no conv layers)
    conv_alpha: float = 1.0
    dropout: float = 0.0  # kohya's --network-dropout: on the down projection's output
    train_unet: bool = True
    train_text_encoder: bool = True

    def validate(self) -> None:
        if self.kind not in NETWORK_KINDS:
            raise HuabiError(f"network module must be one of {', '.join(NETWORK_KINDS)}, got {self.kind!r}")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim <= 0:
            raise HuabiError(f"network dim (rank) must be an integer > 0, got {self.dim!r}")
        if isinstance(self.conv_dim, bool) or not isinstance(self.conv_dim, int) or self.conv_dim < 0:
            raise HuabiError(f"conv dim must be an integer >= 0, got {self.conv_dim!r}")
        if not math.isfinite(self.alpha) or self.alpha < 0:
            raise HuabiError(f"network alpha must be >= 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise HuabiError(f"network dropout must be in [0, 1), got {self.dropout!r}")
        if not (self.train_unet or self.train_text_encoder):
            raise HuabiError("nothing to train: both the UNet and the text encoder are excluded")


class LoraAdapter(nn.Module):
    """LoRA / LoCon on a Linear or Conv2d: ``y += scale * up(down(x))``."""

    def __init__(self, base: nn.Module, dim: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.dim = dim
        self.alpha = float(alpha)
        self.dropout = dropout
        if isinstance(base, nn.Conv2d):
            self.lora_down = nn.Conv2d(base.in_channels, dim, base.kernel_size, base.stride, base.padding, base.dilation, bias=False)
            self.lora_up = nn.Conv2d(dim, base.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(base.in_features, dim, bias=False)
            self.lora_up = nn.Linear(dim, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    @property
    def scale(self) -> float:
        return self.alpha / self.dim

    def change(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        hidden = self.lora_down(x.to(self.lora_down.weight.dtype) if not torch.is_autocast_enabled() else x)
        if self.dropout > 0 and self.training:
            hidden = F.dropout(hidden, p=self.dropout)
        return y + self.lora_up(hidden).to(y.dtype) * self.scale

    def file_tensors(self) -> dict[str, Tensor]:
        return {"lora_down.weight": self.lora_down.weight, "lora_up.weight": self.lora_up.weight,
                "alpha": torch.tensor(self.alpha)}


def add_weight_delta(x: Tensor, y: Tensor, base: nn.Module, delta: Tensor) -> Tensor:
    """``y + base's operation with weight delta`` (no bias): the forward of adapters that build a dW.

    ``delta`` is [out, in * kh * kw] or already the base weight's shape; it is applied with the
    base layer's own conv geometry (stride, padding, dilation, groups) or as a Linear.
    """
    delta = delta.reshape(base.weight.shape).to(x.dtype)
    if isinstance(base, nn.Conv2d):
        extra = F.conv2d(x, delta, None, base.stride, base.padding, base.dilation, base.groups)
    else:
        extra = F.linear(x, delta)
    return y + extra.to(y.dtype)


class LohaAdapter(nn.Module):
    """LoHa: ``dW = (w1_a @ w1_b) * (w2_a @ w2_b) * scale``; conv kernels flattened into ``w*_b``."""

    def __init__(self, base: nn.Module, dim: int, alpha: float) -> None:
        super().__init__()
        out_dim = base.weight.shape[0]
        in_dim = base.weight[0].numel()
        self.dim, self.alpha = dim, float(alpha)
        self.hada_w1_a = nn.Parameter(torch.randn(out_dim, dim) * 0.1)
        self.hada_w1_b = nn.Parameter(torch.randn(dim, in_dim))
        self.hada_w2_a = nn.Parameter(torch.zeros(out_dim, dim))
        self.hada_w2_b = nn.Parameter(torch.randn(dim, in_dim))

    def change(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        delta = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * (self.alpha / self.dim)
        return add_weight_delta(x, y, base, delta)

    def file_tensors(self) -> dict[str, Tensor]:
        return {"hada_w1_a": self.hada_w1_a, "hada_w1_b": self.hada_w1_b, "hada_w2_a": self.hada_w2_a,
                "hada_w2_b": self.hada_w2_b, "alpha": torch.tensor(self.alpha)}


def small_factor(size: int) -> int:
    """The largest divisor of ``size`` that is <= sqrt(size) (1 for primes)."""
    for factor in range(int(math.isqrt(size)), 0, -1):
        if size % factor == 0:
            return factor
    return 1


class LokrAdapter(nn.Module):
    """LoKr: ``dW = kron(w1, w2_a @ w2_b) * alpha / dim`` on a Linear or 1x1 conv."""

    def __init__(self, base: nn.Module, dim: int, alpha: float) -> None:
        super().__init__()
        out_dim, in_dim = int(base.weight.shape[0]), int(base.weight[0].numel())
        out1, in1 = small_factor(out_dim), small_factor(in_dim)
        self.dim, self.alpha = dim, float(alpha)
        self.lokr_w1 = nn.Parameter(torch.zeros(out1, in1))
        self.lokr_w2_a = nn.Parameter(torch.empty(out_dim // out1, dim))
        self.lokr_w2_b = nn.Parameter(torch.empty(dim, in_dim // in1))
        nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lokr_w2_b, a=math.sqrt(5))

    def change(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        return add_weight_delta(x, y, base, torch.kron(self.lokr_w1, self.lokr_w2_a @ self.lokr_w2_b) * (self.alpha / self.dim))

    def file_tensors(self) -> dict[str, Tensor]:
        return {"lokr_w1": self.lokr_w1, "lokr_w2_a": self.lokr_w2_a, "lokr_w2_b": self.lokr_w2_b,
                "alpha": torch.tensor(self.alpha)}


def oft_block_count(out_dim: int, wanted_blocks: int) -> int:
    """The largest block count <= ``wanted_blocks`` that divides ``out_dim`` (>= 1)."""
    for blocks in range(min(wanted_blocks, out_dim), 0, -1):
        if out_dim % blocks == 0:
            return blocks
    return 1


def cayley_rotation(blocks: Tensor, constraint: float) -> Tensor:
    """[k, n, n] free parameters -> [k, n, n] orthogonal blocks (constrained Cayley transform)."""
    skew = blocks - blocks.transpose(1, 2)
    if constraint > 0:
        norm = skew.norm()
        skew = skew * (norm.clamp(max=constraint) + 1e-8) / (norm + 1e-8)
    eye = torch.eye(blocks.shape[1], dtype=blocks.dtype, device=blocks.device).expand_as(blocks)
    return (eye + skew) @ torch.linalg.inv(eye - skew)


class OftAdapter(nn.Module):
    """OFT: output channels rotated block-wise by a constrained-Cayley orthogonal matrix."""

    def __init__(self, base: nn.Module, dim: int, constraint: float) -> None:
        super().__init__()
        out_dim = int(base.weight.shape[0])
        self.blocks = oft_block_count(out_dim, dim)
        self.block_size = out_dim // self.blocks
        self.constraint = float(constraint)
        self.oft_diag = nn.Parameter(torch.zeros(self.blocks, self.block_size, self.block_size))

    def change(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        rotation = cayley_rotation(self.oft_diag.float(), self.constraint)
        bias = base.bias
        channel_dim = 1 if isinstance(base, nn.Conv2d) else y.ndim - 1
        moved = y.movedim(channel_dim, -1)
        if bias is not None:
            moved = moved - bias.to(moved.dtype)
        grouped = moved.reshape(*moved.shape[:-1], self.blocks, self.block_size)
        rotated = torch.einsum("knm,...kn->...km", rotation.to(grouped.dtype), grouped).reshape(moved.shape)
        if bias is not None:
            rotated = rotated + bias.to(rotated.dtype)
        return rotated.movedim(-1, channel_dim)

    def file_tensors(self) -> dict[str, Tensor]:
        return {"oft_diag": self.oft_diag, "alpha": torch.tensor(self.constraint)}


def _unet_original_names(unet: nn.Module) -> dict[str, str]:
    from huabi.models.convert import unet_key_table

    return {diffusers: original for original, diffusers in unet_key_table(unet.config)}


def _kohya_unet_name(name: str, original: Mapping[str, str] | None) -> str:
    if original is not None:  # SDXL: kohya names the original (LDM) module tree
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in original:
                name = ".".join([original[prefix], *parts[cut:]])
                break
    return "lora_unet_" + name.replace(".", "_")


def _text_encoder_prefix(index: int, count: int) -> str:
    return "lora_te_" if count == 1 else f"lora_te{index + 1}_"


def find_targets(
    unet: nn.Module, text_encoders: Sequence[nn.Module], family: ModelFamily, config: NetworkConfig
) -> list[tuple[str, nn.Module]]:
    """(kohya module name, base module) for every module the network changes, in a stable order."""
    targets: list[tuple[str, nn.Module]] = []
    if config.train_unet:
        original = _unet_original_names(unet) if family in (ModelFamily.SDXL, ModelFamily.SDXL_REFINER) else None
        seen: set[int] = set()
        conv = config.conv_dim > 0 and config.kind in ("lora", "locon", "loha")
        for block_name, block in unet.named_modules():
            kind = type(block).__name__
            if kind not in UNET_BLOCK_CLASSES and not (conv and kind in UNET_CONV_CLASSES):
                continue
            for child_name, child in block.named_modules():
                if id(child) in seen:
                    continue
                is_linear = isinstance(child, nn.Linear)
                is_1x1 = isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1)
                is_conv = isinstance(child, nn.Conv2d) and not is_1x1
                if (kind in UNET_BLOCK_CLASSES and (is_linear or is_1x1)) or (kind in UNET_CONV_CLASSES and (is_conv or is_1x1)):
                    seen.add(id(child))
                    full = f"{block_name}.{child_name}" if child_name else block_name
                    targets.append((_kohya_unet_name(full, original), child))
    if config.train_text_encoder:
        for index, encoder in enumerate(text_encoders):
            prefix = _text_encoder_prefix(index, len(text_encoders))
            for block_name, block in encoder.named_modules():
                if type(block).__name__ not in TEXT_BLOCK_CLASSES:
                    continue
                for child_name, child in block.named_modules():
                    if isinstance(child, nn.Linear):
                        full = f"{block_name}.{child_name}"
                        full = full[len("text_model."):] if full.startswith("text_model.") else full
                        targets.append((prefix + "text_model_" + full.replace(".", "_"), child))
    if not targets:
        raise HuabiError("the network found no layers to train in this model")
    return targets


class Network(nn.Module):
    """The adapters of one training run, keyed by kohya module name."""

    def __init__(self, targets: Sequence[tuple[str, nn.Module]], config: NetworkConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.adapters = nn.ModuleDict()
        self._bases: dict[str, nn.Module] = {}
        self._handles: list = []
        for name, base in targets:
            is_big_conv = isinstance(base, nn.Conv2d) and base.kernel_size != (1, 1)
            dim, alpha = (config.conv_dim, config.conv_alpha) if is_big_conv else (config.dim, config.alpha)
            if config.kind in ("lora", "locon"):
                adapter: nn.Module = LoraAdapter(base, dim, alpha, config.dropout)
            elif config.kind == "loha":
                adapter = LohaAdapter(base, dim, alpha)
            elif config.kind == "lokr":
                adapter = LokrAdapter(base, dim, alpha)
            else:
                adapter = OftAdapter(base, dim, alpha)
            self.adapters[name] = adapter.to(device=base.weight.device)
            self._bases[name] = base

    def attach(self) -> "Network":
        self.detach()
        for name, adapter in self.adapters.items():
            base = self._bases[name]

            def hook(module, args, output, adapter=adapter):
                return adapter.change(args[0], output, module)

            self._handles.append(base.register_forward_hook(hook))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def parameter_groups(self, unet_lr: float, text_encoder_lr: float) -> list[dict]:
        """Optimizer groups: UNet adapters at ``unet_lr``, text-encoder adapters at ``text_encoder_lr``."""
        unet = [p for name, a in self.adapters.items() if name.startswith("lora_unet_") for p in a.parameters()]
        text = [p for name, a in self.adapters.items() if not name.startswith("lora_unet_") for p in a.parameters()]
        groups = []
        if unet:
            groups.append({"params": unet, "lr": unet_lr})
        if text:
            groups.append({"params": text, "lr": text_encoder_lr})
        return groups

    def file_tensors(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The kohya/LyCORIS state dict: ``<module>.<parameter>``."""
        out: dict[str, Tensor] = {}
        for name, adapter in self.adapters.items():
            for key, value in adapter.file_tensors().items():
                value = value.detach().cpu().contiguous()
                if dtype is not None and key != "alpha":
                    value = value.to(dtype)
                out[f"{name}.{key}"] = value
        return out

    def names(self) -> Iterator[str]:
        return iter(self.adapters.keys())
