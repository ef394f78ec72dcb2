"""Issue 14: no lost work, no traceback, fail early.

Each test here failed before its fix (see the issue's closing note for the list).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from huabi.cli.main import main
from huabi.errors import HuabiError
from huabi.models.family import ModelFamily
from huabi.service.pngio import next_image_path, read_infotext, save_png
from tiny_models import write_tiny_single_file

SRC = Path(__file__).resolve().parents[1] / "src"
INFOTEXT = "a cat\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 8x8"


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory) -> Path:
    return write_tiny_single_file(tmp_path_factory.mktemp("sd1"), ModelFamily.SD1)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tiny_image(size=(8, 8)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), dtype=np.uint8))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- data loss


def test_next_image_path_claims_are_unique_across_threads(tmp_path):
    claimed: list[Path] = []
    lock = threading.Lock()
    start = threading.Barrier(12)

    def worker() -> None:
        start.wait()
        for _ in range(5):
            path = next_image_path(tmp_path, 100)
            with lock:
                claimed.append(path)

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    numbers = sorted(int(path.name.split("-")[0]) for path in claimed)
    assert numbers == list(range(60))  # every claim its own number, no gaps, no duplicates
    assert len(os.listdir(tmp_path)) == 60


def test_claimed_name_is_filled_by_save_png_and_released_on_failure(tmp_path):
    path = next_image_path(tmp_path, 7)
    assert path.exists() and path.stat().st_size == 0  # the claim is an empty placeholder
    save_png(tiny_image(), path, INFOTEXT)
    assert read_infotext(path) == INFOTEXT
    failing = next_image_path(tmp_path, 8)
    with pytest.raises(HuabiError, match="NUL"):
        save_png(tiny_image(), failing, "a\0b")
    assert sorted(os.listdir(tmp_path)) == ["00000-7.png"]  # no placeholder, no temp file left
    # A path derived from a claim carries no claim: an existing empty file is never replaced.
    (tmp_path / "00005-9.png").write_bytes(b"")
    with pytest.raises(HuabiError, match="already exists"):
        save_png(tiny_image(), path.with_name("00005-9.png"), INFOTEXT)


def test_png_outputs_follow_the_umask(tmp_path):
    path = save_png(tiny_image(), next_image_path(tmp_path, 1), INFOTEXT)
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()


def test_six_concurrent_generate_runs_into_one_folder_lose_nothing(sd1_file, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HUABI_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "huabi.cli.main", "generate", "a red apple", "--model", str(sd1_file),
               "--steps", "2", "--size", "64x64", "--seed", "100", "--batch-count", "3", "--out", str(out), "--quiet"]
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(6)]
    outcomes = [(run.wait(timeout=600), *run.communicate()) for run in runs]
    for code, stdout, stderr in outcomes:
        assert code == 0, stderr
        assert len(stdout.split()) == 3
    printed = [Path(line) for _, stdout, _ in outcomes for line in stdout.split()]
    files = sorted(os.listdir(out))
    assert len(files) == 18 and sorted(p.name for p in printed) == files
    assert sorted(int(name.split("-")[0]) for name in files) == list(range(18))
    for path in printed:
        assert "Seed: 10" in read_infotext(path)


def test_generate_checks_out_before_any_work(capsys, tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    # The model does not exist either: the --out problem must be reported first (before any load).
    code, _, err = run(capsys, "generate", "a cat", "--model", tmp_path / "missing.safetensors", "--out", a_file)
    assert code == 2 and err.strip() == f"huabi: error: --out {a_file}: is a file, not a folder"
    code, _, err = run(capsys, "generate", "a cat", "--out", a_file / "sub")
    assert code == 2 and err.strip() == f"huabi: error: --out {a_file / 'sub'}: cannot create it, {a_file} is a file"
    code, _, err = run(capsys, "generate", "a cat", "--out", "/proc/huabi-outputs")
    assert code == 2 and err.startswith("huabi: error: --out /proc/huabi-outputs: cannot write there")
    assert len(err.splitlines()) == 1


def test_sigint_in_a_batch_prints_the_paths_already_saved(capsys, sd1_file, tmp_path, monkeypatch):
    from huabi.cli import main as cli_main

    original = cli_main._ProgressBar.update

    def interrupt_in_second_batch(self, done, total):  # stands in for Ctrl-C arriving mid-batch
        if done > total // 2:
            raise KeyboardInterrupt
        original(self, done, total)

    monkeypatch.setattr(cli_main._ProgressBar, "update", interrupt_in_second_batch)
    code, out, err = run(capsys, "generate", "a cat", "--model", sd1_file, "--steps", "2", "--size", "64x64",
                         "--seed", "5", "--batch-count", "2", "--out", tmp_path)
    assert code == 130 and "interrupted" in err
    assert out.split() == [str(tmp_path / "00000-5.png")]
    assert os.listdir(tmp_path) == ["00000-5.png"]


def test_sigint_in_training_saves_like_sigterm():
    from huabi.train.__main__ import install_stop_handlers

    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    try:
        stop = install_stop_handlers()
        os.kill(os.getpid(), signal.SIGINT)  # delivered to the main thread before kill returns
        assert stop["requested"] and stop["signal"] == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C aborts without saving
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


# --------------------------------------------------------------------------- preprocess output


@pytest.fixture()
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def test_preprocess_never_overwrites_without_overwrite(capsys, photo, tmp_path):
    before = photo.read_bytes()
    code, _, err = run(capsys, "preprocess", photo, "--module", "canny", "--out", photo)
    assert code == 2 and "already exists (pass --overwrite to replace it)" in err
    code, _, err = run(capsys, "preprocess", photo, "--module", "canny", "--out", photo, "--overwrite")
    assert code == 2 and "is the input image" in err
    assert photo.read_bytes() == before
    other = tmp_path / "edges.png"
    other.write_bytes(b"keep me")
    code, _, err = run(capsys, "preprocess", photo, "--out", other)
    assert code == 2 and other.read_bytes() == b"keep me"
    code, out, _ = run(capsys, "preprocess", photo, "--out", other, "--overwrite")
    assert code == 0 and Image.open(other).format == "PNG"


def test_preprocess_out_folder_and_jpeg_name(capsys, photo, tmp_path):
    folder = tmp_path / "maps"
    folder.mkdir()
    code, out, _ = run(capsys, "preprocess", photo, "--out", folder)
    assert code == 0 and Path(out.strip()) == folder / "photo-canny.png"
    code, out, _ = run(capsys, "preprocess", photo, "--out", tmp_path / "edges.jpg")
    assert code == 0 and Image.open(tmp_path / "edges.jpg").format == "JPEG"
    code, _, err = run(capsys, "preprocess", photo, "--out", tmp_path / "edges.bmpx")
    assert code == 2 and "give the file a .png, .jpg or .webp name" in err


def test_merge_lora_refuses_an_existing_output_before_work(capsys, tmp_path):
    target = tmp_path / "merged.safetensors"
    target.write_bytes(b"precious")
    lora = tmp_path / "style.safetensors"
    from safetensors.torch import save_file
    import torch

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(lora))
    code, _, err = run(capsys, "merge-lora", "huabi-mini", f"{lora}:0.5", "--out", target)
    assert code == 2 and err.strip() == f"huabi: error: --out {target}: already exists (pass --overwrite to replace it)"
    assert target.read_bytes() == b"precious"
