"""Which model is this? Decided from tensor names and shapes only.

Detection keys off *structure* (which prefixes exist, which tensors are
linear vs 1x1-conv, how many input channels the UNet takes), never off
absolute widths, so a miniature file with SD1's layout is SD1.

huabi marker convention (huabi's built-in model, ``ModelFamily.HUABI_MINI``)
---------------------------------------------------------------------------
huabi-mini is an SD1-layout checkpoint in miniature that carries scalar
tensors named ``huabi.*`` for what its shapes cannot say:

=============================  =========  ==========================================
``huabi.version``              int64 []   required; marks the file as huabi's (format version, 1)
``huabi.vae_scaling_factor``   float32 [] optional; latent scaling factor (default 0.18215)
``huabi.attention_head_dim``   int64 []   optional; channels per attention head in the
                                          UNet (heads per level = channels // this);
                                          default: 8 heads per level as SD1
``huabi.native_size_px``       int64 []   optional; training resolution (default 256)
``huabi.vae_norm_num_groups``  int64 []   optional; GroupNorm groups of the VAE (default 32 as SD)
=============================  =========  ==========================================

In a diffusers folder the same values live in ``huabi.json`` (name -> number).
``save.huabi_marker_tensors`` builds them from a UNet/VAE config.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from huabi.errors import HuabiError
from huabi.core.family import ModelFamily, Prediction, UNetVariant

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
MARKER_VERSION = "huabi.version"
MARKER_VAE_SCALING = "huabi.vae_scaling_factor"
MARKER_HEAD_DIM = "huabi.attention_head_dim"
MARKER_NATIVE_SIZE = "huabi.native_size_px"
MARKER_VAE_NORM_GROUPS = "huabi.vae_norm_num_groups"

# Text-encoder prefixes of the original layouts (structure, not size).
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_BIGG_PREFIX = "conditioner.embedders.1.model."
REFINER_BIGG_PREFIX = "conditioner.embedders.0.model."

_VARIANT_BY_IN_CHANNELS = {4: UNetVariant.BASE, 9: UNetVariant.INPAINT, 8: UNetVariant.INSTRUCT_PIX2PIX}
_ATTN2_TO_K = re.compile(r"^model\.diffusion_model\..*\.transformer_blocks\.0\.attn2\.to_k\.weight$")


@dataclass(frozen=True)
class Detected:
    """What detection found. ``prediction_known`` is False for SD2 files that
    say nothing about their parameterisation: the loader then runs A1111's
    one-forward test on the UNet (see ``load.is_v_prediction_sd2``)."""

    family: ModelFamily
    variant: UNetVariant
    prediction: Prediction
    prediction_known: bool
    prediction_source: str  # "v_pred key", "metadata", "family default", "unknown"
    unet_in_channels: int
    context_dim: int  # cross-attention width (768 SD1, 1024 SD2, 2048 SDXL, 1280 refiner at full size)
    linear_projection: bool  # spatial transformers use Linear (SD2/SDXL) rather than 1x1 Conv (SD1) proj_in
    has_vae: bool
    text_encoder_prefixes: tuple[str, ...]
    tensor_count: int


def _has_prefix(keys: list[str], prefix: str) -> bool:
    return any(key.startswith(prefix) for key in keys)


def describe_non_checkpoint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A short guess at what a file without a UNet is, for error messages."""
    keys = list(state_dict)
    if not keys:
        return "it contains no tensors"
    if any(k.startswith(("lora_unet_", "lora_te", "lora_te1_", "lora_te2_")) or ".lora_down." in k or ".lora_A." in k or ".hada_w1" in k or ".lokr_w1" in k for k in keys):
        return "looks like a LoRA/LyCORIS file (load it as a LoRA, not as a checkpoint)"
    if all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", VAE_PREFIX)) for k in keys):
        return "looks like a VAE-only file (pass it as vae=, not as the model)"
    if any(k in ("string_to_param", "emb_params", "clip_l", "clip_g") or k.startswith("string_to_param.") for k in keys):
        return "looks like a textual-inversion embedding"
    if any(k.startswith("control_model.") or "input_hint_block" in k or k.startswith("controlnet_") for k in keys):
        return "looks like a ControlNet"
    if any(k.startswith(("down_blocks.", "conv_in.", "mid_block.")) for k in keys):
        return "looks like a bare diffusers UNet (load the whole diffusers folder instead)"
    return "unrecognised layout"


def _first_keys(keys: list[str], count: int = 3) -> str:
    return ", ".join(keys[:count]) + (", ..." if len(keys) > count else "")


def _prediction(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str], family: ModelFamily, source: str
) -> tuple[Prediction, bool, str]:
    if "v_pred" in state_dict:
        return Prediction.V, True, "v_pred key"
    declared = str(metadata.get("modelspec.prediction_type", "")).strip().lower()
    if declared in ("v", "v_prediction", "v-prediction"):
        return Prediction.V, True, "metadata"
    if declared in ("epsilon", "eps"):
        return Prediction.EPSILON, True, "metadata"
    if declared:
        raise HuabiError(f"{source}: metadata modelspec.prediction_type={declared!r} is not 'epsilon' or 'v'")
    if family is ModelFamily.SD2:
        return Prediction.EPSILON, False, "unknown"
    return Prediction.EPSILON, True, "family default"


