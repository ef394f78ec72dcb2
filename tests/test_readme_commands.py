"""Every shell command in README.md runs as written (the manual cannot drift from the program).

The rule (also stated in a comment at the top of README.md):

* **Transcripts.** In any fenced block, a line starting with ``$ `` is a command; the lines after it, up
  to the next ``$ `` line or the end of the block, are its expected output. The command is run and every
  shown output line must appear, in order, among the lines it printed (stdout and stderr together).
  Progress-bar lines are not compared, a line ``...`` ends the comparison, ``~`` means the home folder
  and absolute paths compare by their last component (``/home/me/refs/reference.png`` matches the
  test's own ``reference.png``). A command whose shown output has ``error:`` must exit 2, the others 0.
  A comment claiming the result equals another image ("# same bytes as X", "# same bytes",
  "# byte-identical PNG", "# the same image", "# the same pixels") is checked: the image the command
  printed has the pixels and infotext of X, or else of the image its ``--from`` names, or else of the
  image the command before it printed.
* **Command blocks.** In ``bash``/``sh`` blocks without ``$``, every line (with its ``\\``
  continuations, and indented lines continuing the line above; ``#`` comments dropped) is a command. Optional parts in square brackets
  (``[--styles-file styles.csv]``) are left out when it is run, and their flags must exist.
* **Synopses.** A command-block line with a placeholder -- a word in capitals (``PROMPT``, ``SRC``,
  ``DATASET_DIR``, ``A B``), a ``|`` choice outside quotes, or ``...`` -- is a usage pattern: it is not
  run, but each of its flags must be one the sub-command's ``--help`` lists.
* Blocks are run one at a time, each in a fresh folder (files it mentions, such as ``photo.png``,
  ``house.png`` or ``flux1-dev.safetensors``, are created there first), with ``HOME`` pointing at a
  test home whose default models folder ``~/huabi/models`` holds tiny random-weight models under the
  README's names (``tiny-sd1``, ``sd_xl_base_1.0``, ``control_v11p_sd15_canny``, ...). huabi-mini,
  the demo LoRA and the built-in styles are the shipped ones.

Commands that are not run are listed below by their exact text with the reason (servers, the
machine set-up, hour-long training and benchmarks); commands run with a smaller setting than
written are listed with the appended flags and the reason. Everything else runs as written.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
SHOW_DIR = os.environ.get("HUABI_README_SHOW")  # record outputs instead of comparing (to update the README)

# Exact command text -> why the test does not run it.
NOT_RUN = {
    "bash setup.sh && .venv/bin/huabi generate \"a red apple\" --seed 7":
        "sets up the machine (pip, apt); its generate half is the Generating transcript, which runs",
    "bash setup.sh --dev && .venv/bin/python -m pytest -q": "sets up the machine and runs this very suite",
    "bash setup.sh --train": "installs training packages on the machine",
    "bash scripts/train_mini.sh": "trains huabi-mini for about 2 hours",
    "bash scripts/train_mini.sh --steps unet=9000": "trains huabi-mini for about 3 hours",
    ".venv/bin/huabi data build --out ~/.cache/huabi/data/huabi-mini-128":
        "renders ~9,200 images from Debian packages (tested in tests/test_data_build.py)",
    ".venv/bin/huabi train mini --snapshot": "exports a running huabi-mini training stage (needs hours of state)",
    ".venv/bin/python -m huabi.eval.faithfulness --json faithfulness.json --grid composed.png":
        "needs the 9,219-image dataset and 300 generations (tested in tests/test_eval_faithfulness.py)",
    ".venv/bin/python bench/bench_serve.py --steps 8 --images 4 --clients 8 --jobs-per-client 1":
        "starts a server (benchmark; the server is tested in tests/test_server.py)",
    ".venv/bin/python bench/bench_sd15_vs_diffusers.py --steps 3 --dtype fp32":
        "benchmark on the full-size SD1.5 architecture (GBs, minutes per step)",
    ".venv/bin/python bench/bench_mini.py": "benchmark (timings, not behaviour)",
    "pip install 'huabi[openvino]'": "installs packages (the dev set-up already has them)",
    "pip install 'huabi[ray]'": "installs packages (the dev set-up already has them)",
    "ray start --head --port 6379": "starts a Ray cluster (tests/test_ray.py starts one on loopback)",
    "ray start --address HEAD:6379 --num-gpus 2 --resources '{\"huabi_slot\": 2}'":
        "joins a GPU machine to a Ray cluster (tests/test_ray.py starts workers on loopback)",
    "huabi generate --prompt-file prompts.txt --seed 7 --ray HEAD:6379 --models-dir /mnt/models":
        "needs a Ray cluster at HEAD (tests/test_ray.py runs a prompt file on a loopback cluster)",
    ".venv/bin/python bench/bench_ray.py --jobs 6 --steps 4 --size 128 --latency-jobs 4":
        "starts a Ray cluster (benchmark; scale-out is tested in tests/test_ray.py)",
}
SERVERS = {  # long-running servers: tested in tests/test_server.py and tests/test_webui_browser.py
    "huabi serve", "huabi serve --host 0.0.0.0 --api-auth ann:s3cret",
    "huabi serve --model my-model --gallery-folder outputs --data-dir ~/huabi/server",
    "huabi serve --ray HEAD:6379 --models-dir /mnt/models",
}
TINY_FLOW = "the tiny SD3/FLUX fixtures' position embeddings cover 256 px at most (the real models' 1536+)"
# Exact command text -> (flags appended, reason): run smaller than written, because of time on a 2-core CI.
SMALLER = {
    "huabi generate \"a lighthouse\" --size 512x512 --hires --hires-scale 2 --hires-denoise 0.55":
        (["--steps", "2", "--hires-steps", "1"], "a 1024x1024 second pass on CPU"),
    "huabi generate \"a lighthouse\" --hires-resize 1024x640 --hires-upscaler Lanczos --hires-steps 10":
        (["--steps", "2", "--hires-steps", "1"], "a 1024x640 second pass on CPU"),
    "huabi generate \"a lighthouse\" --hires --hires-upscaler RealESRGAN_x4plus.pth":
        (["--steps", "2", "--hires-steps", "1"], "a second pass at twice the size"),
    "huabi generate \"a castle\" --seed 7 --seed-resize-from 512x512 --size 512x768":
        (["--steps", "2"], "512x768 on the 128-px built-in model"),
    "huabi generate \"a castle\" --size 1536x1024 --vae-tiling": (["--steps", "1"], "1536x1024 on CPU"),
    # The SD3/FLUX block's real-model commands run on tiny fixtures, whose default size (1024) they cannot embed.
    "huabi generate \"a lighthouse at dusk, oil painting\" --model sd3.5_large.safetensors --steps 28 --cfg 4.5 "
    "--dtype bf16": (["--size", "64x64"], TINY_FLOW),
    "huabi generate \"a lighthouse\" --model sd3.5_medium.safetensors --clip-l clip_l.safetensors "
    "--clip-g clip_g.safetensors --t5xxl t5xxl_fp8_e4m3fn.safetensors --vae sd3.5_vae.safetensors":
        (["--size", "64x64"], TINY_FLOW),
    "huabi generate \"a red fox in snow\" --model flux1-dev.safetensors --clip-l clip_l.safetensors "
    "--t5xxl t5xxl_fp16.safetensors --vae ae.safetensors --sampler Euler --steps 20 --distilled-cfg 3.5 "
    "--dtype bf16": (["--size", "64x64"], TINY_FLOW),
    "huabi generate \"a red fox in snow\" --model flux1-dev-Q4_0.gguf --steps 20 --dtype bf16":
        (["--size", "64x64"], TINY_FLOW),
    "huabi generate \"a red fox in snow\" --model flux1-schnell.safetensors --steps 4 --sampler Euler":
        (["--size", "64x64"], TINY_FLOW),
    "huabi edit photo.png \"a wide river valley\" --model flux1-fill-dev.safetensors --outpaint left=256,right=256 "
    "--strength 1": (["--outpaint", "left=16,right=16"], TINY_FLOW),
    "huabi generate \"a red fox in snow\" --model flux1-dev.safetensors --size 768x768 --hires --hires-scale 1.5 "
    "--hires-denoise 0.5": (["--size", "64x64", "--steps", "2"], TINY_FLOW),
    "huabi xyz \"a red apple\" --x \"Steps: 10, 20, 30\" --y \"CFG scale: 3-9 (+3)\" "
    "--z \"Sampler: Euler, DPM++ 2M\" --seed 7": ([], "runs as written (18 images)"),
}
# Exact command text -> why its shown output is not compared (it is still run and must succeed).
OUTPUT_NOT_COMPARED = {
    "huabi system": "describes the machine it runs on",
    "huabi eval compare --vary \"Steps: 2, 20\" --prompts emoji-prompts.txt --seeds 1-4 --real emoji-real "
    "--out report": "numbers measured on the real emoji set, which the test does not build",
}

PLACEHOLDER = re.compile(r"^\"?[A-Z][A-Z0-9_]*(\.[a-z]+)?\"?$")
PROGRESS_LINE = re.compile(r"(\d+%\|)|(step/s\]|it/s\]|s/step\])")
ABSOLUTE_PATH = re.compile(r"(?<![\w~.])/(?:[^\s,\"'/]+/)+([^\s,\"'/]+)")


# --------------------------------------------------------------------------- reading the README


@dataclass
class Command:
    text: str
    line: int
    expected: list[str] = field(default_factory=list)
    transcript: bool = False
    comment: str = ""  # a transcript line's "# ..." (claims such as "same bytes as X" are checked)


@dataclass
class Block:
    line: int
    lang: str
    heading: str
    commands: list[Command]
    body: str


def strip_comment(text: str) -> str:
    """The command without a trailing ``# comment`` (a ``#`` outside quotes after whitespace)."""
    quote = None
    for index, char in enumerate(text):
        if quote:
            if char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char == "#" and (index == 0 or text[index - 1].isspace()):
            return text[:index].rstrip()
    return text.rstrip()


