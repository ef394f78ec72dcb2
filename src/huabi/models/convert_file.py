"""``huabi convert``: checkpoint files between formats, layouts and dtypes.

* ``.ckpt``/``.pt`` (read with ``weights_only=True``, ``state_dict`` nesting
  unwrapped) <-> ``.safetensors``: the tensors are copied as they are, so a
  round trip is bit-identical; safetensors ``__metadata__`` is kept.
* diffusers folder -> single file: read into the original layout by
  ``formats.read_diffusers_folder`` (huabi's conversion tables).
* single file -> diffusers folder: loaded into modules and written by
  ``save.save_diffusers_folder`` (SD1.x, SD2.x, SDXL, the refiner, huabi-mini).
* GGUF UNet + ``base`` -> single file or folder: the UNet dequantized (F16/BF16/F32 tensors
  as stored), everything else from the base checkpoint.
* ``dtype``: floating tensors cast to fp32/fp16/bf16; integer tensors and the
  ``huabi.*`` markers untouched.
* ``prune``: keep only what inference reads (UNet, VAE, text encoders, the noise
  schedule, ``v_pred`` and markers); drops ``model_ema.*``, ``optimizer``/loss and
  any other training state. ``use_ema`` first copies the EMA UNet weights (as
  LDM stores them: ``model_ema.`` + the UNet key without dots) over the UNet.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from huabi.errors import HuabiError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Prefixes of the tensors inference reads in the original single-file layout.
INFERENCE_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.", "huabi.")
# Noise-schedule buffers LDM checkpoints carry next to the weights (A1111 keeps them when pruning).
SCHEDULE_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "v_pred",
)
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


@dataclass(frozen=True)
class ConvertOptions:
    dtype: str | None = None  # fp32 | fp16 | bf16 | None (keep)
    prune: bool = False
    use_ema: bool = False
    base: Path | None = None  # for a GGUF UNet source: the checkpoint with its text encoders and VAE

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise HuabiError(f"dtype: unknown dtype {self.dtype!r}; valid: {', '.join(DTYPES)}")


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    tensors_in: int
    tensors_out: int
    dropped: int  # tensors removed by pruning


def is_inference_key(key: str) -> bool:
    return key.startswith(INFERENCE_PREFIXES) or key in SCHEDULE_KEYS


def _ema_key(unet_key: str) -> str:
    """LDM's EMA name for a UNet weight: ``model_ema.`` + the key after ``model.`` with the dots removed."""
    return "model_ema." + unet_key[len("model."):].replace(".", "")


def apply_ema(tensors: dict[str, torch.Tensor], *, source: str) -> dict[str, torch.Tensor]:
    """Replace the UNet weights with their EMA copies (error when the file has none or only some)."""
    unet_keys = [k for k in tensors if k.startswith("model.diffusion_model.")]
    missing = [k for k in unet_keys if _ema_key(k) not in tensors]
    if len(missing) == len(unet_keys):
        raise HuabiError(f"{source}: --use-ema: the file has no EMA weights (no model_ema.* tensors)")
    if missing:
        raise HuabiError(f"{source}: --use-ema: EMA weights incomplete, e.g. no {_ema_key(missing[0])} for {missing[0]}")
    result = dict(tensors)
    for key in unet_keys:
        result[key] = tensors[_ema_key(key)]
    return result


def transform_tensors(
    tensors: Mapping[str, torch.Tensor], options: ConvertOptions, *, source: str
) -> tuple[dict[str, torch.Tensor], int]:
    """EMA swap, pruning and dtype cast, in that order. Returns (tensors, number dropped)."""
    result = dict(tensors)
    if options.use_ema:
        result = apply_ema(result, source=source)
    dropped = 0
    if options.prune:
        kept = {k: v for k, v in result.items() if is_inference_key(k)}
        dropped = len(result) - len(kept)
        result = kept
    if options.dtype is not None:
        target = DTYPES[options.dtype]
        result = {
            k: (v.to(target) if v.is_floating_point() and not k.startswith("huabi.") and k not in SCHEDULE_KEYS else v)
            for k, v in result.items()
        }
    return result, dropped


def write_ckpt_atomic(path: Path, tensors: Mapping[str, torch.Tensor]) -> Path:
    """A ``.ckpt`` as LDM/A1111 write it: ``{"state_dict": {...}}``, via a temp file and ``os.replace``."""
    from huabi.models.files import atomic_path

    with atomic_path(path) as temp:
        torch.save({"state_dict": {k: v.contiguous() for k, v in tensors.items()}}, temp)
    return path


