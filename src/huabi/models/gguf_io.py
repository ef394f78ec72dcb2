"""GGUF diffusion-model (UNet) files: read (dequantized on load) and write (``huabi quantize``).

Two layouts are in circulation for Stable Diffusion UNets, and both are read:

* ComfyUI-GGUF (city96's ``tools/convert.py`` + llama.cpp quantize): the UNet
  alone, tensor names of the original layout *without* ``model.diffusion_model.``
  (``input_blocks.0.0.weight``), the architecture in ``general.architecture``
  (``sd1`` — also used for SD2, whose shapes differ — or ``sdxl``), and tensors
  whose last dimension does not fit a quantization block stored flattened to
  rows of 256 with their real shape in ``comfy.gguf.orig_shape.<name>``.
* stable-diffusion.cpp (``sd -M convert``): original single-file names with
  their prefixes (``model.diffusion_model.*``, maybe ``first_stage_model.*``...).

A UNet-only file has no VAE and no text encoders. As in ComfyUI (a "Unet Loader
(GGUF)" next to a checkpoint's CLIP and VAE), huabi takes those parts from a base
checkpoint: ``with_companion_parts`` puts the GGUF's UNet into the base's state dict.

Writing follows ComfyUI-GGUF so its loader reads huabi's files: arch ``sd1``/``sdxl``,
unprefixed names, 1-D and small (<= 1024 values) tensors kept in F32, the
flatten-to-256 trick with ``comfy.gguf.orig_shape``; the container is written by
the maintained ``gguf`` package (its numpy quantizers), atomically.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from huabi.errors import HuabiError

UNET_PREFIX = "model.diffusion_model."
# Architectures whose UNet huabi can run (ComfyUI-GGUF's names for SD-family UNets).
KNOWN_ARCHITECTURES = ("sd1", "sdxl")
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."
# Types `huabi quantize` writes (the gguf package has numpy quantizers for these).
WRITE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
_SMALL_TENSOR_VALUES = 1024  # at most this many values: kept in F32 (cheap, and biases matter)
_FLATTEN_ROW = 256  # ComfyUI-GGUF's row length for tensors whose last dim does not fit a block
_FLATTEN_MIN_VALUES = 512


def is_gguf_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def gguf_reader(path: Path):
    import gguf

    if not path.is_file():
        raise HuabiError(f"{path}: model file not found")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise HuabiError(f"{path.name}: not a GGUF file (does not start with the GGUF magic bytes)")
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # the reader raises ValueError/IndexError/... on truncated data
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise HuabiError(f"{path.name}: unreadable or truncated GGUF file ({detail})") from None


def field_value(field) -> object:
    try:
        return field.contents()
    except Exception:  # pragma: no cover - malformed field
        return None


def read_gguf_metadata(path: str | Path) -> dict[str, object]:
    """The GGUF key/value metadata (architecture, file type, shapes...), without reading tensors."""
    path = Path(path)
    reader = gguf_reader(path)
    return {name: field_value(field) for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def gguf_tensor_types(path: str | Path) -> dict[str, int]:
    """How many tensors of each GGML type (``{"Q8_0": 180, "F32": 506}``) the file holds."""
    counts: dict[str, int] = {}
    for tensor in gguf_reader(Path(path)).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


def read_gguf(path: str | Path, *, _skip_types: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a GGUF SD UNet into original-layout tensors (``model.diffusion_model.*``), dequantized.

    F32/F16/BF16 tensors keep their dtype (bit-exact); quantized ones come back
    as float32. Metadata: ``gguf.architecture`` and ``gguf.tensor_types``.
    """
    from gguf import GGMLQuantizationType, quants

    path = Path(path)
    reader = gguf_reader(path)
    fields = reader.fields
    arch_field = fields.get("general.architecture")
    arch = str(field_value(arch_field)) if arch_field is not None else None
    names = [t.name for t in reader.tensors]
    prefixed = any(name.startswith(UNET_PREFIX) for name in names)
    if arch is not None and arch not in KNOWN_ARCHITECTURES and not (prefixed and arch in ("", "stable-diffusion")):
        raise HuabiError(
            f"{path.name}: GGUF architecture {arch!r} is not a Stable Diffusion UNet huabi can run "
            f"(known: {', '.join(KNOWN_ARCHITECTURES)})"
        )
    if not prefixed:
        if arch is None:
            raise HuabiError(f"{path.name}: GGUF file has no general.architecture and no {UNET_PREFIX}* tensors; unknown architecture")
        if any(name.startswith(("down_blocks.", "mid_block.")) for name in names):
            raise HuabiError(f"{path.name}: GGUF holds a diffusers-layout UNet; huabi reads the original layout (input_blocks.*) as ComfyUI-GGUF writes it")
        if not any(name.startswith("input_blocks.") for name in names):
            raise HuabiError(f"{path.name}: GGUF architecture {arch!r} but no input_blocks.* UNet tensors (first: {', '.join(names[:3])})")

    torch_types = {
        GGMLQuantizationType.F32: torch.float32,
        GGMLQuantizationType.F16: torch.float16,
        GGMLQuantizationType.BF16: torch.bfloat16,
    }
    tensors: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        qtype = tensor.tensor_type
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
        shape_field = fields.get(ORIG_SHAPE_PREFIX + tensor.name)
        if shape_field is not None:
            shape = tuple(int(v) for v in field_value(shape_field))
        else:
            shape = tuple(int(v) for v in reversed(tensor.shape.tolist()))  # GGML lists dims innermost first
        name = tensor.name if prefixed else UNET_PREFIX + tensor.name
        if qtype.name in _skip_types:  # kept packed by the caller: only the shape here
            tensors[name] = torch.empty(shape, dtype=torch.float32, device="meta")
            continue
        try:
            values = quants.dequantize(tensor.data, qtype)
        except NotImplementedError:
            raise HuabiError(f"{path.name}: tensor {tensor.name} has GGML type {qtype.name}, which huabi cannot dequantize") from None
        result = torch.from_numpy(values.copy()).reshape(shape)
        if qtype in torch_types:
            result = result.to(torch_types[qtype])  # float32 from F16/BF16 is exact, so this is too
        tensors[name] = result
    metadata = {
        "gguf.architecture": arch or "",
        "gguf.tensor_types": ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())),
    }
    return tensors, metadata


