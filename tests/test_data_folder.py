"""CaptionedFolder: the reader trainers use for huabi's dataset and for users' own folders."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from huabi.data.build import build_dataset
from huabi.data.folder import CaptionedFolder, CaptionedItem
from huabi.errors import HuabiError


@pytest.fixture
def user_folder(tmp_path: Path) -> Path:
    """A user's folder: mixed formats, nested, a multi-line caption, a missing caption, a kohya .caption file."""
    root = tmp_path / "my_cat"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (80, 40), (200, 10, 10)).save(root / "a.jpg")
    (root / "a.txt").write_text("a red cat\n\n  a cat, red  \n", encoding="utf-8")
    rgba = Image.new("RGBA", (30, 60), (0, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 30, 20))
    rgba.save(root / "sub" / "b.png")
    (root / "sub" / "b.caption").write_text("\ufeffblue bar on transparency", encoding="utf-8")  # BOM ignored
    Image.new("RGB", (16, 16), (0, 128, 0)).save(root / "c.WEBP")
    (root / "notes.md").write_text("not an image")
    (root / ".b.png.tmp-123").write_bytes(b"partial")  # builder temp files are ignored
    return root


def test_user_folder_items_and_captions(user_folder):
    folder = CaptionedFolder(user_folder)
    assert len(folder) == 3
    assert [item.path.relative_to(user_folder).as_posix() for item in folder.items] == ["a.jpg", "c.WEBP", "sub/b.png"]
    path, captions = folder.items[0]
    assert isinstance(folder.items[0], CaptionedItem)
    assert captions == ("a red cat", "a cat, red")  # one caption per non-empty line, stripped
    assert folder.items[1].captions == ()  # no .txt: empty caption list
    assert folder.items[2].captions == ()  # .caption is not read unless asked for
    kohya = CaptionedFolder(user_folder, caption_extension="caption")
    assert kohya.items[2].captions == ("blue bar on transparency",)


def test_load_image_centre_crops_resizes_and_flattens_alpha(user_folder):
    folder = CaptionedFolder(user_folder)
    wide = folder.load_image(0, 32)
    assert wide.mode == "RGB" and wide.size == (32, 32)
    r, g, b = wide.getpixel((16, 16))
    assert abs(r - 200) <= 3 and g <= 15 and b <= 15  # JPEG: tolerance 3-15 levels
    tall = folder.load_image(2, 30)  # 30x60 PNG: centre crop keeps rows 15..45
    assert tall.size == (30, 30)
    assert tall.getpixel((15, 2)) == (0, 0, 255)  # rows 15..20 of the blue bar
    assert tall.getpixel((15, 20)) == (255, 255, 255)  # transparent -> white, not black
    with pytest.raises(HuabiError, match="size_px must be a positive integer, got 0"):
        folder.load_image(0, 0)
    with pytest.raises(IndexError):
        folder.load_image(3, 32)


def test_reads_a_built_dataset(tmp_path):
    out = tmp_path / "built"
    build_dataset(out, size_px=64, sources=["emoji"], limit=4, workers=1, progress=False)
    folder = CaptionedFolder(out)
    assert len(folder) == 4
    for index, (path, captions) in enumerate(folder.items):
        assert path.suffix == ".png" and len(captions) >= 3
        assert captions[0] in captions[2]  # the sentence repeats the name
        image = folder.load_image(index, 64)
        assert image.size == (64, 64) and image.mode == "RGB"


def test_red_apple_from_a_built_dataset(tmp_path):
    # A known emoji end to end: rendered, captioned and read back.
    from huabi.data import build

    out = tmp_path / "apple"
    out.mkdir()
    emoji_task = build._plan("emoji", None, 0, ["white"])[0]
    apple = next(t for t in emoji_task if t.stem == "emoji_1f34e")
    results = build._process_chunk((out, 64, [apple]))
    assert [r.status for r in results] == ["written"]
    ((path, captions),) = CaptionedFolder(out).items
    assert path.name == "emoji_1f34e.png"
    assert captions[0] == "red apple" and sum("red apple" in c for c in captions) >= 3
    r, g, b = CaptionedFolder(out).load_image(0, 64).getpixel((32, 36))
    assert r > 150 and g < 100 and b < 100  # the middle of the apple is red


def test_errors_name_the_folder_or_file(tmp_path):
    with pytest.raises(HuabiError, match=r"dataset folder .*nowhere does not exist"):
        CaptionedFolder(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HuabiError, match=r"dataset folder .*empty is empty \(expected .png, .jpg, .jpeg, .webp files\)"):
        CaptionedFolder(empty)
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("a caption without an image")
    with pytest.raises(HuabiError, match=r"dataset folder .*texts has no images"):
        CaptionedFolder(texts)
    a_file = texts / "a.txt"
    with pytest.raises(HuabiError, match=r"dataset folder .*a.txt is not a folder"):
        CaptionedFolder(a_file)
    with pytest.raises(HuabiError, match=r"caption_extension '.png' must be a text suffix"):
        CaptionedFolder(texts, caption_extension=".png")


def test_unreadable_image_and_caption_name_the_file(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    folder = CaptionedFolder(root)
    with pytest.raises(HuabiError, match=r"cannot read image .*broken.png"):
        folder.load_image(0, 32)
    Image.new("RGB", (8, 8)).save(root / "latin1.png")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(HuabiError, match=r"caption file .*latin1.txt is not UTF-8 text"):
        CaptionedFolder(root)
