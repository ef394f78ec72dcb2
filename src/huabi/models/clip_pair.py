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


def load_clip_pair(path: str | Path, *, device: torch.device | str = "cpu"):
    """A ``transformers.CLIPModel`` in eval mode, fp32, from a huabi CLIP-pair file."""
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
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    # position_ids buffers differ between transformers versions; weights must all match
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise HuabiError(f"{path.name}: CLIP pair weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval()
