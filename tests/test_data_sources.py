"""Emoji and openclipart sources: parsing, captions, rendering, missing-package errors.

These read the Debian packages fonts-noto-color-emoji, unicode-data,
unicode-cldr-core, openclipart-png and openclipart-svg (installed by set-up).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from huabi.data import emoji_source, openclipart_source
from huabi.data.emoji_source import EmojiRenderer, emoji_captions, load_emoji_entries, select_entries
from huabi.data.openclipart_source import ClipartEntry, clipart_captions, list_clipart, parse_svg_metadata
from huabi.errors import HuabiError

RED_APPLE = (0x1F34E,)
FAMILY_MAN_WOMAN_GIRL = (0x1F468, 0x200D, 0x1F469, 0x200D, 0x1F467)
FLAG_JAPAN = (0x1F1EF, 0x1F1F5)
KEYCAP_ONE = (0x31, 0xFE0F, 0x20E3)


@pytest.fixture(scope="module")
def emoji_entries():
    return load_emoji_entries()


def test_emoji_test_txt_gives_every_fully_qualified_emoji(emoji_entries):
    # Unicode 15.0's emoji-test.txt summary says "fully-qualified : 3655"; newer data has more.
    assert 3600 <= len(emoji_entries) <= 4200
    assert len({e.codepoints for e in emoji_entries}) == len(emoji_entries)
    assert all(e.group and e.subgroup and e.name for e in emoji_entries)


def test_red_apple_captions_name_keywords_and_group(emoji_entries):
    (apple,) = select_entries(emoji_entries, [RED_APPLE])
    assert apple.name == "red apple" and apple.group == "Food & Drink" and apple.subgroup == "food-fruit"
    assert set(apple.keywords) >= {"apple", "fruit", "red"}  # CLDR annotation
    captions = emoji_captions(apple)
    assert captions[0] == "red apple"
    assert sum("red apple" in line for line in captions) >= 3
    assert "an emoji of a red apple, apple, fruit, red" in captions
    assert any("food and drink" in line and "fruit" in line for line in captions)
    assert all("\n" not in line and line == line.strip() for line in captions)
    assert "on a light blue background" in emoji_captions(apple, "light blue")[2]


def test_sequence_names_read_as_phrases(emoji_entries):
    family, flag, keycap = (select_entries(emoji_entries, [cps])[0] for cps in (FAMILY_MAN_WOMAN_GIRL, FLAG_JAPAN, KEYCAP_ONE))
    assert emoji_captions(family)[0] == "family of man, woman, girl"
    assert emoji_captions(flag)[0] == "flag of Japan"
    assert emoji_captions(flag)[2].startswith("an emoji of the flag of Japan")
    assert emoji_captions(keycap)[0] == "keycap 1"
    assert emoji_source.noun_phrase("sparkles") == "sparkles"
    assert emoji_source.noun_phrase("octopus") == "an octopus"


def test_multi_codepoint_emoji_render_as_one_glyph(emoji_entries):
    renderer = EmojiRenderer()
    for cps in (RED_APPLE, FAMILY_MAN_WOMAN_GIRL, FLAG_JAPAN, KEYCAP_ONE):
        (entry,) = select_entries(emoji_entries, [cps])
        glyph = renderer.render(entry)
        assert glyph.mode == "RGBA"
        # One Noto glyph is about 136x128 px at the 109 px strike; split sequences would be 2-5x wider.
        assert 60 <= glyph.width <= 140 and 60 <= glyph.height <= 140, (entry.name, glyph.size)
        alpha = glyph.getchannel("A")
        opaque = sum(alpha.histogram()[128:])
        assert opaque > 0.3 * glyph.width * glyph.height, entry.name
        colours = len(glyph.convert("RGB").getcolors(maxcolors=1 << 16) or ())
        assert colours > 20, entry.name  # drawn in colour, not a monochrome fallback


def test_parse_emoji_test_keeps_only_fully_qualified():
    text = (
        "# group: Smileys & Emotion\n# subgroup: face-smiling\n"
        "1F600 ; fully-qualified # 😀 E1.0 grinning face\n"
        "263A FE0F ; fully-qualified # ☺️ E0.6 smiling face\n"
        "263A ; unqualified # ☺ E0.6 smiling face\n"
        "1F3FB ; component # 🏻 E1.0 light skin tone\n"
    )
    rows = emoji_source.parse_emoji_test(text)
    assert rows == [
        ((0x1F600,), "grinning face", "Smileys & Emotion", "face-smiling"),
        ((0x263A, 0xFE0F), "smiling face", "Smileys & Emotion", "face-smiling"),
    ]


def test_missing_emoji_packages_name_the_apt_package(tmp_path):
    with pytest.raises(HuabiError, match="install the Debian package unicode-data"):
        load_emoji_entries(emoji_test_path=tmp_path / "emoji-test.txt")
    with pytest.raises(HuabiError, match="install the Debian package unicode-cldr-core"):
        load_emoji_entries(annotation_paths=[tmp_path / "en.xml"])
    with pytest.raises(HuabiError, match=r"NotoColorEmoji.ttf not found: install the Debian package fonts-noto-color-emoji"):
        EmojiRenderer(tmp_path / "NotoColorEmoji.ttf")


def test_missing_openclipart_packages_name_the_apt_package(tmp_path):
    with pytest.raises(HuabiError, match="install the Debian package openclipart-png"):
        list_clipart(tmp_path)
    (tmp_path / "png").mkdir()
    with pytest.raises(HuabiError, match="install the Debian package openclipart-svg"):
        list_clipart(tmp_path)


SVG_WITH_METADATA = """<?xml version="1.0"?>
<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">
  <metadata>
    <rdf:RDF xmlns:cc="http://web.resource.org/cc/" xmlns:dc="http://purl.org/dc/elements/1.1/"
             xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
      <cc:Work rdf:about="">
        <dc:title>Red &amp; white lighthouse</dc:title>
        <dc:description>A lighthouse on a rock</dc:description>
        <dc:subject><rdf:Bag><rdf:li>building</rdf:li><rdf:li>sea</rdf:li><rdf:li>clip art</rdf:li></rdf:Bag></dc:subject>
        <dc:publisher><cc:Agent><dc:title>Open Clip Art Library</dc:title></cc:Agent></dc:publisher>
        <dc:creator><cc:Agent><dc:title>Jane Doe</dc:title></cc:Agent></dc:creator>
      </cc:Work>
    </rdf:RDF>
  </metadata>