def _output_kind(dst: Path) -> str:
    suffix = dst.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".ckpt", ".pt", ".pth"):
        return "ckpt"
    if suffix == "":
        return "diffusers"
    raise HuabiError(
        f"convert: output {dst.name}: unknown format {suffix!r}; use .safetensors, .ckpt, or a folder name "
        f"without extension for a diffusers folder (GGUF: huabi quantize)"
    )


def convert_checkpoint(src: str | Path, dst: str | Path, options: ConvertOptions = ConvertOptions(), *, overwrite: bool = False) -> ConvertResult:
    """Convert ``src`` (file or diffusers folder) to ``dst``; the output kind follows ``dst``'s suffix."""
    from huabi.models.formats import write_safetensors_atomic

    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise HuabiError(f"convert: {src}: no such file or folder")
    kind = _output_kind(dst)
    if src.resolve() == dst.resolve():
        raise HuabiError(f"convert: output {dst} is the input; choose another name (inputs are never modified)")
    if dst.exists() and not overwrite:
        raise HuabiError(f"convert: {dst} already exists (pass --overwrite to replace it)")
    if options.base is not None and src.suffix.lower() != ".gguf":
        raise HuabiError(f"convert: --base is for a GGUF UNet source; {src.name} is not one")

    if kind == "diffusers":
        return _convert_to_diffusers(src, dst, options)
    tensors, metadata = _read_source(src, options)
    if metadata.get("modelspec.prediction_type") == "v" and "v_pred" not in tensors:
        tensors["v_pred"] = torch.zeros(0)  # A1111 reads v-prediction from this key, not from metadata
    count_in = len(tensors)
    tensors, dropped = transform_tensors(tensors, options, source=src.name)
    if not tensors:
        raise HuabiError(f"convert: {src.name}: nothing left to write after pruning")
    if kind == "safetensors":
        metadata = {k: v for k, v in metadata.items() if k != "huabi.source_format"}
        write_safetensors_atomic(dst, tensors, metadata)
    else:
        write_ckpt_atomic(dst, tensors)
    return ConvertResult(dst, count_in, len(tensors), dropped)


def _read_source(src: Path, options: ConvertOptions) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The source as an original-layout state dict; a GGUF UNet (dequantized) joins its base's other parts."""
    from huabi.models.formats import read_state_dict

    if src.suffix.lower() != ".gguf":
        return read_state_dict(src)
    from huabi.models.formats import with_companion_parts
    from huabi.models.gguf_io import read_gguf

    tensors, metadata = read_gguf(src)
    tensors, metadata = with_companion_parts(src, tensors, metadata, options.base)
    return tensors, {k: v for k, v in metadata.items() if not k.startswith("gguf.")}


def _convert_to_diffusers(src: Path, dst: Path, options: ConvertOptions) -> ConvertResult:
    """Single file -> diffusers folder, through the loader (keys and shapes checked) and ``save_diffusers_folder``."""
    from huabi.models.load import load_model
    from huabi.models.save import save_diffusers_folder

    if src.is_dir():
        raise HuabiError(f"convert: {src.name} is already a diffusers folder")
    tensors, _ = _read_source(src, options)
    count_in = len(tensors)
    via_file = options.use_ema or src.suffix.lower() == ".gguf"  # the loader reads files: write the tensors first
    if options.use_ema:
        # The loader reads the UNet from the file; write the EMA swap through a temporary single file.
        tensors, _dropped = transform_tensors(tensors, ConvertOptions(use_ema=True, prune=True), source=src.name)
    float_dtypes = [t.dtype for k, t in tensors.items() if k.startswith("model.diffusion_model.") and t.is_floating_point()]
    file_dtype = max(set(float_dtypes), key=float_dtypes.count) if float_dtypes else torch.float32
    dtype = DTYPES[options.dtype] if options.dtype else file_dtype
    with tempfile.TemporaryDirectory(prefix=".huabi-convert-", dir=dst.parent if dst.parent.exists() else None) as tmp:
        source = src
        if via_file:
            from huabi.models.formats import write_safetensors_atomic

            source = write_safetensors_atomic(Path(tmp) / (src.stem + ".safetensors"), tensors)
        del tensors
        bundle = load_model(source, dtype=dtype, compute_hash=False)
        save_diffusers_folder(bundle, dst)
    return ConvertResult(dst, count_in, count_in, 0)
