"""The routes: A1111's /sdapi/v1 (and the ControlNet extension's /controlnet), huabi's /huabi/v1, the web UI."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from huabi.errors import HuabiError
from huabi.server import a1111
from huabi.server.a1111 import BadRequest
from huabi.server.catalog import check_name
from huabi.server.responses import error, webui_dir
from huabi.server.runner import OPTION_NAMES
from huabi.server.store import DONE, FAILED, FINISHED, INTERRUPTED

if TYPE_CHECKING:  # the app module imports this one to add its routes
    from huabi.server.app import Server

POLL_S = 0.05


async def _body(request: Request) -> dict:
    raw = await request.body()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise BadRequest("body: not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("body: must be a JSON object")
    return body


async def _wait(server: Server, job_id: str):
    """Wait for a job without holding a thread (many A1111 clients can wait at once)."""
    while True:
        job = server.store.job(job_id)
        if job is None or job.status in FINISHED:
            return job
        await asyncio.sleep(POLL_S)


def _image_path(server: Server, stored: str) -> Path:
    path = Path(stored)
    return path if path.is_absolute() else server.data_dir / path


def add_routes(app: FastAPI, server: Server) -> None:
    catalog, runner, queue, store = server.catalog, server.runner, server.queue, server.store

    # ------------------------------------------------------------------ A1111: generation

    async def generate(request: Request, kind: str):
        payload = await _body(request)
        job_id = queue.new_id()
        mapper = a1111.txt2img_options if kind == "generate" else a1111.img2img_options
        queue.check_room()
        try:
            options, parameters = await run_in_threadpool(mapper, payload, server.context(job_id))
        except HuabiError:
            raise
        except (TypeError, ValueError, AttributeError) as err:  # e.g. "steps": "many"
            raise BadRequest(f"request: a field has the wrong type ({err})") from None
        await run_in_threadpool(server.submit, kind, options, source="a1111", meta={"parameters": parameters},
                                priority=0, job_id=job_id)
        job = await _wait(server, job_id)
        if job.status not in (DONE, INTERRUPTED):
            status = 500 if job.status == FAILED else 409
            return error(status, f"job {job_id} {job.status}: {job.error}")
        images = [store.image(image_id) for image_id in job.images]
        results = [_Result(_image_path(server, image.path), image.seed, image.infotext) for image in images if image]
        send = parameters.get("send_images", True)
        encoded = await run_in_threadpool(lambda: [a1111.encode_png(r.path) for r in results]) if send else []
        return {"images": encoded, "parameters": parameters, "info": a1111.info_json(results, parameters, job_id)}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await generate(request, "generate")

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await generate(request, "edit")

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        snapshot = queue.progress
        queued = store.count_queued()
        fraction = snapshot.step / snapshot.total if snapshot.total else 0.0
        elapsed = time.time() - snapshot.started if snapshot.job_id else 0.0
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        preview = None
        if snapshot.preview is not None and not skip_current_image:
            preview = base64.b64encode(snapshot.preview).decode("ascii")
        return {
            "progress": fraction,
            "eta_relative": eta,
            "state": {"skipped": False, "interrupted": False, "stopping_generation": False,
                      "job": snapshot.job_id or "", "job_count": queued + (1 if snapshot.job_id else 0),
                      "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(snapshot.started or time.time())),
                      "job_no": 0, "sampling_step": snapshot.step, "sampling_steps": snapshot.total},
            "current_image": preview,
            "textinfo": snapshot.phase if snapshot.job_id else None,
            "current_task": snapshot.job_id,
            "queued": queued,  # huabi: jobs waiting behind the running one
        }

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        return {"interrupted": queue.interrupt_current()}

    @app.post("/sdapi/v1/skip")
    async def skip():
        return {"skipped": queue.skip_current()}

    # ------------------------------------------------------------------ A1111: settings

    def options_view() -> dict:
        model = server.settings.get("sd_model_checkpoint") or runner.default_model_name()
        return {
            "sd_model_checkpoint": _checkpoint_title(model),
            "sd_checkpoint_hash": None,
            "sd_vae": server.settings.get("sd_vae", "Automatic"),
            "CLIP_stop_at_last_layers": server.settings.get("CLIP_stop_at_last_layers", 1),
            "samples_format": "png",
            "eta_noise_seed_delta": 0,
            "enable_pnginfo": True,
        }

    def _checkpoint_title(ref: str) -> str:
        for entry in catalog.checkpoints():
            if ref in (entry.name, entry.path.name, str(entry.path)) or ref.startswith(f"{entry.path.name} ["):
                return _title(entry)
        return ref

    @app.get("/sdapi/v1/options")
    async def get_options():
        return await run_in_threadpool(options_view)

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        body = await _body(request)
        changes = {}
        for key, value in body.items():
            if key == "sd_model_checkpoint":
                await run_in_threadpool(catalog.checkpoint, str(value))  # refused now if unknown or unsafe
                changes[key] = str(value)
            elif key == "sd_vae":
                catalog.vae(None if value is None else str(value))
                changes[key] = value if value else "Automatic"
            elif key == "CLIP_stop_at_last_layers":
                if not isinstance(value, int) or not 1 <= value <= 12:
                    raise BadRequest("CLIP_stop_at_last_layers: must be an integer from 1 to 12")
                changes[key] = value
            elif key in a1111.HARMLESS_SETTINGS:
                wanted = a1111.HARMLESS_SETTINGS[key]
                if wanted is not None and value != wanted:
                    raise BadRequest(f"{key}: {value!r} is not supported by huabi")
            else:
                raise BadRequest(f"{key}: not a setting huabi has")
        server.settings.update(changes)
        server.save_settings()
        return None

    @app.get("/sdapi/v1/cmd-flags")
    async def cmd_flags():
        return {"api": True, "api_auth": bool(server.config.credentials), "nowebui": False,
                "ckpt_dir": None, "data_dir": None, "device": server.config.runner.device,
                "precision": server.config.runner.dtype, "server_name": "huabi"}

    # ------------------------------------------------------------------ A1111: listings

    def _title(entry) -> str:
        from huabi.models.hashes import model_short_hash

        if entry.path.is_file():
            return f"{entry.path.name} [{model_short_hash(entry.path)}]"
        return entry.name

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        def listing():
            from huabi.models.hashes import model_short_hash

            return [{"title": _title(e), "model_name": e.name,
                     "hash": model_short_hash(e.path) if e.path.is_file() else None, "sha256": None,
                     "filename": e.path.name, "config": None} for e in catalog.checkpoints()]

        return await run_in_threadpool(listing)

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():
        runner.refresh()
        return None

    @app.post("/sdapi/v1/refresh-loras")
    async def refresh_loras():
        runner.refresh()
        return None

    @app.post("/sdapi/v1/refresh-vae")
    async def refresh_vae():
        return None

    @app.get("/sdapi/v1/sd-vae")
    async def sd_vae():
        return [{"model_name": e.name, "filename": e.path.name} for e in catalog.vaes()]

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        from huabi.core.names import SAMPLER_NAMES

        aliases: dict[str, list[str]] = {}
        from huabi.core.names import SAMPLER_ALIASES

        for alias, name in SAMPLER_ALIASES.items():
            if " " not in alias:
                aliases.setdefault(name, []).append(alias)
        return [{"name": name, "aliases": aliases.get(name, []), "options": {}} for name in SAMPLER_NAMES]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return [{"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
                for name, label in a1111.SCHEDULERS if label is not None]

    @app.get("/sdapi/v1/upscalers")
    async def upscalers():
        fixed = [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                 for name in ("None", "Lanczos", "Nearest")]
        return fixed + [{"name": e.name, "model_name": e.name, "model_path": e.path.name, "model_url": None,
                         "scale": 4} for e in catalog.upscalers()]

    @app.get("/sdapi/v1/latent-upscale-modes")
    async def latent_upscale_modes():
        from huabi.core.request import HIRES_LATENT_MODES

        return [{"name": name} for name in HIRES_LATENT_MODES]

    @app.get("/sdapi/v1/loras")
    async def loras():
        return [{"name": e.name, "alias": e.name, "path": e.path.name, "metadata": {}} for e in catalog.loras()]

    @app.get("/sdapi/v1/hypernetworks")
    async def hypernetworks():
        return [{"name": e.name, "path": e.path.name} for e in catalog.hypernetworks()]

    @app.get("/sdapi/v1/embeddings")
    async def embeddings():
        return {"loaded": {e.name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                    "shape": None, "vectors": None} for e in catalog.embeddings()},
                "skipped": {}}

    @app.get("/sdapi/v1/prompt-styles")
    async def prompt_styles():
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in _styles(server)]

    @app.get("/sdapi/v1/face-restorers")
    async def face_restorers():
        return []

    @app.get("/sdapi/v1/realesrgan-models")
    async def realesrgan_models():
        return []

    @app.get("/sdapi/v1/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/script-info")
    async def script_info():
        return []

    @app.get("/sdapi/v1/extensions")
    async def extensions():
        return []

    @app.get("/sdapi/v1/memory")
    async def memory():
        ram = _meminfo()
        result = {"ram": ram, "cuda": {"error": "no CUDA device"}}
        try:
            import torch

            if torch.cuda.is_available():
                free, total = torch.cuda.mem_get_info()
                result["cuda"] = {"system": {"free": free, "used": total - free, "total": total}}
        except Exception as err:  # noqa: BLE001 - memory is informational
            result["cuda"] = {"error": str(err)}
        return result

    # ------------------------------------------------------------------ A1111: tools

    @app.post("/sdapi/v1/png-info")
    async def png_info(request: Request):
        body = await _body(request)
        image = await run_in_threadpool(a1111.decode_image, body.get("image"), "image", server.config.limits)
        text = _infotext_of(image)
        if not text:
            return {"info": "", "items": {}, "parameters": {}}
        from huabi.core.infotext import parse_infotext

        parsed = parse_infotext(text)
        parameters = {"Prompt": parsed.prompt, "Negative prompt": parsed.negative_prompt, **parsed.params}
        return {"info": text, "items": {"parameters": text}, "parameters": parameters}

    @app.post("/sdapi/v1/extra-single-image")
    async def extra_single_image(request: Request):
        body = await _body(request)
        limits = server.config.limits
        for key in ("gfpgan_visibility", "codeformer_visibility", "extras_upscaler_2_visibility"):
            if float(body.get(key) or 0):
                raise BadRequest(f"{key}: huabi has no face restoration or second upscaler")
        if body.get("upscaler_2") not in (None, "None") and float(body.get("extras_upscaler_2_visibility") or 0):
            raise BadRequest("upscaler_2: not supported by huabi")
        image = await run_in_threadpool(a1111.decode_image, body.get("image"), "image", limits)
        name = body.get("upscaler_1") or "None"
        upscaler = name if name in ("None", "Lanczos", "Nearest") else catalog.named_file(
            str(name), catalog.upscalers(), "upscaler_1", "/sdapi/v1/upscalers")
        size = None
        scale = float(body.get("upscaling_resize") or 2)
        if int(body.get("resize_mode") or 0) == 1:
            size = (int(body.get("upscaling_resize_w") or 512), int(body.get("upscaling_resize_h") or 512))
            if body.get("upscaling_crop", True) and size != image.size:
                pass  # huabi stretches to the target size (no crop); A1111 crops to keep the aspect
        target = size or (round(image.width * scale), round(image.height * scale))
        if target[0] * target[1] > limits.max_pixels or max(target) > limits.max_side_px:
            raise BadRequest(f"upscale: {target[0]}x{target[1]} is larger than this server makes")
        result = await run_in_threadpool(runner.upscale, image, upscaler, scale, size)
        buffer = io.BytesIO()
        result.save(buffer, format="PNG")
        return {"html_info": "", "image": base64.b64encode(buffer.getvalue()).decode("ascii")}

    # ------------------------------------------------------------------ ControlNet extension

    @app.get("/controlnet/version")
    async def controlnet_version():
        return {"version": 2}

    @app.get("/controlnet/model_list")
    async def controlnet_model_list():
        return {"model_list": [e.name for e in catalog.controlnets()]}

    @app.get("/controlnet/module_list")
    async def controlnet_module_list(alias_names: bool = False):
        from huabi.core.preprocess import MODULES

        return {"module_list": list(MODULES), "module_detail": {}}

    @app.post("/controlnet/detect")
    async def controlnet_detect(request: Request):
        body = await _body(request)
        images = body.get("controlnet_input_images") or body.get("controlnet_images") or []
        if not isinstance(images, list) or not images:
            raise BadRequest("controlnet_input_images: give at least one base64 image")
        module = str(body.get("controlnet_module") or "none")
        res = int(body.get("controlnet_processor_res") or 512)
        a = body.get("controlnet_threshold_a")
        b = body.get("controlnet_threshold_b")
        maps = []
        with tempfile.TemporaryDirectory(dir=server.data_dir) as folder:
            for index, data in enumerate(images):
                image = await run_in_threadpool(a1111.decode_image, data, f"controlnet_input_images[{index}]",
                                                server.config.limits)
                source = Path(folder) / f"in{index}.png"
                image.save(source)
                from huabi.core.preprocess import module_spec

                spec = module_spec(module)
                out = await run_in_threadpool(
                    runner.detect, source, module, res,
                    float(a) if a is not None and spec.threshold_a else None,
                    float(b) if b is not None and spec.threshold_b else None, Path(folder) / f"out{index}.png")
                maps.append(base64.b64encode(out.read_bytes()).decode("ascii"))
        return {"images": maps, "info": "Success"}

    # ------------------------------------------------------------------ huabi: jobs

    @app.post("/huabi/v1/jobs", status_code=202)
    async def submit_job(request: Request):
        body = await _body(request)
        kind = body.get("kind", "generate")
        if kind not in ("generate", "edit"):
            raise BadRequest("kind: must be generate or edit")
        priority = body.get("priority", 0)
        if not isinstance(priority, int) or not -10 <= priority <= 10:
            raise BadRequest("priority: must be an integer from -10 to 10")
        raw = body.get("options")
        if not isinstance(raw, dict):
            raise BadRequest("options: must be an object of huabi option names (as the CLI spells them)")
        queue.check_room()
        job_id = queue.new_id()
        try:
            options = await run_in_threadpool(_safe_options, server, raw, kind, job_id)
        except HuabiError:
            raise
        except (TypeError, ValueError, AttributeError) as err:
            raise BadRequest(f"options: a value has the wrong type ({err})") from None
        await run_in_threadpool(server.submit, kind, options, source=str(body.get("source", "huabi"))[:32],
                                meta={}, priority=priority, job_id=job_id)
        return {"id": job_id, "status": "queued", "position": queue.position(job_id)}

    @app.get("/huabi/v1/jobs")
    async def list_jobs(status: str | None = None, limit: int = 100):
        statuses = tuple(s for s in (status or "").split(",") if s) or None
        jobs = store.jobs(statuses, limit=max(1, min(limit, 1000)))
        return {"jobs": [_job_view(server, job) for job in jobs], "running": queue.progress.job_id,
                "queued": store.count_queued()}

    @app.get("/huabi/v1/jobs/{job_id}")
    async def get_job(job_id: str, wait: float = 0.0):
        if wait > 0:  # long-poll: return when the job finishes or after ``wait`` seconds
            try:
                await asyncio.wait_for(_wait(server, job_id), timeout=min(wait, 600))
            except asyncio.TimeoutError:
                pass
        job = store.job(job_id)
        if job is None:
            return error(404, f"job {job_id}: no such job")
        return _job_view(server, job)

    @app.post("/huabi/v1/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str):
        status = queue.cancel(job_id)
        if status is None:
            return error(404, f"job {job_id}: no such job")
        return {"id": job_id, "status": status}

    @app.delete("/huabi/v1/jobs/{job_id}")
    async def delete_job(job_id: str):
        return await cancel_job(job_id)

    @app.get("/huabi/v1/progress")
    async def huabi_progress():
        snapshot = queue.progress
        return {"job": snapshot.job_id, "step": snapshot.step, "total": snapshot.total, "phase": snapshot.phase,
                "queued": store.count_queued(), "preview": snapshot.preview is not None}

    @app.get("/huabi/v1/events")
    async def events(request: Request):
        listener = queue.listen()

        async def stream():
            try:
                snapshot = queue.progress
                yield _sse({"event": "hello", "job": snapshot.job_id, "step": snapshot.step, "total": snapshot.total})
                last_beat = time.monotonic()
                while not await request.is_disconnected():
                    try:
                        event = listener.get_nowait()
                    except Exception:  # noqa: BLE001 - queue.Empty
                        if time.monotonic() - last_beat > 15:
                            last_beat = time.monotonic()
                            yield ": keep-alive\n\n"
                        await asyncio.sleep(0.1)
                        continue
                    yield _sse(event)
            finally:
                queue.unlisten(listener)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ huabi: gallery

    @app.get("/huabi/v1/gallery")
    async def gallery(q: str | None = None, seed: int | None = None, model: str | None = None,
                      sampler: str | None = None, favourite: bool | None = None, limit: int = 60, offset: int = 0):
        images = store.search_images(text=q, seed=seed, model=model, sampler=sampler, favourite=favourite,
                                     limit=max(1, min(limit, 500)), offset=max(0, offset))
        return {"images": [image.public() for image in images]}

    def _gallery_image(image_id: int):
        image = store.image(image_id)
        if image is None:
            raise _NotFound(f"gallery image {image_id}: no such image")
        return image

    @app.get("/huabi/v1/gallery/{image_id}")
    async def gallery_item(image_id: int):
        return _gallery_image(image_id).public()

    @app.get("/huabi/v1/gallery/{image_id}/image")
    async def gallery_file(image_id: int):
        path = _image_path(server, _gallery_image(image_id).path)
        if not path.is_file():
            return error(404, f"gallery image {image_id}: the file is gone")
        return FileResponse(path, media_type="image/png")

    @app.get("/huabi/v1/gallery/{image_id}/thumbnail")
    async def gallery_thumbnail(image_id: int):
        image = _gallery_image(image_id)
        if image.thumbnail and (server.data_dir / image.thumbnail).is_file():
            return FileResponse(server.data_dir / image.thumbnail, media_type="image/webp")
        return await gallery_file(image_id)

    @app.post("/huabi/v1/gallery/{image_id}/favourite")
    async def gallery_favourite(image_id: int, request: Request):
        body = await _body(request)
        _gallery_image(image_id)
        store.set_favourite(image_id, bool(body.get("favourite", True)))
        return store.image(image_id).public()

    @app.delete("/huabi/v1/gallery/{image_id}")
    async def gallery_delete(image_id: int, keep_file: bool = False):
        image = _gallery_image(image_id)
        store.delete_image(image_id)
        if not keep_file:
            path = _image_path(server, image.path)
            if path.is_file() and _inside_data(server, path):
                path.unlink()
            if image.thumbnail:
                (server.data_dir / image.thumbnail).unlink(missing_ok=True)
        return {"deleted": image_id}

    @app.post("/huabi/v1/gallery/scan")
    async def gallery_scan():
        """Index new images in the server's --gallery-folder folders (never a folder a client names)."""
        return {"added": await run_in_threadpool(server.scan_gallery)}

    @app.post("/huabi/v1/gallery/{image_id}/redo", status_code=202)
    async def gallery_redo(image_id: int):
        """Generate again from the image's infotext, as `huabi generate --from IMAGE` does."""
        image = _gallery_image(image_id)
        if "Denoising strength" in image.infotext and "Hires" not in image.infotext:
            raise BadRequest("redo: this image came from img2img; send it to img2img with its init image instead")
        path = _image_path(server, image.path)
        queue.check_room()
        job_id = queue.new_id()
        await run_in_threadpool(server.submit, "generate", {"from_image": str(path)}, source="redo", meta={},
                                priority=0, job_id=job_id)
        return {"id": job_id, "status": "queued", "position": queue.position(job_id)}

    @app.exception_handler(_NotFound)
    async def _not_found(_request, err):
        return error(404, str(err))

    # ------------------------------------------------------------------ web UI

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return FileResponse(webui_dir() / "index.html", media_type="text/html")

    app.mount("/webui", StaticFiles(directory=webui_dir()), name="webui")

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)


