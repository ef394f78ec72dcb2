"""diffusers configs for the UNet and VAE, inferred from an original-layout state dict.

Everything that is visible in tensor shapes (widths, depths, which levels
have attention, linear vs conv projections, input channels) is read from the
shapes; what is not (attention head counts, latent scaling factor, native
resolution) comes from the family rules below, or from huabi-mini's markers.

``REFERENCE_UNET_CONFIGS`` / ``REFERENCE_VAE_CONFIGS`` hold the full-size
configs of each family as published with the original models, so nothing is
ever fetched from a hub; tests check inference from full-size shapes against them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from huabi.errors import HuabiError
from huabi.models.detect import (
    MARKER_HEAD_DIM,
    MARKER_NATIVE_SIZE,
    MARKER_VAE_NORM_GROUPS,
    MARKER_VAE_SCALING,
    REFINER_BIGG_PREFIX,
    SDXL_BIGG_PREFIX,
    UNET_PREFIX,
    Detected,
    marker_value,
)
from huabi.core.family import ModelFamily, Prediction

SD_VAE_SCALING_FACTOR = 0.18215
SDXL_VAE_SCALING_FACTOR = 0.13025
HUABI_MINI_DEFAULT_NATIVE_SIZE_PX = 256
SD1_HEADS_PER_LEVEL = 8  # SD1 fixes the head *count*; SD2/SDXL fix the head *width*
SD2_SDXL_HEAD_DIM = 64
NORM_NUM_GROUPS = 32  # every SD-family UNet/VAE; GroupNorm group counts are not visible in shapes
# Number of size/crop/aesthetic scalars SDXL embeds next to the pooled text embedding.
_SDXL_TIME_IDS = {ModelFamily.SDXL: 6, ModelFamily.SDXL_REFINER: 5}

_CROSS_DOWN, _DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_CROSS_UP, _UP = "CrossAttnUpBlock2D", "UpBlock2D"

REFERENCE_UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd1": {
        "sample_size": 64, "in_channels": 4, "out_channels": 4,
        "down_block_types": [_CROSS_DOWN, _CROSS_DOWN, _CROSS_DOWN, _DOWN],
        "up_block_types": [_UP, _CROSS_UP, _CROSS_UP, _CROSS_UP],
        "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
        "cross_attention_dim": 768, "attention_head_dim": 8, "use_linear_projection": False,
        "transformer_layers_per_block": 1, "norm_num_groups": 32,
    },
    "sd2_eps": {
        "sample_size": 64, "in_channels": 4, "out_channels": 4,
        "down_block_types": [_CROSS_DOWN, _CROSS_DOWN, _CROSS_DOWN, _DOWN],
        "up_block_types": [_UP, _CROSS_UP, _CROSS_UP, _CROSS_UP],
        "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
        "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
        "transformer_layers_per_block": 1, "norm_num_groups": 32,
    },
    "sd2_v": {
        "sample_size": 96, "in_channels": 4, "out_channels": 4,
        "down_block_types": [_CROSS_DOWN, _CROSS_DOWN, _CROSS_DOWN, _DOWN],
        "up_block_types": [_UP, _CROSS_UP, _CROSS_UP, _CROSS_UP],
        "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
        "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
        "transformer_layers_per_block": 1, "norm_num_groups": 32,
    },
    "sdxl": {
        "sample_size": 128, "in_channels": 4, "out_channels": 4,
        "down_block_types": [_DOWN, _CROSS_DOWN, _CROSS_DOWN],
        "up_block_types": [_CROSS_UP, _CROSS_UP, _UP],
        "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
        "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20], "use_linear_projection": True,
        "transformer_layers_per_block": [1, 2, 10], "norm_num_groups": 32,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
    "sdxl_refiner": {
        "sample_size": 128, "in_channels": 4, "out_channels": 4,
        "down_block_types": [_DOWN, _CROSS_DOWN, _CROSS_DOWN, _DOWN],
        "up_block_types": [_UP, _CROSS_UP, _CROSS_UP, _UP],
        "block_out_channels": [384, 768, 1536, 1536], "layers_per_block": 2,
        "cross_attention_dim": 1280, "attention_head_dim": [6, 12, 24, 24], "use_linear_projection": True,
        "transformer_layers_per_block": 4, "norm_num_groups": 32,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2560,
    },
}

_SD_VAE = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
    "norm_num_groups": 32,
}
REFERENCE_VAE_CONFIGS: dict[str, dict[str, Any]] = {
    "sd1": {**_SD_VAE, "sample_size": 512, "scaling_factor": SD_VAE_SCALING_FACTOR},
    "sd2_v": {**_SD_VAE, "sample_size": 768, "scaling_factor": SD_VAE_SCALING_FACTOR},
    "sdxl": {**_SD_VAE, "sample_size": 1024, "scaling_factor": SDXL_VAE_SCALING_FACTOR},
}


def native_size_px(family: ModelFamily, prediction: Prediction, state_dict: Mapping[str, torch.Tensor] | None = None) -> int:
    """The resolution the family was trained at (SD2: 768 for v-prediction, 512 for epsilon)."""
    if family is ModelFamily.SD1:
        return 512
    if family is ModelFamily.SD2:
        return 768 if prediction is Prediction.V else 512
    if family in (ModelFamily.SDXL, ModelFamily.SDXL_REFINER):
        return 1024
    marked = marker_value(state_dict or {}, MARKER_NATIVE_SIZE)
    return int(marked) if marked is not None else HUABI_MINI_DEFAULT_NATIVE_SIZE_PX


def vae_norm_num_groups(family: ModelFamily, state_dict: Mapping[str, torch.Tensor] | None = None) -> int:
    """GroupNorm groups of the checkpoint's VAE: SD's 32, or what a huabi-mini file marks."""
    if family is ModelFamily.HUABI_MINI:
        marked = marker_value(state_dict or {}, MARKER_VAE_NORM_GROUPS)
        if marked is not None:
            return int(marked)
    return NORM_NUM_GROUPS


def vae_scaling_factor(family: ModelFamily, state_dict: Mapping[str, torch.Tensor] | None = None) -> float:
    if family in (ModelFamily.SDXL, ModelFamily.SDXL_REFINER):
        return SDXL_VAE_SCALING_FACTOR
    if family is ModelFamily.HUABI_MINI:
        marked = marker_value(state_dict or {}, MARKER_VAE_SCALING)
        if marked is not None:
            return float(marked)
    return SD_VAE_SCALING_FACTOR


def _indices(keys: list[str], prefix: str) -> list[int]:
    """Sorted distinct integers N in keys of the form ``<prefix>N.``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return sorted(found)


