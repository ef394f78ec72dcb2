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

import contextlib
import os
import re
import zlib
from collections.abc import Callable
from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from huabi.errors import HuabiError
from huabi.models.files import atomic_write

INFOTEXT_KEY = "parameters"
_EXIF_IFD = 0x8769  # pointer to the Exif sub-IFD
_USER_COMMENT = 0x9286
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
_LEADING_NUMBER = re.compile(r"^(\d+)")


class ClaimedImagePath(type(Path())):  # type: ignore[misc]  # PosixPath or WindowsPath
    """A numbered output name reserved by ``next_image_path``: an empty file until ``save_png`` fills it.

    The claim is the (device, inode) of that empty file; a path derived from
    this one (``.parent``, ``.with_name``...) carries no claim.
    """

    claim: tuple[int, int] | None = None

    def holds_claim(self) -> bool:
        """True while the file at this path is still the empty placeholder this path claimed."""
        if self.claim is None:
            return False
        try:
            status = os.lstat(self)
        except OSError:
            return False
        return (status.st_dev, status.st_ino) == self.claim and status.st_size == 0


def next_image_path(out_dir: str | os.PathLike[str], seed: int, prefix: str = "") -> ClaimedImagePath:
    """Claim the next free name in ``out_dir``, numbered like A1111: ``00000-1234.png``.

    The number is one more than the highest number any file in the folder
    starts with (after ``prefix-`` when a prefix is given), so numbering goes on
    after deleted files rather than filling gaps. A missing folder is created
    and starts at 0.

    The name is claimed atomically: an empty file is created with O_EXCL (the
    next number is tried if another writer got there first), so any number of
    processes writing into one folder never collide and never lose an image.
    Where the platform has ``flock`` the scan and the claim also hold a lock on
    the folder, so concurrent huabi writers never share a number either.
    ``save_png`` replaces the placeholder; ``release_claim`` removes an unused one.
    """
    lead = f"{prefix}-" if prefix else ""
    return claim_numbered_path(out_dir, lead, lambda number: f"{lead}{number:05d}-{seed}.png",
                               what=f"for seed {seed}")


