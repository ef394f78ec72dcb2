"""Key conversion between the original (LDM / A1111 single-file) layout and diffusers.

Conversion is a table of module-path prefixes, generated from the model's
config so that every block of that config has its row: ``original prefix ->
diffusers prefix``. A key converts by its longest prefix found in the table;
a key with no row is an error (never silently dropped). The same table read
backwards converts diffusers -> original, so round trips are exact.

The UNet layout is shared by SD1, SD2, SDXL and the SDXL refiner; all keys
here are *without* the ``model.diffusion_model.`` / ``first_stage_model.``
prefixes. Spatial transformer blocks have identical inner names in both
layouts, so they map as whole prefixes. The VAE's mid-block attention
projections are 1x1 convs in the original and Linear layers in diffusers: those
four weights are reshaped, nothing else is touched (tensors are shared, not copied).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from huabi.errors import HuabiError

# Resnet block: original sub-module -> diffusers sub-module.
_UNET_RESNET = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)
_VAE_RESNET = (
    ("norm1", "norm1"),
    ("conv1", "conv1"),
    ("norm2", "norm2"),
    ("conv2", "conv2"),
    ("nin_shortcut", "conv_shortcut"),
)
_VAE_ATTENTION = (
    ("norm", "group_norm"),
    ("q", "to_q"),
    ("k", "to_k"),
    ("v", "to_v"),
    ("proj_out", "to_out.0"),
)
# diffusers-side names of the VAE attention weights that are conv 1x1 in the original.
_VAE_LINEAR_WEIGHTS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")


def _resnet_rows(original: str, diffusers: str, inner: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(f"{original}.{o}", f"{diffusers}.{d}") for o, d in inner]


def unet_key_table(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(original prefix, diffusers prefix) rows for a UNet2DConditionModel ``config``."""
    channels = list(config["block_out_channels"])
    levels = len(channels)
    per_level = int(config["layers_per_block"])
    down_attention = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    up_attention = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    rows: list[tuple[str, str]] = [
        ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"),
        ("input_blocks.0.0", "conv_in"),
        ("out.0", "conv_norm_out"),
        ("out.2", "conv_out"),
    ]
    if config.get("addition_embed_type") == "text_time":
        rows += [("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2")]

    for level in range(levels):
        for layer in range(per_level):
            index = 1 + level * (per_level + 1) + layer
            rows += _resnet_rows(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{layer}", _UNET_RESNET)
            if down_attention[level]:
                rows.append((f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{layer}"))
        if level < levels - 1:
            index = (level + 1) * (per_level + 1)
            rows.append((f"input_blocks.{index}.0.op", f"down_blocks.{level}.downsamplers.0.conv"))

    rows += _resnet_rows("middle_block.0", "mid_block.resnets.0", _UNET_RESNET)
    rows.append(("middle_block.1", "mid_block.attentions.0"))
    rows += _resnet_rows("middle_block.2", "mid_block.resnets.1", _UNET_RESNET)

    # Up blocks run from the lowest resolution back up; each has one more res-block.
    for level in range(levels):
        for layer in range(per_level + 1):
            index = level * (per_level + 1) + layer
            rows += _resnet_rows(f"output_blocks.{index}.0", f"up_blocks.{level}.resnets.{layer}", _UNET_RESNET)
            if up_attention[level]:
                rows.append((f"output_blocks.{index}.1", f"up_blocks.{level}.attentions.{layer}"))
            if layer == per_level and level < levels - 1:
                slot = 2 if up_attention[level] else 1
                rows.append((f"output_blocks.{index}.{slot}.conv", f"up_blocks.{level}.upsamplers.0.conv"))
    return rows


def vae_key_table(levels: int, per_level: int) -> list[tuple[str, str]]:
    """(original prefix, diffusers prefix) rows for an AutoencoderKL with ``levels`` resolution levels."""
    rows: list[tuple[str, str]] = []
    for side in ("encoder", "decoder"):
        rows += [
            (f"{side}.conv_in", f"{side}.conv_in"),
            (f"{side}.conv_out", f"{side}.conv_out"),
            (f"{side}.norm_out", f"{side}.conv_norm_out"),
        ]
        rows += _resnet_rows(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", _VAE_RESNET)
        rows += _resnet_rows(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", _VAE_RESNET)
        rows += _resnet_rows(f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", _VAE_ATTENTION)
    for level in range(levels):
        for layer in range(per_level):
            rows += _resnet_rows(f"encoder.down.{level}.block.{layer}", f"encoder.down_blocks.{level}.resnets.{layer}", _VAE_RESNET)
        if level < levels - 1:
            rows.append((f"encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv"))
        # The original numbers decoder levels from the bottom; diffusers from the top.
        up = levels - 1 - level
        for layer in range(per_level + 1):
            rows += _resnet_rows(f"decoder.up.{level}.block.{layer}", f"decoder.up_blocks.{up}.resnets.{layer}", _VAE_RESNET)
        if level > 0:
            rows.append((f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv"))
    rows += [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    return rows


def rename_keys(state_dict: Mapping[str, torch.Tensor], table: Mapping[str, str], what: str) -> dict[str, torch.Tensor]:
    """Rename every key by its longest table prefix; unknown keys are an error naming them."""
    result: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            target = table.get(".".join(parts[:cut]))
            if target is not None:
                result[target + "." + ".".join(parts[cut:])] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise HuabiError(f"{what}: {len(unknown)} keys have no conversion, e.g. {', '.join(sorted(unknown)[:3])}")
    return result


def unet_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Original-layout UNet keys (no ``model.diffusion_model.`` prefix) -> diffusers keys."""
    return rename_keys(state_dict, dict(unet_key_table(config)), "UNet (original -> diffusers)")


def unet_to_original(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers UNet keys -> original-layout keys (no prefix)."""
    return rename_keys(state_dict, {d: o for o, d in unet_key_table(config)}, "UNet (diffusers -> original)")


def _vae_shape(keys: Iterable[str], down: str, block: str) -> tuple[int, int]:
    """(levels, res-blocks per encoder level), read from key names of either layout."""
    import re

    keys = list(keys)
    level_pattern = re.compile(rf"^encoder\.{re.escape(down)}\.(\d+)\.")
    levels = {int(m.group(1)) for k in keys if (m := level_pattern.match(k))}
    layer_pattern = re.compile(rf"^encoder\.{re.escape(down)}\.0\.{re.escape(block)}\.(\d+)\.")
    layers = {int(m.group(1)) for k in keys if (m := layer_pattern.match(k))}
    if not levels or not layers:
        raise HuabiError(f"VAE layout not understood: no encoder.{down}.N.{block}.M keys")
    return max(levels) + 1, max(layers) + 1


def vae_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original-layout VAE keys (``encoder.down.*``, no ``first_stage_model.``) -> diffusers AutoencoderKL keys."""
    levels, per_level = _vae_shape(state_dict, "down", "block")
    result = rename_keys(state_dict, dict(vae_key_table(levels, per_level)), "VAE (original -> diffusers)")
    for key, tensor in result.items():
        if key.endswith(_VAE_LINEAR_WEIGHTS) and ".mid_block.attentions." in key and tensor.ndim == 4:
            result[key] = tensor.reshape(tensor.shape[0], tensor.shape[1])  # 1x1 conv -> linear
    return result


def vae_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> original-layout keys (1x1-conv attention weights)."""
    levels, per_level = _vae_shape(state_dict, "down_blocks", "resnets")
    table = {d: o for o, d in vae_key_table(levels, per_level)}
    reshaped = {
        key: (t.reshape(*t.shape, 1, 1) if key.endswith(_VAE_LINEAR_WEIGHTS) and ".mid_block.attentions." in key and t.ndim == 2 else t)
        for key, t in state_dict.items()
    }
    return rename_keys(reshaped, table, "VAE (diffusers -> original)")


def is_diffusers_vae(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(key.startswith("encoder.down_blocks.") for key in state_dict)


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], tensors: Mapping[str, Any], *,
                        shown_names: Mapping[str, str] | None = None, floating: bool = False) -> str | None:
    """What keeps ``tensors`` from loading into a network whose state dict is ``expected``, as one
    phrase for an error line ("missing 2 keys, e.g. a, b; unexpected 1 keys, e.g. c", "KEY has shape
    (3, 4), expected (1, 4)", "KEY is torch.int64, expected floating point weights"); None when it
    loads exactly. Loaders check the whole file this way before loading any of it, so a wrong file
    never leaves a half-loaded network. ``shown_names``: the file's own name for a key
    (checkpoints converted before loading); ``floating``: weights must be floating point
    (BatchNorm's step counter excepted)."""
    shown = shown_names or {}
    missing = list(dict.fromkeys(shown.get(key, key) for key in expected if key not in tensors))
    unexpected = sorted(key for key in tensors if key not in expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys, e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys, e.g. {', '.join(unexpected[:3])}")
        return "; ".join(parts)
    for key, target in expected.items():
        given = tensors[key]
        if not isinstance(given, torch.Tensor):
            return f"{shown.get(key, key)} is a {type(given).__name__}, expected a tensor"
        if tuple(given.shape) != tuple(target.shape):
            return f"{shown.get(key, key)} has shape {tuple(given.shape)}, expected {tuple(target.shape)}"
        if floating and not (given.is_floating_point() or key.endswith("num_batches_tracked")):
            return f"{shown.get(key, key)} is {given.dtype}, expected floating point weights"
    return None


def check_against_module(
    state_dict: Mapping[str, torch.Tensor], module: torch.nn.Module, what: str
) -> None:
    """Every key the module expects is present with its shape, and nothing else (HuabiError otherwise)."""
    problem = state_dict_mismatch(module.state_dict(), state_dict)
    if problem:
        raise HuabiError(f"{what}: weights do not match the inferred architecture: {problem}")
