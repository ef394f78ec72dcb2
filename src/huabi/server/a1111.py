"""A1111's ``/sdapi/v1`` JSON -> huabi options (the CLI's names), and results -> A1111's response shapes.

Field names and defaults follow A1111's API models (StableDiffusionTxt2ImgProcessingAPI,
StableDiffusionImg2ImgProcessingAPI) and the ControlNet extension's unit format.
A field huabi cannot honour with a value that would change the image is refused
with a message (HTTP 422), never silently ignored.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from huabi.errors import HuabiError
from huabi.server.catalog import Catalog

# A1111 API defaults (modules/processing.py, modules/api/models.py).
TXT2IMG_DEFAULTS: dict[str, object] = {
    "prompt": "", "negative_prompt": "", "styles": [], "seed": -1, "subseed": -1, "subseed_strength": 0.0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": None, "scheduler": None,
    "batch_size": 1, "n_iter": 1, "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512,
    "restore_faces": None, "tiling": None, "do_not_save_samples": False, "do_not_save_grid": False,
    "eta": None, "denoising_strength": None, "s_min_uncond": None, "s_churn": None, "s_tmax": None,
    "s_tmin": None, "s_noise": None, "override_settings": None, "override_settings_restore_afterwards": True,
    "refiner_checkpoint": None, "refiner_switch_at": None, "disable_extra_networks": False,
    "firstpass_image": None, "comments": None, "enable_hr": False, "firstphase_width": 0,
    "firstphase_height": 0, "hr_scale": 2.0, "hr_upscaler": None, "hr_second_pass_steps": 0,
    "hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None,
    "hr_scheduler": None, "hr_prompt": "", "hr_negative_prompt": "", "force_task_id": None,
    "sampler_index": "Euler", "script_name": None, "script_args": [], "send_images": True,
    "save_images": False, "alwayson_scripts": {}, "infotext": None,
}
IMG2IMG_DEFAULTS: dict[str, object] = {
    **{k: v for k, v in TXT2IMG_DEFAULTS.items() if not k.startswith(("hr_", "enable_hr", "firstphase", "firstpass"))},
    "init_images": None, "resize_mode": 0, "image_cfg_scale": None, "mask": None, "mask_blur_x": 4,
    "mask_blur_y": 4, "mask_blur": None, "mask_round": True, "inpainting_fill": 0, "inpaint_full_res": True,
    "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0, "initial_noise_multiplier": None,
    "latent_mask": None, "include_init_images": False, "denoising_strength": 0.75,
}
RESIZE_MODES = {0: "just", 1: "crop", 2: "fill"}  # 3: "Just resize (latent upscale)" is not in huabi
MASKED_CONTENT = {0: "fill", 1: "original", 2: "latent-noise", 3: "latent-nothing"}
SCHEDULERS = (  # A1111's scheduler names (modules/sd_schedulers.py) and huabi's label for each it has
    ("automatic", "Automatic"), ("uniform", None), ("karras", "Karras"), ("exponential", "Exponential"),
    ("polyexponential", None), ("sgm_uniform", "SGM Uniform"), ("kl_optimal", None),
    ("align_your_steps", None), ("simple", "Simple"), ("normal", "Normal"), ("ddim", "DDIM"), ("beta", None),
)
# override_settings keys huabi acts on; harmless ones accepted when they hold these values.
HARMLESS_SETTINGS = {"samples_format": "png", "eta_noise_seed_delta": 0, "save_images": None,
                     "samples_save": None, "grid_save": None, "return_grid": None, "show_progressbar": None,
                     "live_previews_enable": None, "enable_pnginfo": True}


class BadRequest(HuabiError):
    """A request field huabi cannot honour; the message names it."""


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 50 * 2**20
    max_pixels: int = 2048 * 2048  # output width x height, and every decoded input image
    max_side_px: int = 4096
    max_batch_images: int = 16  # batch_size x n_iter
    max_prompt_chars: int = 10_000
    max_queued: int = 100


@dataclass
class Context:
    """What a mapping needs from the server: names resolved safely, input images stored, current settings."""

    catalog: Catalog
    limits: Limits
    settings: dict  # the /options the client set (sd_model_checkpoint, sd_vae, CLIP_stop_at_last_layers, ...)
    save_input: Callable[[Image.Image, str], str]  # (image, role) -> path of a PNG the job can read


def decode_image(data: object, what: str, limits: Limits) -> Image.Image:
    """A base64 image (with or without a data: URL prefix), size-checked before its pixels are decoded."""
    if not isinstance(data, str) or not data:
        raise BadRequest(f"{what}: must be a base64-encoded image")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what}: not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError:  # Pillow's own header check, far above this server's limit
        raise BadRequest(f"{what}: larger than this server accepts ({limits.max_pixels} pixels)") from None
    except (UnidentifiedImageError, OSError):
        raise BadRequest(f"{what}: not an image Pillow can read") from None
    width, height = image.size  # from the header: nothing is decompressed yet
    if width * height > limits.max_pixels or max(width, height) > limits.max_side_px:
        raise BadRequest(f"{what}: {width}x{height} is larger than this server accepts "
                         f"({limits.max_pixels} pixels, {limits.max_side_px} px a side)")
    try:
        image.load()
    except (OSError, Image.DecompressionBombError, ValueError):
        raise BadRequest(f"{what}: the image data is damaged") from None
    return image


def encode_png(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _reject_unless(payload: Mapping, key: str, allowed: tuple, why: str) -> None:
    if payload.get(key) not in allowed:
        raise BadRequest(f"{key}: {payload.get(key)!r} is not supported by huabi ({why})")


def merged(payload: Mapping, defaults: Mapping) -> dict:
    unknown = [key for key in payload if key not in defaults]
    if unknown:
        raise BadRequest(f"{unknown[0]}: unknown field")
    return {**defaults, **payload}


def sampler_and_schedule(p: Mapping) -> tuple[str, str]:
    """A1111's sampler_name (or deprecated sampler_index) + scheduler; "DPM++ 2M Karras" is split as A1111 does."""
    from huabi.core.infotext import split_sampler_schedule

    sampler = p.get("sampler_name") or p.get("sampler_index") or "Euler"
    scheduler = p.get("scheduler") or "automatic"
    labels = dict(SCHEDULERS)
    key = str(scheduler).strip().lower().replace(" ", "_")
    if key not in labels and str(scheduler) not in labels.values():
        raise BadRequest(f"scheduler: unknown scheduler {scheduler!r}; see /sdapi/v1/schedulers")
    label = labels.get(key, str(scheduler))
    if label is None:
        raise BadRequest(f"scheduler: {scheduler!r} is not implemented in huabi; see /sdapi/v1/schedulers")
    sampler, schedule = split_sampler_schedule(str(sampler), None if label == "Automatic" else label)
    return sampler, schedule


