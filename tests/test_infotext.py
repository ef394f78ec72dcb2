"""Infotext: golden strings, real A1111 strings, round trips, bad input.

The A1111 strings below are written to match what A1111 WebUI 1.0-1.10 (and
Forge) put into PNGs: key order from create_infotext, JSON-quoted values with
commas/colons, the old combined sampler names, "Schedule type: Automatic".
"""

import pytest

from huabi.core.infotext import (
    format_infotext,
    parse_infotext,
    quote,
    request_from_infotext,
    split_sampler_schedule,
)
from huabi.core.request import GenerationRequest
from huabi.errors import HuabiError

VERSION = "huabi 0.1.0"


def fmt(request, *, seed=None, size=(512, 512), model=(None, None), extra={}, version=VERSION):
    return format_infotext(
        request,
        seed=request.seed if seed is None else seed,
        width_px=size[0],
        height_px=size[1],
        model_name=model[0],
        model_hash=model[1],
        extra=extra,
        version=version,
    )


# --- golden strings: request -> exact infotext -------------------------------------------------


def test_golden_full_example():
    req = GenerationRequest(
        "a red apple, (masterpiece:1.2)",
        negative_prompt="blurry, lowres",
        sampler="DPM++ 2M",
        schedule="Karras",
        cfg_scale=7.0,
        clip_skip=2,
    )
    text = fmt(req, seed=1234, model=("v1-5-pruned-emaonly", "6ce0161689"))
    assert text == (
        "a red apple, (masterpiece:1.2)\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, Version: huabi 0.1.0"
    )


def test_golden_defaults_omitted():
    # No negative prompt, schedule Automatic, clip skip 1, no model: all left out.
    req = GenerationRequest("a cat", sampler="Euler a", cfg_scale=7.5, steps=30)
    assert fmt(req, seed=7, size=(768, 512)) == (
        "a cat\nSteps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 7, Size: 768x512, Version: huabi 0.1.0"
    )


def test_golden_extras_in_a1111_order_and_quoted():
    req = GenerationRequest("castle", steps=25, sampler="DPM++ 2M SDE", schedule="Exponential", clip_skip=2)
    extra = {
        "My extension": '"hi" she said',  # unknown: after the known keys; leading quote -> quoted
        "Lora hashes": "add_detail: 7c6bbc4a0b3c, more: 123456789abc",
        "Hires upscaler": "Latent",
        "Hires steps": 10,
        "Hires upscale": 2.0,
        "Denoising strength": 0.7,
        "VAE": "vae-ft-mse-840000-ema-pruned.safetensors",
        "VAE hash": "735e4c3a44",
        "Unused": None,  # None: left out
    }
    text = fmt(req, seed=99, size=(512, 768), model=("dreamshaper_8", "879db523c3"), extra=extra)
    assert text == (
        "castle\n"
        "Steps: 25, Sampler: DPM++ 2M SDE, Schedule type: Exponential, CFG scale: 7, Seed: 99, Size: 512x768, "
        "Model hash: 879db523c3, Model: dreamshaper_8, VAE hash: 735e4c3a44, "
        "VAE: vae-ft-mse-840000-ema-pruned.safetensors, Denoising strength: 0.7, Clip skip: 2, "
        "Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent, "
        'Lora hashes: "add_detail: 7c6bbc4a0b3c, more: 123456789abc", '
        'My extension: "\\"hi\\" she said", '
        "Version: huabi 0.1.0"
    )


def test_golden_multiline_prompt_and_negative():
    req = GenerationRequest(
        "first line,\nsecond line", negative_prompt="bad,\nworse", sampler="Euler", cfg_scale=4
    )
    assert fmt(req, seed=0, size=(1024, 1024)) == (
        "first line,\nsecond line\n"
        "Negative prompt: bad,\nworse\n"
        "Steps: 20, Sampler: Euler, CFG scale: 4, Seed: 0, Size: 1024x1024, Version: huabi 0.1.0"
    )


def test_each_image_of_a_batch_records_its_own_seed():
    req = GenerationRequest("a dog", seed=100, batch_size=2, batch_count=2)
    texts = [fmt(req, seed=s) for batch in req.image_seeds() for s in batch]
    assert [t.split("Seed: ")[1].split(",")[0] for t in texts] == ["100", "101", "102", "103"]


