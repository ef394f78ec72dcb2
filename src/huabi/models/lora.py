"""LoRA and LyCORIS files: reading them and computing the weight changes they make.

Formats read (one file may mix module types, as LyCORIS files do):

* kohya / A1111: ``lora_unet_<module>``, ``lora_te_<module>`` (SD1/SD2) and
  ``lora_te1_``/``lora_te2_`` (SDXL's two text encoders), each module with
  ``.lora_down.weight``/``.lora_up.weight``/``.alpha`` (LoRA, LoCon for convs,
  ``.lora_mid.weight`` for LoCon's CP form), ``.hada_w1_a``... (LoHa, with
  ``hada_t1/t2`` CP), ``.lokr_w1``... (LoKr), ``.oft_diag``/``.oft_blocks`` (OFT) or
  ``.diff``/``.diff_b`` (full diffs).
  kohya names the UNet after the module tree it trained: diffusers names for
  SD1/SD2 (``down_blocks_0_attentions_0_...``), the original LDM names for SDXL
  (``input_blocks_4_1_...``); both are accepted for every family. A module's
  ``dora_scale`` (DoRA) renormalises the merged weight as A1111 does.
* diffusers / peft: ``unet.<module>.lora_A.weight``/``lora_B.weight``,
  ``text_encoder.`` / ``text_encoder_2.``, scale from the ``lora_adapter_metadata``
  that diffusers writes (else 1, as diffusers), and the older diffusers
  ``.lora.down.weight`` / ``processor.to_q_lora.down.weight`` names.

A module's change is ``delta * scale`` with A1111's scale: ``alpha / rank``
when the file has an alpha and the type has a rank, else 1. The user's
multiplier (text-encoder or UNet weight of the tag) is applied by the caller.

Nothing here touches a model's weights: :func:`resolve_lora` matches a file's
modules to a loaded model's modules (checking families and shapes), and
:func:`module_delta` computes one module's change; ``huabi.service.adapters``
applies and removes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from huabi.errors import HuabiError
from huabi.core.family import ModelFamily

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
LORA_HASH_DIGITS = 12  # A1111's "Lora hashes" short hash

log = logging.getLogger("huabi.lora")

# Per-module parameter names, as suffixes of a file key (longest first so
# ``lora.down.weight`` wins over ``down.weight``-like shorter names).
_PARAMETER_NAMES = tuple(sorted((
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "scale", "dora_scale",
    "lora_A.weight", "lora_B.weight", "lora.down.weight", "lora.up.weight",
    "lora_linear_layer.down.weight", "lora_linear_layer.up.weight",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "diff", "diff_b", "oft_diag", "oft_blocks",
), key=len, reverse=True))
# Old diffusers attention-processor names -> the module they change.
_OLD_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.")

# Slots a file key can address; which model part each means depends on the model.
UNET = "unet"
_KOHYA_PREFIXES = (("lora_unet_", UNET), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te"))
_PEFT_PREFIXES = (("unet.", UNET), ("text_encoder_2.", "text_encoder_2"), ("text_encoder.", "text_encoder"))
_SDXL_ONLY_SLOTS = frozenset({"te1", "te2", "text_encoder_2"})


@dataclass(frozen=True)
class LoraModule:
    """One module's parameters from a file, keyed by parameter name (``lora_down.weight``, ``hada_w1_a``...)."""

    key: str  # the file's module key, e.g. ``lora_unet_down_blocks_0_attentions_0_proj_in``
    slot: str  # unet, te, te1, te2, text_encoder, text_encoder_2
    path: str  # the module path in that slot, with underscores for dots (kohya style)
    params: Mapping[str, Tensor] = field(repr=False)
    alpha: float | None = None  # from the file or the peft metadata

    @property
    def kind(self) -> str:
        """LoRA (incl. LoCon), LoHa, LoKr or full; raises for a type huabi does not know."""
        names = set(self.params)
        if {"lora_down.weight", "lora_up.weight"} <= names:
            return "lora"
        if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= names:
            return "loha"
        has_1 = "lokr_w1" in names or {"lokr_w1_a", "lokr_w1_b"} <= names
        has_2 = "lokr_w2" in names or {"lokr_w2_a", "lokr_w2_b"} <= names
        if has_1 and has_2:
            return "lokr"
        if "diff" in names:
            return "full"
        if "oft_diag" in names or "oft_blocks" in names:
            return "oft"
        raise HuabiError(
            f"module {self.key} has parameters ({', '.join(sorted(names))}) of a network type huabi does not "
            "support (supported: LoRA/LoCon, LoHa, LoKr, full diff)"
        )


