"""An untrained stand-in for huabi-mini, so every command runs before the real model ships.

It has exactly huabi-mini's architecture (the recipe's model configs) with
seeded random weights, so it exercises the same code paths; its images are
noise, and the CLI says so whenever it is used. The file records the configs
it was built from and is rebuilt when the recipe's architecture changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from huabi.errors import HuabiError
from huabi.models.family import ModelFamily, Prediction
from huabi.models.formats import read_safetensors_header
from huabi.models.save import ModelParts, save_single_file

ARCHITECTURE_KEY = "huabi.placeholder_architecture"


def _architecture(recipe) -> str:
    from huabi.train.common import config_dict

    parts = {name: config_dict(getattr(recipe, name)) for name in ("unet_model", "vae_model", "clip_model")}
    return json.dumps({"size_px": recipe.size_px, **parts}, sort_keys=True)


def _is_current(path: Path, architecture: str) -> bool:
    try:
        header = read_safetensors_header(path)
    except (HuabiError, OSError):
        return False
    return header.get("__metadata__", {}).get(ARCHITECTURE_KEY) == architecture


def write_placeholder_model(path: Path, *, force: bool = False, seed: int = 0) -> Path:
    """Write the placeholder checkpoint to ``path`` (atomically) unless an up-to-date one exists."""
    from transformers import CLIPTextModel

    from huabi.train.recipe import MiniRecipe

    recipe = MiniRecipe()
    architecture = _architecture(recipe)
    if not force and _is_current(path, architecture):
        return path
    unet = recipe.unet_model.build(seed=seed).eval()
    vae = recipe.vae_model.build(seed=seed).eval()
    vae.register_to_config(scaling_factor=0.18215, sample_size=recipe.size_px)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(recipe.clip_model.hf_config().text_config).eval()
    parts = ModelParts(
        family=ModelFamily.HUABI_MINI,
        unet=unet,
        vae=vae,
        text_encoders=[text_encoder],
        prediction=Prediction.EPSILON,
        native_size_px=recipe.size_px,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_single_file(
        parts, path, dtype=torch.float16,
        metadata={
            "huabi.placeholder": "untrained: random weights with huabi-mini's architecture",
            ARCHITECTURE_KEY: architecture,
        },
    )
