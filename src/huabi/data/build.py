"""Build huabi's offline captioned dataset: emoji + openclipart -> ``NAME.png`` + ``NAME.txt``.

The folder is the same layout users bring for their own training (kohya /
diffusers style): each image next to a same-stem ``.txt`` holding caption
variants, one per line. ``metadata.jsonl`` records source, codepoints or
category and captions per image; ``README.txt`` names the sources and licences.

Determinism: the same arguments give the same bytes (backgrounds are chosen
from a hash of seed and file name, never from run order). Resumable: an image
whose ``.png`` and ``.txt`` both exist is not rendered again. Every file is
written to a temp name and moved into place with ``os.replace``.

``skin_tones=False`` (``--no-skin-tones``) leaves out the 1,785 skin-tone variants of other emoji
("waving hand: medium skin tone"): near-duplicates that each take a share of a small model.

Run ``python -m huabi.data.build --out DIR [--size 128] [--sources emoji,openclipart] [--limit N] [--no-skin-tones]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageChops

from huabi.data import emoji_source, openclipart_source
from huabi.data.emoji_source import EmojiEntry, EmojiRenderer
from huabi.data.openclipart_source import ClipartEntry
from huabi.errors import HuabiError
from huabi.models.files import atomic_write_bytes

SOURCES = ("emoji", "openclipart")

# Plain backgrounds: name (as written into captions) -> RGB.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light blue": (214, 232, 248),
    "light yellow": (252, 246, 210),
    "light pink": (250, 222, 230),
    "light green": (220, 242, 220),
    "light grey": (232, 232, 232),
}

# The subject fills the square minus this margin on each side.
MARGIN_FRACTION = 1 / 16
# An image where fewer than this fraction of pixels differ from the background is "nearly empty".
MIN_CONTENT_FRACTION = 0.01
_CHUNK = 48  # items per worker task: amortises process hand-off

_README = """huabi-mini captioned dataset
============================

Built by huabi (python -m huabi.data.build) from Debian packages, offline.
Each NAME.png (RGB, square) has a NAME.txt with caption variants, one per line.
metadata.jsonl holds one JSON record per image (file, source, captions, ...).

Sources and licences
--------------------
- Emoji images: Noto Color Emoji (Debian package fonts-noto-color-emoji),
  Copyright Google Inc., SIL Open Font License 1.1.
  https://github.com/googlefonts/noto-emoji
- Emoji names, groups: Unicode emoji-test.txt (Debian package unicode-data);
  keywords: Unicode CLDR annotations (Debian package unicode-cldr-core).
  Unicode License v3, https://www.unicode.org/license.txt
- Emoji short names: PyPI package "emoji" (BSD licence).
- Clipart images and titles/keywords: Open Clip Art Library 0.18
  (Debian packages openclipart-png, openclipart-svg), public domain.
