"""Aspect-ratio bucketing (seed 000, questions 31-32) and the kohya dataset folder, on hand-computed cases."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from huabi.errors import HuabiError
from huabi.train.buckets import (
    Bucket,
    cover_and_crop,
    design_buckets,
    nearest_bucket,
    plan_buckets,
    smallest_sides,
)
from huabi.train.dataset import process_caption, scan_dataset

SEED_TABLE = [  # the seed's 17 buckets for a 1024 base with a smallest width and height of 512, in its order
    (512, 1024), (576, 1024), (640, 1024), (704, 1024), (768, 1024), (832, 1024), (896, 1024), (960, 1024),
    (1024, 512), (1024, 576), (1024, 640), (1024, 704), (1024, 768), (1024, 832), (1024, 896), (1024, 960),
    (1024, 1024),
]


def sizes(buckets):
    return [(b.width_px, b.height_px) for b in buckets]


def test_seed_table_exactly():
    min_w, min_h = smallest_sides([(512, 1024), (2048, 1024), (700, 700)], 1024)
    assert (min_w, min_h) == (512, 512)
    assert sizes(design_buckets(1024, min_w, min_h)) == SEED_TABLE


def test_smallest_width_not_a_multiple_of_64_takes_one_more_step():
    # "while width > 500: width -= 64": 960, ..., 512, then 512 > 500 gives 448 and stops
    buckets = design_buckets(1024, 500, 1024)
    assert sizes(buckets) == [(w, 1024) for w in range(448, 1024, 64)] + [(1024, 1024)]


def test_square_dataset_has_one_bucket():
    assert sizes(design_buckets(512, *smallest_sides([(300, 300), (512, 512)], 512))) == [(512, 512)]


def test_extreme_aspect_ratio_stops_at_min_side():
    # 100 x 1600 at 512: 32 px wide once 512 tall; buckets stop at the 64 px floor
    min_w, min_h = smallest_sides([(100, 1600)], 512)
    assert min_w == 32 and min_h == 512
    buckets = design_buckets(512, min_w, min_h)
    assert sizes(buckets) == [(64, 512), (128, 512), (192, 512), (256, 512), (320, 512), (384, 512), (448, 512), (512, 512)]
    assert buckets[nearest_bucket(100, 1600, buckets)] == Bucket(64, 512)
    # cover: scale max(64/100, 512/1600) = 0.64 -> 64 x 1024, centre crop rows 256..768
    assert cover_and_crop(100, 1600, Bucket(64, 512)) == ((64, 1024), (0, 256, 64, 768))
    # kohya's --min-bucket-reso 256 floor
    assert sizes(design_buckets(512, min_w, min_h, min_side=256)) == [(256, 512), (320, 512), (384, 512), (448, 512), (512, 512)]


def test_tiny_image_bucket_and_crop_and_no_upscale():
    # 20 x 30 at 512: 341.33 wide once 512 tall -> widths 448, 384, 320
    plan = plan_buckets([(20, 30)], [1], resolution_px=512, batch_size=1)
    assert sizes(plan.buckets) == [(320, 512), (384, 512), (448, 512), (512, 512)]
    # aspect 0.667: |0.625 - 0.667| = 0.042 beats |0.75 - 0.667| = 0.083
    assert plan.buckets[plan.bucket_of[0]] == Bucket(320, 512)
    # scale max(320/20, 512/30) = 17.067 -> 341 x 512, left (341 - 320) // 2 = 10
    assert cover_and_crop(20, 30, Bucket(320, 512)) == ((341, 512), (10, 0, 330, 512))
    small = plan_buckets([(20, 30), (130, 200)], [1, 1], resolution_px=512, batch_size=1, no_upscale=True)
    assert small.training_bucket(0) == Bucket(64, 64) and small.training_bucket(1) == Bucket(128, 192)


def test_nearest_aspect_tie_takes_the_first_bucket():
    buckets = [Bucket(448, 512), Bucket(512, 448), Bucket(512, 512)]
    assert nearest_bucket(480, 480, buckets) == 2
    assert nearest_bucket(100, 100, [Bucket(256, 512), Bucket(512, 256)]) == 0  # |0.5-1| < |2-1|


def test_small_buckets_go_to_the_remaining_bucket_and_batches_are_exact():
    images = [(512, 1024)] * 3 + [(1024, 512)] * 1 + [(1024, 1024)] * 2
    plan = plan_buckets(images, [1, 1, 1, 2, 1, 1], resolution_px=1024, batch_size=2)
    tall = plan.buckets.index(Bucket(512, 1024))
    assert plan.train_bucket_of[:3] == (tall,) * 3
    # the one wide image (2 with repeats) fills a batch: it keeps its bucket; the squares train at R x R
    assert plan.training_bucket(3) == Bucket(1024, 512)
    assert plan.train_bucket_of[4:] == (-1, -1)
    members = plan.members()
    assert sorted(len(v) for v in members.values()) == [2, 2, 3]
    assert plan.batches_per_epoch() == 1 + 1 + 2  # 3 tall images: a batch of 2 and one of 1
    epoch0 = plan.epoch_batches(0, seed=5)
    assert epoch0 == plan.epoch_batches(0, seed=5)  # a pure function of (seed, epoch)
    assert sorted(i for batch in epoch0 for i in batch) == [0, 1, 2, 3, 3, 4, 5]
    for batch in epoch0:  # one bucket per batch
        assert len({plan.train_bucket_of[i] for i in batch}) == 1
    assert "remain" in plan.table() and "1024x512" in plan.table()


def test_weighted_bucket_choice_follows_remaining_counts():
    # bucket A 8 items, bucket B 2: B's batch should come first in ~2/10 of epochs
    plan = plan_buckets([(512, 1024)] * 8 + [(1024, 512)] * 2, [1] * 10, resolution_px=1024, batch_size=2)
    first_is_b = sum(plan.train_bucket_of[plan.epoch_batches(e, 1)[0][0]] == plan.buckets.index(Bucket(1024, 512))
                     for e in range(400))
    assert 0.13 < first_is_b / 400 < 0.27


def test_bucket_errors():
    with pytest.raises(HuabiError, match="resolution must be a multiple of 64, got 500"):
        plan_buckets([(10, 10)], [1], resolution_px=500, batch_size=1)
    with pytest.raises(HuabiError, match="no images in any bucket"):
        plan_buckets([(100, 1600)], [1], resolution_px=512, batch_size=1, min_side=256, max_aspect_error=0.01)


# ---------------------------------------------------------------- dataset folder


def _image(path, size=(64, 48), color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_kohya_folders_repeats_class_tokens_captions_and_unreadable(tmp_path):
    _image(tmp_path / "data" / "10_sks dog" / "a.png")
    _image(tmp_path / "data" / "10_sks dog" / "b.jpg", (40, 80))
    (tmp_path / "data" / "10_sks dog" / "b.caption").write_text("sks dog, on grass\n", encoding="utf-8")
    (tmp_path / "data" / "10_sks dog" / "b.txt").write_text("ignored: .caption comes first", encoding="utf-8")
    _image(tmp_path / "data" / "2_cat" / "c.png")
    (tmp_path / "data" / "2_cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "data" / "2_cat" / "empty.jpg").write_bytes(b"")
    (tmp_path / "data" / "not_a_group").mkdir()
    _image(tmp_path / "reg" / "1_dog" / "r.png")
    data = scan_dataset(tmp_path / "data", reg_dir=tmp_path / "reg")
    by_name = {e.path.name: e for e in data.entries}
    assert by_name["a.png"].caption == "sks dog" and by_name["a.png"].repeats == 10
    assert by_name["b.jpg"].caption == "sks dog, on grass" and (by_name["b.jpg"].width_px, by_name["b.jpg"].height_px) == (40, 80)
    assert by_name["c.png"].caption == "cat" and by_name["c.png"].repeats == 2
    assert by_name["r.png"].is_reg and not by_name["a.png"].is_reg
    assert len(data.skipped) == 2
    assert data.summary() == "3 training image(s) (22 with repeats), 1 regularization image(s); 2 unreadable image(s) skipped"
    assert data.tag_frequency()["10_sks dog"] == {"sks dog": 2, "on grass": 1}


def test_dataset_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(HuabiError, match=r"dataset folder .*empty has no readable images$"):
        scan_dataset(tmp_path / "empty")
    (tmp_path / "bad" / "1_x").mkdir(parents=True)
    (tmp_path / "bad" / "1_x" / "a.png").write_bytes(b"junk")
    with pytest.raises(HuabiError, match=r"has no readable images \(1 unreadable image\(s\) skipped\)"):
        scan_dataset(tmp_path / "bad")
    with pytest.raises(HuabiError, match="does not exist"):
        scan_dataset(tmp_path / "missing")


def test_caption_shuffle_keeps_leading_tokens_and_dropout():
    caption = "sks, a, b, c, d, e"
    seen = set()
    for step in range(30):
        out = process_caption(caption, torch.Generator().manual_seed(step), shuffle=True, keep_tokens=1)
        assert out.startswith("sks, ") and sorted(out.split(", ")) == sorted(caption.split(", "))
        seen.add(out)
    assert len(seen) > 10
    again = process_caption(caption, torch.Generator().manual_seed(3), shuffle=True, keep_tokens=1)
    assert again == process_caption(caption, torch.Generator().manual_seed(3), shuffle=True, keep_tokens=1)
    dropped = sum(process_caption(caption, torch.Generator().manual_seed(s), dropout_rate=0.25) == "" for s in range(400))
    assert 60 < dropped < 140
    assert process_caption(caption, torch.Generator(), dropout_rate=0.0) == caption
