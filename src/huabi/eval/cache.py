"""Disk cache of feature vectors, keyed by image content and extractor.

One SQLite file (``~/.cache/huabi/eval/features.sqlite`` or ``--cache-dir``): a row per
(extractor identity, sha256 of the image file's bytes) holding the float32 vector. The
same image in another folder, or renamed, hits the cache; an edited image or another
extractor/preprocessing misses. SQLite transactions make every write atomic, so an
interrupted run leaves only complete rows.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "huabi" / "eval"


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FeatureCache:
    """``get_many``/``put_many`` over (extractor, image hash) -> float32 vector."""

    def __init__(self, directory: Path | None = None) -> None:
        directory = Path(directory) if directory is not None else default_cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "features.sqlite"
        self._db = sqlite3.connect(self.path, timeout=60)
        self._db.execute("CREATE TABLE IF NOT EXISTS features (extractor TEXT, image TEXT, vector BLOB, PRIMARY KEY (extractor, image))")
        self._db.commit()

    def get_many(self, extractor: str, images: Sequence[str], dim: int) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(images))
        for start in range(0, len(unique), 500):  # SQLite's parameter limit
            chunk = unique[start : start + 500]
            rows = self._db.execute(
                f"SELECT image, vector FROM features WHERE extractor = ? AND image IN ({','.join('?' * len(chunk))})",
                [extractor, *chunk],
            )
            for image, blob in rows:
                vector = np.frombuffer(blob, dtype=np.float32)
                if vector.shape[0] == dim:
                    found[image] = vector
        return found

    def put_many(self, extractor: str, items: dict[str, np.ndarray]) -> None:
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO features VALUES (?, ?, ?)",
                [(extractor, image, np.ascontiguousarray(vector, dtype=np.float32).tobytes()) for image, vector in items.items()],
            )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
