"""service/requests.py: the request builder the CLI, the REST API and the web UI share."""

from __future__ import annotations

import dataclasses

import pytest

from huabi.core.control import ControlUnit, format_unit_infotext
from huabi.core.infotext import format_infotext
from huabi.core.request import EditOptions, GenerationRequest
from huabi.errors import HuabiError
from huabi.service.requests import (
    EDIT_FIELDS,
    REQUEST_FIELDS,
    ControlInput,
    edit_job,
    expand_prompt_job,
    prompt_jobs,
)


def test_field_lists_come_from_the_dataclasses():
    assert set(REQUEST_FIELDS) == {f.name for f in dataclasses.fields(GenerationRequest)} - {"extra", "controlnets"}
    assert set(EDIT_FIELDS) == {f.name for f in dataclasses.fields(EditOptions)} - {"init_image", "mask_image"}
    with pytest.raises(HuabiError, match=r"^request: unknown field 'stepz'; valid: prompt, negative_prompt"):
        prompt_jobs(["x"], {"stepz": 3})


def test_midjourney_lora_hires_and_refiner_pass_implications():
    [job] = prompt_jobs(["a fox --ar 3:2 --chaos 30 --no fog"], {"seed": 8, "hires_steps": 2,
                                                                   "refiner_hires_pass": "both"}, loras=["ink:0.6"])
    assert job.grid and job.request.batch_size == 4 and job.request.hires  # a hires setting turns hires on
    assert job.request.refiner_hires_pass == "both passes"
    assert job.request.prompt == "a fox <lora:ink:0.6>"
    requests = expand_prompt_job(job, 512)  # Midjourney parameters apply once the native size is known
    assert [(r.width_px, r.height_px, r.negative_prompt) for r in requests] == [(640, 448, "fog")] * len(requests)
    assert requests[0].seed == 8


def test_from_infotext_fills_recorded_control_units_in_order():
    unit = ControlUnit(model="cn", image="a.png", module="canny")
    recorded = GenerationRequest("a house", seed=3, steps=4, width_px=64, height_px=64)
    text = format_infotext(recorded, seed=3, width_px=64, height_px=64, model_name="m", model_hash="0123456789",
                           extra={"ControlNet 0": format_unit_infotext(unit, "cn [0123abcd]")}, version="huabi test")
    [job] = prompt_jobs([None], {}, from_infotext=text, control=ControlInput(fill={"image": ["b.png"]}))
    assert job.request.controlnets[0].image == "b.png" and job.request.controlnets[0].module == "canny"
    with pytest.raises(HuabiError, match=r"^--control-image: 2 given but there are 1 ControlNet units"):
        prompt_jobs([None], {}, from_infotext=text, control=ControlInput(fill={"image": ["b.png", "c.png"]}))


def test_edit_job_defaults_and_outpaint_arithmetic_from_an_edit():
    request, options = edit_job("in.png", "make it snowy", {}, {"image_cfg_scale": 1.2})
    assert options.instruct and options.denoising_strength == 1.0  # an image scale means an instruct edit
    request, options = edit_job("in.png", "a beach", {"seed": 5}, {"outpaint": "left=16,up=8", "resize_mode": "fill"})
    assert options.outpaint == (16, 0, 8, 0) and options.resize_mode == "fill" and options.denoising_strength == 0.75
    text = format_infotext(request.replace(width_px=80, height_px=72), seed=5, width_px=80, height_px=72,
                           model_name="m", model_hash="0123456789",
                           extra={"Denoising strength": 0.75, "Outpaint": "left=16,up=8"}, version="huabi test")
    again, again_options = edit_job("in.png", None, {}, {}, from_infotext=text)
    assert (again.width_px, again.height_px) == (64, 64)  # the canvas size minus the recorded extension
    assert again_options.outpaint == (16, 0, 8, 0)
    with pytest.raises(HuabiError, match=r"^prompt: give a prompt, or --from PNG"):
        edit_job("in.png", None, {}, {})