@dataclass(frozen=True)
class LoraFile:
    """A parsed LoRA/LyCORIS file."""

    path: Path
    modules: tuple[LoraModule, ...]
    unknown_keys: tuple[str, ...]  # keys whose module prefix huabi cannot place
    metadata: Mapping[str, str]
    short_hash: str  # A1111's "Lora hashes" value (AutoV3 for safetensors)
    format: str  # kohya or diffusers

    @property
    def name(self) -> str:
        return self.path.stem

    def family_hint(self) -> ModelFamily | None:
        """The family the file says or shows it was made for (None when it does not tell)."""
        base = str(self.metadata.get("ss_base_model_version", ""))
        arch = str(self.metadata.get("modelspec.architecture", ""))
        if base.startswith("sdxl_") or arch.startswith("stable-diffusion-xl"):
            return ModelFamily.SDXL
        if any(module.slot in _SDXL_ONLY_SLOTS for module in self.modules):
            return ModelFamily.SDXL
        if str(self.metadata.get("ss_v2", "")) == "True":
            return ModelFamily.SD2
        # Real models' cross-attention input width: what the text encoder(s) give the UNet.
        for module in self.modules:
            if module.slot == UNET and module.path.endswith(("attn2_to_k", "attn2_to_v")):
                down = module.params.get("lora_down.weight")
                width = int(down.shape[1]) if down is not None and down.ndim >= 2 else None
                return {768: ModelFamily.SD1, 1024: ModelFamily.SD2, 2048: ModelFamily.SDXL}.get(width)
        return None


# --------------------------------------------------------------------------- reading


def lora_short_hash(path: str | Path, metadata: Mapping[str, str] | None = None) -> str:
    """A1111's LoRA short hash: 12 hex digits of the kohya ``sshs_model_hash`` when the file
    records one, else of the "AutoV3" hash for safetensors (SHA-256 of the bytes after the
    header, so editing metadata keeps it) and of the whole file's SHA-256 otherwise."""
    recorded = (metadata or {}).get("sshs_model_hash")
    if recorded:
        return str(recorded)[:LORA_HASH_DIGITS]
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if path.suffix.lower() == ".safetensors":
            (header_len,) = struct.unpack("<Q", handle.read(8))
            handle.seek(8 + header_len)
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()[:LORA_HASH_DIGITS]


def _split_key(key: str) -> tuple[str, str] | None:
    """``(module key, parameter name)`` of a file key, or None if no known parameter name ends it."""
    for name in _PARAMETER_NAMES:
        if key.endswith("." + name):
            return key[: -len(name) - 1], name
    return None


def _place(module_key: str) -> tuple[str, str, str] | None:
    """``(slot, module path with underscores, format)`` or None for a prefix huabi does not know."""
    for prefix, slot in _KOHYA_PREFIXES:
        if module_key.startswith(prefix):
            return slot, _strip_text_model(module_key[len(prefix):], slot), "kohya"
    for prefix, slot in _PEFT_PREFIXES:
        if module_key.startswith(prefix):
            return slot, _strip_text_model(module_key[len(prefix):].replace(".", "_"), slot), "diffusers"
    return None


