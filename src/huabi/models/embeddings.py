"""Textual-inversion embeddings: reading the files people have, matching them to a model.

An embedding is used by its file name (stem) in a prompt, as in A1111: put
``easynegative.safetensors`` in the embeddings folder and write
``easynegative`` in the (negative) prompt.  The formats read:

* A1111 ``.pt``: ``{"string_to_param": {"*": [n, D]}, "name": ..., "step": ...}``
  (read with ``torch.load(weights_only=True)`` only: a file that needs pickled
  code is refused);
* diffusers ``.bin`` / ``.pt``: ``{"<token>": [D] or [n, D]}`` (one entry);
* A1111 ``.safetensors``: ``{"emb_params": [n, D]}`` (or any single tensor);
* SDXL ``.safetensors``: ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``.

Each vector set is checked against the loaded model's text-encoder widths; a
mismatch (an SD1 embedding on SDXL, an SD2 one on SD1, ...) is a one-line
error naming the file and the widths.

Files are only read when a prompt uses their name: :class:`EmbeddingLibrary`
is a lazy mapping ``name -> (vectors per text encoder)`` that
:mod:`huabi.core.conditioning` consults.  The TI hash A1111 records is the first
12 hex digits of the file's SHA-256 (:func:`embedding_short_hash`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from huabi.errors import HuabiError
from huabi.core.family import ModelFamily
from huabi.models.formats import read_tensor_file
from huabi.models.hashes import HashCache

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
TI_HASH_DIGITS = 12  # A1111's Embedding.shorthash

# Which vector set of an SDXL-style file each of the family's encoders reads.
# Single-encoder families read the file's only set (key "").
_SDXL_KEYS: dict[ModelFamily, tuple[str, ...]] = {
    ModelFamily.SDXL: ("clip_l", "clip_g"),
    ModelFamily.SDXL_REFINER: ("clip_g",),
}
_SINGLE = ""


def default_embeddings_dir(models_dir: str | Path | None = None) -> Path:
    """``$HUABI_EMBEDDINGS_DIR``; else ``<models folder>/embeddings`` when it exists (one root
    holds everything: ``Stable-diffusion/``, ``Lora/``, ``embeddings/``... as in A1111's
    ``models/``); else ``$HUABI_HOME/embeddings``, else ``~/huabi/embeddings``."""
    override = os.environ.get("HUABI_EMBEDDINGS_DIR")
    if override:
        return Path(override)
    if models_dir is not None and (Path(models_dir).expanduser() / "embeddings").is_dir():
        return Path(models_dir).expanduser() / "embeddings"
    home = os.environ.get("HUABI_HOME")
    return (Path(home) if home else Path.home() / "huabi") / "embeddings"


def list_embedding_files(folder: str | Path) -> dict[str, Path]:
    """``name -> file`` for every embedding file under ``folder`` (recursive).

    The name is the file stem, as A1111 uses it.  When two files share a stem,
    the first in sorted path order wins, so the choice is stable.  A missing
    folder has no embeddings (the default folder need not exist).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in EMBEDDING_SUFFIXES and path.is_file() and not path.name.startswith("."):
            found.setdefault(path.stem, path)
    return found


