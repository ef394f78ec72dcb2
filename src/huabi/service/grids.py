"""Grids of results (Midjourney-style 2x2, X/Y/Z plots) and their A1111 file names."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from huabi.errors import HuabiError
from huabi.service.pngio import claim_numbered_path, save_png

if TYPE_CHECKING:
    from huabi.service.engine import GeneratedImage


def image_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """The images side by side in rows of ``columns`` (default ceil(sqrt(n)): 4 images make 2x2,
    as Midjourney shows them)."""
    if not images:
        raise HuabiError("grid: no images to put in a grid")
    cols = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cell_w = max(image.width for image in images)
    cell_h = max(image.height for image in images)
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h))
    for index, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((index % cols) * cell_w, (index // cols) * cell_h))
    return grid


def next_grid_path(out_dir: Path, prefix: str = "grid-") -> Path:
    """Claim the next ``<prefix>NNNN.png`` in ``out_dir``, after the highest number there (A1111's
    grid names: ``grid-0000.png``, ``xyz_grid-0000.png``), atomically as image names are claimed:
    concurrent runs never write one grid name twice. ``save_png`` fills the claim."""
    return claim_numbered_path(out_dir, prefix, lambda number: f"{prefix}{number:04d}.png", what="for a grid")


def save_grid(results: Sequence[GeneratedImage], out_dir: Path) -> Path:
    """Save the results as one grid PNG carrying the first image's infotext (as A1111 does)."""
    if not results:
        raise HuabiError("grid: no images to put in a grid")
    grid = image_grid([result.image for result in results])
    return save_png(grid, next_grid_path(out_dir), results[0].infotext)