def _strip_text_model(path: str, slot: str) -> str:
    # transformers 5's CLIPTextModel has no ``text_model`` level, CLIPTextModelWithProjection has.
    if slot != UNET and path.startswith("text_model_"):
        return path[len("text_model_"):]
    return path


def _peft_alphas(metadata: Mapping[str, str]) -> dict[str, tuple[float, dict]]:
    """diffusers' ``lora_adapter_metadata``: slot -> (lora_alpha, alpha_pattern)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    result: dict[str, tuple[float, dict]] = {}
    for slot in ("unet", "text_encoder", "text_encoder_2"):
        alpha = data.get(f"{slot}.lora_alpha")
        if isinstance(alpha, (int, float)):
            pattern = data.get(f"{slot}.alpha_pattern") or {}
            result[slot] = (float(alpha), pattern if isinstance(pattern, dict) else {})
    return result


def read_lora_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The file's tensors and string metadata (safetensors, or a weights-only pickle)."""
    from huabi.models.formats import read_pickle_checkpoint, read_safetensors

    if not path.is_file():
        raise HuabiError(f"LoRA {path}: no such file")
    if path.suffix.lower() == ".safetensors":
        return read_safetensors(path)
    if path.suffix.lower() in LORA_SUFFIXES:
        return read_pickle_checkpoint(path), {}
    raise HuabiError(f"LoRA {path.name}: unsupported file type {path.suffix!r}; expected {', '.join(LORA_SUFFIXES)}")


