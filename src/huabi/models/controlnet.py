"""ControlNet weight files: read, detect the family, convert original <-> diffusers, build the module.

Layouts understood
------------------
* original (lllyasviel ControlNet / sd-webui-controlnet ``.pth``/``.safetensors``): keys
  under ``control_model.`` (or bare): a copy of the UNet encoder (``time_embed``,
  ``input_blocks``, ``middle_block``, SDXL ``label_emb``) plus ``input_hint_block.N``
  (the conditioning-image encoder: convs at even indices, SiLU between),
  ``zero_convs.N.0`` (one 1x1 conv per encoder output) and ``middle_block_out.0``;
* diffusers: a ``ControlNetModel`` folder (``config.json`` +
  ``diffusion_pytorch_model.safetensors``) or that weights file alone.

Conversion is the UNet table of :mod:`huabi.models.convert` restricted to the
encoder half, plus the ControlNet-only rows below; read backwards it converts
diffusers -> original, so round trips are bit-identical.

What the shapes cannot say (attention head counts, norm groups) comes from the
base model the ControlNet is used with: a ControlNet is a copy of its base
UNet's encoder, so its config is the base UNet's, with the conditioning
embedding read from the file.  Family is decided by structure (SDXL's size
embedding, linear vs 1x1-conv attention projections); a ControlNet of another
family than the loaded model, or whose widths do not fit it, is a one-line error.

T2I-Adapters (TencentARC) go through the same door (:func:`load_control_model`):
the original ``.pth`` layout (``conv_in``, ``body.N.block1/2``, ``body.N.in_conv``;
light adapters ``body.N.body.M``/``out_conv``) converts to diffusers'
``T2IAdapter`` keys (``adapter.body.LEVEL.resnets.M...``), and diffusers folders load
as they are; the level count comes from the base UNet.

Not supported (refused with a message): "control-lora" files (``lora_controlnet``
key, Stability's rank-decomposed ControlNets), the old "difference" ControlNets
and the CLIP-vision "style" T2I-Adapter.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from huabi.errors import HuabiError
from huabi.models.convert import rename_keys, unet_key_table
from huabi.core.family import ModelFamily

ORIGINAL_PREFIX = "control_model."
CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
_ENCODER_ROOTS = ("time_embed.", "input_blocks.", "middle_block.", "label_emb.")
# Keys of the UNet config a ControlNet copies (ControlNetModel.from_unet's list).
_COPIED_UNET_CONFIG = (
    "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
    "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
    "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "encoder_hid_dim",
    "encoder_hid_dim_type", "attention_head_dim", "num_attention_heads", "use_linear_projection",
    "class_embed_type", "addition_embed_type", "addition_time_embed_dim", "num_class_embeds", "upcast_attention",
    "resnet_time_scale_shift", "projection_class_embeddings_input_dim", "mid_block_type",
)


def controlnet_key_table(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(original prefix, diffusers prefix) rows for a ``ControlNetModel`` config."""
    unet_like = dict(config)
    unet_like.setdefault("up_block_types", [
        "CrossAttnUpBlock2D" if t.startswith("CrossAttn") else "UpBlock2D" for t in reversed(config["down_block_types"])
    ])
    rows = [(o, d) for o, d in unet_key_table(unet_like) if o.startswith(_ENCODER_ROOTS)]
    embedding = list(config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256))
    # input_hint_block: conv_in at 0, then 2 convs per width step (SiLU at odd indices), conv_out last.
    blocks = 2 * (len(embedding) - 1)
    rows.append(("input_hint_block.0", "controlnet_cond_embedding.conv_in"))
    rows += [(f"input_hint_block.{2 * (k + 1)}", f"controlnet_cond_embedding.blocks.{k}") for k in range(blocks)]
    rows.append((f"input_hint_block.{2 * (blocks + 1)}", "controlnet_cond_embedding.conv_out"))
    levels, per_level = len(config["block_out_channels"]), int(config["layers_per_block"])
    outputs = 1 + levels * per_level + (levels - 1)  # conv_in + res-blocks + downsamplers
    rows += [(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}") for i in range(outputs)]
    rows.append(("middle_block_out.0", "controlnet_mid_block"))
    return rows


def controlnet_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Original ControlNet keys (``control_model.`` stripped) -> diffusers ``ControlNetModel`` keys."""
    return rename_keys(state_dict, dict(controlnet_key_table(config)), "ControlNet (original -> diffusers)")


def controlnet_to_original(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers ``ControlNetModel`` keys -> original keys (without the ``control_model.`` prefix)."""
    return rename_keys(state_dict, {d: o for o, d in controlnet_key_table(config)}, "ControlNet (diffusers -> original)")


def _strip_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(k.startswith(ORIGINAL_PREFIX) for k in state_dict):
        return {k[len(ORIGINAL_PREFIX):]: v for k, v in state_dict.items() if k.startswith(ORIGINAL_PREFIX)}
    return state_dict


def controlnet_layout(state_dict: Mapping[str, torch.Tensor], source: str) -> str:
    """``"original"`` or ``"diffusers"``; anything else is an error naming what the file is."""
    keys = list(state_dict)
    if any(k.startswith("input_hint_block.") for k in keys):
        return "original"
    if any(k.startswith("controlnet_cond_embedding.") for k in keys):
        return "diffusers"
    if "lora_controlnet" in state_dict:
        raise HuabiError(f"{source}: control-lora files are not supported (use a full ControlNet)")
    if any(k.startswith("adapter.") or k.startswith("body.") for k in keys):
        raise HuabiError(f"{source}: is a T2I-Adapter, not a ControlNet")
    if any(k.startswith("model.diffusion_model.") for k in keys):
        raise HuabiError(f"{source}: is a checkpoint, not a ControlNet (no input_hint_block / controlnet_cond_embedding keys)")
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise HuabiError(f"{source}: not a ControlNet (no input_hint_block / controlnet_cond_embedding keys; e.g. {sample})")


def controlnet_family(state_dict: Mapping[str, torch.Tensor], layout: str) -> ModelFamily:
    """SD1, SD2 or SDXL, from structure: SDXL has the size embedding, SD2 linear attention projections."""
    keys = list(state_dict)
    sdxl_root = "label_emb." if layout == "original" else "add_embedding."
    if any(k.startswith(sdxl_root) for k in keys):
        return ModelFamily.SDXL
    proj = [state_dict[k] for k in keys if k.endswith(".proj_in.weight")]
    if proj and proj[0].ndim == 2:
        return ModelFamily.SD2
    return ModelFamily.SD1


# Base model family -> the ControlNet family that fits it (structure only; widths are checked on build).
_FITS = {
    ModelFamily.SD1: ModelFamily.SD1,
    ModelFamily.HUABI_MINI: ModelFamily.SD1,
    ModelFamily.SD2: ModelFamily.SD2,
    ModelFamily.SDXL: ModelFamily.SDXL,
}


def read_controlnet_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """``(tensors without the control_model. prefix, diffusers config or None)`` of a file or folder."""
    from huabi.models.formats import read_component_weights, read_state_dict

    path = Path(path)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise HuabiError(f"{path.name}: ControlNet folder has no config.json")
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise HuabiError(f"{path.name}: config.json unreadable: {error}") from None
        return dict(read_component_weights(path, "ControlNet")), config
    if not path.is_file():
        raise HuabiError(f"ControlNet: no such file: {path}")
    tensors, _metadata = read_state_dict(path)
    config = None
    sibling = path.with_name("config.json")  # a bare diffusers weights file next to its config
    if path.stem.startswith("diffusion_pytorch_model") and sibling.is_file():
        config = json.loads(sibling.read_text(encoding="utf-8"))
    return _strip_prefix(dict(tensors)), config


def config_for_base(
    state_dict: Mapping[str, torch.Tensor], layout: str, unet_config: Mapping[str, Any]
) -> dict[str, Any]:
    """A ``ControlNetModel`` config: the base UNet's, with input and hint widths read from the file."""
    config = {key: unet_config[key] for key in _COPIED_UNET_CONFIG if key in unet_config}
    if layout == "original":
        conv_in = state_dict.get("input_blocks.0.0.weight")
        hint = sorted(
            (int(k.split(".")[1]), v) for k, v in state_dict.items() if k.startswith("input_hint_block.") and k.endswith(".weight")
        )
    else:
        conv_in = state_dict.get("conv_in.weight")
        hint_keys = ["controlnet_cond_embedding.conv_in.weight"] + sorted(
            (k for k in state_dict if k.startswith("controlnet_cond_embedding.blocks.") and k.endswith(".weight")),
            key=lambda k: int(k.split(".")[2]),
        ) + ["controlnet_cond_embedding.conv_out.weight"]
        hint = [(i, state_dict[k]) for i, k in enumerate(hint_keys) if k in state_dict]
    if conv_in is None or len(hint) < 2:
        raise HuabiError("ControlNet layout not understood: no conv_in or conditioning-embedding convs")
    config["in_channels"] = int(conv_in.shape[1])
    config["conditioning_channels"] = int(hint[0][1].shape[1])
    # Embedding widths: conv_in's output, then the output of each stride-2 conv (every second block).
    widths = [int(hint[0][1].shape[0])] + [int(t.shape[0]) for _, t in hint[1:-1]][1::2]
    config["conditioning_embedding_out_channels"] = widths
    return config


def build_controlnet(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    what: str = "ControlNet",
) -> torch.nn.Module:
    """A diffusers ``ControlNetModel`` from diffusers-layout weights, strictly checked."""
    from diffusers import ControlNetModel

    from huabi.models.load import build_module

    return build_module(ControlNetModel, dict(config), state_dict, device=device, dtype=dtype, what=what)


def load_controlnet(
    path: str | Path,
    *,
    base_family: ModelFamily,
    unet_config: Mapping[str, Any],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    read: tuple[dict[str, torch.Tensor], dict[str, Any] | None] | None = None,
) -> torch.nn.Module:
    """Load a ControlNet file or folder for a base model of ``base_family`` with ``unet_config``
    (``read``: the file's :func:`read_controlnet_file` result, when already read)."""
    path = Path(path)
    name = path.name
    tensors, file_config = read if read is not None else read_controlnet_file(path)
    layout = controlnet_layout(tensors, name)
    family = controlnet_family(tensors, layout)
    if _FITS.get(ModelFamily(base_family)) is not family:
        raise HuabiError(f"ControlNet {path.stem}: made for {family.value}, the loaded model is {ModelFamily(base_family).value}")
    config = config_for_base(tensors, layout, unet_config)
    if _yaml_says_global_pooling(path):  # e.g. control_v11e_sd15_shuffle.yaml, as sd-webui-controlnet reads it
        config["global_pool_conditions"] = True
    if file_config is not None:  # a diffusers config says what shapes cannot (e.g. fewer transformer layers)
        config.update({k: v for k, v in file_config.items() if not k.startswith("_") and k != "sample_size"})
    try:  # a layout that does not fit the loaded model fails in the conversion or in the build
        weights = controlnet_to_diffusers(tensors, config) if layout == "original" else tensors
        return build_controlnet(weights, config, device=device, dtype=dtype, what=f"ControlNet {path.stem}")
    except HuabiError as error:
        raise HuabiError(f"{error} (a {family.value} ControlNet of another size than the loaded model?)") from None


def _yaml_says_global_pooling(path: Path) -> bool:
    """True when the model's sibling ``.yaml`` (ControlNet 1.1 ships one per model) sets
    ``global_average_pooling: True`` (the shuffle model: residuals are spatial means)."""
    sibling = path.with_suffix(".yaml")
    if not path.is_file() or not sibling.is_file():
        return False
    try:
        text = sibling.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(
        line.split(":", 1)[0].strip() == "global_average_pooling" and line.split(":", 1)[1].strip().lower() == "true"
        for line in text.splitlines() if ":" in line
    )


def save_controlnet_original(module: torch.nn.Module, path: str | Path) -> Path:
    """Write a ``ControlNetModel`` as an original-layout single file (``control_model.`` keys), atomically."""
    from huabi.models.formats import write_safetensors_atomic

    original = controlnet_to_original(module.state_dict(), module.config)
    return write_safetensors_atomic(path, {ORIGINAL_PREFIX + k: v for k, v in original.items()})


def legacy_model_hash(path: str | Path) -> str:
    """A1111's old 8-hex "model hash" (SHA-256 of 64 KiB at offset 1 MiB), which
    sd-webui-controlnet shows as ``name [hash]``; folders hash their weights file."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("diffusion_pytorch_model*.safetensors")) + sorted(path.glob("diffusion_pytorch_model*.bin"))
        if not candidates:
            return "00000000"
        path = candidates[0]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        digest.update(handle.read(0x10000))
    return digest.hexdigest()[:8]


# ------------------------------------------------------------------------------------- T2I-Adapter

def is_t2i_adapter(state_dict: Mapping[str, torch.Tensor]) -> bool:
    keys = list(state_dict)
    return any(k.startswith("adapter.") for k in keys) or (
        "conv_in.weight" in state_dict and any(k.startswith("body.") for k in keys)
    )


def t2i_adapter_to_diffusers(
    state_dict: Mapping[str, torch.Tensor], levels: int, source: str = "T2I-Adapter"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Original TencentARC adapter keys -> ``(diffusers T2IAdapter keys, config)`` for ``levels`` UNet levels.

    Full adapter: ``body.K`` (K = level * blocks + block) has ``block1``/``block2`` and,
    where the width changes, ``in_conv``.  Light adapter (e.g. colour): ``body.LEVEL``
    has ``in_conv``, ``body.M.block1/2`` and ``out_conv``.
    """
    if any(k.startswith("adapter.") for k in state_dict):
        raise HuabiError(f"{source}: already in the diffusers layout")
    conv_in = state_dict.get("conv_in.weight")
    if conv_in is not None:  # full adapter
        body = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("body.")})
        blocks, remainder = divmod(len(body), levels)
        if remainder or blocks < 1:
            raise HuabiError(f"{source}: {len(body)} adapter blocks do not split into the model's {levels} levels")
        converted: dict[str, torch.Tensor] = {}
        for key, tensor in state_dict.items():
            parts = key.split(".")
            if parts[0] == "conv_in":
                converted["adapter." + key] = tensor
            elif parts[0] == "body" and parts[2] in ("block1", "block2"):
                level, block = divmod(int(parts[1]), blocks)
                converted[f"adapter.body.{level}.resnets.{block}.{'.'.join(parts[2:])}"] = tensor
            elif parts[0] == "body" and parts[2] == "in_conv":
                level, block = divmod(int(parts[1]), blocks)
                if block != 0:
                    raise HuabiError(f"{source}: unexpected {key} (width changes only at a level's first block)")
                converted[f"adapter.body.{level}.{'.'.join(parts[2:])}"] = tensor
            else:
                raise HuabiError(f"{source}: key {key} has no conversion")
        channels = [int(state_dict[f"body.{level * blocks}.block2.weight"].shape[0]) for level in range(levels)]
        pixels = 8 * 8  # SD1.5 adapters unshuffle 8x8 pixels into channels
        config = {"in_channels": int(conv_in.shape[1]) // pixels, "channels": channels, "num_res_blocks": blocks,
                  "downscale_factor": 8, "adapter_type": "full_adapter"}
        return converted, config
    # light adapter
    converted = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        if parts[0] != "body":
            raise HuabiError(f"{source}: key {key} has no conversion")
        if parts[2] == "body":
            converted[f"adapter.body.{parts[1]}.resnets.{'.'.join(parts[3:])}"] = tensor
        else:
            converted["adapter." + key] = tensor
    found = sorted({int(k.split(".")[1]) for k in state_dict})
    in_conv = state_dict["body.0.in_conv.weight"]
    blocks = len({int(k.split(".")[3]) for k in state_dict if k.startswith("body.0.body.")})
    channels = [int(state_dict[f"body.{level}.out_conv.weight"].shape[0]) for level in found]
    config = {"in_channels": int(in_conv.shape[1]) // 64, "channels": channels, "num_res_blocks": blocks,
              "downscale_factor": 8, "adapter_type": "light_adapter"}
    return converted, config


