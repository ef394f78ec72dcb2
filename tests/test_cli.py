"""End-to-end tests of the ``huabi`` command on tiny random-weight checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from huabi.cli.main import main
from huabi.core.infotext import parse_infotext
from huabi.models.family import ModelFamily
from huabi.service.pngio import read_infotext
from tiny_models import write_tiny_single_file


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory) -> Path:
    return write_tiny_single_file(tmp_path_factory.mktemp("sd1"), ModelFamily.SD1)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


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
    common = ["--model", str(sd1_file), "--quiet", "--out", str(tmp_path / "out")]
    return {
        "unknown sampler": (["generate", "x", "--sampler", "Eular", *common], "unknown sampler 'Eular'; valid: Euler, Euler a"),
        "unknown schedule": (["generate", "x", "--schedule", "Fancy", *common], "unknown schedule type 'Fancy'; valid: Automatic"),
        "size not multiple of 8": (["generate", "x", "--size", "100x64", *common], "width_px: must be a multiple of 8, got 100"),
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
    }


BAD_INPUT_CASES = [
    "unknown sampler", "unknown schedule", "size not multiple of 8", "malformed size", "absurd size",
    "steps < 1", "missing model", "truncated model", "non-model file", "ckpt that needs code",
    "empty prompt file", "png without infotext", "info on non-image",
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
