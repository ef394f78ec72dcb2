"""Write models: original single-file layout (.safetensors) and diffusers folders.

Both writers are atomic: the result appears complete under its final name or
not at all (temp file / temp folder in the same directory + ``os.replace``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from huabi.errors import HuabiError
from huabi.models.bundle import ModelBundle
from huabi.models.configs import NORM_NUM_GROUPS
from huabi.models.convert import unet_to_original, vae_to_original
from huabi.models.detect import (
    MARKER_HEAD_DIM,
    MARKER_NATIVE_SIZE,
    MARKER_VAE_NORM_GROUPS,
    MARKER_VAE_SCALING,
    MARKER_VERSION,
    UNET_PREFIX,
    VAE_PREFIX,
)
from huabi.models.files import atomic_folder
from huabi.core.family import ModelFamily, Prediction, UNetVariant
from huabi.models.formats import HUABI_FOLDER_MARKERS_FILE, write_safetensors_atomic

HUABI_MARKER_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelParts:
    """The modules of a model without the loading-time extras of a ``ModelBundle`` (what a trainer has)."""

    family: ModelFamily
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: Sequence[torch.nn.Module]
    prediction: Prediction = Prediction.EPSILON
    native_size_px: int | None = None  # huabi-mini only: recorded as a marker
    tokenizers: Sequence = ()
    alphas_cumprod: torch.Tensor | None = None


def huabi_marker_tensors(
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    *,
    native_size_px: int | None = None,
    version: int = HUABI_MARKER_FORMAT_VERSION,
) -> dict[str, torch.Tensor]:
    """The ``huabi.*`` marker tensors for a huabi-mini model with these configs (see detect.py)."""
    markers = {
        MARKER_VERSION: torch.tensor(version, dtype=torch.int64),
        MARKER_VAE_SCALING: torch.tensor(float(vae_config["scaling_factor"]), dtype=torch.float32),
    }
    heads = unet_config.get("num_attention_heads") or unet_config["attention_head_dim"]
    channels = list(unet_config["block_out_channels"])
    heads_per_level = [heads] * len(channels) if isinstance(heads, int) else list(heads)
    if heads_per_level != [8] * len(channels):  # 8 heads per level is the SD1 default detection assumes
        widths = {c // h for c, h in zip(channels, heads_per_level)}
        if len(widths) != 1 or any(c % h for c, h in zip(channels, heads_per_level)):
            raise HuabiError(
                f"huabi-mini needs one attention head width for all levels (or 8 heads per level); "
                f"got {heads_per_level} heads for widths {channels}"
            )
        markers[MARKER_HEAD_DIM] = torch.tensor(widths.pop(), dtype=torch.int64)
    if native_size_px is not None:
        markers[MARKER_NATIVE_SIZE] = torch.tensor(int(native_size_px), dtype=torch.int64)
    groups = int(vae_config.get("norm_num_groups", NORM_NUM_GROUPS))
    if groups != NORM_NUM_GROUPS:  # shapes cannot say it; files with SD's 32 stay as they were
        markers[MARKER_VAE_NORM_GROUPS] = torch.tensor(groups, dtype=torch.int64)
    return markers


def _parts(model: ModelBundle | ModelParts) -> ModelParts:
    if isinstance(model, ModelParts):
        return model
    if isinstance(model, ModelBundle):
        return ModelParts(
            family=model.family,
            unet=model.unet,
            vae=model.vae,
            text_encoders=model.text_encoders,
            prediction=model.prediction,
            native_size_px=model.native_size_px,
            tokenizers=model.tokenizers,
            alphas_cumprod=model.alphas_cumprod,
        )
    raise HuabiError(f"cannot save a {type(model).__name__}: expected a ModelBundle or ModelParts")


def to_original_state_dict(model: ModelBundle | ModelParts) -> dict[str, torch.Tensor]:
    """All weights in the original single-file layout (tensors shared with the modules, not copied)."""
    from huabi.models.text_encoders import text_encoders_to_original

    parts = _parts(model)
    tensors: dict[str, torch.Tensor] = {}
    unet_sd = {k: v.detach() for k, v in parts.unet.state_dict().items()}
    for key, value in unet_to_original(unet_sd, dict(parts.unet.config)).items():
        tensors[UNET_PREFIX + key] = value
    vae_sd = {k: v.detach() for k, v in parts.vae.state_dict().items()}
    for key, value in vae_to_original(vae_sd).items():
        tensors[VAE_PREFIX + key] = value
    tensors.update(text_encoders_to_original(list(parts.text_encoders), parts.family))
    return tensors


def save_single_file(
    model: ModelBundle | ModelParts,
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    include_schedule: bool = False,
) -> Path:
    """Write ``model`` as an original-layout ``.safetensors`` (what A1111/ComfyUI load).

    ``dtype`` casts floating weights (e.g. ``torch.float16`` to halve the file).
    v-prediction is recorded both as A1111's ``v_pred`` key and as
    ``modelspec.prediction_type`` metadata. huabi-mini gets its ``huabi.*``
    markers automatically (``extra_tensors`` entries win). ``include_schedule``
    stores ``alphas_cumprod`` as original checkpoints do.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise HuabiError(f"{path.name}: huabi writes single files as .safetensors only")
    parts = _parts(model)
    tensors = to_original_state_dict(parts)
    if dtype is not None:
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    if parts.family is ModelFamily.HUABI_MINI:
        tensors.update(huabi_marker_tensors(dict(parts.unet.config), dict(parts.vae.config), native_size_px=parts.native_size_px))
    if parts.prediction is Prediction.V:
        tensors["v_pred"] = torch.zeros(0)
    if include_schedule and parts.alphas_cumprod is not None:
        tensors["alphas_cumprod"] = parts.alphas_cumprod.detach().to(torch.float32)
    for name, tensor in (extra_tensors or {}).items():
        if name in tensors and not name.startswith("huabi."):
            raise HuabiError(f"extra tensor {name!r} would overwrite a model weight")
        tensors[name] = tensor
    all_metadata = {"modelspec.prediction_type": "v" if parts.prediction is Prediction.V else "epsilon"}
    all_metadata.update(metadata or {})
    return write_safetensors_atomic(path, tensors, all_metadata)


