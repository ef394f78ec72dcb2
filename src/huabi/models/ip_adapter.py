"""IP-Adapter (image prompt) files and the CLIP image encoders they need.

An IP-Adapter file (``ip-adapter_sd15.safetensors`` / ``.bin``, as published by
its authors and used by A1111's ControlNet extension, ComfyUI and diffusers)
holds two parts:

* ``image_proj.*``: turns the CLIP image embedding into a few extra context
  tokens.  ``proj.weight [4*D, E]`` + ``norm`` is the base adapter (4 tokens
  from the projected image embedding); ``latents`` + ``proj_in`` + ``layers``
  is the "plus" Resampler (16 tokens from the encoder's penultimate hidden
  states); ``proj.0/2/3`` is "full face" (257 tokens).
* ``ip_adapter.N.to_k_ip.weight`` / ``to_v_ip.weight``: a key and value
  projection of those tokens for every cross-attention layer, numbered
  1, 3, 5, ... in the UNet's attention-layer order (the original code numbered
  all attention processors and only the cross-attention ones have weights).

The image encoder is a CLIP vision tower with projection, as a transformers
folder (``config.json`` + weights) or a single ``.safetensors`` file in the
transformers key layout (``vision_model.*``, ``visual_projection.weight``), as
kept in A1111/ComfyUI ``models/clip_vision/``.  Pickled files are read with
``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from huabi.errors import HuabiError
from huabi.models.formats import read_tensor_file
from huabi.models.hashes import HashCache

IP_ADAPTER_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
IMAGE_ENCODER_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")

# Cross-attention width -> the family an adapter was trained for (for error messages).
_FAMILY_BY_CONTEXT_WIDTH = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
# Attention heads of the CLIP vision towers IP-Adapters use, by hidden width
# (ViT-B/32: 12; ViT-L/14: 16; OpenCLIP ViT-H/14: 16; ViT-bigG/14: 16); the shapes do not say.
_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16, 1664: 16}


@dataclass
class IPAdapterWeights:
    """The tensors of one IP-Adapter file, checked and sorted into their two parts."""

    name: str
    path: Path | None
    kind: str  # "base" | "plus" | "full"
    image_proj: dict[str, torch.Tensor] = field(repr=False)
    # Cross-attention layer i (in the UNet's order) -> (to_k_ip weight, to_v_ip weight).
    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    context_width: int  # the UNet cross-attention width the tokens are made for
    image_embed_width: int  # what the projection reads: image_embeds (base) or hidden states (plus, full)
    num_tokens: int
    short_hash: str | None = None

    @property
    def uses_hidden_states(self) -> bool:
        """Plus and full-face adapters read the encoder's penultimate hidden states, not its embedding."""
        return self.kind != "base"

    @property
    def family_text(self) -> str:
        """What the adapter was made for: "SDXL (2048-wide context)", or "a 128-wide context"."""
        family = _FAMILY_BY_CONTEXT_WIDTH.get(self.context_width)
        return f"{family} ({self.context_width}-wide context)" if family else f"a {self.context_width}-wide context"