def test_quote_matches_a1111_rules():
    assert quote("Latent (nearest-exact)") == "Latent (nearest-exact)"
    assert quote("a, b") == '"a, b"'
    assert quote("x: 1") == '"x: 1"'
    assert quote("line\nbreak") == '"line\\nbreak"'
    assert quote("画笔, 🎨") == '"画笔, 🎨"'  # ensure_ascii=False, like A1111
    assert quote('"lead') == '"\\"lead"'


def test_bare_key_written_when_value_equals_key_and_read_back():
    req = GenerationRequest("p")
    text = fmt(req, seed=1, extra={"Tiled VAE": "Tiled VAE"})
    assert text.endswith("Size: 512x512, Tiled VAE, Version: huabi 0.1.0")
    assert parse_infotext(text).params["Tiled VAE"] == "Tiled VAE"


# --- real A1111 strings ------------------------------------------------------------------------

A1111_SD15_HIRES_LORA = (
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile, "
    "<lora:add_detail:0.6>, (detailed eyes:1.2)\n"
    "Negative prompt: easynegative, (worst quality, low quality:1.4), nsfw\n"
    "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 2847562913, Size: 512x768, "
    "Model hash: 7f96a1a9ca, Model: anything-v5-PrtRE, VAE hash: 735e4c3a44, "
    "VAE: vae-ft-mse-840000-ema-pruned.safetensors, Denoising strength: 0.45, Clip skip: 2, "
    "Hires upscale: 2, Hires steps: 15, Hires upscaler: R-ESRGAN 4x+ Anime6B, "
    'Lora hashes: "add_detail: 7c6bbc4a0b3c", TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1'
)

A1111_SDXL_REFINER = (
    "cinematic photo of an astronaut riding a horse on mars, 35mm, film grain, highly detailed\n"
    "Negative prompt: drawing, painting, illustration, cartoon, anime\n"
    "Steps: 30, Sampler: DPM++ 2M SDE, Schedule type: Karras, CFG scale: 6.5, Seed: 1337, Size: 1024x1024, "
    "Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Refiner: sd_xl_refiner_1.0 [7440042bbd], "
    "Refiner switch at: 0.8, Version: v1.9.4"
)

A1111_OLD_EULER_A = (
    "a beautiful landscape painting of mountains at sunset, trending on artstation\n"
    "Negative prompt: ugly, blurry\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 7460a6fa, "
    "Batch size: 2, Batch pos: 0"
)

A1111_OLD_KARRAS = (
    "portrait of an old fisherman, dramatic lighting\n"
    "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x640, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.6.0"
)

A1111_MULTILINE_ADETAILER = (
    "1girl, cherry blossoms,\n"
    "school uniform, outdoors\n"
    "Negative prompt: (worst quality:1.4), (low quality:1.4),\n"
    "bad hands, extra fingers\n"
    "Steps: 28, Sampler: Euler a, Schedule type: Automatic, CFG scale: 5, Seed: 3891, Size: 832x1216, "
    "Model hash: 67ab2fd8ec, Model: ponyDiffusionV6XL, Clip skip: 2, ADetailer model: face_yolov8n.pt, "
    'ADetailer prompt: "detailed face, beautiful eyes", ADetailer confidence: 0.3, '
    "ADetailer dilate erode: 4, ADetailer mask blur: 4, ADetailer denoising strength: 0.4, "
    "ADetailer inpaint only masked: True, ADetailer inpaint padding: 32, ADetailer version: 24.8.0, "
    "Emphasis: No norm, Version: v1.10.1"
)

FORGE_CRLF_TEMPLATE_CONTROLNET = (
    'a "quoted" word, {red|blue} car\r\n'
    "Negative prompt: \r\n"
    "Steps: 20, Sampler: UniPC, CFG scale: 7, Seed: 5, Size: 512x512, Model hash: e6bb9ea85b, "
    'Model: flux1-dev-bnb-nf4-v2, Template: "a \\"quoted\\" word, {red|blue} car", '
    'ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1, '
    'Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 100, Threshold B: 200, '
    'Guidance Start: 0, Guidance End: 1, Pixel Perfect: False, Control Mode: Balanced", '
    "Module 1: ae, Version: f2.0.1v1.10.1-previous-519-g44eb4ea8\r\n"
)

