"""Feature vectors for a list of image files: cached, in batches, with a progress bar.

Memory is bounded by ``batch_size`` decoded images plus one chunk of file bytes; the
result is one float32 row per image (``len(paths) * dim * 4`` bytes, 8 MB for 1,000
Inception images).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from huabi.errors import HuabiError
from huabi.eval.cache import FeatureCache, content_hash
from huabi.eval.extractors import Extractor

HASH_CHUNK = 512  # files read and looked up per cache query


def _open(path: Path, data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise HuabiError(f"{path}: not a readable image ({exc})") from None
    return image


def compute_features(paths: Sequence[Path], extractor: Extractor, *, cache: FeatureCache | None = None,
                     batch_size: int = 32, progress: bool = False, description: str = "features") -> np.ndarray:
    if batch_size < 1:
        raise HuabiError(f"batch size must be >= 1, got {batch_size}")
    out = np.empty((len(paths), extractor.dim), dtype=np.float32)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc=description, unit="img", leave=False)
    try:
        for start in range(0, len(paths), HASH_CHUNK):
            chunk = list(paths[start : start + HASH_CHUNK])
            data = [p.read_bytes() for p in chunk]
            hashes = [content_hash(d) for d in data]
            cached = cache.get_many(extractor.identity, hashes, extractor.dim) if cache is not None else {}
            todo = [i for i, h in enumerate(hashes) if h not in cached]
            for i, h in enumerate(hashes):
                if h in cached:
                    out[start + i] = cached[h]
            if bar is not None:
                bar.update(len(chunk) - len(todo))
            fresh: dict[str, np.ndarray] = {}
            for batch_start in range(0, len(todo), batch_size):
                rows = todo[batch_start : batch_start + batch_size]
                batch = torch.stack([extractor.prepare(_open(chunk[i], data[i])) for i in rows])
                vectors = extractor.embed(batch)
                for i, vector in zip(rows, vectors):
                    out[start + i] = vector
                    fresh[hashes[i]] = vector
                if bar is not None:
                    bar.update(len(rows))
            if cache is not None and fresh:
                cache.put_many(extractor.identity, fresh)
    finally:
        if bar is not None:
            bar.close()
    return out