def read_blocks(path: Path = README) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, heading, index = [], "", 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("#") and not line.startswith("#!"):
            heading = line.lstrip("#").strip()
        fence = re.match(r"^(\s*)```(\w*)\s*$", line)
        if not fence:
            index += 1
            continue
        indent, lang, start, body = len(fence.group(1)), fence.group(2), index + 1, []
        index += 1
        while index < len(lines) and not re.match(r"^\s*```\s*$", lines[index]):
            body.append(lines[index][indent:])  # a block inside a list item is indented as a whole
            index += 1
        index += 1
        commands = block_commands(lang, body, start + 1)
        if commands:
            blocks.append(Block(start, lang, heading, commands, "\n".join(body)))
    return blocks


def block_commands(lang: str, body: list[str], first_line: int) -> list[Command]:
    if any(line.startswith("$ ") for line in body):
        commands: list[Command] = []
        for offset, line in enumerate(body):
            if line.startswith("$ "):
                text = strip_comment(line[2:])
                commands.append(Command(text, first_line + offset, transcript=True,
                                        comment=line[2:][len(text):].strip().lstrip("#").strip()))
            elif commands:
                commands[-1].expected.append(line)
        return commands
    if lang not in ("bash", "sh"):
        return []
    commands, pending, pending_line = [], "", 0
    for offset, line in enumerate(body):
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if not pending and commands and line[:1].isspace():  # an indented line continues a synopsis
            commands[-1].text = strip_comment(commands[-1].text + " " + line.strip())
            continue
        pending_line = pending_line if pending else first_line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1].strip() + " "
            continue
        commands.append(Command(strip_comment((pending + line.strip()).strip()), pending_line))
        pending = ""
    return commands


