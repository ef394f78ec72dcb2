"""Model hashes as A1111 shows them, computed once per file version and cached.

``model_short_hash(path)`` is A1111's "Model hash": the first 10 hex digits of
the SHA-256 of the whole file. Hashing a multi-GB checkpoint takes seconds,
so results are cached in a JSON file keyed by (resolved path, size, mtime):
a changed file is rehashed, an unchanged one never is.

Cache location: ``$HUABI_CACHE_DIR/hashes.json`` if that variable is set,
else ``~/.cache/huabi/hashes.json`` (``$XDG_CACHE_HOME`` honoured). There is
no module-level cache: a ``HashCache`` object is passed around, or the file is
re-read. A corrupt cache file is ignored (and replaced on the next write).

A diffusers folder's hash is the hash of its UNet weights file
(``unet/diffusion_pytorch_model.safetensors``, else ``.bin``): the UNet is what
distinguishes one fine-tune from another, and it is a single file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from huabi.errors import HuabiError

SHORT_HASH_DIGITS = 10
_CHUNK_BYTES = 1024 * 1024
_CACHE_FILE_NAME = "hashes.json"


def default_cache_dir() -> Path:
    override = os.environ.get("HUABI_CACHE_DIR")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huabi"


def hashed_file(path: str | Path) -> Path:
    """The file whose bytes are hashed for ``path`` (itself, or a diffusers folder's UNet weights)."""
    path = Path(path)
    if path.is_dir():
        from huabi.models.formats import diffusers_folder_weights_file

        return diffusers_folder_weights_file(path)
    if not path.exists():
        raise HuabiError(f"{path}: cannot hash, file not found")
    return path


def sha256_file(path: str | Path) -> str:
    """Full SHA-256 hex digest, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class HashCache:
    """SHA-256 of model files, persisted to one JSON file.

    ``files_hashed`` counts how many files this object actually read (the rest
    were served from the cache), which tests and progress messages use.
    """

    def __init__(self, cache_file: str | Path | None = None) -> None:
        self.cache_file = Path(cache_file) if cache_file is not None else default_cache_dir() / _CACHE_FILE_NAME
        self.files_hashed = 0

    def _read(self) -> dict[str, dict]:
        try:
            with open(self.cache_file, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError):  # missing or corrupt: start empty
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, entries: dict[str, dict]) -> None:
        from huabi.models.files import atomic_write_text

        try:
            atomic_write_text(self.cache_file, json.dumps(entries, indent=1, sort_keys=True))
        except OSError:
            pass  # a read-only cache dir must not stop a model from loading; we just rehash next time

    def sha256(self, path: str | Path) -> str:
        """Full SHA-256 of ``path`` (for a folder: its UNet weights), from the cache when still valid."""
        target = hashed_file(path).resolve()
        stat = target.stat()
        key = str(target)
        entries = self._read()
        entry = entries.get(key)
        if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            cached = entry.get("sha256")
            if isinstance(cached, str) and len(cached) == 64:
                return cached
        digest = sha256_file(target)
        self.files_hashed += 1
        entries = self._read()  # re-read: another process may have added entries meanwhile
        entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        self._write(entries)
        return digest

    def short_hash(self, path: str | Path) -> str:
        return self.sha256(path)[:SHORT_HASH_DIGITS]


def model_sha256(path: str | Path, *, cache: HashCache | None = None) -> str:
    return (cache if cache is not None else HashCache()).sha256(path)


def model_short_hash(path: str | Path, *, cache: HashCache | None = None) -> str:
    """A1111's "Model hash": first 10 hex digits of the file's SHA-256."""
    return model_sha256(path, cache=cache)[:SHORT_HASH_DIGITS]
