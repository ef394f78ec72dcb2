"""Emoji as captioned images: Noto Color Emoji glyphs named by Unicode/CLDR data.

Inputs are Debian packages (nothing is fetched):

- ``fonts-noto-color-emoji``: the CBDT bitmap font. FreeType only opens it at
  its one strike size (109 px), and multi-codepoint sequences (ZWJ, flags,
  skin tones, keycaps) only form one glyph through Pillow's raqm layout.
- ``unicode-data``: ``emoji-test.txt`` lists every fully-qualified emoji with its
  name, group and subgroup.
- ``unicode-cldr-core``: CLDR annotations give keywords ("apple | fruit | red").
- PyPI ``emoji`` (optional): short-code names and aliases (``:red_apple:``).

This module parses and renders; writing files is ``huabi.data.build``'s job.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, features

from huabi.errors import HuabiError

EMOJI_FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST_PATH = Path("/usr/share/unicode/emoji/emoji-test.txt")
CLDR_ANNOTATION_PATHS = (
    Path("/usr/share/unicode/cldr/common/annotations/en.xml"),
    Path("/usr/share/unicode/cldr/common/annotationsDerived/en.xml"),
)

# The CBDT strike size: FreeType refuses any other size for this font.
NOTO_STRIKE_PX = 109

_VS16 = "\ufe0f"
# Fitzpatrick modifiers: "waving hand: medium skin tone" is "waving hand" + U+1F3FD
SKIN_TONE_MODIFIERS = frozenset(range(0x1F3FB, 0x1F400))
_LINE_RE = re.compile(r"^([0-9A-Fa-f ]+?)\s*;\s*([a-z-]+)\s*#\s*(\S+)\s+E\d+\.\d+\s+(.+?)\s*$")


@dataclass(frozen=True)
class EmojiEntry:
    """One fully-qualified emoji and the words known about it."""

    codepoints: tuple[int, ...]
    name: str  # the emoji-test.txt name, e.g. "red apple", "flag: Japan"
    group: str  # e.g. "Food & Drink"
    subgroup: str  # e.g. "food-fruit"
    keywords: tuple[str, ...] = ()  # CLDR keywords, e.g. ("apple", "fruit", "red")
    aliases: tuple[str, ...] = ()  # PyPI emoji short names as words, e.g. ("apple",)

    @property
    def text(self) -> str:
        return "".join(chr(cp) for cp in self.codepoints)

    @property
    def is_skin_tone_variant(self) -> bool:
        """A skin-tone variant of another emoji (1,785 of the 3,655 in Debian's emoji-test.txt)."""
        return any(cp in SKIN_TONE_MODIFIERS for cp in self.codepoints)

    @property
    def stem(self) -> str:
        """File stem used in the dataset folder, e.g. ``emoji_1f34e``."""
        return "emoji_" + "-".join(f"{cp:x}" for cp in self.codepoints)


def require_file(path: Path, apt_package: str) -> Path:
    """Return ``path`` or raise a one-line error naming the Debian package that provides it."""
    if not path.is_file():
        raise HuabiError(
            f"{path} not found: install the Debian package {apt_package} (apt-get install {apt_package})"
        )
    return path


def parse_emoji_test(text: str) -> list[tuple[tuple[int, ...], str, str, str]]:
    """Parse emoji-test.txt into ``(codepoints, name, group, subgroup)`` for fully-qualified lines."""
    rows: list[tuple[tuple[int, ...], str, str, str]] = []
    group = subgroup = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
            continue
        if line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
            continue
        if not line or line.startswith("#"):
            continue
        match = _LINE_RE.match(line)
        if match is None or match.group(2) != "fully-qualified":
            continue
        codepoints = tuple(int(part, 16) for part in match.group(1).split())
        rows.append((codepoints, match.group(4), group, subgroup))
    return rows


def parse_cldr_annotations(xml_text: str) -> dict[str, tuple[tuple[str, ...], str]]:
    """Map emoji text (without U+FE0F) -> (keywords, tts name) from a CLDR annotations file."""
    root = ET.fromstring(xml_text)
    keywords: dict[str, tuple[str, ...]] = {}
    tts: dict[str, str] = {}
    for node in root.iter("annotation"):
        cp = (node.get("cp") or "").replace(_VS16, "")
        body = (node.text or "").strip()
        if not cp or not body or body == "↑↑↑":  # "↑↑↑" marks "inherit from parent locale"
            continue
        if node.get("type") == "tts":
            tts[cp] = body
        else:
            keywords[cp] = tuple(word.strip() for word in body.split("|") if word.strip())
    return {cp: (keywords.get(cp, ()), tts.get(cp, "")) for cp in set(keywords) | set(tts)}


def _emoji_package_aliases(text: str) -> tuple[str, ...]:
    """Short names from the PyPI ``emoji`` package as plain words; empty if it is not installed."""
    try:
        import emoji  # optional: a `train` extra
    except ImportError:
        return ()
    data = emoji.EMOJI_DATA.get(text) or emoji.EMOJI_DATA.get(text.replace(_VS16, ""))
    if not data:
        return ()
    names = [data.get("en", "")] + list(data.get("alias", []))
    words = []
    for name in names:
        word = name.strip(":").replace("_", " ").strip()
        if word and word not in words:
            words.append(word)
    return tuple(words)


def record_is_skin_tone_variant(record: dict) -> bool:
    """The same test on a ``metadata.jsonl`` record (``"codepoints": "U+1F385 U+1F3FB"``)."""
    codepoints = str(record.get("codepoints", "")).split()
    return any(int(cp.removeprefix("U+"), 16) in SKIN_TONE_MODIFIERS for cp in codepoints)


def load_emoji_entries(
    emoji_test_path: Path = EMOJI_TEST_PATH,
    annotation_paths: Sequence[Path] = CLDR_ANNOTATION_PATHS,
) -> list[EmojiEntry]:
    """All fully-qualified emoji in emoji-test.txt order, with CLDR keywords and emoji-package aliases.

    The first annotation file is required (``unicode-cldr-core``); later ones
    (annotationsDerived: skin tones, families) are used when present.
    """
    require_file(Path(emoji_test_path), "unicode-data")
    rows = parse_emoji_test(Path(emoji_test_path).read_text(encoding="utf-8"))
    annotations: dict[str, tuple[tuple[str, ...], str]] = {}
    for index, path in enumerate(annotation_paths):
        path = Path(path)
        if index == 0:
            require_file(path, "unicode-cldr-core")
        elif not path.is_file():
            continue
        for cp, value in parse_cldr_annotations(path.read_text(encoding="utf-8")).items():
            annotations.setdefault(cp, value)
    entries = []
    for codepoints, name, group, subgroup in rows:
        text = "".join(chr(cp) for cp in codepoints)
        cldr_keywords, _tts = annotations.get(text.replace(_VS16, ""), ((), ""))
        entries.append(
            EmojiEntry(
                codepoints=codepoints,
                name=name,
                group=group,
                subgroup=subgroup,
                keywords=cldr_keywords,
                aliases=_emoji_package_aliases(text),
            )
        )
    return entries


# ---------------------------------------------------------------- captions


def clean_words(text: str) -> str:
    """One-line caption text: straight quotes, single spaces."""
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    return " ".join(text.split())


def noun_phrase(name: str) -> str:
    """``name`` with an indefinite article when it reads as a singular noun ("a red apple", "sparkles")."""
    words = name.split()
    if not words:
        return name
    first, last = words[0].lower(), words[-1].lower()
    if first in ("a", "an", "the") or first.isdigit():
        return name
    if first == "flag" and name.lower().startswith("flag of"):
        return "the " + name
    if last.endswith("s") and not last.endswith(("ss", "us", "is")):
        return name  # plural: "hundred points", "eyeglasses"
    article = "an" if first[0] in "aeiou" else "a"
    return f"{article} {name}"


def display_name(name: str) -> str:
    """emoji-test names as caption text: "flag: Japan" -> "flag of Japan", "keycap: 1" -> "keycap 1"."""
    name = clean_words(name)
    head, sep, tail = name.partition(": ")
    if not sep:
        return name
    if head == "flag":
        return f"flag of {tail}"
    if head == "keycap":
        return f"keycap {tail}"
    if head == "family":
        return f"family of {tail}"
    if "," not in tail and tail.endswith(("skin tone", "hair", "beard")):
        return f"{head} with {tail}"  # "woman with red hair", "thumbs up with dark skin tone"
    return f"{head}, {tail}"


def _letters(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def _group_words(entry: EmojiEntry) -> list[str]:
    words = [clean_words(entry.group.replace("&", "and")).lower()]
    for part in entry.subgroup.split("-"):
        part = part.strip().lower()
        if part and part not in ("other", "symbol") and part not in words:
            words.append(part)
    return [w for w in words if w]


def emoji_captions(entry: EmojiEntry, background: str | None = None) -> list[str]:
    """Caption variants, one per line: name; keywords; a sentence; name with group words.

    ``background`` (e.g. "light blue") is mentioned in the sentence when given.
    """
    name = display_name(entry.name)
    keywords: list[str] = []
    seen = {_letters(name), _letters(entry.name)}
    for word in (*entry.keywords, *entry.aliases):
        word = clean_words(word)
        key = _letters(word)
        if key and key not in seen:  # drops "*", repeats, and aliases that only respell the name
            seen.add(key)
            keywords.append(word)
    group_words = _group_words(entry)
    sentence = f"an emoji of {noun_phrase(name)}"
    if keywords:
        sentence += ", " + ", ".join(keywords[:4])
    if background:
        sentence += f", on a {background} background"
    lines = [name, ", ".join(keywords or group_words), sentence, f"{name} emoji, " + ", ".join(group_words)]
    unique: list[str] = []
    for line in lines:
        if line and line not in unique:
            unique.append(line)
    return unique


# ---------------------------------------------------------------- rendering


class EmojiRenderer:
    """Renders emoji with the Noto Color Emoji font; one instance per process (the font is cheap to open)."""

    def __init__(self, font_path: Path = EMOJI_FONT_PATH) -> None:
        require_file(Path(font_path), "fonts-noto-color-emoji")
        if not features.check("raqm"):
            raise HuabiError(
                "Pillow was built without raqm text layout: emoji sequences would not render; "
                "install Pillow from PyPI wheels (pip install --force-reinstall pillow)"
            )
        self._font = ImageFont.truetype(str(font_path), NOTO_STRIKE_PX, layout_engine=ImageFont.Layout.RAQM)

    def render(self, entry: EmojiEntry) -> Image.Image:
        """The glyph as RGBA, cropped to its visible pixels.

        Raises ``HuabiError`` when the font has no single glyph for the sequence
        (it would draw as several side-by-side pieces).
        """
        text = entry.text
        left, top, right, bottom = self._font.getbbox(text)
        width_px, height_px = right - left, bottom - top
        if width_px > 1.6 * height_px:
            raise HuabiError(f"emoji {entry.stem}: font has no single glyph for this sequence")
        pad = 8
        canvas = Image.new("RGBA", (width_px + 2 * pad, height_px + 2 * pad), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((pad - left, pad - top), text, font=self._font, embedded_color=True)
        bbox = canvas.getchannel("A").getbbox()
        if bbox is None:
            raise HuabiError(f"emoji {entry.stem}: rendered blank")
        return canvas.crop(bbox)


def select_entries(entries: Iterable[EmojiEntry], codepoints: Iterable[Sequence[int]]) -> list[EmojiEntry]:
    """Entries with exactly these codepoint sequences (tests and small builds)."""
    wanted = {tuple(cps) for cps in codepoints}
    return [entry for entry in entries if entry.codepoints in wanted]
