"""The server lists the LoRAs the engine finds: the models folder's ``Lora/``/``LyCORIS/`` and huabi's
built-in demo LoRA, through one lookup (service.adapters.lora_files), so every listed name works in a
prompt and every name that works is listed."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import pytest
from PIL import Image

from huabi.cli.main import main as cli_main
from huabi.server.catalog import Catalog
from huabi.service.model_files import builtin_lora_dir
from server_process import ServerProcess

DEMO = builtin_lora_dir() / "demo.safetensors"
DEMO_HASH = "603735b1c4ae"  # AutoV3 of the shipped file (README)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    (folder / "Lora").mkdir()
    shutil.copy(DEMO, folder / "Lora" / "mine.safetensors")
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir):
    process = ServerProcess(tmp_path_factory.mktemp("serve") / "data", models_dir).start()
    yield process
    process.stop()


def test_loras_route_lists_the_builtin_demo_after_the_users_files(server):
    response = server.get("/sdapi/v1/loras")
    assert response.status_code == 200
    assert [(item["name"], item["path"]) for item in response.json()] == [
        ("mine", "mine.safetensors"), ("demo", "demo.safetensors")]


def test_a_listed_builtin_lora_works_in_a_prompt_as_on_the_cli(server, models_dir, tmp_path):
    prompt = "a lighthouse <lora:demo:0.8>"
    response = server.post("/sdapi/v1/txt2img", json={
        "prompt": prompt, "seed": 3, "steps": 2, "width": 64, "height": 64, "cfg_scale": 7,
        "sampler_name": "Euler a"})
    assert response.status_code == 200, response.text
    png = base64.b64decode(response.json()["images"][0])
    infotext = Image.open(io.BytesIO(png)).info["parameters"]
    assert f'Lora hashes: "demo: {DEMO_HASH}"' in infotext
    out = tmp_path / "cli"
    assert cli_main(["generate", prompt, "--model", "huabi-mini", "--models-dir", str(models_dir), "--seed", "3",
                     "--steps", "2", "--size", "64x64", "--cfg", "7", "--sampler", "Euler a", "--quiet",
                     "--out", str(out)]) == 0
    (cli_png,) = sorted(out.glob("*.png"))
    assert cli_png.read_bytes() == png


def test_a_users_file_of_the_same_name_hides_the_builtin_one(tmp_path):
    (tmp_path / "Lora" / "styles").mkdir(parents=True)
    shutil.copy(DEMO, tmp_path / "Lora" / "styles" / "demo.safetensors")
    entries = Catalog(tmp_path, runner=None).loras()
    assert [(entry.name, entry.path) for entry in entries] == [("demo", tmp_path / "Lora" / "styles" / "demo.safetensors")]
    # ... and the engine's lookup picks that same file
    from huabi.service.adapters import find_lora_file, lora_folders

    assert find_lora_file("demo", lora_folders(tmp_path)) == entries[0].path


def test_builtin_lora_is_listed_and_passes_the_path_check(tmp_path):
    (tmp_path / "Lora").mkdir()
    catalog = Catalog(tmp_path, runner=None)
    assert [(entry.name, entry.path) for entry in catalog.loras()] == [("demo", DEMO)]
    catalog.check_prompt("x <lora:demo:1>")  # packaged with huabi: not "outside" the models folder
