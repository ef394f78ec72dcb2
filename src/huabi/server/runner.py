"""The server's ONE door to the engine: huabi user-level options in, images out.

Options use the CLI's own names (``steps``, ``cfg_scale``, ``size``, ``strength``,
``mask``, ...). They are turned into the very argument list ``huabi generate`` /
``huabi edit`` would receive and parsed by the CLI's parser, then built into requests
by the CLI's request-building functions (``jobs_from_args``, then the service's ``expand_prompt_job``,
``edit.request_from_args``) and run by ``Engine``. So an image made through the
server is byte-identical to the CLI's for the same parameters.

Live previews come from the engine's ``on_preview`` (the cheap latent-to-RGB look, or TAESD).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from huabi.errors import HuabiError

KINDS = ("generate", "edit")

# Options -> CLI flags. Values are converted with str(); booleans are switches.
_FLAGS = {
    "from_image": "--from",  # set by the server only (gallery "redo"), never taken from a client
    "negative_prompt": "--negative",
    "steps": "--steps",
    "cfg_scale": "--cfg",
    "sampler": "--sampler",
    "schedule": "--schedule",
    "seed": "--seed",
    "size": "--size",
    "batch_size": "--batch-size",
    "batch_count": "--batch-count",
    "clip_skip": "--clip-skip",
    "model": "--model",
    "vae": "--vae",
    "refiner": "--refiner",
    "refiner_switch_at": "--refiner-switch-at",
    "hypernetwork": "--hypernet",
    "hypernetwork_strength": "--hypernet-strength",
    # generate only
    "tile": "--tile",
    "variation_seed": "--variation-seed",
    "variation_strength": "--variation-strength",
    "seed_resize_from": "--seed-resize-from",
    "hires": "--hires",
    "hires_scale": "--hires-scale",
    "hires_resize": "--hires-resize",
    "hires_upscaler": "--hires-upscaler",
    "hires_steps": "--hires-steps",
    "hires_denoise": "--hires-denoise",
    "refiner_hires_pass": "--refiner-hires-pass",
    # edit only
    "mask": "--mask",
    "strength": "--strength",
    "mask_blur": "--mask-blur",
    "masked_content": "--masked-content",
    "inpaint_area": "--inpaint-area",
    "padding": "--padding",
    "invert_mask": "--invert-mask",
    "resize_mode": "--resize-mode",
    "outpaint": "--outpaint",
    "instruct": "--instruct",
    "image_cfg_scale": "--image-cfg-scale",
}
_EDIT_ONLY = frozenset({"mask", "strength", "mask_blur", "masked_content", "inpaint_area", "padding",
                        "invert_mask", "resize_mode", "outpaint", "instruct", "image_cfg_scale"})
_GENERATE_ONLY = frozenset({"from_image", "tile", "variation_seed", "variation_strength", "seed_resize_from", "hires",
                            "hires_scale", "hires_resize", "hires_upscaler", "hires_steps", "hires_denoise",
                            "refiner_hires_pass"})
_CONTROL_FLAGS = {
    "image": "--control-image",
    "module": "--control-module",
    "weight": "--control-weight",
    "start": "--control-start",
    "end": "--control-end",
    "mode": "--control-mode",
    "resize": "--control-resize",
    "res": "--control-res",
    "threshold_a": "--control-threshold-a",
    "threshold_b": "--control-threshold-b",
    "mask": "--control-mask",
}
_PARSE_LOCK = threading.Lock()
OPTION_NAMES = frozenset({"prompt", "image", "styles", "controlnets", *_FLAGS})


class JobStopped(Exception):
    """Raised inside the engine's progress callback to end the current job (interrupt/cancel)."""


class ImageSkipped(Exception):
    """Raised inside the progress callback to end the current request and go on with the next."""


@dataclass(frozen=True)
class RunnerConfig:
    models_dir: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    embeddings_dir: Path | None = None
    wildcards_dir: Path | None = None
    styles_file: Path | None = None


@dataclass(frozen=True)
class ImageResult:
    path: Path
    seed: int
    infotext: str


@dataclass
class RunControl:
    """How the queue talks to a running job: progress out, stop/skip in."""

    on_progress: Callable[[int, int, str], None] = lambda done, total, phase: None
    on_preview: Callable[[bytes], None] = lambda png: None  # PNG bytes of the current latent's quick look
    stop: threading.Event = field(default_factory=threading.Event)
    skip: threading.Event = field(default_factory=threading.Event)


