"""Openclipart drawings as captioned images (Debian ``openclipart-png`` / ``openclipart-svg``).

The PNG tree ``/usr/share/openclipart/png/<category>/<sub>/name.png`` mirrors
the SVG tree. Captions come from the SVG's RDF metadata (the work's
``dc:title``, ``dc:description`` and ``dc:subject`` keywords), then the file
name (author suffixes stripped) and the category folders. Pixels come from the
PNG; the SVG is rasterised with cairosvg only when the PNG is missing, tiny
or enormous.
"""

from __future__ import annotations

import html
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from huabi.data.emoji_source import clean_words, noun_phrase
from huabi.errors import HuabiError

OPENCLIPART_ROOT = Path("/usr/share/openclipart")

# PNGs outside this range are rendered from the SVG instead: a few are
# 3x2 px stubs, a few are 20990x29700 px (2.5 GB decoded).
MIN_PNG_SIDE_PX = 48
MAX_PNG_PIXELS = 4_000_000
SVG_RENDER_SIDE_PX = 512
MAX_PER_FOLDER = 300

# Keywords that describe the archive rather than the picture.
_JUNK_KEYWORDS = {
    "", "unsorted", "clip art", "clipart", "clip-art", "openclipart", "open clip art", "public domain",
    "svg", "png", "image", "media", "hash", "inkscape", "drawing", "picture", "remix", "new", "other", "misc",
}
_JUNK_TITLES = {"", "untitled", "open clip art library", "open clip art project", "svg", "drawing", "image"}
# Titles that name a collection (hundreds of files share them) rather than the drawing.
_COLLECTION_RE = re.compile(
    r"collection|icon ?set|theme|\bicons\b|cliparts|symbol signs|road signs|map symbols|\bmaps\b|"
    r"sibmission|homes clipart|simple arrows|^advertising$|elements|gramastar|^clipart by",
    re.I,
)
_CLIPART_BY_RE = re.compile(r"^clipart by [^-]+ - (.+)$", re.I)
_JUNK_DESCRIPTION_RE = re.compile(r"@|https?:|^HASH\(|collection|converted", re.I)
_METADATA_RE = re.compile(r"<metadata\b.*?</metadata>", re.S)
_WORK_RE = re.compile(r"<cc:Work\b.*?</cc:Work>", re.S)
_AGENT_RE = re.compile(r"<cc:Agent\b.*?</cc:Agent>", re.S)
_TAG_RE = re.compile(r"<[^>]+>")


@dataclass(frozen=True)
class ClipartEntry:
    """One drawing: its relative path (``science/medicine/siringa_architetto_franc_01``) and files."""

    rel: str
    png_path: Path | None
    svg_path: Path | None

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(self.rel.split("/")[:-1])

    @property
    def file_stem(self) -> str:
        return self.rel.split("/")[-1]

    @property
    def stem(self) -> str:
        """Dataset file stem, e.g. ``clipart-science-medicine-siringa_architetto_franc_01``."""
        raw = "clipart-" + self.rel.replace("/", "-")
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", raw)
        if safe != raw:  # keep "viewmag+" and "viewmag_" apart
            safe += "-" + "".join(f"{ord(ch):x}" for ch in raw if not re.match(r"[A-Za-z0-9_.-]", ch))[:16]
        return safe


@dataclass(frozen=True)
class SvgMetadata:
    title: str = ""
    description: str = ""
    keywords: tuple[str, ...] = ()
    creator: str = ""


def list_clipart(root: Path = OPENCLIPART_ROOT) -> list[ClipartEntry]:
    """Every drawing under ``root/png`` and ``root/svg``, sorted by relative path."""
    root = Path(root)
    png_root, svg_root = root / "png", root / "svg"
    if not png_root.is_dir():
        raise HuabiError(
            f"{png_root} not found: install the Debian package openclipart-png (apt-get install openclipart-png)"
        )
    if not svg_root.is_dir():
        raise HuabiError(
            f"{svg_root} not found: install the Debian package openclipart-svg (apt-get install openclipart-svg)"
        )
    pngs = {p.relative_to(png_root).with_suffix("").as_posix(): p for p in png_root.rglob("*.png") if p.is_file()}
    svgs = {p.relative_to(svg_root).with_suffix("").as_posix(): p for p in svg_root.rglob("*.svg") if p.is_file()}
    return [ClipartEntry(rel, pngs.get(rel), svgs.get(rel)) for rel in sorted(set(pngs) | set(svgs))]


