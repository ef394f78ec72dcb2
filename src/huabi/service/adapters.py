"""LoRA / LyCORIS at generation time: find the files a prompt names, patch the loaded
model's weights in place, and put the base weights back bit for bit.

``<lora:name:0.8>`` (or ``<lyco:...>``) in the prompt is resolved as A1111 does:
the first number is the text-encoder weight, a second one the UNet weight
(default: the first), and ``te=``/``unet=`` override them; a missing number
means 1. Files are looked up by name (file stem) in the models folder's ``Lora/``
and ``LyCORIS/`` sub-folders, or taken as a path.

:class:`LoraPatcher` owns the patching for one engine. It changes weights in
place (``W <- W + sum_i w_i * scale_i * delta_i``, computed in float32 from a
copy of the base weight) and keeps that copy, so removing a set is a
``copy_`` of the original bits. As in A1111, a set stays applied after a
generation: the next request with the same files and weights on the same
model costs nothing; any other request (or none) restores the base first.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from huabi.core.prompt_parser import ExtraNetworkTag
from huabi.errors import HuabiError
from huabi.models.bundle import ModelBundle
from huabi.models.lora import (
    LORA_SUFFIXES,
    LoraFile,
    ModelTarget,
    lora_deltas,
    model_targets,
    read_lora_file,
    resolve_lora,
    warn_unmatched,
)
from huabi.pipelines.patches import Patch

LORA_TAG_KINDS = ("lora", "lyco")
LORA_FOLDERS = ("Lora", "LyCORIS")


@dataclass(frozen=True)
class LoraUse:
    """One LoRA as a request uses it: the name it was mentioned by, its file, its weights."""

    name: str
    path: Path
    te_weight: float = 1.0
    unet_weight: float = 1.0
    dyn_dim: int | None = None  # A1111's dyn=: use only the first ranks of plain LoRA modules


def tag_dyn_dim(tag: ExtraNetworkTag) -> int | None:
    """A1111's dynamic rank: a third number or ``dyn=N``."""
    options = dict(tag.options)
    value: float | None = tag.weights[2] if len(tag.weights) > 2 else None
    if "dyn" in options:
        value = _option_float(tag, options, "dyn", 0.0)
    if value is None:
        return None
    if value != int(value) or value < 1:
        raise HuabiError(f"prompt: <{tag.kind}:{tag.name}:...> has dyn={value:g}; a whole number of ranks from 1 belongs there")
    return int(value)


def tag_weights(tag: ExtraNetworkTag) -> tuple[float, float]:
    """(text-encoder weight, UNet weight) of a tag, A1111's rules."""
    options = dict(tag.options)
    te_weight = tag.weights[0] if tag.weights else 1.0
    te_weight = _option_float(tag, options, "te", te_weight)
    unet_weight = tag.weights[1] if len(tag.weights) > 1 else te_weight
    unet_weight = _option_float(tag, options, "unet", unet_weight)
    return te_weight, unet_weight


def _option_float(tag: ExtraNetworkTag, options: Mapping[str, str], key: str, default: float) -> float:
    if key not in options:
        return default
    try:
        return float(options[key])
    except ValueError:
        raise HuabiError(f"prompt: <{tag.kind}:{tag.name}:...> has {key}={options[key]!r}; a number belongs there") from None


def lora_folders(models_dir: Path) -> list[Path]:
    """The models folder's ``Lora/`` and ``LyCORIS/``, then huabi's built-in LoRAs (a user's file of the
    same name wins)."""
    from huabi.service.model_files import builtin_lora_dir

    return [Path(models_dir) / folder for folder in LORA_FOLDERS] + [builtin_lora_dir()]


def lora_files(folders: Sequence[Path]) -> list[Path]:
    """Every LoRA file in ``folders`` and their sub-folders, in lookup order (the folders' order, then
    sorted paths): the first file with a name is the one a prompt's tag gets. The server lists these."""
    return [path for folder in folders if folder.is_dir() for path in sorted(folder.rglob("*"))
            if path.suffix.lower() in LORA_SUFFIXES and path.is_file()]


