"""Load SD3/SD3.5 and FLUX.1 files into a ``FlowBundle``, offline, from every layout people have.

Sources (see ``transformer_families`` for the key layouts):

* an all-in-one single file (transformer + ``text_encoders.*`` + ``first_stage_model.*``);
* a transformer file alone (BFL names, ``model.diffusion_model.`` prefix, diffusers names, or a
  ComfyUI-GGUF ``.gguf``) plus separate ``clip_l`` / ``clip_g`` / ``t5xxl`` / VAE (``ae``) files,
  given explicitly or found in the models folder's usual sub-folders (ComfyUI's ``text_encoders``,
  ``clip`` and ``vae``; Forge's ``text_encoder`` and ``VAE``);
* a diffusers folder (``model_index.json``, ``transformer/``, ``text_encoder*/``, ``vae/``).

Weights are read tensor by tensor (safetensors are opened lazily), converted and placed, so at
most one layer exists twice. Two storage modes keep big transformers small in memory:

* fp8 tensors (``float8_e4m3fn`` / ``float8_e5m2``) stay fp8; each linear layer's weight is
  upcast to the compute dtype when used (``UpcastOnUse``), as ComfyUI and Forge do;
* GGUF block-quantized tensors stay packed and are dequantized at each use (``gguf_io``'s
  ``DequantizeOnUse``), or dequantized once at load when ``gguf_on_the_fly=False``.

Text encoders are loaded by a ``TextEncoderLoader`` that the pipeline calls, uses and lets go:
in ``low_memory`` mode the encoders are released after the prompts are encoded, before the
transformer runs, so a 24 GB machine never holds T5-XXL and FLUX at once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from huabi.errors import HuabiError
from huabi.models.transformer_families import (
    CLIP_G_PREFIX,
    CLIP_L_PREFIX,
    DIFFUSION_PREFIX,
    T5XXL_PREFIX,
    VAE_PREFIX,
    DetectedTransformer,
    TransformerFamily,
    detect_transformer,
    transformer_to_diffusers,
)

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# VAE latent normalisation (diffusers' scaling_factor / shift_factor of the released VAEs).
SD3_VAE_SCALING, SD3_VAE_SHIFT = 1.5305, 0.0609
FLUX_VAE_SCALING, FLUX_VAE_SHIFT = 0.3611, 0.1159
T5_MAX_LENGTH_SD3 = 256  # diffusers' StableDiffusion3Pipeline default (max_sequence_length)
T5_MAX_LENGTH_FLUX_DEV = 512
T5_MAX_LENGTH_FLUX_SCHNELL = 256
CONFIG_DIR = Path(__file__).parent / "configs"
GGUF_TRANSFORMER_ARCHITECTURES = ("flux", "sd3")


# --------------------------------------------------------------------------- lazy tensor sources


class TensorSource(Mapping):
    """A read-only name -> tensor mapping over one or more files; safetensors tensors are read on access."""

    def __init__(self, files: list[Path], *, strip: str = "") -> None:
        from safetensors import safe_open

        self._handles: list = []
        self._where: dict[str, tuple[Any, str]] = {}
        self._eager: dict[str, torch.Tensor] = {}
        self.metadata: dict[str, str] = {}
        for path in files:
            if path.suffix.lower() == ".safetensors":
                from huabi.models.formats import read_safetensors_header

                header = read_safetensors_header(path)  # validates length and offsets (truncated downloads)
                self.metadata.update({str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()})
                handle = safe_open(str(path), framework="pt", device="cpu")
                self._handles.append(handle)
                for name in handle.keys():
                    self._where[name] = (handle, name)
            else:
                from huabi.models.formats import read_state_dict

                tensors, metadata = read_state_dict(path)
                self._eager.update(tensors)
                self.metadata.update(metadata)
        self._shapes: dict[str, torch.Tensor] | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._eager:
            return self._eager[name]
        handle, inner = self._where[name]
        return handle.get_tensor(inner)

    def __iter__(self) -> Iterator[str]:
        yield from self._where
        yield from self._eager

    def __len__(self) -> int:
        return len(self._where) + len(self._eager)

    def __contains__(self, name: object) -> bool:
        return name in self._where or name in self._eager

    def shapes(self) -> dict[str, torch.Tensor]:
        """Every tensor as a ``meta`` tensor of its shape and dtype (for detection, nothing read)."""
        if self._shapes is None:
            shapes: dict[str, torch.Tensor] = {}
            for name, (handle, inner) in self._where.items():
                tensor_slice = handle.get_slice(inner)
                shapes[name] = torch.empty(tensor_slice.get_shape(), dtype=_slice_dtype(tensor_slice), device="meta")
            for name, tensor in self._eager.items():
                shapes[name] = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
            self._shapes = shapes
        return self._shapes

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under ``prefix`` (prefix removed), read now."""
        return {name[len(prefix):]: self[name] for name in self if name.startswith(prefix)}

    def has_prefix(self, prefix: str) -> bool:
        return any(name.startswith(prefix) for name in self)


_SLICE_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def _slice_dtype(tensor_slice) -> torch.dtype:
    return _SLICE_DTYPES.get(tensor_slice.get_dtype(), torch.float32)


# --------------------------------------------------------------------------- GGUF transformers


