"""SD3 / SD3.5 and FLUX.1: detection and key conversion for the transformer (MMDiT) families.

These families replace the UNet with a transformer working on 2x2 latent patches and take
their conditioning from up to three text encoders (CLIP-L, OpenCLIP-G, T5-XXL). Their files
come in three original layouts besides diffusers folders:

* Stability's SD3/SD3.5 single files: ``model.diffusion_model.joint_blocks.N.{x_block,context_block}.*``
  plus ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`` and ``first_stage_model.*`` (VAE).
* Black Forest Labs' FLUX.1 files: ``double_blocks.N.*`` / ``single_blocks.N.*`` with no prefix
  (the files BFL publishes), or under ``model.diffusion_model.`` (ComfyUI's saved checkpoints).
* ComfyUI-GGUF files of either transformer (architecture ``flux`` / ``sd3``, names unprefixed).

Detection is by structure only (``TransformerFamily`` is a closed enum):

================  =====================================================================
SD3 Medium        joint_blocks, no q/k norm (``attn.ln_q``), no second attention (``attn2``)
SD3.5 Medium      joint_blocks with ``x_block.attn2`` (MMDiT-X dual attention) and q/k norm
SD3.5 Large       joint_blocks with q/k norm, no ``attn2`` (Large Turbo has the same layout)
FLUX.1 dev        double/single blocks with ``guidance_in`` (the distilled-guidance embedder)
FLUX.1 schnell    double/single blocks without ``guidance_in``
FLUX.1 Fill       FLUX dev layout with 384 input channels (64 latent + 320 mask/image)
================  =====================================================================

Conversion is a table of rows (original name, diffusers name(s), operation); the same rows
run both ways, so huabi can also write files in the original layouts (tests build their tiny
fixtures that way). Operations: ``copy``, ``qkv`` (one fused [3H, ...] tensor <-> to_q/to_k/to_v),
``swap`` (the final adaLN stores (shift, scale), diffusers (scale, shift)) and ``linear1``
(FLUX single blocks fuse q, k, v and the MLP input into one linear).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from huabi.errors import HuabiError

DIFFUSION_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5XXL_PREFIX = "text_encoders.t5xxl.transformer."


class TransformerFamily(str, enum.Enum):
    SD3_MEDIUM = "sd3_medium"
    SD35_MEDIUM = "sd35_medium"
    SD35_LARGE = "sd35_large"  # also SD3.5 Large Turbo: same tensors, fewer steps and no CFG
    FLUX_DEV = "flux_dev"
    FLUX_SCHNELL = "flux_schnell"
    FLUX_FILL = "flux_fill"

    @property
    def is_flux(self) -> bool:
        return self.value.startswith("flux")

    @property
    def is_sd3(self) -> bool:
        return self.value.startswith("sd3")

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {
    TransformerFamily.SD3_MEDIUM: "SD3 Medium",
    TransformerFamily.SD35_MEDIUM: "SD3.5 Medium",
    TransformerFamily.SD35_LARGE: "SD3.5 Large",
    TransformerFamily.FLUX_DEV: "FLUX.1 dev",
    TransformerFamily.FLUX_SCHNELL: "FLUX.1 schnell",
    TransformerFamily.FLUX_FILL: "FLUX.1 Fill",
}

FLUX_LATENT_CHANNELS = 16
FLUX_FILL_IN_CHANNELS = 384  # 64 packed latent + 64 packed masked-image latent + 256 packed mask
_FLUX_CONTROL_IN_CHANNELS = 128  # FLUX.1 Depth/Canny: latent + packed control image


@dataclass(frozen=True)
class DetectedTransformer:
    family: TransformerFamily
    layout: str  # "flux" (BFL names), "sd3" (Stability names) or "diffusers"
    prefix: str  # where the transformer's tensors live in the file ("" or model.diffusion_model.)
    has_clip_l: bool
    has_clip_g: bool
    has_t5: bool
    has_vae: bool


def _transformer_keys(keys: list[str]) -> tuple[str, list[str]]:
    prefixed = [k for k in keys if k.startswith(DIFFUSION_PREFIX)]
    if prefixed:
        return DIFFUSION_PREFIX, [k[len(DIFFUSION_PREFIX):] for k in prefixed]
    return "", keys


def looks_like_transformer(keys) -> bool:
    """Cheap structural test: does this state dict hold an SD3 or FLUX transformer (any layout)?"""
    for key in keys:
        bare = key[len(DIFFUSION_PREFIX):] if key.startswith(DIFFUSION_PREFIX) else key
        if bare.startswith(("joint_blocks.", "double_blocks.", "single_blocks.", "single_transformer_blocks.")):
            return True
        if bare.startswith("transformer_blocks.0.attn.add_q_proj."):  # diffusers MMDiT layout
            return True
    return False


def detect_transformer(state_dict: Mapping[str, torch.Tensor], *, source: str = "state dict") -> DetectedTransformer:
    """Family and layout of an SD3/FLUX state dict, from names and shapes only.

    Raises ``HuabiError`` naming the variant for transformer files huabi does not run
    (FLUX.1 Depth/Canny, Redux, ...), and for anything that is not one of these families.
    """
    keys = list(state_dict)
    prefix, bare = _transformer_keys(keys)
    bare_set = set(bare)

    def shape(name: str) -> tuple[int, ...]:
        return tuple(state_dict[prefix + name].shape)

    if any(k.startswith("double_blocks.") for k in bare):
        layout = "flux"
        in_channels = shape("img_in.weight")[1]
        has_guidance = "guidance_in.in_layer.weight" in bare_set
    elif any(k.startswith("single_transformer_blocks.") for k in bare):
        layout = "diffusers"
        in_channels = shape("x_embedder.weight")[1]
        has_guidance = "time_text_embed.guidance_embedder.linear_1.weight" in bare_set
    elif any(k.startswith("joint_blocks.") for k in bare):
        layout = "sd3"
    elif "transformer_blocks.0.attn.add_q_proj.weight" in bare_set and "pos_embed.pos_embed" in bare_set:
        layout = "diffusers_sd3"
    else:
        raise HuabiError(
            f"{source}: not an SD3 or FLUX transformer (no joint_blocks.*, double_blocks.* or "
            f"single_transformer_blocks.* tensors); first keys: {', '.join(keys[:3])}"
        )

    if layout in ("flux", "diffusers"):
        if in_channels == FLUX_FILL_IN_CHANNELS:
            family = TransformerFamily.FLUX_FILL
        elif in_channels == _FLUX_CONTROL_IN_CHANNELS:
            raise HuabiError(
                f"{source}: FLUX.1 Depth/Canny (128 input channels: latent + control image) is not supported; "
                f"huabi runs FLUX.1 dev, schnell and Fill"
            )
        elif in_channels != 4 * FLUX_LATENT_CHANNELS:
            raise HuabiError(
                f"{source}: FLUX-layout transformer with {in_channels} input channels is an unknown variant "
                f"(FLUX.1 dev/schnell take 64, Fill 384)"
            )
        else:
            family = TransformerFamily.FLUX_DEV if has_guidance else TransformerFamily.FLUX_SCHNELL
        if family is TransformerFamily.FLUX_FILL and not has_guidance:
            raise HuabiError(f"{source}: FLUX.1 Fill layout without a guidance embedder is an unknown variant")
        layout = "flux" if layout == "flux" else "diffusers"
    else:
        if layout == "sd3":
            qk_norm = any(k.endswith("attn.ln_q.weight") for k in bare)
            dual = any(".x_block.attn2." in k for k in bare)
            proj = shape("x_embedder.proj.weight")
        else:
            qk_norm = any(k.endswith("attn.norm_q.weight") for k in bare)
            dual = any(".attn2." in k for k in bare)
            proj = shape("pos_embed.proj.weight")
        if proj[1] != 16:
            raise HuabiError(f"{source}: SD3-layout transformer with {proj[1]} latent channels is an unknown variant (SD3 takes 16)")
        if dual and not qk_norm:
            raise HuabiError(f"{source}: SD3-layout transformer with dual attention but no q/k norm is an unknown variant")
        family = TransformerFamily.SD35_MEDIUM if dual else (TransformerFamily.SD35_LARGE if qk_norm else TransformerFamily.SD3_MEDIUM)
        layout = "sd3" if layout == "sd3" else "diffusers"

    has = lambda p: any(k.startswith(p) for k in keys)  # noqa: E731
    return DetectedTransformer(
        family=family,
        layout=layout,
        prefix=prefix,
        has_clip_l=has(CLIP_L_PREFIX),
        has_clip_g=has(CLIP_G_PREFIX),
        has_t5=has(T5XXL_PREFIX),
        has_vae=has(VAE_PREFIX),
    )


# --------------------------------------------------------------------------- conversion tables


@dataclass(frozen=True)
class Row:
    original: str  # tensor name in the original layout (no prefix), including .weight/.bias/.scale
    diffusers: tuple[str, ...]  # one name, or the parts a fused tensor splits into
    op: str = "copy"  # copy | qkv | swap | linear1


def _linear(original: str, diffusers: str, *, bias: bool = True, op: str = "copy") -> list[Row]:
    rows = [Row(original + ".weight", (diffusers + ".weight",), op)]
    if bias:
        rows.append(Row(original + ".bias", (diffusers + ".bias",), op))
    return rows


def _qkv(original: str, diffusers_base: str, names: tuple[str, str, str], *, bias: bool = True) -> list[Row]:
    rows = [Row(original + ".weight", tuple(f"{diffusers_base}.{n}.weight" for n in names), "qkv")]
    if bias:
        rows.append(Row(original + ".bias", tuple(f"{diffusers_base}.{n}.bias" for n in names), "qkv"))
    return rows


def _embedder(original: str, diffusers: str, first: str, second: str) -> list[Row]:
    return _linear(f"{original}.{first}", f"{diffusers}.linear_1") + _linear(f"{original}.{second}", f"{diffusers}.linear_2")


@dataclass(frozen=True)
class FluxShape:
    double_blocks: int
    single_blocks: int
    guidance: bool


def flux_rows(shape: FluxShape) -> list[Row]:
    """BFL FLUX.1 names <-> diffusers ``FluxTransformer2DModel`` names."""
    rows = _linear("img_in", "x_embedder") + _linear("txt_in", "context_embedder")
    rows += _embedder("time_in", "time_text_embed.timestep_embedder", "in_layer", "out_layer")
    rows += _embedder("vector_in", "time_text_embed.text_embedder", "in_layer", "out_layer")
    if shape.guidance:
        rows += _embedder("guidance_in", "time_text_embed.guidance_embedder", "in_layer", "out_layer")
    for i in range(shape.double_blocks):
        o, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        rows += _linear(f"{o}.img_mod.lin", f"{d}.norm1.linear") + _linear(f"{o}.txt_mod.lin", f"{d}.norm1_context.linear")
        rows += _qkv(f"{o}.img_attn.qkv", f"{d}.attn", ("to_q", "to_k", "to_v"))
        rows += _qkv(f"{o}.txt_attn.qkv", f"{d}.attn", ("add_q_proj", "add_k_proj", "add_v_proj"))
        rows += [
            Row(f"{o}.img_attn.norm.query_norm.scale", (f"{d}.attn.norm_q.weight",)),
            Row(f"{o}.img_attn.norm.key_norm.scale", (f"{d}.attn.norm_k.weight",)),
            Row(f"{o}.txt_attn.norm.query_norm.scale", (f"{d}.attn.norm_added_q.weight",)),
            Row(f"{o}.txt_attn.norm.key_norm.scale", (f"{d}.attn.norm_added_k.weight",)),
        ]
        rows += _linear(f"{o}.img_attn.proj", f"{d}.attn.to_out.0") + _linear(f"{o}.txt_attn.proj", f"{d}.attn.to_add_out")
        rows += _linear(f"{o}.img_mlp.0", f"{d}.ff.net.0.proj") + _linear(f"{o}.img_mlp.2", f"{d}.ff.net.2")
        rows += _linear(f"{o}.txt_mlp.0", f"{d}.ff_context.net.0.proj") + _linear(f"{o}.txt_mlp.2", f"{d}.ff_context.net.2")
    for i in range(shape.single_blocks):
        o, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        rows += _linear(f"{o}.modulation.lin", f"{d}.norm.linear")
        for kind in ("weight", "bias"):
            rows.append(Row(f"{o}.linear1.{kind}", tuple(f"{d}.{n}.{kind}" for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")), "linear1"))
        rows += _linear(f"{o}.linear2", f"{d}.proj_out")
        rows += [
            Row(f"{o}.norm.query_norm.scale", (f"{d}.attn.norm_q.weight",)),
            Row(f"{o}.norm.key_norm.scale", (f"{d}.attn.norm_k.weight",)),
        ]
    rows += _linear("final_layer.linear", "proj_out")
    rows += _linear("final_layer.adaLN_modulation.1", "norm_out.linear", op="swap")
    return rows


@dataclass(frozen=True)
class SD3Shape:
    joint_blocks: int
    qk_norm: bool
    dual_attention_blocks: tuple[int, ...]


def sd3_rows(shape: SD3Shape) -> list[Row]:
    """Stability SD3/SD3.5 names <-> diffusers ``SD3Transformer2DModel`` names."""
    rows = [Row("pos_embed", ("pos_embed.pos_embed",))] + _linear("x_embedder.proj", "pos_embed.proj")
    rows += _embedder("t_embedder.mlp", "time_text_embed.timestep_embedder", "0", "2")
    rows += _embedder("y_embedder.mlp", "time_text_embed.text_embedder", "0", "2")
    rows += _linear("context_embedder", "context_embedder")
    last = shape.joint_blocks - 1
    for i in range(shape.joint_blocks):
        o, d = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        x, c = f"{o}.x_block", f"{o}.context_block"
        rows += _qkv(f"{x}.attn.qkv", f"{d}.attn", ("to_q", "to_k", "to_v"))
        rows += _qkv(f"{c}.attn.qkv", f"{d}.attn", ("add_q_proj", "add_k_proj", "add_v_proj"))
        if shape.qk_norm:
            rows += [
                Row(f"{x}.attn.ln_q.weight", (f"{d}.attn.norm_q.weight",)),
                Row(f"{x}.attn.ln_k.weight", (f"{d}.attn.norm_k.weight",)),
                Row(f"{c}.attn.ln_q.weight", (f"{d}.attn.norm_added_q.weight",)),
                Row(f"{c}.attn.ln_k.weight", (f"{d}.attn.norm_added_k.weight",)),
            ]
        rows += _linear(f"{x}.attn.proj", f"{d}.attn.to_out.0")
        rows += _linear(f"{x}.adaLN_modulation.1", f"{d}.norm1.linear")
        rows += _linear(f"{x}.mlp.fc1", f"{d}.ff.net.0.proj") + _linear(f"{x}.mlp.fc2", f"{d}.ff.net.2")
        if i == last:  # the last context block only feeds the image stream: no output projection or MLP
            rows += _linear(f"{c}.adaLN_modulation.1", f"{d}.norm1_context.linear", op="swap")
        else:
            rows += _linear(f"{c}.attn.proj", f"{d}.attn.to_add_out")
            rows += _linear(f"{c}.adaLN_modulation.1", f"{d}.norm1_context.linear")
            rows += _linear(f"{c}.mlp.fc1", f"{d}.ff_context.net.0.proj") + _linear(f"{c}.mlp.fc2", f"{d}.ff_context.net.2")
        if i in shape.dual_attention_blocks:
            rows += _qkv(f"{x}.attn2.qkv", f"{d}.attn2", ("to_q", "to_k", "to_v"))
            rows += _linear(f"{x}.attn2.proj", f"{d}.attn2.to_out.0")
            if shape.qk_norm:
                rows += [
                    Row(f"{x}.attn2.ln_q.weight", (f"{d}.attn2.norm_q.weight",)),
                    Row(f"{x}.attn2.ln_k.weight", (f"{d}.attn2.norm_k.weight",)),
                ]
    rows += _linear("final_layer.linear", "proj_out")
    rows += _linear("final_layer.adaLN_modulation.1", "norm_out.linear", op="swap")
    return rows


def block_count(keys, pattern: str) -> int:
    regex = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := regex.match(k))}
    if found and sorted(found) != list(range(len(found))):
        raise HuabiError(f"transformer blocks {sorted(found)[:5]}... are not numbered 0..N-1")
    return len(found)


def flux_shape(original: Mapping[str, torch.Tensor]) -> FluxShape:
    return FluxShape(
        double_blocks=block_count(original, r"^double_blocks\.(\d+)\."),
        single_blocks=block_count(original, r"^single_blocks\.(\d+)\."),
        guidance="guidance_in.in_layer.weight" in original,
    )


def sd3_shape(original: Mapping[str, torch.Tensor]) -> SD3Shape:
    dual = sorted({int(m.group(1)) for k in original if (m := re.match(r"^joint_blocks\.(\d+)\.x_block\.attn2\.", k))})
    return SD3Shape(
        joint_blocks=block_count(original, r"^joint_blocks\.(\d+)\."),
        qk_norm=any(k.endswith(".attn.ln_q.weight") for k in original),
        dual_attention_blocks=tuple(dual),
    )


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _apply_rows(
    source: Mapping[str, torch.Tensor], rows: list[Row], *, to_diffusers: bool, what: str, hidden: int | None = None
) -> dict[str, torch.Tensor]:
    """Convert every tensor of ``source`` by ``rows``; a missing or left-over tensor is an error naming it."""
    result: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for row in rows:
        if to_diffusers:
            if row.original not in source:
                raise HuabiError(f"{what}: missing tensor {row.original}")
            tensor = source[row.original]
            used.add(row.original)
            if row.op == "copy":
                result[row.diffusers[0]] = tensor
            elif row.op == "swap":
                result[row.diffusers[0]] = _swap_halves(tensor)
            elif row.op == "qkv":
                if tensor.shape[0] % 3:
                    raise HuabiError(f"{what}: {row.original} has {tensor.shape[0]} rows, not q, k and v")
                for name, part in zip(row.diffusers, tensor.chunk(3, dim=0)):
                    result[name] = part
            elif row.op == "linear1":
                if hidden is None or tensor.shape[0] <= 3 * hidden:
                    raise HuabiError(f"{what}: {row.original} has {tensor.shape[0]} rows, cannot split q, k, v and MLP")
                parts = torch.split(tensor, [hidden, hidden, hidden, tensor.shape[0] - 3 * hidden], dim=0)
                for name, part in zip(row.diffusers, parts):
                    result[name] = part
        else:
            missing = [n for n in row.diffusers if n not in source]
            if missing:
                raise HuabiError(f"{what}: missing tensor {missing[0]}")
            used.update(row.diffusers)
            parts = [source[n] for n in row.diffusers]
            if row.op == "copy":
                result[row.original] = parts[0]
            elif row.op == "swap":
                result[row.original] = _swap_halves(parts[0])
            else:
                result[row.original] = torch.cat(parts, dim=0)
    left = sorted(set(source) - used)
    if left:
        raise HuabiError(f"{what}: {len(left)} tensors have no conversion, e.g. {', '.join(left[:3])}")
    return result


def flux_to_diffusers(original: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL FLUX.1 transformer tensors (no prefix) -> diffusers names, every tensor accounted for."""
    hidden = int(original["img_in.weight"].shape[0]) if "img_in.weight" in original else None
    return _apply_rows(original, flux_rows(flux_shape(original)), to_diffusers=True, what="FLUX transformer", hidden=hidden)