def parse_lora_hashes(text: str | None) -> dict[str, str]:
    """An infotext's ``Lora hashes`` value (``name: hash, ...``) as {name: short hash}."""
    result: dict[str, str] = {}
    for item in (text or "").split(","):
        name, sep, short = item.rpartition(":")
        if sep and name.strip() and short.strip():
            result[name.strip()] = short.strip().lower()
    return result


def find_lora_file(name: str, folders: Sequence[Path], short_hash: str | None = None) -> Path:
    """A LoRA by path, or by file stem (or file name) in ``folders`` and their sub-folders.

    ``short_hash`` (from an image's ``Lora hashes``): when no file has the name, a file
    with that hash is used instead, as A1111 does when it reads such an image.
    """
    as_path = Path(name).expanduser()
    if ("/" in name or name.lower().endswith(LORA_SUFFIXES)) and as_path.is_file():
        return as_path
    candidates = lora_files(folders)
    for path in candidates:
        if name in (path.stem, path.name):
            return path
    if short_hash:
        from huabi.models.lora import lora_short_hash, read_lora_tensors

        for path in candidates:
            metadata = read_lora_tensors(path)[1] if path.suffix.lower() == ".safetensors" else {}
            if lora_short_hash(path, metadata) == short_hash:
                return path
    from huabi.service.model_files import builtin_lora_dir

    builtin = builtin_lora_dir()
    looked = ", ".join(str(folder) for folder in folders if folder != builtin)
    if builtin in folders:
        looked += (", " if looked else "") + "huabi's built-in LoRAs"
    raise HuabiError(f"LoRA '{name}': no such file (looked for {name}{{{','.join(LORA_SUFFIXES)}}} in {looked})")


def lora_uses(tags: Sequence[ExtraNetworkTag], folders: Sequence[Path],
              known_hashes: Mapping[str, str] | None = None) -> list[LoraUse]:
    """The LoRA tags among a prompt's extra-network tags, resolved to files
    (``known_hashes``: name -> short hash, a fallback for renamed files)."""
    uses = []
    for tag in tags:
        if tag.kind.lower() not in LORA_TAG_KINDS:
            continue
        te_weight, unet_weight = tag_weights(tag)
        short_hash = (known_hashes or {}).get(tag.name.replace(":", "").replace(",", ""))
        uses.append(LoraUse(tag.name, find_lora_file(tag.name, folders, short_hash), te_weight, unet_weight,
                            tag_dyn_dim(tag)))
    return uses


def lora_hashes_infotext(uses: Sequence[LoraUse], files: Sequence[LoraFile]) -> str | None:
    """A1111's ``Lora hashes`` value: ``name: hash, ...`` (the mentioned name without ':' and ',')."""
    items = [f"{use.name.replace(':', '').replace(',', '')}: {lora.short_hash}" for use, lora in zip(uses, files)]
    return ", ".join(items) or None


@dataclass(frozen=True)
class ActiveLoras:
    uses: tuple[LoraUse, ...]
    files: tuple[LoraFile, ...]

    @property
    def infotext_hashes(self) -> str | None:
        return lora_hashes_infotext(self.uses, self.files)


class LoraPatch(Patch):
    """The LoRAs of one job as a patch (:mod:`huabi.pipelines.patches`): ``on_model`` makes the
    model carry exactly ``uses`` (cached: a repeat costs nothing; left applied afterwards, as
    A1111 does), ``infotext`` records their hashes ("Lora hashes", None without LoRAs)."""

    def __init__(self, patcher: LoraPatcher, uses: Sequence[LoraUse]) -> None:
        self.patcher = patcher
        self.uses = tuple(uses)
        self.active = ActiveLoras((), ())

    def activate(self, bundle: ModelBundle) -> ActiveLoras:
        self.active = self.patcher.activate(bundle, self.uses)
        return self.active

    @contextlib.contextmanager
    def on_model(self, bundle: ModelBundle) -> Iterator[ModelBundle]:
        self.activate(bundle)
        yield bundle

    def infotext(self) -> dict[str, str | None]:
        return {"Lora hashes": self.active.infotext_hashes}


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


