"""An untrained stand-in for huabi-mini, so every command runs before the real model ships.

It has exactly huabi-mini's architecture (the recipe's model configs) with
seeded random weights, so it exercises the same code paths; its images are
noise, and the CLI says so whenever it is used.
"""

from __future__ import annotations

from pathlib import Path

import torch

from huabi.models.family import ModelFamily, Prediction
from huabi.models.save import ModelParts, save_single_file


def write_placeholder_model(path: Path, *, force: bool = False, seed: int = 0) -> Path:
    """Write the placeholder checkpoint to ``path`` (atomically) unless it already exists."""
    from transformers import CLIPTextModel

    from huabi.train.recipe import MiniRecipe

    if path.exists() and not force:
        return path
    recipe = MiniRecipe()
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
        metadata={"huabi.placeholder": "untrained: random weights with huabi-mini's architecture"},
    )
