"""What a job returns: one made image with its seed, infotext and (when saved) path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image
    seed: int
    infotext: str
    path: Path | None