class _NotFound(HuabiError):
    pass


class _Result:
    def __init__(self, path: Path, seed: int, infotext: str) -> None:
        self.path, self.seed, self.infotext = path, seed, infotext


def _sse(event: dict) -> str:
    return f"event: {event.get('event', 'message')}\ndata: {json.dumps(event)}\n\n"


def _inside_data(server: Server, path: Path) -> bool:
    """Files the server may delete: its own outputs and the gallery folders it was given."""
    from huabi.server.catalog import inside

    return any(inside(path, folder) for folder in (server.data_dir, *server.config.gallery_folders))


def _job_view(server: Server, job) -> dict:
    view = job.public()
    view["options"] = {k: v for k, v in job.options.items() if k not in ("image", "mask", "from_image")}
    view["position"] = server.queue.position(job.id) if job.status not in FINISHED else None
    images = [server.store.image(i) for i in job.images]
    view["images"] = [image.public() for image in images if image is not None]
    snapshot = server.queue.progress_of(job.id)
    if snapshot is not None:
        view["progress"] = {"step": snapshot.step, "total": snapshot.total, "phase": snapshot.phase}
    return view


def _styles(server: Server) -> list:
    from huabi.service.requests import default_styles_file, read_styles

    path = server.config.runner.styles_file or default_styles_file()
    if not Path(path).is_file():
        return []
    return list(read_styles(Path(path)).values())


