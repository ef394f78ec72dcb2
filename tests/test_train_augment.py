"""--max-train-epochs, --flip-aug, --random-crop and --color-aug of user training (kohya semantics).

Step counts are computed by hand from kohya's rule ``steps = epochs * ceil(batches per epoch /
accumulation)``; flips with cached latents are checked against the uncached path (which encodes
the mirrored pixels each step) and against the VAE encoding of a mirrored copy of the file;
colour augmentation against colorsys / the RandomGamma formula.
"""

from __future__ import annotations

import colorsys
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors import safe_open

from huabi.errors import HuabiError
from huabi.train.augment import Augmentation, color_augment, crop_offsets
from huabi.train.dataset import DatasetEntry
from huabi.train.user_config import UserTrainConfig
from huabi.train.user_train import UserTrainer, load_pixels


def square_dataset(root: Path, images: int, repeats: int, size=(64, 64)) -> Path:
    group = root / "data" / f"{repeats}_zq mark"
    group.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
        array[:, : size[0] // 3] = (220, 40 + 30 * i, 60)  # a left-only band: mirroring changes the image
        array[::7, :, 2] = 255
        Image.fromarray(array).save(group / f"img{i}.png")
    return root / "data"


def config_for(tmp_path: Path, model: Path, images=3, repeats=1, **changes) -> UserTrainConfig:
    values = dict(mode="lora", train_data_dir=str(square_dataset(tmp_path, images, repeats)),
                  output=str(tmp_path / "out" / "zq.safetensors"), model=str(model), resolution=64, min_bucket_reso=64,
                  max_train_steps=3, network_dim=4, network_alpha=2.0, learning_rate=1e-2, save_precision="float")
    values.update(changes)
    return UserTrainConfig(**values)


def quiet(config: UserTrainConfig) -> UserTrainer:
    trainer = UserTrainer(config, log=lambda message: None, progress=False)
    trainer.started_at = 0
    return trainer


def network_tensors(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.network.state_dict().items()}


# ---------------------------------------------------------------- --max-train-epochs


@pytest.mark.parametrize(("images", "repeats", "batch", "accumulation", "epochs", "batches", "steps"), [
    # 5 images x 3 repeats = 15 items, batch 2 -> ceil(15/2) = 8 batches; accumulation 3 -> ceil(8/3) = 3 steps/epoch
    (5, 3, 2, 3, 2, 8, 6),
    # 2 x 2 = 4 items, batch 1 -> 4 batches, no accumulation -> 4 steps/epoch, 3 epochs
    (2, 2, 1, 1, 3, 4, 12),
    # 3 x 1 = 3 items, batch 4 -> 1 batch (shorter than the batch size); accumulation 2 -> 1 step/epoch
    (3, 1, 4, 2, 5, 1, 5),
])
def test_max_train_epochs_overrides_steps_with_kohyas_count(images, repeats, batch, accumulation, epochs, batches, steps,
                                                           tiny_sd1_file, tmp_path):
    config = config_for(tmp_path, tiny_sd1_file, images=images, repeats=repeats, train_batch_size=batch,
                        gradient_accumulation_steps=accumulation, max_train_epochs=epochs, max_train_steps=999)
    trainer = quiet(config)
    trainer.setup()
    assert (trainer.batches_per_epoch, trainer.max_steps) == (batches, steps)
    # every epoch is every batch exactly once; accumulation windows never cross an epoch's end
    seen: dict[int, int] = {}
    for step in range(steps):
        micro = trainer.micro_steps_of(step)
        assert 1 <= len(micro) <= accumulation
        assert micro.start // batches == (micro.stop - 1) // batches == step // (steps // epochs)
        for micro_step in micro:
            for entry in trainer.batch_entries(micro_step):
                seen[entry] = seen.get(entry, 0) + 1
    assert seen == {entry: epochs * repeats for entry in range(images)}


def test_max_train_epochs_trains_and_saves_per_epoch(tiny_sd1_file, tmp_path):
    # 3 images, batch 1, accumulation 2: 3 batches -> 2 steps per epoch (2 + 1 micro-batches); 2 epochs = 4 steps
    config = config_for(tmp_path, tiny_sd1_file, gradient_accumulation_steps=2, max_train_epochs=2, save_every_n_epochs=1)
    steps: list[int] = []
    result = quiet(config).run(on_step=lambda step, loss: steps.append(step))
    assert result.steps == 4 and steps == [1, 2, 3, 4]
    out = Path(config.output)
    assert (out.parent / "zq-step000002.safetensors").exists()  # the end of epoch 1
    with safe_open(str(out), "pt") as handle:
        meta = handle.metadata()
    assert (meta["ss_max_train_steps"], meta["ss_num_epochs"], meta["ss_epoch"], meta["ss_num_batches_per_epoch"]) == ("4", "2", "2", "3")


def test_max_train_epochs_must_be_positive(tmp_path):
    with pytest.raises(HuabiError, match="max-train-epochs must be an integer >= 1, got 0"):
        config_for(tmp_path, Path("m.safetensors"), max_train_epochs=0).validate()


# ---------------------------------------------------------------- caching rules


@pytest.mark.parametrize("flag", ["random_crop", "color_aug"])
def test_random_crop_and_color_aug_refuse_cached_latents(flag, tmp_path):
    from huabi.train.user_cli import config_from_args

    message = "--random-crop and --color-aug change the pixels at every step, so latents cannot be cached"
    for cache in (dict(cache_latents=True), dict(cache_latents_to_disk=True)):
        with pytest.raises(HuabiError, match=message):
            config_for(tmp_path, Path("m.safetensors"), **{flag: True}, **cache).validate()
    with pytest.raises(HuabiError, match=message):
        config_from_args("lora", ["d", "--output", "x.safetensors", "--" + flag.replace("_", "-"), "--cache-latents"])
    config, _ = config_from_args("lora", ["d", "--output", "x.safetensors", "--" + flag.replace("_", "-")])
    assert not config.caches_latents  # the default gives way to the augmentation
    flip_only, _ = config_from_args("lora", ["d", "--output", "x.safetensors", "--flip-aug", "--cache-latents-to-disk"])
    assert flip_only.caches_latents


# ---------------------------------------------------------------- flips


def test_flip_aug_cached_latents_hold_the_mirrored_image_and_train_as_uncached(tiny_sd1_file, tmp_path):
    config = config_for(tmp_path / "a", tiny_sd1_file, flip_aug=True, max_train_steps=6)
    cached = quiet(config)
    cached.run()
    entry = cached.dataset.entries[0]
    flipped = cached.latents.get(entry, 64, 64, flipped=True)
    plain = cached.latents.get(entry, 64, 64)
    mirror_path = tmp_path / "mirror.png"
    with Image.open(entry.path) as image:
        ImageOps.mirror(image.convert("RGB")).save(mirror_path)
    mirror_entry = DatasetEntry(path=mirror_path, caption="", width_px=64, height_px=64, repeats=1, group="x")
    assert torch.equal(flipped, cached.latents.get(mirror_entry, 64, 64))
    assert not torch.allclose(flipped, plain)
    assert cached.latents.misses == 2 * 3 + 1  # both flips of the 3 images, and the mirror file

    draws = [cached.batch_latents([0], cached.plan.training_bucket(0), torch.Generator().manual_seed(k))[0] for k in range(12)]
    picked_flip = [torch.equal(d[0], flipped) for d in draws]
    assert any(picked_flip) and not all(picked_flip)

    uncached = quiet(dataclasses.replace(config, output=str(tmp_path / "b" / "zq.safetensors"), cache_latents=False))
    uncached.run()
    assert uncached.latents.misses == 0  # encoded per sample, nothing stored
    for key, value in network_tensors(cached).items():
        assert torch.equal(network_tensors(uncached)[key], value), key


def test_flipped_crop_left_is_measured_from_the_other_edge(tmp_path):
    path = tmp_path / "wide.png"
    array = np.zeros((64, 128, 3), dtype=np.uint8)
    array[:, :10] = 255
    Image.fromarray(array).save(path)
    entry = DatasetEntry(path=path, caption="", width_px=128, height_px=64, repeats=1, group="x")
    pixels, (top, left) = load_pixels(entry, 64, 64)
    assert (top, left) == (0, 32)
    mirrored, (top, left_flipped) = load_pixels(entry, 64, 64, flip=True)
    assert left_flipped == 128 - 32 - 64
    assert torch.equal(mirrored, pixels.flip(-1))


# ---------------------------------------------------------------- random crop


def test_random_crop_offsets_cover_every_position_and_match_the_pixels(tmp_path):
    generator = torch.Generator().manual_seed(0)
    lefts = [crop_offsets(132, 64, 128, 64, generator) for _ in range(400)]
    assert {left for left, _ in lefts} == {0, 1, 2, 3, 4} and {top for _, top in lefts} == {0}
    assert crop_offsets(132, 70, 128, 64, None) == (2, 3)  # centred: excess // 2

    path = tmp_path / "wide.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 160, 3), dtype=np.uint8)).save(path)
    entry = DatasetEntry(path=path, caption="", width_px=160, height_px=64, repeats=1, group="x")
    with Image.open(path) as image:
        full = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    seen = set()
    for k in range(8):
        pixels, (top, left) = load_pixels(entry, 64, 64, generator=torch.Generator().manual_seed(k),
                                          augmentation=Augmentation(random_crop=True))
        assert top == 0 and 0 <= left <= 96
        assert np.array_equal(pixels.permute(1, 2, 0).numpy(), full[:, left:left + 64])
        seen.add(left)
    assert len(seen) > 1


def test_random_crop_and_color_aug_train_without_cache(tiny_sd1_file, tmp_path):
    config = config_for(tmp_path, tiny_sd1_file, random_crop=True, color_aug=True, flip_aug=True, max_train_steps=3)
    trainer = quiet(config)
    result = trainer.run()
    assert result.steps == 3 and all(np.isfinite(result.losses))
    assert trainer.latents.misses == 0 and not trainer.latents.memory
    with safe_open(str(result.output), "pt") as handle:
        meta = handle.metadata()
    assert (meta["ss_cache_latents"], meta["ss_random_crop"], meta["ss_color_aug"], meta["ss_flip_aug"]) == ("False", "True", "True", "True")


# ---------------------------------------------------------------- colour


def _generator_for(want) -> torch.Generator:
    for seed in range(1000):
        apply, which, amount = torch.rand(3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()
        if want(apply, which):
            return torch.Generator().manual_seed(seed), amount
    raise AssertionError("no seed found")


def test_color_aug_hue_gamma_or_nothing():
    rng = np.random.default_rng(3)
    pixels = rng.integers(30, 226, (6, 7, 3), dtype=np.uint8)

    generator, _ = _generator_for(lambda apply, which: apply > 0.33)
    assert np.array_equal(color_augment(pixels, generator), pixels)

    generator, amount = _generator_for(lambda apply, which: apply <= 0.33 and which <= 0.5)
    gamma = 0.95 + 0.1 * amount
    expected = np.clip(np.rint(255.0 * (pixels / 255.0) ** gamma), 0, 255)
    assert np.array_equal(color_augment(pixels, generator), expected.astype(np.uint8))

    generator, amount = _generator_for(lambda apply, which: apply <= 0.33 and which > 0.5)
    shift_deg = 2 * (-8 + 16 * amount)  # OpenCV hue units are half degrees
    out = color_augment(pixels, generator).astype(np.float64)
    for y in range(pixels.shape[0]):
        for x in range(pixels.shape[1]):
            h, s, v = colorsys.rgb_to_hsv(*(pixels[y, x] / 255.0))
            expected = np.array(colorsys.hsv_to_rgb((h + shift_deg / 360.0) % 1.0, s, v)) * 255.0
            # 8-bit HSV (hue in 2-degree steps, truncated shift) costs a few levels
            assert np.abs(out[y, x] - expected).max() <= 8, (y, x, out[y, x], expected)
    assert np.abs(out - pixels).max() > 2  # it did change the colours