"""


@dataclass
class BuildReport:
    """What a build did. ``counts`` = images present per source after the build."""

    out_dir: Path
    written: dict[str, int] = field(default_factory=dict)  # rendered in this run
    existing: dict[str, int] = field(default_factory=dict)  # already complete, kept
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (item, reason)
    elapsed_s: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        return {s: self.written.get(s, 0) + self.existing.get(s, 0) for s in {*self.written, *self.existing}}

    def summary(self) -> str:
        parts = [f"{s}: {n} images" for s, n in sorted(self.counts.items())]
        reasons: dict[str, int] = {}
        for _item, reason in self.skipped:
            key = reason.split(":", 1)[0] if reason.startswith(("duplicate", "folder cap")) else reason.split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
        skipped = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:6])
        return (
            f"{self.out_dir}: " + "; ".join(parts)
            + f"; skipped {len(self.skipped)}" + (f" ({skipped})" if skipped else "")
            + f"; {self.elapsed_s:.1f} s"
        )


@dataclass(frozen=True)
class _Task:
    source: str
    stem: str
    entry: EmojiEntry | ClipartEntry
    background: str | None  # caption text for the background, None when only white is used
    background_rgb: tuple[int, int, int]


@dataclass(frozen=True)
class _Result:
    source: str
    stem: str
    status: str  # "written" | "existing" | "skipped"
    reason: str = ""
    record: dict | None = None


# ---------------------------------------------------------------- image helpers


def compose_square(subject: Image.Image, size_px: int, background_rgb: tuple[int, int, int]) -> Image.Image:
    """Crop ``subject`` (any mode) to its content, scale to fit with a margin, centre it on a plain square."""
    rgba = subject.convert("RGBA")
    alpha = rgba.getchannel("A")
    if alpha.getextrema()[0] < 250:
        bbox = alpha.point(lambda a: 255 if a > 8 else 0).getbbox()
    else:  # opaque drawing: its content is whatever is not near-white
        diff = ImageChops.difference(rgba.convert("RGB"), Image.new("RGB", rgba.size, (255, 255, 255)))
        bbox = diff.convert("L").point(lambda d: 255 if d > 12 else 0).getbbox()
    if bbox is None:
        raise HuabiError("blank image")
    rgba = rgba.crop(bbox)
    inner_px = max(1, round(size_px * (1 - 2 * MARGIN_FRACTION)))
    scale = inner_px / max(rgba.width, rgba.height)
    width_px, height_px = max(1, round(rgba.width * scale)), max(1, round(rgba.height * scale))
    # Pillow resizes RGBA with premultiplied alpha, so edges do not pick up dark fringes.
    rgba = rgba.resize((width_px, height_px), Image.Resampling.LANCZOS, reducing_gap=3.0)
    canvas = Image.new("RGBA", (size_px, size_px), (*background_rgb, 255))
    canvas.alpha_composite(rgba, ((size_px - width_px) // 2, (size_px - height_px) // 2))
    return canvas.convert("RGB")


def content_fraction(image: Image.Image, background_rgb: tuple[int, int, int]) -> float:
    """Fraction of pixels visibly different from the background."""
    diff = ImageChops.difference(image.convert("RGB"), Image.new("RGB", image.size, background_rgb)).convert("L")
    histogram = diff.histogram()
    return sum(histogram[24:]) / (image.width * image.height)


def _write_file(path: Path, data: bytes) -> None:
    # Atomic but not fsynced: a dataset is rebuilt from its sources, and an fsync per 20 KB file
    # cost 5-12 ms against 0.5-0.9 ms for the write itself (measured on a loaded machine).
    atomic_write_bytes(path, data, fsync=False)


def choose_background(seed: int, stem: str, backgrounds: Sequence[str]) -> str:
    """Deterministic per-image choice: depends only on seed, file stem and the list."""
    digest = hashlib.sha256(f"{seed}:{stem}".encode()).digest()
    return backgrounds[int.from_bytes(digest[:8], "big") % len(backgrounds)]


def _png_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


# ---------------------------------------------------------------- per-item work (runs in workers)


def _captions_and_record(task: _Task) -> tuple[list[str], dict]:
    if task.source == "emoji":
        entry = task.entry
        assert isinstance(entry, EmojiEntry)
        captions = emoji_source.emoji_captions(entry, task.background)
        record = {
            "codepoints": " ".join(f"U+{cp:04X}" for cp in entry.codepoints),
            "emoji": entry.text,
            "name": entry.name,
            "group": entry.group,
            "subgroup": entry.subgroup,
        }
    else:
        entry = task.entry
        assert isinstance(entry, ClipartEntry)
        meta = openclipart_source.read_svg_metadata(entry)
        captions = openclipart_source.clipart_captions(entry, meta, task.background)
        record = {"category": "/".join(entry.categories), "path": entry.rel, "title": meta.title}
    record = {"file": task.stem + ".png", "source": task.source, **record}
    record["background"] = task.background or "white"
    record["captions"] = captions
    return captions, record


def _process_chunk(args: tuple[Path, int, list[_Task]]) -> list[_Result]:
    out_dir, size_px, tasks = args
    renderer: EmojiRenderer | None = None  # opened lazily, once per chunk
    results: list[_Result] = []
    for task in tasks:
        png_path, txt_path = out_dir / f"{task.stem}.png", out_dir / f"{task.stem}.txt"
        try:
            captions, record = _captions_and_record(task)
            caption_bytes = ("\n".join(captions) + "\n").encode("utf-8")
            if png_path.is_file() and txt_path.is_file():
                if txt_path.read_bytes() != caption_bytes:  # caption rules changed: refresh text only
                    _write_file(txt_path, caption_bytes)
                results.append(_Result(task.source, task.stem, "existing", record=record))
                continue
            if task.source == "emoji":
                assert isinstance(task.entry, EmojiEntry)
                renderer = renderer or EmojiRenderer()
                subject = renderer.render(task.entry)
            else:
                assert isinstance(task.entry, ClipartEntry)
                subject = openclipart_source.load_clipart_image(task.entry)
            image = compose_square(subject, size_px, task.background_rgb)
            if content_fraction(image, task.background_rgb) < MIN_CONTENT_FRACTION:
                results.append(_Result(task.source, task.stem, "skipped", "nearly empty"))
                continue
            # PNG first, caption last: a .txt next to a .png marks the item finished.
            _write_file(png_path, _png_bytes(image))
            _write_file(txt_path, caption_bytes)
            results.append(_Result(task.source, task.stem, "written", record=record))
        except HuabiError as exc:
            if "install the Debian package" in str(exc) or "raqm" in str(exc):
                raise
            results.append(_Result(task.source, task.stem, "skipped", str(exc)))
        except (OSError, ValueError, SyntaxError) as exc:
            results.append(_Result(task.source, task.stem, "skipped", f"{type(exc).__name__}: {exc}"))
    return results


# ---------------------------------------------------------------- planning


def _evenly(items: list, limit: int | None) -> list:
    """``limit`` items spread over the whole list (a slice of every group, not just the first)."""
    if limit is None or limit >= len(items):
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


def _plan(
    source: str, limit: int | None, seed: int, backgrounds: Sequence[str], skin_tones: bool = True
) -> tuple[list[_Task], list[tuple[str, str]]]:
    skipped: list[tuple[str, str]] = []
    entries: list[EmojiEntry] | list[ClipartEntry]
    if source == "emoji":
        EmojiRenderer()  # fail early, in the parent, if the font or raqm is missing
        entries = emoji_source.load_emoji_entries()
        if not skin_tones:
            skipped += [(e.stem, "skin-tone variant") for e in entries if e.is_skin_tone_variant]
            entries = [e for e in entries if not e.is_skin_tone_variant]
    else:
        all_clipart = openclipart_source.list_clipart()
        entries = openclipart_source.cap_per_folder(all_clipart)
        kept = {e.rel for e in entries}
        skipped += [(e.rel, "folder cap") for e in all_clipart if e.rel not in kept]
        # Many drawings appear in two folders byte for byte: keep the first path.
        seen: dict[str, str] = {}
        unique: list[ClipartEntry] = []
        for entry in entries:
            if entry.png_path is None:
                unique.append(entry)
                continue
            digest = hashlib.sha1(entry.png_path.read_bytes()).hexdigest()
            if digest in seen:
                skipped.append((entry.rel, f"duplicate: same PNG as {seen[digest]}"))
                continue
            seen[digest] = entry.rel
            unique.append(entry)
        entries = unique
    tasks = []
    for entry in _evenly(list(entries), limit):
        background = choose_background(seed, entry.stem, backgrounds)
        tasks.append(
            _Task(
                source=source,
                stem=entry.stem,
                entry=entry,
                background=background if len(backgrounds) > 1 else None,
                background_rgb=BACKGROUNDS[background],
            )
        )
    return tasks, skipped


def _write_metadata(out_dir: Path, records: list[dict]) -> None:
    """Merge with an existing metadata.jsonl (by file), keep only files present, sort by file name."""
    path = out_dir / "metadata.jsonl"
    merged = {record["file"]: record for record in read_metadata(out_dir)}
    for record in records:
        merged[record["file"]] = record
    lines = [
        json.dumps(merged[name], ensure_ascii=False, sort_keys=True)
        for name in sorted(merged)
        if (out_dir / name).is_file()
    ]
    _write_file(path, ("\n".join(lines) + "\n").encode("utf-8"))


def read_metadata(folder: Path) -> list[dict]:
    """The records of a built folder's ``metadata.jsonl`` ([] when it has none)."""
    path = Path(folder) / "metadata.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _skin_tone_variants_held(out_dir: Path) -> int:
    return sum(map(emoji_source.record_is_skin_tone_variant, read_metadata(out_dir)))


