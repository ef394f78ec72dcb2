"""``huabi inspect FILE``: what a model file is, without loading it into modules.

Reports the kind (checkpoint, LoRA/LyCORIS, VAE, embedding, ControlNet, GGUF
UNet, unknown), for checkpoints the family/variant/prediction from
``detect``, tensor dtypes, parameter count, file size, the hashes people
compare files by, and embedded metadata (safetensors ``__metadata__`` such as
kohya's ``ss_*`` training info or A1111's merge recipe; GGUF key/values).

Hashes (all over the file's bytes unless said otherwise):

* ``sha256``: the full digest (civitai lists it).
* A1111 ``Model hash`` = civitai ``AutoV2``: first 10 hex digits of the sha256.
* first 12 digits of the sha256: A1111's ``TI hashes`` (and ``Lora hashes`` of non-safetensors files).
* ``AutoV1``: A1111's legacy model hash, sha256 of the 64 KiB at offset 1 MiB, 8 digits.
* ``AutoV3`` (safetensors only): sha256 of the tensor data after the header (kohya's
  ``sshs_model_hash``, the additional-networks hash), first 12 digits: what A1111's
  ``Lora hashes`` records for a ``.safetensors`` LoRA.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from huabi.errors import HuabiError
from huabi.models.detect import Detected, detect

_FAMILY_NAMES = {
    "sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "SDXL base",
    "sdxl_refiner": "SDXL refiner", "huabi_mini": "huabi-mini",
}
_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_TEXT_VALUE_LIMIT = 400  # characters of one metadata value shown without --full


def legacy_hash(path: Path) -> str:
    """A1111's old model hash (civitai AutoV1): sha256 of 64 KiB from offset 1 MiB, 8 hex digits."""
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]


def safetensors_data_hash(path: Path) -> str:
    """sha256 of a safetensors file's bytes after its header (kohya's addnet hash, civitai AutoV3)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        handle.seek(8 + header_len)
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _hashes(path: Path) -> dict[str, str]:
    from huabi.models.hashes import HashCache

    if path.is_dir():
        sha = HashCache().sha256(path)
        return {"sha256 (unet weights)": sha, "Model hash (A1111) / AutoV2": sha[:10]}
    sha = HashCache().sha256(path)
    hashes = {
        "sha256": sha,
        "Model hash (A1111) / AutoV2": sha[:10],
        "sha256[:12] (A1111 TI hashes)": sha[:12],
        "AutoV1 (legacy A1111 hash)": legacy_hash(path),
    }
    if path.suffix.lower() == ".safetensors":
        hashes["AutoV3 (addnet; A1111 Lora hashes)"] = safetensors_data_hash(path)[:12]
    return hashes


def _size_text(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} bytes" if unit == "bytes" else f"{value:.2f} {unit} ({size} bytes)"
        value /= 1024
    return f"{size} bytes"  # pragma: no cover


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _lora_summary(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
    keys = list(tensors)
    kinds = Counter()
    ranks: set[int] = set()
    for key, tensor in tensors.items():
        if key.endswith((".lora_down.weight", ".lora_A.weight")):
            kinds["LoRA/LoCon"] += 1
            ranks.add(int(tensor.shape[0]))
        elif key.endswith(".hada_w1_a"):
            kinds["LoHa"] += 1
            ranks.add(int(tensor.shape[1]))
        elif key.endswith(".lokr_w1") or key.endswith(".lokr_w1_a"):
            kinds["LoKr"] += 1
        elif key.endswith((".oft_diag", ".oft_blocks")):
            kinds["OFT"] += 1
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys):
        base = "sdxl (text encoders te1/te2)"
    elif any(k.startswith("lora_te_") for k in keys):
        base = "sd1/sd2 (one text encoder)"
    else:
        base = "unknown from keys"
    targets = sorted({"unet" if k.startswith(("lora_unet_", "unet.")) else "text encoder" if k.startswith(("lora_te", "text_encoder")) else "other" for k in keys})
    summary: dict[str, Any] = {
        "modules": dict(kinds) or {"unrecognised": len(keys)},
        "ranks": sorted(ranks),
        "targets": targets,
        "base model (from keys)": base,
    }
    for name in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_sd_model_name"):
        if name in metadata:
            summary[name] = metadata[name]
    training = _training_summary(metadata)
    if training:
        summary["training"] = training
    return summary


def _training_summary(metadata: dict[str, str]) -> str:
    """kohya's training record in one line: steps, images, resolution, LR, and the trigger words."""
    parts = []
    for key, label in (("ss_steps", "steps"), ("ss_num_train_images", "images (with repeats)"), ("ss_resolution", "resolution"),
                       ("ss_learning_rate", "lr"), ("ss_optimizer", "optimizer"), ("ss_mixed_precision", "precision")):
        if metadata.get(key):
            parts.append(f"{label} {metadata[key]}")
    try:
        frequency = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except ValueError:
        frequency = {}
    counts: Counter = Counter()
    for tags in frequency.values() if isinstance(frequency, dict) else ():
        if isinstance(tags, dict):
            counts.update({str(k): int(v) for k, v in tags.items() if isinstance(v, (int, float))})
    if counts:
        parts.append("trigger words: " + ", ".join(tag for tag, _ in counts.most_common(5)))
    return "; ".join(parts)