def common_options(p: Mapping, ctx: Context, kind: str) -> dict:
    """The fields txt2img and img2img share."""
    limits = ctx.limits
    for key in ("prompt", "negative_prompt"):
        if not isinstance(p[key], str):
            raise BadRequest(f"{key}: must be text")
        if len(p[key]) > limits.max_prompt_chars:
            raise BadRequest(f"{key}: {len(p[key])} characters; this server accepts up to {limits.max_prompt_chars}")
        ctx.catalog.check_prompt(p[key], key)
    _reject_unless(p, "restore_faces", (None, False), "no face restoration")
    _reject_unless(p, "script_name", (None, ""), "no scripts; use huabi's own options")
    if p.get("script_args"):
        raise BadRequest("script_args: huabi runs no scripts")
    _reject_unless(p, "s_min_uncond", (None, 0, 0.0), "no negative-guidance skipping")
    _reject_unless(p, "s_churn", (None, 0, 0.0), "the samplers use their standard churn")
    _reject_unless(p, "s_tmin", (None, 0, 0.0), "the samplers use their standard churn")
    _reject_unless(p, "s_tmax", (None, 0, 0.0, float("inf")), "the samplers use their standard churn")
    _reject_unless(p, "s_noise", (None, 1, 1.0), "the samplers use noise multiplier 1")
    _reject_unless(p, "disable_extra_networks", (False, None), "extra networks in the prompt are always applied")
    if p.get("firstpass_image") is not None:
        raise BadRequest("firstpass_image: not supported by huabi")
    if p.get("force_task_id") is not None:
        raise BadRequest("force_task_id: huabi assigns job ids; use /huabi/v1/jobs")
    if p.get("infotext"):
        raise BadRequest("infotext: pass the parameters as fields (or use huabi's --from on the command line)")
    sampler, schedule = sampler_and_schedule(p)
    eta = p.get("eta")
    if eta is not None:
        standard = 0.0 if sampler.upper() == "DDIM" else 1.0
        if float(eta) != standard and (sampler.endswith(" a") or sampler.upper() == "DDIM" or "SDE" in sampler):
            raise BadRequest(f"eta: huabi's {sampler} uses eta {standard:g}; got {eta!r}")
    batch_size, n_iter = int(p["batch_size"]), int(p["n_iter"])
    if batch_size < 1 or n_iter < 1:
        raise BadRequest("batch_size, n_iter: must be at least 1")
    if batch_size * n_iter > limits.max_batch_images:
        raise BadRequest(f"batch_size x n_iter: {batch_size * n_iter} images; this server makes up to "
                         f"{limits.max_batch_images} per request")
    width, height = int(p["width"]), int(p["height"])
    if width * height > limits.max_pixels or max(width, height) > limits.max_side_px:
        raise BadRequest(f"width x height: {width}x{height} is larger than this server makes "
                         f"({limits.max_pixels} pixels, {limits.max_side_px} px a side)")
    options: dict[str, object] = {
        "prompt": p["prompt"],
        "negative_prompt": p["negative_prompt"],
        "steps": int(p["steps"]),
        "cfg_scale": float(p["cfg_scale"]),
        "sampler": sampler,
        "schedule": schedule,
        "seed": int(p["seed"]) if p["seed"] is not None else -1,
        "batch_size": batch_size,
        "batch_count": n_iter,
        "size": f"{width}x{height}",
    }
    if p.get("styles"):
        if not isinstance(p["styles"], list) or not all(isinstance(s, str) for s in p["styles"]):
            raise BadRequest("styles: must be a list of style names")
        options["styles"] = list(p["styles"])
    strength = float(p.get("subseed_strength") or 0.0)
    if strength:
        if kind != "generate":
            raise BadRequest("subseed_strength: variation seeds are not supported in img2img by huabi")
        options["variation_seed"] = int(p["subseed"]) if p.get("subseed") is not None else -1
        options["variation_strength"] = strength
    resize_w, resize_h = int(p.get("seed_resize_from_w") or -1), int(p.get("seed_resize_from_h") or -1)
    if resize_w > 0 and resize_h > 0:
        if kind != "generate":
            raise BadRequest("seed_resize_from_w/h: not supported in img2img by huabi")
        options["seed_resize_from"] = f"{resize_w}x{resize_h}"
    if p.get("tiling"):
        if kind != "generate":
            raise BadRequest("tiling: huabi tiles in txt2img only")
        options["tile"] = True
    if p.get("refiner_checkpoint") not in (None, "", "None"):
        options["refiner"] = ctx.catalog.checkpoint(str(p["refiner_checkpoint"]), "refiner_checkpoint")
        if p.get("refiner_switch_at") is not None:
            options["refiner_switch_at"] = float(p["refiner_switch_at"])
    settings = {**ctx.settings, **(p.get("override_settings") or {})}
    apply_settings(options, settings, ctx)
    controls = controlnet_units(p.get("alwayson_scripts") or {}, ctx)
    if controls:
        options["controlnets"] = controls
    return options