def flux_to_original(diffusers_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    shape = FluxShape(
        double_blocks=block_count(diffusers_sd, r"^transformer_blocks\.(\d+)\."),
        single_blocks=block_count(diffusers_sd, r"^single_transformer_blocks\.(\d+)\."),
        guidance="time_text_embed.guidance_embedder.linear_1.weight" in diffusers_sd,
    )
    return _apply_rows(diffusers_sd, flux_rows(shape), to_diffusers=False, what="FLUX transformer (diffusers -> BFL)")


def sd3_to_diffusers(original: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stability SD3/SD3.5 transformer tensors (no prefix) -> diffusers names."""
    return _apply_rows(original, sd3_rows(sd3_shape(original)), to_diffusers=True, what="SD3 transformer")


def sd3_to_original(diffusers_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    dual = sorted({int(m.group(1)) for k in diffusers_sd if (m := re.match(r"^transformer_blocks\.(\d+)\.attn2\.", k))})
    shape = SD3Shape(
        joint_blocks=block_count(diffusers_sd, r"^transformer_blocks\.(\d+)\."),
        qk_norm=any(k.endswith(".attn.norm_q.weight") for k in diffusers_sd),
        dual_attention_blocks=tuple(dual),
    )
    return _apply_rows(diffusers_sd, sd3_rows(shape), to_diffusers=False, what="SD3 transformer (diffusers -> original)")


def transformer_to_diffusers(bare: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Transformer tensors (prefix removed) of ``layout`` -> diffusers names."""
    if layout == "flux":
        return flux_to_diffusers(bare)
    if layout == "sd3":
        return sd3_to_diffusers(bare)
    return dict(bare)


def original_tensor_to_diffusers(row: Row, tensor: torch.Tensor, hidden: int | None = None) -> dict[str, torch.Tensor]:
    """One original-layout tensor (or a weight delta of its shape) split/swapped into its diffusers tensors."""
    return _apply_rows({row.original: tensor}, [row], to_diffusers=True, what="transformer tensor", hidden=hidden)


def rows_for(family_layout: str, original_names: Mapping[str, torch.Tensor]) -> list[Row]:
    """The conversion rows of a transformer given (some of) its original names and shapes."""
    return flux_rows(flux_shape(original_names)) if family_layout == "flux" else sd3_rows(sd3_shape(original_names))
