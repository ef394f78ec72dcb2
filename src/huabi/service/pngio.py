"""Images on disk with their infotext, readable by A1111 WebUI and huabi alike.

- PNG: the infotext goes into a text chunk named ``parameters``. Like A1111
  (which uses Pillow's ``PngInfo.add_text``) it is a tEXt chunk when the text
  is latin-1 and an uncompressed iTXt chunk (UTF-8) otherwise, e.g. for
  Chinese or emoji prompts.
- JPEG/WebP (read only): A1111 stores the infotext in the EXIF UserComment tag
  as ``b"UNICODE\\0"`` followed by UTF-16 big-endian text (piexif's encoding).

Files are written atomically (a temp file in the same folder, then a link or
rename) and an existing file is never replaced.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from huabi.errors import HuabiError

INFOTEXT_KEY = "parameters"
_EXIF_IFD = 0x8769  # pointer to the Exif sub-IFD
_USER_COMMENT = 0x9286
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
_LEADING_NUMBER = re.compile(r"^(\d+)")


def next_image_path(out_dir: str | os.PathLike[str], seed: int, prefix: str = "") -> Path:
    """The next free name in ``out_dir``, numbered like A1111: ``00000-1234.png``.

    The number is one more than the highest number any file in the folder
    starts with (after ``prefix-`` when a prefix is given), so numbering goes on
    after deleted files rather than filling gaps. A missing folder starts at 0.
    """
    folder = Path(out_dir)
    lead = f"{prefix}-" if prefix else ""
    highest = -1
    if folder.is_dir():
        for entry in os.scandir(folder):
            if not entry.name.startswith(lead):
                continue
            match = _LEADING_NUMBER.match(entry.name[len(lead):])
            if match:
                highest = max(highest, int(match.group(1)))
    number = highest + 1
    while True:  # another writer may have taken the name since the scan
        candidate = folder / f"{lead}{number:05d}-{seed}.png"
        if not candidate.exists():
            return candidate
        number += 1


def save_png(image: Image.Image, path: str | os.PathLike[str], infotext: str) -> Path:
    """Write ``image`` as a PNG with ``infotext`` in its ``parameters`` chunk.

    Creates the parent folder if needed. Raises ``HuabiError`` if ``path``
    exists (pick names with ``next_image_path``) or does not end in ``.png``.
    """
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise HuabiError(f"{target}: save_png writes PNG files; give the name a .png suffix")
    if not isinstance(infotext, str):
        raise HuabiError(f"{target}: infotext must be text, got {type(infotext).__name__}")
    if "\0" in infotext:
        raise HuabiError(f"{target}: infotext contains a NUL character, which PNG text cannot hold")
    if target.exists():
        raise HuabiError(f"{target}: already exists; not overwriting it")
    target.parent.mkdir(parents=True, exist_ok=True)

    if image.mode not in _PNG_MODES:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    info = PngImagePlugin.PngInfo()
    info.add_text(INFOTEXT_KEY, infotext)  # tEXt if latin-1, else iTXt: what A1111 writes

    handle = tempfile.NamedTemporaryFile(
        dir=target.parent, prefix=f".{target.stem}.", suffix=".tmp", delete=False
    )
    temp = Path(handle.name)
    try:
        with handle:
            image.save(handle, format="PNG", pnginfo=info)
            handle.flush()
            os.fsync(handle.fileno())
        _move_without_overwrite(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return target


def _move_without_overwrite(temp: Path, target: Path) -> None:
    """Put ``temp`` at ``target`` atomically, failing if ``target`` appeared meanwhile."""
    try:
        os.link(temp, target)  # atomic and refuses to replace an existing file
    except FileExistsError:
        raise HuabiError(f"{target}: already exists; not overwriting it") from None
    except OSError:
        # Filesystems without hard links: check, then rename (a tiny race remains).
        if target.exists():
            raise HuabiError(f"{target}: already exists; not overwriting it") from None
        os.replace(temp, target)


def read_infotext(path: str | os.PathLike[str]) -> str:
    """The infotext stored in an image: PNG ``parameters`` text, or JPEG/WebP EXIF UserComment.

    Raises ``HuabiError`` naming the file if it is missing, not an image, or
    carries no generation parameters.
    """
    source = Path(path)
    if not source.is_file():
        raise HuabiError(f"{source}: no such file")
    try:
        with Image.open(source) as image:
            text = _infotext_of(image)
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise HuabiError(f"{source}: not an image file (or one Pillow cannot read)") from None
    except OSError as error:
        raise HuabiError(f"{source}: cannot read image ({error})") from None
    if not text or not text.strip():
        raise HuabiError(f"{source}: no generation parameters in this image")
    return text


def _infotext_of(image: Image.Image) -> str | None:
    text = image.info.get(INFOTEXT_KEY)
    if text is None and image.format == "PNG":
        # Text chunks after the pixel data show up only once the image is loaded.
        image.load()
        text = getattr(image, "text", {}).get(INFOTEXT_KEY)
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if text:
        return str(text)
    comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if comment is None:
        return None
    return decode_user_comment(comment)


def decode_user_comment(raw: bytes | str) -> str:
    """Decode an EXIF UserComment: an 8-byte charset tag, then the text."""
    if isinstance(raw, str):  # some readers already decoded it
        return raw
    head, body = raw[:8], raw[8:]
    if head == b"UNICODE\0":
        return _decode_utf16(body)
    if head == b"ASCII\0\0\0":
        return body.decode("ascii", errors="replace").rstrip("\0")
    if head == b"JIS\0\0\0\0\0":
        return body.decode("shift_jis", errors="replace").rstrip("\0")
    if head == b"\0" * 8:
        return body.decode("utf-8", errors="replace").rstrip("\0")
    return raw.decode("utf-8", errors="replace").rstrip("\0")


def _decode_utf16(body: bytes) -> str:
    # piexif (and so A1111) writes big-endian; some tools write little-endian.
    # For mostly-ASCII text the zero byte of each pair tells which one it is.
    if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
        return body.decode("utf-16", errors="replace").rstrip("\0")
    zeros_first = body[0::2].count(0)
    zeros_second = body[1::2].count(0)
    encoding = "utf-16-le" if zeros_second > zeros_first else "utf-16-be"
    return body.decode(encoding, errors="replace").rstrip("\0")
