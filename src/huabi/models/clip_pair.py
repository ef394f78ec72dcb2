"""The text+image CLIP pair a huabi training run ships for evaluation (``*-clip.safetensors``).

The file is a transformers ``CLIPModel`` state dict; its config JSON sits in the
safetensors metadata under ``huabi.clip_config`` (see ``huabi.train.recipe``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from huabi.errors import HuabiError
from huabi.models.formats import read_safetensors

CLIP_CONFIG_KEY = "huabi.clip_config"


def clip_pair_path(checkpoint: str | Path) -> Path:
    """Where a checkpoint's CLIP pair sits: beside it, as NAME-clip.safetensors (how the recipe exports it)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + "-clip.safetensors")


def load_clip_pair(path: str | Path, *, text_encoder: torch.nn.Module | None = None, device: torch.device | str = "cpu"):
    """A ``transformers.CLIPModel`` in eval mode, fp32, from a huabi CLIP-pair file.

    Files written by huabi's recipe leave the text tower out (it is the checkpoint's
    text encoder): pass that ``CLIPTextModel`` as ``text_encoder``.
    """
    from transformers import CLIPConfig, CLIPModel

    path = Path(path)
    tensors, metadata = read_safetensors(path)
    if CLIP_CONFIG_KEY not in metadata:
        raise HuabiError(f"{path.name}: not a huabi CLIP pair (no {CLIP_CONFIG_KEY!r} in its metadata)")
    try:
        config = CLIPConfig.from_dict(json.loads(metadata[CLIP_CONFIG_KEY]))
    except (ValueError, TypeError) as exc:
        raise HuabiError(f"{path.name}: unreadable {CLIP_CONFIG_KEY} metadata ({exc})") from exc
    model = CLIPModel(config)
    weights = {k: v.float() for k, v in tensors.items()}
    if not any(k.startswith("text_model.") for k in weights):
        if text_encoder is None:
            raise HuabiError(f"{path.name}: has no text tower; pass the checkpoint's text encoder")
        # transformers 5's CLIPTextModel is the tower itself; older versions wrap it in .text_model
        text_state = getattr(text_encoder, "text_model", text_encoder).state_dict()
        weights.update({f"text_model.{k}": v.float() for k, v in text_state.items()})
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # position_ids buffers differ between transformers versions; weights must all match
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise HuabiError(f"{path.name}: CLIP pair weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval()
