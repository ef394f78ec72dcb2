"""The engine: the one place that owns loaded models and runs generation jobs.

Interfaces (CLI, API, web UI) build a ``GenerationRequest`` and hand it here.
The engine resolves which model file a request means, keeps the most recently
used model loaded (loading is the slow part), runs the pipeline batch by
batch, and writes PNGs with infotext.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from huabi import __version__
from huabi.core.infotext import format_infotext
from huabi.core.request import EditOptions, GenerationRequest, is_upscaler_path
from huabi.core.schedules import default_schedule_for
from huabi.errors import HuabiError
from huabi.models.bundle import ModelBundle
from huabi.models.embeddings import EmbeddingLibrary, default_embeddings_dir
from huabi.core.family import UNetVariant
from huabi.models.hashes import model_short_hash
from huabi.models.load import load_model
from huabi.pipelines.common import noise_variation
from huabi.pipelines.hires import PixelUpscaler, hires_txt2img
from huabi.pipelines.instruct import check_instruct_model, instruct_pix2pix
from huabi.pipelines.patches import (
    FIRST_PASS,
    ModelContextPatch,
    Patch,
    RefinerPatch,
    UNetHookPatch,
    patched_model,
    patches_infotext,
    refiner_passes,
)
from huabi.pipelines.refiner import RefinerStage, check_refiner_pair, refiner_infotext
from huabi.pipelines.txt2img import txt2img
from huabi.service.model_files import (  # noqa: F401 -- also importable from here, as before
    BUILTIN_MODEL_NAME,
    MODEL_SUFFIXES,
    NON_CHECKPOINT_FOLDERS,
    ModelEntry,
    builtin_model_path,
    default_models_dir,
    iter_models,
    resolve_model_path,
)
from huabi.service.adapters import ActiveLoras, LoraPatch, LoraPatcher, lora_folders, lora_uses, parse_lora_hashes
from huabi.service.attention_adapters import AttentionAdapters, prepare_attention_adapters
from huabi.service.pngio import next_image_path, save_png
from huabi.service.progress import Cancellation, ProgressCallback, ProgressEvent, StopSampling
from huabi.service.tiling import circular_padding

@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image
    seed: int
    infotext: str
    path: Path | None


@dataclass(frozen=True)
class Job:
    """One job: a request, and for an edit its edit inputs (init image, mask, strength, outpaint, instruct)."""

    request: GenerationRequest
    edit: EditOptions | None = None


class BatchResult(Protocol):
    """What every pipeline returns for one batch (txt2img, hires, img2img, inpaint, instruct)."""

    images: list[Image.Image]
    seeds: list[int]
    width_px: int
    height_px: int
    embeddings_used: tuple[str, ...]


class RunBatch(Protocol):
    def __call__(self, bundle: ModelBundle, seeds: list[int], variation_seeds: list[int] | None,
                 on_step: Callable[[ProgressEvent], None], embeddings: EmbeddingLibrary) -> BatchResult: ...


@dataclass(frozen=True)
class BatchPlan:
    """How a prepared job makes one batch: ``run_batch`` calls the pipeline (txt2img, hires,
    img2img, inpaint, instruct) with the job's patches; ``recorded`` is the request the infotext
    records; progress counts ``steps_per_batch`` (None: what the pipeline reports)."""

    run_batch: RunBatch
    recorded: GenerationRequest
    steps_per_batch: int | None = None
    infotext_size: tuple[int, int] | None = None


@dataclass(frozen=True)
class PreparedJob:
    """Everything a job needs, checked and loaded: the model, the plan, the patches entered around
    every batch (LoRA, tiling, attention adapters) and the job's infotext keys."""

    bundle: ModelBundle
    request: GenerationRequest  # seed resolved
    recorded: GenerationRequest
    plan: BatchPlan
    embeddings: EmbeddingLibrary
    model_patches: tuple[Patch, ...]
    extra: dict


