"""Writing files safely: one atomic-write helper for bytes, text, tensors and images.

A crash or a full disk must never leave a half-written file under the final name: every writer
goes to a temporary file in the same folder, flushes it, and ``os.replace``s it into place (atomic
on POSIX and Windows). The temporary file gets the mode ``open()`` would have given a new file.
"""

from __future__ import annotations

import contextlib
import os
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
def atomic_path(path: str | os.PathLike[str], *, suffix: str | None = None) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    For writers that want a file name (safetensors' ``save_file``, ``torch.save``, PIL's ``save``).
    ``suffix`` (default ``path``'s) keeps writers that look at the extension happy.
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
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(binary file)`` on a temporary file, flush and fsync it, then move it to ``path``."""
    with atomic_path(path) as temp:
        with open(temp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode(encoding)))
