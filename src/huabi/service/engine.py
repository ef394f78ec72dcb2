"""The engine: the one place that owns loaded models and runs jobs.

Interfaces build requests with :mod:`huabi.service.requests` and hand a :class:`Job` to
:meth:`Engine.run`, the one entry point: :meth:`Engine.prepare` resolves and loads the model,
collects the job's patches (:mod:`huabi.pipelines.patches`) and picks its plan
(:mod:`huabi.service.plans`); the batch loop enters the patches, runs the pipeline, reports
progress events, honours cancellation and writes PNGs with infotext. The most recently used model
stays loaded (loading is the slow part).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from huabi import __version__
from huabi.core.infotext import format_infotext
from huabi.core.request import EditOptions, GenerationRequest
from huabi.core.schedules import default_schedule_for
from huabi.errors import HuabiError
from huabi.models.bundle import ModelBundle
from huabi.models.embeddings import EmbeddingLibrary, default_embeddings_dir
from huabi.models.hashes import model_short_hash
from huabi.models.load import load_model
from huabi.pipelines.patches import ModelContextPatch, Patch, UNetHookPatch, patched_model, patches_infotext
from huabi.pipelines.refiner import RefinerStage, check_refiner_pair
from huabi.service.adapters import ActiveLoras, LoraPatch, LoraPatcher, lora_folders, lora_uses, parse_lora_hashes
from huabi.service.attention_adapters import AttentionAdapters, prepare_attention_adapters
from huabi.service.cpu_backend import BackendChoice, lora_state_key
from huabi.service.unet_weights import releasable_unet
from huabi.service.flow_jobs import FlowBundle, is_flow_model, load_flow_for
from huabi.service.flow_plans import flow_embeddings, plan_flow, release_flow_loras
from huabi.service.devices import (  # noqa: F401 -- also importable from here, as before
    available_memory_bytes,
    estimate_peak_bytes,
    resolve_device,
    resolve_dtype,
)
from huabi.service.grids import image_grid, next_grid_path, save_grid  # noqa: F401 -- as before
from huabi.service.model_files import (  # noqa: F401 -- as before
    BUILTIN_MODEL_NAME,
    MODEL_SUFFIXES,
    NON_CHECKPOINT_FOLDERS,
    ModelEntry,
    builtin_model_path,
    default_models_dir,
    iter_models,
    resolve_model_path,
)
from huabi.service.plans import BatchPlan, BatchResult, RunBatch, plan_edit, plan_txt2img  # noqa: F401
from huabi.service.pngio import next_image_path, save_png
from huabi.service.results import GeneratedImage  # noqa: F401 -- importable from here, as before
from huabi.service.progress import Cancellation, ProgressCallback, ProgressEvent, StopSampling
from huabi.service.previews import TILE_LATENT, PreviewCallback
from huabi.service.tiling import circular_padding


@dataclass(frozen=True)
class Job:
    """One job: a request, and for an edit its edit inputs (init image, mask, strength, outpaint, instruct)."""

    request: GenerationRequest
    edit: EditOptions | None = None


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
    lora_state: tuple = ()  # the LoRA set merged into the weights (a backend's graph cache key)
    adapters_active: bool = False  # hypernetworks / IP-Adapter in use (some backends cannot run them)


def _counting(on_progress: Callable[[int, int], None] | None) -> ProgressCallback | None:
    """An event callback for an older ``(done, total)`` callback."""
    if on_progress is None:
        return None
    return lambda event: on_progress(event.step, event.total)


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
        backend: str = "auto",
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
        # auto, torch, openvino or openvino-int8 (huabi.service.cpu_backend; auto's rules in
        # huabi.service.backend_choice); OpenVINO graphs are cached on disk.
        # preview: cheap | taesd:PATH | none (live previews for on_preview); vae_decoder: full | taesd:PATH;
        # vae_tiling: decode/encode large images in tiles (huabi.service.previews).
        self.backend = BackendChoice(backend, dtype=self.dtype, device=self.device, preview=preview,
                                     preview_every=preview_every, vae_decoder=vae_decoder, vae_tiling=vae_tiling)
        # SD3/FLUX (service/flow_jobs.py): separate clip_l/clip_g/t5xxl files, the loaded model, memory mode.
        self.text_encoder_files = {k: Path(v).expanduser() for k, v in (text_encoder_files or {}).items() if v}
        self._flow_loaded = None
        self._flow_lora = None  # the LoRA set merged into the loaded SD3/FLUX transformer (service/flow_plans.py)
        self.flow_low_memory = False
        self.flow_offload = False  # CUDA: transformer blocks streamed from host memory (set by the memory guard)

    # -- models -------------------------------------------------------------------

    def iter_models(self) -> Iterator[ModelEntry]:
        """Checkpoint files and diffusers folders under the models folder, sorted by path."""
        return iter_models(self.models_dir)

    def resolve_model_path(self, ref: str | None) -> Path:
        """A path, a name in the models folder, or an A1111 short hash; None is the built-in model."""
        return resolve_model_path(ref, self.models_dir)

    def load(self, model: str | None, vae: str | None = None, extra: tuple = ()) -> ModelBundle:
        path = self.resolve_model_path(model)
        vae_path = Path(vae).expanduser() if vae else None
        if vae_path is not None and not vae_path.exists():
            raise HuabiError(f"vae: {vae}: no such file")
        if is_flow_model(path):  # SD3/SD3.5/FLUX.1: their own loader (a FlowBundle), see service/flow_jobs.py
            return load_flow_for(self, path, vae_path, dict(extra))
        self._flow_loaded = None
        release_flow_loras(self)
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

    # -- jobs -----------------------------------------------------------------------

    def run(
        self,
        job: Job | GenerationRequest,
        *,
        out_dir: Path | None = None,
        on_event: ProgressCallback | None = None,
        cancel: Cancellation | None = None,
        rng: random.Random | None = None,
        on_saved: Callable[[GeneratedImage], None] | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> list[GeneratedImage]:
        """The one entry point: prepare ``job`` (every check, model and patch), then run its batches.

        Text to image, image to image, inpainting, outpainting and instruct edits are plans
        of the same batch loop (:meth:`prepare` picks one from ``job.edit``). PNGs go to
        ``out_dir`` when given; ``on_event`` receives a :class:`ProgressEvent` per sampling
        step; ``cancel`` stops the job early (interrupt: no more batches; skip: this batch).
        """
        job = job if isinstance(job, Job) else Job(job)
        images = self._edit_images(job.edit)  # a bad image fails before the slow model load
        bundle = self.load(job.request.model, job.request.vae, job.request.extra)
        prepared = self.prepare(job, rng=rng, bundle=bundle, images=images)
        return self._run_batches(prepared, out_dir=out_dir, on_event=on_event, cancel=cancel,
                                 on_saved=on_saved, on_preview=on_preview)

    @staticmethod
    def _edit_images(edit: EditOptions | None) -> tuple[Image.Image | None, Image.Image | None]:
        """An edit's init image and mask (mask stretched to the image), read and checked; (None, None) otherwise."""
        if edit is None:
            return None, None
        from huabi.service.images import load_image, load_mask

        image = load_image(edit.init_image, what="image")
        mask = load_mask(edit.mask_image, image.width, image.height) if edit.mask_image is not None else None
        return image, mask

    def generate(
        self,
        request: GenerationRequest,
        *,
        out_dir: Path | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        rng: random.Random | None = None,
        on_saved: Callable[[GeneratedImage], None] | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> list[GeneratedImage]:
        """Text to image (the older entry point): ``run(Job(request))`` with a ``(done, total)`` callback."""
        return self.run(Job(request), out_dir=out_dir, on_event=_counting(on_progress), rng=rng,
                        on_saved=on_saved, on_preview=on_preview)

    def edit(
        self,
        request: GenerationRequest,
        options: EditOptions,
        *,
        out_dir: Path | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        rng: random.Random | None = None,
        on_saved: Callable[[GeneratedImage], None] | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> list[GeneratedImage]:
        """An edit (the older entry point): ``run(Job(request, options))`` with a ``(done, total)`` callback."""
        return self.run(Job(request, options), out_dir=out_dir, on_event=_counting(on_progress), rng=rng,
                        on_saved=on_saved, on_preview=on_preview)

    def prepare(self, job: Job, *, rng: random.Random | None = None, bundle: ModelBundle | None = None,
                images: tuple[Image.Image | None, Image.Image | None] | None = None) -> PreparedJob:
        """Every check, model and patch of ``job``, before any sampling: an unsupported
        combination or a bad input fails here with one line, and nothing is written.
        ``bundle`` and ``images``: the model and edit images :meth:`run` has already read."""
        request = job.request.with_resolved_seed(rng)
        edit = job.edit
        image, mask = images if images is not None else self._edit_images(edit)
        if bundle is None:
            bundle = self.load(request.model, request.vae, request.extra)
        if isinstance(bundle, FlowBundle):  # SD3/FLUX: their plans and LoRA patch (service/flow_plans.py)
            extra: dict = {}
            plan, flow_patches = plan_flow(self, request, edit, bundle, image, mask, extra)
            return PreparedJob(bundle=bundle, request=request, recorded=plan.recorded, plan=plan,
                               embeddings=flow_embeddings(self, bundle), model_patches=tuple(flow_patches), extra=extra)
        refiner = self.refiner_stage(request, bundle) if edit is None else None
        lora = self.lora_patch(bundle, request)  # before any text encoding (text-encoder LoRA)
        if request.ip_adapter is not None:  # its modules are built on the UNet's device: weights must be there
            self.backend.need_torch_unet(releasable_unet(self, bundle))
        adapters = self.attention_adapters(bundle, request)  # hypernetworks, IP-Adapter: applied per batch
        model_patches: list[Patch] = [lora]
        if request.tile:  # circular padding in the UNet and the VAE decoder, per batch
            model_patches.append(ModelContextPatch(lambda b: circular_padding(b.unet, b.vae.decoder)))
        model_patches.append(ModelContextPatch(adapters.applied, adapters.infotext(request)))
        embeddings = self.embeddings_for(bundle)  # listed per job: files added meanwhile count
        extra = self._extra_infotext(bundle)
        if edit is None:
            plan = plan_txt2img(self, request, bundle, refiner, extra)
        else:
            plan = plan_edit(self, request, edit, bundle, image, mask, extra)
        # Record the schedule "Automatic" resolved to, so the infotext stays exact even if
        # a later huabi changes a sampler's default.
        recorded = plan.recorded
        if request.schedule == "Automatic":
            recorded = recorded.replace(schedule=default_schedule_for(request.sampler))
        return PreparedJob(
            bundle=bundle, request=request, recorded=recorded, plan=plan, embeddings=embeddings,
            model_patches=tuple(model_patches), extra=extra,
            lora_state=lora_state_key(lora.active), adapters_active=adapters.active,
        )

    def _run_batches(
        self,
        job: PreparedJob,
        *,
        out_dir: Path | None,
        on_event: ProgressCallback | None,
        cancel: Cancellation | None,
        on_saved: Callable[[GeneratedImage], None] | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> list[GeneratedImage]:
        """The batch loop every plan shares: enter the model patches, make one batch, then give each
        image its infotext (the recorded parameters + the patches' and plan's keys) and, with
        ``out_dir``, a PNG.

        Progress counts the plan's steps per batch, or the total each pipeline reports.
        The infotext size is the plan's, or the size the pipeline reports (hires: the
        first pass's, as A1111 records it).
        """
        request, plan = job.request, job.plan
        # The execution backend (torch, or OpenVINO graphs converted at first use) and the
        # precision, recorded when not the device's reference (always set: drops stale --from copies).
        run_bundle, backend_infotext = self.backend.job_bundle(
            job.bundle, request, lora_state=job.lora_state, adapters_active=job.adapters_active, device=self.device,
            on_the_fly_gguf=self.gguf_on_the_fly, weights=releasable_unet(self, job.bundle))
        previewer = self.backend.previewer(run_bundle) if on_preview is not None else None
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
                if previewer is not None and event.latent is not None and self.backend.preview_due(event.step, event.total):
                    per_batch = plan.steps_per_batch or event.total
                    on_preview(_index * per_batch + min(event.step, per_batch), per_batch * len(batches),
                               previewer(event.latent))
                if cancel is not None and cancel.should_stop():
                    raise StopSampling

            # Patches change the loaded modules in place (LoRA weights, padding, attention); the batch
            # runs on the backend's view of them (OpenVINO graphs, TAESD or tiled decoding).
            with patched_model(job.model_patches, job.bundle) as patched:
                batch_bundle = run_bundle if patched is job.bundle else patched
                result = plan.run_batch(batch_bundle, seeds, variation_seeds, on_step, job.embeddings)
            if cancel is not None:
                cancel.take_skip()  # a skip ends one batch only
            batch_extra = {**job.extra, **backend_infotext}
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
                if on_saved is not None:  # e.g. the CLI lists saved files even if a later batch is interrupted
                    on_saved(results[-1])
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
        tiled = self.backend.vae_tiling
        tile_px = TILE_LATENT * bundle.vae_scale_factor if tiled else None
        needed = estimate_peak_bytes(bundle, width_px, height_px, batch_size, self.dtype, vae_tile_px=tile_px)
        available = available_memory_bytes(self.device)
        if needed > available:
            raise HuabiError(
                f"size: {width_px}x{height_px} with batch size {batch_size} needs about "
                f"{needed / 2**30:.1f} GiB but {self.device} has {available / 2**30:.1f} GiB free; "
                "use a smaller size or batch" + ("" if tiled else " (or VAE tiling)")
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