def ip_adapter_from_state_dict(data: dict, name: str, path: Path | None = None) -> IPAdapterWeights:
    """Sort a flat (``image_proj.x``) or nested (``{"image_proj": {...}}``) state dict."""
    image_proj: dict[str, torch.Tensor] = {}
    attn: dict[str, torch.Tensor] = {}
    for part, target in (("image_proj", image_proj), ("ip_adapter", attn)):
        nested = data.get(part)
        if isinstance(nested, dict):
            target.update(nested)
        for key, value in data.items():
            if isinstance(key, str) and key.startswith(part + "."):
                target[key[len(part) + 1:]] = value
    if not image_proj or not attn:
        keys = ", ".join(map(str, list(data)[:4]))
        raise HuabiError(f"IP-Adapter {name}: not an IP-Adapter file (no image_proj/ip_adapter weights; keys: {keys})")
    for key, value in (*image_proj.items(), *attn.items()):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise HuabiError(f"IP-Adapter {name}: {key} is not a floating-point tensor")
    if "perceiver_resampler.proj_in.weight" in image_proj or ("norm.weight" in image_proj and "proj.0.weight" in image_proj
                                                               and "proj.3.weight" not in image_proj):
        raise HuabiError(f"IP-Adapter {name}: FaceID adapters are not supported (they need an insightface face model)")
    if "latents" in image_proj:
        kind = "plus"
        num_tokens = int(image_proj["latents"].shape[1])
        image_width = int(image_proj["proj_in.weight"].shape[1])
        context_width = int(image_proj["proj_out.weight"].shape[0])
    elif "proj.3.weight" in image_proj:
        kind = "full"
        num_tokens = 257  # 256 patch tokens + the class token of ViT-H/14 at 224 px
        image_width = int(image_proj["proj.0.weight"].shape[1])
        context_width = int(image_proj["proj.3.weight"].shape[0])
    elif "proj.weight" in image_proj and "norm.weight" in image_proj:
        kind = "base"
        context_width = int(image_proj["norm.weight"].shape[0])
        out_features, image_width = (int(s) for s in image_proj["proj.weight"].shape)
        if out_features % context_width:
            raise HuabiError(f"IP-Adapter {name}: image_proj.proj.weight {out_features} rows is not a multiple of {context_width}")
        num_tokens = out_features // context_width
    else:
        raise HuabiError(f"IP-Adapter {name}: unknown image projection ({', '.join(sorted(image_proj)[:4])})")
    indices = sorted({int(key.split(".")[0]) for key in attn if key.split(".")[0].isdigit()})
    layers = []
    for index in indices:
        k = attn.get(f"{index}.to_k_ip.weight")
        v = attn.get(f"{index}.to_v_ip.weight")
        if k is None or v is None:
            raise HuabiError(f"IP-Adapter {name}: layer {index} lacks to_k_ip or to_v_ip")
        if k.shape[1] != context_width or v.shape[1] != context_width or k.shape != v.shape:
            raise HuabiError(
                f"IP-Adapter {name}: layer {index} projects {list(k.shape)}/{list(v.shape)}, expected [*, {context_width}]"
            )
        layers.append((k, v))
    if not layers or indices != list(range(1, 2 * len(indices), 2)):
        raise HuabiError(f"IP-Adapter {name}: attention layers numbered {indices[:6]}..., expected 1, 3, 5, ...")
    return IPAdapterWeights(
        name=name, path=path, kind=kind, image_proj=image_proj, layers=layers,
        context_width=context_width, image_embed_width=image_width, num_tokens=num_tokens,
    )


def load_ip_adapter(path: str | Path, *, cache: HashCache | None = None) -> IPAdapterWeights:
    """Read an IP-Adapter file (``.safetensors`` flat keys, or ``.bin`` nested dicts)."""
    path = Path(path)
    if not path.is_file():
        raise HuabiError(f"IP-Adapter {path}: no such file")
    weights = ip_adapter_from_state_dict(read_tensor_file(path, "IP-Adapter"), path.stem, path)
    weights.short_hash = (cache if cache is not None else HashCache()).short_hash(path)
    return weights


def build_image_projection(weights: IPAdapterWeights, unet: nn.Module) -> nn.Module:
    """diffusers' projection module for the adapter's ``image_proj`` weights (float32, CPU).

    Uses the UNet loader's own converter (ImageProjection, IPAdapterPlusImageProjection,
    IPAdapterFullImageProjection), so the key renaming is exactly diffusers'.
    """
    from diffusers import UNet2DConditionModel

    state = {key: value.to(torch.float32) for key, value in weights.image_proj.items()}
    try:
        projection = UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(
            unet, state, low_cpu_mem_usage=False
        )
    except Exception as exc:  # shapes that diffusers' modules reject
        raise HuabiError(f"IP-Adapter {weights.name}: image projection does not load ({str(exc).splitlines()[0][:160]})") from None
    return projection.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- image encoder


