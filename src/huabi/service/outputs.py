"""Where outputs go: checked before any work, never replacing a file unless asked.

A careful CLI fails early: ``--out`` that is a file, lies under a file or
cannot be written is reported before a model is loaded or a step is sampled,
and an existing output file is replaced only with ``--overwrite``. Writers
here are atomic (temp file in the same folder, then a link or rename), so an
error or a full disk leaves nothing half-written.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from PIL import Image

from huabi.errors import HuabiError
from huabi.models.files import atomic_path, new_file_mode  # noqa: F401 -- new_file_mode: importable from here

# Suffix -> Pillow format for image outputs whose name the user chooses.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not os.path.lexists(probe):
        if probe.parent == probe:
            break
        probe = probe.parent
    return probe


def check_output_folder(folder: str | os.PathLike[str], *, what: str = "--out") -> Path:
    """Fail now, with one line, if files cannot be created in ``folder`` (missing folders are fine
    when they can be made). Nothing is created: writability is probed with a temp file."""
    folder = Path(folder).expanduser()
    existing = _nearest_existing(folder)
    if existing.exists() and not existing.is_dir():
        if existing == folder:
            raise HuabiError(f"{what} {folder}: is a file, not a folder")
        raise HuabiError(f"{what} {folder}: cannot create it, {existing} is a file")
    if not existing.exists():
        raise HuabiError(f"{what} {folder}: cannot create it ({existing} is a broken link)")
    try:
        handle, name = tempfile.mkstemp(prefix=".huabi-write-test-", dir=existing)
    except OSError as error:
        raise HuabiError(f"{what} {folder}: cannot write there ({error.strerror or error})") from None
    os.close(handle)
    os.unlink(name)
    return folder


def check_output_file(path: str | os.PathLike[str], *, overwrite: bool = False, what: str = "--out") -> Path:
    """Fail now if ``path`` exists (unless ``overwrite``), is a folder, or its folder is not writable."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise HuabiError(f"{what} {path}: is a folder; give a file name")
    if os.path.lexists(path) and not overwrite:
        raise HuabiError(f"{what} {path}: already exists (pass --overwrite to replace it)")
    check_output_folder(path.parent if str(path.parent) else Path("."), what=what)
    return path


def image_format_for(path: Path, *, what: str = "--out") -> str:
    """The Pillow format a file name asks for; an unknown suffix is an error, not PNG bytes in a .jpg."""
    image_format = IMAGE_FORMATS.get(path.suffix.lower())
    if image_format is None:
        raise HuabiError(f"{what} {path.name}: give the file a .png, .jpg or .webp name")
    return image_format


def save_image_file(image: Image.Image, path: str | os.PathLike[str], *, overwrite: bool = False,
                    what: str = "--out", pnginfo=None) -> Path:
    """Write ``image`` in the format its suffix names, atomically; an existing file is kept unless
    ``overwrite``. ``pnginfo`` (a ``PngInfo``): text chunks for a PNG."""
    path = Path(path).expanduser()
    image_format = image_format_for(path, what=what)
    check_output_file(path, overwrite=overwrite, what=what)
    if image_format == "JPEG" and image.mode not in ("L", "RGB", "CMYK"):
        image = image.convert("RGB")
    extra = {"pnginfo": pnginfo} if pnginfo is not None and image_format == "PNG" else {}
    try:
        with atomic_path(path, suffix=".tmp", overwrite=overwrite) as temp:
            image.save(temp, format=image_format, **extra)
    except FileExistsError:  # appeared after the check: kept
        raise HuabiError(f"{what} {path}: already exists (pass --overwrite to replace it)") from None
    except OSError as error:
        raise HuabiError(f"{what} {path}: cannot write ({error.strerror or error})") from None
    return path
