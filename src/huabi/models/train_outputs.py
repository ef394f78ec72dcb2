"""Writing what user training produces: kohya-layout LoRA/LyCORIS files and A1111 embeddings.

* LoRA: the network's ``lora_unet_*``/``lora_te*_`` tensors with kohya's ``ss_*`` training
  metadata, ``modelspec.*`` keys (Stability's model-spec 1.0 that kohya also writes) and
  ``sshs_model_hash`` = SHA-256 of the tensor bytes after the header (what A1111 shows as
  the LoRA's hash; it equals the "AutoV3" hash of the file, so both readings agree).
* Textual inversion: A1111's safetensors form, ``emb_params`` [vectors, width]; SDXL
  embeddings hold ``clip_l`` and ``clip_g``.

Every file is written atomically (temp file + ``os.replace``).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor

from huabi.errors import HuabiError
from huabi.models.family import ModelFamily
from huabi.models.formats import write_safetensors_atomic

# kohya's ss_base_model_version and model-spec architecture names per family
BASE_MODEL_VERSION = {
    ModelFamily.SD1: "sd_v1",
    ModelFamily.SD2: "sd_v2",
    ModelFamily.SDXL: "sdxl_base_v1-0",
    ModelFamily.HUABI_MINI: "sd_v1",  # SD1 layout; the huabi.* markers tell huabi-mini apart
}
MODELSPEC_ARCHITECTURE = {
    ModelFamily.SD1: "stable-diffusion-v1",
    ModelFamily.SD2: "stable-diffusion-v2-512",
    ModelFamily.SDXL: "stable-diffusion-xl-v1-base",
    ModelFamily.HUABI_MINI: "huabi-mini",
}


def tensor_data_hash(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """SHA-256 of the bytes after the safetensors header (independent of the metadata)."""
    from safetensors.torch import save

    blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=dict(metadata or {}) or None)
    (header_len,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(blob[8 + header_len:]).hexdigest()


def modelspec_metadata(family: ModelFamily, *, kind: str, title: str, resolution_px: int, date: str,
                       prediction: str = "epsilon", description: str = "") -> dict[str, str]:
    architecture = MODELSPEC_ARCHITECTURE.get(family, family.value)
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/{kind}",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family is ModelFamily.SDXL else "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution_px}x{resolution_px}",
        "modelspec.date": date,
        "modelspec.prediction_type": prediction,
        "modelspec.description": description,
    }


def write_lora_file(path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> Path:
    """A kohya/LyCORIS file with ``sshs_model_hash`` added to ``metadata``."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise HuabiError(f"output {path.name}: LoRA files are written as .safetensors")
    if not tensors:
        raise HuabiError("the network has no tensors to write")
    full = dict(metadata)
    full["sshs_model_hash"] = tensor_data_hash(tensors)
    return write_safetensors_atomic(path, tensors, full)


def embedding_tensors(vectors: Sequence[Tensor], family: ModelFamily) -> dict[str, Tensor]:
    """A1111's safetensors embedding: ``emb_params``, or ``clip_l``/``clip_g`` for SDXL."""
    if family is ModelFamily.SDXL:
        if len(vectors) != 2:
            raise HuabiError("an SDXL embedding needs vectors for both text encoders")
        return {"clip_l": vectors[0].detach().float().cpu(), "clip_g": vectors[1].detach().float().cpu()}
    if len(vectors) != 1:
        raise HuabiError(f"a {family.value} embedding has vectors for one text encoder, got {len(vectors)}")
    return {"emb_params": vectors[0].detach().float().cpu()}


def write_embedding_file(path: str | Path, vectors: Sequence[Tensor], family: ModelFamily,
                         metadata: Mapping[str, str] | None = None) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise HuabiError(f"output {path.name}: embeddings are written as .safetensors")
    return write_safetensors_atomic(path, embedding_tensors(vectors, family), metadata)