def read_lora_file(path: str | Path) -> LoraFile:
    """Parse a LoRA/LyCORIS file (kohya/A1111 or diffusers/peft) into its modules."""
    path = Path(path)
    tensors, metadata = read_lora_tensors(path)
    groups: dict[str, dict[str, Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in tensors.items():
        normal = _OLD_PROCESSOR.sub(lambda m: "." + ("to_out.0" if m.group(1) == "to_out" else m.group(1)) + ".lora.", key)
        split = _split_key(normal)
        if split is None or _place(split[0]) is None:
            unknown.append(key)
            continue
        groups.setdefault(split[0], {})[split[1]] = tensor
    peft_alphas = _peft_alphas(metadata)
    modules: list[LoraModule] = []
    formats: set[str] = set()
    for module_key, raw in groups.items():
        slot, module_path, fmt = _place(module_key)  # type: ignore[misc]
        formats.add(fmt)
        params = dict(raw)
        # One naming for plain LoRA: peft's A/B and old diffusers' down/up are kohya's down/up.
        for down, up in (("lora_A.weight", "lora_B.weight"), ("lora.down.weight", "lora.up.weight"),
                         ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight")):
            if down in params and up in params:
                params["lora_down.weight"] = params.pop(down)
                params["lora_up.weight"] = params.pop(up)
        alpha_tensor = params.pop("alpha", None)
        alpha = float(alpha_tensor.float().reshape(-1)[0]) if alpha_tensor is not None and alpha_tensor.numel() else None
        if alpha is None and fmt == "diffusers" and slot in peft_alphas:
            alpha, pattern = peft_alphas[slot]
            dotted = module_key[len(slot) + 1:]
            for pattern_key, value in pattern.items():
                if dotted.endswith(str(pattern_key)) and isinstance(value, (int, float)):
                    alpha = float(value)
        modules.append(LoraModule(module_key, slot, module_path, params, alpha))
    if not modules and not unknown:
        raise HuabiError(f"LoRA {path.name}: the file holds no tensors")
    return LoraFile(
        path=path,
        modules=tuple(modules),
        unknown_keys=tuple(unknown),
        metadata=dict(metadata),
        short_hash=lora_short_hash(path, metadata),
        format="diffusers" if formats == {"diffusers"} else "kohya",
    )


# --------------------------------------------------------------------------- deltas


def _as_matrix(tensor: Tensor) -> Tensor:
    return tensor.reshape(tensor.shape[0], -1)


def cp_rebuild(core: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """LyCORIS's CP (Tucker) form: ``out[o, i, k, l] = sum_ab core[a, b, k, l] * left[a, o] * right[b, i]``.

    ``left`` is (rank, out), ``right`` (rank, in): how LoHa's ``hada_w*_a/b`` and
    LoKr's ``lokr_w2_a/b`` are stored next to a ``t`` core.
    """
    return torch.einsum("abkl,ao,bi->oikl", core, left, right)


def _loha_factor(params: Mapping[str, Tensor], index: int) -> Tensor:
    a, b = params[f"hada_w{index}_a"].float(), params[f"hada_w{index}_b"].float()
    core = params.get(f"hada_t{index}")
    if core is not None:
        return cp_rebuild(core.float(), a, b)
    return a @ b


def module_delta(
    module: LoraModule, weight_shape: Sequence[int], *, dyn_dim: int | None = None
) -> tuple[Tensor, Tensor | None, float]:
    """``(weight change, bias change or None, scale)`` of one module, before any multiplier.

    The change is float32 and already has ``weight_shape`` (a 1x1 conv LoRA on a
    Linear layer, or the reverse, is reshaped); ``scale`` is A1111's ``alpha / rank``
    (1 without alpha or for types without a rank). ``dyn_dim`` (A1111's ``dyn=``)
    uses only the first ranks of a plain LoRA. DoRA needs the base weight: see
    :func:`dora_change`. Raises when the numbers do not fit.
    """
    params = module.params
    kind = module.kind
    rank: int | None = None
    bias = None
    if kind == "oft":  # a rotation of the base weight: only its shape is checked here (see oft_change)
        blocks = params.get("oft_diag", params.get("oft_blocks"))
        if blocks.ndim != 3 or blocks.shape[1] != blocks.shape[2] or blocks.shape[0] * blocks.shape[1] != int(weight_shape[0]):
            raise _ShapeMismatch(tuple(blocks.shape), tuple(weight_shape))
        return torch.zeros(tuple(weight_shape)), None, 1.0
    if kind == "lora":
        down, up = params["lora_down.weight"].float(), params["lora_up.weight"].float()
        rank = int(down.shape[0])
        mid = params.get("lora_mid.weight")
        if mid is not None:  # LoCon CP: 1x1 down, kxk core, 1x1 up
            delta = torch.einsum("abkl,oa,bi->oikl", mid.float(), _as_matrix(up), _as_matrix(down))
        else:
            if _as_matrix(up).shape[1] != _as_matrix(down).shape[0]:
                raise HuabiError(f"module {module.key}: lora_up {tuple(up.shape)} and lora_down {tuple(down.shape)} ranks differ")
            up, down = _as_matrix(up), _as_matrix(down)
            if dyn_dim is not None:
                up, down = up[:, :dyn_dim], down[:dyn_dim]
            delta = up @ down
    elif kind == "loha":
        rank = int(params["hada_w1_b"].shape[0])
        first, second = _loha_factor(params, 1), _loha_factor(params, 2)
        if first.shape != second.shape:
            raise HuabiError(f"module {module.key}: LoHa factors have shapes {tuple(first.shape)} and {tuple(second.shape)}")
        delta = first * second
    elif kind == "lokr":
        if "lokr_w1" in params:
            w1 = params["lokr_w1"].float()
        else:
            w1 = params["lokr_w1_a"].float() @ params["lokr_w1_b"].float()
            rank = int(params["lokr_w1_b"].shape[0])
        if "lokr_w2" in params:
            w2 = params["lokr_w2"].float()
        else:
            a, b = params["lokr_w2_a"].float(), params["lokr_w2_b"].float()
            w2 = cp_rebuild(params["lokr_t2"].float(), a, b) if "lokr_t2" in params else a @ b
            rank = int(b.shape[0])
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2.contiguous())
        if len(weight_shape) != 4 and delta.ndim == 4:
            delta = delta.reshape(delta.shape[0], delta.shape[1])
    else:  # full
        delta = params["diff"].float()
        if "diff_b" in params:
            bias = params["diff_b"].float()
    if delta.numel() != _numel(weight_shape):
        raise _ShapeMismatch(tuple(delta.shape), tuple(weight_shape))
    scale = module.alpha / rank if module.alpha is not None and rank else 1.0
    if "scale" in params:
        scale = float(params["scale"].float().reshape(-1)[0])
    return delta.reshape(tuple(weight_shape)), bias, scale


def oft_change(module: LoraModule, base_weight: Tensor) -> Tensor:
    """OFT's weight change ``R^T W - W`` per block of output rows (LyCORIS diag-oft / kohya OFT).

    ``R`` is the constrained Cayley transform of the skew part ``Q = B - B^T`` of the stored
    blocks: ``Q`` is scaled down to Frobenius norm ``c`` when larger (``c`` = the file's alpha
    for LyCORIS ``oft_diag``, ``alpha * out_dim`` for kohya ``oft_blocks``; 0: none), then
    ``R = (I + Q)(I - Q)^-1``. (A1111 uses the first-order ``R = I + Q``; the two agree to
    second order in ``Q``.) The user's multiplier scales the change, as for other types.
    """
    kohya = "oft_blocks" in module.params and "oft_diag" not in module.params
    blocks = module.params["oft_blocks" if kohya else "oft_diag"].float().to(base_weight.device)
    base = base_weight.float()
    alpha = module.alpha or 0.0
    constraint = alpha * base.shape[0] if kohya else alpha
    skew = blocks - blocks.transpose(1, 2)
    if constraint > 0:
        norm = skew.norm()
        skew = skew * (norm.clamp(max=constraint) + 1e-8) / (norm + 1e-8)
    eye = torch.eye(blocks.shape[1], device=blocks.device).expand_as(blocks)
    rotation = (eye + skew) @ torch.linalg.inv(eye - skew)
    grouped = base.reshape(blocks.shape[0], blocks.shape[1], *base.shape[1:])
    rotated = torch.einsum("knm,kn...->km...", rotation, grouped).reshape(base.shape)
    return rotated - base


def dora_change(scaled_delta: Tensor, base_weight: Tensor, dora_scale: Tensor) -> Tensor:
    """DoRA (weight-decomposed LoRA), as A1111 applies a file's ``dora_scale``: the merged
    weight ``W + dW`` is renormalised to the stored magnitudes, and the change is what
    that adds to ``W``. The magnitudes are per input column (kohya, shape (1, in, ...))
    or per output row (LyCORIS/peft, shape (out, 1, ...)); the shape tells which."""
    base = base_weight.float()
    merged = base + _in_shape_of(scaled_delta, base)
    magnitude = dora_scale.float().to(base.device)
    out_dim, in_dim = merged.shape[0], merged.shape[1]
    if magnitude.numel() == in_dim and (magnitude.ndim < 2 or magnitude.shape[0] == 1):
        norm = merged.transpose(0, 1).reshape(in_dim, -1).norm(dim=1).reshape(1, in_dim, *[1] * (merged.ndim - 2))
        magnitude = magnitude.reshape(norm.shape)
    elif magnitude.numel() == out_dim:
        norm = merged.reshape(out_dim, -1).norm(dim=1).reshape(out_dim, *[1] * (merged.ndim - 1))
        magnitude = magnitude.reshape(norm.shape)
    else:
        raise HuabiError(f"dora_scale of shape {tuple(dora_scale.shape)} fits neither side of a {tuple(base.shape)} weight")
    return merged * (magnitude / norm) - base


def _in_shape_of(delta: Tensor, weight: Tensor) -> Tensor:
    return delta.to(device=weight.device, dtype=torch.float32).reshape(weight.shape)


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for side in shape:
        count *= int(side)
    return count


class _ShapeMismatch(HuabiError):
    def __init__(self, delta_shape: tuple, weight_shape: tuple) -> None:
        super().__init__(f"a {delta_shape} change for a {weight_shape} weight")
        self.delta_shape = delta_shape
        self.weight_shape = weight_shape


# --------------------------------------------------------------------------- matching to a model


@dataclass(frozen=True)
class ModelTarget:
    """A module of a loaded model that LoRA modules can change."""

    part: str  # "unet" or "te0", "te1" (text encoder index)
    module_path: str  # dotted path inside that part
    module: torch.nn.Module = field(repr=False, compare=False)

    @property
    def is_text_encoder(self) -> bool:
        return self.part != UNET


def _slot_parts(text_encoder_count: int) -> dict[str, str]:
    """File slot -> model part, for a model with this many text encoders."""
    if text_encoder_count == 2:  # SDXL: CLIP-L then OpenCLIP bigG
        return {UNET: UNET, "te1": "te0", "te2": "te1", "text_encoder": "te0", "text_encoder_2": "te1"}
    return {UNET: UNET, "te": "te0", "text_encoder": "te0"}


def _original_unet_names(config: Mapping) -> dict[str, str]:
    from huabi.models.convert import unet_key_table

    return {diffusers: original for original, diffusers in unet_key_table(config)}


def model_targets(unet: torch.nn.Module, text_encoders: Sequence[torch.nn.Module]) -> dict[tuple[str, str], ModelTarget]:
    """(part, underscored module name) -> target, for every module with a weight.

    The UNet is listed under its diffusers names and its original (LDM) names,
    text encoders without transformers' ``text_model`` level.
    """
    targets: dict[tuple[str, str], ModelTarget] = {}
    original = _original_unet_names(unet.config)
    for name, module in unet.named_modules():
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        target = ModelTarget(UNET, name, module)
        targets[(UNET, name.replace(".", "_"))] = target
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in original:
                renamed = ".".join([original[prefix], *parts[cut:]])
                targets.setdefault((UNET, renamed.replace(".", "_")), target)
                break
    for index, encoder in enumerate(text_encoders):
        part = f"te{index}"
        for name, module in encoder.named_modules():
            if not isinstance(getattr(module, "weight", None), torch.Tensor):
                continue
            short = name[len("text_model."):] if name.startswith("text_model.") else name
            targets[(part, short.replace(".", "_"))] = ModelTarget(part, name, module)
    return targets


@dataclass(frozen=True)
class ResolvedLora:
    """A file's modules matched to a model: ``matches`` pairs each with its target."""

    lora: LoraFile
    matches: tuple[tuple[LoraModule, ModelTarget], ...]
    unmatched: tuple[str, ...]  # file keys (modules or unknown keys) that match nothing


def _family_text(family: ModelFamily) -> str:
    return {ModelFamily.SD1: "SD1", ModelFamily.SD2: "SD2", ModelFamily.SDXL: "SDXL",
            ModelFamily.SDXL_REFINER: "SDXL refiner", ModelFamily.HUABI_MINI: "huabi-mini"}.get(family, family.value)


def resolve_lora(
    lora: LoraFile,
    *,
    family: ModelFamily,
    targets: Mapping[tuple[str, str], ModelTarget],
    text_encoder_count: int,
    model_name: str = "the model",
) -> ResolvedLora:
    """Match ``lora``'s modules to a model's ``targets``; check families and shapes.

    Errors (one line each): a LoRA made for SDXL on a one-text-encoder model or the
    reverse; a module whose change does not fit its weight (another family's
    LoRA); nothing matching at all (naming the first unmatched keys). A partial
    match is returned with ``unmatched`` set, for the caller to warn about.
    """
    where = f"LoRA '{lora.name}'"
    hint = lora.family_hint()
    slots = {module.slot for module in lora.modules}
    model_is_sdxl = text_encoder_count == 2
    if hint is not None and (hint is ModelFamily.SDXL) != (family is ModelFamily.SDXL):
        raise HuabiError(f"{where} is an {_family_text(hint)} LoRA; {model_name} is {_family_text(family)}")
    if model_is_sdxl and "te" in slots:
        raise HuabiError(
            f"{where} is an SD1/SD2 LoRA (its text-encoder keys are lora_te_*, one encoder); {model_name} is SDXL"
        )
    parts = _slot_parts(text_encoder_count)
    matches: list[tuple[LoraModule, ModelTarget]] = []
    unmatched: list[str] = list(lora.unknown_keys)
    for module in lora.modules:
        part = parts.get(module.slot)
        target = targets.get((part, module.path)) if part is not None else None
        if target is None:
            unmatched.append(module.key)
            continue
        weight = target.module.weight
        try:
            module_delta(module, tuple(weight.shape))
        except _ShapeMismatch as mismatch:
            made_for = f" (it looks made for {_family_text(hint)})" if hint is not None and hint is not family else ""
            raise HuabiError(
                f"{where} does not fit {model_name} ({_family_text(family)}){made_for}: {module.key} makes a "
                f"{mismatch.delta_shape} change for a {mismatch.weight_shape} weight"
            ) from None
        except HuabiError as err:
            raise HuabiError(f"{where}: {err}") from None
        matches.append((module, target))
    if not matches:
        shown = ", ".join(sorted(unmatched)[:3])
        made_for = f" (it looks made for {_family_text(hint)})" if hint is not None and hint is not family else ""
        raise HuabiError(
            f"{where} matches nothing in {model_name} ({_family_text(family)}){made_for}: "
            f"{len(unmatched)} unmatched keys, e.g. {shown}"
        )
    return ResolvedLora(lora, tuple(matches), tuple(unmatched))


def multiplier_for(target: ModelTarget, te_multiplier: float, unet_multiplier: float) -> float:
    return te_multiplier if target.is_text_encoder else unet_multiplier


def lora_deltas(
    resolved: Sequence[tuple[ResolvedLora, float, float] | tuple[ResolvedLora, float, float, int | None]],
) -> dict[ModelTarget, tuple[Tensor, Tensor | None]]:
    """Sum of every LoRA's change per target: ``[(resolved, te weight, unet weight[, dyn_dim])]``
    -> ``{target: (weight change, bias change or None)}``, float32, multipliers applied.
    Each LoRA's change is computed against the current (base) weights, as in A1111."""
    total: dict[ModelTarget, tuple[Tensor, Tensor | None]] = {}
    for item, te_multiplier, unet_multiplier, *rest in resolved:
        dyn_dim = rest[0] if rest else None
        for module, target in item.matches:
            multiplier = multiplier_for(target, te_multiplier, unet_multiplier)
            if multiplier == 0:
                continue
            weight = target.module.weight
            if module.kind == "oft":
                delta, bias, scale = oft_change(module, weight.detach()), None, 1.0
            else:
                delta, bias, scale = module_delta(module, tuple(weight.shape), dyn_dim=dyn_dim)
            delta = delta.to(weight.device) * scale
            if "dora_scale" in module.params:  # A1111: scale, renormalise, then the multiplier
                delta = dora_change(delta, weight.detach(), module.params["dora_scale"])
            delta = delta * multiplier
            if bias is not None:
                bias = bias.to(weight.device).reshape(-1) * multiplier
            if target in total:
                old_delta, old_bias = total[target]
                delta = old_delta + delta
                bias = old_bias if bias is None else (bias if old_bias is None else old_bias + bias)
            total[target] = (delta, bias)
    return total


def warn_unmatched(resolved: ResolvedLora) -> None:
    """Log (not raise) a partial match: real files often carry modules a given model lacks."""
    if resolved.unmatched:
        total = len(resolved.matches) + len(resolved.unmatched)
        log.warning(
            "huabi: warning: LoRA '%s': %d of %d modules match nothing in this model (e.g. %s); applied the other %d",
            resolved.lora.name, len(resolved.unmatched), total, ", ".join(sorted(resolved.unmatched)[:3]),
            len(resolved.matches),
        )