def cli_arguments(kind: str, options: Mapping[str, object], config: RunnerConfig) -> list[str]:
    """The ``huabi generate|edit`` argument list that means ``options``."""
    if kind not in KINDS:
        raise HuabiError(f"kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    unknown = sorted(set(options) - OPTION_NAMES)
    if unknown:
        raise HuabiError(f"options: unknown option {unknown[0]!r}")
    wrong_kind = (_EDIT_ONLY if kind == "generate" else _GENERATE_ONLY) & {k for k, v in options.items() if v is not None}
    if wrong_kind:
        raise HuabiError(f"{sorted(wrong_kind)[0]}: not an option of {kind}")
    argv = [kind]
    for name, flag in _FLAGS.items():
        value = options.get(name)
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        else:
            argv += [flag, str(value)]
    for style in options.get("styles") or ():
        argv += ["--style", str(style)]
    for unit in options.get("controlnets") or ():
        argv += ["--controlnet", str(unit["model"])]
        for name, flag in _CONTROL_FLAGS.items():
            if unit.get(name) is not None:
                argv += [flag, str(unit[name])]
    if config.models_dir is not None:
        argv += ["--models-dir", str(config.models_dir)]
    if kind == "generate":
        if config.wildcards_dir is not None:
            argv += ["--wildcards", str(config.wildcards_dir)]
        if config.embeddings_dir is not None:
            argv += ["--embeddings", str(config.embeddings_dir)]
    if config.styles_file is not None and options.get("styles"):
        argv += ["--styles-file", str(config.styles_file)]
    argv.append("--quiet")
    prompt = options.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise HuabiError("prompt: must be text")
    positional = []
    if kind == "edit":
        if not options.get("image"):
            raise HuabiError("image: an edit needs an init image")
        positional.append(str(options["image"]))
    if prompt is not None:  # no prompt: --from's recorded one (an empty string would replace it)
        positional.append(prompt)
    return argv + ["--", *positional] if positional else argv


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    """Parse with the CLI's own parser; its usage errors become HuabiError (never SystemExit)."""
    from huabi.cli.main import build_parser

    errors = io.StringIO()
    try:
        # redirect_stderr swaps the process-wide sys.stderr: one parse at a time, or two request
        # threads could restore each other's buffer and leave stderr pointing at one.
        with _PARSE_LOCK, contextlib.redirect_stderr(errors):
            return build_parser().parse_args(list(argv))
    except SystemExit:
        lines = [line for line in errors.getvalue().splitlines() if line.strip()]
        message = lines[-1].split("error: ", 1)[-1] if lines else "invalid options"
        raise HuabiError(f"options: {message}") from None


def validate(kind: str, options: Mapping[str, object], config: RunnerConfig) -> None:
    """Build the requests without running them: bad options fail here, before a job is queued."""
    args = parse_arguments(cli_arguments(kind, options, config))
    if kind == "generate":
        from huabi.cli.main import jobs_from_args

        jobs_from_args(args)
    else:
        from huabi.cli.edit import request_from_args

        request_from_args(args)


def split_batches(request) -> list:
    """``request`` (seeds resolved) as one request per batch, each making exactly the images and
    files that batch makes in the whole request: image i of batch b keeps seed + b * batch_size + i."""
    if request.batch_count == 1 or request.controlnets:  # control maps are seeded once per request
        return [request]
    step = 0 if request.variation_strength != 0 else 1
    batches = []
    for batch in range(request.batch_count):
        offset = batch * request.batch_size
        changes = {"batch_count": 1, "seed": request.seed + step * offset}
        if request.variation_strength != 0:
            changes["variation_seed"] = request.variation_seed + offset
        batches.append(request.replace(**changes))
    return batches


class Runner:
    """Owns one Engine (one device) and runs jobs on it, one at a time."""

    def __init__(self, config: RunnerConfig) -> None:
        self.config = config
        self._engine = None
        self._lock = threading.Lock()  # one job (or tool call) on the device at a time
        self._engine_lock = threading.Lock()

    @property
    def engine(self):
        with self._engine_lock:  # created once, whichever thread asks first
            if self._engine is None:
                from huabi.service.engine import Engine

                self._engine = Engine(device=self.config.device, dtype=self.config.dtype,
                                      models_dir=self.config.models_dir, embeddings_dir=self.config.embeddings_dir)
            return self._engine

    def run(self, kind: str, options: Mapping[str, object], out_dir: Path, control: RunControl) -> list[ImageResult]:
        """Make the images of one job into ``out_dir``. Raises JobStopped (with the finished
        images in ``.results``) when ``control.stop`` is set mid-job; ``control.skip`` ends the
        current batch and goes on with the next (A1111's skip)."""
        args = parse_arguments(cli_arguments(kind, options, self.config))
        results: list[ImageResult] = []
        with self._lock:
            try:
                for calls in self._call_groups(kind, args):
                    for index, (request, call) in enumerate(calls):
                        control.skip.clear()
                        if control.stop.is_set():
                            raise JobStopped()

                        def progress(done: int, total: int, _index=index, _count=len(calls)) -> None:
                            if control.stop.is_set():
                                raise JobStopped()
                            if control.skip.is_set():
                                raise ImageSkipped()
                            control.on_progress(_index * total + done, _count * total, "sampling")

                        def preview(_done: int, _total: int, images) -> None:
                            if images:
                                buffer = io.BytesIO()
                                images[0].save(buffer, format="PNG")
                                control.on_preview(buffer.getvalue())

                        try:
                            made = call(request, out_dir, progress, preview)
                        except ImageSkipped:
                            continue
                        results.extend(ImageResult(r.path, r.seed, r.infotext) for r in made)
            except JobStopped as stopped:
                stopped.results = results  # type: ignore[attr-defined]
                raise
        return results

    def _call_groups(self, kind: str, args: argparse.Namespace):
        """Lists of (request, call) in the order the CLI runs them, one list per prompt; a request's
        batches are separate calls (same seeds, same files), so progress spans the whole job and
        skip/interrupt keep the finished batches."""
        engine = self.engine
        if kind == "edit":
            from huabi.cli.edit import request_from_args

            request, edit_options = request_from_args(args)
            # One call: the outpaint fill and control maps are seeded once from the request's seed.
            yield [(request, lambda req, out, cb, pv: engine.edit(req, edit_options, out_dir=out, on_progress=cb,
                                                                 on_preview=pv))]
            return
        from huabi.cli.main import jobs_from_args
        from huabi.service.requests import expand_prompt_job

        for job in jobs_from_args(args):
            bundle = engine.load(job.request.model, job.request.vae, job.request.extra)
            requests = expand_prompt_job(job, bundle.native_size_px, wildcards_dir=getattr(args, "wildcards_dir", None),
                                         combinatorial=bool(getattr(args, "combinatorial", False)))
            yield [(batch, lambda req, out, cb, pv: engine.generate(req, out_dir=out, on_progress=cb, on_preview=pv))
                   for request in requests for batch in split_batches(request)]

    # -- what the engine knows, for the listing routes ---------------------------------

    def models(self):
        return list(self.engine.iter_models())

    def default_model_name(self) -> str:
        from huabi.service.engine import BUILTIN_MODEL_NAME

        return BUILTIN_MODEL_NAME

    def refresh(self) -> None:
        """Nothing is cached between jobs: the models folder is listed on every request."""

    # -- single-image tools (A1111 extras and the ControlNet extension's /detect) ------

    def upscale(self, image, upscaler: str | None, scale: float, size: tuple[int, int] | None = None):
        """A1111's extras upscale: ``upscaler`` None or "Lanczos" (Pillow) or a model file path."""
        from PIL import Image

        from huabi.service.upscale import upscale_lanczos, upscale_with_model

        image = image.convert("RGB")
        if upscaler in (None, "None", "Lanczos", "Nearest"):
            if size is not None:
                method = Image.NEAREST if upscaler == "Nearest" else Image.LANCZOS
                return image.resize(size, resample=method)
            if upscaler == "Nearest":
                return image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.NEAREST)
            return upscale_lanczos(image, scale)
        from huabi.models.upscalers import load_upscaler

        with self._lock:
            model = load_upscaler(Path(upscaler), device=self.engine.device)
            result = image
            target = size or (round(image.width * scale), round(image.height * scale))
            for _ in range(4):
                if result.width >= target[0] and result.height >= target[1]:
                    break
                result = upscale_with_model(result, model, device=self.engine.device)
        return result.resize(target, resample=Image.LANCZOS) if result.size != target else result

    def detect(self, image_path: Path, module: str, res: int, threshold_a: float | None,
               threshold_b: float | None, out: Path) -> Path:
        """A ControlNet preprocessor map, as ``huabi preprocess`` makes it."""
        from huabi.core.control import ControlUnit
        from huabi.service.control import preview_map

        unit = ControlUnit(model="preview", image=str(image_path), module=module, processor_res=res,
                           threshold_a=threshold_a, threshold_b=threshold_b)
        return preview_map(unit, out)
