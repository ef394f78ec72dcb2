"""A user's training images, in kohya sd-scripts' folder convention.

``DATASET_DIR/`` holds sub-folders named ``N_name`` (``10_sks dog``): every image in it is
used ``N`` times per epoch, and ``name`` (``sks dog``) is the caption of an image that has
no caption file. A caption file sits beside its image with the same stem and the caption
extension (``.caption`` by default as in kohya, else ``.txt``). A folder with images but no
``N_`` sub-folders is one group with 1 repeat and no class tokens. The regularization
(class) folder for DreamBooth has the same layout; its images are marked ``is_reg``.

Unreadable images (not an image, truncated, zero-size) are skipped and counted; the count
is printed. Captions: kohya's ``--shuffle-caption`` shuffles the comma-separated tags after
the first ``--keep-tokens`` ones; ``--caption-dropout-rate`` trains that share of samples on
the empty caption (so classifier-free guidance keeps working). Both draw from the step's
seeded generator.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from huabi.errors import HuabiError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")


@dataclass(frozen=True)
class DatasetEntry:
    path: Path
    caption: str  # the caption file's text, else the folder's class tokens
    width_px: int
    height_px: int
    repeats: int
    group: str  # the folder name (kohya's subset)
    is_reg: bool = False
    has_caption_file: bool = False


@dataclass(frozen=True)
class Dataset:
    entries: tuple[DatasetEntry, ...]
    skipped: tuple[str, ...]  # unreadable image files (paths), counted and printed
    train_dirs: tuple[str, ...]
    reg_dirs: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.entries)

    def summary(self) -> str:
        train = sum(not e.is_reg for e in self.entries)
        reg = len(self.entries) - train
        repeats = sum(e.repeats for e in self.entries if not e.is_reg)
        text = f"{train} training image(s) ({repeats} with repeats)"
        if reg:
            text += f", {reg} regularization image(s)"
        text += f"; {len(self.skipped)} unreadable image(s) skipped"
        return text

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's ``ss_tag_frequency``: per folder, how often each comma-separated tag occurs."""
        out: dict[str, dict[str, int]] = {}
        for entry in self.entries:
            counts = out.setdefault(entry.group, {})
            for tag in split_tags(entry.caption):
                counts[tag] = counts.get(tag, 0) + 1
        return out


def split_tags(caption: str, separator: str = ",") -> list[str]:
    return [tag.strip() for tag in caption.split(separator) if tag.strip()]


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) if Pillow can fully decode the file, else None."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()  # decodes: a truncated file fails here, not later in training
            return int(image.width), int(image.height)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None


def _read_caption(image: Path, extensions: Sequence[str]) -> str | None:
    for extension in extensions:
        candidate = image.with_suffix(extension)
        if candidate.is_file():
            try:
                text = candidate.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise HuabiError(f"caption file {candidate} cannot be read: {exc}") from None
            return " ".join(text.strip().splitlines()[:1]).strip() if text.strip() else ""
    return None


def _groups(folder: Path) -> list[tuple[Path, int, str]]:
    """(folder, repeats, class tokens) of each kohya group in ``folder``."""
    groups = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        match = _REPEAT_FOLDER.match(child.name)
        if match:
            groups.append((child, int(match.group(1)), match.group(2).strip()))
    if not groups:
        groups.append((folder, 1, ""))
    return groups


def scan_dataset(
    train_dir: str | Path,
    *,
    reg_dir: str | Path | None = None,
    caption_extension: str = ".caption",
    class_tokens: str | None = None,
) -> Dataset:
    """Read the folders' file lists, image sizes and captions (pixels are read later, per bucket).

    ``class_tokens`` (kohya's ``--class-tokens``/DreamBooth instance prompt) replaces the
    folder-name caption of images without a caption file.
    """
    extensions = [caption_extension] + [e for e in (".caption", ".txt") if e != caption_extension]
    entries: list[DatasetEntry] = []
    skipped: list[str] = []
    folders = [(Path(train_dir), False)] + ([(Path(reg_dir), True)] if reg_dir is not None else [])
    for folder, is_reg in folders:
        what = "regularization folder" if is_reg else "dataset folder"
        if not folder.is_dir():
            raise HuabiError(f"{what} {folder} does not exist or is not a folder")
        for group_dir, repeats, tokens in _groups(folder):
            if repeats < 1:
                raise HuabiError(f"folder {group_dir.name}: the repeat count must be >= 1")
            for path in sorted(p for p in group_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
                size = _image_size(path)
                if size is None:
                    skipped.append(str(path))
                    continue
                caption = _read_caption(path, extensions)
                fallback = class_tokens if class_tokens is not None and not is_reg else tokens
                entries.append(DatasetEntry(
                    path=path, caption=caption if caption is not None else fallback, width_px=size[0],
                    height_px=size[1], repeats=repeats, group=group_dir.name if group_dir != folder else folder.name,
                    is_reg=is_reg, has_caption_file=caption is not None,
                ))
        if not any(e.is_reg == is_reg for e in entries):
            note = f" ({len(skipped)} unreadable image(s) skipped)" if skipped else ""
            raise HuabiError(f"{what} {folder} has no readable images{note}")
    return Dataset(entries=tuple(entries), skipped=tuple(skipped), train_dirs=(str(train_dir),),
                   reg_dirs=(str(reg_dir),) if reg_dir is not None else ())


def process_caption(
    caption: str,
    generator: torch.Generator,
    *,
    shuffle: bool = False,
    keep_tokens: int = 0,
    dropout_rate: float = 0.0,
    separator: str = ",",
) -> str:
    """One training caption: dropout (-> ""), then tag shuffling after ``keep_tokens`` kept tags.

    Draws the same number of random numbers whatever the outcome, so later draws of the step
    do not depend on the caption.
    """
    drop = float(torch.rand((), generator=generator)) < dropout_rate
    tags = split_tags(caption, separator)
    order = torch.randperm(max(0, len(tags) - keep_tokens), generator=generator).tolist() if shuffle else None
    if drop:
        return ""
    if shuffle and len(tags) > keep_tokens:
        kept, rest = tags[:keep_tokens], tags[keep_tokens:]
        tags = kept + [rest[i] for i in order]
        return (separator + " ").join(tags)
    return caption


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (cache keys: a changed image gets a new key)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
