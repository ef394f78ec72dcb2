"""Tiny random-weight models of every family, for everyone's tests.

Each family keeps its real *structure* (which levels attend, linear vs conv
projections, SDXL's size conditioning and per-level transformer depth, the
refiner's attention-free last level, the text encoder layouts) at toy widths:
UNet blocks (32, 64) (SDXL and refiner (32, 64, 64)), one res-block per level, VAE (32, 32, 64, 64) so latents
are 1/8 of the image as in real SD, CLIP text towers of width 64 with the
real 49408-token vocabulary (the real tokenizer works with them).

Builders (seeded, well under a second each once torch/transformers are imported):

* ``write_tiny_single_file(folder, family, variant=BASE, prediction=EPSILON) -> Path``
  an original-layout ``.safetensors`` (A1111/civitai keys).
* ``write_tiny_diffusers_folder(folder, family, variant=BASE, prediction=EPSILON) -> Path``
  the same weights as a diffusers pipeline folder.
* ``build_tiny_parts(...) -> TinyParts`` the modules themselves.

pytest fixtures (import them in ``conftest.py``:
``from tiny_models import isolated_huabi_cache, tiny_model_factory, tiny_sd1_file,
tiny_sd2_file, tiny_sdxl_file, tiny_mini_file, tiny_sd1_folder  # noqa: F401``):
session-scoped paths, built once per test session; ``isolated_huabi_cache`` is
autouse and points ``HUABI_CACHE_DIR`` (model hash cache) at a temp folder so
tests never write to ``~/.cache/huabi``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from huabi.models.family import ModelFamily, Prediction, UNetVariant

TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
}
TINY_TIME_EMBED_DIM = 8  # SDXL's size-conditioning embedding width (256 at full size)
TINY_TEXT_WIDTH = 64  # must match huabi.models.text_encoders.tiny_text_encoder_configs
# huabi-mini markers written by the tiny builder (distinct from the defaults so tests see them used).
TINY_MINI_MARKERS = {"huabi.version": 1, "huabi.vae_scaling_factor": 0.5, "huabi.attention_head_dim": 16, "huabi.native_size_px": 128}

_IN_CHANNELS = {UNetVariant.BASE: 4, UNetVariant.INPAINT: 9, UNetVariant.INSTRUCT_PIX2PIX: 8}
_NATIVE_SIZE = {ModelFamily.SD1: 512, ModelFamily.SDXL: 1024, ModelFamily.SDXL_REFINER: 1024, ModelFamily.HUABI_MINI: 128}


def tiny_unet_config(
    family: ModelFamily, variant: UNetVariant = UNetVariant.BASE, prediction: Prediction = Prediction.EPSILON
) -> dict[str, Any]:
    """The diffusers config of the tiny UNet (written out by hand: tests compare huabi's inference to it)."""
    cross, up = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D"
    native = 768 if family is ModelFamily.SD2 and prediction is Prediction.V else _NATIVE_SIZE.get(family, 512)
    config: dict[str, Any] = {
        "sample_size": native // 8,
        "in_channels": _IN_CHANNELS[variant],
        "out_channels": 4,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "norm_num_groups": 32,
        "transformer_layers_per_block": 1,
    }
    if family in (ModelFamily.SD1, ModelFamily.HUABI_MINI, ModelFamily.SD2):
        config.update(
            down_block_types=[cross, "DownBlock2D"],
            up_block_types=["UpBlock2D", up],
            cross_attention_dim=TINY_TEXT_WIDTH,
            use_linear_projection=family is ModelFamily.SD2,
            attention_head_dim={ModelFamily.SD1: 8, ModelFamily.HUABI_MINI: [2, 4], ModelFamily.SD2: [1, 1]}[family],
        )
    elif family is ModelFamily.SDXL:
        # Three levels so the per-level transformer depth ([1, 2, 10] at full size) stays a list.
        config.update(
            block_out_channels=[32, 64, 64],
            down_block_types=["DownBlock2D", cross, cross],
            up_block_types=[up, up, "UpBlock2D"],
            cross_attention_dim=2 * TINY_TEXT_WIDTH,  # CLIP-L and bigG hidden states side by side
            use_linear_projection=True,
            attention_head_dim=[1, 1, 1],
            transformer_layers_per_block=[1, 1, 2],
            addition_embed_type="text_time",
            addition_time_embed_dim=TINY_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=TINY_TEXT_WIDTH + 6 * TINY_TIME_EMBED_DIM,
        )
    elif family is ModelFamily.SDXL_REFINER:
        config.update(
            block_out_channels=[32, 64, 64],
            down_block_types=["DownBlock2D", cross, "DownBlock2D"],
            up_block_types=["UpBlock2D", up, "UpBlock2D"],
            cross_attention_dim=TINY_TEXT_WIDTH,
            use_linear_projection=True,
            attention_head_dim=[1, 1, 1],
            transformer_layers_per_block=2,
            addition_embed_type="text_time",
            addition_time_embed_dim=TINY_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=TINY_TEXT_WIDTH + 5 * TINY_TIME_EMBED_DIM,
        )
    else:
        raise ValueError(f"no tiny model for {family}")
    return config


def tiny_vae_config(family: ModelFamily) -> dict[str, Any]:
    scaling = {ModelFamily.SDXL: 0.13025, ModelFamily.SDXL_REFINER: 0.13025, ModelFamily.HUABI_MINI: 0.5}.get(family, 0.18215)
    return {**TINY_VAE_CONFIG, "sample_size": 64, "scaling_factor": scaling}


def randomize_(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Overwrite every parameter with seeded random values of a sane scale.

    Default inits leave norms at exactly 1 and biases at 0, which would hide a
    swapped norm1/norm2 or bias in a conversion test; every tensor here is distinct.
    """
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1 and "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif param.ndim == 1:
                param.copy_(0.02 * noise)
            elif "embedding" in name:
                param.copy_(0.02 * noise)
            else:
                fan_in = param[0].numel()
                param.copy_(noise / math.sqrt(fan_in))
    return module


@dataclass
class TinyParts:
    family: ModelFamily
    variant: UNetVariant
    prediction: Prediction
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]


def build_tiny_parts(
    family: ModelFamily,
    variant: UNetVariant = UNetVariant.BASE,
    prediction: Prediction = Prediction.EPSILON,
    *,
    seed: int = 0,
) -> TinyParts:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from huabi.models.text_encoders import tiny_text_encoder_configs

    family = ModelFamily(family)
    generator = torch.Generator().manual_seed(seed)
    unet_config = tiny_unet_config(family, variant, prediction)
    vae_config = tiny_vae_config(family)
    unet = randomize_(UNet2DConditionModel(**unet_config), generator).eval()
    vae = randomize_(AutoencoderKL(**vae_config), generator).eval()
    encoders: list[torch.nn.Module] = []
    for text_config in tiny_text_encoder_configs(family):
        assert text_config.hidden_size == TINY_TEXT_WIDTH
        # OpenCLIP towers (gelu) carry a text projection; OpenAI CLIP-L (quick_gelu) does not.
        model_class = CLIPTextModelWithProjection if text_config.hidden_act == "gelu" else CLIPTextModel
        encoders.append(randomize_(model_class(text_config), generator).eval())
    return TinyParts(family, variant, prediction, unet, vae, encoders, unet_config, vae_config)


def tiny_original_state_dict(parts: TinyParts) -> dict[str, torch.Tensor]:
    """The original single-file layout of ``parts`` (markers and v_pred key included)."""
    from huabi.models.convert import unet_to_original, vae_to_original
    from huabi.models.text_encoders import text_encoders_to_original

    tensors: dict[str, torch.Tensor] = {}
    for key, value in unet_to_original(parts.unet.state_dict(), parts.unet_config).items():
        tensors["model.diffusion_model." + key] = value
    for key, value in vae_to_original(parts.vae.state_dict()).items():
        tensors["first_stage_model." + key] = value
    tensors.update(text_encoders_to_original(parts.text_encoders, parts.family))
    if parts.family is ModelFamily.HUABI_MINI:
        for name, value in TINY_MINI_MARKERS.items():
            tensors[name] = torch.tensor(value, dtype=torch.float32 if isinstance(value, float) else torch.int64)
    if parts.prediction is Prediction.V:
        tensors["v_pred"] = torch.zeros(0)
    return {k: v.detach().clone().contiguous() for k, v in tensors.items()}


def write_tiny_single_file(
    folder: str | Path,
    family: ModelFamily,
    variant: UNetVariant = UNetVariant.BASE,
    prediction: Prediction = Prediction.EPSILON,
    *,
    seed: int = 0,
    filename: str | None = None,
) -> Path:
    """Write a tiny original-layout ``.safetensors`` and return its path.

    v-prediction is recorded as a ``v_pred`` key (as in A1111-era files). An
    SD2 file with ``prediction=EPSILON`` records nothing, like real SD2 files,
    so loading it exercises the v-prediction test.
    """
    from safetensors.torch import save_file

    family = ModelFamily(family)
    parts = build_tiny_parts(family, variant, prediction, seed=seed)
    path = Path(folder) / (filename or f"tiny_{family.value}_{UNetVariant(variant).value}_{Prediction(prediction).value}.safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tiny_original_state_dict(parts), str(path))
    return path


def write_tiny_diffusers_folder(
    folder: str | Path,
    family: ModelFamily,
    variant: UNetVariant = UNetVariant.BASE,
    prediction: Prediction = Prediction.EPSILON,
    *,
    seed: int = 0,
    name: str | None = None,
) -> Path:
    """Write the same tiny model (same seed -> same weights) as a diffusers pipeline folder."""
    family = ModelFamily(family)
    parts = build_tiny_parts(family, variant, prediction, seed=seed)
    root = Path(folder) / (name or f"tiny_{family.value}_{UNetVariant(variant).value}_{Prediction(prediction).value}")
    root.mkdir(parents=True, exist_ok=True)
    parts.unet.save_pretrained(root / "unet")
    parts.vae.save_pretrained(root / "vae")
    encoder_names = {
        ModelFamily.SDXL: ["text_encoder", "text_encoder_2"],
        ModelFamily.SDXL_REFINER: ["text_encoder_2"],
    }.get(family, ["text_encoder"])
    for encoder, component in zip(parts.text_encoders, encoder_names, strict=True):
        encoder.save_pretrained(root / component)
    (root / "scheduler").mkdir(exist_ok=True)
    scheduler = {
        "_class_name": "EulerDiscreteScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "prediction_type": Prediction(prediction).value,
    }
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if family is ModelFamily.SDXL else "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    for encoder, component in zip(parts.text_encoders, encoder_names, strict=True):
        index[component] = ["transformers", type(encoder).__name__]
    if family is ModelFamily.SDXL_REFINER:
        index["_class_name"] = "StableDiffusionXLImg2ImgPipeline"
        index["text_encoder"] = [None, None]
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    if family is ModelFamily.HUABI_MINI:
        (root / "huabi.json").write_text(json.dumps(TINY_MINI_MARKERS))
    return root


# --------------------------------------------------------------------------- pytest fixtures


@pytest.fixture(scope="session", autouse=True)
def isolated_huabi_cache(tmp_path_factory):
    """Keep huabi's hash cache out of the user's home during tests."""
    import os

    previous = os.environ.get("HUABI_CACHE_DIR")
    os.environ["HUABI_CACHE_DIR"] = str(tmp_path_factory.mktemp("huabi_cache"))
    yield Path(os.environ["HUABI_CACHE_DIR"])
    if previous is None:
        os.environ.pop("HUABI_CACHE_DIR", None)
    else:
        os.environ["HUABI_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory) -> Callable[..., Path]:
    """``make(family, variant=BASE, prediction=EPSILON, layout="single"|"diffusers") -> Path``, cached per session."""
    cache: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("tiny_models")

    def make(
        family: ModelFamily,
        variant: UNetVariant = UNetVariant.BASE,
        prediction: Prediction = Prediction.EPSILON,
        layout: str = "single",
    ) -> Path:
        key = (ModelFamily(family), UNetVariant(variant), Prediction(prediction), layout)
        if key not in cache:
            if layout == "single":
                cache[key] = write_tiny_single_file(root, *key[:3])
            elif layout == "diffusers":
                cache[key] = write_tiny_diffusers_folder(root, *key[:3])
            else:
                raise ValueError(f"layout must be 'single' or 'diffusers', not {layout!r}")
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_sd1_file(tiny_model_factory) -> Path:
    return tiny_model_factory(ModelFamily.SD1)


@pytest.fixture(scope="session")
def tiny_sd2_file(tiny_model_factory) -> Path:
    return tiny_model_factory(ModelFamily.SD2, prediction=Prediction.V)


@pytest.fixture(scope="session")
def tiny_sdxl_file(tiny_model_factory) -> Path:
    return tiny_model_factory(ModelFamily.SDXL)


@pytest.fixture(scope="session")
def tiny_mini_file(tiny_model_factory) -> Path:
    return tiny_model_factory(ModelFamily.HUABI_MINI)


@pytest.fixture(scope="session")
def tiny_sd1_folder(tiny_model_factory) -> Path:
    return tiny_model_factory(ModelFamily.SD1, layout="diffusers")
