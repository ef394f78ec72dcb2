"""FLUX through `huabi serve` (a real uvicorn server): the same bytes as the CLI, /progress with a live
preview during a FLUX job, interrupt of the running job. Tiny random FLUX dev with split parts."""

from __future__ import annotations

import base64
import io
import threading

import pytest
from PIL import Image

from flow_fixtures import TinyFlowModel
from huabi.cli.main import main as cli_main
from huabi.models.transformer_families import TransformerFamily as F
from server_process import ServerProcess

pytest.importorskip("uvicorn")
FLUX = "flux1-dev-tiny"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow_serve_models")
    model = TinyFlowModel(F.FLUX_DEV)
    model.write_parts(root)
    model.write_transformer(root / f"{FLUX}.safetensors")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir):
    process = ServerProcess(tmp_path_factory.mktemp("flow_serve") / "data", models_dir, "--model", FLUX).start()
    yield process
    process.stop()


def test_flux_txt2img_png_equals_the_cli_bytes(server, models_dir, tmp_path):
    raw = server.post("/sdapi/v1/txt2img", json={"prompt": "a red apple", "seed": 77, "steps": 3, "width": 64,
                                                 "height": 64, "cfg_scale": 1, "sampler_name": "Euler"}).json()
    api_png = base64.b64decode(raw["images"][0])
    out = tmp_path / "cli"
    assert cli_main(["generate", "a red apple", "--seed", "77", "--steps", "3", "--size", "64x64", "--cfg", "1",
                     "--sampler", "Euler", "--model", FLUX, "--models-dir", str(models_dir), "--out", str(out),
                     "--quiet"]) == 0
    (path,) = sorted(out.glob("*.png"))
    assert api_png == path.read_bytes()
    assert "Distilled CFG Scale: 3.5, Module 1: ae" in Image.open(io.BytesIO(api_png)).info["parameters"]


def test_flux_progress_preview_and_interrupt(server):
    results: dict = {}
    payload = {"prompt": "long", "seed": 1, "steps": 300, "width": 64, "height": 64, "cfg_scale": 1,
               "sampler_name": "Euler"}
    first = threading.Thread(target=lambda: results.setdefault("first", server.post("/sdapi/v1/txt2img", json=payload)))
    first.start()
    progress = server.wait_running(min_step=2)
    assert progress["state"]["sampling_steps"] == 300 and 0 < progress["progress"] < 1
    preview = server.get("/sdapi/v1/progress").json()["current_image"]
    assert preview and Image.open(io.BytesIO(base64.b64decode(preview))).size[0] > 0
    server.post("/sdapi/v1/interrupt")
    first.join(timeout=120)
    assert results["first"].status_code == 200 and results["first"].json()["images"] == []