REAL_STRINGS = [
    A1111_SD15_HIRES_LORA,
    A1111_SDXL_REFINER,
    A1111_OLD_EULER_A,
    A1111_OLD_KARRAS,
    A1111_MULTILINE_ADETAILER,
    FORGE_CRLF_TEMPLATE_CONTROLNET,
]


def test_sd15_hires_lora_fields():
    parsed = parse_infotext(A1111_SD15_HIRES_LORA)
    assert parsed.prompt.endswith("<lora:add_detail:0.6>, (detailed eyes:1.2)")
    assert parsed.negative_prompt == "easynegative, (worst quality, low quality:1.4), nsfw"
    assert parsed.params["Lora hashes"] == "add_detail: 7c6bbc4a0b3c"
    assert parsed.params["TI hashes"] == "easynegative: c74b4e810b03"
    assert parsed.params["Hires upscaler"] == "R-ESRGAN 4x+ Anime6B"
    req = request_from_infotext(A1111_SD15_HIRES_LORA)
    assert (req.steps, req.sampler, req.schedule, req.cfg_scale) == (25, "DPM++ 2M", "Karras", 7.0)
    assert (req.seed, req.width_px, req.height_px, req.clip_skip) == (2847562913, 512, 768, 2)
    assert req.model == "7f96a1a9ca"  # the hash; the service resolves it to a file
    assert req.vae == "vae-ft-mse-840000-ema-pruned.safetensors"
    extra = dict(req.extra)
    assert extra["Model"] == "anything-v5-PrtRE"
    assert extra["Denoising strength"] == "0.45"
    assert extra["Hires steps"] == "15"


def test_sd15_hires_lora_reformats_to_the_same_text():
    # Given what was loaded, format_infotext writes A1111's own line back byte for byte.
    req = request_from_infotext(A1111_SD15_HIRES_LORA)
    extra = dict(req.extra)
    again = fmt(
        req,
        size=(req.width_px, req.height_px),
        model=(extra["Model"], req.model),
        extra={"VAE hash": extra["VAE hash"], "VAE": req.vae},
        version="v1.10.1",
    )
    assert again == A1111_SD15_HIRES_LORA


@pytest.mark.parametrize("text", [A1111_SD15_HIRES_LORA, A1111_SDXL_REFINER])
def test_current_a1111_strings_are_written_back_byte_for_byte(text):
    # With the identity of what was loaded passed in, as the service does.
    req = request_from_infotext(text)
    recorded = dict(req.extra)
    vae = {key: recorded[key] for key in ("VAE hash",) if key in recorded}
    if req.vae:
        vae["VAE"] = req.vae
    again = fmt(
        req,
        size=(req.width_px, req.height_px),
        model=(recorded.get("Model"), recorded.get("Model hash")),
        extra=vae,
        version=recorded["Version"],
    )
    assert again == text


def test_sdxl_refiner_fields():
    req = request_from_infotext(A1111_SDXL_REFINER)
    assert (req.sampler, req.schedule, req.cfg_scale, req.width_px) == ("DPM++ 2M SDE", "Karras", 6.5, 1024)
    assert dict(req.extra)["Refiner"] == "sd_xl_refiner_1.0 [7440042bbd]"
    assert dict(req.extra)["Refiner switch at"] == "0.8"
    assert (req.refiner, req.refiner_switch_at) == ("7440042bbd", 0.8)  # the hash finds the file


def test_old_euler_a_without_schedule_type():
    parsed = parse_infotext(A1111_OLD_EULER_A)
    assert parsed.sampler == "Euler a" and parsed.schedule == "Automatic"
    req = request_from_infotext(A1111_OLD_EULER_A)
    assert (req.sampler, req.schedule, req.clip_skip, req.model) == ("Euler a", "Automatic", 1, "7460a6fa")
    assert dict(req.extra) == {"Model hash": "7460a6fa", "Batch size": "2", "Batch pos": "0"}


