"""Read a captioned image folder: ``NAME.png`` (or .jpg/.jpeg/.webp) next to ``NAME.txt``.

This is the layout of huabi's built-in dataset and of the folders users bring
(kohya / diffusers style). Images are found recursively; each caption file
holds one caption per non-empty line (the trainer picks one line per sample;
a one-line file is just one caption). A missing caption file gives an empty
caption list (unconditional sample).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageOps

from huabi.errors import HuabiError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


class CaptionedItem(NamedTuple):
    path: Path
    captions: tuple[str, ...]


def read_captions(path: Path) -> tuple[str, ...]:
    """Non-empty, stripped lines of a UTF-8 caption file (a BOM is ignored)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise HuabiError(f"caption file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise HuabiError(f"cannot read caption file {path}: {exc.strerror or exc}") from exc
    return tuple(line.strip() for line in text.splitlines() if line.strip())


class CaptionedFolder:
    """Images under ``root`` (recursive, sorted by relative path) with their captions.

    ``caption_extension`` is the caption file suffix (kohya's ``--caption_extension``),
    ".txt" by default; ".caption" and "caption" both work.
    """

    def __init__(self, root: Path, *, caption_extension: str = ".txt") -> None:
        root = Path(root)
        if not root.exists():
            raise HuabiError(f"dataset folder {root} does not exist")
        if not root.is_dir():
            raise HuabiError(f"dataset folder {root} is not a folder")
        extension = caption_extension if caption_extension.startswith(".") else "." + caption_extension
        if extension.lower() in IMAGE_EXTENSIONS or extension == ".":
            raise HuabiError(f"caption_extension {caption_extension!r} must be a text suffix such as .txt")
        self.root = root
        self.caption_extension = extension
        images = sorted(
            (
                path
                for path in root.rglob("*")
                if path.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in path.relative_to(root).parts)  # temp/hidden
                and path.is_file()
            ),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        if not images:
            has_files = any(p.is_file() for p in root.rglob("*"))
            what = "has no images" if has_files else "is empty"
            raise HuabiError(f"dataset folder {root} {what} (expected {', '.join(IMAGE_EXTENSIONS)} files)")
        items = []
        for path in images:
            caption_path = path.with_suffix(extension)
            captions = read_captions(caption_path) if caption_path.is_file() else ()
            items.append(CaptionedItem(path, captions))
        self._items = tuple(items)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def items(self) -> tuple[CaptionedItem, ...]:
        """(path, captions) per image, in a stable order."""
        return self._items

    def load_image(self, index: int, size_px: int) -> Image.Image:
        """Image ``index`` as RGB, ``size_px`` square: EXIF-rotated, transparency on white, centre crop, resize."""
        if isinstance(size_px, bool) or not isinstance(size_px, int) or size_px < 1:
            raise HuabiError(f"size_px must be a positive integer, got {size_px!r}")
        path = self._items[index].path
        try:
            with Image.open(path) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise HuabiError(f"cannot read image {path}: {exc}") from exc
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        image = image.convert("RGB")
        side_px = min(image.width, image.height)
        left, top = (image.width - side_px) // 2, (image.height - side_px) // 2
        image = image.crop((left, top, left + side_px, top + side_px))
        if side_px != size_px:
            image = image.resize((size_px, size_px), Image.Resampling.LANCZOS, reducing_gap=3.0)
        return image
