#!/usr/bin/env python
"""Build huabi's CLIP tokenizer files from the original BPE merge list.

Run once, offline:

    pip download --no-deps --only-binary=:all: -d /tmp/oc open_clip_torch
    python scripts/make_tokenizer.py /tmp/oc/open_clip_torch-*.whl

The argument is either an ``open_clip_torch`` wheel (the merge list is read
from ``open_clip/bpe_simple_vocab_16e6.txt.gz`` inside it, without installing
the wheel) or that ``.gz`` file itself.  The output goes to
``src/huabi/assets/tokenizer/``: ``vocab.json`` (token -> id) and
``merges.txt`` (the ``transformers``/``tokenizers`` BPE format).

The vocabulary is laid out exactly as OpenAI's CLIP builds it at run time:
the 256 byte symbols, the same 256 symbols with the end-of-word marker
``</w>``, one token per merge (first 48,894 merges of the file), then
``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): 49,408 in all.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path

VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894 merges are used; the file holds more
GZ_NAME_IN_WHEEL = "open_clip/bpe_simple_vocab_16e6.txt.gz"
OUT_DIR = Path(__file__).resolve().parents[1] / "src" / "huabi" / "assets" / "tokenizer"


def byte_symbols() -> list[str]:
    """One printable unicode character per byte value, in byte order.

    Printable latin-1 bytes stand for themselves; the others (control codes,
    space, ...) are moved up to 256+n so no symbol is whitespace.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = 0
    code_for_byte: dict[int, int] = {}
    for byte in range(256):
        if byte in printable:
            code_for_byte[byte] = byte
        else:
            code_for_byte[byte] = 256 + shifted
            shifted += 1
    # CLIP orders the base vocabulary printable bytes first, then the shifted ones.
    order = printable + [b for b in range(256) if b not in printable]
    return [chr(code_for_byte[b]) for b in order]


def read_merge_lines(source: Path) -> list[str]:
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as wheel:
            raw = gzip.decompress(wheel.read(GZ_NAME_IN_WHEEL))
    else:
        with gzip.open(source, "rb") as fh:
            raw = fh.read()
    lines = raw.decode("utf-8").split("\n")
    # Line 0 is a version header; the merges follow, one "left right" pair a line.
    merges = lines[1 : 1 + N_MERGES]
    if len(merges) != N_MERGES or any(len(m.split()) != 2 for m in merges):
        raise SystemExit(f"{source}: not a CLIP BPE merge list (expected {N_MERGES} 'a b' lines after the header)")
    return merges


def build_vocab(merges: list[str]) -> dict[str, int]:
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise SystemExit(f"vocabulary has {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are shipped data files
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="open_clip_torch wheel or bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"output folder (default {OUT_DIR})")
    args = parser.parse_args(argv)

    merges = read_merge_lines(args.source)
    vocab = build_vocab(merges)
    write_atomic(args.out / "vocab.json", json.dumps(vocab, ensure_ascii=False, separators=(",", ":")) + "\n")
    write_atomic(args.out / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