def test_old_combined_sampler_name_is_split():
    parsed = parse_infotext(A1111_OLD_KARRAS)
    assert parsed.params["Sampler"] == "DPM++ 2M Karras"  # params stay as written
    assert (parsed.sampler, parsed.schedule) == ("DPM++ 2M", "Karras")
    req = request_from_infotext(A1111_OLD_KARRAS)
    assert (req.sampler, req.schedule, req.cfg_scale) == ("DPM++ 2M", "Karras", 7.5)
    line = fmt(req, size=(512, 640), model=("v1-5-pruned-emaonly", req.model), version="v1.6.0").split("\n")[-1]
    assert line.startswith("Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42,")


@pytest.mark.parametrize(
    "sampler, schedule, expected",
    [
        ("DPM++ 2M Karras", None, ("DPM++ 2M", "Karras")),
        ("DPM++ 2M SDE Exponential", None, ("DPM++ 2M SDE", "Exponential")),
        ("DPM++ SDE Karras", "Automatic", ("DPM++ SDE", "Karras")),  # the suffix wins, as in A1111
        ("Euler", "SGM Uniform", ("Euler", "SGM Uniform")),
        ("Euler sgm_uniform", None, ("Euler", "SGM Uniform")),
        ("DDIM", None, ("DDIM", "Automatic")),
        ("Euler a", "", ("Euler a", "Automatic")),
    ],
)
def test_split_sampler_schedule(sampler, schedule, expected):
    assert split_sampler_schedule(sampler, schedule) == expected


def test_multiline_negative_and_adetailer_quoted_value():
    parsed = parse_infotext(A1111_MULTILINE_ADETAILER)
    assert parsed.prompt == "1girl, cherry blossoms,\nschool uniform, outdoors"
    assert parsed.negative_prompt == "(worst quality:1.4), (low quality:1.4),\nbad hands, extra fingers"
    assert parsed.params["ADetailer prompt"] == "detailed face, beautiful eyes"
    assert parsed.params["ADetailer inpaint only masked"] == "True"
    req = request_from_infotext(A1111_MULTILINE_ADETAILER)
    assert (req.sampler, req.schedule, req.clip_skip) == ("Euler a", "Automatic", 2)
    # A1111 1.10's "Schedule type: Automatic" is left out on writing; ADetailer keys keep their order.
    again = fmt(req, size=(832, 1216), model=("ponyDiffusionV6XL", req.model), version="v1.10.1")
    assert again == A1111_MULTILINE_ADETAILER.replace("Schedule type: Automatic, ", "")


def test_windows_line_endings_escaped_quotes_and_forge_keys():
    parsed = parse_infotext(FORGE_CRLF_TEMPLATE_CONTROLNET)
    assert parsed.prompt == 'a "quoted" word, {red|blue} car'
    assert parsed.negative_prompt == ""
    assert parsed.params["Template"] == 'a "quoted" word, {red|blue} car'
    assert parsed.params["ControlNet 0"].startswith("Module: canny, Model: control_v11p_sd15_canny [d14c016b],")
    assert parsed.params["Module 1"] == "ae"
    assert parsed.params["Version"] == "f2.0.1v1.10.1-previous-519-g44eb4ea8"
    req = request_from_infotext(FORGE_CRLF_TEMPLATE_CONTROLNET)
    assert req.sampler == "UniPC"


@pytest.mark.parametrize("text", REAL_STRINGS)
def test_real_strings_keep_every_key(text):
    parsed = parse_infotext(text)
    assert parsed.has_parameters
    req = request_from_infotext(text)
    mapped = {"Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Clip skip", "VAE"}
    # sd-webui-controlnet units become request.controlnets (the engine writes them back; see test_controlnet_cli)
    mapped |= {key for key in parsed.params if key.startswith("ControlNet ")}
    kept = [key for key, _ in req.extra]
    assert set(parsed.params) == (set(parsed.params) & mapped) | set(kept)
    # Unknown keys keep their original order and values.
    assert [(k, v) for k, v in parsed.params.items() if k not in mapped] == list(req.extra)
    # ...and every one that is not a record of the source run is written again.
    again = fmt(req, size=(req.width_px, req.height_px))
    reparsed = parse_infotext(again).params
    for key, value in req.extra:
        if key not in {"Model", "Model hash", "VAE hash", "Version"}:
            assert reparsed[key] == value, key