@dataclass
class ImageEncoder:
    """A CLIP vision tower with projection, and the preprocessing its inputs need."""

    name: str
    path: Path | None
    model: nn.Module = field(repr=False)  # transformers CLIPVisionModelWithProjection
    processor: object = field(repr=False)  # transformers CLIPImageProcessorPil
    short_hash: str | None = None

    @property
    def embed_width(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def hidden_width(self) -> int:
        return int(self.model.config.hidden_size)


def _vision_config_from_state(tensors: dict[str, torch.Tensor], name: str):
    from transformers import CLIPVisionConfig

    try:
        patch = tensors["vision_model.embeddings.patch_embedding.weight"]
        positions = tensors["vision_model.embeddings.position_embedding.weight"]
        projection = tensors["visual_projection.weight"]
        fc1 = tensors["vision_model.encoder.layers.0.mlp.fc1.weight"]
    except KeyError as missing:
        raise HuabiError(
            f"image encoder {name}: not a CLIP vision model in transformers layout (no {missing.args[0]})"
        ) from None
    hidden = int(patch.shape[0])
    layers = len({key.split(".")[3] for key in tensors if key.startswith("vision_model.encoder.layers.")})
    patch_px = int(patch.shape[-1])
    grid = int(round((positions.shape[0] - 1) ** 0.5))
    heads = _HEADS_BY_WIDTH.get(hidden, max(1, hidden // 64))
    # OpenAI's ViT-L/14 uses quick GELU; the OpenCLIP towers (ViT-H, bigG) plain GELU.
    act = "quick_gelu" if hidden in (768, 1024) else "gelu"
    return CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=int(fc1.shape[0]), projection_dim=int(projection.shape[0]),
        num_hidden_layers=layers, num_attention_heads=heads, image_size=grid * patch_px, patch_size=patch_px,
        hidden_act=act, num_channels=int(patch.shape[1]),
    )


def _processor_for(config, folder: Path | None):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if folder is not None and (folder / "preprocessor_config.json").is_file():
        settings = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))
        allowed = {"size", "crop_size", "image_mean", "image_std", "resample", "do_center_crop", "do_resize",
                   "do_normalize", "do_rescale", "rescale_factor", "do_convert_rgb"}
        return CLIPImageProcessorPil(**{k: v for k, v in settings.items() if k in allowed})
    side = int(config.image_size)
    # CLIP's own preprocessing: shortest side to the input size (bicubic), centre crop, CLIP mean/std.
    return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def _model_with_weights(config, tensors: dict, name: str) -> nn.Module:
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection(config)
    expected = model.state_dict()
    usable = {k: v for k, v in tensors.items() if k in expected}
    missing = sorted(set(expected) - set(usable) - {"vision_model.embeddings.position_ids"})
    if missing:
        raise HuabiError(f"image encoder {name}: missing weights {missing[:3]} (not a CLIP vision model with projection)")
    for key, value in usable.items():
        if not isinstance(value, torch.Tensor) or value.shape != expected[key].shape:
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise HuabiError(f"image encoder {name}: {key} has shape {shape}, expected {list(expected[key].shape)}")
    model.load_state_dict({k: v.to(torch.float32) for k, v in usable.items()}, strict=False)
    return model


def load_image_encoder(
    path: str | Path, *, device: torch.device, dtype: torch.dtype, cache: HashCache | None = None
) -> ImageEncoder:
    """A CLIP vision encoder from a transformers folder or a single weights file."""
    path = Path(path)
    cache = cache if cache is not None else HashCache()
    if path.is_dir():
        # Built from config.json and the weights file by hand (no from_pretrained: it may look at the hub,
        # prints progress bars, and would unpickle a .bin without weights_only).
        from transformers import CLIPVisionConfig

        if not (path / "config.json").is_file():
            raise HuabiError(f"image encoder {path}: folder has no config.json")
        try:
            settings = json.loads((path / "config.json").read_text(encoding="utf-8"))
            settings = settings.get("vision_config", settings)
            config = CLIPVisionConfig.from_dict(settings)
        except (ValueError, TypeError) as exc:
            raise HuabiError(f"image encoder {path.name}: config.json is not a CLIP vision config ({exc})") from None
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not weights:
            raise HuabiError(f"image encoder {path.name}: folder has no .safetensors or .bin weights")
        model = _model_with_weights(config, read_tensor_file(weights[0], "image encoder"), path.name)
        short_hash = cache.short_hash(weights[0])
        processor = _processor_for(config, path)
    elif path.is_file():
        tensors = read_tensor_file(path, "image encoder")
        config = _vision_config_from_state(tensors, path.name)
        model = _model_with_weights(config, tensors, path.name)
        short_hash = cache.short_hash(path)
        processor = _processor_for(config, None)
    else:
        raise HuabiError(f"image encoder {path}: no such file or folder")
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    name = path.name if path.is_dir() else path.stem
    return ImageEncoder(name=name, path=path, model=model, processor=processor, short_hash=short_hash)