_PIPELINE_CLASS = {
    (ModelFamily.SDXL, UNetVariant.BASE): "StableDiffusionXLPipeline",
    (ModelFamily.SDXL, UNetVariant.INPAINT): "StableDiffusionXLInpaintPipeline",
    (ModelFamily.SDXL_REFINER, UNetVariant.BASE): "StableDiffusionXLImg2ImgPipeline",
}
_VARIANT_PIPELINE = {
    UNetVariant.BASE: "StableDiffusionPipeline",
    UNetVariant.INPAINT: "StableDiffusionInpaintPipeline",
    UNetVariant.INSTRUCT_PIX2PIX: "StableDiffusionInstructPix2PixPipeline",
}


def _encoder_components(family: ModelFamily) -> list[str]:
    return {ModelFamily.SDXL: ["text_encoder", "text_encoder_2"], ModelFamily.SDXL_REFINER: ["text_encoder_2"]}.get(
        family, ["text_encoder"]
    )


def _scheduler_config(prediction: Prediction, alphas_cumprod: torch.Tensor | None) -> dict[str, Any]:
    from huabi.models.load import scaled_linear_alphas_cumprod

    config: dict[str, Any] = {
        "_class_name": "EulerDiscreteScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "prediction_type": prediction.value,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }
    if alphas_cumprod is not None and alphas_cumprod.numel() == 1000:
        alphas = alphas_cumprod.detach().to(torch.float64).cpu()
        if not torch.allclose(alphas, scaled_linear_alphas_cumprod(), rtol=0, atol=1e-7):
            # A non-standard schedule travels as explicit betas: beta_t = 1 - a_t / a_{t-1}.
            previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas[:-1]])
            config["trained_betas"] = (1.0 - alphas / previous).tolist()
    return config


def save_diffusers_folder(
    model: ModelBundle | ModelParts,
    path: str | Path,
    *,
    variant: UNetVariant | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder*/, tokenizer*/, scheduler/).

    Built in a temporary sibling folder and moved into place; an existing
    ``path`` is an error unless ``overwrite``.
    """
    path = Path(path)
    parts = _parts(model)
    if variant is None:
        variant = model.variant if isinstance(model, ModelBundle) else UNetVariant.BASE
    if path.exists() and not overwrite:
        raise HuabiError(f"{path}: already exists (pass overwrite=True to replace it)")
    with atomic_folder(path, overwrite=overwrite) as staging:  # one rename puts the finished folder in place
        parts.unet.save_pretrained(staging / "unet", safe_serialization=True)
        parts.vae.save_pretrained(staging / "vae", safe_serialization=True)
        components = _encoder_components(parts.family)
        if len(components) != len(parts.text_encoders):
            raise HuabiError(f"{parts.family.value} needs {len(components)} text encoder(s), got {len(parts.text_encoders)}")
        index: dict[str, Any] = {
            "_class_name": _PIPELINE_CLASS.get((parts.family, variant), _VARIANT_PIPELINE[variant]),
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        }
        for encoder, component in zip(parts.text_encoders, components, strict=True):
            encoder.save_pretrained(staging / component, safe_serialization=True)
            index[component] = ["transformers", type(encoder).__name__]
        for tokenizer, component in zip(parts.tokenizers, components, strict=False):
            name = component.replace("text_encoder", "tokenizer")
            tokenizer.save_pretrained(staging / name)
            index[name] = ["transformers", type(tokenizer).__name__]
        if parts.family is ModelFamily.SDXL_REFINER:
            index.update(text_encoder=[None, None], tokenizer=[None, None], requires_aesthetics_score=True)
        if index["_class_name"].startswith("StableDiffusion") and "XL" not in index["_class_name"]:
            index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        (staging / "scheduler").mkdir()
        (staging / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(_scheduler_config(parts.prediction, parts.alphas_cumprod), indent=2), encoding="utf-8"
        )
        (staging / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        if parts.family is ModelFamily.HUABI_MINI:
            markers = huabi_marker_tensors(dict(parts.unet.config), dict(parts.vae.config), native_size_px=parts.native_size_px)
            (staging / HUABI_FOLDER_MARKERS_FILE).write_text(
                json.dumps({k: v.item() for k, v in markers.items()}, indent=2), encoding="utf-8"
            )
    return path
