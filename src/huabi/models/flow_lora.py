"""LoRA files for SD3/SD3.5 and FLUX.1 transformers, merged into the weights for a job and restored after.

Layouts read (the ones in circulation):

* kohya sd-scripts: ``lora_unet_<original name with . -> _>.lora_down/lora_up.weight`` + ``.alpha``
  (FLUX: ``lora_unet_double_blocks_0_img_attn_qkv``; SD3: ``lora_unet_joint_blocks_0_x_block_attn_qkv``);
* diffusers / PEFT: ``transformer.<diffusers name>.lora_A/lora_B.weight`` (optional ``.alpha``);
* ComfyUI / BFL names: ``diffusion_model.<original name>.lora_A/lora_B`` or ``lora_down/lora_up``.

Deltas on fused original weights (FLUX ``qkv``, ``linear1``; the final adaLN's swapped halves) go
through the same conversion rows as the weights, so they land on ``to_q``/``to_k``/... exactly.
``delta = weight * (alpha / rank) * up @ down`` (alpha defaults to the rank). Text-encoder parts of a
LoRA are not applied (named in the report). Weights stored fp8 or GGUF-packed cannot take a merge.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from huabi.errors import HuabiError
from huabi.models.transformer_families import (
    Row,
    TransformerFamily,
    flux_to_original,
    original_tensor_to_diffusers,
    rows_for,
    sd3_to_original,
)

_PAIRS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"))


@dataclass
class FlowLoraReport:
    applied: int = 0  # diffusers weights changed
    skipped_text_encoder: int = 0  # LoRA modules for text encoders (not applied)


def _modules(lora: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """``{module name: (down, up, alpha)}`` for every LoRA pair in the file."""
    found = {}
    for key in lora:
        for down_suffix, up_suffix in _PAIRS:
            if key.endswith(down_suffix):
                base = key[: -len(down_suffix)]
                up = lora.get(base + up_suffix)
                if up is None:
                    raise HuabiError(f"LoRA: {key} has no matching {base + up_suffix}")
                alpha = lora.get(base + ".alpha")
                found[base] = (lora[key], up, float(alpha) if alpha is not None else None)
    return found


@dataclass
class _Targets:
    rows_by_original: dict[str, Row]
    rows_by_kohya: dict[str, Row]
    diffusers_names: set[str]
    hidden: int | None
    layout: str = "flux"
    extra: dict = field(default_factory=dict)


def _targets(family: TransformerFamily, transformer: torch.nn.Module) -> _Targets:
    names = {k.replace(".parametrizations.weight.original", ".weight"): v for k, v in transformer.state_dict().items()}
    shapes = {k: torch.empty(v.shape, device="meta") for k, v in names.items()}
    original = flux_to_original(shapes) if family.is_flux else sd3_to_original(shapes)
    layout = "flux" if family.is_flux else "sd3"
    rows = rows_for(layout, original)
    by_original = {row.original.rsplit(".", 1)[0]: row for row in rows if row.original.endswith(".weight")}
    by_kohya = {"lora_unet_" + name.replace(".", "_"): row for name, row in by_original.items()}
    hidden = int(original["img_in.weight"].shape[0]) if family.is_flux else None
    return _Targets(by_original, by_kohya, set(names), hidden, layout)


def lora_deltas(lora: Mapping[str, torch.Tensor], family: TransformerFamily, transformer: torch.nn.Module,
                *, weight: float = 1.0, source: str = "LoRA") -> tuple[dict[str, torch.Tensor], FlowLoraReport]:
    """``{diffusers weight name: delta}`` for ``transformer`` from a LoRA file in any layout above."""
    targets = _targets(family, transformer)
    report = FlowLoraReport()
    deltas: dict[str, torch.Tensor] = {}
    for base, (down, up, alpha) in _modules(lora).items():
        if base.startswith(("lora_te", "text_encoder", "te1", "te2", "lora_te1", "lora_te2")):
            report.skipped_text_encoder += 1
            continue
        rank = down.shape[0]
        scale = weight * ((alpha / rank) if alpha is not None else 1.0)
        delta = (up.float().flatten(1) @ down.float().flatten(1)) * scale
        row = targets.rows_by_kohya.get(base)
        if row is None:
            bare = re.sub(r"^(diffusion_model\.|model\.diffusion_model\.|base_model\.model\.)", "", base)
            row = targets.rows_by_original.get(bare)
        if row is not None:
            for name, part in original_tensor_to_diffusers(row, delta, targets.hidden).items():
                deltas[name] = deltas.get(name, 0) + part
            continue
        name = re.sub(r"^(transformer\.|base_model\.model\.|diffusion_model\.)", "", base) + ".weight"
        if name in targets.diffusers_names:
            deltas[name] = deltas.get(name, 0) + delta
            continue
        raise HuabiError(f"{source}: module {base} does not match a {family.label} transformer weight (a LoRA for another model?)")
    report.applied = len(deltas)
    if not deltas:
        raise HuabiError(f"{source}: no transformer weights for {family.label} in this LoRA")
    return deltas, report


class FlowLoraPatch:
    """Merge deltas into a transformer's weights; ``restore()`` puts the saved originals back exactly."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer
        self._saved: dict[str, torch.Tensor] = {}

    def apply(self, deltas: Mapping[str, torch.Tensor], source: str = "LoRA") -> None:
        from torch.nn.utils import parametrize

        for name, delta in deltas.items():
            owner_name, attribute = name.rsplit(".", 1)
            owner = self.transformer.get_submodule(owner_name)
            if parametrize.is_parametrized(owner, attribute):
                raise HuabiError(f"{source}: cannot merge a LoRA into fp8 or GGUF-packed weights ({name}); use a bf16/fp16 model file")
            param = getattr(owner, attribute)
            if tuple(param.shape) != tuple(delta.shape):
                raise HuabiError(f"{source}: {name} has shape {tuple(param.shape)} but the LoRA's delta is {tuple(delta.shape)}")
            if name not in self._saved:
                self._saved[name] = param.detach().clone()
            with torch.no_grad():
                param.copy_((param.float() + delta.to(param.device)).to(param.dtype))

    def restore(self) -> None:
        with torch.no_grad():
            for name, original in self._saved.items():
                owner_name, attribute = name.rsplit(".", 1)
                getattr(self.transformer.get_submodule(owner_name), attribute).copy_(original)
        self._saved.clear()
