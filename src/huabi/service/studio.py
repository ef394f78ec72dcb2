"""``huabi.Studio``: the public Python API, on the same service code the CLI uses.

    import huabi
    studio = huabi.Studio()                                   # built-in huabi-mini, auto device/dtype
    [image] = studio.generate("a red apple", seed=7)           # -> GeneratedImage(image, seed, infotext, path)
    image.image.save("apple.png")                              # a PIL image; image.infotext is A1111's text

Edit, hires, refiner, LoRA, ControlNet and IP-Adapter are arguments of the same call::

    studio.generate("a watercolour", init_image="photo.png", strength=0.6)
    studio.generate("a red hat", init_image="photo.png", mask="hat.png", inpaint_area="masked")
    studio.generate("a beach", init_image="photo.png", outpaint="left=128,up=64")
    studio.generate("make it snowy", init_image="photo.png", instruct=True, model="ip2p.safetensors")
    studio.generate("a castle", hires=True, hires_scale=2, loras=["watercolor:0.8"],
                    controlnets=[{"model": "canny_sd15", "image": "house.png", "module": "canny"}])

Progress and cancellation: ``on_event`` receives a :class:`~huabi.service.progress.ProgressEvent`
per sampling step (``event.preview()`` is a quick look at the current latent); pass a
:class:`~huabi.service.progress.Cancellation` as ``cancel`` and call ``interrupt()`` or ``skip()``
on it from another thread. Nothing heavy is imported until a Studio is made.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from huabi.core.request import GenerationRequest
from huabi.errors import HuabiError
from huabi.service.engine import Engine, GeneratedImage, Job, save_grid
from huabi.service.progress import Cancellation, ProgressCallback
from huabi.service.requests import (
    EDIT_FIELDS,
    REQUEST_FIELDS,
    ControlInput,
    PromptJob,
    edit_job,
    expand_prompt_job,
    parse_size,
    prompt_jobs,
)

# Friendly argument names -> the request dataclasses' own.
ALIASES = {"strength": "denoising_strength", "negative": "negative_prompt", "cfg": "cfg_scale",
           "mask_blur": "mask_blur_px", "padding": "padding_px"}


class Studio:
    """A loaded-model cache and the request builder behind one object (see the module notes).

    ``models_dir``: where model names, LoRAs, ControlNets, ... are looked up (default
    ``$HUABI_MODELS_DIR`` or ``~/huabi/models``); ``device``: auto, cpu, cuda, cuda:N;
    ``dtype``: auto, fp32, fp16 (CUDA), bf16. ``out_dir``: save every image there as a PNG
    with its infotext (default: keep images in memory only).
    """

    def __init__(
        self,
        models_dir: str | Path | None = None,
        device: str = "auto",
        dtype: str = "auto",
        *,
        out_dir: str | Path | None = None,
        embeddings_dir: str | Path | None = None,
        base_model: str | Path | None = None,
        gguf_on_the_fly: bool = False,
        backend: str = "auto",
        vae_decoder: str = "full",
        vae_tiling: bool = False,
        text_encoder_files: Mapping[str, str | Path] | None = None,
    ) -> None:
        self.engine = Engine(device=device, dtype=dtype, models_dir=Path(models_dir) if models_dir else None,
                             embeddings_dir=Path(embeddings_dir) if embeddings_dir else None,
                             base_model=Path(base_model) if base_model else None, gguf_on_the_fly=gguf_on_the_fly,
                             backend=backend, vae_decoder=vae_decoder, vae_tiling=vae_tiling,
                             text_encoder_files=dict(text_encoder_files or {}))
        self.out_dir = Path(out_dir) if out_dir is not None else None

    # -- the three-line API ---------------------------------------------------------

    def generate(
        self,
        prompt: str | None = None,
        *,
        seed: int | None = None,
        size: str | tuple[int, int] | None = None,
        init_image: str | Path | Image.Image | None = None,
        mask: str | Path | Image.Image | None = None,
        loras: Sequence[str] = (),
        controlnets: Sequence[Mapping[str, Any]] = (),
        styles: Sequence[str] = (),
        styles_file: str | Path | None = None,
        from_image: str | Path | None = None,
        grid: bool = False,
        wildcards_dir: str | Path | None = None,
        combinatorial: bool = False,
        out_dir: str | Path | None = None,
        on_event: ProgressCallback | None = None,
        cancel: Cancellation | None = None,
        **fields: Any,
    ) -> list[GeneratedImage]:
        """Make images; returns every image made (with its seed, infotext and, if saved, path).

        ``prompt`` takes A1111's syntax and Midjourney's parameters (``--ar 3:2 --chaos 20``);
        ``fields`` are :class:`~huabi.core.request.GenerationRequest` fields (``steps``,
        ``cfg_scale``, ``sampler``, ``hires``, ``refiner``, ``ip_adapter``, ...) and, with
        ``init_image``, :class:`~huabi.core.request.EditOptions` fields (``strength``,
        ``outpaint``, ``instruct``, ``inpaint_area``, ...). ``size`` is ``(w, h)`` or ``"WxH"``;
        ``loras`` are ``NAME[:W]`` specs; ``controlnets`` are dicts of ControlUnit fields;
        ``from_image`` reuses a PNG's infotext (other arguments override it).
        """
        values, edit_values = self._split_fields(fields)
        if seed is not None:
            values["seed"] = seed
        if size is not None:
            width, height = parse_size(size) if isinstance(size, str) else (int(size[0]), int(size[1]))
            values["width_px"], values["height_px"] = width, height
        from_infotext = self._read_infotext(from_image) if from_image is not None else None
        control = ControlInput(units=tuple(dict(unit) for unit in controlnets)) if controlnets else None
        target = Path(out_dir) if out_dir is not None else self.out_dir
        if init_image is None:
            if mask is not None or edit_values:
                raise HuabiError(f"edit: {'mask' if mask is not None else sorted(edit_values)[0]} needs an init_image")
            jobs = prompt_jobs([prompt], values, from_infotext=from_infotext, styles=styles,
                               styles_file=Path(styles_file) if styles_file else None, loras=loras, mj_grid=grid,
                               control=control)
            results: list[GeneratedImage] = []
            for job in jobs:
                job_results = []
                for request in self.expand(job, wildcards_dir=wildcards_dir, combinatorial=combinatorial):
                    if cancel is not None and cancel.interrupted:
                        break
                    job_results.extend(self.run(request, out_dir=target, on_event=on_event, cancel=cancel))
                if job.grid and len(job_results) > 1 and target is not None:
                    save_grid(job_results, target)
                results.extend(job_results)
            return results
        if styles or loras or grid or combinatorial:
            raise HuabiError("edit: styles, loras, grid and combinatorial are text-to-image options "
                             "(put <lora:NAME:W> tags in the prompt)")
        with tempfile.TemporaryDirectory(prefix="huabi-edit-") as scratch:
            image_path = _as_path(init_image, Path(scratch) / "init.png")
            mask_path = _as_path(mask, Path(scratch) / "mask.png") if mask is not None else None
            request, options = edit_job(image_path, prompt, values, edit_values, mask_image=mask_path,
                                        from_infotext=from_infotext, control=control)
            return self.run(Job(request, options), out_dir=target, on_event=on_event, cancel=cancel)

    # -- the pieces, for interfaces that show each request (the CLI) -------------------

    def expand(self, job: PromptJob, *, wildcards_dir: str | Path | None = None,
               combinatorial: bool = False) -> list[GenerationRequest]:
        """The concrete requests of a prompt job (loads its model: Midjourney's sizes need its native size)."""
        bundle = self.engine.load(job.request.model, job.request.vae, job.request.extra)
        return expand_prompt_job(job, bundle.native_size_px,
                                 wildcards_dir=Path(wildcards_dir) if wildcards_dir else None,
                                 combinatorial=combinatorial)

    def run(self, job: Job | GenerationRequest, *, out_dir: str | Path | None = None,
            on_event: ProgressCallback | None = None, cancel: Cancellation | None = None,
            on_saved: Callable[[GeneratedImage], None] | None = None) -> list[GeneratedImage]:
        """Run one job (or request) on the engine; ``on_saved`` hears of each image as it is made."""
        return self.engine.run(job, out_dir=Path(out_dir) if out_dir is not None else None, on_event=on_event,
                               cancel=cancel, on_saved=on_saved)

    @staticmethod
    def _split_fields(fields: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        values: dict[str, Any] = {}
        edit_values: dict[str, Any] = {}
        for name, value in fields.items():
            name = ALIASES.get(name, name)
            if name in ("hires_resize", "seed_resize_from"):
                name += "_px"
                value = parse_size(value) if isinstance(value, str) else value
            if value is None:
                continue
            if name in REQUEST_FIELDS and name != "prompt":
                values[name] = value
            elif name in EDIT_FIELDS:
                edit_values[name] = value
            else:
                valid = sorted({*REQUEST_FIELDS, *EDIT_FIELDS, *ALIASES} - {"prompt"})
                raise HuabiError(f"generate: unknown argument {name!r}; valid: {', '.join(valid)}")
        return values, edit_values

    @staticmethod
    def _read_infotext(path: str | Path) -> str:
        from huabi.service.pngio import read_infotext

        return read_infotext(Path(path))


def _as_path(image: str | Path | Image.Image, scratch: Path) -> Path:
    """A path for an image given as a path or a PIL image (written losslessly to ``scratch``)."""
    if isinstance(image, Image.Image):
        image.save(scratch)
        return scratch
    return Path(image)