def _as_vectors(path: Path, what: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise HuabiError(f"embedding {path.name}: {what} is a {type(value).__name__}, not a tensor")
    if not value.is_floating_point():
        raise HuabiError(f"embedding {path.name}: {what} has dtype {value.dtype}, not floating point")
    vectors = value.detach()
    if vectors.dim() == 1:  # diffusers saves one vector as [D]
        vectors = vectors.unsqueeze(0)
    if vectors.dim() != 2 or vectors.shape[0] < 1 or vectors.shape[1] < 1:
        raise HuabiError(f"embedding {path.name}: {what} has shape {list(value.shape)}, expected [n, width]")
    return vectors.to(torch.float32)


def read_embedding_file(path: str | Path) -> dict[str, Tensor]:
    """The vector sets of one embedding file, each ``[n, width]`` float32 on the CPU.

    Returns ``{"clip_l": ..., "clip_g": ...}`` for SDXL files and ``{"": ...}``
    for single-encoder files.  Errors name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise HuabiError(f"embedding {path}: no such file")
    data = read_tensor_file(path, "embedding")
    if "clip_l" in data or "clip_g" in data:
        sets = {key: _as_vectors(path, key, data[key]) for key in ("clip_l", "clip_g") if key in data}
        if len(sets) != 2:
            raise HuabiError(f"embedding {path.name}: an SDXL embedding needs both clip_l and clip_g vectors")
        if sets["clip_l"].shape[0] != sets["clip_g"].shape[0]:
            raise HuabiError(
                f"embedding {path.name}: clip_l has {sets['clip_l'].shape[0]} vectors but clip_g has "
                f"{sets['clip_g'].shape[0]}"
            )
        return sets
    if "string_to_param" in data:  # A1111 / original textual-inversion .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise HuabiError(f"embedding {path.name}: string_to_param must hold exactly one tensor")
        return {_SINGLE: _as_vectors(path, "string_to_param", next(iter(params.values())))}
    if "emb_params" in data:  # A1111 safetensors
        return {_SINGLE: _as_vectors(path, "emb_params", data["emb_params"])}
    tensors = {key: value for key, value in data.items() if isinstance(value, Tensor)}
    if len(tensors) == 1 and len(data) == 1:  # diffusers: {"<token>": vectors}
        key, value = next(iter(tensors.items()))
        return {_SINGLE: _as_vectors(path, repr(key), value)}
    raise HuabiError(
        f"embedding {path.name}: not a textual-inversion embedding (keys: {', '.join(map(str, list(data)[:5]))})"
    )


def _widths_text(sets: Mapping[str, Tensor]) -> str:
    return ", ".join(f"{key or 'width'} {vectors.shape[1]}" for key, vectors in sets.items())


def embedding_for_model(
    path: str | Path, sets: Mapping[str, Tensor], family: ModelFamily, encoder_widths: Sequence[int]
) -> tuple[Tensor, ...]:
    """Pick and check the vector set each of the model's text encoders reads."""
    path = Path(path)
    family = ModelFamily(family)
    keys = _SDXL_KEYS.get(family)
    model_text = ", ".join(str(w) for w in encoder_widths)
    if keys is None:
        if _SINGLE not in sets or len(encoder_widths) != 1:
            raise HuabiError(
                f"embedding {path.name}: is an SDXL embedding ({_widths_text(sets)}); this "
                f"{family.value} model's text encoder is {model_text} wide"
            )
        chosen = [sets[_SINGLE]]
    elif _SINGLE in sets:
        raise HuabiError(
            f"embedding {path.name}: has one vector set ({_widths_text(sets)}); this {family.value} model "
            f"needs {' and '.join(keys)} vectors ({model_text} wide)"
        )
    else:
        chosen = [sets[key] for key in keys]
    if len(chosen) != len(encoder_widths):
        raise HuabiError(f"embedding {path.name}: {len(chosen)} vector sets for {len(encoder_widths)} text encoders")
    for vectors, width in zip(chosen, encoder_widths, strict=True):
        if vectors.shape[1] != width:
            raise HuabiError(
                f"embedding {path.name}: vectors are {_widths_text(sets)} wide but this {family.value} model's "
                f"text encoder(s) are {model_text} wide"
            )
    return tuple(chosen)


def text_encoder_widths(text_encoders: Sequence[torch.nn.Module]) -> list[int]:
    """Token-embedding width of each text encoder (what an embedding's vectors must match)."""
    return [int(encoder.config.hidden_size) for encoder in text_encoders]


def embedding_short_hash(path: str | Path, *, cache: HashCache | None = None) -> str:
    """A1111's TI hash: the first 12 hex digits of the file's SHA-256 (cached)."""
    return (cache if cache is not None else HashCache()).sha256(path)[:TI_HASH_DIGITS]


class EmbeddingLibrary(Mapping[str, tuple[Tensor, ...]]):
    """The embeddings of one folder for one model, read lazily and kept once read.

    Keys are the available names (cheap: a folder listing); a file is read
    only when ``library[name]`` is asked for, i.e. when a prompt uses it.  Not
    shared between models: the width check depends on the model.
    """

    def __init__(
        self, files: Mapping[str, Path], *, family: ModelFamily, encoder_widths: Sequence[int]
    ) -> None:
        self._files = dict(files)
        self._family = ModelFamily(family)
        self._widths = [int(w) for w in encoder_widths]
        self._loaded: dict[str, tuple[Tensor, ...]] = {}

    @classmethod
    def from_folder(
        cls, folder: str | Path, *, family: ModelFamily, text_encoders: Sequence[torch.nn.Module]
    ) -> EmbeddingLibrary:
        return cls(list_embedding_files(folder), family=family, encoder_widths=text_encoder_widths(text_encoders))

    def __getitem__(self, name: str) -> tuple[Tensor, ...]:
        if name not in self._loaded:
            path = self._files[name]  # KeyError for unknown names, as a Mapping should
            sets = read_embedding_file(path)
            self._loaded[name] = embedding_for_model(path, sets, self._family, self._widths)
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def path_of(self, name: str) -> Path:
        return self._files[name]

    def ti_hashes(self, names: Sequence[str], *, cache: HashCache | None = None) -> str | None:
        """The infotext value ``"name: hash, ..."`` for the used ``names`` (None if none).

        As A1111, ':' and ',' are dropped from names so the value parses back.
        """
        cache = cache if cache is not None else HashCache()
        parts = []
        for name in names:
            clean = name.replace(":", "").replace(",", "")
            parts.append(f"{clean}: {embedding_short_hash(self._files[name], cache=cache)}")
        return ", ".join(parts) or None
