"""The server builds its requests with the service's builders, as the CLI does: same options, same requests.

Each case is given once as server options and once as the ``huabi generate|edit`` flags that mean
the same; both must build equal requests (no model is loaded).
"""

from __future__ import annotations

import pytest
from PIL import Image

from huabi.cli.edit import request_from_args
from huabi.cli.main import build_parser, jobs_from_args
from huabi.errors import HuabiError
from huabi.server.runner import RunnerConfig, build_jobs


@pytest.fixture()
def picture(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 255).save(mask)
    return path, mask


GENERATE_CASES = [
    ({"prompt": "a red apple", "steps": 7, "cfg_scale": 5.5, "seed": 3, "size": "64x96", "sampler": "Euler a"},
     ["a red apple", "--steps", "7", "--cfg", "5.5", "--seed", "3", "--size", "64x96", "--sampler", "Euler a"]),
    ({"prompt": "x", "hires_resize": "128x128", "hires_upscaler": "Lanczos", "refiner_hires_pass": "both",
      "hires_steps": 3, "batch_size": 2, "batch_count": 2, "clip_skip": 2, "tile": True},
     ["x", "--hires-resize", "128x128", "--hires-upscaler", "Lanczos", "--refiner-hires-pass", "both",
      "--hires-steps", "3", "--batch-size", "2", "--batch-count", "2", "--clip-skip", "2", "--tile"]),
    ({"prompt": "y --ar 3:2", "variation_seed": 9, "variation_strength": 0.25, "seed_resize_from": "64x64",
      "negative_prompt": "blur", "hires": False},
     ["y --ar 3:2", "--variation-seed", "9", "--variation-strength", "0.25", "--seed-resize-from", "64x64",
      "--negative", "blur"]),
    ({"prompt": "z", "controlnets": [{"model": "canny.safetensors", "image": "c.png", "weight": 0.5, "start": 0.1,
                                      "res": 256, "module": "canny"}, {"model": "depth", "end": 0.8}]},
     ["z", "--controlnet", "canny.safetensors", "--control-image", "c.png", "--control-weight", "0.5",
      "--control-start", "0.1", "--control-res", "256", "--control-module", "canny",
      "--controlnet", "depth", "--control-end", "0.8"]),
]


@pytest.mark.parametrize("options, flags", GENERATE_CASES)
def test_generate_options_build_the_cli_requests(options, flags):
    cli_jobs = jobs_from_args(build_parser().parse_args(["generate", *flags]))
    server_jobs = build_jobs("generate", options, RunnerConfig())
    assert server_jobs == cli_jobs


def test_edit_options_build_the_cli_request(picture):
    image, mask = picture
    options = {"image": str(image), "mask": str(mask), "prompt": "a hat", "strength": 0.6, "mask_blur": 2,
               "inpaint_area": "masked", "padding": 8, "invert_mask": True, "resize_mode": "fill", "size": "64x64",
               "masked_content": "fill", "steps": 4}
    flags = ["edit", str(image), "a hat", "--mask", str(mask), "--strength", "0.6", "--mask-blur", "2",
             "--inpaint-area", "masked", "--padding", "8", "--invert-mask", "--resize-mode", "fill", "--size", "64x64",
             "--masked-content", "fill", "--steps", "4"]
    assert build_jobs("edit", options, RunnerConfig()) == request_from_args(build_parser().parse_args(flags))
    outpaint = {"image": str(image), "prompt": "more", "outpaint": "left=16,up=8", "instruct": None}
    assert build_jobs("edit", outpaint, RunnerConfig()) == request_from_args(
        build_parser().parse_args(["edit", str(image), "more", "--outpaint", "left=16,up=8"]))


@pytest.mark.parametrize("kind, options, message", [
    ("generate", {"prompt": "a", "steps": "many"}, "steps: expected a int value"),
    ("generate", {"prompt": "a", "tile": "yes"}, "tile: expected a switch"),
    ("generate", {"prompt": "a", "refiner_hires_pass": "third"}, "refiner_hires_pass: must be one of"),
    ("generate", {"prompt": "a", "mask": "m.png"}, "mask: not an option of generate"),
    ("edit", {"image": "i.png", "prompt": "a", "styles": ["s"]}, "styles: not an option of edit"),
    ("edit", {"prompt": "a"}, "image: an edit needs an init image"),
    ("generate", {"prompt": "a", "size": "big"}, "size: expected WIDTHxHEIGHT"),
    ("generate", {"prompt": "a", "frobnicate": 1}, "unknown option 'frobnicate'"),
    ("generate", {}, "prompt: give a prompt"),
])
def test_bad_options_are_one_line_errors(kind, options, message):
    with pytest.raises(HuabiError, match=message.replace("(", r"\(")):
        build_jobs(kind, options, RunnerConfig())


def test_the_servers_engine_uses_the_clis_thread_count(monkeypatch):
    """PNG bytes depend on torch's thread count: the server's engine (and its queue thread) uses
    the count the CLI uses (configure_threads), not whatever the process had."""
    import threading

    import torch

    from huabi.server.runner import Runner
    from huabi.service.device_choice import recommended_threads

    previous = torch.get_num_threads()
    monkeypatch.setenv("HUABI_THREADS", "2")
    try:
        torch.set_num_threads(1)
        Runner(RunnerConfig(device="cpu", dtype="fp32")).engine  # noqa: B018 -- creating it is the point
        seen: list[int] = []
        worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        worker.start()
        worker.join()
        assert torch.get_num_threads() == recommended_threads() == 2 and seen == [2]
    finally:
        torch.set_num_threads(previous)


def test_every_server_option_names_a_real_request_or_edit_field():
    from huabi.server import runner
    from huabi.service.requests import EDIT_FIELDS, REQUEST_FIELDS

    assert {field for field, _ in runner._REQUEST_OPTIONS.values()} <= set(REQUEST_FIELDS)
    assert {field for field, _ in runner._EDIT_OPTIONS.values()} <= set(EDIT_FIELDS)
    # The options clients send (the API's contract, as before the server stopped going through cli/).
    assert runner.OPTION_NAMES == {
        "prompt", "image", "styles", "controlnets", "from_image", "negative_prompt", "steps", "cfg_scale", "sampler",
        "schedule", "seed", "size", "batch_size", "batch_count", "clip_skip", "model", "vae", "refiner",
        "refiner_switch_at", "hypernetwork", "hypernetwork_strength", "tile", "variation_seed", "variation_strength",
        "seed_resize_from", "hires", "hires_scale", "hires_resize", "hires_upscaler", "hires_steps", "hires_denoise",
        "refiner_hires_pass", "mask", "strength", "mask_blur", "masked_content", "inpaint_area", "padding",
        "invert_mask", "resize_mode", "outpaint", "instruct", "image_cfg_scale"}
