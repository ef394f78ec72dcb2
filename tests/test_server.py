"""`huabi serve` end to end: a real uvicorn server on 127.0.0.1 driven by the unmodified `webuiapi` client
and by plain HTTP (tiny random-weight models, so images are noise but bytes and infotext are exact)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from huabi.cli.main import main as cli_main
from huabi.models.family import ModelFamily
from server_process import ServerProcess
from tiny_models import write_tiny_single_file

webuiapi = pytest.importorskip("webuiapi")

TINY = "tiny_sd1"
OTHER = "tiny_sd1_other"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    write_tiny_single_file(folder, ModelFamily.SD1, filename=f"{TINY}.safetensors")
    write_tiny_single_file(folder, ModelFamily.SD1, seed=1, filename=f"{OTHER}.safetensors")
    (folder / "Lora").mkdir()
    return folder


@pytest.fixture(scope="module")
def cli_outputs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli_outputs")


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir, cli_outputs):
    process = ServerProcess(tmp_path_factory.mktemp("serve") / "data", models_dir, "--model", TINY,
                            "--gallery-folder", str(cli_outputs)).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=3)


def cli_png(tmp_path: Path, *argv: str) -> bytes:
    out = tmp_path / "cli"
    assert cli_main([*argv, "--out", str(out), "--quiet"]) == 0
    (path,) = sorted(out.glob("*.png"))
    return path.read_bytes()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- A1111 API via webuiapi


def test_txt2img_png_equals_the_cli_bytes_and_infotext(server, api, models_dir, tmp_path):
    result = api.txt2img(prompt="a red apple", negative_prompt="blurry", seed=1234, steps=3, width=64, height=64,
                         cfg_scale=5, sampler_name="DPM++ 2M Karras", scheduler="automatic")
    assert len(result.images) == 1
    assert result.info["all_seeds"] == [1234]
    assert result.info["sd_model_name"] == TINY
    infotext = result.info["infotexts"][0]
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in infotext  # the combined name is split as A1111 does
    # The raw base64 PNG, byte for byte, against `huabi generate` with the same parameters.
    raw = server.post("/sdapi/v1/txt2img", json={
        "prompt": "a red apple", "negative_prompt": "blurry", "seed": 1234, "steps": 3, "width": 64,
        "height": 64, "cfg_scale": 5, "sampler_name": "DPM++ 2M Karras"}).json()
    api_png = base64.b64decode(raw["images"][0])
    expected = cli_png(tmp_path, "generate", "a red apple", "-n", "blurry", "--seed", "1234", "--steps", "3",
                       "--size", "64x64", "--cfg", "5", "--sampler", "DPM++ 2M", "--schedule", "Karras",
                       "--model", str(models_dir / f"{TINY}.safetensors"))
    assert api_png == expected
    assert Image.open(io.BytesIO(api_png)).info["parameters"] == infotext
    assert raw["parameters"]["seed"] == 1234 and raw["parameters"]["steps"] == 3  # echoed request


def test_img2img_with_mask_equals_the_cli(server, api, models_dir, tmp_path):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result = api.img2img(images=[init], mask_image=mask, prompt="a hat", seed=5, steps=3, width=64, height=64,
                         denoising_strength=0.6, mask_blur=2, inpainting_fill=1, inpaint_full_res=False,
                         sampler_name="Euler a")
    assert result.images[0].size == (64, 64)
    infotext = result.info["infotexts"][0]
    assert "Denoising strength: 0.6" in infotext and "Mask blur: 2" in infotext
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    expected = cli_png(tmp_path, "edit", str(tmp_path / "init.png"), "a hat", "--mask", str(tmp_path / "mask.png"),
                       "--seed", "5", "--steps", "3", "--size", "64x64", "--strength", "0.6", "--mask-blur", "2",
                       "--masked-content", "original", "--inpaint-area", "whole", "--sampler", "Euler a",
                       "--model", str(models_dir / f"{TINY}.safetensors"))
    assert png_bytes(result.images[0]) == png_bytes(Image.open(io.BytesIO(expected)))
    assert Image.open(io.BytesIO(expected)).info["parameters"] == infotext
    # Unmasked pixels stay close to the init image (inpainting, not a fresh image).
    out = np.asarray(result.images[0].convert("RGB"), dtype=np.int16)
    assert np.abs(out[:8, :8] - np.asarray(init, dtype=np.int16)[:8, :8]).mean() < 40


def test_model_switch_through_options(server, api):
    models = {m["model_name"]: m["title"] for m in api.get_sd_models()}
    assert {TINY, OTHER, "huabi-mini"} <= set(models)
    api.set_options({"sd_model_checkpoint": models[OTHER]})
    assert api.get_options()["sd_model_checkpoint"] == models[OTHER]
    result = api.txt2img(prompt="x", seed=1, steps=2, width=64, height=64)
    assert result.info["sd_model_name"] == OTHER
    api.util_set_model(TINY)  # webuiapi's helper: find by name, POST options
    assert api.txt2img(prompt="x", seed=1, steps=2, width=64, height=64).info["sd_model_name"] == TINY
    # override_settings switches for one request only
    once = api.txt2img(prompt="x", seed=1, steps=2, width=64, height=64,
                       override_settings={"sd_model_checkpoint": OTHER})
    assert once.info["sd_model_name"] == OTHER
    assert api.get_options()["sd_model_checkpoint"].startswith(f"{TINY}.safetensors [")


def test_png_info_round_trip(api):
    image = api.txt2img(prompt="a cat, (fluffy:1.2)", seed=99, steps=2, width=64, height=64).image
    info = api.png_info(image)
    assert "a cat, (fluffy:1.2)" in info.info and "Seed: 99" in info.info
    assert info.json["parameters"]["Seed"] == "99"


def test_png_info_reads_a_jpegs_exif_user_comment(server):
    """A1111 writes JPEG infotext as an EXIF UserComment (UNICODE charset tag, UTF-16)."""
    image = Image.new("RGB", (16, 16), (10, 20, 30))
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + "a jpeg fox\nSteps: 3, Seed: 5".encode("utf-16-be")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    response = server.post("/sdapi/v1/png-info", json={"image": base64.b64encode(buffer.getvalue()).decode()})
    assert response.status_code == 200, response.text
    assert response.json()["parameters"]["Seed"] == "5" and "a jpeg fox" in response.json()["info"]


def test_listing_routes_answer_in_a1111_shapes(api, server):
    assert "Euler a" in api.util_get_sampler_names()
    schedulers = api.get_schedulers()
    assert any(s["name"] == "karras" and s["label"] == "Karras" for s in schedulers)
    assert not any(s["name"] == "beta" for s in schedulers)  # only what huabi implements
    assert any(u["name"] == "Lanczos" for u in api.get_upscalers())
    assert [m["name"] for m in api.get_latent_upscale_modes()][0] == "Latent"
    assert [lora["name"] for lora in api.get_loras()] == ["demo"]  # the built-in demo LoRA (empty Lora/)
    assert api.get_hypernetworks() == []
    assert "loaded" in api.get_embeddings()
    assert any(s["name"] == "Cinematic" for s in api.get_prompt_styles())  # the built-in styles.csv (no user file)
    assert "ram" in api.get_memory()
    assert api.get_cmd_flags()["api"] is True
    assert api.refresh_checkpoints() is None  # A1111 answers null
    assert server.post("/sdapi/v1/refresh-loras").status_code == 200
    assert "canny" in api.controlnet_module_list()
    assert api.controlnet_model_list() == []
    detected = api.controlnet_detect([Image.new("RGB", (64, 64), "white")], module="canny", processor_res=64)
    assert len(detected.images) == 1 and detected.images[0].size == (64, 64)
    upscaled = api.extra_single_image(Image.new("RGB", (32, 32), "red"), upscaler_1="Lanczos", upscaling_resize=2)
    assert upscaled.image.size == (64, 64)


def test_unsupported_fields_are_refused_with_a_message(server):
    for payload, word in (({"restore_faces": True}, "restore_faces"),
                          ({"script_name": "x/y/z plot"}, "script_name"),
                          ({"scheduler": "beta"}, "scheduler"),
                          ({"sampler_name": "Nope"}, "sampler"),
                          ({"width": 65}, "width"),
                          ({"bogus_field": 1}, "bogus_field"),
                          ({"steps": "many"}, "wrong type"),
                          ({"alwayson_scripts": {"ADetailer": {"args": [True, {}]}}}, "ADetailer"),
                          ({"override_settings": {"img2img_fix_steps": True}}, "img2img_fix_steps")):
        response = server.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64,
                                                         **payload})
        assert response.status_code == 422, (payload, response.text)
        assert word in response.json()["detail"], response.json()
    assert server.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": []}).status_code == 422


# ----------------------------------------------------------------------------- progress, interrupt, cancel


def _long_payload(seed: int, steps: int = 300) -> dict:
    return {"prompt": "long", "seed": seed, "steps": steps, "width": 64, "height": 64, "sampler_name": "Euler"}


def test_progress_during_a_job_and_interrupt_stops_only_the_running_job(server, api):
    results: dict = {}
    first = threading.Thread(target=lambda: results.setdefault("first", server.post("/sdapi/v1/txt2img",
                                                                                   json=_long_payload(1))))
    first.start()
    progress = server.wait_running(min_step=2)
    assert progress["state"]["sampling_steps"] == 300 and 0 < progress["progress"] < 1
    running = progress["current_task"]
    queued = server.post("/huabi/v1/jobs", json={"options": {"prompt": "after", "seed": 3, "steps": 2,
                                                             "size": "64x64"}}).json()
    assert api.get_progress()["state"]["sampling_step"] >= 2  # webuiapi's own progress call
    # A live preview of the current latent (A1111's current_image), decodable as an image of the job's size
    preview = server.get("/sdapi/v1/progress").json()["current_image"]
    assert preview and Image.open(io.BytesIO(base64.b64decode(preview))).size[0] > 0
    assert server.get("/sdapi/v1/progress", params={"skip_current_image": "true"}).json()["current_image"] is None
    assert api.interrupt()["interrupted"] == running
    first.join(timeout=120)
    response = results["first"]
    assert response.status_code == 200 and response.json()["images"] == []  # stopped before its image
    assert server.get(f"/huabi/v1/jobs/{running}").json()["status"] == "interrupted"
    after = server.wait_job(queued["id"])
    assert after["status"] == "done" and after["images"][0]["seed"] == 3


def test_batches_equal_the_cli_and_skip_ends_only_the_current_batch(server, models_dir, tmp_path):
    body = server.post("/sdapi/v1/txt2img", json={"prompt": "batches", "seed": 20, "steps": 2, "width": 64,
                                                   "height": 64, "batch_size": 2, "n_iter": 2}).json()
    assert json.loads(body["info"])["all_seeds"] == [20, 21, 22, 23]
    out = tmp_path / "cli"
    assert cli_main(["generate", "batches", "--seed", "20", "--steps", "2", "--size", "64x64", "--batch-size", "2",
                     "--batch-count", "2", "--sampler", "Euler", "--model", str(models_dir / f"{TINY}.safetensors"),
                     "--out", str(out), "--quiet"]) == 0
    assert [base64.b64decode(image) for image in body["images"]] == [p.read_bytes() for p in sorted(out.glob("*.png"))]
    # skip: the first of three batches is cut short, the other two are made
    job = server.post("/huabi/v1/jobs", json={"options": {"prompt": "skip", "seed": 40, "steps": 200,
                                                          "size": "64x64", "batch_count": 3}}).json()["id"]
    progress = server.wait_running(job, min_step=2)
    assert progress["state"]["sampling_steps"] == 600 and progress["state"]["sampling_step"] < 200
    assert server.post("/sdapi/v1/skip").json()["skipped"] == job
    finished = server.wait_job(job)
    assert finished["status"] == "done"
    assert [image["seed"] for image in finished["images"]] == [41, 42]  # batch 0 skipped, 1 and 2 made


def test_cancel_one_queued_job_only(server):
    submit = lambda seed, steps: server.post("/huabi/v1/jobs", json={  # noqa: E731
        "options": {"prompt": "q", "seed": seed, "steps": steps, "size": "64x64"}}).json()["id"]
    running = submit(10, 200)
    server.wait_running(running)
    victim, survivor = submit(11, 2), submit(12, 2)
    listed = server.get("/huabi/v1/jobs", params={"status": "queued"}).json()
    assert {job["id"] for job in listed["jobs"]} >= {victim, survivor}
    assert server.post(f"/huabi/v1/jobs/{victim}/cancel").json()["status"] == "cancelled"
    assert server.post(f"/huabi/v1/jobs/{running}/cancel").json()["status"] == "cancelling"
    assert server.wait_job(running)["status"] == "cancelled"
    assert server.wait_job(victim)["status"] == "cancelled"
    done = server.wait_job(survivor)
    assert done["status"] == "done" and [image["seed"] for image in done["images"]] == [12]
    assert server.post("/huabi/v1/jobs/nope/cancel").status_code == 404


def test_sse_stream_reports_steps_of_a_job(server):
    events = []

    def read():
        with requests.get(server.url + "/huabi/v1/events", stream=True, timeout=60) as stream:
            for line in stream.iter_lines():
                if line.startswith(b"data: "):
                    event = json.loads(line[6:])
                    events.append(event)
                    if event["event"] == "finished":
                        return

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.5)
    job = server.post("/huabi/v1/jobs", json={"options": {"prompt": "sse", "seed": 4, "steps": 4,
                                                          "size": "64x64"}}).json()["id"]
    reader.join(timeout=120)
    mine = [e for e in events if e.get("job") == job]
    assert [e["event"] for e in mine][0] == "queued"
    steps = [e["step"] for e in mine if e["event"] == "progress"]
    assert steps and steps[-1] == 4 and steps == sorted(steps)
    assert mine[-1]["event"] == "finished" and mine[-1]["status"] == "done"


# ----------------------------------------------------------------------------- concurrency


def test_eight_concurrent_clients_each_get_their_own_images(server):
    results: dict[int, requests.Response] = {}
    progress_codes: list[int] = []

    def client(index: int) -> None:
        results[index] = server.post("/sdapi/v1/txt2img", json={
            "prompt": f"client {index}", "seed": 1000 + index, "steps": 6, "width": 64, "height": 64,
            "batch_size": 2})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    server.wait_running()
    while any(thread.is_alive() for thread in threads):  # the server answers /progress while jobs run
        progress_codes.append(server.get("/sdapi/v1/progress", timeout=10).status_code)
        time.sleep(0.1)
    for thread in threads:
        thread.join()
    assert progress_codes and set(progress_codes) == {200}
    for index in range(8):
        body = results[index].json()
        info = json.loads(body["info"])
        assert info["all_seeds"] == [1000 + index, 1001 + index]
        assert info["all_prompts"] == [f"client {index}"] * 2
        assert len(body["images"]) == 2
        for image, seed in zip(body["images"], info["all_seeds"]):
            assert f"Seed: {seed}," in Image.open(io.BytesIO(base64.b64decode(image))).info["parameters"]


# ----------------------------------------------------------------------------- gallery


def test_gallery_search_favourite_redo_delete(server):
    job = server.post("/huabi/v1/jobs", json={"options": {"prompt": "a blue teapot", "seed": 77, "steps": 2,
                                                          "size": "64x64"}}).json()["id"]
    image = server.wait_job(job)["images"][0]
    found = server.get("/huabi/v1/gallery", params={"q": "blue teapot"}).json()["images"]
    assert [i["id"] for i in found] == [image["id"]] and found[0]["seed"] == 77 and found[0]["width"] == 64
    assert server.get("/huabi/v1/gallery", params={"seed": 77}).json()["images"][0]["id"] == image["id"]
    assert server.get("/huabi/v1/gallery", params={"q": "no such prompt"}).json()["images"] == []
    assert server.get(image["thumbnail_url"]).status_code == 200
    original = server.get(image["url"]).content
    assert server.post(f"/huabi/v1/gallery/{image['id']}/favourite", json={"favourite": True}).json()["favourite"]
    assert [i["id"] for i in server.get("/huabi/v1/gallery", params={"favourite": True}).json()["images"]] == [image["id"]]
    redo = server.post(f"/huabi/v1/gallery/{image['id']}/redo").json()["id"]
    again = server.wait_job(redo)["images"][0]
    assert server.get(again["url"]).content == original  # --from the infotext: the same PNG again
    assert server.delete(f"/huabi/v1/gallery/{again['id']}").json()["deleted"] == again["id"]
    assert server.get(f"/huabi/v1/gallery/{again['id']}").status_code == 404


def test_gallery_indexes_the_cli_outputs(server, models_dir, cli_outputs):
    assert cli_main(["generate", "a green kettle from the cli", "--seed", "31", "--steps", "2", "--size", "64x64",
                     "--model", str(models_dir / f"{TINY}.safetensors"), "--out", str(cli_outputs), "--quiet"]) == 0
    (cli_outputs / "notes.png").write_bytes(b"not a png")  # skipped, not an error
    assert server.post("/huabi/v1/gallery/scan").json() == {"added": 1}
    assert server.post("/huabi/v1/gallery/scan").json() == {"added": 0}  # indexed once
    (hit,) = server.get("/huabi/v1/gallery", params={"q": "green kettle"}).json()["images"]
    assert hit["seed"] == 31 and hit["job_id"] is None and hit["model"] == TINY
    (png,) = [p for p in cli_outputs.glob("*.png") if p.name != "notes.png"]
    assert server.get(hit["url"]).content == png.read_bytes()


# ----------------------------------------------------------------------------- limits and path safety


def test_limits_are_4xx_with_one_line_reasons(server):
    base = {"prompt": "x", "steps": 2, "width": 64, "height": 64}
    cases = (({"width": 4096, "height": 4096}, 422, "width x height"),
             ({"batch_size": 8, "n_iter": 8}, 422, "batch_size x n_iter"),
             ({"prompt": "x" * 20_000}, 422, "prompt"))
    for extra, status, word in cases:
        response = server.post("/sdapi/v1/txt2img", json={**base, **extra})
        assert response.status_code == status and word in response.json()["detail"]
        assert "\n" not in response.json()["detail"]
    too_big = server.post("/sdapi/v1/txt2img", data=b"{" + b" " * (60 * 2**20) + b"}",
                          headers={"Content-Type": "application/json"})
    assert too_big.status_code == 413
    # a decompression bomb: a tiny PNG that claims 30000 x 30000 pixels
    bomb = io.BytesIO()
    Image.new("1", (30000, 30000)).save(bomb, format="PNG")
    assert len(bomb.getvalue()) < 200_000
    response = server.post("/sdapi/v1/img2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64,
                                                     "init_images": [base64.b64encode(bomb.getvalue()).decode()]})
    assert response.status_code == 422 and "larger than this server accepts" in response.json()["detail"]
    over_limit = io.BytesIO()  # under Pillow's own bomb limit, over this server's 2048x2048
    Image.new("1", (3000, 3000)).save(over_limit, format="PNG")
    response = server.post("/sdapi/v1/png-info", json={"image": base64.b64encode(over_limit.getvalue()).decode()})
    assert response.status_code == 422 and "larger than this server accepts" in response.json()["detail"]
    response = server.post("/sdapi/v1/png-info", json={"image": "not base64 at all!"})
    assert response.status_code == 422
    assert server.get("/sdapi/v1/progress").status_code == 200  # still serving


def test_paths_in_fields_are_refused(server, models_dir, tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((models_dir / f"{TINY}.safetensors").read_bytes())
    (models_dir / "Lora" / "escape.safetensors").symlink_to(outside)
    (models_dir / "linked.safetensors").symlink_to(outside)
    base = {"prompt": "x", "steps": 2, "width": 64, "height": 64}
    attempts = (
        ("/sdapi/v1/txt2img", {**base, "override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}),
        ("/sdapi/v1/txt2img", {**base, "override_settings": {"sd_model_checkpoint": str(outside)}}),
        ("/sdapi/v1/txt2img", {**base, "override_settings": {"sd_model_checkpoint": "linked"}}),
        ("/sdapi/v1/txt2img", {**base, "override_settings": {"sd_vae": "/tmp/x.safetensors"}}),
        ("/sdapi/v1/txt2img", {**base, "prompt": "x <lora:../../secret:1>"}),
        ("/sdapi/v1/txt2img", {**base, "prompt": "x <lora:escape:1>"}),
        ("/sdapi/v1/txt2img", {**base, "prompt": "x __../../etc/passwd__"}),
        ("/sdapi/v1/txt2img", {**base, "refiner_checkpoint": "../up.safetensors"}),
        ("/sdapi/v1/txt2img", {**base, "enable_hr": True, "hr_upscaler": "/etc/passwd"}),
        ("/sdapi/v1/txt2img", {**base, "alwayson_scripts": {"ControlNet": {"args": [{"model": "../cn"}]}}}),
        ("/sdapi/v1/options", {"sd_model_checkpoint": "/etc/passwd"}),
        ("/huabi/v1/jobs", {"options": {"prompt": "x", "model": "../x"}}),
        ("/huabi/v1/jobs", {"options": {"prompt": "x", "from_image": "/etc/passwd"}}),
        ("/huabi/v1/jobs", {"options": {"prompt": "x", "hypernetwork": "/etc/passwd"}}),
        ("/huabi/v1/jobs", {"kind": "edit", "options": {"prompt": "x", "image": "/etc/passwd"}}),
    )
    for route, payload in attempts:
        response = server.post(route, json=payload)
        assert response.status_code in (400, 422), (payload, response.status_code, response.text)
    assert server.get("/sdapi/v1/progress").status_code == 200


def test_full_queue_is_503_with_retry_after(tmp_path, models_dir):
    process = ServerProcess(tmp_path / "data", models_dir, "--model", TINY, "--max-queue", "1").start()
    try:
        submit = lambda: process.post("/huabi/v1/jobs", json={"options": {  # noqa: E731
            "prompt": "x", "seed": 1, "steps": 300, "size": "64x64"}})
        running = submit().json()["id"]
        process.wait_running(running)
        assert submit().status_code == 202
        full = submit()
        assert full.status_code == 503 and full.headers["Retry-After"].isdigit()
        assert "queue" in full.json()["detail"]
        assert process.post("/sdapi/v1/txt2img", json={"prompt": "x"}).status_code == 503
        process.post("/sdapi/v1/interrupt")
    finally:
        process.stop()


def test_auth_401_on_every_route(tmp_path, models_dir):
    process = ServerProcess(tmp_path / "data", models_dir, "--model", TINY, auth=("ann", "s3cret")).start()
    try:
        routes = [("GET", "/"), ("GET", "/webui/app.js"), ("GET", "/openapi.json"),
                  ("POST", "/sdapi/v1/txt2img"), ("POST", "/sdapi/v1/img2img"), ("GET", "/sdapi/v1/progress"),
                  ("POST", "/sdapi/v1/interrupt"), ("GET", "/sdapi/v1/options"), ("POST", "/sdapi/v1/options"),
                  ("GET", "/sdapi/v1/sd-models"), ("POST", "/sdapi/v1/png-info"), ("GET", "/controlnet/model_list"),
                  ("GET", "/huabi/v1/jobs"), ("POST", "/huabi/v1/jobs"), ("GET", "/huabi/v1/events"),
                  ("GET", "/huabi/v1/gallery"), ("GET", "/huabi/v1/gallery/1/image"), ("GET", "/no/such/route")]
        for method, route in routes:
            for auth in (None, ("ann", "wrong"), ("bob", "s3cret")):
                response = requests.request(method, process.url + route, auth=auth, json={}, timeout=30)
                assert response.status_code == 401, (method, route, auth)
                assert response.headers["WWW-Authenticate"].startswith("Basic")
        assert process.get("/sdapi/v1/options").status_code == 200
        client = webuiapi.WebUIApi(host="127.0.0.1", port=process.port, username="ann", password="s3cret")
        assert client.txt2img(prompt="x", seed=2, steps=2, width=64, height=64).info["all_seeds"] == [2]
    finally:
        process.stop()


def test_non_loopback_host_needs_auth(capsys):
    assert cli_main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "--api-auth" in capsys.readouterr().err


def test_port_in_use_is_a_one_line_error(capsys, tmp_path, models_dir):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = cli_main(["serve", "--port", str(port), "--data-dir", str(tmp_path / "data"),
                         "--models-dir", str(models_dir)])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1


def test_bad_api_auth_and_unknown_model_are_one_line_errors(capsys, tmp_path, models_dir):
    assert cli_main(["serve", "--api-auth", "nopassword", "--data-dir", str(tmp_path)]) == 2
    assert "USER:PASS" in capsys.readouterr().err
    assert cli_main(["serve", "--model", "no-such-model", "--data-dir", str(tmp_path),
                     "--models-dir", str(models_dir), "--port", "1"]) == 2
    assert "no checkpoint named 'no-such-model'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- crash recovery


def test_kill_9_mid_job_loses_nothing(tmp_path, models_dir):
    data = tmp_path / "data"
    process = ServerProcess(data, models_dir, "--model", TINY).start()
    ids = []
    try:
        for index in range(5):
            response = process.post("/huabi/v1/jobs", json={"options": {
                "prompt": f"job {index}", "seed": 50 + index, "steps": 300 if index == 0 else 3,
                "size": "64x64"}})
            assert response.status_code == 202
            ids.append(response.json()["id"])
        process.wait_running(ids[0], min_step=5)
    finally:
        process.kill9()
    restarted = ServerProcess(data, models_dir, "--model", TINY).start()
    try:
        jobs = [restarted.wait_job(job_id) for job_id in ids]
        assert jobs[0]["status"] == "failed" and "stopped" in jobs[0]["error"]
        for index, job in enumerate(jobs[1:], start=1):
            assert job["status"] == "done", job
            assert [image["seed"] for image in job["images"]] == [50 + index]
        assert not list(data.rglob("*.tmp"))
        for png in (data / "outputs").rglob("*.png"):
            Image.open(png).load()  # every file is a whole PNG
            assert png.read_bytes().endswith(b"IEND\xaeB`\x82")
    finally:
        restarted.stop()


def test_network_guard_resolves_loopback_names_only():
    import socket

    from conftest import NetworkAccessError

    assert socket.getaddrinfo("localhost", 80)  # test servers are reached by name
    with pytest.raises(NetworkAccessError):
        socket.getaddrinfo("example.com", 80)
    with pytest.raises(NetworkAccessError):
        socket.create_connection(("192.0.2.1", 80), timeout=1)