def _embedding_summary(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    if "clip_l" in tensors and "clip_g" in tensors:
        return {"vectors": int(tensors["clip_l"].shape[0]), "widths": "768 (clip_l) + 1280 (clip_g)", "family": "sdxl"}
    vectors = [t for k, t in tensors.items() if t.ndim == 2]
    if not vectors:
        return {}
    width = int(vectors[0].shape[-1])
    family = {768: "sd1", 1024: "sd2"}.get(width, f"unknown ({width}-wide)")
    return {"vectors": int(vectors[0].shape[0]), "width": width, "family": family}


def _unet_family_from_shapes(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """Family of a bare original-layout UNet (GGUF): structure only, as detect does for full files."""
    conv_in = tensors.get(prefix + "input_blocks.0.0.weight")
    to_k = sorted(k for k in tensors if k.startswith(prefix) and k.endswith("transformer_blocks.0.attn2.to_k.weight"))
    if conv_in is None or not to_k:
        return {"family": "unknown"}
    context = int(tensors[to_k[0]].shape[1])
    proj_in = tensors.get(to_k[0].split("transformer_blocks.")[0] + "proj_in.weight")
    linear = proj_in is not None and proj_in.ndim == 2
    if prefix + "label_emb.0.0.weight" in tensors:
        family = "sdxl"  # base or refiner: both have size conditioning (label_emb)
    else:
        family = "sd2" if linear else "sd1"
    variant = {4: "base", 9: "inpaint", 8: "instruct_pix2pix"}.get(int(conv_in.shape[1]), f"{int(conv_in.shape[1])} input channels")
    return {"family": family, "variant": variant, "context_dim": context}


def inspect_file(path: str | Path, *, with_hashes: bool = True) -> dict[str, Any]:
    """Everything ``huabi inspect`` prints, as a JSON-friendly dict."""
    path = Path(path)
    if not path.exists():
        raise HuabiError(f"inspect: {path}: no such file or folder")
    info: dict[str, Any] = {"file": str(path)}
    info["size"] = _folder_size(path) if path.is_dir() else path.stat().st_size
    if path.suffix.lower() == ".gguf":
        info.update(_inspect_gguf(path))
    else:
        info.update(_inspect_tensors(path))
    if with_hashes:
        info["hashes"] = _hashes(path)
    return info


def _inspect_gguf(path: Path) -> dict[str, Any]:
    from huabi.models.gguf_io import ORIG_SHAPE_PREFIX, UNET_PREFIX, gguf_reader

    reader = gguf_reader(path)
    metadata = {}
    for name, field in reader.fields.items():
        if name.startswith(("GGUF.", ORIG_SHAPE_PREFIX)):
            continue
        try:
            metadata[name] = field.contents()
        except Exception:  # pragma: no cover
            metadata[name] = "?"
    shapes: dict[str, torch.Tensor] = {}
    types = Counter()
    params = 0
    for tensor in reader.tensors:
        shape_field = reader.fields.get(ORIG_SHAPE_PREFIX + tensor.name)
        shape = tuple(int(v) for v in shape_field.contents()) if shape_field is not None else tuple(int(v) for v in reversed(tensor.shape.tolist()))
        name = tensor.name if tensor.name.startswith(UNET_PREFIX) else UNET_PREFIX + tensor.name
        shapes[name] = torch.empty(shape, device="meta")
        types[tensor.tensor_type.name] += 1
        params += int(tensor.n_elements)
    arch = metadata.get("general.architecture")
    result: dict[str, Any] = {"kind": f"GGUF diffusion model (architecture {arch!r})" if arch else "GGUF file (no general.architecture)"}
    result.update(_unet_family_from_shapes(shapes, UNET_PREFIX))
    result.update(tensors=len(reader.tensors), parameters=params, dtypes=dict(sorted(types.items())))
    result["metadata"] = {k: (v if isinstance(v, (str, int, float, bool)) or v is None else list(v) if isinstance(v, (list, tuple)) else str(v)) for k, v in metadata.items()}
    return result


def _inspect_tensors(path: Path) -> dict[str, Any]:
    from huabi.models.detect import describe_non_checkpoint, detect
    from huabi.models.formats import read_state_dict_shapes

    try:
        tensors, metadata = read_state_dict_shapes(path)
    except HuabiError:
        if path.suffix.lower() in (".pt", ".bin", ".pth"):
            nested = _inspect_nested_pickle(path)  # A1111 embedding or hypernetwork: tensors inside dicts
            if nested is not None:
                return nested
        raise
    result: dict[str, Any] = {}
    try:
        found = detect(tensors, metadata=metadata, source=path.name)
    except HuabiError as err:
        what = describe_non_checkpoint(tensors)
        if "LoRA" in what:
            result["kind"] = "LoRA/LyCORIS"
            result["lora"] = _lora_summary(tensors, metadata)
        elif "VAE" in what:
            result["kind"] = "VAE"
        elif "embedding" in what:
            result["kind"] = "textual-inversion embedding"
            result["embedding"] = _embedding_summary(tensors)  # shapes are enough
        elif "ControlNet" in what:
            result["kind"] = "ControlNet"
        elif "diffusers UNet" in what:
            result["kind"] = "diffusers UNet (bare)"
        elif any(k.startswith("model.diffusion_model.") for k in tensors):
            result["kind"] = f"unrecognised checkpoint ({str(err).split(': ', 1)[-1]})"
        else:
            result["kind"] = "unknown"
    else:
        result["kind"] = "checkpoint"
        result["family"] = found.family.value
        result["family_name"] = _FAMILY_NAMES.get(found.family.value, found.family.value)
        result["variant"] = found.variant.value
        result["prediction"] = (
            f"{found.prediction.value} ({found.prediction_source})" if found.prediction_known
            else "decided at load (SD2 file that does not say; A1111's one-forward test)"
        )
        result["context_dim"] = found.context_dim
        result["has_vae"] = found.has_vae
        ema = sum(1 for k in tensors if k.startswith("model_ema."))
        if ema:
            result["ema_tensors"] = ema
    dtypes = Counter(_DTYPE_NAMES.get(t.dtype, str(t.dtype)) for t in tensors.values())
    result["tensors"] = len(tensors)
    result["parameters"] = sum(t.numel() for k, t in tensors.items() if t.is_floating_point() and not k.startswith("huabi."))
    result["dtypes"] = dict(sorted(dtypes.items()))
    result["metadata"] = dict(sorted(metadata.items()))
    return result


def _inspect_nested_pickle(path: Path) -> dict[str, Any] | None:
    """A1111 ``.pt`` embeddings (``string_to_param``) and hypernetworks (``{320: [layers], ...}``), or None."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if not isinstance(data, dict):
        return None
    plain = {str(k): v for k, v in data.items() if isinstance(v, (str, int, float, bool))}
    if isinstance(data.get("string_to_param"), dict):
        vectors = [v for v in data["string_to_param"].values() if isinstance(v, torch.Tensor)]
        summary = _embedding_summary({"vectors": vectors[0]}) if vectors else {}
        tensors = vectors
        kind = "textual-inversion embedding (A1111 .pt)"
        extra = {"embedding": summary}
    elif any(isinstance(k, int) for k in data):
        tensors = [t for k, layers in data.items() if isinstance(k, int) for layer in layers
                   for t in (layer.values() if isinstance(layer, dict) else [layer]) if isinstance(t, torch.Tensor)]
        kind = "hypernetwork (A1111 .pt)"
        extra = {"hypernetwork": {"widths": sorted(k for k in data if isinstance(k, int))}}
    else:
        return None
    dtypes = Counter(_DTYPE_NAMES.get(t.dtype, str(t.dtype)) for t in tensors)
    return {"kind": kind, **extra, "tensors": len(tensors), "parameters": sum(t.numel() for t in tensors),
            "dtypes": dict(sorted(dtypes.items())), "metadata": dict(sorted(plain.items()))}


def _pretty_value(value: Any, *, full: bool) -> str:
    if isinstance(value, str):
        stripped = value.strip()
        if stripped[:1] in ("{", "[") and len(stripped) > 2:
            try:
                value = json.loads(stripped)
            except ValueError:
                pass
    text = json.dumps(value, indent=2, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)
    if not full and len(text) > _TEXT_VALUE_LIMIT:
        text = text[:_TEXT_VALUE_LIMIT] + f"... ({len(text)} characters; --full shows all)"
    return text


def format_inspection(info: dict[str, Any], *, full: bool = False) -> str:
    """The human-readable report: one ``name: value`` line per fact, metadata pretty-printed."""
    lines = [f"file:        {info['file']}", f"size:        {_size_text(int(info['size']))}", f"kind:        {info['kind']}"]
    if "family" in info:
        name = info.get("family_name")
        lines.append(f"family:      {info['family']}" + (f" ({name})" if name else ""))
    for key in ("variant", "prediction", "context_dim", "has_vae", "ema_tensors"):
        if key in info:
            lines.append(f"{key.replace('_', ' ') + ':':<13}{info[key]}")
    for section in ("lora", "embedding", "hypernetwork"):
        if info.get(section):
            lines.append(f"{section}:")
            lines.extend(f"  {k}: {v}" for k, v in info[section].items())
    lines.append(f"tensors:     {info['tensors']}")
    lines.append(f"parameters:  {info['parameters']:,}")
    lines.append("dtypes:      " + ", ".join(f"{k}: {v}" for k, v in info["dtypes"].items()))
    if "hashes" in info:
        lines.append("hashes:")
        width = max(len(k) for k in info["hashes"]) + 1
        lines.extend(f"  {k + ':':<{width}} {v}" for k, v in info["hashes"].items())
    metadata = info.get("metadata") or {}
    if metadata:
        lines.append(f"metadata ({len(metadata)} keys):")
        for key, value in metadata.items():
            text = _pretty_value(value, full=full)
            if "\n" in text:
                lines.append(f"  {key}:")
                lines.extend("    " + line for line in text.splitlines())
            else:
                lines.append(f"  {key}: {text}")
    else:
        lines.append("metadata:    (none)")
    return "\n".join(lines)


def describe_gguf(path: str | Path) -> str:
    """One line for model listings, e.g. ``"sd1 base GGUF UNet (Q8_0), needs --base"``; tensors are not read."""
    info = _inspect_gguf(Path(path))
    quantized = [name for name in info["dtypes"] if name not in ("F32", "F16", "BF16")]
    kind = ", ".join(quantized) or ", ".join(info["dtypes"])
    return f"{info.get('family', 'unknown')} {info.get('variant', '')} GGUF UNet ({kind}), needs --base".replace("  ", " ")


def detect_file(path) -> Detected:
    """Detect a model file or diffusers folder (safetensors: from the header, weights unread)."""
    from huabi.models.formats import read_state_dict_shapes

    path = Path(path)
    tensors, metadata = read_state_dict_shapes(path)
    return detect(tensors, metadata=metadata, source=path.name)


def describe_model_file(path) -> str:
    """One line for listings, e.g. ``"sdxl base epsilon"`` (``"sd2 base prediction decided at load"`` when unknown)."""
    if Path(path).suffix.lower() == ".gguf":  # a UNet alone: described from the GGUF header, not detected
        return describe_gguf(path)
    from huabi.models.flow_load import describe_flow_file, is_flow_model

    if is_flow_model(path):  # SD3/SD3.5/FLUX.1 transformer files and folders
        return describe_flow_file(path)
    found = detect_file(path)
    prediction = found.prediction.value if found.prediction_known else "prediction decided at load"
    return f"{found.family.value} {found.variant.value} {prediction}"