def claim_numbered_path(out_dir: str | os.PathLike[str], lead: str, name: Callable[[int], str], *,
                        what: str = "") -> ClaimedImagePath:
    """Claim ``out_dir / name(N)``: N one more than the highest number a file there starts with
    (after ``lead``), created empty with O_EXCL under the folder lock (see :func:`next_image_path`);
    image names and grid names (``grid-0000.png``) both come from here."""
    folder = Path(out_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise HuabiError(f"{folder}: cannot create the output folder ({error.strerror or error})") from None
    with _folder_lock(folder):
        number = _highest_number(folder, lead) + 1
        for _attempt in range(100_000):
            candidate = ClaimedImagePath(folder / name(number))
            try:
                descriptor = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                number += 1  # another writer (or a stray file) took it: try the next number
                continue
            except OSError as error:
                raise HuabiError(f"{candidate}: cannot create the output file ({error.strerror or error})") from None
            try:
                status = os.fstat(descriptor)
            finally:
                os.close(descriptor)
            candidate.claim = (status.st_dev, status.st_ino)
            return candidate
    raise HuabiError(f"{folder}: no free numbered file name {what}".rstrip())


def release_claim(path: str | os.PathLike[str]) -> None:
    """Remove the placeholder of a ``next_image_path`` claim that will not be filled (no-op otherwise)."""
    if isinstance(path, ClaimedImagePath) and path.holds_claim():
        with contextlib.suppress(OSError):
            os.unlink(path)


def _highest_number(folder: Path, lead: str) -> int:
    highest = -1
    for entry in os.scandir(folder):
        if not entry.name.startswith(lead):
            continue
        match = _LEADING_NUMBER.match(entry.name[len(lead):])
        if match:
            highest = max(highest, int(match.group(1)))
    return highest


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An advisory lock on the folder itself (POSIX flock); nothing where that is unavailable."""
    try:
        import fcntl
    except ImportError:  # Windows: O_EXCL alone keeps names unique
        yield
        return
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def save_png(image: Image.Image, path: str | os.PathLike[str], infotext: str) -> Path:
    """Write ``image`` as a PNG with ``infotext`` in its ``parameters`` chunk.

    Creates the parent folder if needed. Raises ``HuabiError`` if ``path``
    exists (pick names with ``next_image_path``, whose empty placeholder is the
    one file this replaces) or does not end in ``.png``. The file gets the mode
    a new file would get under the umask. If anything fails, a claimed
    placeholder is released and no partial file stays.
    """
    target = path if isinstance(path, ClaimedImagePath) else Path(path)
    try:
        return _save_png(image, target, infotext)
    except BaseException:
        release_claim(target)
        raise


def _save_png(image: Image.Image, target: Path, infotext: str) -> Path:
    if target.suffix.lower() != ".png":
        raise HuabiError(f"{target}: save_png writes PNG files; give the name a .png suffix")
    if not isinstance(infotext, str):
        raise HuabiError(f"{target}: infotext must be text, got {type(infotext).__name__}")
    if "\0" in infotext:
        raise HuabiError(f"{target}: infotext contains a NUL character, which PNG text cannot hold")
    claimed = isinstance(target, ClaimedImagePath) and target.holds_claim()
    if target.exists() and not claimed:
        raise HuabiError(f"{target}: already exists; not overwriting it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise HuabiError(f"{target.parent}: cannot create the output folder ({error.strerror or error})") from None

    if image.mode not in _PNG_MODES:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    info = PngImagePlugin.PngInfo()
    info.add_text(INFOTEXT_KEY, infotext)  # tEXt if latin-1, else iTXt: what A1111 writes

    try:
        # A claimed placeholder is ours to replace; any other existing file is kept. The ".tmp"
        # suffix lets the server remove a write cut short (jobs.py's recovery).
        atomic_write(target, lambda handle: image.save(handle, format="PNG", pnginfo=info), suffix=".tmp",
                     overwrite=claimed)
    except FileExistsError:
        raise HuabiError(f"{target}: already exists; not overwriting it") from None
    except OSError as error:  # disk full, quota, I/O error: one line naming the file
        raise HuabiError(f"{target}: cannot write ({error.strerror or error})") from None
    return target


# Limits on what huabi reads from an image file (docs/limits.md). A 74-byte PNG can claim
# 60000x60000 pixels, and a few hundred KB of zTXt can inflate to gigabytes: both are
# refused before any decoding, with one line naming the file.
MAX_IMAGE_PIXELS = 2**27  # 134,217,728 pixels: e.g. 16384x8192 or 11585x11585
MAX_TEXT_CHUNK_BYTES = 2**20  # one PNG text chunk, stored or decompressed: 1 MiB (A1111 writes a few KB)
MAX_PNG_CHUNKS = 100_000  # chunks walked looking for the infotext
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")


@contextlib.contextmanager
def open_image(path: str | os.PathLike[str], *, what: str = "image"):
    """``Image.open`` with huabi's limits and one-line errors: a missing file, a folder, a
    non-image, a decompression bomb (more than ``MAX_IMAGE_PIXELS``) or a decoding failure
    inside the ``with`` block all become ``HuabiError`` naming ``what`` and the file."""
    source = Path(path).expanduser()
    named = f"{what}: {source}" if what else str(source)
    try:
        opened = Image.open(source)
    except FileNotFoundError:
        raise HuabiError(f"{named}: no such file") from None
    except IsADirectoryError:
        raise HuabiError(f"{named}: is a folder, not an image") from None
    except Image.DecompressionBombError:
        raise HuabiError(f"{named}: image is larger than huabi's limit of {MAX_IMAGE_PIXELS:,} pixels "
                         "(a decompression bomb?)") from None
    except ValueError as error:  # Pillow's own text-chunk limits
        raise HuabiError(f"{named}: not a readable image ({_first_line(error)})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise HuabiError(f"{named}: not a readable image ({type(error).__name__})") from None
    with opened:
        width, height = opened.size
        if width * height > MAX_IMAGE_PIXELS:
            raise HuabiError(f"{named}: {width}x{height} is more than huabi's limit of "
                             f"{MAX_IMAGE_PIXELS:,} pixels (a decompression bomb?)")
        try:
            yield opened
        except HuabiError:
            raise
        except Image.DecompressionBombError:
            raise HuabiError(f"{named}: image is larger than huabi's limit of {MAX_IMAGE_PIXELS:,} pixels") from None
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise HuabiError(f"{named}: not a readable image ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:160] if text else type(error).__name__


def read_infotext(path: str | os.PathLike[str]) -> str:
    """The infotext stored in an image: PNG ``parameters`` text, or JPEG/WebP EXIF UserComment.

    PNG text chunks are read by huabi itself, within ``MAX_TEXT_CHUNK_BYTES`` and
    ``MAX_PNG_CHUNKS``. Raises ``HuabiError`` naming the file if it is missing,
    not an image, over a limit, or carries no generation parameters.
    """
    source = Path(path)
    if not source.is_file():
        raise HuabiError(f"{source}: no such file")
    text = read_png_text(source, INFOTEXT_KEY)
    if text is None:
        try:
            with open_image(source, what="") as image:
                text = exif_infotext(image)
        except HuabiError as error:
            if "not a readable image (UnidentifiedImageError)" in str(error):
                raise HuabiError(f"{source}: not an image file (or one Pillow cannot read)") from None
            raise
    if not text or not text.strip():
        raise HuabiError(f"{source}: no generation parameters in this image")
    return text


def read_png_text(path: str | os.PathLike[str], key: str) -> str | None:
    """The first PNG text chunk (tEXt, zTXt or iTXt) named ``key``; None if the file is not a
    PNG or has no such chunk. Pixel data is skipped, not decoded; a chunk over
    ``MAX_TEXT_CHUNK_BYTES`` (stored or inflated) is an error, not a memory blow-up."""
    source = Path(path)
    wanted = key.encode("latin-1")
    try:
        with open(source, "rb") as handle:
            if handle.read(8) != _PNG_SIGNATURE:
                return None
            for _ in range(MAX_PNG_CHUNKS):
                head = handle.read(8)
                if len(head) < 8:
                    return None
                length = int.from_bytes(head[:4], "big")
                kind = head[4:]
                if kind == b"IEND":
                    return None
                if kind not in _TEXT_CHUNKS:
                    handle.seek(length + 4, os.SEEK_CUR)  # data and CRC
                    continue
                keyword = handle.read(min(length, 80)).split(b"\0", 1)[0]
                if keyword != wanted:
                    handle.seek(length - min(length, 80) + 4, os.SEEK_CUR)
                    continue
                if length > MAX_TEXT_CHUNK_BYTES:
                    raise HuabiError(f"{source}: the {key!r} text chunk is {length:,} bytes, more than huabi's "
                                     f"limit of {MAX_TEXT_CHUNK_BYTES:,}")
                handle.seek(-min(length, 80), os.SEEK_CUR)
                data = handle.read(length)
                if len(data) < length:
                    raise HuabiError(f"{source}: truncated PNG (the {key!r} text chunk is cut short)")
                return _decode_text_chunk(source, kind, data, key)
    except OSError as error:
        raise HuabiError(f"{source}: cannot read it ({error.strerror or error})") from None
    raise HuabiError(f"{source}: more than {MAX_PNG_CHUNKS:,} PNG chunks before the infotext; not reading on")


def _decode_text_chunk(source: Path, kind: bytes, data: bytes, key: str) -> str:
    _keyword, _, rest = data.partition(b"\0")
    if kind == b"tEXt":
        return rest.decode("latin-1")
    if kind == b"zTXt":  # compression method byte, then zlib data
        return _inflate(source, rest[1:], key).decode("latin-1")
    # iTXt: compression flag, method, language tag\0, translated keyword\0, UTF-8 text
    if len(rest) < 2:
        raise HuabiError(f"{source}: malformed iTXt chunk {key!r}")
    compressed = rest[0] == 1
    _language, _, rest = rest[2:].partition(b"\0")
    _translated, _, text = rest.partition(b"\0")
    if compressed:
        text = _inflate(source, text, key)
    return text.decode("utf-8", errors="replace")


def _inflate(source: Path, data: bytes, key: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(data, MAX_TEXT_CHUNK_BYTES)
    except zlib.error:
        raise HuabiError(f"{source}: the {key!r} text chunk is not valid compressed data") from None
    if inflater.unconsumed_tail:
        raise HuabiError(f"{source}: the {key!r} text chunk inflates to more than huabi's limit of "
                         f"{MAX_TEXT_CHUNK_BYTES:,} bytes (a compression bomb?)")
    return text


def exif_infotext(image: Image.Image) -> str | None:
    """JPEG/WebP: A1111's EXIF UserComment (or a ``parameters`` entry Pillow found)."""
    text = image.info.get(INFOTEXT_KEY)
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