def read_transformer_gguf(path: Path, *, on_the_fly: bool) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """A ComfyUI-GGUF FLUX/SD3 transformer: (tensors by original name, metadata, packed weights).

    Packed (block-quantized) weights appear in ``tensors`` as ``meta`` tensors of their real shape
    when ``on_the_fly``; otherwise everything is dequantized to float32 (F16/BF16 kept exact).
    """
    from gguf import GGMLQuantizationType, quants

    from huabi.models.gguf_io import ON_THE_FLY_TYPES, ORIG_SHAPE_PREFIX, PackedWeight, field_value, gguf_reader

    reader = gguf_reader(path)
    arch_field = reader.fields.get("general.architecture")
    arch = str(field_value(arch_field)) if arch_field is not None else ""
    names = [t.name for t in reader.tensors]
    if arch not in GGUF_TRANSFORMER_ARCHITECTURES and not any(n.startswith(("double_blocks.", "joint_blocks.")) for n in names):
        raise HuabiError(f"{path.name}: GGUF architecture {arch!r} is not an SD3/FLUX transformer (known: flux, sd3, sd1, sdxl)")
    exact = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16, GGMLQuantizationType.BF16: torch.bfloat16}
    tensors: dict[str, torch.Tensor] = {}
    packed: dict[str, PackedWeight] = {}
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        qtype = tensor.tensor_type
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
        shape_field = reader.fields.get(ORIG_SHAPE_PREFIX + tensor.name)
        if shape_field is not None:
            shape = tuple(int(v) for v in field_value(shape_field))
        else:
            shape = tuple(int(v) for v in reversed(tensor.shape.tolist()))
        name = tensor.name[len(DIFFUSION_PREFIX):] if tensor.name.startswith(DIFFUSION_PREFIX) else tensor.name
        if on_the_fly and qtype.name in ON_THE_FLY_TYPES:
            tensors[name] = torch.empty(shape, dtype=torch.float32, device="meta")
            packed[name] = PackedWeight(torch.from_numpy(tensor.data.copy()), qtype.name, shape)
            continue
        try:
            values = quants.dequantize(tensor.data, qtype)
        except NotImplementedError:
            raise HuabiError(f"{path.name}: tensor {tensor.name} has GGML type {qtype.name}, which huabi cannot dequantize") from None
        result = torch.from_numpy(values.copy()).reshape(shape)
        tensors[name] = result.to(exact[qtype]) if qtype in exact else result
    metadata = {"gguf.architecture": arch, "gguf.tensor_types": ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))}
    return tensors, metadata, packed


def write_transformer_gguf(original: Mapping[str, torch.Tensor], out_path: str | Path, qtype_name: str, *, arch: str) -> dict[str, int]:
    """Write a FLUX/SD3 transformer (original names, no prefix) as a ComfyUI-GGUF file, atomically.

    Same rules as ``gguf_io.write_gguf_unet`` (1-D and small tensors in F32) but no flatten-to-256
    trick (ComfyUI-GGUF uses it for UNets only); architecture ``flux`` or ``sd3`` as ComfyUI-GGUF names them.
    """
    import os
    import tempfile

    import gguf
    from gguf import GGMLQuantizationType, quants

    from gguf import GGML_QUANT_SIZES

    from huabi.models.gguf_io import WRITE_TYPES, tensor_plan

    qtype_name = qtype_name.upper()
    if qtype_name not in WRITE_TYPES:
        raise HuabiError(f"quantize: unknown type {qtype_name!r}; valid: {', '.join(WRITE_TYPES)}")
    if arch not in GGUF_TRANSFORMER_ARCHITECTURES:
        raise HuabiError(f"quantize: architecture {arch!r} is not one of {', '.join(GGUF_TRANSFORMER_ARCHITECTURES)}")
    out_path = Path(out_path)
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    counts: dict[str, int] = {}
    for name, tensor in original.items():
        tensor = tensor.detach().to("cpu")
        stored, flat = tensor_plan(name, tensor.float(), qtype_name)
        if flat is not None:
            # ComfyUI-GGUF flattens odd rows only for UNet architectures; FLUX/SD3 files keep real shapes
            # (diffusers' GGUF loader needs them), so a row that is not whole blocks is stored F16.
            block = GGML_QUANT_SIZES[GGMLQuantizationType[stored]][0]
            stored = stored if tensor.shape[-1] % block == 0 else "F16"
        values = tensor.float().numpy()
        if stored == "F32":
            data = values
        elif stored == "F16":
            data = values.astype("float16")
        else:
            data = quants.quantize(values, GGMLQuantizationType[stored])
        writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType[stored])
        counts[stored] = counts.get(stored, 0) + 1
    out_path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(handle)
    try:
        writer.write_header_to_file(path=tmp_name)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp_name, out_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return counts


# --------------------------------------------------------------------------- configs from shapes


def _shape(sd: Mapping[str, torch.Tensor], key: str, what: str) -> tuple[int, ...]:
    tensor = sd.get(key)
    if tensor is None:
        raise HuabiError(f"{what} layout not understood: missing {key}")
    return tuple(tensor.shape)


def flux_rope_axes(head_dim: int) -> list[int]:
    """RoPE split of a head over (index, row, column): FLUX's [16, 56, 56] at 128, the same ratios below."""
    if head_dim == 128:
        return [16, 56, 56]
    if head_dim % 16:
        raise HuabiError(f"FLUX head width {head_dim} is not a multiple of 16 (RoPE axes)")
    return [head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16]