def _meminfo() -> dict:
    values = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {"error": "unknown"}
    total, free = values.get("MemTotal", 0), values.get("MemAvailable", 0)
    return {"free": free, "used": total - free, "total": total}


def _infotext_of(image) -> str | None:
    """A PNG's ``parameters`` text, or a JPEG/WebP's EXIF UserComment."""
    from huabi.service.pngio import exif_infotext

    return exif_infotext(image)


def _safe_options(server: Server, raw: dict, kind: str, job_id: str) -> dict:
    """huabi's own job options (the CLI's names), with every name checked and every image stored."""
    catalog, limits = server.catalog, server.config.limits
    unknown = sorted(set(raw) - (OPTION_NAMES - {"from_image"}))
    if unknown:
        raise BadRequest(f"options: unknown option {unknown[0]!r}")
    options = dict(raw)
    ctx = server.context(job_id)
    for key in ("prompt", "negative_prompt"):
        value = options.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise BadRequest(f"{key}: must be text")
            if len(value) > limits.max_prompt_chars:
                raise BadRequest(f"{key}: {len(value)} characters; this server accepts up to {limits.max_prompt_chars}")
            catalog.check_prompt(value, key)
    if options.get("model") is not None:
        options["model"] = catalog.checkpoint(str(options["model"]), "model")
    elif server.settings.get("sd_model_checkpoint"):
        options["model"] = catalog.checkpoint(server.settings["sd_model_checkpoint"])
    if options.get("vae") is not None:
        options["vae"] = catalog.vae(str(options["vae"]))
    if options.get("refiner") is not None:
        options["refiner"] = catalog.checkpoint(str(options["refiner"]), "refiner")
    if options.get("hypernetwork") is not None:
        options["hypernetwork"] = catalog.named_file(str(options["hypernetwork"]), catalog.hypernetworks(),
                                                     "hypernetwork", "/sdapi/v1/hypernetworks")
    if options.get("hires_upscaler") is not None:
        from huabi.core.request import HIRES_UPSCALER_NAMES

        if options["hires_upscaler"] not in HIRES_UPSCALER_NAMES:
            options["hires_upscaler"] = catalog.named_file(str(options["hires_upscaler"]), catalog.upscalers(),
                                                           "hires_upscaler", "/sdapi/v1/upscalers")
    for key in ("image", "mask"):
        if options.get(key) is not None:
            image = a1111.decode_image(options[key], key, limits)
            options[key] = ctx.save_input(image, key)
    for name in ("styles",):
        if options.get(name) is not None and not (isinstance(options[name], list)
                                                  and all(isinstance(s, str) for s in options[name])):
            raise BadRequest(f"{name}: must be a list of names")
    units = []
    for index, unit in enumerate(options.get("controlnets") or []):
        if not isinstance(unit, dict) or "model" not in unit:
            raise BadRequest(f"controlnets[{index}]: must be an object with a model")
        unit = dict(unit)
        unit["model"] = catalog.controlnet(str(unit["model"]))
        for key in ("image", "mask"):
            if unit.get(key) is not None:
                unit[key] = ctx.save_input(a1111.decode_image(unit[key], f"controlnets[{index}].{key}", limits),
                                           f"control{index}-{key}")
        units.append(unit)
    if units:
        options["controlnets"] = units
    size = options.get("size")
    if size is not None:
        from huabi.service.requests import parse_size

        width, height = parse_size(str(size))
        if width * height > limits.max_pixels or max(width, height) > limits.max_side_px:
            raise BadRequest(f"size: {width}x{height} is larger than this server makes")
    count = int(options.get("batch_size") or 1) * int(options.get("batch_count") or 1)
    if count > limits.max_batch_images:
        raise BadRequest(f"batch_size x batch_count: {count} images; this server makes up to {limits.max_batch_images}")
    for key, value in options.items():
        if isinstance(value, str) and key not in ("prompt", "negative_prompt", "image", "mask", "model", "vae",
                                                   "refiner", "hypernetwork", "hires_upscaler"):
            if "/" in value or "\\" in value or ".." in value:
                check_name(value, key)  # any other text option that looks like a path is refused
    return options
