"""Reading the user's small text files (prompt lists) with a size bound and clear errors.

``--prompt-file /dev/zero`` must not read forever, and a latin-1 or binary file
must be named as such, not end in a ``UnicodeDecodeError`` traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

from huabi.errors import HuabiError

MAX_PROMPT_FILE_BYTES = 16 * 2**20  # 16 MiB: about 100,000 long prompts


def read_text_file(path: str | os.PathLike[str], *, what: str, limit: int = MAX_PROMPT_FILE_BYTES) -> str:
    """The UTF-8 text of ``path`` (a leading BOM dropped), read at most ``limit`` bytes."""
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except FileNotFoundError:
        raise HuabiError(f"{what}: {path}: no such file") from None
    except IsADirectoryError:
        raise HuabiError(f"{what}: {path}: is a folder, not a text file") from None
    except OSError as error:
        raise HuabiError(f"{what}: {path}: {error.strerror or error}") from None
    if len(data) > limit:
        raise HuabiError(f"{what}: {path}: larger than huabi's limit of {limit // 2**20} MiB for a text file")
    if b"\0" in data:
        offset = data.index(b"\0")
        raise HuabiError(f"{what}: {path}: contains NUL bytes at offset {offset}: "
                         "a binary file, or text saved as UTF-16; save it as UTF-8")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise HuabiError(f"{what}: {path}: not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}); "
                         "save it as UTF-8") from None
    return text.removeprefix("\ufeff")


def read_prompt_lines(path: str | os.PathLike[str]) -> list[str]:
    """One prompt per non-empty line of a ``--prompt-file``."""
    prompts = [line.strip() for line in read_text_file(path, what="prompt file").splitlines() if line.strip()]
    if not prompts:
        raise HuabiError(f"prompt file: {path} has no prompts (it is empty)")
    return prompts