def cap_per_folder(entries: list[ClipartEntry], max_per_folder: int = MAX_PER_FOLDER) -> list[ClipartEntry]:
    """At most ``max_per_folder`` drawings per folder, evenly spaced, order kept.

    shapes/stars alone holds ~1,400 near-identical generated stars; uncapped it
    would be a sixth of the clipart.
    """
    by_folder: dict[tuple[str, ...], list[ClipartEntry]] = {}
    for entry in entries:
        by_folder.setdefault(entry.categories, []).append(entry)
    keep: set[str] = set()
    for members in by_folder.values():
        count = len(members)
        picks = range(count) if count <= max_per_folder else (i * count // max_per_folder for i in range(max_per_folder))
        keep.update(members[i].rel for i in picks)
    return [entry for entry in entries if entry.rel in keep]


def _text_of(fragment: str, tag: str) -> str:
    match = re.search(rf"<{tag}\b[^>]*>(.*?)</{tag}>", fragment, re.S)
    if match is None:
        return ""
    return clean_words(html.unescape(_TAG_RE.sub(" ", match.group(1))))


def parse_svg_metadata(svg_text: str) -> SvgMetadata:
    """Title, description, subject keywords and creator of the drawing from SVG RDF metadata.

    Regex over the ``<metadata>`` block rather than an XML parser: many of these
    files are not well-formed XML elsewhere, and only this block matters.
    """
    block_match = _METADATA_RE.search(svg_text)
    if block_match is None:
        return SvgMetadata()
    work_match = _WORK_RE.search(block_match.group(0))
    if work_match is None:
        return SvgMetadata()
    work = work_match.group(0)
    creator_match = re.search(r"<dc:creator\b.*?</dc:creator>", work, re.S)
    creator = _text_of(creator_match.group(0), "dc:title") if creator_match else ""
    # The publisher/creator/rights agents carry their own dc:title; drop them before reading the work's title.
    own = _AGENT_RE.sub("", work)
    keywords: list[str] = []
    subject_match = re.search(r"<dc:subject\b.*?</dc:subject>", own, re.S)
    if subject_match:
        for raw in re.findall(r"<rdf:li\b[^>]*>(.*?)</rdf:li>", subject_match.group(0), re.S):
            word = clean_words(html.unescape(_TAG_RE.sub(" ", raw)))
            if word and word not in keywords:
                keywords.append(word)
    return SvgMetadata(
        title=_text_of(own, "dc:title"),
        description=_text_of(own, "dc:description"),
        keywords=tuple(keywords),
        creator=creator,
    )


def read_svg_metadata(entry: ClipartEntry) -> SvgMetadata:
    if entry.svg_path is None:
        return SvgMetadata()
    try:
        text = entry.svg_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return SvgMetadata()
    return parse_svg_metadata(text)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def name_from_filename(file_stem: str, creator: str = "") -> str:
    """A readable name from an openclipart file stem.

    Stems look like ``<title>_<author>_NN`` truncated to 24 characters before
    the counter (``siringa_architetto_franc_01``); the author part is removed
    when the creator is known, else only the counter.
    """
    stem = re.sub(r"_+\d{1,3}$", "", file_stem).rstrip("_")
    author = _slug(creator)
    if author:
        # Longest prefix of the author slug that ends the stem: "..._architetto_franc".
        for cut in range(len(author), 2, -1):
            suffix = "_" + author[:cut].rstrip("_")
            if stem.lower().endswith(suffix) and len(stem) > len(suffix):
                stem = stem[: -len(suffix)]
                break
    # Drop counters and codes ("h", "9", "67pt11step") that carry no meaning.
    words = [w for w in re.split(r"[_\-\s]+", stem) if len(w) > 1 and not re.search(r"\d", w)]
    return clean_words(" ".join(words))


def _clean_title(title: str) -> str:
    """The drawing's own title, or "" when the title names a collection shared by many files."""
    title = clean_words(re.sub(r"(?<=[A-Za-z])[_\-](?=[A-Za-z])", " ", title)).strip(" .")
    if title.lower() in _JUNK_TITLES or _COLLECTION_RE.search(title):
        return ""
    return title


def _useful_description(description: str, title_key: str) -> str:
    description = clean_words(description)
    if (
        not description
        or description.lower() == title_key
        or len(description) > 200
        or _JUNK_DESCRIPTION_RE.search(description)
    ):
        return ""
    return description


def clipart_captions(entry: ClipartEntry, meta: SvgMetadata, background: str | None = None) -> list[str]:
    """Caption variants, one per line: title; title + keywords; a sentence; the description."""
    title = _clean_title(meta.title) or name_from_filename(entry.file_stem, meta.creator)
    if len(title) < 3:
        by_match = _CLIPART_BY_RE.match(meta.title)
        by_title = clean_words(re.sub(r"[_\s]*\d+$", "", by_match.group(1)).replace("_", " ")) if by_match else ""
        fallbacks = [by_title, *(k for k in meta.keywords if k.lower() not in _JUNK_KEYWORDS)]
        fallbacks += [part.replace("_", " ") for part in reversed(entry.categories)] + [entry.file_stem]
        title = next(f for f in fallbacks if len(f) >= 3 or f == entry.file_stem)
    if "flags" in entry.categories and "flag" not in title.lower():
        title = f"flag of {title}"  # the flags tree titles drawings by country name only
    title_key = title.lower()
    keywords: list[str] = []
    folder_words = [part.replace("_", " ") for part in reversed(entry.categories)]
    for word in (*meta.keywords, *folder_words):
        word = clean_words(word.replace("_", " ")).lower()
        if word in _JUNK_KEYWORDS or word == title_key or word in keywords or len(word) > 40:
            continue
        keywords.append(word)
    sentence = f"a clipart drawing of {noun_phrase(title)}"
    if keywords:
        sentence += ", " + ", ".join(keywords[:3])
    if background:
        sentence += f", on a {background} background"
    lines = [title, ", ".join([title, *keywords[:8]]), sentence]
    description = _useful_description(meta.description, title_key)
    if description:
        lines.append(description)
    unique: list[str] = []
    for line in lines:
        if line and line not in unique:
            unique.append(line)
    return unique


def _render_svg(svg_path: Path, side_px: int) -> Image.Image:
    import cairosvg  # optional (`train` extra); only needed for the few drawings without a usable PNG

    png_bytes = cairosvg.svg2png(url=str(svg_path), output_width=side_px, unsafe=False)
    image = Image.open(io.BytesIO(png_bytes))
    image.load()
    if image.width > 4 * side_px or image.height > 4 * side_px:  # only width was fixed: a very tall drawing
        image.thumbnail((side_px, side_px))
    return image.convert("RGBA")


def load_clipart_image(entry: ClipartEntry) -> Image.Image:
    """The drawing as RGBA: the PNG when it is a sensible size, else the SVG rendered by cairosvg.

    Raises ``HuabiError`` naming the file when neither can be read.
    """
    problem = "no PNG"
    if entry.png_path is not None:
        try:
            with warnings.catch_warnings():  # the header only; a huge PNG is rendered from its SVG below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(entry.png_path) as probe:
                    width_px, height_px = probe.size
            if max(width_px, height_px) < MIN_PNG_SIDE_PX:
                problem = f"PNG is only {width_px}x{height_px} px"
            elif width_px * height_px > MAX_PNG_PIXELS:
                problem = f"PNG is {width_px}x{height_px} px"
            else:
                with Image.open(entry.png_path) as image:
                    return image.convert("RGBA")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            problem = f"unreadable PNG ({exc})"
    if entry.svg_path is not None:
        try:
            return _render_svg(entry.svg_path, SVG_RENDER_SIDE_PX)
        except Exception as exc:  # cairosvg raises many types on odd SVGs
            raise HuabiError(f"{entry.rel}: {problem} and SVG failed to render ({type(exc).__name__})") from exc
    raise HuabiError(f"{entry.rel}: {problem} and no SVG")