OPTIONAL = re.compile(r"\s\[(?:[^\[\]\"]|\[[^\]]*\])*\]")


def optional_parts(text: str) -> tuple[str, list[str]]:
    """The command with its ``[...]`` optional parts removed, and those parts."""
    parts = [match.group(0).strip()[1:-1] for match in OPTIONAL.finditer(text)]
    return OPTIONAL.sub("", text), parts


def is_synopsis(text: str) -> bool:
    if "..." in text:
        return True
    unquoted = re.sub(r"\"[^\"]*\"|'[^']*'", "", text)
    if "|" in unquoted:
        return True
    return any(PLACEHOLDER.match(token) for token in shlex.split(text)[1:])


def flags_of(text: str) -> list[str]:
    return [token.split("=")[0] for token in shlex.split(text.replace("|", " "))
            if re.match(r"^--?[a-z]", token)]


BLOCKS = read_blocks()
ALL_COMMANDS = [(block, command) for block in BLOCKS for command in block.commands]


def test_the_rule_finds_the_readme_commands():
    """The extraction sees what a reader sees (guards the test itself against matching nothing)."""
    texts = [command.text for _, command in ALL_COMMANDS]
    assert len(texts) >= 90
    assert 'huabi generate "a red apple <lora:demo:0.8>" --seed 7 --steps 8' in texts
    assert "huabi merge-lora huabi-mini demo:0.8 --out merged.safetensors" in texts
    assert any(text.startswith('huabi generate "a red house" --model v1-5-pruned-emaonly --controlnet') for text in texts)
    listed = set(NOT_RUN) | SERVERS | set(SMALLER) | set(OUTPUT_NOT_COMPARED)
    assert listed <= set(texts), sorted(listed - set(texts))  # every exception still names a README command