def detect(
    state_dict: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    source: str = "state dict",
) -> Detected:
    """Detect family, UNet variant and prediction type of an original-layout state dict.

    ``source`` names the file in error messages. Raises ``HuabiError`` for
    anything that is not a complete Stable Diffusion checkpoint, saying what
    the file looks like instead (LoRA, VAE, embedding, ...).
    """
    metadata = metadata or {}
    keys = list(state_dict)
    unet_keys = [k for k in keys if k.startswith(UNET_PREFIX)]
    if not unet_keys:
        raise HuabiError(
            f"{source}: not a Stable Diffusion checkpoint: found {len(keys)} tensors, none under {UNET_PREFIX}; "
            f"{describe_non_checkpoint(state_dict)}" + (f"; first keys: {_first_keys(keys)}" if keys else "")
        )
    conv_in = state_dict.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None or conv_in.ndim != 4:
        raise HuabiError(f"{source}: not an SD-layout UNet: {UNET_PREFIX}input_blocks.0.0.weight is missing or not a conv")
    in_channels = int(conv_in.shape[1])
    variant = _VARIANT_BY_IN_CHANNELS.get(in_channels)
    if variant is None:
        raise HuabiError(
            f"{source}: UNet takes {in_channels} input channels; huabi knows 4 (base), 9 (inpainting), 8 (instruct-pix2pix)"
        )
    to_k_keys = sorted(k for k in unet_keys if _ATTN2_TO_K.match(k))
    if not to_k_keys:
        raise HuabiError(f"{source}: UNet has no cross-attention (no ...transformer_blocks.0.attn2.to_k.weight)")
    context_dim = int(state_dict[to_k_keys[0]].shape[1])
    proj_in_key = to_k_keys[0].split("transformer_blocks.")[0] + "proj_in.weight"
    linear_projection = proj_in_key in state_dict and state_dict[proj_in_key].ndim == 2
    has_label_emb = UNET_PREFIX + "label_emb.0.0.weight" in state_dict

    has = lambda prefix: _has_prefix(keys, prefix)  # noqa: E731
    if has(SDXL_CLIP_L_PREFIX) and has(SDXL_BIGG_PREFIX):
        family, te_prefixes = ModelFamily.SDXL, (SDXL_CLIP_L_PREFIX, SDXL_BIGG_PREFIX)
    elif has(REFINER_BIGG_PREFIX) and not has("conditioner.embedders.1."):
        family, te_prefixes = ModelFamily.SDXL_REFINER, (REFINER_BIGG_PREFIX,)
    elif has(SD2_OPENCLIP_PREFIX):
        family, te_prefixes = ModelFamily.SD2, (SD2_OPENCLIP_PREFIX,)
    elif has(SD1_CLIP_PREFIX):
        family, te_prefixes = ModelFamily.SD1, (SD1_CLIP_PREFIX,)
    else:
        raise HuabiError(
            f"{source}: has a UNet but no text encoder weights (nothing under cond_stage_model. or conditioner.embedders.); "
            f"found {len(keys)} tensors"
        )

    # Structural cross-checks: a file mixing layouts is refused, not guessed at.
    if family in (ModelFamily.SDXL, ModelFamily.SDXL_REFINER):
        if not has_label_emb:
            raise HuabiError(f"{source}: SDXL text encoders but the UNet has no label_emb (size conditioning)")
    elif has_label_emb:
        raise HuabiError(f"{source}: UNet has SDXL label_emb but {family.value} text encoders")
    if family is ModelFamily.SD2 and not linear_projection:
        raise HuabiError(f"{source}: OpenCLIP text encoder (SD2) but the UNet's proj_in is a conv (SD1 layout)")
    if family is ModelFamily.SD1 and linear_projection:
        raise HuabiError(f"{source}: CLIP-L text encoder (SD1) but the UNet's proj_in is linear (SD2 layout)")

    if MARKER_VERSION in state_dict:
        if family is not ModelFamily.SD1:
            raise HuabiError(f"{source}: has the {MARKER_VERSION} marker but a {family.value} layout; huabi-mini is SD1 layout")
        marker = state_dict[MARKER_VERSION]
        if marker.numel() != 1 or marker.dtype.is_floating_point:
            raise HuabiError(f"{source}: {MARKER_VERSION} must be an int64 scalar")
        family = ModelFamily.HUABI_MINI

    prediction, known, prediction_source = _prediction(state_dict, metadata, family, source)
    if variant is not UNetVariant.BASE and not known:
        # A1111 treats SD2 inpainting/pix2pix files as epsilon; so do we.
        known, prediction_source = True, "family default"
    has_vae = _has_prefix(keys, VAE_PREFIX)
    return Detected(
        family=family,
        variant=variant,
        prediction=prediction,
        prediction_known=known,
        prediction_source=prediction_source,
        unet_in_channels=in_channels,
        context_dim=context_dim,
        linear_projection=linear_projection,
        has_vae=has_vae,
        text_encoder_prefixes=te_prefixes,
        tensor_count=len(keys),
    )


def marker_value(state_dict: Mapping[str, torch.Tensor], name: str) -> float | int | None:
    """Read a ``huabi.*`` scalar marker, or None when absent."""
    tensor = state_dict.get(name)
    if tensor is None:
        return None
    if tensor.numel() != 1:
        raise HuabiError(f"marker {name} must be a scalar tensor, got shape {tuple(tensor.shape)}")
    return tensor.item()