def flux_config_from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``FluxTransformer2DModel`` config from diffusers-named tensor shapes."""
    from huabi.models.transformer_families import block_count

    what = "FLUX transformer"
    hidden, in_channels = _shape(sd, "x_embedder.weight", what)
    head_dim = _shape(sd, "transformer_blocks.0.attn.norm_q.weight", what)[0]
    if hidden % head_dim:
        raise HuabiError(f"{what}: width {hidden} is not a multiple of the head width {head_dim}")
    return {
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": _shape(sd, "proj_out.weight", what)[0],
        "num_layers": block_count(sd, r"^transformer_blocks\.(\d+)\."),
        "num_single_layers": block_count(sd, r"^single_transformer_blocks\.(\d+)\."),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": _shape(sd, "context_embedder.weight", what)[1],
        "pooled_projection_dim": _shape(sd, "time_text_embed.text_embedder.linear_1.weight", what)[1],
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in sd,
        "axes_dims_rope": flux_rope_axes(head_dim),
    }


SD3_HEAD_DIM = 64  # every SD3/SD3.5 (heads are not stored; with q/k norm the norm width says it)


def sd3_config_from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``SD3Transformer2DModel`` config from diffusers-named tensor shapes."""
    import re

    from huabi.models.transformer_families import block_count

    what = "SD3 transformer"
    hidden, in_channels, patch, _ = _shape(sd, "pos_embed.proj.weight", what)
    qk_norm = "transformer_blocks.0.attn.norm_q.weight" in sd
    head_dim = _shape(sd, "transformer_blocks.0.attn.norm_q.weight", what)[0] if qk_norm else SD3_HEAD_DIM
    positions = _shape(sd, "pos_embed.pos_embed", what)[1]
    side = math.isqrt(positions)
    if side * side != positions:
        raise HuabiError(f"{what}: pos_embed has {positions} positions, not a square grid")
    caption_dim, joint_dim = _shape(sd, "context_embedder.weight", what)
    dual = sorted({int(m.group(1)) for k in sd if (m := re.match(r"^transformer_blocks\.(\d+)\.attn2\.", k))})
    return {
        "sample_size": 128,
        "patch_size": patch,
        "in_channels": in_channels,
        "num_layers": block_count(sd, r"^transformer_blocks\.(\d+)\."),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": joint_dim,
        "caption_projection_dim": caption_dim,
        "pooled_projection_dim": _shape(sd, "time_text_embed.text_embedder.linear_1.weight", what)[1],
        "out_channels": _shape(sd, "proj_out.weight", what)[0] // (patch * patch),
        "pos_embed_max_size": side,
        "dual_attention_layers": dual,
        "qk_norm": "rms_norm" if qk_norm else None,
    }