</svg>"""


def test_svg_metadata_title_keywords_and_creator():
    meta = parse_svg_metadata(SVG_WITH_METADATA)
    assert meta.title == "Red & white lighthouse"  # the work's title, not the publisher's
    assert meta.description == "A lighthouse on a rock"
    assert meta.keywords == ("building", "sea", "clip art")
    assert meta.creator == "Jane Doe"
    entry = ClipartEntry("buildings/lighthouse_jane_doe_01", None, None)
    captions = clipart_captions(entry, meta)
    assert captions[0] == "Red & white lighthouse"
    assert captions[1] == "Red & white lighthouse, building, sea, buildings"  # "clip art" is archive noise
    assert captions[2] == "a clipart drawing of a Red & white lighthouse, building, sea, buildings"
    assert captions[3] == "A lighthouse on a rock"
    assert parse_svg_metadata("<svg></svg>") == openclipart_source.SvgMetadata()


def test_file_name_fallback_strips_author_suffix():
    assert openclipart_source.name_from_filename("siringa_architetto_franc_01", "Architetto Francesco Rollandin") == "siringa"
    assert openclipart_source.name_from_filename("double_helix_anthony_lie_01", "Anthony Liekens") == "double helix"
    assert openclipart_source.name_from_filename("bored_dog_01") == "bored dog"
    entry = ClipartEntry("signs_and_symbols/flags/asia/japan", None, None)
    meta = openclipart_source.SvgMetadata(title="japan", keywords=("flag",))
    assert clipart_captions(entry, meta)[0] == "flag of japan"
    collection = openclipart_source.SvgMetadata(title="Part of the Flat Icon Collection (Wed Aug 25 2004)")
    assert clipart_captions(ClipartEntry("computer/icons/print_preview", None, None), collection)[0] == "print preview"


@pytest.fixture(scope="module")
def clipart_by_rel():
    return {e.rel: e for e in list_clipart()}


def test_real_clipart_caption_contains_its_title(clipart_by_rel):
    assert 7000 <= len(clipart_by_rel) <= 9000
    entry = clipart_by_rel["animals/mammals/dogs/bored_dog_01"]
    meta = openclipart_source.read_svg_metadata(entry)
    assert meta.title == "Bored dog"
    captions = clipart_captions(entry, meta)
    assert captions[0] == "Bored dog"
    assert all("Bored dog" in line for line in captions[:3])
    assert "dog" in captions[1] and "animal" in captions[1]
    image = openclipart_source.load_clipart_image(entry)
    assert image.mode == "RGBA" and min(image.size) > 48


def test_tiny_png_is_replaced_by_the_svg_rendered_with_cairosvg(tmp_path):
    # Some Debian PNGs are 3x2 px stubs (others 20990x29700 px); both are rendered from the SVG.
    from PIL import Image

    png = tmp_path / "stub.png"
    Image.new("RGBA", (3, 2), (255, 0, 0, 255)).save(png)
    svg = tmp_path / "stub.svg"
    svg.write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="20" height="10">'
        '<rect x="0" y="0" width="20" height="10" fill="#0000ff"/></svg>'
    )
    image = openclipart_source.load_clipart_image(ClipartEntry("misc/stub", png, svg))
    assert image.mode == "RGBA" and image.size == (openclipart_source.SVG_RENDER_SIDE_PX, 256)
    assert image.getpixel((10, 10)) == (0, 0, 255, 255)


def test_unreadable_clipart_names_the_file(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all, but long enough" * 4)
    with pytest.raises(HuabiError, match=r"misc/broken: unreadable PNG .* and no SVG"):
        openclipart_source.load_clipart_image(ClipartEntry("misc/broken", broken, None))


def test_cap_per_folder_spreads_evenly():
    entries = [ClipartEntry(f"shapes/stars/star_{i:03d}", None, None) for i in range(10)]
    entries.append(ClipartEntry("animals/cat", None, None))
    kept = openclipart_source.cap_per_folder(entries, max_per_folder=3)
    assert [e.rel for e in kept] == ["shapes/stars/star_000", "shapes/stars/star_003", "shapes/stars/star_006", "animals/cat"]


def test_stems_are_safe_and_distinct():
    a = ClipartEntry("computer/icons/viewmag+", None, None)
    b = ClipartEntry("computer/icons/viewmag_", None, None)
    assert a.stem != b.stem
    assert all(ch.isalnum() or ch in "_.-" for ch in a.stem)
    assert Path(a.stem).name == a.stem
