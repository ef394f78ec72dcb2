"""The server's ONE door to the engine: huabi user-level options in, images out.

Options use the CLI's own names (``steps``, ``cfg_scale``, ``size``, ``strength``, ``mask``, ...)
and are read as the CLI reads its flags' text (``str(value)``, then the flag's type). They go to
the service's request builders -- :func:`huabi.service.requests.prompt_jobs` /
:func:`~huabi.service.requests.expand_prompt_job` / :func:`~huabi.service.requests.edit_job`, the
functions ``huabi generate`` / ``huabi edit`` call -- and are run by ``Engine``. So an image made
through the server is byte-identical to the CLI's for the same parameters.

Live previews come from the engine's ``on_preview`` (the cheap latent-to-RGB look, or TAESD).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from huabi.errors import HuabiError

KINDS = ("generate", "edit")


def _switch(value: object) -> bool:
    if value is not True:
        raise ValueError(value)
    return True


# Option -> (request field, converter). Most options are named as their field; a switch is True or
# absent (None/False: not given). Generate-only options are listed in _GENERATE_ONLY below.
_REQUEST_OPTIONS: dict[str, tuple[str, Callable]] = {
    **{name: (name, int) for name in ("steps", "seed", "batch_size", "batch_count", "clip_skip", "variation_seed",
                                      "hires_steps")},
    **{name: (name, float) for name in ("cfg_scale", "refiner_switch_at", "hypernetwork_strength",
                                        "variation_strength", "hires_scale", "hires_denoise")},
    **{name: (name, str) for name in ("negative_prompt", "sampler", "schedule", "model", "vae", "refiner",
                                      "hypernetwork", "hires_upscaler", "refiner_hires_pass")},
    "tile": ("tile", _switch),
    "hires": ("hires", _switch),
}
# Option -> (EditOptions field, converter).
_EDIT_OPTIONS: dict[str, tuple[str, Callable]] = {
    "strength": ("denoising_strength", float),
    "mask_blur": ("mask_blur_px", int),
    "padding": ("padding_px", int),
    "image_cfg_scale": ("image_cfg_scale", float),
    **{name: (name, str) for name in ("masked_content", "inpaint_area", "resize_mode", "outpaint")},
    "invert_mask": ("invert_mask", _switch),
    "instruct": ("instruct", _switch),
}
_SIZE_OPTIONS = ("size", "hires_resize", "seed_resize_from")  # WIDTHxHEIGHT texts
_EDIT_ONLY = frozenset({"mask", *_EDIT_OPTIONS})
_GENERATE_ONLY = frozenset({"from_image", "styles", "tile", "variation_seed", "variation_strength", "seed_resize_from",
                            "hires", "hires_scale", "hires_resize", "hires_upscaler", "hires_steps", "hires_denoise",
                            "refiner_hires_pass"})
# "from_image" is set by the server only (gallery "redo"), never taken from a client.
OPTION_NAMES = frozenset({"prompt", "image", "mask", "from_image", "styles", "controlnets", *_REQUEST_OPTIONS,
                          *_EDIT_OPTIONS, *_SIZE_OPTIONS})


class JobStopped(Exception):
    """Raised inside the engine's progress callback to end the current job (interrupt/cancel)."""


class ImageSkipped(Exception):
    """Raised inside the progress callback to end the current request and go on with the next."""


@dataclass(frozen=True)
class RunnerConfig:
    models_dir: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    backend: str = "auto"  # huabi.service.cpu_backend: auto, torch, openvino, openvino-int8
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


def _converted(name: str, value: object, convert: Callable) -> object:
    try:
        return convert(value) if convert is _switch else convert(str(value))
    except ValueError:
        what = "a switch (true, or leave it out)" if convert is _switch else f"a {convert.__name__} value"
        raise HuabiError(f"options: {name}: expected {what}, got {value!r}") from None


def _given(options: Mapping[str, object], table: Mapping[str, tuple[str, Callable]]) -> dict[str, object]:
    """The fields of ``table``'s options that are given (None and False mean "not given")."""
    return {field_name: _converted(name, options[name], convert) for name, (field_name, convert) in table.items()
            if options.get(name) is not None and options.get(name) is not False}


def _control_input(options: Mapping[str, object]):
    from huabi.service.requests import CONTROL_UNIT_OPTIONS, ControlInput

    units = []
    for unit in options.get("controlnets") or ():
        fields: dict[str, object] = {"model": str(unit["model"])}
        for name, (field_name, convert) in CONTROL_UNIT_OPTIONS.items():
            if unit.get(name) is not None:
                fields[field_name] = _converted(f"controlnets {name}", unit[name], convert)
        units.append(fields)
    return ControlInput(units=tuple(units)) if units else None


