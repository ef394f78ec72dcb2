"""Image folders and their prompts."""

from __future__ import annotations

from pathlib import Path

from huabi.errors import HuabiError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm"}
# grids that huabi itself writes next to the images: not samples of the model
GRID_PREFIXES = ("grid-", "xyz_grid-")


def list_images(folder: str | Path, *, recursive: bool = False) -> list[Path]:
    """Sorted image files in ``folder`` (huabi's own grid images excluded)."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise HuabiError(f"{folder}: folder not found")
    if not folder.is_dir():
        raise HuabiError(f"{folder}: not a folder")
    entries = folder.rglob("*") if recursive else folder.iterdir()
    images = sorted(p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(GRID_PREFIXES))
    if not images:
        raise HuabiError(f"{folder}: no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def prompts_from_infotext(paths: list[Path]) -> list[str]:
    """Each image's prompt, from its own generation parameters (A1111 infotext)."""
    from huabi.core.infotext import parse_infotext
    from huabi.service.pngio import read_infotext

    prompts = []
    for path in paths:
        try:
            prompts.append(parse_infotext(read_infotext(path)).prompt)
        except HuabiError as exc:
            raise HuabiError(f"{exc} (CLIP score needs each image's prompt: pass --prompts FILE)") from None
    return prompts


def prompts_from_file(path: str | Path, count: int) -> list[str]:
    """One prompt per line, in the images' sorted order (blank lines ignored)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise HuabiError(f"{path}: prompts file not found")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) != count:
        raise HuabiError(f"{path.name}: {len(lines)} prompts for {count} images (one line per image, in file-name order)")
    return lines


def labels_from_file(path: str | Path) -> list[str]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise HuabiError(f"{path}: labels file not found")
    labels = list(dict.fromkeys(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()))
    if len(labels) < 2:
        raise HuabiError(f"{path.name}: need at least 2 class names, found {len(labels)}")
    return labels