def _counting(on_progress: Callable[[int, int], None] | None) -> ProgressCallback | None:
    """An event callback for an older ``(done, total)`` callback."""
    if on_progress is None:
        return None
    return lambda event: on_progress(event.step, event.total)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise HuabiError(f"device: unknown device {name!r} (use auto, cpu, cuda, cuda:N)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HuabiError(f"device: {name} requested but no CUDA device is available")
    return device


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
           "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is fp16 on CUDA and fp32 on the CPU (bf16 on CPU is opt-in: faster, ~1% error)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise HuabiError(f"dtype: unknown dtype {name!r}; valid: auto, fp32, fp16, bf16")
    dtype = _DTYPES[name]
    if dtype is torch.float16 and device.type == "cpu":
        raise HuabiError("dtype: fp16 is not supported on the CPU; use fp32 or bf16")
    return dtype


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * 2**30  # unknown platform: assume a typical desktop


def estimate_peak_bytes(bundle: ModelBundle, width_px: int, height_px: int, batch_size: int, dtype: torch.dtype) -> int:
    """A deliberately rough upper bound on activation memory for one batch.

    The VAE decoder's full-resolution blocks dominate at large sizes (decoded one
    image at a time); self-attention at the first UNet level grows with the
    square of the latent token count when the attention kernel materialises it.
    """
    element = torch.finfo(dtype).bits // 8
    pixels = width_px * height_px
    decoder_channels = int(bundle.vae.config.block_out_channels[0])
    vae_bytes = pixels * decoder_channels * element * 6
    tokens = pixels // bundle.vae_scale_factor**2
    unet_bytes = 2 * batch_size * tokens * int(bundle.unet.config.block_out_channels[0]) * element * 40
    return vae_bytes + unet_bytes


class Engine:
    """Owns device, dtype, the models folder and the currently loaded model."""

    def __init__(
        self,
        *,
        device: str = "auto",
        dtype: str = "auto",
        models_dir: Path | None = None,
        embeddings_dir: Path | None = None,
        base_model: Path | None = None,
        gguf_on_the_fly: bool = False,
    ) -> None:
        """``embeddings_dir``: textual-inversion files used by name in prompts (default
        ``$HUABI_EMBEDDINGS_DIR``, ``$HUABI_HOME/embeddings`` or ``~/huabi/embeddings``;
        a missing default folder just means no embeddings, a missing given one is an error)."""
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.models_dir = models_dir or default_models_dir()
        if embeddings_dir is not None and not Path(embeddings_dir).expanduser().is_dir():
            raise HuabiError(f"embeddings: {embeddings_dir}: no such folder")
        self.embeddings_dir = Path(embeddings_dir).expanduser() if embeddings_dir is not None else default_embeddings_dir()
        self._loaded: tuple[tuple, ModelBundle] | None = None
        self._refiner: tuple[tuple, ModelBundle] | None = None  # the SDXL refiner, kept loaded beside the base
        self._loras = LoraPatcher()  # LoRAs applied to the loaded model (kept while requests repeat them)
        # Text encoders + VAE for GGUF UNet files (ComfyUI-GGUF style); unused for full checkpoints.
        self.base_model = Path(base_model).expanduser() if base_model is not None else None
        self.gguf_on_the_fly = gguf_on_the_fly  # GGUF weights stay packed, dequantized at each use

    # -- models -------------------------------------------------------------------

    def iter_models(self) -> Iterator[ModelEntry]:
        """Checkpoint files and diffusers folders under the models folder, sorted by path."""
        return iter_models(self.models_dir)

    def resolve_model_path(self, ref: str | None) -> Path:
        """A path, a name in the models folder, or an A1111 short hash; None is the built-in model."""
        return resolve_model_path(ref, self.models_dir)

    def load(self, model: str | None, vae: str | None = None) -> ModelBundle:
        path = self.resolve_model_path(model)
        vae_path = Path(vae).expanduser() if vae else None
        if vae_path is not None and not vae_path.exists():
            raise HuabiError(f"vae: {vae}: no such file")
        base = self.base_model if path.suffix.lower() == ".gguf" else None
        if base is not None and not base.exists():  # a name or hash in the models folder, as --model takes
            try:
                base = self.resolve_model_path(str(base))
            except HuabiError as err:
                raise HuabiError(f"base: {str(err).removeprefix('model: ').replace('--model PATH', '--base PATH')}") from None
        key = (str(path.resolve()), str(vae_path.resolve()) if vae_path else None, self.device, self.dtype,
               str(base.resolve()) if base else None, self.gguf_on_the_fly)
        if self._loaded is not None and self._loaded[0] == key:
            return self._loaded[1]
        self._loras.restore()  # the previous model leaves with its base weights
        self._loaded = None  # free the previous model before loading the next
        bundle = load_model(path, vae=vae_path, device=self.device, dtype=self.dtype, base=base,
                            gguf_on_the_fly=self.gguf_on_the_fly)
        if base is not None:  # recorded in infotext: a GGUF image is redone with the same --base
            bundle.metadata["GGUF base"] = base.stem if base.is_file() else base.name
            bundle.metadata["GGUF base hash"] = model_short_hash(base) if base.is_file() else None
        if self.device.type == "cpu":
            # oneDNN's convolutions are faster on NHWC: measured 15% per UNet step on huabi-mini.
            bundle.unet.to(memory_format=torch.channels_last)
            bundle.vae.to(memory_format=torch.channels_last)
        self._loaded = (key, bundle)
        return bundle

    def hires_pixel_upscaler(self, request: GenerationRequest) -> PixelUpscaler | None:
        """The image resizer for a pixel-space hires upscaler: None (Lanczos) unless it is a model file."""
        if not is_upscaler_path(request.hires_upscaler):
            return None
        from huabi.models.upscalers import load_upscaler
        from huabi.service.upscale import upscale_with_model

        path = Path(request.hires_upscaler).expanduser()
        if not path.is_file():
            raise HuabiError(f"hires upscaler: {request.hires_upscaler}: no such file")
        model = load_upscaler(path, device=self.device)
        device = self.device

        def upscale(image: Image.Image, width_px: int, height_px: int) -> Image.Image:
            # Model passes until the target is covered, then Lanczos to the exact size (as A1111).
            current = image
            for _ in range(4):
                if current.width >= width_px and current.height >= height_px:
                    break
                current = upscale_with_model(current, model, device=device)
            if current.size != (width_px, height_px):
                current = current.resize((width_px, height_px), resample=Image.LANCZOS)
            return current

        return upscale

    # -- jobs -----------------------------------------------------------------------

    def run(
        self,
        job: Job | GenerationRequest,
        *,
        out_dir: Path | None = None,
        on_event: ProgressCallback | None = None,
        cancel: Cancellation | None = None,
        rng: random.Random | None = None,
    ) -> list[GeneratedImage]:
        """The one entry point: prepare ``job`` (every check, model and patch), then run its batches.

        Text to image, image to image, inpainting, outpainting and instruct edits are plans
        of the same batch loop (:meth:`prepare` picks one from ``job.edit``). PNGs go to
        ``out_dir`` when given; ``on_event`` receives a :class:`ProgressEvent` per sampling
        step; ``cancel`` stops the job early (interrupt: no more batches; skip: this batch).
        """
        prepared = self.prepare(job if isinstance(job, Job) else Job(job), rng=rng)
        return self._run_batches(prepared, out_dir=out_dir, on_event=on_event, cancel=cancel)

    def generate(
        self,
        request: GenerationRequest,
        *,
        out_dir: Path | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        rng: random.Random | None = None,
    ) -> list[GeneratedImage]:
        """Text to image (the older entry point): ``run(Job(request))`` with a ``(done, total)`` callback."""
        return self.run(Job(request), out_dir=out_dir, on_event=_counting(on_progress), rng=rng)

    def edit(
        self,
        request: GenerationRequest,
        options: EditOptions,
        *,
        out_dir: Path | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        rng: random.Random | None = None,
    ) -> list[GeneratedImage]:
        """An edit (the older entry point): ``run(Job(request, options))`` with a ``(done, total)`` callback."""
        return self.run(Job(request, options), out_dir=out_dir, on_event=_counting(on_progress), rng=rng)

    def prepare(self, job: Job, *, rng: random.Random | None = None) -> PreparedJob:
        """Every check, model and patch of ``job``, before any sampling: an unsupported
        combination or a bad input fails here with one line, and nothing is written."""
        request = job.request.with_resolved_seed(rng)
        edit = job.edit
        image = mask = None
        if edit is not None:
            from huabi.service.images import load_image, load_mask

            image = load_image(edit.init_image, what="image")
            if edit.mask_image is not None:
                mask = load_mask(edit.mask_image, image.width, image.height)
        bundle = self.load(request.model, request.vae)
        refiner = self.refiner_stage(request, bundle) if edit is None else None
        lora = self.lora_patch(bundle, request)  # before any text encoding (text-encoder LoRA)
        adapters = self.attention_adapters(bundle, request)  # hypernetworks, IP-Adapter: applied per batch
        model_patches: list[Patch] = [lora]
        if request.tile:  # circular padding in the UNet and the VAE decoder, per batch
            model_patches.append(ModelContextPatch(lambda b: circular_padding(b.unet, b.vae.decoder)))
        model_patches.append(ModelContextPatch(adapters.applied, adapters.infotext(request)))
        embeddings = self.embeddings_for(bundle)  # listed per job: files added meanwhile count
        extra = self._extra_infotext(bundle)
        if edit is None:
            plan = self._plan_txt2img(request, bundle, refiner, extra)
        else:
            plan = self._plan_edit(request, edit, bundle, image, mask, extra)
        # Record the schedule "Automatic" resolved to, so the infotext stays exact even if
        # a later huabi changes a sampler's default.
        recorded = plan.recorded
        if request.schedule == "Automatic":
            recorded = recorded.replace(schedule=default_schedule_for(request.sampler))
        return PreparedJob(
            bundle=bundle, request=request, recorded=recorded, plan=plan, embeddings=embeddings,
            model_patches=tuple(model_patches), extra=extra,
        )

    def _plan_txt2img(self, request: GenerationRequest, bundle: ModelBundle, refiner: RefinerStage | None,
                      extra: dict) -> BatchPlan:
        width_px = request.width_px or bundle.native_size_px
        height_px = request.height_px or bundle.native_size_px
        self.check_memory(bundle, width_px, height_px, request.batch_size)
        pixel_upscaler = self.hires_pixel_upscaler(request) if request.hires else None
        if request.hires:
            hires_w, hires_h = request.hires_target_px(width_px, height_px, bundle.vae_scale_factor)
            self.check_memory(bundle, hires_w, hires_h, request.batch_size)
        patches: list[Patch] = []
        refiner_keys = refiner_infotext(refiner, request.refiner_hires_pass if request.hires else None)
        if refiner is not None:
            passes = refiner_passes(request.refiner_hires_pass) if request.hires else (FIRST_PASS,)
            patches.append(RefinerPatch(refiner, passes, refiner_keys))
        extra.update(refiner_keys)
        control = self.control_patch(bundle, request)  # models loaded and maps made once per job
        if control is not None:
            patches.insert(0, control)
            extra.update(control.infotext())
        steps = request.steps + ((request.hires_steps or request.steps) if request.hires else 0)

        def run_batch(job_bundle, seeds, variation_seeds, on_step, embeddings):
            if request.hires:
                return hires_txt2img(job_bundle, request, seeds, device=self.device, on_step=on_step,
                                     embeddings=embeddings, variation_seeds=variation_seeds,
                                     pixel_upscaler=pixel_upscaler, patches=patches)
            return txt2img(job_bundle, request, seeds, device=self.device, on_step=on_step, embeddings=embeddings,
                           variation_seeds=variation_seeds, patches=patches)

        return BatchPlan(run_batch, recorded=request, steps_per_batch=steps)

    def _plan_edit(self, request: GenerationRequest, options: EditOptions, bundle: ModelBundle,
                   image: Image.Image, mask: Image.Image | None, extra: dict) -> BatchPlan:
        """Image to image, inpainting, outpainting or an instruct edit of ``image``.

        The working size is ``request``'s size, else the init image's rounded to
        multiples of 8 (the init image is resized to it with ``options.resize_mode``;
        a mask of another size is stretched to the init image first, as A1111
        does). "Only masked" keeps the init image's own size and scales just the
        masked box to the working size. Outpainting extends the (resized) image.
        """
        from huabi.core.request import INPAINT_AREAS
        from huabi.pipelines.img2img import img2img
        from huabi.pipelines.inpaint import inpaint, outpaint_canvas
        from huabi.service.images import RESIZE_MODES, default_size, resize_image

        if request.width_px and request.height_px:
            work_w, work_h = request.width_px, request.height_px
        else:
            work_w, work_h = default_size(image, bundle.vae_scale_factor)
        only_masked = mask is not None and options.inpaint_area == "masked"
        if not only_masked:
            image = resize_image(image, work_w, work_h, options.resize_mode)
            if mask is not None:
                mask = resize_image(mask.convert("RGB"), work_w, work_h, options.resize_mode).convert("L")
        if options.outpaint is not None:
            image, mask = outpaint_canvas(image, options, request.seed)
            work_w, work_h = image.size
        self.check_memory(bundle, work_w, work_h, request.batch_size)
        # InstructPix2Pix models always edit by instruction (as in A1111); --instruct insists on one.
        instruct = options.instruct or bundle.variant is UNetVariant.INSTRUCT_PIX2PIX
        if instruct:
            check_instruct_model(bundle)
            if mask is not None:
                raise HuabiError(f"instruct: {bundle.name} is an InstructPix2Pix model; it edits whole images "
                                 "(no --mask or --outpaint)")
            extra["Image CFG scale"] = options.image_cfg_scale
        patches: list[Patch] = []
        refiner = self.refiner_stage(request, bundle)
        refiner_keys = refiner_infotext(refiner)
        if refiner is not None:
            patches.append(RefinerPatch(refiner, (FIRST_PASS,), refiner_keys))
        extra.update(refiner_keys)
        extra["Denoising strength"] = options.denoising_strength
        if options.resize_mode != "just":
            extra["Resize mode"] = RESIZE_MODES[options.resize_mode]
        if mask is not None:
            extra["Mask blur"] = options.mask_blur_px
            extra["Masked content"] = options.masked_content
            if options.invert_mask:
                extra["Mask mode"] = "Inpaint not masked"
            extra["Inpaint area"] = INPAINT_AREAS[options.inpaint_area]
            if only_masked:
                extra["Masked area padding"] = options.padding_px
        if options.outpaint is not None:
            extra["Outpaint"] = ",".join(
                f"{side}={value}" for side, value in zip(("left", "right", "up", "down"), options.outpaint) if value
            )
        # ControlNet: units without an image use the edit's image (and mask), as sd-webui-controlnet does.
        control_crop = None
        if only_masked and request.controlnets:  # "Only masked": the controls see the model's box too
            from huabi.core.masks import crop_region
            from huabi.pipelines.inpaint import prepare_mask

            box = crop_region(prepare_mask(mask, options), options.padding_px, work_w, work_h)
            control_crop = (box, image.size) if box is not None else None
        control = self.control_patch(bundle, request, fallback_image=image, fallback_mask=mask, crop=control_crop)
        if control is not None:
            patches.insert(0, control)
            extra.update(control.infotext())

        def run_batch(job_bundle, seeds, variation_seeds, on_step, embeddings):
            variation = noise_variation(bundle, request, variation_seeds)
            if instruct:
                return instruct_pix2pix(job_bundle, request, image, seeds, image_cfg_scale=options.image_cfg_scale,
                                        denoising_strength=options.denoising_strength, device=self.device,
                                        on_step=on_step, embeddings=embeddings, variation=variation,
                                        patches=patches)
            if mask is None:
                return img2img(job_bundle, request, image, seeds, denoising_strength=options.denoising_strength,
                               device=self.device, on_step=on_step, embeddings=embeddings, variation=variation,
                               patches=patches)
            return inpaint(job_bundle, request, image, mask, seeds, options, device=self.device, on_step=on_step,
                           embeddings=embeddings, working_size=(work_w, work_h) if only_masked else None,
                           variation=variation, patches=patches)

        return BatchPlan(run_batch, recorded=request.replace(width_px=work_w, height_px=work_h),
                         infotext_size=(work_w, work_h))

    def _run_batches(
        self,
        job: PreparedJob,
        *,
        out_dir: Path | None,
        on_event: ProgressCallback | None,
        cancel: Cancellation | None,
    ) -> list[GeneratedImage]:
        """The batch loop every plan shares: enter the model patches, make one batch, then give each
        image its infotext (the recorded parameters + the patches' and plan's keys) and, with
        ``out_dir``, a PNG.

        Progress counts the plan's steps per batch, or the total each pipeline reports.
        The infotext size is the plan's, or the size the pipeline reports (hires: the
        first pass's, as A1111 records it).
        """
        request, plan = job.request, job.plan
        batches = request.image_seeds()
        variation_batches = request.image_variation_seeds()  # None unless a variation strength is set
        results: list[GeneratedImage] = []
        for batch_index, seeds in enumerate(batches):
            if cancel is not None and cancel.interrupted:
                break
            variation_seeds = variation_batches[batch_index] if variation_batches else None

            def on_step(event: ProgressEvent, _index=batch_index) -> None:
                if on_event is not None:
                    per_batch = plan.steps_per_batch or event.total
                    on_event(replace(event, step=_index * per_batch + min(event.step, per_batch),
                                     total=per_batch * len(batches), batch=_index, batch_count=len(batches)))
                if cancel is not None and cancel.should_stop():
                    raise StopSampling

            with patched_model(job.model_patches, job.bundle) as job_bundle:
                result = plan.run_batch(job_bundle, seeds, variation_seeds, on_step, job.embeddings)
            if cancel is not None:
                cancel.take_skip()  # a skip ends one batch only
            batch_extra = dict(job.extra)
            # Always set: a stale value copied from a --from image must not survive.
            batch_extra["TI hashes"] = job.embeddings.ti_hashes(result.embeddings_used)
            batch_extra.update(patches_infotext(job.model_patches))
            width_px, height_px = plan.infotext_size or (result.width_px, result.height_px)
            for image, seed, variation_seed in zip(result.images, result.seeds, variation_seeds or [None] * len(seeds)):
                infotext = format_infotext(
                    job.recorded, seed=seed, variation_seed=variation_seed, width_px=width_px, height_px=height_px,
                    model_name=job.bundle.name, model_hash=job.bundle.short_hash, extra=batch_extra,
                    version=f"huabi {__version__}",
                )
                path = save_png(image, next_image_path(out_dir, seed), infotext) if out_dir is not None else None
                results.append(GeneratedImage(image=image, seed=seed, infotext=infotext, path=path))
        return results

    # -- patches --------------------------------------------------------------------

    def lora_patch(self, bundle: ModelBundle, request: GenerationRequest) -> LoraPatch:
        """The LoRA/LyCORIS tags of ``request.prompt``, resolved and applied to ``bundle`` now (A1111
        takes a batch's tags from its first prompt; negative-prompt tags are removed but not applied,
        as there). Files come from ``models_dir/Lora`` and ``models_dir/LyCORIS`` or a path; a
        request without tags gets the base weights back. Call before encoding any text."""
        from huabi.core.prompt_parser import extract_extra_networks

        _text, tags = extract_extra_networks(request.prompt)
        known = parse_lora_hashes(dict(request.extra).get("Lora hashes"))  # from --from: finds renamed files
        patch = LoraPatch(self._loras, lora_uses(tags, lora_folders(self.models_dir), known))
        patch.activate(bundle)
        return patch

    def apply_loras(self, bundle: ModelBundle, request: GenerationRequest) -> ActiveLoras:
        """Patch ``bundle`` with ``request``'s LoRA tags now (see :meth:`lora_patch`); what is active."""
        return self.lora_patch(bundle, request).active

    def control_patch(self, bundle: ModelBundle, request: GenerationRequest, **fallbacks) -> UNetHookPatch | None:
        """ControlNet/T2I-Adapter units: models loaded and maps made once per job; each pass gets its own
        UNet hook (the hires pass a larger hint). ``fallbacks``: an edit's image/mask/crop for units
        without their own image."""
        from huabi.service.control import prepare_controls

        control = prepare_controls(bundle, request.controlnets, models_dir=self.models_dir, device=self.device,
                                   seed=request.seed, **fallbacks)
        if control is None:
            return None
        return UNetHookPatch(control.hooks, control.infotext(), hires_factory=control.hires_hooks())

    def load_refiner(self, ref: str) -> ModelBundle:
        """The SDXL refiner by path, name or hash, kept loaded beside the base model.

        Memory: both models stay on the device for the whole job (no swapping at the
        switch; SDXL base + refiner in fp16 take about 10 GB of VRAM on CUDA).
        """
        try:
            path = self.resolve_model_path(ref)
        except HuabiError as err:
            raise HuabiError(f"refiner: {str(err).removeprefix('model: ')}".replace("--model PATH", "--refiner PATH")) from None
        key = (str(path.resolve()), self.device, self.dtype)
        if self._refiner is not None and self._refiner[0] == key:
            return self._refiner[1]
        self._refiner = None
        bundle = load_model(path, device=self.device, dtype=self.dtype)
        if self.device.type == "cpu":
            bundle.unet.to(memory_format=torch.channels_last)
        self._refiner = (key, bundle)
        return bundle

    def refiner_stage(self, request: GenerationRequest, bundle: ModelBundle) -> RefinerStage | None:
        """The hand-over to ``request.refiner`` after ``bundle`` (None without a refiner); family checks here."""
        if request.refiner is None:
            return None
        refiner = self.load_refiner(request.refiner)
        check_refiner_pair(bundle, refiner)
        return RefinerStage(
            refiner, float(request.refiner_switch_at), request.prompt, request.negative_prompt,
            clip_skip=request.clip_skip, embeddings=self.embeddings_for(refiner),
        )

    def attention_adapters(self, bundle: ModelBundle, request: GenerationRequest) -> AttentionAdapters:
        """The hypernetworks and IP-Adapter ``request`` uses, loaded and checked (applied per batch)."""
        from huabi.service.images import load_image

        return prepare_attention_adapters(request, bundle, models_dir=self.models_dir,
                                          load_image=lambda path: load_image(path, what="IP-Adapter image"))

    def embeddings_for(self, bundle: ModelBundle) -> EmbeddingLibrary:
        """The embeddings folder as seen by ``bundle``'s text encoders (widths are checked on use)."""
        return EmbeddingLibrary.from_folder(self.embeddings_dir, family=bundle.family, text_encoders=bundle.text_encoders)

    def check_memory(self, bundle: ModelBundle, width_px: int, height_px: int, batch_size: int) -> None:
        needed = estimate_peak_bytes(bundle, width_px, height_px, batch_size, self.dtype)
        available = available_memory_bytes(self.device)
        if needed > available:
            raise HuabiError(
                f"size: {width_px}x{height_px} with batch size {batch_size} needs about "
                f"{needed / 2**30:.1f} GiB but {self.device} has {available / 2**30:.1f} GiB free; "
                "use a smaller size or batch"
            )

    @staticmethod
    def _extra_infotext(bundle: ModelBundle) -> dict[str, str]:
        extra: dict[str, str] = {}
        if bundle.vae_name:
            if bundle.vae_short_hash:
                extra["VAE hash"] = bundle.vae_short_hash
            extra["VAE"] = bundle.vae_name
        for key in ("GGUF base", "GGUF base hash"):
            if bundle.metadata.get(key):
                extra[key] = bundle.metadata[key]
        return extra


def image_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """The images side by side in rows of ``columns`` (default ceil(sqrt(n)): 4 images make 2x2,
    as Midjourney shows them)."""
    if not images:
        raise HuabiError("grid: no images to put in a grid")
    cols = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cell_w = max(image.width for image in images)
    cell_h = max(image.height for image in images)
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h))
    for index, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((index % cols) * cell_w, (index // cols) * cell_h))
    return grid


def next_grid_path(out_dir: Path, prefix: str = "grid-") -> Path:
    """The next free ``<prefix>NNNN.png`` in ``out_dir``, after the highest number there (A1111's
    grid names: ``grid-0000.png``, ``xyz_grid-0000.png``)."""
    highest = -1
    if out_dir.is_dir():
        for entry in out_dir.iterdir():
            number = entry.name[len(prefix):].split(".")[0].split("-")[0]
            if entry.name.startswith(prefix) and number.isdigit():
                highest = max(highest, int(number))
    number = highest + 1
    while (out_dir / f"{prefix}{number:04d}.png").exists():
        number += 1
    return out_dir / f"{prefix}{number:04d}.png"


def save_grid(results: Sequence[GeneratedImage], out_dir: Path) -> Path:
    """Save the results as one grid PNG carrying the first image's infotext (as A1111 does)."""
    if not results:
        raise HuabiError("grid: no images to put in a grid")
    grid = image_grid([result.image for result in results])
    return save_png(grid, next_grid_path(out_dir), results[0].infotext)