def apply_settings(options: dict, settings: Mapping, ctx: Context) -> None:
    for key, value in settings.items():
        if key == "sd_model_checkpoint":
            if value:
                options["model"] = ctx.catalog.checkpoint(str(value))
        elif key == "sd_vae":
            vae = ctx.catalog.vae(value)
            if vae is not None:
                options["vae"] = vae
        elif key == "CLIP_stop_at_last_layers":
            options["clip_skip"] = int(value)
        elif key in HARMLESS_SETTINGS:
            if HARMLESS_SETTINGS[key] is not None and value != HARMLESS_SETTINGS[key]:
                raise BadRequest(f"override_settings: {key}={value!r} is not supported by huabi")
        else:
            raise BadRequest(f"override_settings: {key!r} is not a setting huabi has; see /sdapi/v1/options")


def controlnet_units(scripts: Mapping, ctx: Context) -> list[dict]:
    """``alwayson_scripts["ControlNet"]["args"]`` (sd-webui-controlnet's unit dicts) -> huabi unit options."""
    if not isinstance(scripts, Mapping):
        raise BadRequest("alwayson_scripts: must be an object")
    units = []
    for name, script in scripts.items():
        args = (script or {}).get("args", []) if isinstance(script, Mapping) else script
        if name.lower() != "controlnet":
            if args in ([], [False], None) or (isinstance(args, list) and args and args[0] is False):
                continue  # a disabled extension (webuiapi sends these): nothing to do
            raise BadRequest(f"alwayson_scripts: {name!r} is not available in huabi")
        for index, unit in enumerate(args or []):
            if not isinstance(unit, Mapping):
                raise BadRequest(f"ControlNet unit {index}: must be an object")
            if not unit.get("enabled", True) or str(unit.get("model", "None")) in ("None", ""):
                continue
            what = f"ControlNet unit {index}"
            option: dict[str, object] = {"model": ctx.catalog.controlnet(str(unit["model"]))}
            image = unit.get("image") or unit.get("input_image")
            if isinstance(image, Mapping):  # the extension's {"image": b64, "mask": b64} form
                unit = {**unit, "mask": unit.get("mask") or image.get("mask")}
                image = image.get("image")
            if image:
                option["image"] = ctx.save_input(decode_image(image, f"{what} image", ctx.limits), f"control{index}")
            mask = unit.get("mask") or unit.get("mask_image")
            if mask:
                option["mask"] = ctx.save_input(decode_image(mask, f"{what} mask", ctx.limits), f"control{index}-mask")
            module = unit.get("module")
            if module and module != "None":
                option["module"] = str(module)
            for field, key in (("weight", "weight"), ("guidance_start", "start"), ("guidance_end", "end"),
                               ("threshold_a", "threshold_a"), ("threshold_b", "threshold_b")):
                if unit.get(field) is not None:
                    option[key] = float(unit[field])
            if unit.get("processor_res") is not None and int(unit["processor_res"]) > 0:
                option["res"] = int(unit["processor_res"])
            if unit.get("control_mode") is not None:
                option["mode"] = {0: "balanced", 1: "prompt", 2: "control"}.get(unit["control_mode"], unit["control_mode"])
            if unit.get("resize_mode") is not None:
                option["resize"] = {0: "just", 1: "crop", 2: "fill"}.get(unit["resize_mode"], unit["resize_mode"])
            if unit.get("pixel_perfect"):
                raise BadRequest(f"{what}: pixel_perfect is not supported by huabi; set processor_res")
            if unit.get("hr_option", "Both") not in ("Both", None):
                raise BadRequest(f"{what}: hr_option {unit['hr_option']!r} is not supported (huabi uses Both)")
            units.append(option)
    return units


