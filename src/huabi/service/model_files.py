"""Where model files are: the models folder, the built-in model, and resolving a name, path or hash.

A reference is a path, a file or folder name in the models folder (adapter folders such as
``Lora/`` or ``ControlNet/`` excluded), or an A1111 short hash; None means the built-in huabi-mini.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from huabi.errors import HuabiError
from huabi.models.hashes import model_short_hash

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".gguf")
BUILTIN_MODEL_NAME = "huabi-mini"
# Sub-folders of the models folder that hold adapters, VAEs, upscalers: never listed as checkpoints.
NON_CHECKPOINT_FOLDERS = frozenset(name.lower() for name in (
    "Lora", "LyCORIS", "hypernetworks", "ControlNet", "ipadapter", "clip_vision", "VAE", "ESRGAN", "embeddings",
    "text_encoders", "text_encoder", "clip", "loras"))  # SD3/FLUX parts (ComfyUI/Forge folder names)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path


def default_models_dir() -> Path:
    return Path(os.environ.get("HUABI_MODELS_DIR", Path.home() / "huabi" / "models"))


def builtin_model_path() -> Path:
    return Path(str(resources.files("huabi") / "assets" / "models" / f"{BUILTIN_MODEL_NAME}.safetensors"))


def builtin_lora_dir() -> Path:
    """huabi's own LoRAs (``demo``, made by scripts/make_demo_lora.py), searched after the models folder's."""
    return Path(str(resources.files("huabi") / "assets" / "loras"))


def builtin_styles_file() -> Path:
    """A handful of well-known A1111 styles, used when the user has no styles.csv of their own."""
    return Path(str(resources.files("huabi") / "assets" / "styles.csv"))


def iter_models(models_dir: Path) -> Iterator[ModelEntry]:
    """Checkpoint files and diffusers folders under ``models_dir``, sorted by path (the built-in model first)."""
    builtin = builtin_model_path()
    if builtin.exists():
        yield ModelEntry(BUILTIN_MODEL_NAME, builtin)
    if not models_dir.is_dir():
        return
    for path in sorted(models_dir.rglob("*")):
        if path.relative_to(models_dir).parts[0].lower() in NON_CHECKPOINT_FOLDERS:
            continue
        if path.is_file() and path.suffix in MODEL_SUFFIXES:
            yield ModelEntry(path.stem, path)
        elif path.is_dir() and (path / "model_index.json").exists():
            yield ModelEntry(path.name, path)


def resolve_model_path(ref: str | None, models_dir: Path) -> Path:
    """A path, a name in ``models_dir``, or an A1111 short hash; None is the built-in model."""
    if ref is None or ref == BUILTIN_MODEL_NAME:
        builtin = builtin_model_path()
        if builtin.exists():
            return builtin
        raise HuabiError(f"model: the built-in model file {builtin} is missing; reinstall huabi or pass --model PATH")
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if path.suffix in MODEL_SUFFIXES or os.sep in ref:
        raise HuabiError(f"model: {ref}: no such file")
    entries = list(iter_models(models_dir))
    for entry in entries:
        if entry.name == ref or entry.path.name == ref:
            return entry.path
    wanted = ref.lower()
    if all(c in "0123456789abcdef" for c in wanted) and len(wanted) >= 8:
        for entry in entries:
            if entry.path.is_file() and model_short_hash(entry.path).startswith(wanted[:10]):
                return entry.path
    raise HuabiError(f"model: no model named or hashed {ref!r} in {models_dir} "
                     f"({models_summary(entries, models_dir)}); pass --model PATH")


def models_summary(entries: list[ModelEntry], models_dir: Path) -> str:
    """What the models folder holds, for a missing-model error."""
    names = [entry.name for entry in entries if entry.name != BUILTIN_MODEL_NAME]
    if not Path(models_dir).is_dir():
        return "that folder does not exist; set HUABI_MODELS_DIR or --models-dir"
    if not names:
        return "it holds no models"
    return "it holds: " + ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
