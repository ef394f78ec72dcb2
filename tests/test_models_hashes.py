"""A1111 model hashes: value, caching by (path, size, mtime), corrupt cache tolerance."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from huabi.errors import HuabiError
from huabi.models.hashes import HashCache, default_cache_dir, model_sha256, model_short_hash


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_short_hash_is_a1111_model_hash(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)  # more than one read chunk
    model = _write(tmp_path / "m.safetensors", data)
    cache = HashCache(tmp_path / "cache" / "hashes.json")
    assert model_short_hash(model, cache=cache) == hashlib.sha256(data).hexdigest()[:10]
    assert model_sha256(model, cache=cache) == hashlib.sha256(data).hexdigest()


def test_computed_once_then_served_from_cache(tmp_path):
    model = _write(tmp_path / "m.ckpt", b"weights" * 1000)
    cache_file = tmp_path / "hashes.json"
    first = HashCache(cache_file)
    digest = first.sha256(model)
    assert first.files_hashed == 1
    assert first.sha256(model) == digest and first.files_hashed == 1
    second = HashCache(cache_file)  # a fresh object re-reads the file: no in-memory global
    assert second.short_hash(model) == digest[:10]
    assert second.files_hashed == 0
    entry = json.loads(cache_file.read_text())[str(model.resolve())]
    assert entry["sha256"] == digest and entry["size"] == 7000


def test_recomputed_when_file_changes(tmp_path):
    model = _write(tmp_path / "m.safetensors", b"a" * 100)
    cache = HashCache(tmp_path / "hashes.json")
    old = cache.sha256(model)
    _write(model, b"b" * 100)  # same size: the mtime must tell
    stat = model.stat()
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    new = cache.sha256(model)
    assert new == hashlib.sha256(b"b" * 100).hexdigest() != old
    assert cache.files_hashed == 2


def test_corrupt_cache_is_tolerated_and_replaced(tmp_path):
    model = _write(tmp_path / "m.safetensors", b"xyz")
    cache_file = _write(tmp_path / "hashes.json", b"{ this is not json")
    cache = HashCache(cache_file)
    assert cache.sha256(model) == hashlib.sha256(b"xyz").hexdigest()
    assert str(model.resolve()) in json.loads(cache_file.read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hashes.json", "m.safetensors"]  # no temp files


def test_default_location_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HUABI_CACHE_DIR", str(tmp_path / "hc"))
    assert default_cache_dir() == tmp_path / "hc"
    model = _write(tmp_path / "m.safetensors", b"abc")
    model_short_hash(model)
    assert (tmp_path / "hc" / "hashes.json").exists()


def test_missing_file(tmp_path):
    with pytest.raises(HuabiError, match=r"nope\.safetensors: cannot hash, file not found$"):
        model_short_hash(tmp_path / "nope.safetensors", cache=HashCache(tmp_path / "h.json"))


def test_diffusers_folder_hash_is_unet_weights_hash(tmp_path):
    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    weights = _write(folder / "unet" / "diffusion_pytorch_model.safetensors", b"unet bytes")
    cache = HashCache(tmp_path / "h.json")
    assert model_short_hash(folder, cache=cache) == hashlib.sha256(weights.read_bytes()).hexdigest()[:10]
    with pytest.raises(HuabiError, match=r"empty: diffusers folder has no unet/diffusion_pytorch_model\.safetensors"):
        (tmp_path / "empty").mkdir()
        model_short_hash(tmp_path / "empty", cache=cache)