def txt2img_options(payload: Mapping, ctx: Context) -> tuple[dict, dict]:
    """(huabi generate options, the request echoed back as A1111's ``parameters``)."""
    p = merged(payload, TXT2IMG_DEFAULTS)
    options = common_options(p, ctx, "generate")
    if p.get("enable_hr"):
        options["hires"] = True
        options["hires_scale"] = float(p["hr_scale"])
        upscaler = p.get("hr_upscaler") or "Latent"
        from huabi.core.request import HIRES_UPSCALER_NAMES

        if upscaler not in HIRES_UPSCALER_NAMES:
            upscaler = ctx.catalog.named_file(str(upscaler), ctx.catalog.upscalers(), "hr_upscaler", "/sdapi/v1/upscalers")
        options["hires_upscaler"] = upscaler
        if int(p["hr_second_pass_steps"] or 0):
            options["hires_steps"] = int(p["hr_second_pass_steps"])
        if int(p["hr_resize_x"] or 0) and int(p["hr_resize_y"] or 0):
            options["hires_resize"] = f"{int(p['hr_resize_x'])}x{int(p['hr_resize_y'])}"
            options.pop("hires_scale")
        options["hires_denoise"] = float(p["denoising_strength"]) if p.get("denoising_strength") is not None else 0.7
        for key in ("hr_checkpoint_name", "hr_sampler_name", "hr_scheduler"):
            _reject_unless(p, key, (None, "", "Use same checkpoint", "Use same sampler", "Use same scheduler"),
                           "the second pass uses the first pass's")
        for key, same in (("hr_prompt", p["prompt"]), ("hr_negative_prompt", p["negative_prompt"])):
            if p.get(key) not in (None, "", same):
                raise BadRequest(f"{key}: a separate hires prompt is not supported by huabi")
        if int(p.get("firstphase_width") or 0) or int(p.get("firstphase_height") or 0):
            raise BadRequest("firstphase_width/height: old A1111 fields; use width/height and hr_resize_x/y")
    return options, p