class LoraPatcher:
    """Applies a set of LoRAs to one model at a time and restores it exactly.

    Holds the model only weakly: when the engine drops a model, its backups go too.
    Parsed files are kept (by path, size and mtime) while they stay in use.
    """

    def __init__(self) -> None:
        self._bundle_ref: weakref.ref[ModelBundle] | None = None
        self._backups: dict[ModelTarget, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._applied_key: tuple | None = None
        self._active = ActiveLoras((), ())
        self._files: dict[tuple, LoraFile] = {}

    @property
    def applied(self) -> bool:
        return bool(self._backups)

    @property
    def active(self) -> ActiveLoras:
        return self._active

    def forget_released(self) -> None:
        """Drop the backups of weights that were released to the meta device (an execution
        backend holds them as a compiled graph; they come back from the model file, base
        weights, and the backend re-applies the set: :mod:`huabi.service.unet_weights`)."""
        self._backups = {target: saved for target, saved in self._backups.items()
                         if not target.module.weight.is_meta}

    def _read(self, path: Path) -> LoraFile:
        key = _file_key(path)
        if key not in self._files:
            self._files[key] = read_lora_file(path)
        return self._files[key]

    def activate(self, bundle: ModelBundle, uses: Sequence[LoraUse]) -> ActiveLoras:
        """Make ``bundle`` carry exactly ``uses`` (none: the base weights); returns what is active."""
        uses = tuple(uses)
        key = (id(bundle), tuple((_file_key(use.path), use.te_weight, use.unet_weight, use.dyn_dim) for use in uses))
        current = self._bundle_ref() if self._bundle_ref is not None else None
        if current is bundle and key == self._applied_key:
            return self._active
        self.restore()
        if not uses:
            return self._active
        from huabi.models.gguf_io import has_packed_weights

        if has_packed_weights(bundle.unet):  # weights recomputed from packed bytes: an in-place change would not stick
            raise HuabiError("LoRA: the model's GGUF weights are dequantized on the fly (--gguf-on-the-fly); "
                             "load it without that flag to use LoRAs")
        files = [self._read(use.path) for use in uses]
        targets = model_targets(bundle.unet, bundle.text_encoders)
        resolved = []
        for use, lora in zip(uses, files):
            item = resolve_lora(lora, family=bundle.family, targets=targets,
                                text_encoder_count=len(bundle.text_encoders), model_name=f"model '{bundle.name}'")
            warn_unmatched(item)
            resolved.append((item, use.te_weight, use.unet_weight, use.dyn_dim))
        deltas = lora_deltas(resolved)  # everything computed and checked before any weight changes
        self._bundle_ref = weakref.ref(bundle)
        try:
            with torch.no_grad():
                for target, (delta, bias_delta) in deltas.items():
                    weight = target.module.weight
                    if weight.is_meta:  # released (see forget_released): re-applied after the reload
                        continue
                    bias = getattr(target.module, "bias", None) if bias_delta is not None else None
                    if bias_delta is not None and not isinstance(bias, torch.Tensor):
                        raise HuabiError(f"LoRA: {target.module_path} has no bias for the file's bias change")
                    saved_bias = bias.detach().clone() if bias is not None else None
                    self._backups[target] = (weight.detach().clone(), saved_bias)
                    weight.copy_((self._backups[target][0].float() + delta).to(weight.dtype))
                    if bias is not None:
                        bias.copy_((saved_bias.float() + bias_delta).to(bias.dtype))
        except BaseException:
            self.restore()
            raise
        self._applied_key = key
        self._active = ActiveLoras(uses, tuple(files))
        # Keep parsed files only for what is in use (a long-running engine must not grow).
        in_use = {_file_key(use.path) for use in uses}
        self._files = {k: v for k, v in self._files.items() if k in in_use}
        return self._active

    def restore(self) -> None:
        """Put the base weights back (bit-identical) and forget the applied set."""
        bundle = self._bundle_ref() if self._bundle_ref is not None else None
        if bundle is not None and self._backups:
            with torch.no_grad():
                for target, (weight, bias) in self._backups.items():
                    target.module.weight.copy_(weight)
                    if bias is not None:
                        target.module.bias.copy_(bias)
        self._backups = {}
        self._bundle_ref = None
        self._applied_key = None
        self._active = ActiveLoras((), ())

    @contextlib.contextmanager
    def applied_for(self, bundle: ModelBundle, uses: Sequence[LoraUse], *, keep: bool = True) -> Iterator[ActiveLoras]:
        """``with patcher.applied_for(bundle, uses) as active:`` run with the LoRAs on.

        ``keep`` (default) leaves them applied afterwards for the next request with
        the same set; ``keep=False`` restores the base weights on exit.
        """
        active = self.activate(bundle, uses)
        try:
            yield active
        finally:
            if not keep:
                self.restore()


# --------------------------------------------------------------------------- merge-lora

_SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def merge_loras(
    base: str,
    specs: Sequence[tuple[str, tuple[float, ...]]],
    out: str | Path,
    *,
    dtype: str = "auto",
    models_dir: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Bake ``[(lora name or path, weights)]`` into ``base`` and write ``out`` (original layout).

    Weights as in a tag: none = 1, one = both parts, two = (text encoder, UNet).
    The recipe goes into the file's metadata (``sd_merge_recipe``, as A1111's
    merger names it); the inputs are only read, and ``out`` is written atomically.
    """
    import json

    from huabi.models.formats import read_state_dict_shapes
    from huabi.models.load import load_model
    from huabi.models.save import save_single_file
    from huabi.service.model_files import default_models_dir, resolve_model_path

    if dtype != "auto" and dtype not in _SAVE_DTYPES:
        raise HuabiError(f"dtype: unknown dtype {dtype!r}; valid: auto, fp32, fp16, bf16")
    if not specs:
        raise HuabiError("merge-lora: give at least one LoRA")
    models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
    base_path = resolve_model_path(base, models_dir)
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise HuabiError(f"merge-lora: --out {out.name}: huabi writes merged checkpoints as .safetensors")
    folders = lora_folders(models_dir)
    uses = []
    for name, weights in specs:
        te_weight = weights[0] if weights else 1.0
        unet_weight = weights[1] if len(weights) > 1 else te_weight
        uses.append(LoraUse(name, find_lora_file(name, folders), te_weight, unet_weight))
    inputs = [base_path, *(use.path for use in uses)]
    if out.exists() and any(out.resolve() == path.resolve() for path in inputs):
        raise HuabiError(f"merge-lora: --out {out} is one of the inputs; choose another file")
    from huabi.service.outputs import check_output_file

    check_output_file(out, overwrite=overwrite)  # before the slow part, not after it
    if dtype == "auto":
        shapes, _ = read_state_dict_shapes(base_path)
        floats = [t.dtype for t in shapes.values() if t.is_floating_point() and t.ndim > 1]
        save_dtype = max(set(floats), key=floats.count) if floats else torch.float32
    else:
        save_dtype = _SAVE_DTYPES[dtype]
    bundle = load_model(base_path, device=torch.device("cpu"), dtype=torch.float32)
    active = LoraPatcher().activate(bundle, uses)
    recipe = {
        "type": "huabi merge-lora",
        "primary_model_name": bundle.name,
        "primary_model_hash": bundle.short_hash,
        "loras": [
            {"name": use.name, "file": use.path.name, "hash": lora.short_hash,
             "te_weight": use.te_weight, "unet_weight": use.unet_weight}
            for use, lora in zip(active.uses, active.files)
        ],
        "dtype": str(save_dtype).removeprefix("torch."),
    }
    metadata = {"sd_merge_recipe": json.dumps(recipe), "huabi.lora_hashes": active.infotext_hashes or ""}
    return save_single_file(bundle, out, dtype=save_dtype, metadata=metadata)
