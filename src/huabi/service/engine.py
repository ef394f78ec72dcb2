"""The engine: the one place that owns loaded models and runs generation jobs.

Interfaces (CLI, API, web UI) build a ``GenerationRequest`` and hand it here.
The engine resolves which model file a request means, keeps the most recently
used model loaded (loading is the slow part), runs the pipeline batch by
batch, and writes PNGs with infotext.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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
from huabi.models.family import UNetVariant
from huabi.models.hashes import model_short_hash
from huabi.models.load import load_model
from huabi.pipelines.common import noise_variation
from huabi.pipelines.hires import PixelUpscaler, hires_txt2img
from huabi.pipelines.instruct import check_instruct_model, instruct_pix2pix
from huabi.pipelines.refiner import RefinerStage, check_refiner_pair, refiner_infotext
from huabi.pipelines.txt2img import txt2img
from huabi.service.adapters import ActiveLoras, LoraPatcher, lora_folders, lora_uses, parse_lora_hashes
from huabi.service.attention_adapters import AttentionAdapters, prepare_attention_adapters
from huabi.service.cpu_backend import BackendChoice, lora_state_key
from huabi.service.previews import PreviewCallback
from huabi.service.flow_jobs import FlowBundle, is_flow_model, load_flow_for, run_flow_edit, run_flow_job
from huabi.service.pngio import next_image_path, save_png
from huabi.service.tiling import circular_padding

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".gguf")
BUILTIN_MODEL_NAME = "huabi-mini"
# Sub-folders of the models folder that hold adapters, VAEs, upscalers: never listed as checkpoints.
NON_CHECKPOINT_FOLDERS = frozenset(name.lower() for name in (
    "Lora", "LyCORIS", "hypernetworks", "ControlNet", "ipadapter", "clip_vision", "VAE", "ESRGAN", "embeddings",
    "text_encoders", "text_encoder", "clip", "loras"))  # SD3/FLUX parts (ComfyUI/Forge folder names)


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image
    seed: int
    infotext: str
    path: Path | None


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path


ProgressCallback = Callable[[int, int], None]  # (steps done in the whole job, total steps)


class BatchResult(Protocol):
    """What every pipeline returns for one batch (txt2img, hires, img2img, inpaint, instruct)."""

    images: list[Image.Image]
    seeds: list[int]
    width_px: int
    height_px: int
    embeddings_used: tuple[str, ...]


def default_models_dir() -> Path:
    return Path(os.environ.get("HUABI_MODELS_DIR", Path.home() / "huabi" / "models"))


def builtin_model_path() -> Path:
    return Path(str(resources.files("huabi") / "assets" / "models" / f"{BUILTIN_MODEL_NAME}.safetensors"))


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise HuabiError(f"device: unknown device {name!r} (use auto, cpu, cuda, cuda:N, mps)") from None
    check_device_available(device, name)
    return device


def check_device_available(device: torch.device, name: str) -> None:
    """Refuse, in one line and before any work, a device this torch build or machine lacks."""
    if device.type == "cpu":
        return
    backends = {
        "cuda": (torch.cuda.is_available, torch.cuda.device_count),
        "mps": (lambda: torch.backends.mps.is_available(), lambda: 1),
        "xpu": (lambda: hasattr(torch, "xpu") and torch.xpu.is_available(),
                lambda: torch.xpu.device_count() if hasattr(torch, "xpu") else 0),
    }
    if device.type not in backends:
        raise HuabiError(f"device: huabi cannot run on {name!r} (use auto, cpu, cuda, cuda:N, mps)")
    is_available, count = backends[device.type]
    if not is_available():
        raise HuabiError(f"device: {name} requested but this machine (or torch build) has no {device.type} device")
    if device.index is not None and device.index >= count():
        raise HuabiError(f"device: {name} requested but there are only {count()} {device.type} device(s)")


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
           "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is fp16 on CUDA; on the CPU bf16 where this processor runs it natively and
    faster, else fp32 (see :mod:`huabi.service.device_choice`)."""
    if name == "auto":
        from huabi.service.device_choice import auto_dtype

        return auto_dtype(device).dtype
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
        backend: str = "torch",
        preview: str = "cheap",
        preview_every: int = 1,
        vae_decoder: str = "full",
        vae_tiling: bool = False,
        text_encoder_files: dict[str, Path] | None = None,
    ) -> None:
        """``embeddings_dir``: textual-inversion files used by name in prompts (default
        ``$HUABI_EMBEDDINGS_DIR``, ``<models_dir>/embeddings``, ``$HUABI_HOME/embeddings`` or ``~/huabi/embeddings``;
        a missing default folder just means no embeddings, a missing given one is an error)."""
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.models_dir = models_dir or default_models_dir()
        if embeddings_dir is not None and not Path(embeddings_dir).expanduser().is_dir():
            raise HuabiError(f"embeddings: {embeddings_dir}: no such folder")
        self.embeddings_dir = (Path(embeddings_dir).expanduser() if embeddings_dir is not None
                               else default_embeddings_dir(self.models_dir))  # <models>/embeddings counts
        self._loaded: tuple[tuple, ModelBundle] | None = None
        self._refiner: tuple[tuple, ModelBundle] | None = None  # the SDXL refiner, kept loaded beside the base
        self._loras = LoraPatcher()  # LoRAs applied to the loaded model (kept while requests repeat them)
        # Text encoders + VAE for GGUF UNet files (ComfyUI-GGUF style); unused for full checkpoints.
        self.base_model = Path(base_model).expanduser() if base_model is not None else None
        self.gguf_on_the_fly = gguf_on_the_fly  # GGUF weights stay packed, dequantized at each use
        # torch, openvino or openvino-int8 (huabi.service.cpu_backend); OpenVINO graphs are cached on disk.
        # preview: cheap | taesd:PATH (live previews for on_preview); vae_decoder: full | taesd:PATH;
        # vae_tiling: decode/encode large images in tiles (huabi.service.previews).
        self.backend = BackendChoice(backend, dtype=self.dtype, device=self.device, preview=preview,
                                     preview_every=preview_every, vae_decoder=vae_decoder, vae_tiling=vae_tiling)
        # SD3/FLUX (service/flow_jobs.py): separate clip_l/clip_g/t5xxl files, the loaded model, memory mode.
        self.text_encoder_files = {k: Path(v).expanduser() for k, v in (text_encoder_files or {}).items() if v}
        self._flow_loaded = None
        self.flow_low_memory = False

    # -- models -------------------------------------------------------------------

    def iter_models(self) -> Iterator[ModelEntry]:
        """Checkpoint files and diffusers folders under the models folder, sorted by path."""
        builtin = builtin_model_path()
        if builtin.exists():
            yield ModelEntry(BUILTIN_MODEL_NAME, builtin)
        if not self.models_dir.is_dir():
            return
        for path in sorted(self.models_dir.rglob("*")):
            if path.relative_to(self.models_dir).parts[0].lower() in NON_CHECKPOINT_FOLDERS:
                continue
            if path.is_file() and path.suffix in MODEL_SUFFIXES:
                yield ModelEntry(path.stem, path)
            elif path.is_dir() and (path / "model_index.json").exists():
                yield ModelEntry(path.name, path)

    def resolve_model_path(self, ref: str | None) -> Path:
        """A path, a name in the models folder, or an A1111 short hash; None is the built-in model."""
        if ref is None or ref == BUILTIN_MODEL_NAME:
            builtin = builtin_model_path()
            if builtin.exists():
                return builtin
            raise HuabiError(f"model: the built-in model file {builtin} is missing; reinstall huabi or pass --model PATH")
        path = Path(ref).expanduser()
        if path.exists():
            return path
        if path.suffix in MODEL_SUFFIXES or os.sep in ref:
            raise HuabiError(f"model: {ref}: no such file")
        entries = list(self.iter_models())
        for entry in entries:
            if entry.name == ref or entry.path.name == ref:
                return entry.path
        wanted = ref.lower()
        if all(c in "0123456789abcdef" for c in wanted) and len(wanted) >= 8:
            for entry in entries:
                if entry.path.is_file() and model_short_hash(entry.path).startswith(wanted[:10]):
                    return entry.path
        raise HuabiError(f"model: no model named or hashed {ref!r} in {self.models_dir} "
                         f"({self._models_summary(entries)}); pass --model PATH")

    def _models_summary(self, entries: list[ModelEntry]) -> str:
        """What the models folder holds, for a missing-model error."""
        names = [entry.name for entry in entries if entry.name != BUILTIN_MODEL_NAME]
        if not self.models_dir.is_dir():
            return "that folder does not exist; set HUABI_MODELS_DIR or --models-dir"
        if not names:
            return "it holds no models"
        return "it holds: " + ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")

    def load(self, model: str | None, vae: str | None = None, extra: tuple = ()) -> ModelBundle:
        path = self.resolve_model_path(model)
        vae_path = Path(vae).expanduser() if vae else None
        if vae_path is not None and not vae_path.exists():
            raise HuabiError(f"vae: {vae}: no such file")
        if is_flow_model(path):  # SD3/SD3.5/FLUX.1: their own loader (a FlowBundle), see service/flow_jobs.py
            return load_flow_for(self, path, vae_path, dict(extra))
        self._flow_loaded = None
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

    # -- generation -----------------------------------------------------------------

    def generate(
        self,
        request: GenerationRequest,
        *,
        out_dir: Path | None = None,
        on_progress: ProgressCallback | None = None,
        rng: random.Random | None = None,
        on_saved: Callable[[GeneratedImage], None] | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> list[GeneratedImage]:
        """Run every batch of ``request``; save PNGs to ``out_dir`` when given.
        ``on_preview(done, total, images)`` gets live previews (see ``preview=``)."""
        request = request.with_resolved_seed(rng)
        bundle = self.load(request.model, request.vae, request.extra)
        if isinstance(bundle, FlowBundle):
            return run_flow_job(self, bundle, request, out_dir=out_dir, on_progress=on_progress)
        refiner = self.refiner_stage(request, bundle)
        loras = self.apply_loras(bundle, request)  # before any text encoding (text-encoder LoRA)
        adapters = self.attention_adapters(bundle, request)  # hypernetworks, IP-Adapter: applied per batch
        width_px = request.width_px or bundle.native_size_px
        height_px = request.height_px or bundle.native_size_px
        self.check_memory(bundle, width_px, height_px, request.batch_size)
        # Record the schedule "Automatic" resolved to, so the infotext stays exact even if
        # a later huabi changes a sampler's default.
        recorded = request
        if request.schedule == "Automatic":
            recorded = request.replace(schedule=default_schedule_for(request.sampler))
        # Listed per job (cheap), so files added meanwhile count; read only when a prompt uses them.
        embeddings = self.embeddings_for(bundle)
        batch_steps = request.steps + ((request.hires_steps or request.steps) if request.hires else 0)
        pixel_upscaler = self.hires_pixel_upscaler(request) if request.hires else None
        if request.hires:
            hires_w, hires_h = request.hires_target_px(width_px, height_px, bundle.vae_scale_factor)
            self.check_memory(bundle, hires_w, hires_h, request.batch_size)
        # ControlNet units: models loaded and maps made once per request; each pass gets its UNet hook.
        from huabi.service.control import prepare_controls

        control = prepare_controls(bundle, request.controlnets, models_dir=self.models_dir, device=self.device,
                                   seed=request.seed)
        control_hooks = control.hooks if control is not None else None
        control_hires_hooks = control.hires_hooks() if control is not None else None
        extra = self._extra_infotext(bundle)
        extra.update(refiner_infotext(refiner, request.refiner_hires_pass if request.hires else None))
        if control is not None:
            extra.update(control.infotext())

        def run_batch(job_bundle: ModelBundle, seeds: list[int], variation_seeds: list[int] | None, on_step) -> BatchResult:
            if request.hires:
                return hires_txt2img(
                    job_bundle, request, seeds, device=self.device, on_step=on_step, embeddings=embeddings,
                    variation_seeds=variation_seeds, unet_kwargs_for=control_hooks,
                    hires_unet_kwargs_for=control_hires_hooks, pixel_upscaler=pixel_upscaler, refiner=refiner,
                )
            return txt2img(job_bundle, request, seeds, device=self.device, on_step=on_step, embeddings=embeddings,
                           unet_kwargs_for=control_hooks, variation_seeds=variation_seeds, refiner=refiner)

        return self._run_batches(
            bundle, request, recorded, run_batch, extra=extra, embeddings=embeddings, loras=loras,
            adapters=adapters, out_dir=out_dir, on_progress=on_progress, steps_per_batch=batch_steps,
            on_saved=on_saved,
            on_preview=on_preview,
        )

    def edit(
        self,
        request: GenerationRequest,
        options: EditOptions,
        *,
        out_dir: Path | None = None,
        on_progress: ProgressCallback | None = None,
        rng: random.Random | None = None,
        on_saved: Callable[[GeneratedImage], None] | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> list[GeneratedImage]:
        """Image to image, inpainting or outpainting of ``options.init_image``; PNGs to ``out_dir``.

        The working size is ``request``'s size, else the init image's rounded to
        multiples of 8 (the init image is resized to it with ``options.resize_mode``;
        a mask of another size is stretched to the init image first, as A1111
        does). "Only masked" keeps the init image's own size and scales just the
        masked box to the working size. Outpainting extends the (resized) image.
        """
        from huabi.core.request import INPAINT_AREAS
        from huabi.pipelines.img2img import img2img
        from huabi.pipelines.inpaint import inpaint, outpaint_canvas
        from huabi.service.images import RESIZE_MODES, default_size, load_image, load_mask, resize_image

        request = request.with_resolved_seed(rng)
        image = load_image(options.init_image, what="image")
        mask = None
        if options.mask_image is not None:
            mask = load_mask(options.mask_image, image.width, image.height)
        bundle = self.load(request.model, request.vae, request.extra)
        if isinstance(bundle, FlowBundle):
            return run_flow_edit(self, bundle, request, options, image, mask, out_dir=out_dir, on_progress=on_progress)
        loras = self.apply_loras(bundle, request)  # before any text encoding (text-encoder LoRA)
        adapters = self.attention_adapters(bundle, request)  # hypernetworks, IP-Adapter: applied per batch
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
        recorded = request.replace(width_px=work_w, height_px=work_h)
        if request.schedule == "Automatic":
            recorded = recorded.replace(schedule=default_schedule_for(request.sampler))
        embeddings = self.embeddings_for(bundle)
        extra = self._extra_infotext(bundle)
        # InstructPix2Pix models always edit by instruction (as in A1111); --instruct insists on one.
        instruct = options.instruct or bundle.variant is UNetVariant.INSTRUCT_PIX2PIX
        if instruct:
            check_instruct_model(bundle)
            if mask is not None:
                raise HuabiError(f"instruct: {bundle.name} is an InstructPix2Pix model; it edits whole images "
                                 "(no --mask or --outpaint)")
            extra["Image CFG scale"] = options.image_cfg_scale
        refiner = self.refiner_stage(request, bundle)
        extra.update(refiner_infotext(refiner))
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
        from huabi.service.control import prepare_controls

        control_crop = None
        if only_masked and request.controlnets:  # "Only masked": the controls see the model's box too
            from huabi.core.masks import crop_region
            from huabi.pipelines.inpaint import prepare_mask

            box = crop_region(prepare_mask(mask, options), options.padding_px, work_w, work_h)
            control_crop = (box, image.size) if box is not None else None
        control = prepare_controls(bundle, request.controlnets, models_dir=self.models_dir, device=self.device,
                                   seed=request.seed, fallback_image=image, fallback_mask=mask, crop=control_crop)
        if control is not None:
            import functools

            extra.update(control.infotext())
            img2img = functools.partial(img2img, unet_kwargs_for=control.hooks)
            inpaint = functools.partial(inpaint, unet_kwargs_for=control.hooks)

        def run_batch(job_bundle: ModelBundle, seeds: list[int], variation_seeds: list[int] | None, on_step) -> BatchResult:
            variation = noise_variation(bundle, request, variation_seeds)
            if instruct:
                return instruct_pix2pix(job_bundle, request, image, seeds, image_cfg_scale=options.image_cfg_scale,
                                        denoising_strength=options.denoising_strength, device=self.device,
                                        on_step=on_step, embeddings=embeddings, variation=variation)
            if mask is None:
                return img2img(job_bundle, request, image, seeds, denoising_strength=options.denoising_strength,
                               device=self.device, on_step=on_step, embeddings=embeddings, variation=variation,
                               refiner=refiner)
            return inpaint(job_bundle, request, image, mask, seeds, options, device=self.device, on_step=on_step,
                           embeddings=embeddings, working_size=(work_w, work_h) if only_masked else None,
                           variation=variation, refiner=refiner)

        return self._run_batches(
            bundle, request, recorded, run_batch, extra=extra, embeddings=embeddings, loras=loras,
            adapters=adapters, out_dir=out_dir, on_progress=on_progress, infotext_size=(work_w, work_h),
            on_saved=on_saved,
            on_preview=on_preview,
        )

    def _run_batches(
        self,
        bundle: ModelBundle,
        request: GenerationRequest,
        recorded: GenerationRequest,
        run_batch: Callable[[ModelBundle, list[int], list[int] | None, Callable[[int, int], None]], BatchResult],
        *,
        extra: dict,
        embeddings: EmbeddingLibrary,
        loras: ActiveLoras,
        adapters: AttentionAdapters,
        out_dir: Path | None,
        on_progress: ProgressCallback | None,
        steps_per_batch: int | None = None,
        infotext_size: tuple[int, int] | None = None,
        on_saved: Callable[[GeneratedImage], None] | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> list[GeneratedImage]:
        """The batch loop generate and edit share: ``run_batch(bundle, seeds, variation_seeds,
        on_step)`` makes one batch (with tiling and the per-batch adapters applied), then each
        image gets its infotext (``recorded``'s parameters + ``extra``) and, with ``out_dir``, a PNG.

        Progress counts ``steps_per_batch`` per batch, or the total each pipeline reports.
        The infotext size is ``infotext_size``, or the size the pipeline reports (hires: the
        first pass's, as A1111 records it).
        """
        # The execution backend (torch, or OpenVINO graphs converted at first use) and the
        # precision, recorded when not the device's reference (always set: drops stale --from copies).
        bundle, backend_infotext = self.backend.job_bundle(
            bundle, request, lora_state=lora_state_key(loras), adapters_active=adapters.active, device=self.device,
            on_the_fly_gguf=self.gguf_on_the_fly)
        extra = {**extra, **backend_infotext}
        previewer = self.backend.previewer(bundle) if on_preview is not None else None
        batches = request.image_seeds()
        variation_batches = request.image_variation_seeds()  # None unless a variation strength is set
        results: list[GeneratedImage] = []
        for batch_index, seeds in enumerate(batches):
            variation_seeds = variation_batches[batch_index] if variation_batches else None

            def on_step(done: int, total: int, _index=batch_index, denoised=None) -> None:
                per_batch = steps_per_batch or total
                if on_progress is not None:
                    on_progress(_index * per_batch + min(done, per_batch), per_batch * len(batches))
                if previewer is not None and denoised is not None and self.backend.preview_due(done, total):
                    on_preview(_index * per_batch + min(done, per_batch), per_batch * len(batches), previewer(denoised))

            on_step.wants_latents = previewer is not None  # the pipelines then pass the denoised latents

            # Tiling: circular padding in the UNet and the VAE decoder for this batch only.
            tiling = circular_padding(bundle.unet, bundle.vae.decoder) if request.tile else contextlib.nullcontext()
            with tiling, adapters.applied(bundle) as job_bundle:
                result = run_batch(job_bundle, seeds, variation_seeds, on_step)
            batch_extra = dict(extra)
            # Always set: a stale value copied from a --from image must not survive.
            batch_extra["TI hashes"] = embeddings.ti_hashes(result.embeddings_used)
            batch_extra["Lora hashes"] = loras.infotext_hashes  # None drops a stale copy from --from
            batch_extra.update(adapters.infotext(request))
            width_px, height_px = infotext_size or (result.width_px, result.height_px)
            for image, seed, variation_seed in zip(result.images, result.seeds, variation_seeds or [None] * len(seeds)):
                infotext = format_infotext(
                    recorded, seed=seed, variation_seed=variation_seed, width_px=width_px, height_px=height_px,
                    model_name=bundle.name, model_hash=bundle.short_hash, extra=batch_extra,
                    version=f"huabi {__version__}",
                )
                path = save_png(image, next_image_path(out_dir, seed), infotext) if out_dir is not None else None
                results.append(GeneratedImage(image=image, seed=seed, infotext=infotext, path=path))
                if on_saved is not None:  # e.g. the CLI lists saved files even if a later batch is interrupted
                    on_saved(results[-1])
        return results

    def apply_loras(self, bundle: ModelBundle, request: GenerationRequest) -> ActiveLoras:
        """Patch ``bundle`` with the LoRA/LyCORIS tags of ``request.prompt`` (A1111 takes a batch's
        tags from its first prompt; negative-prompt tags are removed but not applied, as there).
        Files come from ``models_dir/Lora`` and ``models_dir/LyCORIS`` or a path; a request
        without tags gets the base weights back. Call before encoding any text."""
        from huabi.core.prompt_parser import extract_extra_networks

        _text, tags = extract_extra_networks(request.prompt)
        known = parse_lora_hashes(dict(request.extra).get("Lora hashes"))  # from --from: finds renamed files
        return self._loras.activate(bundle, lora_uses(tags, lora_folders(self.models_dir), known))

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


def next_grid_path(out_dir: Path) -> Path:
    """The next free ``grid-NNNN.png`` in ``out_dir`` (A1111's grid names)."""
    highest = -1
    if out_dir.is_dir():
        for entry in out_dir.iterdir():
            stem = entry.name[len("grid-"):].split(".")[0].split("-")[0]
            if entry.name.startswith("grid-") and stem.isdigit():
                highest = max(highest, int(stem))
    number = highest + 1
    while (out_dir / f"grid-{number:04d}.png").exists():
        number += 1
    return out_dir / f"grid-{number:04d}.png"


def save_grid(results: Sequence[GeneratedImage], out_dir: Path) -> Path:
    """Save the results as one grid PNG carrying the first image's infotext (as A1111 does)."""
    if not results:
        raise HuabiError("grid: no images to put in a grid")
    grid = image_grid([result.image for result in results])
    return save_png(grid, next_grid_path(out_dir), results[0].infotext)