def img2img_options(payload: Mapping, ctx: Context) -> tuple[dict, dict]:
    p = merged(payload, IMG2IMG_DEFAULTS)
    init = p.get("init_images") or []
    if not isinstance(init, list) or not init:
        raise BadRequest("init_images: give one base64 image")
    if len(init) > 1:
        raise BadRequest("init_images: huabi edits one image per request; send one request per image")
    if p.get("include_init_images"):
        raise BadRequest("include_init_images: not supported by huabi")
    _reject_unless(p, "initial_noise_multiplier", (None, 1, 1.0), "the noise multiplier is 1")
    if p.get("latent_mask") is not None:
        raise BadRequest("latent_mask: not supported by huabi")
    options = common_options(p, ctx, "edit")
    image = decode_image(init[0], "init_images[0]", ctx.limits)
    options["image"] = ctx.save_input(image, "init")
    mode = p.get("resize_mode", 0)
    if mode not in RESIZE_MODES:
        raise BadRequest(f"resize_mode: {mode!r} is not supported (0 just resize, 1 crop and resize, 2 resize and fill)")
    if mode:
        options["resize_mode"] = RESIZE_MODES[mode]
    options["strength"] = float(p["denoising_strength"]) if p.get("denoising_strength") is not None else 0.75
    if p.get("image_cfg_scale") not in (None, 1.5):
        options["image_cfg_scale"] = float(p["image_cfg_scale"])
    if p.get("mask"):
        mask = decode_image(p["mask"], "mask", ctx.limits)
        options["mask"] = ctx.save_input(mask, "mask")  # alpha and modes handled by the engine's load_mask
        blur = p.get("mask_blur")
        if blur is None:
            if p.get("mask_blur_x") != p.get("mask_blur_y"):
                raise BadRequest("mask_blur_x/mask_blur_y: huabi blurs the mask evenly; give the same value")
            blur = p.get("mask_blur_x", 4)
        options["mask_blur"] = int(blur)
        fill = p.get("inpainting_fill", 0)
        if fill not in MASKED_CONTENT:
            raise BadRequest(f"inpainting_fill: must be 0 fill, 1 original, 2 latent noise or 3 latent nothing, got {fill!r}")
        options["masked_content"] = MASKED_CONTENT[fill]
        options["inpaint_area"] = "masked" if p.get("inpaint_full_res") else "whole"
        options["padding"] = int(p.get("inpaint_full_res_padding") or 0)
        if p.get("inpainting_mask_invert"):
            options["invert_mask"] = True
    echoed = {**p, "init_images": None, "mask": None}
    return options, echoed


def info_json(results: list, parameters: Mapping, job_id: str) -> str:
    """A1111's ``info`` string: the first image's fields plus every image's seed and infotext."""
    from huabi.core.infotext import parse_infotext

    parsed = [parse_infotext(r.infotext) for r in results]
    first = parsed[0] if parsed else None
    params = first.params if first else {}
    size = params.get("Size", f"{parameters.get('width', 0)}x{parameters.get('height', 0)}").split("x")
    seeds = [r.seed for r in results]

    def number(key: str, default=None, kind=float):
        try:
            return kind(params[key])
        except (KeyError, ValueError):
            return default

    info = {
        "prompt": first.prompt if first else parameters.get("prompt", ""),
        "all_prompts": [p.prompt for p in parsed],
        "negative_prompt": first.negative_prompt if first else parameters.get("negative_prompt", ""),
        "all_negative_prompts": [p.negative_prompt for p in parsed],
        "seed": seeds[0] if seeds else parameters.get("seed", -1),
        "all_seeds": seeds,
        "subseed": number("Variation seed", -1, int),
        "all_subseeds": [int(p.params.get("Variation seed", -1)) for p in parsed],
        "subseed_strength": number("Variation seed strength", 0.0),
        "width": int(size[0]) if size[0].isdigit() else 0,
        "height": int(size[-1]) if size[-1].isdigit() else 0,
        "sampler_name": params.get("Sampler", parameters.get("sampler_name")),
        "scheduler": params.get("Schedule type"),
        "cfg_scale": number("CFG scale", parameters.get("cfg_scale")),
        "steps": number("Steps", parameters.get("steps"), int),
        "batch_size": parameters.get("batch_size", 1),
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": params.get("Model"),
        "sd_model_hash": params.get("Model hash"),
        "sd_vae_name": params.get("VAE"),
        "sd_vae_hash": params.get("VAE hash"),
        "seed_resize_from_w": parameters.get("seed_resize_from_w", -1),
        "seed_resize_from_h": parameters.get("seed_resize_from_h", -1),
        "denoising_strength": number("Denoising strength", parameters.get("denoising_strength")),
        "extra_generation_params": {k: v for k, v in params.items()
                                    if k not in ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model", "Model hash")},
        "index_of_first_image": 0,
        "infotexts": [r.infotext for r in results],
        "styles": list(parameters.get("styles") or []),
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": number("Clip skip", 1, int),
        "is_using_inpainting_conditioning": False,
        "version": params.get("Version", ""),
        "job_id": job_id,  # huabi: the queue id, for /huabi/v1/jobs/{id}
    }
    return json.dumps(info)