def test_prompt_only_text_has_no_parameters():
    parsed = parse_infotext("masterpiece, (best quality:1.2), (red:1.1), (blue:0.9)\nsecond line")
    assert not parsed.has_parameters
    assert parsed.prompt == "masterpiece, (best quality:1.2), (red:1.1), (blue:0.9)\nsecond line"
    parsed = parse_infotext("a cat\nNegative prompt: a dog")
    assert (parsed.prompt, parsed.negative_prompt, parsed.params) == ("a cat", "a dog", {})


def test_unquoted_colon_value_and_trailing_comma_read_like_a1111():
    parsed = parse_infotext("p\nSteps: 20, Sampler: Euler, Seed: 1, Old thing: a:b, ")
    assert parsed.params == {"Steps": "20", "Sampler": "Euler", "Seed": "1", "Old thing": "a:b"}


def test_odd_key_falls_back_to_a1111_reading():
    # "CFG++" breaks A1111's key grammar; A1111 skips that pair and so do we.
    parsed = parse_infotext("p\nSteps: 20, Sampler: Euler, CFG++ x: 1, Seed: 3")
    assert parsed.params == {"Steps": "20", "Sampler": "Euler", "Seed": "3"}


# --- round trips -------------------------------------------------------------------------------

ROUND_TRIP_REQUESTS = [
    GenerationRequest("a red apple", seed=1, width_px=512, height_px=512),
    GenerationRequest(
        "画笔 一只猫, 🎨🐱\n第二行",
        negative_prompt="模糊, 低质量\n🙅",
        steps=33,
        cfg_scale=4.25,
        sampler="DPM++ 2M SDE",
        schedule="SGM Uniform",
        seed=2**32 - 1,  # the largest seed (one rule: 0..4294967295)
        width_px=832,
        height_px=1216,
        clip_skip=3,
        extra=(
            ("Lora hashes", "add_detail: 7c6bbc4a0b3c, 猫: 123456789abc"),
            ("Hires upscale", "1.5"),
            ("Zeta ext", 'quote " inside, and \\ backslash'),
            ("Alpha ext", '"starts with a quote'),
            ("Denoising strength", "0.55"),
        ),
    ),
    GenerationRequest("", negative_prompt="only negative", seed=0, width_px=64, height_px=128, sampler="LCM"),
]


@pytest.mark.parametrize("req", ROUND_TRIP_REQUESTS)
@pytest.mark.parametrize("model", [(None, None), ("my model v2", "0123456789")])
def test_format_parse_request_format_is_identity(req, model):
    vae = {"VAE hash": "735e4c3a44", "VAE": "vae-ft-mse.safetensors"}
    text = fmt(req, size=(req.width_px, req.height_px), model=model, extra=vae)
    back = request_from_infotext(text)
    assert (back.prompt, back.negative_prompt, back.seed, back.clip_skip) == (
        req.prompt,
        req.negative_prompt,
        req.seed,
        req.clip_skip,
    )
    assert back.model == (model[1] or model[0])
    again = fmt(back, size=(back.width_px, back.height_px), model=model, extra=vae)
    assert again == text


def test_records_of_the_source_run_are_not_re_emitted():
    # A parsed request carries the old Model/VAE hash/Version; a new run writes its own.
    req = request_from_infotext(A1111_SD15_HIRES_LORA)
    text = fmt(req, size=(512, 768), model=("other", "aaaaaaaaaa"))
    assert "anything-v5" not in text and "735e4c3a44" not in text and "v1.10.1" not in text
    assert "Model hash: aaaaaaaaaa, Model: other," in text