def build_dataset(
    out_dir: Path,
    *,
    size_px: int = 128,
    sources: Sequence[str] = SOURCES,
    limit: int | None = None,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
    backgrounds: Sequence[str] = ("white",),
    skin_tones: bool = True,
) -> BuildReport:
    """Render the captioned dataset into ``out_dir`` (created if needed); see the module docstring.

    ``limit`` caps images per source (spread evenly over the source);
    ``backgrounds`` names colours from ``BACKGROUNDS``: with more than one, each
    image gets one chosen from ``seed`` and the sentence caption names it.
    ``skin_tones=False`` leaves out the emoji's skin-tone variants (refused for a folder that
    already holds some: a build adds to a folder, it never deletes).
    """
    started = time.monotonic()
    if isinstance(size_px, bool) or not isinstance(size_px, int) or not 8 <= size_px <= 4096:
        raise HuabiError(f"size_px must be an integer from 8 to 4096, got {size_px!r}")
    if isinstance(sources, str):
        sources = [s.strip() for s in sources.split(",") if s.strip()]
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise HuabiError(f"sources must be a non-empty subset of {', '.join(SOURCES)}, got {list(sources)!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise HuabiError(f"limit must be a positive integer or None, got {limit!r}")
    if workers < 1:
        raise HuabiError(f"workers must be at least 1, got {workers!r}")
    bad_backgrounds = [b for b in backgrounds if b not in BACKGROUNDS]
    if bad_backgrounds or not backgrounds:
        raise HuabiError(f"backgrounds must be names from {', '.join(BACKGROUNDS)}, got {list(backgrounds)!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise HuabiError(f"output path {out_dir} exists and is not a folder")
    if not skin_tones:
        held = _skin_tone_variants_held(out_dir)
        if held:
            raise HuabiError(
                f"{out_dir} already holds {held} skin-tone variants; build without them into a new folder"
            )
    out_dir.mkdir(parents=True, exist_ok=True)

    report = BuildReport(out_dir=out_dir)
    records: list[dict] = []
    for source in dict.fromkeys(sources):  # keep order, drop repeats
        tasks, skipped = _plan(source, limit, seed, list(backgrounds), skin_tones)
        report.skipped += skipped
        chunk_len = max(1, min(_CHUNK, -(-len(tasks) // (4 * workers))))  # small builds still spread over workers
        chunks = [(out_dir, size_px, tasks[i : i + chunk_len]) for i in range(0, len(tasks), chunk_len)]
        done = 0
        last_print = 0.0
        if workers > 1 and len(chunks) > 1:
            # spawn: workers import only huabi.data, never inherit a parent's torch/threads state.
            with multiprocessing.get_context("spawn").Pool(min(workers, len(chunks))) as pool:
                result_lists = pool.imap(_process_chunk, chunks)
                for results in result_lists:
                    done = _collect(report, records, results, done)
                    last_print = _progress(progress, source, done, len(tasks), started, last_print)
        else:
            for chunk in chunks:
                done = _collect(report, records, _process_chunk(chunk), done)
                last_print = _progress(progress, source, done, len(tasks), started, last_print)
        if not tasks:
            _progress(progress, source, 0, 0, started, 0.0)

    _write_metadata(out_dir, records)
    _write_file(out_dir / "README.txt", _README.encode("utf-8"))
    report.elapsed_s = time.monotonic() - started
    if progress:
        print(report.summary(), file=sys.stderr, flush=True)
    return report


def _collect(report: BuildReport, records: list[dict], results: list[_Result], done: int) -> int:
    for result in results:
        if result.status == "skipped":
            report.skipped.append((result.stem, result.reason))
            continue
        counter = report.written if result.status == "written" else report.existing
        counter[result.source] = counter.get(result.source, 0) + 1
        assert result.record is not None
        records.append(result.record)
    return done + len(results)


def _progress(enabled: bool, source: str, done: int, total: int, started: float, last: float) -> float:
    """One stderr line at most every 2 s, and always the final count."""
    now = time.monotonic()
    if enabled and (done >= total or now - last >= 2.0):
        print(f"[{source}] {done}/{total} ({now - started:.0f} s)", file=sys.stderr, flush=True)
        return now
    return last


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m huabi.data.build") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--size", type=int, default=128, help="square image side in pixels (default 128)")
    parser.add_argument("--sources", default=",".join(SOURCES), help="comma list of: emoji, openclipart")
    parser.add_argument("--limit", type=int, default=None, help="at most N images per source")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backgrounds", default="white", help=f"comma list of: {', '.join(BACKGROUNDS)}")
    parser.add_argument("--no-skin-tones", action="store_true",
                        help="leave out the skin-tone variants of emoji (1,785 near-duplicates)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    try:
        build_dataset(
            args.out,
            size_px=args.size,
            sources=[s.strip() for s in args.sources.split(",") if s.strip()],
            limit=args.limit,
            seed=args.seed,
            workers=args.workers,
            progress=not args.quiet,
            backgrounds=[b.strip() for b in args.backgrounds.split(",") if b.strip()],
            skin_tones=not args.no_skin_tones,
        )
    except HuabiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