def build_jobs(kind: str, options: Mapping[str, object], config: RunnerConfig):
    """``options`` as the service's jobs: a list of :class:`~huabi.service.requests.PromptJob`
    (generate) or the ``(request, edit options)`` pair (edit). Validates without loading a model."""
    from huabi.service.pngio import read_infotext
    from huabi.service.requests import REFINER_HIRES_PASSES, edit_job, prompt_jobs, with_sizes

    if kind not in KINDS:
        raise HuabiError(f"kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    unknown = sorted(set(options) - OPTION_NAMES)
    if unknown:
        raise HuabiError(f"options: unknown option {unknown[0]!r}")
    wrong_kind = (_EDIT_ONLY if kind == "generate" else _GENERATE_ONLY) & {k for k, v in options.items() if v is not None}
    if wrong_kind:
        raise HuabiError(f"{sorted(wrong_kind)[0]}: not an option of {kind}")
    prompt = options.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise HuabiError("prompt: must be text")
    pass_name = options.get("refiner_hires_pass")
    if pass_name is not None and pass_name not in REFINER_HIRES_PASSES:
        raise HuabiError(f"options: refiner_hires_pass: must be one of {', '.join(REFINER_HIRES_PASSES)}, "
                         f"got {pass_name!r}")
    sizes = {name: str(options[name]) for name in _SIZE_OPTIONS if options.get(name) is not None}
    values = with_sizes(_given(options, _REQUEST_OPTIONS), **sizes)
    control = _control_input(options)
    if kind == "edit":
        if not options.get("image"):
            raise HuabiError("image: an edit needs an init image")
        mask = options.get("mask")
        return edit_job(Path(str(options["image"])), prompt, values, _given(options, _EDIT_OPTIONS),
                        mask_image=Path(str(mask)) if mask else None, control=control)
    from_image = options.get("from_image")
    if prompt is not None:
        prompts = [prompt]
    elif from_image:
        prompts = [None]  # no prompt: --from's recorded one (an empty string would replace it)
    else:
        raise HuabiError("prompt: give a prompt, --prompt-file FILE or --from IMAGE")
    styles = [str(style) for style in options.get("styles") or ()]
    return prompt_jobs(prompts, values, from_infotext=read_infotext(Path(str(from_image))) if from_image else None,
                       styles=styles, styles_file=config.styles_file if styles else None, control=control)


def validate(kind: str, options: Mapping[str, object], config: RunnerConfig) -> None:
    """Build the requests without running them: bad options fail here, before a job is queued."""
    build_jobs(kind, options, config)


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
                from huabi.service.device_choice import configure_threads
                from huabi.service.engine import Engine

                # The CLI's thread count (physical cores; HUABI_THREADS / OMP_NUM_THREADS win): the
                # summation order, and so a pixel's last bit, depends on it, so the same count makes
                # a server job's PNG byte-identical to the CLI's. The queue's worker thread follows it.
                configure_threads()
                self._engine = Engine(device=self.config.device, dtype=self.config.dtype, backend=self.config.backend,
                                      models_dir=self.config.models_dir, embeddings_dir=self.config.embeddings_dir)
            return self._engine

    def run(self, kind: str, options: Mapping[str, object], out_dir: Path, control: RunControl) -> list[ImageResult]:
        """Make the images of one job into ``out_dir``. Raises JobStopped (with the finished
        images in ``.results``) when ``control.stop`` is set mid-job; ``control.skip`` ends the
        current batch and goes on with the next (A1111's skip)."""
        built = build_jobs(kind, options, self.config)
        results: list[ImageResult] = []
        with self._lock:
            try:
                for calls in self._call_groups(kind, built):
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

    def _call_groups(self, kind: str, built):
        """Lists of (request, call) in the order the CLI runs them, one list per prompt; a request's
        batches are separate calls (same seeds, same files), so progress spans the whole job and
        skip/interrupt keep the finished batches."""
        engine = self.engine
        if kind == "edit":
            request, edit_options = built
            # One call: the outpaint fill and control maps are seeded once from the request's seed.
            yield [(request, lambda req, out, cb, pv: engine.edit(req, edit_options, out_dir=out, on_progress=cb,
                                                                 on_preview=pv))]
            return
        from huabi.service.requests import expand_prompt_job

        for job in built:
            bundle = engine.load(job.request.model, job.request.vae, job.request.extra)
            requests = expand_prompt_job(job, bundle.native_size_px, wildcards_dir=self.config.wildcards_dir)
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
        return preview_map(unit, out, models_dir=self.config.models_dir)
