"""``huabi merge``: checkpoint merging as A1111's Checkpoint Merger and the MBW extensions do it.

* weighted sum:    ``A * (1 - M) + B * M``
* add difference:  ``A + (B - C) * M`` (C is usually the base B was trained from,
  so ``B - C`` is what the fine-tune learned, added to A)

Per-block weights (MBW, "merge block weighted"): the UNet's blocks get their own
M. The convention is the one of the MBW / SuperMerger extensions: SD1/SD2 have 25
weights ``IN00..IN11, M00, OUT00..OUT11`` (``input_blocks.N``, ``middle_block``,
``output_blocks.N``); SDXL has 19 ``IN00..IN08, M00, OUT00..OUT08``; any other UNet
(huabi-mini) one per input block + M00 + one per output block. Everything outside
those blocks -- the text encoders, the VAE, and the UNet's ``time_embed``/
``label_emb``/``out`` -- takes the BASE weight, which is ``--alpha`` (or the first of
N+1 values, SuperMerger's "BASE,IN00,...").

Inpainting (and instruct-pix2pix) merges, as A1111: A may be an inpainting model (9 input channels)
and B/C ordinary ones (4); the first conv's 4 latent channels are merged and A's mask and
masked-image channels kept, so ``inpaint + (custom - base) * 1`` makes an inpainting version of
a custom model.

Exactness: a weight of exactly 0 copies A's tensor and (weighted sum) exactly 1
copies B's, so M=0 / M=1 reproduce a parent bit for bit. In between the sum is
computed in float32 (float64 for float64 tensors) and stored in A's dtype, or
``dtype``. The recipe goes into ``__metadata__`` as A1111 records it
(``sd_merge_recipe``, ``sd_merge_models``), plus the block weights.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from huabi.errors import HuabiError

MODES = ("weighted-sum", "add-difference")
_A1111_MODE_NAMES = {"weighted-sum": "Weighted sum", "add-difference": "Add difference"}
UNET_PREFIX = "model.diffusion_model."
_INPUT = re.compile(r"^model\.diffusion_model\.input_blocks\.(\d+)\.")
_OUTPUT = re.compile(r"^model\.diffusion_model\.output_blocks\.(\d+)\.")
_MIDDLE = "model.diffusion_model.middle_block."
# Keys that are not weights: copied from A, never merged (A1111 also leaves them alone).
_COPY_FROM_A = ("huabi.", "v_pred")
# The UNet's first conv: 9 input channels in inpainting models, 8 in instruct-pix2pix ones.
CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"


# The multiplier M: 0..1 interpolates; a little beyond extrapolates (supermerger allows -1..2).
MIN_ALPHA, MAX_ALPHA = -1.0, 2.0


@dataclass(frozen=True)
class MergeSpec:
    mode: str
    alpha: float
    block_weights: tuple[float, ...] | None = None  # MBW weights (without BASE)
    dtype: str | None = None  # fp32 | fp16 | bf16 | None (A's dtypes)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise HuabiError(f"merge: unknown mode {self.mode!r}; valid: {', '.join(MODES)}")
        if not isinstance(self.alpha, (int, float)) or self.alpha != self.alpha:
            raise HuabiError(f"merge: alpha must be a number, got {self.alpha!r}")
        if not MIN_ALPHA <= self.alpha <= MAX_ALPHA:  # far outside this the weights are noise (or inf)
            raise HuabiError(f"merge: --alpha must be from {MIN_ALPHA:g} to {MAX_ALPHA:g}, got {self.alpha:g}")
        if self.dtype is not None and self.dtype not in ("fp32", "fp16", "bf16"):
            raise HuabiError(f"merge: unknown dtype {self.dtype!r}; valid: fp32, fp16, bf16")


@dataclass(frozen=True)
class BlockLayout:
    """How many input/output blocks the UNet has, hence the MBW labels."""

    inputs: int
    outputs: int

    @property
    def labels(self) -> list[str]:
        return [f"IN{i:02d}" for i in range(self.inputs)] + ["M00"] + [f"OUT{i:02d}" for i in range(self.outputs)]


def block_layout(state_dict: Mapping[str, torch.Tensor]) -> BlockLayout:
    inputs = {int(m.group(1)) for k in state_dict if (m := _INPUT.match(k))}
    outputs = {int(m.group(1)) for k in state_dict if (m := _OUTPUT.match(k))}
    if not inputs or not outputs:
        raise HuabiError("merge: no UNet input_blocks/output_blocks found")
    return BlockLayout(max(inputs) + 1, max(outputs) + 1)


def parse_block_weights(text: str) -> tuple[float, ...]:
    """``"0.1,0.2,..."`` -> floats (spaces allowed); a bad number is an error naming it."""
    values = []
    for index, part in enumerate(text.split(",")):
        part = part.strip()
        try:
            values.append(float(part))
        except ValueError:
            raise HuabiError(f"merge: --mbw value {index + 1} is not a number: {part!r}") from None
        if not MIN_ALPHA <= values[-1] <= MAX_ALPHA:  # also refuses nan and inf
            raise HuabiError(f"merge: --mbw value {index + 1} must be from {MIN_ALPHA:g} to {MAX_ALPHA:g}, got {part}")
    return tuple(values)


def resolve_block_weights(spec: MergeSpec, layout: BlockLayout) -> tuple[float, tuple[float, ...] | None]:
    """(BASE weight, per-block weights or None). N+1 values: the first is BASE (SuperMerger's order)."""
    if spec.block_weights is None:
        return spec.alpha, None
    count = len(layout.labels)
    weights = tuple(spec.block_weights)
    if len(weights) == count + 1:
        return weights[0], weights[1:]
    if len(weights) == count:
        return spec.alpha, weights
    raise HuabiError(
        f"merge: --mbw needs {count} weights for this UNet ({layout.labels[0]}..{layout.labels[-1]}), "
        f"or {count + 1} with BASE first; got {len(weights)}"
    )


def weight_for_key(key: str, base: float, blocks: Sequence[float] | None, layout: BlockLayout) -> float:
    if blocks is None:
        return base
    if m := _INPUT.match(key):
        return blocks[int(m.group(1))]
    if key.startswith(_MIDDLE):
        return blocks[layout.inputs]
    if m := _OUTPUT.match(key):
        return blocks[layout.inputs + 1 + int(m.group(1))]
    return base


def _check_compatible(names: Sequence[str], dicts: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """Same weight keys and shapes in every model; the first difference is named."""
    reference = dicts[0]
    for name, other in zip(names[1:], dicts[1:], strict=True):
        for key in sorted(set(reference) | set(other)):
            if key.startswith(_COPY_FROM_A) or key.startswith("model_ema.") or _is_schedule(key):
                continue
            if key not in other:
                raise HuabiError(f"merge: incompatible models: {key} is in {names[0]} but not in {name}")
            if key not in reference:
                raise HuabiError(f"merge: incompatible models: {key} is in {name} but not in {names[0]}")
            if key == CONV_IN and _extra_input_channels(reference[key], other[key]):
                continue  # inpainting/instruct A with an ordinary B (or C): merged on the shared 4 channels
            if tuple(reference[key].shape) != tuple(other[key].shape):
                raise HuabiError(
                    f"merge: incompatible models: {key} has shape {tuple(reference[key].shape)} in {names[0]} "
                    f"but {tuple(other[key].shape)} in {name}"
                )


def _extra_input_channels(a: torch.Tensor, other: torch.Tensor) -> bool:
    """A's conv_in takes more input channels (9 inpaint / 8 instruct) than the other's 4; all else equal."""
    return (
        a.ndim == 4 and other.ndim == 4 and a.shape[1] in (8, 9) and other.shape[1] == 4
        and a.shape[0] == other.shape[0] and a.shape[2:] == other.shape[2:]
    )


def _is_schedule(key: str) -> bool:
    from huabi.models.convert_file import SCHEDULE_KEYS

    return key in SCHEDULE_KEYS


def merge_state_dicts(
    tensors: Sequence[Mapping[str, torch.Tensor]],
    spec: MergeSpec,
    *,
    names: Sequence[str] = ("A", "B", "C"),
    shapes: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> tuple[dict[str, torch.Tensor], float, tuple[float, ...] | None, BlockLayout]:
    """Merge 2 (weighted sum) or 3 (add difference) original-layout state dicts.

    Returns (merged tensors, BASE weight, block weights or None, block layout).
    Keys that are not weights (markers, ``v_pred``, schedules, EMA) are A's.
    ``tensors`` may be lazy mappings (read at first use); ``shapes`` (e.g. meta
    tensors) then serve the compatibility check without reading any weight.
    """
    needed = 2 if spec.mode == "weighted-sum" else 3
    if len(tensors) != needed:
        raise HuabiError(f"merge: {spec.mode} takes {needed} models, got {len(tensors)}")
    shapes = shapes if shapes is not None else tensors
    _check_compatible(list(names)[:needed], shapes)
    layout = block_layout(shapes[0])
    base, blocks = resolve_block_weights(spec, layout)
    out_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(spec.dtype or "")
    a, b = tensors[0], tensors[1]
    c = tensors[2] if needed == 3 else None
    merged: dict[str, torch.Tensor] = {}
    for key, ta in a.items():
        if key.startswith(_COPY_FROM_A) or key.startswith("model_ema.") or _is_schedule(key) or not ta.is_floating_point():
            merged[key] = ta
            continue
        weight = weight_for_key(key, base, blocks, layout)
        tb, tc = b[key], (c[key] if c is not None else None)
        if key == CONV_IN and ta.shape != tb.shape:
            # A1111's inpainting merge: the 4 latent channels are merged, A's mask/image channels kept.
            result = ta.clone()
            result[:, :4] = _merge_tensor(spec.mode, weight, ta[:, :4], tb, tc)
        else:
            result = _merge_tensor(spec.mode, weight, ta, tb, tc)
        merged[key] = result.to(out_dtype) if out_dtype is not None else result
    return merged, base, blocks, layout


def _merge_tensor(mode: str, weight: float, ta: torch.Tensor, tb: torch.Tensor, tc: torch.Tensor | None) -> torch.Tensor:
    """One tensor of the merge, in A's dtype; exact copies at the end points."""
    if weight == 0.0:
        return ta  # exact: A itself
    if mode == "weighted-sum" and weight == 1.0:
        return tb.to(ta.dtype)  # exact: B itself
    compute = torch.float64 if ta.dtype == torch.float64 else torch.float32
    fa, fb = ta.to(compute), tb.to(compute)
    if mode == "weighted-sum":
        value = fa * (1.0 - weight) + fb * weight
    else:
        value = fa + (fb - tc.to(compute)) * weight
    return value.to(ta.dtype)


class _LazySafetensors(Mapping):
    """A safetensors file as a read-only mapping that reads each tensor when asked (merges hold one model, not three)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self._handle = safe_open(str(path), framework="pt", device="cpu")
        self._keys = list(self._handle.keys())
        self._key_set = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        return self._handle.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._key_set


def _recipe(
    spec: MergeSpec, paths: Sequence[Path], sha256s: Sequence[str], base: float, blocks: Sequence[float] | None,
    layout: BlockLayout, source_metadata: Sequence[Mapping[str, str]], in_channels: int = 4,
) -> dict[str, str]:
    """``__metadata__`` in A1111's shape (sd_merge_recipe / sd_merge_models) plus huabi's block weights."""
    recipe: dict[str, object] = {
        "type": "webui",
        "primary_model_hash": sha256s[0],
        "secondary_model_hash": sha256s[1],
        "tertiary_model_hash": sha256s[2] if len(sha256s) > 2 else None,
        "interp_method": _A1111_MODE_NAMES[spec.mode],
        "multiplier": base,
        "save_as_half": spec.dtype == "fp16",
        "custom_name": None,
        "config_source": 0,
        "bake_in_vae": "None",
        "discard_weights": "",
        "is_inpainting": in_channels == 9,
        "is_instruct_pix2pix": in_channels == 8,
    }
    if blocks is not None:
        recipe["block_weights"] = dict(zip(["BASE", *layout.labels], [base, *blocks], strict=True))
    models: dict[str, object] = {}
    for path, sha, metadata in zip(paths, sha256s, source_metadata, strict=True):
        entry: dict[str, object] = {"name": path.stem, "legacy_hash": None, "sd_merge_recipe": None}
        previous = metadata.get("sd_merge_recipe")
        if previous:
            try:
                entry["sd_merge_recipe"] = json.loads(previous)
            except ValueError:
                entry["sd_merge_recipe"] = previous
            try:  # A1111 carries the parents' parents along
                models.update(json.loads(metadata.get("sd_merge_models", "{}")))
            except ValueError:
                pass
        models[sha] = entry
    metadata = {
        "sd_merge_recipe": json.dumps(recipe),
        "sd_merge_models": json.dumps(models),
        "format": "pt",
    }
    prediction = source_metadata[0].get("modelspec.prediction_type")
    if prediction:
        metadata["modelspec.prediction_type"] = prediction
    return metadata


def merge_checkpoints(
    paths: Sequence[str | Path], spec: MergeSpec, out: str | Path, *, overwrite: bool = False
) -> tuple[Path, dict[str, str]]:
    """Read the models, check they are the same family and layout, merge, write ``out`` atomically."""
    from huabi.models.detect import detect
    from huabi.models.formats import read_state_dict_shapes, write_safetensors_atomic
    from huabi.models.hashes import HashCache

    paths = [Path(p) for p in paths]
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise HuabiError(f"merge: output {out.name} must end in .safetensors")
    for path in paths:
        if not path.exists():
            raise HuabiError(f"merge: {path}: no such file or folder")
        if path.resolve() == out.resolve():
            raise HuabiError(f"merge: output {out} is one of the inputs (inputs are never modified)")
    if out.exists() and not overwrite:
        raise HuabiError(f"merge: {out} already exists (pass --overwrite to replace it)")
    needed = 2 if spec.mode == "weighted-sum" else 3
    if len(paths) != needed:
        raise HuabiError(
            f"merge: {spec.mode} takes {needed} models (A B" + (" C" if needed == 3 else "") + f"), got {len(paths)}"
        )
    # Shapes first (safetensors: the header only); weights are read one tensor at a time while merging.
    loaded = [read_state_dict_shapes(path) for path in paths]
    families = [detect(t, metadata=m, source=p.name).family for (t, m), p in zip(loaded, paths, strict=True)]
    for path, family in zip(paths[1:], families[1:], strict=True):
        if family is not families[0]:
            raise HuabiError(
                f"merge: cannot merge {paths[0].name} ({families[0].value}) with {path.name} ({family.value}): different model families"
            )
    weights = [_LazySafetensors(p) if p.is_file() and p.suffix.lower() == ".safetensors" else t
               for p, (t, _) in zip(paths, loaded, strict=True)]
    merged, base, blocks, layout = merge_state_dicts(
        weights, spec, names=[p.name for p in paths], shapes=[t for t, _ in loaded]
    )
    cache = HashCache()
    sha256s = [cache.sha256(p) for p in paths]
    in_channels = int(merged[CONV_IN].shape[1]) if CONV_IN in merged else 4
    metadata = _recipe(spec, paths, sha256s, base, blocks, layout, [m for _, m in loaded], in_channels)
    write_safetensors_atomic(out, merged, metadata)
    return out, metadata
