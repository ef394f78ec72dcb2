"""Writing files safely: one atomic-write helper for bytes, text, tensors, images, copies and folders.

A crash or a full disk must never leave a half-written file under the final name: every writer
goes to a temporary file in the same folder, flushes it, and ``os.replace``s it into place (atomic
on POSIX and Windows). The temporary file gets the mode ``open()`` would have given a new file.
With ``overwrite=False`` the finished file is hard-linked into place instead, which refuses to
replace a file that appeared meanwhile (``FileExistsError``; callers say it in their own words).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO


def new_file_mode() -> int:
    """The mode ``open()`` would give a new file (0o666 minus the umask); mkstemp's temp files are 0o600."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:  # reading the umask without changing it
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str | None = None, overwrite: bool = True) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    For writers that want a file name (safetensors' ``save_file``, ``torch.save``, PIL's ``save``).
    ``suffix`` (default ``path``'s) keeps writers that look at the extension happy. With
    ``overwrite=False`` an existing ``path`` is kept and ``FileExistsError`` raised.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                         suffix=target.suffix if suffix is None else suffix)
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        os.chmod(temp, new_file_mode())
        if overwrite:
            os.replace(temp, target)
        else:
            place_new(temp, target)
    finally:
        temp.unlink(missing_ok=True)  # gone already after a successful move


def place_new(temp: Path, target: Path) -> None:
    """Move the finished ``temp`` to ``target`` unless a file is there (``FileExistsError``).

    A hard link is atomic and refuses to replace a file that appeared meanwhile; on filesystems
    without hard links: check, then rename (a tiny race remains)."""
    try:
        os.link(temp, target)
    except FileExistsError:
        raise
    except OSError:
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        os.replace(temp, target)
        return
    with contextlib.suppress(OSError):
        os.unlink(temp)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object], *, suffix: str | None = None,
                 overwrite: bool = True, fsync: bool = True) -> Path:
    """Call ``write(binary file)`` on a temporary file, flush and fsync it, then move it to ``path``.

    ``fsync=False`` for many small files that can be made again (a dataset build): the rename is
    still atomic for other processes; an fsync cost ~10x the write of a 20 KB file here."""
    with atomic_path(path, suffix=suffix, overwrite=overwrite) as temp:
        with open(temp, "wb") as handle:
            write(handle)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> Path:
    return atomic_write(path, lambda handle: handle.write(data), fsync=fsync)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode(encoding)))


def atomic_copy(source: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """``source``'s bytes under ``path`` (never a half-copied file there)."""
    with open(source, "rb") as reader:
        return atomic_write(path, lambda handle: shutil.copyfileobj(reader, handle, 1 << 20))


def atomic_torch_save(obj: object, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (training states, caches, .ckpt files)."""
    import torch

    return atomic_write(path, lambda handle: torch.save(obj, handle))


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty staging folder beside ``path``; on success it becomes ``path`` in one rename
    (an old folder there is moved aside first when ``overwrite``, else ``FileExistsError``); on
    error it is removed and ``path`` is untouched."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield staging
        if os.path.lexists(target):
            if not overwrite:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