def flow_vae_config(vae_sd: Mapping[str, torch.Tensor], family: TransformerFamily) -> dict[str, Any]:
    """``AutoencoderKL`` config of the 16-channel SD3/FLUX VAE (diffusers names)."""
    import re

    levels = sorted({int(m.group(1)) for k in vae_sd if (m := re.match(r"^encoder\.down_blocks\.(\d+)\.", k))})
    per_level = len({int(m.group(1)) for k in vae_sd if (m := re.match(r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))})
    if not levels:
        raise HuabiError("VAE layout not understood: no encoder down blocks")
    channels = [int(vae_sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in levels]
    latent = int(vae_sd["encoder.conv_out.weight"].shape[0]) // 2
    if latent != 16:
        raise HuabiError(f"VAE has {latent} latent channels; SD3 and FLUX use a 16-channel VAE (an SD1/SDXL VAE does not fit)")
    flux = family.is_flux
    return {
        "in_channels": int(vae_sd["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(vae_sd["decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": channels,
        "layers_per_block": per_level,
        "latent_channels": latent,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": FLUX_VAE_SCALING if flux else SD3_VAE_SCALING,
        "shift_factor": FLUX_VAE_SHIFT if flux else SD3_VAE_SHIFT,
        "use_quant_conv": "quant_conv.weight" in vae_sd,
        "use_post_quant_conv": "post_quant_conv.weight" in vae_sd,
    }


def reference_config(name: str) -> dict[str, Any]:
    """A shipped full-size config (``models/configs/<name>.json``), e.g. ``flux_dev_transformer``."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise HuabiError(f"no shipped config {name!r} (expected {path})")
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- building modules


class UpcastOnUse(torch.nn.Module):
    """Parametrization: a weight stored in fp8 becomes ``dtype`` each time the layer uses it (times its
    ``scale`` for ComfyUI's ``*_fp8_scaled`` files)."""

    def __init__(self, dtype: torch.dtype, scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.dtype = dtype
        self.register_buffer("scale", None if scale is None else scale.detach().float().reshape(()), persistent=False)

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return stored.to(self.dtype)
        return (stored.float() * self.scale).to(self.dtype)


def split_fp8_scales(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ComfyUI's scaled fp8 layout (``flux1-dev-fp8_scaled``, ``t5xxl_fp8_e4m3fn_scaled``): each fp8
    ``X.weight`` has a float ``X.scale_weight`` (the real weight is their product); ``X.scale_input``
    (for fp8 matmuls) and the ``scaled_fp8`` marker carry nothing huabi needs. Returns
    (the tensors without those keys, {``X.weight``: scale})."""
    kept: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(".scale_weight"):
            scales[name[: -len("scale_weight")] + "weight"] = tensor
        elif not (name.endswith(".scale_input") or name == "scaled_fp8" or name.endswith(".scaled_fp8")):
            kept[name] = tensor
    orphans = [name for name in scales if name not in kept]
    if orphans:
        raise HuabiError(f"scaled fp8: {orphans[0][: -len('weight')]}scale_weight has no weight beside it")
    return kept, scales


def scales_to_diffusers(scales: Mapping[str, torch.Tensor], bare: Mapping[str, torch.Tensor],
                        layout: str) -> dict[str, torch.Tensor]:
    """Per-tensor fp8 scales follow their weights through the conversion table (a fused qkv's
    scale serves each of q, k and v)."""
    if not scales or layout == "diffusers":
        return dict(scales)
    from huabi.models.transformer_families import rows_for

    return {name: scales[row.original] for row in rows_for(layout, bare) if row.original in scales
            for name in row.diffusers}


def _linear_weight_names(module: torch.nn.Module) -> set[str]:
    return {f"{name}.weight" if name else "weight" for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def build_stored(
    module: torch.nn.Module,
    weights: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    what: str,
    packed: Mapping[str, Any] | None = None,
    keep_fp8: bool = True,
    scales: Mapping[str, torch.Tensor] | None = None,
) -> torch.nn.Module:
    """Assign ``weights`` (diffusers/transformers names) to a ``meta``-built module, strictly.

    fp8 linear weights stay fp8 (``keep_fp8``) and are upcast per use; ``packed`` GGUF weights
    stay packed and are dequantized per use; everything else is cast to ``dtype`` on ``device``.
    """
    from torch.nn.utils import parametrize

    from huabi.models.convert import check_against_module
    from huabi.models.gguf_io import DequantizeOnUse

    packed = dict(packed or {})
    parameters = {name for name, _ in module.named_parameters()}
    for name in [n for n in packed if n not in parameters]:  # a quantized buffer (SD3's pos_embed): unpack now
        weight = packed.pop(name)
        weights = {**weights, name: DequantizeOnUse(weight.qtype, weight.shape, dtype)(weight.raw)}
    weights, own_scales = split_fp8_scales(weights)  # scaled fp8 files (scales given by name here)
    scales = {**own_scales, **(scales or {})}
    check_against_module(weights, module, what)
    linear_weights = _linear_weight_names(module)
    deferred: dict[str, tuple[torch.Tensor, torch.nn.Module]] = {}
    plain: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if name in packed:
            continue
        scale = scales.get(name)
        if keep_fp8 and tensor.dtype in FP8_DTYPES and name in linear_weights and dtype not in FP8_DTYPES:
            deferred[name] = (tensor.to(device), UpcastOnUse(dtype, scale))
            continue
        if scale is not None:
            tensor = tensor.float() * scale.float()
        plain[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    module.load_state_dict(plain, strict=False, assign=True)
    for name, weight in packed.items():
        deferred[name] = (weight.raw.to(device), DequantizeOnUse(weight.qtype, weight.shape, dtype))
    for name, (stored, parametrization) in deferred.items():
        owner_name, attribute = name.rsplit(".", 1)
        owner = module.get_submodule(owner_name)
        owner._parameters[attribute] = torch.nn.Parameter(stored, requires_grad=False)
        parametrize.register_parametrization(owner, attribute, parametrization, unsafe=True)
    leftover = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if leftover:
        raise HuabiError(f"{what}: tensors without values after loading: {', '.join(leftover[:3])}")
    return module.eval().requires_grad_(False)


def build_transformer(
    family: TransformerFamily,
    weights: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    packed: Mapping[str, Any] | None = None,
    scales: Mapping[str, torch.Tensor] | None = None,
) -> torch.nn.Module:
    """The diffusers transformer of ``family`` from diffusers-named weights (config from shapes)."""
    if family.is_flux:
        from diffusers import FluxTransformer2DModel as model_class

        config = flux_config_from_diffusers(weights)
    else:
        from diffusers import SD3Transformer2DModel as model_class

        config = sd3_config_from_diffusers(weights)
    with torch.device("meta"):
        module = model_class(**config)
    # FLUX's RoPE frequencies are computed per call from the config: no non-persistent buffers to fill.
    return build_stored(module, weights, device=device, dtype=dtype, what=f"{family.label} transformer", packed=packed,
                        scales=scales)


def build_flow_vae(vae_sd: Mapping[str, torch.Tensor], family: TransformerFamily, *, device, dtype) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    from huabi.models.convert import is_diffusers_vae, vae_to_diffusers

    vae_sd = {k: v for k, v in vae_sd.items() if not k.startswith(("model_ema.", "loss."))}
    if not is_diffusers_vae(vae_sd):
        vae_sd = vae_to_diffusers(vae_sd)
    config = flow_vae_config(vae_sd, family)
    with torch.device("meta"):
        module = AutoencoderKL(**config)
    return build_stored(module, vae_sd, device=device, dtype=dtype, what="VAE", keep_fp8=False)


def _clip_from_hf(section: dict[str, torch.Tensor], *, prefix: str, activation: str, pad_id: int, dtype) -> torch.nn.Module:
    """A transformers CLIP text tower from HF-layout tensors (with ``text_projection.weight`` when present)."""
    from huabi.models.text_encoders import HF, EncoderSlot, build_text_encoder, hf_text_section

    section = {k.removeprefix("transformer."): v for k, v in section.items()}
    projection = section.pop("text_projection.weight", None)
    if projection is not None and projection.dtype in FP8_DTYPES:
        projection = projection.to(dtype)
    section = {k: (v.to(dtype) if v.dtype in FP8_DTYPES else v) for k, v in section.items()}
    hf_dict, _ = hf_text_section(section, prefix)
    slot = EncoderSlot(prefix, HF, activation)
    model = build_text_encoder(hf_dict, projection, slot, dtype, None)
    model.config.pad_token_id = pad_id
    return model


def t5_config_from_shapes(section: Mapping[str, torch.Tensor]):
    from transformers import T5Config

    what = "T5 text encoder"
    vocab, d_model = _shape(section, "shared.weight", what)
    layers = len({int(k.split(".")[2]) for k in section if k.startswith("encoder.block.")})
    heads = _shape(section, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", what)[1]
    inner = _shape(section, "encoder.block.0.layer.0.SelfAttention.q.weight", what)[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in section
    d_ff = _shape(section, "encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight", what)[0]
    return T5Config(
        vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=layers, num_heads=heads,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=False, use_cache=False,
        dense_act_fn="gelu_new" if gated else "relu", is_gated_act=gated, tie_word_embeddings=False,
    )


def build_t5(section: dict[str, torch.Tensor], *, device, dtype) -> torch.nn.Module:
    """transformers ``T5EncoderModel`` (T5 v1.1: gated GELU) from its state dict; fp8 linears stay fp8."""
    from transformers import T5EncoderModel

    section = {k.removeprefix("transformer."): v for k, v in section.items()}
    section.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight
    section = {k: v for k, v in section.items() if not k.startswith(("decoder.", "lm_head."))}
    config = t5_config_from_shapes(section)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    expected = set(model.state_dict())
    if "encoder.embed_tokens.weight" in expected:
        section["encoder.embed_tokens.weight"] = section["shared.weight"]
    if section["shared.weight"].dtype in FP8_DTYPES:  # an embedding, not a linear: upcast once
        section["shared.weight"] = section["shared.weight"].to(dtype)
        if "encoder.embed_tokens.weight" in section:
            section["encoder.embed_tokens.weight"] = section["shared.weight"]
    model = build_stored(model, section, device=device, dtype=dtype, what="T5 text encoder")
    if "encoder.embed_tokens.weight" in expected:
        model.encoder.embed_tokens = model.shared
    return model


# --------------------------------------------------------------------------- the bundle


@dataclass
class FlowTextEncoders:
    """The text encoders a family uses (``None`` where absent: SD3 without T5 runs with empty T5 conditioning)."""

    clip_l: torch.nn.Module | None
    clip_g: torch.nn.Module | None
    t5: torch.nn.Module | None


@dataclass
class FlowBundle:
    """Everything the flow pipeline needs for one SD3/FLUX model."""

    family: TransformerFamily
    transformer: torch.nn.Module
    vae: torch.nn.Module
    load_text_encoders: Callable[[], FlowTextEncoders]  # called per job unless ``text_encoders`` is kept
    name: str
    text_encoders: FlowTextEncoders | None = None  # kept loaded (not low-memory mode)
    path: Path | None = None
    short_hash: str | None = None
    modules: tuple[str, ...] = ()  # separately loaded files, as Forge lists them ("Module 1: ae")
    metadata: dict[str, str] = field(default_factory=dict)
    native_size_px: int = 1024
    dtype: torch.dtype = torch.float32

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encoders(self) -> FlowTextEncoders:
        return self.text_encoders if self.text_encoders is not None else self.load_text_encoders()


@dataclass(frozen=True)
class FlowFiles:
    """Where each part comes from: one file per part, or None where the main file carries it."""

    main: Path
    clip_l: Path | None = None
    clip_g: Path | None = None
    t5xxl: Path | None = None
    vae: Path | None = None


# File-name patterns of the separately downloaded parts, and the folders ComfyUI/Forge keep them in.
_PART_FOLDERS = {
    "clip_l": ("text_encoders", "clip", "text_encoder", "CLIP"),
    "clip_g": ("text_encoders", "clip", "text_encoder", "CLIP"),
    "t5xxl": ("text_encoders", "clip", "text_encoder", "CLIP"),
    "vae": ("vae", "VAE"),
}
_PART_PATTERNS = {
    "clip_l": ("clip_l*.safetensors",),
    "clip_g": ("clip_g*.safetensors",),
    "t5xxl": ("t5xxl*.safetensors", "t5*xxl*.safetensors"),
    "vae": ("ae.safetensors", "flux*vae*.safetensors", "flux*ae*.safetensors", "sd3*vae*.safetensors", "sd3*ae*.safetensors"),
}


def find_part(models_dir: Path | None, part: str, family: TransformerFamily | None = None) -> Path | None:
    """The first file matching ``part``'s usual names in the models folder's usual sub-folders.

    fp16 files are preferred over fp8 ones when both exist (``t5xxl_fp16`` before ``t5xxl_fp8_e4m3fn``).
    """
    if models_dir is None:
        return None
    candidates: list[Path] = []
    for folder in _PART_FOLDERS[part]:
        base = Path(models_dir) / folder
        if not base.is_dir():
            continue
        for pattern in _PART_PATTERNS[part]:
            candidates += sorted(p for p in base.glob(pattern) if p.is_file())
    if part == "vae" and family is not None:
        wanted = "flux" if family.is_flux else "sd3"
        candidates = [p for p in candidates if p.name == "ae.safetensors" and family.is_flux or wanted in p.name.lower()] or []
    candidates.sort(key=lambda p: ("fp8" in p.name.lower(), p.name))
    return candidates[0] if candidates else None


def _hash(path: Path | None, hash_cache) -> str | None:
    if path is None or hash_cache is None or not path.is_file():
        return None
    return hash_cache.short_hash(path)


def component_weight_files(folder: Path) -> list[Path]:
    """The weight files of a diffusers/transformers component folder (all shards; non-variant first)."""
    files = sorted(p for p in folder.glob("*.safetensors") if ".fp16." not in p.name)
    if not files:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        files = sorted(folder.glob("*.bin"))
    if not files:
        raise HuabiError(f"{folder}: no weights (*.safetensors or *.bin)")
    return files


def is_flow_model(path: str | Path) -> bool:
    """Does this file or folder hold an SD3/FLUX transformer (cheap: headers and config only)?"""
    path = Path(path)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            return False
        try:
            return (path / "transformer").is_dir() and json.loads(index.read_text()).get("_class_name", "").startswith(("StableDiffusion3", "Flux"))
        except json.JSONDecodeError:
            return False
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        from huabi.models.gguf_io import read_gguf_metadata

        try:
            return str(read_gguf_metadata(path).get("general.architecture", "")) in GGUF_TRANSFORMER_ARCHITECTURES
        except HuabiError:
            return False
    if suffix == ".safetensors" and path.is_file():
        from huabi.models.formats import read_safetensors_header
        from huabi.models.transformer_families import looks_like_transformer

        try:
            return looks_like_transformer(k for k in read_safetensors_header(path) if k != "__metadata__")
        except HuabiError:
            return False
    return False


def describe_flow_file(path: str | Path) -> str:
    """One line for listings, e.g. ``"flux_dev transformer (bf16) + vae"`` (names and shapes only, nothing loaded)."""
    path = Path(path)
    if path.is_dir():
        source = TensorSource(component_weight_files(path / "transformer"))
        return f"{detect_transformer(source.shapes(), source=path.name).family.value} diffusers folder"
    if path.suffix.lower() == ".gguf":
        from huabi.models.gguf_io import gguf_tensor_types

        tensors, _, _ = read_transformer_gguf(path, on_the_fly=True)
        types = ", ".join(f"{k} {v}" for k, v in sorted(gguf_tensor_types(path).items()))
        return f"{detect_transformer(tensors, source=path.name).family.value} transformer (GGUF: {types})"
    shapes = TensorSource([path]).shapes()
    found = detect_transformer(shapes, source=path.name)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for k, t in shapes.items() if k.startswith(found.prefix) and t.ndim == 2})
    parts = [name for name, has in (("clip_l", found.has_clip_l), ("clip_g", found.has_clip_g), ("t5xxl", found.has_t5),
                                    ("vae", found.has_vae)) if has]
    return f"{found.family.value} transformer ({'/'.join(dtypes)})" + (f" + {', '.join(parts)}" if parts else "")


def load_flow_model(
    path: str | Path,
    *,
    clip_l: str | Path | None = None,
    clip_g: str | Path | None = None,
    t5xxl: str | Path | None = None,
    vae: str | Path | None = None,
    models_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    text_encoder_dtype: torch.dtype | None = None,
    gguf_on_the_fly: bool = True,
    low_memory: bool = False,
    hash_cache=None,
) -> FlowBundle:
    """Load an SD3/SD3.5/FLUX.1 model from any of the layouts above.

    Parts the main file lacks come from ``clip_l``/``clip_g``/``t5xxl``/``vae`` or are found in
    ``models_dir``. FLUX needs CLIP-L, T5 and the VAE; SD3 needs CLIP-L, CLIP-G and the VAE (T5
    optional: empty T5 conditioning without it). ``low_memory``: text encoders are loaded for each
    job and released after encoding instead of staying resident.
    """
    path = Path(path)
    models_dir = Path(models_dir) if models_dir is not None else None
    te_dtype = text_encoder_dtype or dtype
    if not path.exists():
        raise HuabiError(f"{path}: model file not found")

    # 1. the transformer: read names and shapes, detect
    packed: dict = {}
    if path.is_dir():
        return _load_diffusers_folder(path, device=device, dtype=dtype, te_dtype=te_dtype, low_memory=low_memory, hash_cache=hash_cache)
    if path.suffix.lower() == ".gguf":
        tensors, metadata, packed = read_transformer_gguf(path, on_the_fly=gguf_on_the_fly)
        main = None
        shapes = {k: torch.empty(v.shape, device="meta") for k, v in tensors.items()}
    else:
        main = TensorSource([path])
        metadata = dict(main.metadata)
        shapes = main.shapes()
    detected = detect_transformer(shapes, source=path.name)
    family = detected.family

    # 2. locate the other parts
    files = FlowFiles(
        main=path,
        clip_l=Path(clip_l) if clip_l else (None if detected.has_clip_l else find_part(models_dir, "clip_l")),
        clip_g=Path(clip_g) if clip_g else (None if detected.has_clip_g or family.is_flux else find_part(models_dir, "clip_g")),
        t5xxl=Path(t5xxl) if t5xxl else (None if detected.has_t5 else find_part(models_dir, "t5xxl")),
        vae=Path(vae) if vae else (None if detected.has_vae else find_part(models_dir, "vae", family)),
    )
    _check_parts(family, detected, files, path)

    # 3. text encoders: a loader, run now (kept) or per job (low memory)
    def load_text_encoders() -> FlowTextEncoders:
        return _load_text_encoders(family, main, files, device=device, dtype=te_dtype)

    kept = None if low_memory else load_text_encoders()

    # 4. VAE
    if files.vae is not None:
        vae_sd = _read_vae_part(files.vae)
    else:
        vae_sd = main.section(VAE_PREFIX)
    vae_module = build_flow_vae(vae_sd, family, device=device, dtype=dtype)
    del vae_sd

    # 5. transformer, converted from the original names
    if main is not None:
        bare = {k[len(detected.prefix):]: main[k] for k in main if k.startswith(detected.prefix) and is_transformer_key(k[len(detected.prefix):])}
    else:
        bare = tensors
    bare, scales = split_fp8_scales(bare)
    scales = scales_to_diffusers(scales, bare, detected.layout)
    converted = transformer_to_diffusers(bare, detected.layout)
    packed_converted = _convert_packed(packed, bare, detected.layout) if packed else {}
    packed.clear()  # fused weights were split into new byte arrays: drop the originals before building
    del bare
    transformer = build_transformer(family, converted, device=device, dtype=dtype, packed=packed_converted, scales=scales)
    del converted

    modules = tuple(p.stem for p in (files.vae, files.clip_l, files.clip_g, files.t5xxl) if p is not None)
    return FlowBundle(
        family=family,
        transformer=transformer,
        vae=vae_module,
        load_text_encoders=load_text_encoders,
        text_encoders=kept,
        name=path.stem,
        path=path,
        short_hash=_hash(path, hash_cache),
        modules=modules,
        metadata={k: v for k, v in metadata.items() if isinstance(v, str)},
        dtype=dtype,
    )


def is_transformer_key(bare: str) -> bool:
    return not bare.startswith(("text_encoders.", "first_stage_model.", "cond_stage_model.", "conditioner."))


def _convert_packed(packed: Mapping[str, Any], bare: Mapping[str, torch.Tensor], layout: str) -> dict[str, Any]:
    """Map packed GGUF weights to diffusers names. Quantization blocks run along a row, so a fused
    weight (qkv, linear1) or the final adaLN's swapped halves split by whole rows and stay packed."""
    import gguf

    from huabi.models.gguf_io import PackedWeight
    from huabi.models.transformer_families import flux_rows, flux_shape, sd3_rows, sd3_shape

    if layout == "diffusers":
        return dict(packed)
    rows = flux_rows(flux_shape(bare)) if layout == "flux" else sd3_rows(sd3_shape(bare))
    hidden = int(bare["img_in.weight"].shape[0]) if layout == "flux" else 0
    result: dict[str, Any] = {}
    for row in rows:
        weight = packed.get(row.original)
        if weight is None:
            continue
        if row.op == "copy":
            result[row.diffusers[0]] = weight
            continue
        total = weight.shape[0]
        block_values = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[weight.qtype]][0]
        columns = math.prod(weight.shape[1:])
        if columns % block_values or weight.raw.numel() % total:
            raise HuabiError(f"GGUF tensor {row.original}: rows do not hold whole quantization blocks; load with gguf_on_the_fly=False")
        # The bytes are the blocks in order; with whole blocks per row (also when ComfyUI-GGUF stored the
        # tensor flattened to rows of 256) each weight row is one contiguous run of bytes.
        by_row = weight.raw.reshape(total, -1)
        sizes = {"qkv": [total // 3] * 3, "linear1": [hidden] * 3 + [total - 3 * hidden], "swap": [total // 2] * 2}[row.op]
        parts = torch.split(by_row, sizes, dim=0)
        if row.op == "swap":
            result[row.diffusers[0]] = PackedWeight(torch.cat([parts[1], parts[0]]), weight.qtype, weight.shape)
            continue
        for name, part, size in zip(row.diffusers, parts, sizes):
            result[name] = PackedWeight(part.contiguous(), weight.qtype, (size, *weight.shape[1:]))
    return result


def _check_parts(family: TransformerFamily, detected: DetectedTransformer, files: FlowFiles, path: Path) -> None:
    missing = []
    if not (detected.has_clip_l or files.clip_l):
        missing.append("clip_l (--clip-l, e.g. clip_l.safetensors)")
    if family.is_sd3 and not (detected.has_clip_g or files.clip_g):
        missing.append("clip_g (--clip-g, e.g. clip_g.safetensors)")
    if family.is_flux and not (detected.has_t5 or files.t5xxl):
        missing.append("t5xxl (--t5xxl, e.g. t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors)")
    if not (detected.has_vae or files.vae):
        missing.append("VAE (--vae, e.g. ae.safetensors)" if family.is_flux else "VAE (--vae)")
    if missing:
        raise HuabiError(
            f"{path.name}: {family.label} transformer without {', '.join(missing)}; pass the files or put them in "
            f"the models folder's text_encoders/ and vae/ sub-folders"
        )


def _read_vae_part(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        source = TensorSource(component_weight_files(path / "vae" if (path / "vae").is_dir() else path))
    else:
        source = TensorSource([path])
    tensors = {k: source[k] for k in source}
    if any(k.startswith(VAE_PREFIX) for k in tensors):
        tensors = {k[len(VAE_PREFIX):]: v for k, v in tensors.items() if k.startswith(VAE_PREFIX)}
    if not any(k.startswith("encoder.") for k in tensors) or not any(k.startswith("decoder.") for k in tensors):
        raise HuabiError(f"{path.name}: not a VAE file: no encoder.*/decoder.* tensors")
    return tensors


def _part_section(main: TensorSource | None, prefix: str, part: Path | None, what: str) -> dict[str, torch.Tensor] | None:
    """A text encoder's tensors from its own file (any prefix removed) or from the main file."""
    if part is not None:
        source = TensorSource(component_weight_files(part) if part.is_dir() else [part])
        tensors = {k: source[k] for k in source}
        if any(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not tensors:
            raise HuabiError(f"{part.name}: no tensors for {what}")
        return tensors
    if main is not None and main.has_prefix(prefix):
        return main.section(prefix)
    return None


def _load_text_encoders(family: TransformerFamily, main: TensorSource | None, files: FlowFiles, *, device, dtype) -> FlowTextEncoders:
    from huabi.models.text_encoders import EOS_ID

    clip_l_sd = _part_section(main, CLIP_L_PREFIX, files.clip_l, "CLIP-L")
    clip_l = _clip_from_hf(clip_l_sd, prefix=CLIP_L_PREFIX, activation="quick_gelu", pad_id=EOS_ID, dtype=dtype).to(device)
    clip_g = None
    if family.is_sd3:
        clip_g_sd = _part_section(main, CLIP_G_PREFIX, files.clip_g, "CLIP-G")
        if "text_projection.weight" not in clip_g_sd:
            raise HuabiError("CLIP-G: no text_projection.weight (SD3 uses CLIP-G's projected pooled output)")
        clip_g = _clip_from_hf(clip_g_sd, prefix=CLIP_G_PREFIX, activation="gelu", pad_id=0, dtype=dtype).to(device)
        if getattr(clip_l, "text_projection", None) is None:
            raise HuabiError("CLIP-L: no text_projection.weight (SD3 uses CLIP-L's projected pooled output)")
    t5_sd = _part_section(main, T5XXL_PREFIX, files.t5xxl, "T5-XXL")
    t5 = build_t5(t5_sd, device=device, dtype=dtype) if t5_sd is not None else None
    return FlowTextEncoders(clip_l=clip_l, clip_g=clip_g, t5=t5)


def _load_diffusers_folder(folder: Path, *, device, dtype, te_dtype, low_memory: bool, hash_cache) -> FlowBundle:
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    source = TensorSource(component_weight_files(folder / "transformer"))
    weights = {k: source[k] for k in source}
    shapes = {k: torch.empty(v.shape, device="meta") for k, v in weights.items()}
    detected = detect_transformer(shapes, source=folder.name)
    family = detected.family
    transformer = build_transformer(family, weights, device=device, dtype=dtype)
    del weights
    vae_source = TensorSource(component_weight_files(folder / "vae"))
    vae_module = build_flow_vae({k: vae_source[k] for k in vae_source}, family, device=device, dtype=dtype)

    def component(name: str) -> dict[str, torch.Tensor] | None:
        if not isinstance(index.get(name), list) or index[name][0] is None or not (folder / name).is_dir():
            return None
        part = TensorSource(component_weight_files(folder / name))
        return {k: part[k] for k in part}

    def load_text_encoders() -> FlowTextEncoders:
        from huabi.models.text_encoders import EOS_ID

        clip_l = _clip_from_hf(component("text_encoder"), prefix="text_encoder/", activation="quick_gelu", pad_id=EOS_ID, dtype=te_dtype)
        if family.is_flux:
            t5_sd = component("text_encoder_2")
            return FlowTextEncoders(clip_l=clip_l.to(device), clip_g=None, t5=build_t5(t5_sd, device=device, dtype=te_dtype))
        clip_g = _clip_from_hf(component("text_encoder_2"), prefix="text_encoder_2/", activation="gelu", pad_id=0, dtype=te_dtype)
        t5_sd = component("text_encoder_3")
        t5 = build_t5(t5_sd, device=device, dtype=te_dtype) if t5_sd is not None else None
        return FlowTextEncoders(clip_l=clip_l.to(device), clip_g=clip_g.to(device), t5=t5)

    return FlowBundle(
        family=family, transformer=transformer, vae=vae_module, load_text_encoders=load_text_encoders,
        text_encoders=None if low_memory else load_text_encoders(), name=folder.name, path=folder,
        short_hash=None, dtype=dtype,
    )
