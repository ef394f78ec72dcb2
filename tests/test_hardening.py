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
from cli_runner import run
from huabi.errors import HuabiError
from huabi.models.family import ModelFamily
from huabi.service.pngio import next_image_path, read_infotext, save_png
from tiny_models import write_tiny_single_file

SRC = Path(__file__).resolve().parents[1] / "src"
INFOTEXT = "a cat\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 8x8"


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory) -> Path:
    return write_tiny_single_file(tmp_path_factory.mktemp("sd1"), ModelFamily.SD1)


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

    def interrupt_in_second_batch(self, event):  # stands in for Ctrl-C arriving mid-batch
        if event.step > event.total // 2:
            raise KeyboardInterrupt
        original(self, event)

    monkeypatch.setattr(cli_main._ProgressBar, "update", interrupt_in_second_batch)
    code, out, err = run(capsys, "generate", "a cat", "--model", sd1_file, "--steps", "2", "--size", "64x64",
                         "--seed", "5", "--batch-count", "2", "--out", tmp_path)
    assert code == 130 and "interrupted" in err
    assert out.split() == [str(tmp_path / "00000-5.png")]
    assert os.listdir(tmp_path) == ["00000-5.png"]


SIGINT_CHILD = """
import os, signal, sys
from huabi.train.__main__ import install_stop_handlers
stop = install_stop_handlers()
os.kill(os.getpid(), signal.SIGINT)  # one thread here: handled before kill returns
assert stop["requested"] and stop["signal"] == signal.SIGINT, stop
try:
    os.kill(os.getpid(), signal.SIGINT)
except KeyboardInterrupt:
    print("second Ctrl-C aborted")
    sys.exit(0)
sys.exit(3)
"""


def test_sigint_in_training_saves_like_sigterm():
    # In a child process: a signal sent to the test process itself would land in whatever thread
    # earlier tests left running (a random-order run died here once).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-c", SIGINT_CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "second Ctrl-C aborted"
    assert "SIGINT: saving after this step (Ctrl-C again to abort without saving)" in run.stderr


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


# --------------------------------------------------------------------------- hostile files