def test_overrides_replace_fields_and_drop_stale_model_records():
    req = request_from_infotext(A1111_SD15_HIRES_LORA, seed=5, model="/models/mine.safetensors", vae=None)
    assert (req.seed, req.model, req.vae) == (5, "/models/mine.safetensors", None)
    keys = dict(req.extra)
    assert "Model" not in keys and "Model hash" not in keys and "VAE hash" not in keys
    assert "Lora hashes" in keys


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "infotext: no generation parameters found"),
        ("   \r\n  ", "infotext: no generation parameters found"),
        ("a cat, (cute:1.2)\nNegative prompt: dog", "infotext: no generation parameters found"),
        ("a cat\nSampler: Euler, CFG scale: 7, Seed: 3", "infotext: no generation parameters found"),
        ("a cat\nSteps: many, Sampler: Euler, Seed: 3", "infotext: Steps: expected an integer, got 'many'"),
        ("a\nSteps: 20, Sampler: Euler, Seed: 1.5", "infotext: Seed: expected an integer, got '1.5'"),
        ("a\nSteps: 20, CFG scale: high, Seed: 1", "infotext: CFG scale: expected a number, got 'high'"),
        ("a\nSteps: 20, CFG scale: nan, Seed: 1", "infotext: CFG scale: expected a finite number, got 'nan'"),
        ("a\nSteps: 20, Seed: 1, Size: 512 by 512", "infotext: Size: expected WIDTHxHEIGHT, got '512 by 512'"),
        ("a\nSteps: 20, Sampler: Euler, Clip skip: two", "infotext: Clip skip: expected an integer, got 'two'"),
        ("a\nSteps: 20, Sampler: Restart++, Seed: 1", "sampler: unknown sampler 'Restart++'"),
        ("a\nSteps: 20, Sampler: Euler, Size: 500x512", "width_px: must be a multiple of 8, got 500"),
    ],
)
def test_bad_infotext_is_named(text, message):
    with pytest.raises(HuabiError) as err:
        request_from_infotext(text)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_override_and_bad_text_type():
    with pytest.raises(HuabiError, match=r"^request_from_infotext: unknown field 'colour'"):
        request_from_infotext(A1111_OLD_KARRAS, colour="red")
    with pytest.raises(HuabiError, match=r"^infotext: expected text, got bytes$"):
        parse_infotext(b"Steps: 20")


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"Seed": 5}, "infotext: extra key 'Seed' is written from the request's own field; set it there"),
        ({"Model hash": "x"}, "infotext: extra key 'Model hash' is set by format_infotext's own arguments"),
        ({"Version": "x"}, "infotext: extra key 'Version' is set by format_infotext's own arguments"),
        ({"CFG++": 1}, "infotext: extra key 'CFG++' is not a valid infotext key"),
        ({"": 1}, "infotext: extra key '' is not a valid infotext key"),
        ({"Trailing ": 1}, "infotext: extra key 'Trailing ' is not a valid infotext key"),
    ],
)
def test_bad_extra_keys_are_named(extra, message):
    with pytest.raises(HuabiError) as err:
        fmt(GenerationRequest("p", seed=1), extra=extra)
    assert message in str(err.value)


def test_bad_request_extra_and_seed_are_named():
    req = GenerationRequest("p", seed=1, extra=(("Steps", "30"),))
    with pytest.raises(HuabiError, match="request.extra key 'Steps' is written from the request's own field"):
        fmt(req)
    with pytest.raises(HuabiError, match=r"^infotext: seed must be a concrete non-negative integer, got -1$"):
        fmt(GenerationRequest("p"), seed=-1)
    with pytest.raises(HuabiError, match=r"^infotext: width_px must be a positive integer, got 0$"):
        fmt(GenerationRequest("p", seed=1), size=(0, 8))


# --- what A1111 reads from our text --------------------------------------------------------------


def a1111_reading(text):
    """A1111's reading rules: last line is parameters if its pair pattern finds >= 3 pairs
    (found anywhere, the rest skipped); a value in double quotes is JSON-decoded."""
    import json

    from huabi.core.infotext import _A1111_PAIR_RE

    *lines, last = text.strip().split("\n")
    found = _A1111_PAIR_RE.findall(last)
    if len(found) < 3:
        return {}
    params = {}
    for key, value in found:
        if value[:1] == '"' and value[-1:] == '"':
            value = json.loads(value)
        params[key] = value
    return params


@pytest.mark.parametrize("req", ROUND_TRIP_REQUESTS)
def test_a1111_reads_our_parameters_the_same(req):
    text = fmt(req, size=(req.width_px, req.height_px), model=("my model", "0123456789"))
    assert a1111_reading(text) == parse_infotext(text).params
