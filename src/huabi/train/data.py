"""The training set in memory: all images as one uint8 array plus every caption variant.

A captioned folder (``huabi.data.folder.CaptionedFolder``: ``NAME.png`` + ``NAME.txt``,
one caption variant per line) is decoded once into ``pixels-<size>.npy`` in the
state dir (11,900 images at 128 px are ~585 MB), so stages never re-decode PNGs.
Captions are de-duplicated into one list of unique strings; each image knows the
indices of its variants. The cache is rebuilt when the folder's file list changes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from huabi.errors import HuabiError
from huabi.models.files import atomic_path
from huabi.train.common import atomic_write_text

CLIP_CONTEXT = 77  # CLIP text positions: BOS + 75 tokens + EOS


@dataclass
class TrainingImages:
    pixels: np.ndarray  # [N, size, size, 3] uint8 (possibly memory-mapped)
    captions: list[str]  # unique caption strings; index 0 is always "" (the unconditional caption)
    caption_ids: list[list[int]]  # per image: indices into ``captions`` (empty list: no caption)
    names: list[str]  # per image: path relative to the folder

    @property
    def size_px(self) -> int:
        return int(self.pixels.shape[1])

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def batch_pixels(self, indices: torch.Tensor) -> torch.Tensor:
        """[B, 3, size, size] float in [-1, 1] (the VAE's pixel space)."""
        array = self.pixels[indices.numpy()]
        return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)

    def pick_captions(self, indices: torch.Tensor, generator: torch.Generator, dropout: float = 0.0) -> torch.Tensor:
        return pick_captions(self.caption_ids, indices, generator, dropout)


def pick_captions(caption_ids: Sequence[Sequence[int]], indices: torch.Tensor, generator: torch.Generator, dropout: float = 0.0) -> torch.Tensor:
    """One caption index per image, uniform over its variants; ``dropout`` of them become "" (index 0).

    Images without captions always get the empty caption.
    """
    draws = torch.rand(len(indices), generator=generator)
    drops = torch.rand(len(indices), generator=generator)
    picked = []
    for i, item in enumerate(indices.tolist()):
        variants = caption_ids[item]
        if not variants or drops[i].item() < dropout:
            picked.append(0)
        else:
            picked.append(variants[min(len(variants) - 1, int(draws[i].item() * len(variants)))])
    return torch.tensor(picked, dtype=torch.int64)


def _folder_signature(names: Sequence[str], captions: Sequence[Sequence[str]], size_px: int) -> str:
    digest = hashlib.sha256(f"size={size_px}\n".encode())
    for name, caps in zip(names, captions):
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update("\x1f".join(caps).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def load_training_images(
    data_dir: Path,
    size_px: int,
    cache_dir: Path | None,
    *,
    frozen: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> TrainingImages:
    """Read ``data_dir`` (decoding once into ``cache_dir`` when given).

    With ``frozen`` a complete cache in ``cache_dir`` is used as is, even if the
    folder changed since: a long multi-stage run keeps one training set (and can
    resume) while the dataset folder is being rebuilt.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    if cache_dir is not None and frozen:
        cached = _read_cache(cache_dir, size_px, signature=None)
        if cached is not None:
            return cached
    from huabi.data.folder import CaptionedFolder

    folder = CaptionedFolder(Path(data_dir))
    names = [item.path.relative_to(folder.root).as_posix() for item in folder.items]
    per_image = [list(item.captions) for item in folder.items]
    signature = _folder_signature(names, per_image, size_px)
    if cache_dir is not None:
        cached = _read_cache(cache_dir, size_px, signature=signature)
        if cached is not None:
            return cached
    log(f"[data] decoding {len(names)} images from {data_dir} at {size_px} px")
    pixels = np.empty((len(names), size_px, size_px, 3), dtype=np.uint8)
    for i in range(len(names)):
        pixels[i] = np.asarray(folder.load_image(i, size_px), dtype=np.uint8)
        if (i + 1) % 2000 == 0:
            log(f"[data] decoded {i + 1}/{len(names)}")
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache_dir / f"pixels-{size_px}.npy") as temp:  # stages decoding side by side
            np.save(temp, pixels)
        meta = {"signature": signature, "data_dir": str(data_dir), "names": names, "captions": per_image}
        atomic_write_text(cache_dir / f"pixels-{size_px}.json", json.dumps(meta))
    return _assemble(pixels, names, per_image)


def _read_cache(cache_dir: Path, size_px: int, *, signature: str | None) -> TrainingImages | None:
    array_path = cache_dir / f"pixels-{size_px}.npy"
    meta_path = cache_dir / f"pixels-{size_px}.json"
    if not (array_path.exists() and meta_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        names, per_image = list(meta["names"]), [list(c) for c in meta["captions"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if signature is not None and meta.get("signature") != signature:
        return None
    pixels = np.load(array_path, mmap_mode="r")
    if pixels.shape != (len(names), size_px, size_px, 3):
        return None
    return _assemble(pixels, names, per_image)


def _assemble(pixels: np.ndarray, names: list[str], per_image: list[list[str]]) -> TrainingImages:
    unique: dict[str, int] = {"": 0}
    caption_ids: list[list[int]] = []
    for caps in per_image:
        caption_ids.append([unique.setdefault(caption, len(unique)) for caption in caps])
    return TrainingImages(pixels=pixels, captions=list(unique), caption_ids=caption_ids, names=names)


def tokenize_captions(tokenizer, captions: Sequence[str], *, chunk: int = 4096) -> torch.Tensor:
    """[M, 77] int64 CLIP ids (BOS ... EOS, padded with the tokenizer's pad id, long captions truncated)."""
    if getattr(tokenizer, "model_max_length", CLIP_CONTEXT) < CLIP_CONTEXT:
        raise HuabiError(f"tokenizer model_max_length must be >= {CLIP_CONTEXT}")
    rows = []
    for start in range(0, len(captions), chunk):
        encoded = tokenizer(
            list(captions[start : start + chunk]),
            padding="max_length",
            max_length=CLIP_CONTEXT,
            truncation=True,
            return_tensors="pt",
        )
        rows.append(encoded["input_ids"].to(torch.int64))
    return torch.cat(rows) if rows else torch.zeros(0, CLIP_CONTEXT, dtype=torch.int64)


def default_tokenizer():
    """huabi-mini's tokenizer: the real CLIP BPE, built offline from huabi's shipped files."""
    from huabi.core.family import ModelFamily
    from huabi.models.tokenizer import load_tokenizers

    return load_tokenizers(ModelFamily.HUABI_MINI)[0]
