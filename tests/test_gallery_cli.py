"""CLI runs record their images in the gallery as they write them (service/gallery.py), and the
server's gallery API lists them -- no ``--gallery-folder`` scan involved."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from huabi.cli.main import main as cli_main
from huabi.models.family import ModelFamily
from huabi.service.gallery import DATABASE_NAME, Gallery, GalleryRecorder, default_data_dir, existing_gallery
from huabi.service.pngio import read_infotext
from server_process import ServerProcess
from tiny_models import write_tiny_single_file

TINY = "tiny_sd1"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    write_tiny_single_file(folder, ModelFamily.SD1, filename=f"{TINY}.safetensors")
    return folder / f"{TINY}.safetensors"


def generate(model: Path, out: Path, prompt: str, seed: int) -> Path:
    assert cli_main(["generate", prompt, "--seed", str(seed), "--steps", "2", "--size", "64x64",
                     "--model", str(model), "--out", str(out), "--quiet"]) == 0
    return max(out.glob("*.png"), key=lambda path: path.stat().st_mtime_ns)


def test_cli_images_appear_in_the_servers_gallery_with_their_infotext(tmp_path, tiny_model, monkeypatch):
    data = tmp_path / "data"
    server = ServerProcess(data, tiny_model.parent, "--model", TINY).start()  # creates the gallery database
    try:
        monkeypatch.setenv("HUABI_DATA_DIR", str(data))
        png = generate(tiny_model, tmp_path / "outputs", "a violet lantern from the cli", 41)
        (hit,) = server.get("/huabi/v1/gallery", params={"q": "violet lantern"}).json()["images"]
        assert hit["infotext"] == read_infotext(png)
        assert hit["seed"] == 41 and hit["job_id"] is None and hit["model"] == TINY
        assert hit["width"] == 64 and hit["height"] == 64
        assert server.get(hit["url"]).content == png.read_bytes()
        assert server.get(hit["thumbnail_url"]).status_code == 200
        # An edit is recorded the same way.
        assert cli_main(["edit", str(png), "an orange lantern", "--seed", "5", "--steps", "2", "--strength", "0.5",
                         "--model", str(tiny_model), "--out", str(tmp_path / "edits"), "--quiet"]) == 0
        (edited,) = (tmp_path / "edits").glob("*.png")
        (hit,) = server.get("/huabi/v1/gallery", params={"q": "orange lantern"}).json()["images"]
        assert hit["infotext"] == read_infotext(edited) and "Denoising strength: 0.5" in hit["infotext"]
    finally:
        server.stop()


def test_no_gallery_no_database_and_off_turns_recording_off(tmp_path, tiny_model, monkeypatch):
    data = tmp_path / "data"
    monkeypatch.setenv("HUABI_DATA_DIR", str(data))
    generate(tiny_model, tmp_path / "outputs", "a plain run", 1)
    assert not data.exists()  # a CLI-only user gets no database they never asked for

    Gallery(data / DATABASE_NAME).close()  # a server used this data dir once
    monkeypatch.setenv("HUABI_DATA_DIR", "off")
    assert existing_gallery() is None
    monkeypatch.setenv("HUABI_DATA_DIR", str(data))
    generate(tiny_model, tmp_path / "outputs", "a recorded run", 2)
    with Gallery(data / DATABASE_NAME) as gallery:
        assert [image.prompt for image in gallery.search_images()] == ["a recorded run"]


def test_default_data_dir_is_the_servers(monkeypatch, tmp_path):
    monkeypatch.delenv("HUABI_DATA_DIR")
    monkeypatch.setenv("HUABI_HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / "server"
    from huabi.cli.serve import default_data_dir as serve_default

    assert serve_default() == tmp_path / "server"


def test_a_broken_gallery_costs_a_warning_not_the_image(tmp_path, caplog):
    database = tmp_path / DATABASE_NAME
    gallery = Gallery(database)
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    gallery._db.execute("DROP TABLE images")  # any SQLite failure on insert

    class Result:
        path, infotext = image, "a prompt\nSteps: 2, Seed: 3, Size: 8x8"

    recorder = GalleryRecorder(gallery)
    recorder(Result())
    recorder(Result())
    assert [r.levelname for r in caplog.records if "not recorded" in r.message] == ["WARNING"]  # once
    recorder.close()
    with pytest.raises(sqlite3.ProgrammingError):
        gallery._db.execute("SELECT 1")  # closed
