"""CLIP models for evaluation features, read from local files only.

Accepted:

* a transformers ``CLIPModel`` folder (``config.json`` + weights, e.g. a local copy of
  ``openai/clip-vit-base-patch32`` or ``-large-patch14``), tokenizer files optional;
* a single ``.safetensors``/``.bin``/``.pth`` file with transformers ``CLIPModel`` tensor
  names (``vision_model.*``, ``text_model.*``, ``visual_projection.weight``,
  ``text_projection.weight``, ``logit_scale``): the config is read off the shapes
  (OpenAI CLIP's conventions: 64 channels per attention head, quick-GELU, eps 1e-5);
* a huabi CLIP-pair file (``*-clip.safetensors``, config in its metadata), as shipped
  with huabi-mini; its text tower comes from the checkpoint (``load_clip_pair``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from huabi.errors import HuabiError

HEAD_DIM = 64  # OpenAI CLIP: every ViT-B/L and text tower uses 64 channels per head


def looks_like_clip(state_dict) -> bool:
    return "vision_model.embeddings.patch_embedding.weight" in state_dict and "visual_projection.weight" in state_dict


def _layer_count(state_dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def clip_config_from_state_dict(state_dict) -> dict:
    """A transformers CLIPConfig dict for a state dict in transformers layout."""
    patch = state_dict["vision_model.embeddings.patch_embedding.weight"]
    vision_width, _, patch_px, _ = patch.shape
    positions = state_dict["vision_model.embeddings.position_embedding.weight"].shape[0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1:
        raise HuabiError(f"CLIP vision tower: {positions} position embeddings is not a square grid plus the class token")
    vision = {
        "hidden_size": vision_width, "patch_size": patch_px, "image_size": grid * patch_px,
        "num_hidden_layers": _layer_count(state_dict, "vision_model.encoder.layers."),
        "intermediate_size": state_dict["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_attention_heads": max(1, vision_width // HEAD_DIM), "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    }
    config = {"vision_config": vision, "projection_dim": state_dict["visual_projection.weight"].shape[0]}
    if "text_model.embeddings.token_embedding.weight" in state_dict:
        vocab, text_width = state_dict["text_model.embeddings.token_embedding.weight"].shape
        config["text_config"] = {
            "hidden_size": text_width, "vocab_size": vocab,
            "max_position_embeddings": state_dict["text_model.embeddings.position_embedding.weight"].shape[0],
            "num_hidden_layers": _layer_count(state_dict, "text_model.encoder.layers."),
            "intermediate_size": state_dict["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            "num_attention_heads": max(1, text_width // HEAD_DIM), "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "projection_dim": config["projection_dim"],
            # OpenAI's tokenizer: BOS 49406, EOS 49407 (the pooled token is the first EOS)
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
        }
        if vocab < 49408:  # a scaled-down test vocabulary: pool at the highest id, as old configs do
            config["text_config"].update(bos_token_id=0, eos_token_id=2, pad_token_id=1)
    vision["projection_dim"] = config["projection_dim"]
    return config


def load_clip_model(path: str | Path, *, device: torch.device | str = "cpu"):
    """A transformers ``CLIPModel`` (eval mode, fp32) from a local folder or file."""
    from transformers import CLIPConfig, CLIPModel

    from huabi.models.formats import read_state_dict

    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        try:
            config = CLIPConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise HuabiError(f"{path.name}: unreadable CLIP config.json ({exc})") from exc
        if getattr(config, "model_type", "") != "clip":
            raise HuabiError(f"{path.name}: config.json describes a {config.model_type!r} model, not CLIP")
        weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
        if weights is None:
            raise HuabiError(f"{path.name}: no model.safetensors or pytorch_model.bin beside config.json")
        state_dict, _ = read_state_dict(weights)
    else:
        state_dict, _ = read_state_dict(path)
        if not looks_like_clip(state_dict):
            raise HuabiError(f"{path.name}: not a CLIP model in transformers layout (found {len(state_dict)} tensors, e.g. {', '.join(list(state_dict)[:2])})")
        if "text_model.embeddings.token_embedding.weight" not in state_dict:
            raise HuabiError(f"{path.name}: a CLIP file without its text tower (huabi CLIP pairs load with their checkpoint)")
        config = CLIPConfig.from_dict(clip_config_from_state_dict(state_dict))
    model = CLIPModel(config)
    expected = model.state_dict()
    weights = {k: v.float() for k, v in state_dict.items() if not k.endswith("position_ids")}
    missing = [k for k in expected if k not in weights and not k.endswith("position_ids")]
    unexpected = [k for k in weights if k not in expected]
    wrong = [k for k in weights if k in expected and weights[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected else f"shape of {wrong[0]} {tuple(weights[wrong[0]].shape)} vs {tuple(expected[wrong[0]].shape)}"
        raise HuabiError(f"{path.name}: CLIP weights do not match the architecture their shapes describe ({detail})")
    model.load_state_dict(weights, strict=False)
    return model.to(device).eval().requires_grad_(False)


def load_clip_tokenizer(path: str | Path | None):
    """The folder's own CLIP tokenizer if it has one, else huabi's copy of OpenAI's CLIP BPE."""
    if path is not None:
        path = Path(path)
        if path.is_dir() and any((path / n).is_file() for n in ("tokenizer.json", "vocab.json")):
            from transformers import CLIPTokenizer

            return CLIPTokenizer.from_pretrained(path, local_files_only=True)
    from huabi.models.family import ModelFamily
    from huabi.models.tokenizer import load_tokenizers

    return load_tokenizers(ModelFamily.HUABI_MINI)[0]


def config_summary(model) -> str:
    vision = model.config.vision_config
    return (f"CLIP ViT (width {vision.hidden_size}, {vision.num_hidden_layers} layers, patch {vision.patch_size}, "
            f"{vision.image_size}px, projection {model.config.projection_dim})")



def load_clip_pair_vision(path: str | Path, *, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The image tower of a huabi CLIP pair (``pixel_values -> image embeds``), without the
    checkpoint's text tower; ``.model.config`` is its ``CLIPVisionConfig``."""
    import json

    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from huabi.models.clip_pair import CLIP_CONFIG_KEY
    from huabi.models.formats import read_safetensors

    path = Path(path)
    tensors, metadata = read_safetensors(path)
    if CLIP_CONFIG_KEY not in metadata:
        raise HuabiError(f"{path.name}: not a huabi CLIP pair (no {CLIP_CONFIG_KEY!r} in its metadata)")
    config = json.loads(metadata[CLIP_CONFIG_KEY])
    vision_config = CLIPVisionConfig.from_dict({**config["vision_config"], "projection_dim": config.get("projection_dim", 512)})
    model = CLIPVisionModelWithProjection(vision_config)
    weights = {k: v.float() for k, v in tensors.items() if k.startswith(("vision_model.", "visual_projection."))}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise HuabiError(f"{path.name}: CLIP-pair image tower does not match its config (missing {missing[:2]}, unexpected {unexpected[:2]})")
    return _ImageEmbeds(model.to(device).eval().requires_grad_(False))


class _ImageEmbeds(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).image_embeds
