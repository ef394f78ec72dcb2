"""Reading and writing weight files: safetensors, pickled checkpoints, diffusers folders.

Every reader returns ``(tensors, metadata)``: a flat ``{name: Tensor}`` dict in
the *original* (A1111 / LDM single-file) key layout, and the file's string
metadata. A diffusers folder is converted to that same layout on read, so the
rest of huabi (detection, loading) has one layout to understand.

Safety: pickled checkpoints are only ever opened with ``torch.load(...,
weights_only=True)``. A pickle that needs anything beyond tensors and plain
containers is refused; huabi never runs code found in a model file.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from huabi.errors import HuabiError
from huabi.models import gguf_io
from huabi.models.files import atomic_path, new_file_mode  # noqa: F401 -- new_file_mode: its older home

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# Largest JSON header we accept; real files are well under 1 MB. Guards
# against reading gigabytes of garbage as a "header".
_MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024

# Marker for diffusers folders whose model is huabi's own (see detect.py):
# a small JSON file holding the huabi.* marker values.
HUABI_FOLDER_MARKERS_FILE = "huabi.json"

# safetensors dtype names -> bytes per element (used to validate the header).
_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a checkpoint file or diffusers folder into ``(tensors, metadata)``.

    Tensors come back on the CPU in the file's own dtype. Raises ``HuabiError``
    naming the file for anything missing, truncated, unsafe or unrecognised.
    """
    path = Path(path)
    if not path.exists():
        raise HuabiError(f"{path}: model file not found")
    if path.is_dir():
        return read_diffusers_folder(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return read_pickle_checkpoint(path), {}
    if suffix == ".gguf":
        return gguf_io.read_gguf(path)
    raise HuabiError(
        f"{path.name}: unsupported model file type {suffix or '(no extension)'!r}; "
        f"expected .safetensors, .ckpt, .pt, .pth, .bin, .gguf or a diffusers folder"
    )


# --------------------------------------------------------------------------- safetensors


def read_safetensors_header(path: Path) -> dict:
    """Parse and validate the JSON header of a safetensors file.

    Checks the length prefix, the JSON, each tensor's dtype/shape/offsets, and
    that the data region is exactly as long as the header promises (a
    truncated download fails here, not deep inside a load).
    """
    size = path.stat().st_size
    if size == 0:
        raise HuabiError(f"{path.name}: file is empty (0 bytes)")
    if size < 8:
        raise HuabiError(f"{path.name}: not a safetensors file: only {size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > min(_MAX_SAFETENSORS_HEADER_BYTES, size - 8):
            raise HuabiError(
                f"{path.name}: not a safetensors file or truncated: header length {header_len} "
                f"does not fit in a {size}-byte file"
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HuabiError(f"{path.name}: not a safetensors file: header is not valid JSON ({exc.__class__.__name__})") from None
    except RecursionError:  # "[[[[..." 200,000 deep: refuse rather than overflow the stack
        raise HuabiError(f"{path.name}: not a safetensors file: header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise HuabiError(f"{path.name}: not a safetensors file: header is not a JSON object")
    metadata = header.get("__metadata__")
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise HuabiError(f"{path.name}: corrupt safetensors header: __metadata__ must map names to strings")
    data_len = size - 8 - header_len
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_bytes = _SAFETENSORS_DTYPE_BYTES[entry["dtype"]]
            start, end = entry["data_offsets"]
            shape = entry["shape"]
            if not all(type(v) is int and v >= 0 for v in (start, end, *shape)):
                raise ValueError
            numel = 1
            for dim in shape:
                numel *= dim
        except (KeyError, TypeError, ValueError):
            raise HuabiError(f"{path.name}: not a safetensors file: bad header entry for tensor {name!r}") from None
        if end - start != numel * dtype_bytes:
            raise HuabiError(f"{path.name}: corrupt safetensors header: tensor {name!r} offsets do not match its shape")
        spans.append((start, end, name))
    # Like the safetensors library: tensors tile the data region exactly, in offset order.
    position = 0
    for start, end, name in sorted(spans):
        if start != position:
            problem = "overlaps another tensor" if start < position else "leaves a gap before it"
            raise HuabiError(f"{path.name}: corrupt safetensors header: tensor {name!r} {problem}")
        position = end
    if position > data_len:
        raise HuabiError(
            f"{path.name}: truncated safetensors file: tensor data needs {position} bytes "
            f"but only {data_len} are present (incomplete download?)"
        )
    if position < data_len:
        raise HuabiError(
            f"{path.name}: corrupt safetensors file: {data_len - position} bytes after the last tensor's data"
        )
    return header


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors.torch import load_file

    path = Path(path)
    header = read_safetensors_header(path)
    metadata = header.get("__metadata__") or {}
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise HuabiError(f"{path.name}: cannot read safetensors file: {str(exc).splitlines()[0]}") from None
    return dict(tensors), {str(k): str(v) for k, v in metadata.items()}


# --------------------------------------------------------------------------- pickles


class _InertPickledObject:
    """Stand-in for training-time objects some old .ckpt files carry.

    Original SD 1.x checkpoints pickle a PyTorch Lightning ``ModelCheckpoint``
    callback next to the weights. Only the *name* is allow-listed here and it
    maps to this class, which stores state and runs nothing, so the weights
    can be read without importing (or executing) anything from the file.
    """

    def __setstate__(self, state: object) -> None:
        self.state = state


# (stand-in, fully qualified name in the pickle). Data-only: no code runs.
_INERT_PICKLE_GLOBALS = [
    (_InertPickledObject, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
]


def load_pickle_safely(path: Path, what: str):
    """``torch.load(weights_only=True)`` of an adapter file; errors name ``what`` and the file.

    weights_only refuses pickles that need code; corrupt files raise assorted errors:
    either way one line, the first line of the reason.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise pickle_refusal(path, exc, what) from None
    except Exception as exc:
        raise HuabiError(f"{what} {path.name}: cannot read it safely ({_plain_first_line(exc)})") from None


def pickle_refusal(path: Path, exc: BaseException, what: str = "", noun: str = "file") -> HuabiError:
    """huabi's own one-line words for a pickle that ``weights_only`` refused (torch's text is a
    paragraph about its defaults): code-carrying files say so; other failures name the fault."""
    reason = str(exc).lower()
    named = f"{what} {path.name}" if what else path.name
    if "unsupported global" in reason or "reduce" in reason or "global" in reason.split("weightsunpickler error:")[-1]:
        return HuabiError(
            f"{named}: this {noun} needs code execution to load (it pickles Python objects, not just tensors) "
            "and huabi never executes code from a model file; convert it to .safetensors with a tool you trust"
        )
    detail = str(exc).split("WeightsUnpickler error:")[-1]
    if noun == "checkpoint":
        return HuabiError(f"{named}: not a readable PyTorch checkpoint ({_plain_first_line(detail) or 'bad pickle'})")
    return HuabiError(f"{named}: cannot read it safely ({_plain_first_line(detail) or 'bad pickle'})")


def _plain_first_line(error: object) -> str:
    """The first line of an error text, ANSI colour codes and control characters removed, at most 160 characters."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(error)).strip()
    first = text.splitlines()[0] if text else (type(error).__name__ if isinstance(error, BaseException) else "")
    return "".join(ch if ch.isprintable() else " " for ch in first)[:160]


def read_tensor_file(path: Path, what: str) -> dict:
    """The dict in a ``.safetensors`` file or a safe pickle (``.pt``/``.bin``), for adapter files."""
    if path.suffix.lower() == ".safetensors":
        tensors, _metadata = read_safetensors(path)
        return dict(tensors)
    data = load_pickle_safely(path, what)
    if not isinstance(data, dict):
        raise HuabiError(f"{what} {path.name}: holds a {type(data).__name__}, not a dict of tensors")
    return data


def _numpy_safe_globals() -> list:
    """numpy scalar/dtype reconstructors that some checkpoints use for step counters."""
    try:
        import numpy as np
    except ImportError:  # numpy is a dependency, but keep reading possible without it
        return []
    found: list = [np.dtype]
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    found.append(scalar)
    found.append((scalar, "numpy.core.multiarray.scalar"))
    found.extend(type(np.dtype(name)) for name in ("float32", "float64", "int32", "int64"))
    return found


def read_pickle_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a ``.ckpt``/``.pt``/``.pth``/``.bin`` with ``weights_only=True``, unwrapping ``state_dict``."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise HuabiError(f"{path.name}: file is empty (0 bytes)")
    try:
        with torch.serialization.safe_globals(_INERT_PICKLE_GLOBALS + _numpy_safe_globals()):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch reports both "needs a Python global/callable" and plain garbage as
        # UnpicklingError; only the first is about code execution.
        raise pickle_refusal(path, exc, noun="checkpoint") from None
    except Exception as exc:  # noqa: BLE001  (a damaged pickle fails in many ways; weights_only ran no code)
        raise HuabiError(f"{path.name}: not a readable PyTorch checkpoint ({_plain_first_line(exc)})") from None
    # Training checkpoints nest the weights: {"state_dict": {...}, "global_step": ...}.
    while isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    # Others (BAE's scannet.pt, ...) use {"model": {...}}: unwrapped only when no tensor sits beside it.
    if (isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping)
            and not any(isinstance(v, torch.Tensor) for v in loaded.values())):
        loaded = loaded["model"]
    if not isinstance(loaded, Mapping):
        raise HuabiError(f"{path.name}: not a model checkpoint: it holds a {type(loaded).__name__}, not a dict of tensors")
    tensors = {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise HuabiError(f"{path.name}: not a model checkpoint: it contains no tensors")
    return tensors


# --------------------------------------------------------------------------- diffusers folders


def read_component_weights(folder: Path, what: str) -> dict[str, torch.Tensor]:
    """Weights of one diffusers/transformers component folder (safetensors preferred)."""
    for name in (
        "diffusion_pytorch_model.safetensors",
        "model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",  # diffusers' "fp16 variant" downloads
        "model.fp16.safetensors",
        "diffusion_pytorch_model.bin",
        "pytorch_model.bin",
    ):
        candidate = folder / name
        if candidate.exists():
            if candidate.suffix == ".safetensors":
                return read_safetensors(candidate)[0]
            return read_pickle_checkpoint(candidate)
    raise HuabiError(f"{folder}: no weights file for {what} (expected diffusion_pytorch_model.safetensors, model.safetensors or a .bin)")


def read_json_object(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise HuabiError(f"{path}: missing") from None
    except json.JSONDecodeError as exc:
        raise HuabiError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise HuabiError(f"{path}: expected a JSON object")
    return data


def diffusers_folder_weights_file(folder: Path) -> Path:
    """The file whose hash identifies a diffusers folder: its UNet weights."""
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin"):
        candidate = folder / "unet" / name
        if candidate.exists():
            return candidate
    raise HuabiError(f"{folder}: diffusers folder has no unet/diffusion_pytorch_model.safetensors")


def read_diffusers_folder(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a diffusers pipeline folder into the original single-file layout.

    UNet and VAE weights are read directly and converted with huabi's tables;
    text encoders are instantiated with transformers (local files only) and
    converted back by ``huabi.models.text_encoders``. The scheduler's
    ``prediction_type`` is reported as ``modelspec.prediction_type`` metadata,
    and a ``huabi.json`` file (huabi's own model) becomes the ``huabi.*`` marker
    tensors, so detection treats folders and single files alike.
    """
    from huabi.models.convert import unet_to_original, vae_to_original
    from huabi.core.family import ModelFamily

    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.exists():
        raise HuabiError(f"{folder}: directory is not a diffusers model folder (no model_index.json)")
    index = read_json_object(index_path)

    def present(component: str) -> bool:
        entry = index.get(component)
        return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None and (folder / component).is_dir()

    for component in ("unet", "vae"):
        if not present(component):
            raise HuabiError(f"{folder}: diffusers folder has no {component}/ component")

    tensors: dict[str, torch.Tensor] = {}
    unet_config = read_json_object(folder / "unet" / "config.json")
    for key, value in unet_to_original(read_component_weights(folder / "unet", "unet"), unet_config).items():
        tensors["model.diffusion_model." + key] = value
    for key, value in vae_to_original(read_component_weights(folder / "vae", "vae")).items():
        tensors["first_stage_model." + key] = value

    metadata: dict[str, str] = {"huabi.source_format": "diffusers"}
    markers_path = folder / HUABI_FOLDER_MARKERS_FILE
    if markers_path.exists():
        for name, value in read_json_object(markers_path).items():
            if not name.startswith("huabi.") or not isinstance(value, (int, float)):
                raise HuabiError(f"{markers_path}: marker {name!r} must be a huabi.* name with a number value")
            dtype = torch.float32 if isinstance(value, float) else torch.int64
            tensors[name] = torch.tensor(value, dtype=dtype)

    scheduler_config_path = folder / "scheduler" / "scheduler_config.json"
    if scheduler_config_path.exists():
        scheduler_config = read_json_object(scheduler_config_path)
        prediction_type = scheduler_config.get("prediction_type")
        if prediction_type in ("v_prediction", "epsilon"):
            metadata["modelspec.prediction_type"] = "v" if prediction_type == "v_prediction" else "epsilon"
        trained_betas = scheduler_config.get("trained_betas")
        if isinstance(trained_betas, list) and len(trained_betas) == 1000:
            # A custom training schedule: carried as alphas_cumprod, as single files do.
            betas = torch.tensor(trained_betas, dtype=torch.float64)
            tensors["alphas_cumprod"] = torch.cumprod(1.0 - betas, dim=0)

    # Which text encoders the folder has decides the family's encoder layout.
    has_te1, has_te2 = present("text_encoder"), present("text_encoder_2")
    if has_te1 and has_te2:
        family = ModelFamily.SDXL
    elif has_te2:
        family = ModelFamily.SDXL_REFINER
    elif has_te1:
        # SD1 and SD2 share the folder shape; SD2's UNet uses linear projections.
        family = ModelFamily.SD2 if unet_config.get("use_linear_projection") else ModelFamily.SD1
        if "huabi.version" in tensors:
            family = ModelFamily.HUABI_MINI
    else:
        raise HuabiError(f"{folder}: diffusers folder has no text_encoder/ component")
    encoders = [_load_text_encoder(folder, name) for name in ("text_encoder", "text_encoder_2") if present(name)]
    from huabi.models.text_encoders import text_encoders_to_original

    tensors.update(text_encoders_to_original(encoders, family))
    return tensors, metadata


def _load_text_encoder(folder: Path, component: str) -> torch.nn.Module:
    import transformers

    config = read_json_object(folder / component / "config.json")
    class_name = (config.get("architectures") or ["CLIPTextModel"])[0]
    if class_name not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        raise HuabiError(f"{folder / component}: unsupported text encoder class {class_name!r}")
    model_class = getattr(transformers, class_name)
    try:
        return model_class.from_pretrained(str(folder / component), local_files_only=True)
    except pickle.UnpicklingError as exc:  # a .bin text encoder that needs code: the same words as the UNet's
        weights = next((folder / component).glob("*.bin"), folder / component / "pytorch_model.bin")
        raise pickle_refusal(weights, exc, "text encoder") from None
    except (OSError, ValueError, RuntimeError, EOFError) as exc:
        raise HuabiError(f"{folder / component}: cannot load text encoder ({_plain_first_line(exc)})") from None


# --------------------------------------------------------------------------- writing


def write_safetensors_atomic(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` to ``path`` via a temp file in the same folder + ``os.replace``.

    A crash or error leaves any existing file untouched and no partial file behind. Equal tensors and
    metadata give equal bytes (``__metadata__`` keys sorted, see :func:`_sort_header_metadata`).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise HuabiError(f"{path.name}: safetensors metadata must map str to str; got {key!r}: {type(value).__name__}")
    # safetensors refuses shared/non-contiguous storage; give each tensor its own.
    prepared = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    with atomic_path(path) as temp:
        save_file(_unshare(prepared), str(temp), metadata=dict(metadata) if metadata else None)
        _sort_header_metadata(temp)
    return path


def _sort_header_metadata(path: Path) -> None:
    """Rewrite a just-written safetensors header with its ``__metadata__`` keys sorted.

    safetensors serialises ``__metadata__`` from a Rust hash map, whose order changes from one
    process (and one map) to the next, so the same merge gave files of different SHA-256. Tensor
    entries keep the library's order (dtype, then name: already deterministic). Compact JSON without
    ASCII escaping is never longer than the library's, so the new header is padded with spaces to the
    old length (the format's own padding) and written in place: offsets and alignment are unchanged.
    """
    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        metadata = header.get("__metadata__")
        if not metadata or len(metadata) < 2:
            return
        header["__metadata__"] = dict(sorted(metadata.items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > length:
            raise HuabiError(f"{path.name}: cannot normalise the safetensors header ({len(text)} > {length} bytes)")
        handle.seek(8)
        handle.write(text + b" " * (length - len(text)))


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clone tensors that share storage with an earlier one (safetensors requires disjoint storage)."""
    seen: set[int] = set()
    result = {}
    for name, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else -1
        if pointer in seen:
            tensor = tensor.clone()
        elif pointer != -1:
            seen.add(pointer)
        result[name] = tensor
    return result


# --------------------------------------------------------------------------- shapes only


def read_state_dict_shapes(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Like ``read_state_dict`` but, for ``.safetensors``, without reading the weights.

    Tensors come back on the ``meta`` device (names, shapes, dtypes only),
    except the small ``huabi.*`` markers and ``v_pred``, which are read for
    real. Enough for ``detect``; used to list and describe model files fast.
    Other formats are read fully.
    """
    from safetensors import safe_open

    path = Path(path)
    if path.is_file() and path.suffix.lower() in SAFETENSORS_SUFFIXES:
        header = read_safetensors_header(path)
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                if name.startswith("huabi.") or name == "v_pred":
                    tensors[name] = handle.get_tensor(name)
                else:
                    tensor_slice = handle.get_slice(name)
                    tensors[name] = torch.empty(tensor_slice.get_shape(), dtype=_SAFETENSORS_TORCH_DTYPES.get(header[name]["dtype"], torch.uint8), device="meta")
        metadata = header.get("__metadata__") or {}
        return tensors, {str(k): str(v) for k, v in metadata.items()}
    return read_state_dict(path)


_SAFETENSORS_TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
}


# --------------------------------------------------------------------------- GGUF UNet + base checkpoint


def with_companion_parts(
    gguf_path: Path,
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, str],
    base: str | Path | None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The GGUF's UNet with everything else (text encoders, VAE, schedule, markers) from ``base``.

    Without ``base``, a GGUF that carries its own original-layout parts (as
    stable-diffusion.cpp can write) is used as it is; a UNet-only one is an error.
    """
    if base is None:
        if gguf_io.has_companion_parts(state_dict):
            return state_dict, metadata
        raise HuabiError(
            f"{gguf_path.name}: a GGUF UNet file has no text encoder or VAE; pass the checkpoint they come "
            f"from with --base (as ComfyUI loads CLIP and VAE from a checkpoint next to the GGUF UNet)"
        )
    base_path = Path(base)
    if gguf_io.is_gguf_path(base_path):
        raise HuabiError(f"base: {base_path.name} is a GGUF file; the base must be a checkpoint with text encoders and a VAE")
    base_tensors, base_metadata = read_state_dict(base_path)
    merged = {k: v for k, v in base_tensors.items() if not k.startswith(gguf_io.UNET_PREFIX)}
    if not any(k.startswith(gguf_io.UNET_PREFIX) for k in base_tensors) and not merged:
        raise HuabiError(f"base: {base_path.name} has no weights")
    base_unet = {k: v for k, v in base_tensors.items() if k.startswith(gguf_io.UNET_PREFIX)}
    unet = {k: v for k, v in state_dict.items() if k.startswith(gguf_io.UNET_PREFIX)}
    _check_unet_matches_base(gguf_path, unet, base_unet, base_path)
    merged.update(unet)
    combined = dict(base_metadata)
    combined.update(metadata)
    return merged, combined


def _check_unet_matches_base(gguf_path: Path, unet: Mapping[str, torch.Tensor], base_unet: Mapping[str, torch.Tensor], base_path: Path) -> None:
    """The GGUF UNet must be the base's architecture: same keys and shapes (names the first difference)."""
    if not base_unet:
        return  # a base without a UNet (text encoders + VAE only) cannot be compared; loading checks shapes
    for key in sorted(set(unet) | set(base_unet)):
        if key not in base_unet:
            raise HuabiError(f"{gguf_path.name}: UNet does not match base {base_path.name}: {key} is not in the base (another family?)")
        if key not in unet:
            raise HuabiError(f"{gguf_path.name}: UNet does not match base {base_path.name}: it lacks {key} (another family?)")
        if tuple(unet[key].shape) != tuple(base_unet[key].shape):
            raise HuabiError(
                f"{gguf_path.name}: UNet does not match base {base_path.name}: {key} has shape "
                f"{tuple(unet[key].shape)}, the base {tuple(base_unet[key].shape)}"
            )
