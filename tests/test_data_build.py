"""build_dataset on a tiny slice (limit per source, 64 px): files, captions, determinism, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from huabi.data import build
from huabi.data.build import BACKGROUNDS, build_dataset, choose_background, compose_square
from huabi.data.folder import CaptionedFolder
from huabi.errors import HuabiError

LIMIT = 8


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("mini") / "huabi-mini-64"
    report = build_dataset(out, size_px=64, limit=LIMIT, workers=1, progress=False)
    return out, report


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_slice_writes_images_captions_metadata_and_readme(built):
    out, report = built
    assert report.counts == {"emoji": LIMIT, "openclipart": LIMIT}
    assert report.written == {"emoji": LIMIT, "openclipart": LIMIT} and report.existing == {}
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2 * LIMIT
    for png in pngs:
        with Image.open(png) as image:
            assert image.mode == "RGB" and image.size == (64, 64)
            # White background at the corners (the margin), something drawn in the middle.
            assert image.getpixel((0, 0)) == (255, 255, 255)
            assert image.convert("L").getextrema()[0] < 200
        captions = png.with_suffix(".txt").read_text(encoding="utf-8").splitlines()
        assert len(captions) >= 3 and all(line.strip() == line and line for line in captions)
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["file"] for r in records] == [p.name for p in pngs]
    emoji_record = next(r for r in records if r["source"] == "emoji")
    assert emoji_record["codepoints"].startswith("U+") and emoji_record["captions"][0] == emoji_record["captions"][0].strip()
    clipart_record = next(r for r in records if r["source"] == "openclipart")
    assert clipart_record["category"] and clipart_record["captions"]
    readme = (out / "README.txt").read_text(encoding="utf-8")
    assert "Open Font License" in readme and "public domain" in readme and "Unicode License" in readme
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind
    # The slice spreads over each source instead of taking the first few smileys.
    assert len({r["group"] for r in records if r["source"] == "emoji"}) >= 4
    assert any(reason.startswith("duplicate") for _item, reason in report.skipped)


def test_rebuild_is_byte_identical_and_rerun_skips_finished_files(built, tmp_path):
    out, _report = built
    before = _snapshot(out)
    again = tmp_path / "again"
    build_dataset(again, size_px=64, limit=LIMIT, workers=2, progress=False)  # 2 workers: same bytes
    assert _snapshot(again) == before
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    rerun = build_dataset(out, size_px=64, limit=LIMIT, workers=1, progress=False)
    assert rerun.written == {} and rerun.existing == {"emoji": LIMIT, "openclipart": LIMIT}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == mtimes
    assert _snapshot(out) == before


def test_interrupted_item_is_redone(tmp_path):
    out = tmp_path / "resume"
    build_dataset(out, size_px=64, sources=["emoji"], limit=3, workers=1, progress=False)
    victim = sorted(out.glob("emoji_*.txt"))[0]
    victim.unlink()  # as if the process died between the PNG and its caption file
    report = build_dataset(out, size_px=64, sources=["emoji"], limit=3, workers=1, progress=False)
    assert report.written == {"emoji": 1} and report.existing == {"emoji": 2}
    assert victim.is_file()


def test_without_skin_tones_leaves_out_the_variants_and_keeps_the_rest_byte_identical(tmp_path):
    """--no-skin-tones: no item with a Fitzpatrick modifier, the others the same bytes as a full build;
    a folder that already holds variants is refused (a build never deletes)."""
    from huabi.data import emoji_source

    entries = emoji_source.load_emoji_entries()
    variants = [e for e in entries if e.is_skin_tone_variant]
    assert len(variants) > 1000 and all(":" in e.name and "skin tone" in e.name for e in variants)
    waving = [e for e in entries if e.name.startswith("waving hand")]
    assert [e.is_skin_tone_variant for e in waving] == [False] + [True] * (len(waving) - 1)
    full, base = tmp_path / "full", tmp_path / "base"
    build_dataset(full, size_px=32, sources=["emoji"], limit=400, workers=1, progress=False)
    report = build_dataset(base, size_px=32, sources=["emoji"], limit=400, workers=1, progress=False, skin_tones=False)
    records = [json.loads(line) for line in (base / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    full_records = [json.loads(line) for line in (full / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert not any(map(emoji_source.record_is_skin_tone_variant, records))
    assert any(map(emoji_source.record_is_skin_tone_variant, full_records))
    assert "skin-tone variant" in report.summary() and len(report.skipped) == len(variants)
    common = [r["file"] for r in records if (full / r["file"]).is_file()]  # limit spreads over other lists
    assert len(common) > 20
    for name in common:
        assert (base / name).read_bytes() == (full / name).read_bytes()
    with pytest.raises(HuabiError, match=r"already holds \d+ skin-tone variants; build without them into a new folder"):
        build_dataset(full, size_px=32, sources=["emoji"], limit=400, workers=1, progress=False, skin_tones=False)


def test_coloured_backgrounds_are_seeded_and_named_in_captions(tmp_path):
    names = ["white", "light blue", "light yellow"]
    out = tmp_path / "colours"
    build_dataset(out, size_px=64, sources=["emoji"], limit=6, workers=1, progress=False, backgrounds=names)
    for png in sorted(out.glob("*.png")):
        chosen = choose_background(0, png.stem, names)
        with Image.open(png) as image:
            assert image.getpixel((0, 0)) == BACKGROUNDS[chosen]
        assert f"on a {chosen} background" in png.with_suffix(".txt").read_text(encoding="utf-8")
    assert choose_background(0, "emoji_1f34e", names) == choose_background(0, "emoji_1f34e", names)
    assert len({choose_background(seed, "emoji_1f34e", names) for seed in range(20)}) > 1


def test_compose_square_centres_with_margin_and_rejects_blank():
    subject = Image.new("RGBA", (100, 50), (0, 0, 0, 0))
    subject.paste((255, 0, 0, 255), (10, 10, 90, 30))  # an 80x20 red bar inside transparent padding
    image = compose_square(subject, 64, (255, 255, 255))
    assert image.size == (64, 64) and image.mode == "RGB"
    bbox = Image.eval(image.convert("L"), lambda v: 255 - v).getbbox()
    # 64 px minus a 1/16 margin each side = 56 px wide; 20/80 of that = 14 px tall, centred.
    assert bbox == (4, 25, 60, 39)
    with pytest.raises(HuabiError, match="blank image"):
        compose_square(Image.new("RGBA", (10, 10), (0, 0, 0, 0)), 64, (255, 255, 255))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size_px": 4}, "size_px must be an integer from 8 to 4096, got 4"),
        ({"sources": ["emoji", "photos"]}, "sources must be a non-empty subset of emoji, openclipart"),
        ({"sources": []}, "sources must be a non-empty subset"),
        ({"limit": 0}, "limit must be a positive integer or None, got 0"),
        ({"workers": 0}, "workers must be at least 1, got 0"),
        ({"backgrounds": ["mauve"]}, "backgrounds must be names from white, light blue"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    with pytest.raises(HuabiError, match=message):
        build_dataset(tmp_path / "x", progress=False, **kwargs)


def test_output_path_that_is_a_file_is_an_error(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(HuabiError, match=r"output path .*file.txt exists and is not a folder"):
        build_dataset(target, progress=False, limit=1)


def test_command_line_builds_and_reports_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    assert build.main(["--out", str(out), "--size", "64", "--sources", "emoji", "--limit", "2"]) == 0
    assert len(CaptionedFolder(out)) == 2
    assert "[emoji] 2/2" in capsys.readouterr().err
    assert build.main(["--out", str(out), "--sources", "fonts", "--quiet"]) == 2
    assert "error: sources must be a non-empty subset" in capsys.readouterr().err
