"""PNG metadata I/O: files A1111 can read, A1111's files we can read, safe writes."""

import io
import os
import struct
import zlib

import pytest
from PIL import Image

from huabi.core.infotext import format_infotext, request_from_infotext
from huabi.core.request import GenerationRequest
from huabi.errors import HuabiError
from huabi.service.pngio import decode_user_comment, next_image_path, read_infotext, save_png

INFOTEXT = (
    "a red apple, (masterpiece:1.2)\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 16x16, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, Version: huabi 0.1.0"
)
UNICODE_INFOTEXT = (
    "画笔, 一只可爱的猫 🐱🎨, café\n"
    "Negative prompt: 模糊 😡\n"
    'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 7, Size: 16x16, Lora hashes: "猫咪: 0123456789ab", '
    "Version: huabi 0.1.0"
)


def tiny_image(mode="RGB"):
    image = Image.new("RGB", (16, 16))
    image.putdata([(x * 16, y * 16, 128) for y in range(16) for x in range(16)])
    return image.convert(mode)


def png_text_chunks(path):
    """(chunk type, key, value) of every text chunk, read straight from the bytes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, found = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"tEXt":
            key, value = body.split(b"\0", 1)
            found.append(("tEXt", key.decode("latin-1"), value.decode("latin-1")))
        elif kind == b"iTXt":
            key, rest = body.split(b"\0", 1)
            compressed, _method = rest[0], rest[1]
            _lang, _translated, text = rest[2:].split(b"\0", 2)
            text = zlib.decompress(text) if compressed else text
            found.append(("iTXt", key.decode("latin-1"), text.decode("utf-8")))
        pos += 12 + length
    return found


def write_exif_image(path, text, fmt, *, little_endian=False):
    """An image with the infotext in EXIF UserComment, as A1111 writes JPEG/WebP (piexif)."""
    encoded = text.encode("utf-16-le" if little_endian else "utf-16-be")
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + encoded
    tiny_image().save(path, format=fmt, exif=exif)


# --- writing -----------------------------------------------------------------------------------


def test_save_and_read_back_identical(tmp_path):
    path = save_png(tiny_image(), tmp_path / "00000-1234.png", INFOTEXT)
    assert path == tmp_path / "00000-1234.png"
    assert read_infotext(path) == INFOTEXT
    # What A1111's reader does: Pillow's image.info["parameters"].
    with Image.open(path) as image:
        assert image.info["parameters"] == INFOTEXT
        assert image.size == (16, 16)
    # Plain latin-1 text goes into a tEXt chunk, as A1111 writes it.
    assert png_text_chunks(path) == [("tEXt", "parameters", INFOTEXT)]


def test_non_latin1_text_goes_into_itxt_like_a1111(tmp_path):
    path = save_png(tiny_image(), tmp_path / "a.png", UNICODE_INFOTEXT)
    assert read_infotext(path) == UNICODE_INFOTEXT
    with Image.open(path) as image:
        assert image.info["parameters"] == UNICODE_INFOTEXT
    assert png_text_chunks(path) == [("iTXt", "parameters", UNICODE_INFOTEXT)]


def test_latin1_accents_stay_in_text_chunk(tmp_path):
    text = "café crème\nSteps: 20, Sampler: Euler, Seed: 1"
    path = save_png(tiny_image(), tmp_path / "b.png", text)
    assert png_text_chunks(path) == [("tEXt", "parameters", text)]
    assert read_infotext(path) == text


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "CMYK"])
def test_image_modes(tmp_path, mode):
    path = save_png(tiny_image(mode), tmp_path / f"{mode}.png", INFOTEXT)
    assert read_infotext(path) == INFOTEXT
    with Image.open(path) as image:
        assert image.mode == ("RGB" if mode == "CMYK" else mode)


def test_pixels_are_unchanged(tmp_path):
    image = tiny_image()
    path = save_png(image, tmp_path / "p.png", INFOTEXT)
    with Image.open(path) as back:
        assert back.convert("RGB").tobytes() == image.tobytes()


def test_full_round_trip_request_to_file_to_request(tmp_path):
    req = GenerationRequest("一只猫 🐱", negative_prompt="狗", seed=42, width_px=16, height_px=16, schedule="Karras")
    text = format_infotext(
        req, seed=42, width_px=16, height_px=16, model_name="tiny", model_hash="abcdef0123", version="huabi 0.1.0"
    )
    path = save_png(tiny_image(), next_image_path(tmp_path, 42), text)
    back = request_from_infotext(read_infotext(path))
    assert (back.prompt, back.negative_prompt, back.seed, back.schedule, back.model) == (
        "一只猫 🐱",
        "狗",
        42,
        "Karras",
        "abcdef0123",
    )


def test_creates_missing_folder_and_leaves_no_temp_files(tmp_path):
    folder = tmp_path / "out" / "today"
    save_png(tiny_image(), folder / "x.png", INFOTEXT)
    assert sorted(os.listdir(folder)) == ["x.png"]


def test_never_overwrites(tmp_path):
    path = save_png(tiny_image(), tmp_path / "x.png", INFOTEXT)
    before = path.read_bytes()
    with pytest.raises(HuabiError) as err:
        save_png(tiny_image(), path, "other\nSteps: 1, Sampler: Euler, Seed: 1")
    assert str(err.value) == f"{path}: already exists; not overwriting it"
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["x.png"]


def test_bad_save_arguments_are_named(tmp_path):
    with pytest.raises(HuabiError, match=r"x\.jpg: save_png writes PNG files; give the name a \.png suffix$"):
        save_png(tiny_image(), tmp_path / "x.jpg", INFOTEXT)
    with pytest.raises(HuabiError, match=r"y\.png: infotext contains a NUL character"):
        save_png(tiny_image(), tmp_path / "y.png", "a\0b")
    with pytest.raises(HuabiError, match=r"z\.png: infotext must be text, got bytes$"):
        save_png(tiny_image(), tmp_path / "z.png", b"abc")
    assert os.listdir(tmp_path) == []


# --- numbering ---------------------------------------------------------------------------------


def test_next_image_path_numbers_like_a1111(tmp_path):
    assert next_image_path(tmp_path / "missing", 1234) == tmp_path / "missing" / "00000-1234.png"
    assert next_image_path(tmp_path, 1234) == tmp_path / "00000-1234.png"
    for name in ["00000-1234.png", "00001-1235.png", "00007-99.jpg", "notes.txt", "grid-00042.png"]:
        (tmp_path / name).write_bytes(b"")
    # Highest number of any file + 1; gaps are not refilled, other extensions count.
    assert next_image_path(tmp_path, 1235) == tmp_path / "00008-1235.png"
    assert next_image_path(tmp_path, 5, prefix="grid") == tmp_path / "grid-00043-5.png"
    (tmp_path / "123456-1.png").write_bytes(b"")
    assert next_image_path(tmp_path, 2) == tmp_path / "123457-2.png"


def test_next_image_path_then_save_sequence(tmp_path):
    for seed in (1234, 1235):
        save_png(tiny_image(), next_image_path(tmp_path, seed), INFOTEXT)
    assert sorted(os.listdir(tmp_path)) == ["00000-1234.png", "00001-1235.png"]


# --- reading A1111's other formats --------------------------------------------------------------


@pytest.mark.parametrize("fmt, suffix", [("JPEG", ".jpg"), ("WEBP", ".webp")])
def test_reads_exif_user_comment_like_a1111_writes(tmp_path, fmt, suffix):
    path = tmp_path / f"00000-7{suffix}"
    write_exif_image(path, UNICODE_INFOTEXT, fmt)
    assert read_infotext(path) == UNICODE_INFOTEXT


def test_reads_little_endian_and_ascii_user_comments(tmp_path):
    path = tmp_path / "le.jpg"
    write_exif_image(path, INFOTEXT, "JPEG", little_endian=True)
    assert read_infotext(path) == INFOTEXT
    assert decode_user_comment(b"ASCII\0\0\0" + b"Steps: 20") == "Steps: 20"
    assert decode_user_comment(b"\0" * 8 + "画".encode()) == "画"


def test_reads_text_chunk_after_pixel_data(tmp_path):
    # Some tools write the text chunk after IDAT; Pillow only sees it once loaded.
    buffer = io.BytesIO()
    tiny_image().save(buffer, format="PNG")
    data = buffer.getvalue()
    body = b"parameters\0" + INFOTEXT.encode("latin-1")
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    iend = data.rindex(b"IEND") - 4
    path = tmp_path / "late.png"
    path.write_bytes(data[:iend] + chunk + data[iend:])
    assert read_infotext(path) == INFOTEXT


# --- bad input ---------------------------------------------------------------------------------


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("Steps: 20, this is not a PNG")
    with pytest.raises(HuabiError) as err:
        read_infotext(path)
    assert str(err.value) == f"{path}: not an image file (or one Pillow cannot read)"


def test_png_without_metadata(tmp_path):
    path = tmp_path / "IMAGE.png"
    tiny_image().save(path)
    with pytest.raises(HuabiError) as err:
        read_infotext(path)
    assert str(err.value) == f"{path}: no generation parameters in this image"


def test_jpeg_without_metadata_and_empty_parameters(tmp_path):
    jpeg = tmp_path / "plain.jpg"
    tiny_image().save(jpeg)
    with pytest.raises(HuabiError, match=r"plain\.jpg: no generation parameters in this image$"):
        read_infotext(jpeg)
    empty = save_png(tiny_image(), tmp_path / "empty.png", "  ")
    with pytest.raises(HuabiError, match=r"empty\.png: no generation parameters in this image$"):
        read_infotext(empty)


def test_missing_file_and_truncated_png(tmp_path):
    with pytest.raises(HuabiError, match=r"nope\.png: no such file$"):
        read_infotext(tmp_path / "nope.png")
    good = save_png(tiny_image(), tmp_path / "good.png", INFOTEXT)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:20])
    with pytest.raises(HuabiError) as err:
        read_infotext(cut)
    assert str(err.value).startswith(f"{cut}: ")
    assert "\n" not in str(err.value)
