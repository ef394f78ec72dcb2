"""Variation seeds and seed resize end to end through ``huabi generate`` and ``--from``."""

from __future__ import annotations

import numpy as np

from huabi.service.pngio import read_infotext
from test_cli import generate, pixels, sd1_file  # noqa: F401


def test_generate_variation_batch_and_from(capsys, sd1_file, tmp_path):
    paths = generate(capsys, sd1_file, tmp_path / "a", "--seed", "7", "--variation-seed", "100",
                     "--variation-strength", "0.5", "--batch-size", "2", "--sampler", "Euler a")
    texts = [read_infotext(p) for p in paths]
    assert "Seed: 7," in texts[0] and "Seed: 7," in texts[1]
    assert "Variation seed: 100, Variation seed strength: 0.5" in texts[0]
    assert "Variation seed: 101, Variation seed strength: 0.5" in texts[1]
    again = generate(capsys, sd1_file, tmp_path / "b", "--from", paths[1])
    # Image 2 of a batch redone alone: batched and single UNet calls may round differently in
    # the last float bit, so pixels agree to 1 level (as in test_cli's batch-vs-single test).
    assert np.abs(pixels(again[0]) - pixels(paths[1])).max() <= 1
    assert read_infotext(again[0]) == texts[1]


def test_generate_strength_one_is_the_variation_seeds_image(capsys, sd1_file, tmp_path):
    varied = generate(capsys, sd1_file, tmp_path / "v", "--seed", "7", "--variation-seed", "100",
                      "--variation-strength", "1", "--sampler", "Euler")
    plain = generate(capsys, sd1_file, tmp_path / "p", "--seed", "100", "--sampler", "Euler")
    assert np.array_equal(pixels(varied[0]), pixels(plain[0]))


def test_generate_seed_resize_from(capsys, sd1_file, tmp_path):
    resized = generate(capsys, sd1_file, tmp_path / "r", "--seed", "7", "--seed-resize-from", "32x32")
    assert "Seed resize from: 32x32" in read_infotext(resized[0])
    again = generate(capsys, sd1_file, tmp_path / "r2", "--from", resized[0])
    assert np.array_equal(pixels(again[0]), pixels(resized[0]))
    plain = generate(capsys, sd1_file, tmp_path / "p", "--seed", "7")
    assert not np.array_equal(pixels(plain[0]), pixels(resized[0]))