# --------------------------------------------------------------------------- flags of synopses


def help_text(words: list[str]) -> str:
    from huabi.cli.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            main([*words, "--help"])
        except SystemExit:
            pass
    return out.getvalue()


def subcommand_words(text: str) -> list[str]:
    tokens = shlex.split(text)
    words = []
    for token in tokens[1:3]:
        if re.match(r"^[a-z][a-z-]*$", token):
            words.append(token)
        else:
            break
    if words and words[0] not in ("train", "eval"):
        words = words[:1]
    return words


def flag_checks():
    checks = []
    for block, command in ALL_COMMANDS:
        if command.transcript or command.text in NOT_RUN or not re.match(r"^(\.venv/bin/)?huabi ", command.text):
            continue
        if command.text in SERVERS:
            checks.append((command.text, flags_of(command.text)))
            continue
        runnable, optional = optional_parts(command.text)
        flags = [flag for part in optional for flag in flags_of(part)]
        if is_synopsis(runnable):
            flags += flags_of(runnable)
        if flags:
            checks.append((command.text, flags))
    return checks


@pytest.mark.parametrize(("text", "flags"), flag_checks(), ids=lambda value: value if isinstance(value, str) else None)
def test_flags_shown_in_synopses_and_optional_parts_exist(text, flags):
    words = subcommand_words(text.removeprefix(".venv/bin/"))
    shown = help_text(words)
    assert shown, f"huabi {' '.join(words)} --help printed nothing"
    missing = [flag for flag in flags if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", shown)]
    assert not missing, f"README line: {text}\n`huabi {' '.join(words)} --help` has no {missing}"


# --------------------------------------------------------------------------- the world the commands run in


def _random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 4) % 256, (y * 3) % 256, ((x + y) * 2) % 256], axis=-1)
    return Image.fromarray(np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8))