def png_with_chunk(path: Path, kind: bytes, data: bytes) -> Path:
    """An 8x8 PNG with one extra chunk (CRC correct) before IEND."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    png = buffer.getvalue()
    end = png.rindex(b"IEND") - 4
    chunk = struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(png[:end] + chunk + png[end:])
    return path


def bomb_png(path: Path, width: int = 60000, height: int = 60000) -> Path:
    """A tiny PNG whose header claims a huge image (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def text_bombs(tmp_path_factory) -> dict[str, Path]:
    import zlib

    folder = tmp_path_factory.mktemp("bombs")
    inflating = zlib.compress(b"a" * (64 * 2**20), 9)  # 64 MiB of text in ~64 KB
    return {
        "huge tEXt": png_with_chunk(folder / "big.png", b"tEXt", b"parameters\0" + b"a" * (2 * 2**20)),
        "zTXt bomb": png_with_chunk(folder / "z.png", b"zTXt", b"parameters\0\0" + inflating),
        "iTXt bomb": png_with_chunk(folder / "i.png", b"iTXt", b"parameters\0\1\0\0\0" + inflating),
    }


@pytest.mark.parametrize("case", ["huge tEXt", "zTXt bomb", "iTXt bomb"])
def test_png_text_bombs_are_one_line_errors_in_info_and_from(capsys, text_bombs, case, tmp_path):
    path = text_bombs[case]
    code, out, err = run(capsys, "info", path)
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert "more than huabi's limit of 1,048,576" in err
    code, _, err = run(capsys, "generate", "--from", path, "--out", tmp_path / "o")
    assert code == 2 and len(err.splitlines()) == 1 and "limit of 1,048,576" in err
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


def test_text_chunk_just_under_the_limit_still_reads(tmp_path):
    import zlib

    text = "a cat " * 1000 + "\nSteps: 2, Seed: 1"
    path = png_with_chunk(tmp_path / "ok.png", b"zTXt", b"parameters\0\0" + zlib.compress(text.encode("latin-1")))
    assert read_infotext(path) == text


def test_decompression_bomb_images_are_refused_before_decoding(capsys, sd1_file, tmp_path):
    from huabi.service.images import load_image, load_mask
    from huabi.service.upscale import open_image

    bomb = bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 100
    limit = "more than huabi's limit of 134,217,728 pixels|larger than huabi's limit of 134,217,728 pixels"
    for read in (lambda: load_image(bomb, what="IP-Adapter image"), lambda: load_mask(bomb, 64, 64),
                 lambda: open_image(bomb), lambda: read_infotext(bomb)):
        with pytest.raises(HuabiError, match=limit):
            read()
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), "white").save(photo)
    for argv in (["edit", bomb, "a cat", "--model", sd1_file, "--out", tmp_path / "o"],
                 ["edit", photo, "a cat", "--mask", bomb, "--model", sd1_file, "--steps", "1", "--out", tmp_path / "o"],
                 ["preprocess", bomb, "--out", tmp_path / "map.png"],
                 ["upscale", bomb, "--out", tmp_path / "o"]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and len(err.splitlines()) == 1, err
        assert "134,217,728 pixels" in err
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


def _safetensors(path: Path, header: bytes | dict, data: bytes = b"") -> Path:
    import json
    import struct

    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.fixture()
def broken_safetensors(tmp_path) -> dict[str, tuple[Path, str]]:
    import torch
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(2, 2)}, str(good))
    trailing = tmp_path / "trailing.safetensors"
    trailing.write_bytes(good.read_bytes() + b"\0" * 64)
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    return {
        "deep": (_safetensors(tmp_path / "deep.safetensors", b'{"__metadata__":' + b"[" * 200_000 + b"]" * 200_000 + b"}"),
                 "header JSON is nested too deeply"),
        "trailing": (trailing, "64 bytes after the last tensor's data"),
        "overlap": (_safetensors(tmp_path / "overlap.safetensors", {"a": entry, "b": entry}, b"\0" * 8),
                    "tensor 'b' overlaps another tensor"),
        "gap": (_safetensors(tmp_path / "gap.safetensors",
                             {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16),
                "tensor 'a' leaves a gap before it"),
        "metadata": (_safetensors(tmp_path / "meta.safetensors", {"__metadata__": {"x": [1]}, "a": entry}, b"\0" * 8),
                     "__metadata__ must map names to strings"),
        "negative": (_safetensors(tmp_path / "neg.safetensors",
                                  {"a": {"dtype": "F32", "shape": [-2, -4], "data_offsets": [0, 32]}}, b"\0" * 32),
                     "bad header entry for tensor 'a'"),
    }


@pytest.mark.parametrize("case", ["deep", "trailing", "overlap", "gap", "metadata", "negative"])
def test_safetensors_header_attacks_are_one_line_errors(capsys, broken_safetensors, case, tmp_path):
    path, message = broken_safetensors[case]
    good = path.with_name("good.safetensors")
    for argv in (["inspect", "--no-hash", path], ["merge", good, path, "--out", tmp_path / "m.safetensors"],
                 ["generate", "x", "--model", path, "--out", tmp_path / "o"]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and len(err.splitlines()) == 1 and message in err, (argv, err)
    assert not (tmp_path / "m.safetensors").exists()


def test_all_integer_checkpoint_is_refused(capsys, sd1_file, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    integers = tmp_path / "ints.safetensors"
    save_file({k: v.to(torch.int32) for k, v in load_file(str(sd1_file)).items()}, str(integers))
    code, _, err = run(capsys, "generate", "x", "--model", integers, "--steps", "1", "--out", tmp_path / "o")
    assert code == 2 and len(err.splitlines()) == 1
    assert "of its layer weights are integers, not floating point" in err


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_diffusers_folder_whose_text_encoder_bin_needs_code(capsys, tmp_path):
    import torch
    from tiny_models import write_tiny_diffusers_folder

    folder = write_tiny_diffusers_folder(tmp_path / "pipe", ModelFamily.SD1)
    marker = tmp_path / "PWNED"
    for weights in (folder / "text_encoder").glob("*.safetensors"):
        weights.unlink()
    torch.save({"weight": _RunsCode(marker)}, folder / "text_encoder" / "pytorch_model.bin")
    capsys.readouterr()  # the fixture writer's own progress bars
    code, _, err = run(capsys, "generate", "x", "--model", folder, "--steps", "1", "--out", tmp_path / "o")
    assert code == 2 and len(err.splitlines()) == 1
    assert "text encoder pytorch_model.bin: this file needs code execution to load" in err
    assert not marker.exists()


def test_code_carrying_adapters_are_refused_in_huabis_words(capsys, sd1_file, tmp_path):
    import torch

    marker = tmp_path / "PWNED"
    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    torch.save({"string_to_param": {"*": _RunsCode(marker)}}, embeddings / "evil.pt")
    torch.save({"x": _RunsCode(marker)}, tmp_path / "hyper.pt")
    torch.save({"image_proj": _RunsCode(marker)}, tmp_path / "ipa.bin")
    image = tmp_path / "face.png"
    Image.new("RGB", (64, 64)).save(image)
    common = ["--model", sd1_file, "--steps", "1", "--size", "64x64", "--out", tmp_path / "o"]
    cases = {
        "embedding evil.pt": ["generate", "a evil", "--embeddings", embeddings, *common],
        "hypernetwork hyper.pt": ["generate", "a", "--hypernet", tmp_path / "hyper.pt", *common],
        "IP-Adapter ipa.bin": ["generate", "a", "--ip-adapter", tmp_path / "ipa.bin", "--ip-image", image, *common],
    }
    for named, argv in cases.items():
        code, _, err = run(capsys, *argv)
        assert code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"huabi: error: {named}: this file needs code execution to load"), err
        assert "\x1b" not in err and "weights_only" not in err and "PyTorch 2.6" not in err
    assert not marker.exists()


def test_models_lists_broken_files_as_unreadable(capsys, sd1_file, tmp_path):
    import shutil

    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(sd1_file, models / "Stable-diffusion" / "fine.safetensors")
    _safetensors(models / "Stable-diffusion" / "deep.safetensors", b"[" * 200_000 + b"]" * 200_000)
    (models / "Stable-diffusion" / "junk.ckpt").write_bytes(b"not a pickle at all")
    code, out, err = run(capsys, "models", "--models-dir", models)
    assert code == 0, err
    rows = {line.split("\t")[0]: line.split("\t")[1] for line in out.splitlines()}
    assert rows["fine"] == "sd1 base epsilon"
    assert rows["deep"].startswith("unreadable (deep.safetensors: not a safetensors file")
    assert rows["junk"].startswith("unreadable (junk.ckpt: not a readable PyTorch checkpoint")


# --------------------------------------------------------------------------- text and devices


def test_invalid_utf8_argument_is_named(capsys):
    code, _, err = run(capsys, "generate", "caf\udce9")  # how Python passes the byte 0xe9 from argv
    assert code == 2 and err == "huabi: error: argument 2 ('caf\\xe9') is not valid UTF-8; " \
                                "check the terminal's encoding (e.g. LANG=C.UTF-8)\n"


def test_prompt_files_latin1_binary_and_endless(capsys, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("a cat\ncafé\n".encode("latin-1"))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    for path, message in ((latin1, "not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8"),
                          (binary, "contains NUL bytes at offset 8"),
                          (Path("/dev/zero"), "larger than huabi's limit of 16 MiB")):
        code, _, err = run(capsys, "generate", "--prompt-file", path, "--out", tmp_path / "o")
        assert code == 2 and f"prompt file: {path}: {message}" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("device, message", [
    ("mps", "device: mps requested but this machine (or torch build) has no mps device"),
    ("meta", "device: huabi cannot run on 'meta'"),
    ("tpu:0", "device: unknown device 'tpu:0'"),
])
def test_unavailable_devices_are_one_line_errors(capsys, tmp_path, device, message):
    code, _, err = run(capsys, "generate", "x", "--device", device, "--out", tmp_path / "o")
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_merge_alpha_out_of_range(capsys, sd1_file, tmp_path):
    for alpha in ("1e30", "-inf", "2.5"):
        code, _, err = run(capsys, "merge", sd1_file, sd1_file, f"--alpha={alpha}", "--out", tmp_path / "m.safetensors")
        assert code == 2 and "merge: --alpha must be from -1 to 2" in err
    code, _, err = run(capsys, "merge", sd1_file, sd1_file, "--mbw", ",".join(["0.5"] * 24 + ["1e30"]),
                       "--out", tmp_path / "m.safetensors")
    assert code == 2 and "--mbw value 25 must be from -1 to 2" in err
    assert not (tmp_path / "m.safetensors").exists()


def test_info_shows_control_characters_escaped(capsys, tmp_path):
    path = save_png(tiny_image(), tmp_path / "x.png", "a cat\x1b]0;owned\x07\x1b[31m \u202eevil\nSteps: 2, Seed: 1")
    code, out, _ = run(capsys, "info", path)
    assert code == 0
    assert out == "a cat\\x1b]0;owned\\x07\\x1b[31m \\u202eevil\nSteps: 2, Seed: 1\n"


def test_piping_into_head_is_quiet(tmp_path):
    path = save_png(tiny_image(), tmp_path / "long.png", "x" * 300_000 + "\nSteps: 2, Seed: 1")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    run_ = subprocess.Popen([sys.executable, "-m", "huabi.cli.main", "info", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run_.stdout.read(10)
    run_.stdout.close()  # what `| head -c 10` does
    stderr = run_.stderr.read().decode()
    assert run_.wait(timeout=120) == 141
    assert stderr == ""


# --------------------------------------------------------------------------- CLI papercuts


def test_mistyped_flag_suggests_the_nearest_one(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "x", "--stpes", "2"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("huabi generate: error: unrecognized argument --stpes; did you mean --steps? "
                                       "(see huabi generate --help)\n")


@pytest.mark.parametrize("command", [["generate", "x"], ["edit", "in.png", "x"], ["xyz", "x", "--x", "Seed: 1-2"], ["upscale", "in.png"]])
def test_an_image_file_name_as_out_folder_is_refused(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--out", "apple.png"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"huabi {command[0]}: error: argument --out: 'apple.png' is a file name; --out takes a folder, and the images are "
                   f"saved in it as NNNNN-SEED.png (see huabi {command[0]} --help)\n")
    assert not (tmp_path / "apple.png").exists()
    (tmp_path / "old.png").mkdir()  # an existing folder of that name is still a folder
    from huabi.cli.common import output_folder

    assert output_folder("old.png") == Path("old.png") and output_folder("out/run1") == Path("out/run1")


@pytest.mark.parametrize("argv", [["generate", "x", "--step", "2"], ["merge", "a", "b", "--alph", "0.3", "--out", "m"],
                                  ["preprocess", "x.png", "--out", "y.png", "--modul", "canny"]])
def test_abbreviated_flags_are_not_taken(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized argument" in err and len(err.splitlines()) == 1


def test_every_generate_flag_is_described_and_samplers_are_listed():
    from huabi.cli.main import build_parser
    from huabi.core.names import SAMPLER_NAMES, SCHEDULE_NAMES

    parser = build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    undescribed = [action.option_strings for action in generate._actions
                   if action.option_strings and not action.help]
    assert undescribed == []
    text = " ".join(generate.format_help().split())
    assert all(name in text for name in SAMPLER_NAMES) and all(name in text for name in SCHEDULE_NAMES)


def test_train_help_says_huabi_train(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert capsys.readouterr().out.startswith("usage: huabi train ")


def test_errors_say_the_users_words(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "x", "--size", "100x64", "--out", tmp_path)
    assert code == 2 and err == "huabi: error: --size width: must be a multiple of 8, got 100\n"
    code, _, err = run(capsys, "generate", "x", "--cfg", "500", "--out", tmp_path)
    assert code == 2 and err.startswith("huabi: error: --cfg: must be a number from 0 to 100")


def test_missing_model_lists_what_the_models_folder_holds(capsys, sd1_file, tmp_path):
    import shutil

    models = tmp_path / "models"
    models.mkdir()
    code, _, err = run(capsys, "generate", "x", "--model", "dreamshaper", "--models-dir", models, "--out", tmp_path)
    assert code == 2 and f"in {models} (it holds no models); pass --model PATH" in err
    shutil.copy(sd1_file, models / "anything-v5.safetensors")
    code, _, err = run(capsys, "generate", "x", "--model", "dreamshaper", "--models-dir", models, "--out", tmp_path)
    assert code == 2 and f"in {models} (it holds: anything-v5); pass --model PATH" in err
    code, _, err = run(capsys, "generate", "x", "--model", "dreamshaper", "--models-dir", tmp_path / "nope",
                       "--out", tmp_path)
    assert code == 2 and "(that folder does not exist; set HUABI_MODELS_DIR or --models-dir)" in err


def test_quiet_silences_library_progress_bars(capfd, tiny_sd1_folder, tmp_path):
    capfd.readouterr()
    code = main(["generate", "x", "--model", str(tiny_sd1_folder), "--steps", "1", "--size", "64x64",
                 "--out", str(tmp_path), "--quiet"])
    captured = capfd.readouterr()
    assert code == 0
    assert captured.err == ""  # no "Loading weights" / "Writing model shards" bars from transformers


def test_first_progress_reading_has_no_absurd_rate(monkeypatch):
    import io

    from huabi.cli import main as cli_main

    stream = io.StringIO()
    monkeypatch.setattr(cli_main.sys, "stderr", stream)
    bar = cli_main._ProgressBar(enabled=True)
    bar.update(1, 20)  # the first step just finished, microseconds after the bar appeared
    bar.close()
    renders = [part for part in stream.getvalue().split("\r") if part.strip()]
    assert all("?step/s" in render for render in renders), renders  # no rate from a single reading
    assert " 1/20 " in renders[-1]



def test_models_folder_embeddings_are_used_without_a_flag(tmp_path, monkeypatch):
    from huabi.service.engine import Engine

    models = tmp_path / "models"
    (models / "embeddings").mkdir(parents=True)
    monkeypatch.delenv("HUABI_EMBEDDINGS_DIR", raising=False)
    monkeypatch.setenv("HUABI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HUABI_MODELS_DIR", str(models))
    assert Engine(device="cpu", dtype="fp32").embeddings_dir == models / "embeddings"
    assert Engine(device="cpu", dtype="fp32", models_dir=models).embeddings_dir == models / "embeddings"
    monkeypatch.setenv("HUABI_EMBEDDINGS_DIR", str(tmp_path / "mine"))
    assert Engine(device="cpu", dtype="fp32").embeddings_dir == tmp_path / "mine"  # the explicit setting wins
    monkeypatch.delenv("HUABI_EMBEDDINGS_DIR")
    (models / "embeddings").rmdir()
    assert Engine(device="cpu", dtype="fp32").embeddings_dir == tmp_path / "home" / "embeddings"


def test_from_drops_settings_huabi_does_not_apply(capsys, sd1_file, tmp_path):
    from huabi.core.infotext import parse_infotext

    source = save_png(tiny_image(), tmp_path / "a1111.png",
                      "a cat\nSteps: 2, Sampler: Euler, Schedule type: Normal, CFG scale: 7, Seed: 5, Size: 64x64, "
                      "ENSD: 31337, Token merging ratio: 0.3, Lora hashes: \"x: 0123456789ab\", Some extension: kept")
    code, out, err = run(capsys, "generate", "--from", source, "--model", sd1_file, "--out", tmp_path / "o", "--quiet")
    assert code == 0, err
    assert ("note: " in err and "ENSD, Token merging ratio not applied (huabi does not implement them) "
            "and not copied into the new infotext" in err)
    params = parse_infotext(read_infotext(Path(out.split()[0]))).params
    assert "ENSD" not in params and "Token merging ratio" not in params
    assert params["Some extension"] == "kept"  # keys huabi does not know stay as they were
