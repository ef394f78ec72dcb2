"""End-to-end tests of the ``huabi`` command on tiny random-weight checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_runner import run
from huabi.core.infotext import parse_infotext
from huabi.models.family import ModelFamily
from huabi.service.pngio import read_infotext
from tiny_models import write_tiny_single_file


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory) -> Path:
    return write_tiny_single_file(tmp_path_factory.mktemp("sd1"), ModelFamily.SD1)


def generate(capsys, model: Path, out: Path, *extra: str) -> list[Path]:
    code, stdout, stderr = run(
        capsys, "generate", "a red apple", "--model", model, "--steps", "3", "--size", "64x64",
        "--out", out, "--quiet", *extra,
    )
    assert code == 0, stderr
    return [Path(line) for line in stdout.splitlines()]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_generate_writes_pngs_with_infotext(capsys, sd1_file, tmp_path):
    paths = generate(capsys, sd1_file, tmp_path, "--seed", "1234", "-n", "blurry", "--batch-size", "2",
                     "--sampler", "Euler a", "--cfg", "5")
    assert [p.name for p in paths] == ["00000-1234.png", "00001-1235.png"]
    parsed = parse_infotext(read_infotext(paths[1]))
    assert parsed.prompt == "a red apple"
    assert parsed.negative_prompt == "blurry"
    assert parsed.params["Seed"] == "1235"
    assert parsed.params["Sampler"] == "Euler a"
    assert parsed.params["Schedule type"] == "Normal"  # "Automatic" is recorded as what it resolved to
    assert parsed.params["CFG scale"] == "5"
    assert parsed.params["Size"] == "64x64"
    assert parsed.params["Model"] == sd1_file.stem
    assert len(parsed.params["Model hash"]) == 10
    assert parsed.params["Version"].startswith("huabi ")
    assert Image.open(paths[0]).size == (64, 64)


def test_batch_image_equals_single_run_with_next_seed(capsys, sd1_file, tmp_path):
    batch = generate(capsys, sd1_file, tmp_path / "batch", "--seed", "77", "--batch-size", "2",
                     "--sampler", "DPM++ 2M SDE")
    single = generate(capsys, sd1_file, tmp_path / "single", "--seed", "78", "--sampler", "DPM++ 2M SDE")
    # Batched and single UNet calls may round differently in the last float bit; pixels agree to 1 level.
    assert np.abs(pixels(batch[1]) - pixels(single[0])).max() <= 1


def test_random_seed_is_recorded(capsys, sd1_file, tmp_path):
    [path] = generate(capsys, sd1_file, tmp_path, "--seed", "-1")
    seed = int(parse_infotext(read_infotext(path)).params["Seed"])
    assert seed >= 0 and path.name.endswith(f"-{seed}.png")


def test_from_image_regenerates_the_same_pixels(capsys, sd1_file, tmp_path):
    [original] = generate(capsys, sd1_file, tmp_path / "a", "--seed", "5", "--sampler", "Heun",
                          "--schedule", "Karras", "--clip-skip", "2")
    code, stdout, stderr = run(capsys, "generate", "--from", original, "--model", sd1_file,
                               "--out", tmp_path / "b", "--quiet")
    assert code == 0, stderr
    again = Path(stdout.strip())
    assert np.array_equal(pixels(original), pixels(again))
    assert read_infotext(original) == read_infotext(again)


def test_from_image_finds_model_by_hash_in_models_dir(capsys, sd1_file, tmp_path):
    [original] = generate(capsys, sd1_file, tmp_path / "a", "--seed", "9")
    code, stdout, stderr = run(capsys, "generate", "--from", original, "--models-dir", sd1_file.parent,
                               "--steps", "2", "--out", tmp_path / "b", "--quiet")
    assert code == 0, stderr
    regenerated = parse_infotext(read_infotext(Path(stdout.strip())))
    assert regenerated.params["Steps"] == "2"  # the flag overrides the image's value
    assert regenerated.params["Seed"] == "9"


def test_info_prints_parameters(capsys, sd1_file, tmp_path):
    [path] = generate(capsys, sd1_file, tmp_path, "--seed", "3")
    code, stdout, _ = run(capsys, "info", path)
    assert code == 0
    assert stdout.startswith("a red apple\n") and "Seed: 3" in stdout


def test_models_lists_family_and_hash(capsys, sd1_file, monkeypatch):
    code, stdout, _ = run(capsys, "models", "--models-dir", sd1_file.parent)
    assert code == 0
    line = next(l for l in stdout.splitlines() if l.startswith(sd1_file.stem))
    assert "sd1" in line.lower()


class NeedsCode:
    def __reduce__(self):
        return (print, ("this would run",))


def bad_inputs(tmp_path: Path, sd1_file: Path) -> dict[str, tuple[list[str], str]]:
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(sd1_file.read_bytes()[:1000])
    not_a_model = tmp_path / "notes.safetensors"
    not_a_model.write_text("hello")
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": NeedsCode()}, evil)
    empty_prompts = tmp_path / "prompts.txt"
    empty_prompts.write_text("\n  \n")
    plain_png = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain_png)
    styles = tmp_path / "styles.csv"
    styles.write_text("name,prompt,negative_prompt\nSharp,sharp focus,blurry\n", encoding="utf-8")
    common = ["--model", str(sd1_file), "--quiet", "--out", str(tmp_path / "out")]
    return {
        "unknown sampler": (["generate", "x", "--sampler", "Eular", *common], "unknown sampler 'Eular'; valid: Euler, Euler a"),
        "unknown schedule": (["generate", "x", "--schedule", "Fancy", *common], "unknown schedule type 'Fancy'; valid: Automatic"),
        "size not multiple of 8": (["generate", "x", "--size", "100x64", *common], "--size width: must be a multiple of 8, got 100"),
        "malformed size": (["generate", "x", "--size", "big", *common], "size: expected WIDTHxHEIGHT"),
        "absurd size": (["generate", "x", "--size", "8192x8192", "--batch-size", "64", *common], "GiB free; use a smaller size or batch"),
        "steps < 1": (["generate", "x", "--steps", "0", *common], "steps: must be from 1 to 1000, got 0"),
        "missing model": (["generate", "x", "--model", str(tmp_path / "nope.safetensors"), "--quiet"], "nope.safetensors: no such file"),
        "truncated model": (["generate", "x", "--model", str(truncated), "--quiet"], "truncated.safetensors"),
        "non-model file": (["generate", "x", "--model", str(not_a_model), "--quiet"], "notes.safetensors"),
        "ckpt that needs code": (["generate", "x", "--model", str(evil), "--quiet"], "evil.ckpt"),
        "empty prompt file": (["generate", "--prompt-file", str(empty_prompts), *common], "has no prompts"),
        "png without infotext": (["generate", "--from", str(plain_png), *common], "plain.png: no generation parameters"),
        "info on non-image": (["info", str(empty_prompts)], "prompts.txt"),
        "unknown mj parameter": (["generate", "x --zoom 2", *common], "prompt: unknown parameter --zoom; known: --ar"),
        "malformed --ar": (["generate", "x --ar 3x2", *common], "prompt: --ar expects WIDTH:HEIGHT"),
        "chaos out of range": (["generate", "x --chaos 150", *common], "prompt: --chaos must be a whole number from 0 to 100, got 150"),
        "bad --q": (["generate", "x --q 3", *common], "prompt: --q must be one of .25, .5, 1, 2, got 3"),
        "--iw without image": (["generate", "x --iw 1", *common], "prompt: --iw needs an image prompt"),
        "unknown style": (["generate", "x", "--style", "Noir", "--styles-file", str(styles), *common],
                          "style: unknown style 'Noir' in " + str(styles) + "; available: Sharp"),
        "missing styles file": (["generate", "x", "--style", "Sharp", "--styles-file", str(tmp_path / "none.csv"), *common],
                                "none.csv: no such file"),
        "missing wildcard": (["generate", "a __flowers__", "--wildcards", str(tmp_path), *common],
                             "wildcards: no wildcard file for __flowers__"),
    }


BAD_INPUT_CASES = [
    "unknown sampler", "unknown schedule", "size not multiple of 8", "malformed size", "absurd size",
    "steps < 1", "missing model", "truncated model", "non-model file", "ckpt that needs code",
    "empty prompt file", "png without infotext", "info on non-image",
    "unknown mj parameter", "malformed --ar", "chaos out of range", "bad --q", "--iw without image",
    "unknown style", "missing styles file", "missing wildcard",
]


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_is_one_line_error(capsys, sd1_file, tmp_path, case):
    argv, expected = bad_inputs(tmp_path, sd1_file)[case]
    code, stdout, stderr = run(capsys, *argv)
    assert code == 2
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("huabi: error: ")
    assert expected in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_midjourney_parameters_batch_of_four_and_grid(capsys, sd1_file, tmp_path):
    paths = generate(capsys, sd1_file, tmp_path, "--seed", "1", "-n", "blurry")  # a plain prompt: one image
    assert len(paths) == 1
    code, stdout, stderr = run(
        capsys, "generate", "a red apple, shiny --no fog, cars --seed 40 --q .5 --chaos 60 --v 6 --style raw",
        "--model", sd1_file, "--steps", "4", "--size", "64x64", "--out", tmp_path / "mj", "--quiet", "-n", "blurry",
    )
    assert code == 0, stderr
    assert "ignored --v 6, --style raw" in stderr
    paths = [Path(line) for line in stdout.splitlines()]
    assert [p.name for p in paths] == ["00000-40.png", "00001-41.png", "00002-42.png", "00003-43.png", "grid-0000.png"]
    assert Image.open(paths[-1]).size == (128, 128)  # 2x2 grid of 64x64
    assert read_infotext(paths[-1]) == read_infotext(paths[0])  # the grid carries the first image's infotext
    first = parse_infotext(read_infotext(paths[0]))
    assert first.negative_prompt == "blurry, fog, cars"
    assert first.params["Steps"] == "2" and first.params["Chaos"] == "60"
    assert "--" not in first.prompt
    # Each chaos image's infotext redoes it exactly.
    code, stdout, stderr = run(capsys, "generate", "--from", paths[2], "--model", sd1_file,
                               "--out", tmp_path / "again", "--quiet")
    assert code == 0, stderr
    assert np.array_equal(pixels(paths[2]), pixels(Path(stdout.strip())))
    # --mj without parameters: batch of 4 and a grid too; an explicit batch size wins.
    paths = generate(capsys, sd1_file, tmp_path / "mj2", "--mj", "--batch-size", "2", "--steps", "2")
    assert [p.name.startswith("grid-") for p in paths] == [False, False, True]


def test_tile_flag_and_parameter_record_tiling(capsys, sd1_file, tmp_path):
    [flagged] = generate(capsys, sd1_file, tmp_path / "a", "--seed", "8", "--tile")
    assert parse_infotext(read_infotext(flagged)).params["Tiling"] == "True"
    code, stdout, stderr = run(capsys, "generate", "a red apple --tile --seed 8", "--model", sd1_file, "--steps", "3",
                               "--size", "64x64", "--batch-size", "1", "--out", tmp_path / "b", "--quiet")
    assert code == 0, stderr
    [in_prompt] = [Path(line) for line in stdout.splitlines()]  # one image: no grid is written
    assert in_prompt.name == "00000-8.png"
    assert np.array_equal(pixels(flagged), pixels(in_prompt))


def test_styles_and_wildcards_from_the_cli(capsys, sd1_file, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "wildcards").mkdir(parents=True)
    (home / "wildcards" / "fruit.txt").write_text("apple\npear\n", encoding="utf-8")
    (home / "styles.csv").write_text(
        'name,prompt,negative_prompt\nPhoto,"photo of {prompt}, 35mm",cartoon\nSharp,sharp focus,blurry\n',
        encoding="utf-8",
    )
    monkeypatch.setenv("HUABI_HOME", str(home))
    code, stdout, stderr = run(
        capsys, "generate", "a {red|green} __fruit__, (shiny:1.2)", "--style", "Photo", "--style", "Sharp",
        "--model", sd1_file, "--steps", "2", "--size", "64x64", "--seed", "3", "--batch-size", "2",
        "--out", tmp_path / "out", "--quiet",
    )
    assert code == 0, stderr
    paths = [Path(line) for line in stdout.splitlines()]
    assert [p.name for p in paths] == ["00000-3.png", "00001-4.png"]
    for path in paths:
        parsed = parse_infotext(read_infotext(path))
        assert parsed.params["Template"] == "photo of a {red|green} __fruit__, (shiny:1.2), 35mm, sharp focus"
        assert parsed.prompt.startswith("photo of a ") and parsed.prompt.endswith(", (shiny:1.2), 35mm, sharp focus")
        assert parsed.prompt.split()[3] in {"red", "green"} and parsed.prompt.split()[4].rstrip(",") in {"apple", "pear"}
        assert parsed.negative_prompt == "cartoon, blurry"
    code, stdout, stderr = run(
        capsys, "generate", "a {red|green} __fruit__", "--combinatorial", "--model", sd1_file, "--steps", "1",
        "--size", "64x64", "--seed", "3", "--out", tmp_path / "comb", "--quiet",
    )
    assert code == 0, stderr
    prompts = sorted(parse_infotext(read_infotext(Path(p))).prompt for p in stdout.splitlines())
    assert prompts == ["a green apple", "a green pear", "a red apple", "a red pear"]