def load_t2i_adapter(
    path: str | Path,
    *,
    base_family: ModelFamily,
    unet_config: Mapping[str, Any],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    read: tuple[dict[str, torch.Tensor], dict[str, Any] | None] | None = None,
) -> torch.nn.Module:
    """A diffusers ``T2IAdapter`` from an original ``.pth``/``.safetensors`` or a diffusers folder/file."""
    from diffusers import T2IAdapter

    path = Path(path)
    tensors, config = read if read is not None else read_controlnet_file(path)
    levels = len(unet_config["block_out_channels"])
    if not any(k.startswith("adapter.") for k in tensors):
        tensors, config = t2i_adapter_to_diffusers(tensors, levels, f"T2I-Adapter {path.stem}")
    elif config is None:  # bare diffusers weights: a full adapter with the UNet's widths
        blocks = len({k.split(".")[4] for k in tensors if k.startswith("adapter.body.0.resnets.")})
        xl = ModelFamily(base_family) is ModelFamily.SDXL
        config = {"in_channels": int(tensors["adapter.conv_in.weight"].shape[1]) // (256 if xl else 64),
                  "channels": list(unet_config["block_out_channels"]), "num_res_blocks": blocks,
                  "downscale_factor": 16 if xl else 8, "adapter_type": "full_adapter_xl" if xl else "full_adapter"}
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    adapter_family = ModelFamily.SDXL if config.get("adapter_type") == "full_adapter_xl" else ModelFamily.SD1
    if _FITS.get(ModelFamily(base_family)) not in (adapter_family, ModelFamily.SD2 if adapter_family is ModelFamily.SD1 else None):
        raise HuabiError(f"T2I-Adapter {path.stem}: made for {adapter_family.value}, the loaded model is {ModelFamily(base_family).value}")
    if list(config["channels"]) != list(unet_config["block_out_channels"]):
        raise HuabiError(
            f"T2I-Adapter {path.stem}: widths {list(config['channels'])} do not fit the model's UNet "
            f"{list(unet_config['block_out_channels'])}"
        )
    from huabi.models.load import build_module

    return build_module(T2IAdapter, config, tensors, device=device, dtype=dtype, what=f"T2I-Adapter {path.stem}")


def is_adapter_module(module: torch.nn.Module) -> bool:
    return "adapter_type" in getattr(module, "config", {})


def load_control_model(
    path: str | Path,
    *,
    base_family: ModelFamily,
    unet_config: Mapping[str, Any],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """A ControlNet or a T2I-Adapter, whichever the file is (both live in ``ControlNet/``)."""
    path = Path(path)
    read = read_controlnet_file(path)
    tensors, config = read
    loader = load_t2i_adapter if (config is not None and "adapter_type" in config) or is_t2i_adapter(tensors) else load_controlnet
    return loader(path, base_family=base_family, unet_config=unet_config, device=device, dtype=dtype, read=read)