def has_companion_parts(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Does this (GGUF) state dict carry more than a UNet (text encoders, VAE)?"""
    return any(not key.startswith(UNET_PREFIX) for key in state_dict)


# --------------------------------------------------------------------------- writing


def architecture_for(state_dict: Mapping[str, torch.Tensor], *, source: str) -> str:
    """ComfyUI-GGUF's architecture name for an original-layout checkpoint: ``sd1`` or ``sdxl``."""
    from huabi.models.detect import detect
    from huabi.core.family import ModelFamily

    family = detect(state_dict, source=source).family
    return "sdxl" if family in (ModelFamily.SDXL, ModelFamily.SDXL_REFINER) else "sd1"


def tensor_plan(name: str, tensor: torch.Tensor, qtype_name: str) -> tuple[str, tuple[int, ...] | None]:
    """(GGML type to store, flattened shape or None) for one tensor, ComfyUI-GGUF's rules."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    numel = tensor.numel()
    if not tensor.is_floating_point():
        raise HuabiError(f"quantize: tensor {name} is {tensor.dtype}, not floating point")
    if qtype_name in ("F32", "F16", "BF16"):
        if tensor.ndim <= 1 or numel <= _SMALL_TENSOR_VALUES:
            return "F32", None
        return qtype_name, None
    if tensor.ndim <= 1 or numel <= _SMALL_TENSOR_VALUES:
        return "F32", None
    block = GGML_QUANT_SIZES[GGMLQuantizationType[qtype_name]][0]
    flat = None
    if numel >= _FLATTEN_MIN_VALUES and numel % _FLATTEN_ROW == 0 and tensor.shape[-1] % _FLATTEN_ROW != 0:
        flat = (numel // _FLATTEN_ROW, _FLATTEN_ROW)
    last = flat[-1] if flat else int(tensor.shape[-1])
    if last % block != 0:
        return "F16", None  # cannot be cut into blocks: ComfyUI-GGUF falls back to F16 too
    return qtype_name, flat


def write_gguf_unet(
    state_dict: Mapping[str, torch.Tensor],
    out_path: str | Path,
    qtype_name: str,
    *,
    source: str,
    extra_metadata: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """Write the UNet of an original-layout state dict as a ComfyUI-GGUF file; returns tensor counts per type."""
    import gguf
    from gguf import GGMLQuantizationType, quants

    from huabi.models.files import atomic_path

    qtype_name = qtype_name.upper()
    if qtype_name not in WRITE_TYPES:
        raise HuabiError(f"quantize: unknown type {qtype_name!r}; valid: {', '.join(WRITE_TYPES)}")
    out_path = Path(out_path)
    if not is_gguf_path(out_path):
        raise HuabiError(f"quantize: output {out_path.name} must end in .gguf")
    arch = architecture_for(state_dict, source=source)
    unet = {k[len(UNET_PREFIX):]: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}

    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    file_types = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16, "BF16": gguf.LlamaFileType.MOSTLY_BF16,
                  "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
                  "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}
    writer.add_file_type(int(file_types[qtype_name]))
    for key, value in (extra_metadata or {}).items():
        writer.add_string(key, str(value))
    counts: dict[str, int] = {}
    for name, tensor in unet.items():
        stored, flat = tensor_plan(name, tensor, qtype_name)
        values = tensor.detach().to("cpu", torch.float32).numpy()
        if flat is not None:
            writer.add_array(ORIG_SHAPE_PREFIX + name, [int(d) for d in tensor.shape])
            values = values.reshape(flat)
        if tensor.dtype == torch.float16 and stored == "F16" or tensor.dtype == torch.float32 and stored == "F32":
            data = values.astype(values.dtype if stored == "F32" else "float16")
        else:
            data = quants.quantize(values, GGMLQuantizationType[stored])
        writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType[stored])
        counts[stored] = counts.get(stored, 0) + 1

    with atomic_path(out_path) as temp:
        writer.write_header_to_file(path=temp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return counts


# --------------------------------------------------------------------------- on-the-fly dequantization

# Block types kept packed in memory and dequantized at each use (diffusers' torch dequantizers);
# F32/F16/BF16 tensors and any other type are plain tensors as on a normal load.
ON_THE_FLY_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")


@dataclass(frozen=True)
class PackedWeight:
    """A GGUF block-quantized weight kept as its raw bytes: ``[rows, bytes per row]`` uint8."""

    raw: torch.Tensor
    qtype: str
    shape: tuple[int, ...]  # the weight's real shape


class DequantizeOnUse(torch.nn.Module):
    """Parametrization: the packed bytes stored as the module's weight become the float weight at each access.

    Registered on module *instances* with ``torch.nn.utils.parametrize`` (unsafe: dtype and
    shape change), so ``module.weight`` is computed from the bytes every forward and only
    one layer's float weight exists at a time.
    """

    def __init__(self, qtype: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        super().__init__()
        import gguf
        from diffusers.quantizers.gguf.utils import dequantize_functions

        self.qtype = qtype
        self.shape = tuple(shape)
        self.dtype = dtype
        kind = gguf.GGMLQuantizationType[qtype]
        self.block_size, self.type_size = gguf.GGML_QUANT_SIZES[kind]
        self._dequantize = dequantize_functions[kind]

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        blocks = raw.reshape(-1, self.type_size)
        # float32 arithmetic, as the loader's numpy dequantizer, then the working dtype
        values = self._dequantize(blocks, self.block_size, self.type_size, dtype=torch.float32)
        return values.reshape(self.shape).to(self.dtype)


def read_gguf_packed(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, PackedWeight]]:
    """Like ``read_gguf``, but block-quantized tensors stay packed.

    Returns (tensors, metadata, packed): in ``tensors`` each packed weight is a ``meta`` tensor
    of its real shape (enough for detection and config inference); ``packed`` holds the bytes.
    """
    path = Path(path)
    tensors, metadata = read_gguf(path, _skip_types=ON_THE_FLY_TYPES)
    reader = gguf_reader(path)
    prefixed = any(t.name.startswith(UNET_PREFIX) for t in reader.tensors)
    packed: dict[str, PackedWeight] = {}
    for tensor in reader.tensors:
        if tensor.tensor_type.name not in ON_THE_FLY_TYPES:
            continue
        name = tensor.name if prefixed else UNET_PREFIX + tensor.name
        raw = torch.from_numpy(tensor.data.copy())
        packed[name] = PackedWeight(raw, tensor.tensor_type.name, tuple(tensors[name].shape))
    return tensors, metadata, packed


def build_unet_packed(
    config: Mapping[str, object],
    weights: Mapping[str, torch.Tensor],
    packed: Mapping[str, PackedWeight],
    *,
    device: torch.device | str,
    dtype: torch.dtype,
) -> torch.nn.Module:
    """A UNet whose ``packed`` weights (diffusers names) are dequantized at each use; the rest assigned as usual."""
    from diffusers import UNet2DConditionModel
    from torch.nn.utils import parametrize

    from huabi.models.convert import check_against_module

    with torch.device("meta"):
        module = UNet2DConditionModel(**config)
    check_against_module(weights, module, "UNet")  # packed ones are meta tensors of their real shape
    plain = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in weights.items() if k not in packed}
    module.load_state_dict(plain, strict=False, assign=True)
    for name, weight in packed.items():
        owner_name, attribute = name.rsplit(".", 1)
        owner = module.get_submodule(owner_name)
        owner._parameters[attribute] = torch.nn.Parameter(weight.raw.to(device), requires_grad=False)
        parametrize.register_parametrization(owner, attribute, DequantizeOnUse(weight.qtype, weight.shape, dtype), unsafe=True)
    leftover = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if leftover:
        raise HuabiError(f"UNet: tensors without values after loading: {', '.join(leftover[:3])}")
    return module.eval().requires_grad_(False)


def has_packed_weights(module: torch.nn.Module) -> bool:
    """Does this module dequantize GGUF weights on the fly (so in-place weight edits would not stick)?"""
    return any(isinstance(m, DequantizeOnUse) for m in module.modules())