def _house(size: int = 64) -> Image.Image:
    picture = np.full((size, size, 3), 230, np.uint8)
    picture[size // 2:, size // 4: 3 * size // 4] = (200, 40, 40)
    for row in range(size // 4, size // 2):  # a roof
        half = (row - size // 4) + 2
        picture[row, max(0, size // 2 - half): size // 2 + half] = (90, 50, 20)
    return Image.fromarray(picture)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_factory):
    """HOME with ``~/huabi/models`` under the README's names, and makers for the files blocks mention."""
    from diffusers import ControlNetModel

    from huabi.models.controlnet import save_controlnet_original
    from huabi.models.family import ModelFamily, UNetVariant
    from huabi.models.flow_load import write_transformer_gguf
    from huabi.models.load import load_model
    from huabi.models.transformer_families import TransformerFamily
    from test_hypernetwork import write_hypernetwork
    from test_ip_adapter import adapter_tensors, tiny_vision_model, write_adapter
    from tiny_models import randomize_, write_tiny_single_file

    from flow_fixtures import TinyFlowModel

    root = tmp_path_factory.mktemp("readme")
    home = root / "home"
    models = home / "huabi" / "models"
    models.mkdir(parents=True)
    files = root / "files"  # weight files the README passes by path in the working folder
    files.mkdir()

    def alias(source: Path, *names: str) -> None:
        for name in names:
            target = models / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)

    # Every model file has its own weights (so its own hash): `--from` finds a model by its hash.
    sd1 = tiny_model_factory(ModelFamily.SD1)
    alias(sd1, "tiny-sd1.safetensors")
    alias(tiny_model_factory(ModelFamily.SDXL), "tiny-sdxl.safetensors")
    alias(tiny_model_factory(ModelFamily.SDXL_REFINER), "tiny-sdxl-refiner.safetensors")
    alias(tiny_model_factory(ModelFamily.SD1, UNetVariant.INSTRUCT_PIX2PIX), "tiny-ip2p.safetensors")
    for seed, family, variant, name in (
        (11, ModelFamily.SD1, UNetVariant.BASE, "photo"), (12, ModelFamily.SD1, UNetVariant.BASE, "anime"),
        (13, ModelFamily.SD1, UNetVariant.BASE, "sd15"),  # merges need three different models
        (21, ModelFamily.SD1, UNetVariant.BASE, "v1-5-pruned-emaonly"),
        (22, ModelFamily.SDXL, UNetVariant.BASE, "sd_xl_base_1.0"),
        (23, ModelFamily.SDXL_REFINER, UNetVariant.BASE, "sd_xl_refiner_1.0"),
        (24, ModelFamily.SD1, UNetVariant.INSTRUCT_PIX2PIX, "instruct-pix2pix-00-22000"),
    ):
        write_tiny_single_file(models, family, variant, seed=seed, filename=f"{name}.safetensors")

    sd1_bundle = load_model(sd1, compute_hash=False)
    controlnet = ControlNetModel.from_unet(sd1_bundle.unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    randomize_(controlnet, torch.Generator().manual_seed(9))
    save_controlnet_original(controlnet, models / "ControlNet" / "tiny-canny.safetensors")
    alias(models / "ControlNet" / "tiny-canny.safetensors", "ControlNet/control_v11p_sd15_canny.safetensors",
          "ControlNet/control_v11f1p_sd15_depth.safetensors")
    write_hypernetwork(models / "hypernetworks" / "inkwash.pt", scale=0.5)
    write_hypernetwork(models / "hypernetworks" / "sd15-style.pt", widths=(320, 640, 768, 1280), seed=3)
    tiny_vision_model().save_pretrained(models / "clip_vision" / "tiny-clip-vision")
    write_adapter(models / "ipadapter" / "ip-adapter_tiny.safetensors", adapter_tensors(sd1_bundle.unet, seed=1))
    sdxl_bundle = load_model(models / "tiny-sdxl.safetensors", compute_hash=False)
    write_adapter(models / "ipadapter" / "ip-adapter_sdxl.safetensors", adapter_tensors(sdxl_bundle.unet, seed=2))

    from test_previews import _random_, tiny_decoder
    (models / "VAE-approx").mkdir()
    torch.save(_random_(tiny_decoder(), seed=1).state_dict(), models / "VAE-approx" / "taesd_decoder.pth")
    from test_upscale import _new_layout, _tiny_rrdb
    torch.save(_new_layout(_tiny_rrdb()), files / "RealESRGAN_x4plus.pth")

    wildcards = home / "huabi" / "wildcards"  # the user's wildcard file for "__animals__"
    wildcards.mkdir(parents=True)
    (wildcards / "animals.txt").write_text("cat\ndog\nfox\n", encoding="utf-8")

    # What `huabi train lora DATASET_DIR --output zqx.safetensors ...` leaves (that synopsis is not run):
    from huabi.service.model_files import builtin_lora_dir
    shutil.copyfile(builtin_lora_dir() / "demo.safetensors", files / "zqx.safetensors")
    alias(files / "zqx.safetensors", "Lora/zqx.safetensors")

    flux = TinyFlowModel(TransformerFamily.FLUX_DEV)
    parts = flux.write_parts(models)  # text_encoders/clip_l, t5xxl_fp16; vae/ae
    flux.write_transformer(models / "flux1-dev-tiny.safetensors")
    flux.write_transformer(files / "flux1-dev-tiny.safetensors")
    flux.write_transformer(files / "flux1-dev.safetensors")
    write_transformer_gguf(flux.transformer_original(), files / "flux1-dev-Q4_0.gguf", "Q4_0", arch="flux")
    TinyFlowModel(TransformerFamily.FLUX_SCHNELL).write_transformer(files / "flux1-schnell.safetensors")
    TinyFlowModel(TransformerFamily.FLUX_FILL).write_transformer(files / "flux1-fill-dev.safetensors")
    shutil.copyfile(parts["clip_l"], files / "clip_l.safetensors")
    shutil.copyfile(parts["t5xxl"], files / "t5xxl_fp16.safetensors")
    shutil.copyfile(parts["vae"], files / "ae.safetensors")
    TinyFlowModel(TransformerFamily.SD35_LARGE).write_all_in_one(files / "sd3.5_large.safetensors")
    medium = TinyFlowModel(TransformerFamily.SD35_MEDIUM)
    medium.write_transformer(files / "sd3.5_medium.safetensors", prefix="model.diffusion_model.")
    medium_parts = medium.write_parts(root / "sd35_parts", t5_dtype=torch.float8_e4m3fn)
    shutil.copyfile(medium_parts["clip_g"], files / "clip_g.safetensors")
    shutil.copyfile(medium_parts["t5xxl"], files / "t5xxl_fp8_e4m3fn.safetensors")
    shutil.copyfile(medium_parts["vae"], files / "sd3.5_vae.safetensors")
    # (SD3.5's clip_l is FLUX's: the tiny fixtures draw both from the same seed, so one clip_l.safetensors serves)
    return {"root": root, "home": home, "models": models, "files": files}


def make_mentioned_files(block: Block, cwd: Path, world) -> None:
    """Create in ``cwd`` the input files ``block`` mentions (and link ``models`` to the models folder)."""
    text = block.body
    (cwd / "models").symlink_to(world["models"], target_is_directory=True)
    images = {
        "photo.png": lambda: _random_image(64, 64, 1), "image.png": lambda: _random_image(48, 40, 2),
        "house.png": _house, "depth.png": lambda: _random_image(64, 64, 3).convert("L"),
        "reference.png": lambda: _random_image(40, 48, 4),
        "mask.png": lambda: Image.fromarray(np.pad(np.full((24, 32), 255, np.uint8), ((20, 20), (8, 24)))),
    }
    for name, make in images.items():
        if re.search(rf"(?<![\w/-]){re.escape(name)}", text):
            make().save(cwd / name)
    for path in world["files"].iterdir():
        if path.name in text:
            (cwd / path.name).symlink_to(path)
    if "outputs/00012-5.png" in text:  # an earlier image of the user's, made by huabi
        run_huabi(["generate", "a red apple", "--seed", "5", "--steps", "2", "--out", "made", "--quiet"], cwd)
        (cwd / "outputs").mkdir(exist_ok=True)
        shutil.move(str(cwd / "made" / "00000-5.png"), cwd / "outputs" / "00012-5.png")
    if "emoji-prompts.txt" in text:
        (cwd / "emoji-prompts.txt").write_text("a red apple\na smiling face\n", encoding="utf-8")
        (cwd / "emoji-real").mkdir()
        for seed in range(6):
            _random_image(128, 128, 10 + seed).save(cwd / "emoji-real" / f"{seed}.png")


def run_huabi(argv: list[str], cwd: Path) -> tuple[int, str]:
    from huabi.cli.main import main

    out = io.StringIO()
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 2
    finally:
        os.chdir(previous)
    return code, out.getvalue()


def normalise(line: str, home: Path) -> str:
    line = line.rstrip().replace(str(home), "~")
    return ABSOLUTE_PATH.sub(r".../\1", line)


def compare_output(command: Command, printed: str, home: Path) -> None:
    expected = []
    for line in command.expected:
        if line.strip() in ("...", "< truncated >") or line.strip().startswith("..."):
            break
        if line.strip() and not PROGRESS_LINE.search(line):
            expected.append(normalise(line, home))
    actual = [normalise(line, home) for line in printed.splitlines() if not PROGRESS_LINE.search(line)]
    position = 0
    for line in expected:
        try:
            position = actual.index(line, position) + 1
        except ValueError:
            raise AssertionError(f"README line {command.line}: `{command.text}`\nexpected line:\n  {line}\n"
                                 f"not found (in order) in what it printed:\n" + "\n".join(actual)) from None


def runnable_blocks():
    params = []
    for block in BLOCKS:
        runnable = [c for c in block.commands if c.text not in NOT_RUN and c.text not in SERVERS
                    and (c.transcript or not is_synopsis(optional_parts(c.text)[0]))]
        if runnable:
            params.append(pytest.param(block, id=f"L{block.line}-{block.heading[:40]}"))
    return params


@pytest.mark.slow  # ~8-19 min for all blocks on the shared 2-core machine (in-process, tiny models)
@pytest.mark.parametrize("block", runnable_blocks())
def test_readme_block_runs_as_written(block: Block, world, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(world["home"]))
    for name in ("HUABI_MODELS_DIR", "HUABI_HOME", "HUABI_EMBEDDINGS_DIR"):
        monkeypatch.delenv(name, raising=False)
    cwd = tmp_path / "work"
    cwd.mkdir()
    make_mentioned_files(block, cwd, world)
    previous_image = None
    for command in block.commands:
        if command.text in NOT_RUN or command.text in SERVERS:
            continue
        text = command.text if command.transcript else optional_parts(command.text)[0]
        if not command.transcript and is_synopsis(text):
            continue
        argv = shlex.split(text)
        assert argv[0] in ("huabi", ".venv/bin/huabi"), f"README line {command.line}: not a huabi command: {text}"
        extra = SMALLER.get(command.text, ([], ""))[0]
        code, printed = run_huabi(argv[1:] + extra, cwd)
        wants_error = any("error:" in line for line in command.expected)
        assert code == (2 if wants_error else 0), (
            f"README line {command.line}: `{text}` exited {code}\n{printed[-3000:]}")
        if SHOW_DIR:  # maintenance: record what each transcript command prints (HUABI_README_SHOW=DIR)
            with open(Path(SHOW_DIR) / f"L{block.line:04d}.txt", "a", encoding="utf-8") as shown:
                shown.write(f"$ {command.text}\n" + "\n".join(normalise(line, world["home"])
                                                          for line in printed.splitlines()
                                                          if not PROGRESS_LINE.search(line)) + "\n")
        elif command.transcript and command.text not in OUTPUT_NOT_COMPARED:
            compare_output(command, printed, world["home"])
        claimed = claimed_equal_image(command, argv, previous_image)
        made = printed_images(printed)
        if claimed is not None:
            assert made, f"README line {command.line}: `{text}` printed no image to compare with {claimed}"
            assert_same_image(cwd / made[0], cwd / claimed, f"README line {command.line}: `{text}` # {command.comment}")
        previous_image = made[0] if made else previous_image


# --------------------------------------------------------------------------- Python examples

PYTHON_NOT_RUN = {"webuiapi": "talks to a running `huabi serve` (tested in tests/test_server.py with webuiapi)"}


def python_examples() -> list:
    """Each ```python block with the unlabelled block right after it (its printed output)."""
    lines = README.read_text(encoding="utf-8").splitlines()
    examples, index = [], 0
    while index < len(lines):
        if lines[index].strip() != "```python":
            index += 1
            continue
        start, code = index + 1, []
        index += 1
        while lines[index].strip() != "```":
            code.append(lines[index])
            index += 1
        index += 1
        expected = []
        if index < len(lines) and lines[index].strip() == "```":
            index += 1
            while lines[index].strip() != "```":
                expected.append(lines[index])
                index += 1
        source = "\n".join(code)
        skip = next((why for word, why in PYTHON_NOT_RUN.items() if word in source), None)
        marks = [pytest.mark.skip(reason=skip)] if skip else []
        examples.append(pytest.param(start, source, expected, id=f"python-L{start}", marks=marks))
    return examples


@pytest.mark.parametrize(("line", "source", "expected"), python_examples())
def test_readme_python_example_prints_what_it_shows(line, source, expected, world, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(world["home"]))
    for name in ("HUABI_MODELS_DIR", "HUABI_HOME", "HUABI_EMBEDDINGS_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(source, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    compare_output(Command(f"python block at line {line}", line, expected, transcript=True), out.getvalue(),
                   world["home"])


SAME_IMAGE = re.compile(r"same bytes|byte-identical|the same image|the same pixels")


def claimed_equal_image(command: Command, argv: list[str], previous: str | None) -> str | None:
    """The image a transcript comment says this command's output equals (None: no such claim)."""
    if not SAME_IMAGE.search(command.comment):
        return None
    named = re.search(r"same bytes as (\S+\.png)", command.comment)
    if named:
        return named.group(1)
    if "--from" in argv:
        return argv[argv.index("--from") + 1]
    assert previous, f"README line {command.line}: '# {command.comment}' but no image before it"
    return previous


def printed_images(printed: str) -> list[str]:
    return [line.strip() for line in printed.splitlines() if line.strip().endswith(".png")]


def assert_same_image(made: Path, claimed: Path, where: str) -> None:
    from huabi.service.pngio import read_infotext

    ours, theirs = (np.asarray(Image.open(path).convert("RGB")) for path in (made, claimed))
    assert ours.shape == theirs.shape and np.array_equal(ours, theirs), (
        f"{where}: {made.name} differs from {claimed} (max |diff| "
        f"{np.abs(ours.astype(int) - theirs.astype(int)).max() if ours.shape == theirs.shape else 'shape'})")
    ours, theirs = read_infotext(made), read_infotext(claimed)
    assert ours == theirs, f"{where}: infotext differs from {claimed}:\n{ours}\n{theirs}"