def _require(sd: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    tensor = sd.get(key)
    if tensor is None:
        raise HuabiError(f"UNet/VAE layout not understood: missing {key} ({what})")
    return tensor


def unet_levels(unet_sd: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(number of resolution levels, res-blocks per level) of an original-layout UNet (prefix stripped)."""
    keys = list(unet_sd)
    inputs = _indices(keys, "input_blocks.")
    if not inputs or inputs != list(range(len(inputs))):
        raise HuabiError("UNet layout not understood: input_blocks are missing or not numbered 0..N")
    downsamplers = [i for i in inputs if f"input_blocks.{i}.0.op.weight" in unet_sd]
    levels = len(downsamplers) + 1
    per_level, remainder = divmod(len(inputs) - 1 - len(downsamplers), levels)
    if remainder or per_level < 1:
        raise HuabiError(f"UNet layout not understood: {len(inputs)} input blocks do not split into {levels} levels")
    expected = [(level + 1) * (per_level + 1) for level in range(levels - 1)]
    if downsamplers != expected:
        raise HuabiError(f"UNet layout not understood: downsamplers at input_blocks {downsamplers}, expected {expected}")
    return levels, per_level


def unet_config_from_original(
    state_dict: Mapping[str, torch.Tensor],
    detected: Detected,
    *,
    vae_scale_factor: int = 8,
) -> dict[str, Any]:
    """A ``UNet2DConditionModel`` config for the UNet under ``model.diffusion_model.``."""
    unet_sd = {k[len(UNET_PREFIX):]: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}
    return unet_config_from_unet(
        unet_sd,
        detected.family,
        prediction=detected.prediction,
        vae_scale_factor=vae_scale_factor,
        pooled_dim=pooled_text_dim(state_dict, detected.family),
        markers=state_dict,
    )


def pooled_text_dim(state_dict: Mapping[str, torch.Tensor], family: ModelFamily) -> int | None:
    prefix = {ModelFamily.SDXL: SDXL_BIGG_PREFIX, ModelFamily.SDXL_REFINER: REFINER_BIGG_PREFIX}.get(family)
    if prefix is None:
        return None
    projection = state_dict.get(prefix + "text_projection")
    if projection is None:
        projection_weight = state_dict.get(prefix + "text_projection.weight")  # some converters store a Linear
        return int(projection_weight.shape[0]) if projection_weight is not None else None
    return int(projection.shape[1])


def unet_config_from_unet(
    unet_sd: Mapping[str, torch.Tensor],
    family: ModelFamily,
    *,
    prediction: Prediction = Prediction.EPSILON,
    vae_scale_factor: int = 8,
    pooled_dim: int | None = None,
    markers: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The config of an original-layout UNet state dict whose keys have no ``model.diffusion_model.`` prefix."""
    levels, per_level = unet_levels(unet_sd)
    conv_in = _require(unet_sd, "input_blocks.0.0.weight", "conv_in")
    conv_out = _require(unet_sd, "out.2.weight", "conv_out")
    channels: list[int] = []
    has_attention: list[bool] = []
    depths: list[int] = []
    cross_dim: int | None = None
    linear: bool | None = None
    for level in range(levels):
        first = 1 + level * (per_level + 1)
        channels.append(int(_require(unet_sd, f"input_blocks.{first}.0.out_layers.3.weight", "res-block conv").shape[0]))
        attn_prefix = f"input_blocks.{first}.1."
        attends = attn_prefix + "proj_in.weight" in unet_sd
        has_attention.append(attends)
        depths.append(len(_indices(list(unet_sd), attn_prefix + "transformer_blocks.")) if attends else 0)
        if attends and cross_dim is None:
            cross_dim = int(unet_sd[attn_prefix + "transformer_blocks.0.attn2.to_k.weight"].shape[1])
            linear = unet_sd[attn_prefix + "proj_in.weight"].ndim == 2
    if cross_dim is None or linear is None:
        raise HuabiError("UNet layout not understood: no level has cross-attention")
    mid_depth = len(_indices(list(unet_sd), "middle_block.1.transformer_blocks."))
    if mid_depth == 0:
        raise HuabiError("UNet layout not understood: middle_block has no attention (middle_block.1)")

    # diffusers uses transformer_layers_per_block[-1] for the mid block; levels
    # without attention ignore their entry.
    attention_depths = {d for d, a in zip(depths, has_attention) if a} | {mid_depth}
    if len(attention_depths) == 1:
        transformer_layers: int | list[int] = mid_depth
    else:
        transformer_layers = [d if a else 1 for d, a in zip(depths, has_attention)]
        if not has_attention[-1]:
            transformer_layers[-1] = mid_depth
        elif transformer_layers[-1] != mid_depth:
            raise HuabiError(f"UNet layout not understood: mid-block depth {mid_depth} differs from last level's {transformer_layers[-1]}")

    config: dict[str, Any] = {
        "sample_size": native_size_px(family, prediction, markers) // vae_scale_factor,
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(conv_out.shape[0]),
        "down_block_types": [_CROSS_DOWN if a else _DOWN for a in has_attention],
        "up_block_types": [_CROSS_UP if a else _UP for a in reversed(has_attention)],
        "block_out_channels": channels,
        "layers_per_block": per_level,
        "cross_attention_dim": cross_dim,
        "attention_head_dim": _attention_heads(family, channels, markers),
        "use_linear_projection": linear,
        "transformer_layers_per_block": transformer_layers,
        "norm_num_groups": NORM_NUM_GROUPS,
    }
    label_emb = unet_sd.get("label_emb.0.0.weight")
    if label_emb is not None:
        count = _SDXL_TIME_IDS.get(family)
        if count is None:
            raise HuabiError(f"UNet has SDXL-style label_emb but the family is {family.value}")
        input_dim = int(label_emb.shape[1])
        # input = pooled text embedding + count sinusoidal embeddings of the size/crop/score ids.
        time_dim, remainder = divmod(input_dim - (pooled_dim if pooled_dim is not None else input_dim - count * 256), count)
        if remainder or time_dim < 1:
            raise HuabiError(f"label_emb input width {input_dim} does not fit pooled width {pooled_dim} + {count} time ids")
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=input_dim,
        )
    return config


def _attention_heads(
    family: ModelFamily, channels: list[int], markers: Mapping[str, torch.Tensor] | None
) -> int | list[int]:
    """diffusers' ``attention_head_dim`` (which, for this UNet class, is the number of heads per level)."""
    if family is ModelFamily.SD1:
        return SD1_HEADS_PER_LEVEL
    if family is ModelFamily.HUABI_MINI:
        head_dim = marker_value(markers or {}, MARKER_HEAD_DIM)
        if head_dim is None:
            return SD1_HEADS_PER_LEVEL
        head_dim = int(head_dim)
        if head_dim < 1 or any(c % head_dim for c in channels):
            raise HuabiError(f"{MARKER_HEAD_DIM}={head_dim} does not divide the UNet widths {channels}")
        return [c // head_dim for c in channels]
    # SD2/SDXL: 64-wide heads; miniature copies narrower than 64 get one head.
    return [max(1, c // SD2_SDXL_HEAD_DIM) for c in channels]


def vae_config_from_vae(
    vae_sd: Mapping[str, torch.Tensor],
    *,
    scaling_factor: float = SD_VAE_SCALING_FACTOR,
    sample_size: int = 512,
    norm_num_groups: int = NORM_NUM_GROUPS,
) -> dict[str, Any]:
    """An ``AutoencoderKL`` config for an original-layout VAE (keys ``encoder.*``/``decoder.*``, no prefix)."""
    keys = list(vae_sd)
    levels = _indices(keys, "encoder.down.")
    if not levels:
        raise HuabiError("VAE layout not understood: no encoder.down.N blocks")
    per_level = len(_indices(keys, "encoder.down.0.block."))
    channels = [int(_require(vae_sd, f"encoder.down.{i}.block.0.conv1.weight", "VAE res-block").shape[0]) for i in levels]
    quant = _require(vae_sd, "quant_conv.weight", "VAE quant_conv")
    return {
        "in_channels": int(_require(vae_sd, "encoder.conv_in.weight", "VAE encoder conv_in").shape[1]),
        "out_channels": int(_require(vae_sd, "decoder.conv_out.weight", "VAE decoder conv_out").shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": channels,
        "layers_per_block": per_level,
        "latent_channels": int(quant.shape[0]) // 2,
        "norm_num_groups": norm_num_groups,
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
    }


# Full-size text encoder configs (transformers ``CLIPTextConfig`` kwargs) in the
# layout huabi's converters produce: OpenCLIP towers keep all their layers and
# a text projection (SD2: 24 layers, of which conditioning reads the penultimate).
_CLIP_L = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
}
_OPENCLIP_H = {
    "vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
    "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1024,
}
_OPENCLIP_BIGG = {
    "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280,
}


def reference_configs(family: ModelFamily, prediction: Prediction = Prediction.EPSILON) -> dict[str, dict[str, Any]]:
    """Full-size configs of ``family``: ``{"unet", "vae", "text_encoder"[, "text_encoder_2"]}``.

    Component names follow diffusers folders (the refiner has only ``text_encoder_2``).
    huabi-mini has no fixed size: it is read from its file.
    """
    family = ModelFamily(family)
    if family is ModelFamily.SD1:
        return {"unet": dict(REFERENCE_UNET_CONFIGS["sd1"]), "vae": dict(REFERENCE_VAE_CONFIGS["sd1"]), "text_encoder": dict(_CLIP_L)}
    if family is ModelFamily.SD2:
        v = prediction is Prediction.V
        return {
            "unet": dict(REFERENCE_UNET_CONFIGS["sd2_v" if v else "sd2_eps"]),
            "vae": dict(REFERENCE_VAE_CONFIGS["sd2_v" if v else "sd1"]),
            "text_encoder": dict(_OPENCLIP_H),
        }
    if family is ModelFamily.SDXL:
        return {
            "unet": dict(REFERENCE_UNET_CONFIGS["sdxl"]), "vae": dict(REFERENCE_VAE_CONFIGS["sdxl"]),
            "text_encoder": dict(_CLIP_L), "text_encoder_2": dict(_OPENCLIP_BIGG),
        }
    if family is ModelFamily.SDXL_REFINER:
        return {"unet": dict(REFERENCE_UNET_CONFIGS["sdxl_refiner"]), "vae": dict(REFERENCE_VAE_CONFIGS["sdxl"]), "text_encoder_2": dict(_OPENCLIP_BIGG)}
    raise HuabiError(f"{family.value}: no full-size reference config (huabi-mini's size is read from its file)")
