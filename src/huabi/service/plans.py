"""What each kind of job runs per batch: the plans of the one batch loop (:meth:`Engine.run`).

Text to image (with the hires fix) and edits (img2img, inpainting, outpainting, instruct) are
plans of the same denoise: each plan fixes the working size, checks memory, adds the patches and
infotext keys of its kind, and returns a :class:`BatchPlan` whose ``run_batch`` calls the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from PIL import Image

from huabi.core.family import UNetVariant
from huabi.core.progress import ProgressEvent
from huabi.core.request import EditOptions, GenerationRequest, is_upscaler_path
from huabi.errors import HuabiError
from huabi.models.bundle import ModelBundle
from huabi.models.embeddings import EmbeddingLibrary
from huabi.pipelines.common import noise_variation
from huabi.pipelines.hires import PixelUpscaler, hires_txt2img
from huabi.pipelines.instruct import check_instruct_model, instruct_pix2pix
from huabi.pipelines.patches import FIRST_PASS, Patch, RefinerPatch, refiner_passes
from huabi.pipelines.refiner import RefinerStage, refiner_infotext
from huabi.pipelines.txt2img import txt2img

if TYPE_CHECKING:
    from huabi.service.engine import Engine


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


def hires_pixel_upscaler(engine: Engine, request: GenerationRequest) -> PixelUpscaler | None:
    """The image resizer for a pixel-space hires upscaler: None (Lanczos) unless it is a model file."""
    if not is_upscaler_path(request.hires_upscaler):
        return None
    from huabi.models.upscalers import load_upscaler
    from huabi.service.upscale import upscale_with_model

    path = Path(request.hires_upscaler).expanduser()
    if not path.is_file():
        raise HuabiError(f"hires upscaler: {request.hires_upscaler}: no such file")
    model = load_upscaler(path, device=engine.device)
    device = engine.device

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


def plan_txt2img(engine: Engine, request: GenerationRequest, bundle: ModelBundle, refiner: RefinerStage | None,
                  extra: dict) -> BatchPlan:
    width_px = request.width_px or bundle.native_size_px
    height_px = request.height_px or bundle.native_size_px
    engine.check_memory(bundle, width_px, height_px, request.batch_size)
    pixel_upscaler = hires_pixel_upscaler(engine, request) if request.hires else None
    if request.hires:
        hires_w, hires_h = request.hires_target_px(width_px, height_px, bundle.vae_scale_factor)
        engine.check_memory(bundle, hires_w, hires_h, request.batch_size)
    patches: list[Patch] = []
    refiner_keys = refiner_infotext(refiner, request.refiner_hires_pass if request.hires else None)
    if refiner is not None:
        passes = refiner_passes(request.refiner_hires_pass) if request.hires else (FIRST_PASS,)
        patches.append(RefinerPatch(refiner, passes, refiner_keys))
    extra.update(refiner_keys)
    control = engine.control_patch(bundle, request)  # models loaded and maps made once per job
    if control is not None:
        patches.insert(0, control)
        extra.update(control.infotext())
    steps = request.steps + ((request.hires_steps or request.steps) if request.hires else 0)

    def run_batch(job_bundle, seeds, variation_seeds, on_step, embeddings):
        if request.hires:
            return hires_txt2img(job_bundle, request, seeds, device=engine.device, on_step=on_step,
                                 embeddings=embeddings, variation_seeds=variation_seeds,
                                 pixel_upscaler=pixel_upscaler, patches=patches)
        return txt2img(job_bundle, request, seeds, device=engine.device, on_step=on_step, embeddings=embeddings,
                       variation_seeds=variation_seeds, patches=patches)

    return BatchPlan(run_batch, recorded=request, steps_per_batch=steps)

def plan_edit(engine: Engine, request: GenerationRequest, options: EditOptions, bundle: ModelBundle,
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
    engine.check_memory(bundle, work_w, work_h, request.batch_size)
    # InstructPix2Pix models always edit by instruction (as in A1111); --instruct insists on one.
    instruct = options.instruct or bundle.variant is UNetVariant.INSTRUCT_PIX2PIX
    if instruct:
        check_instruct_model(bundle)
        if mask is not None:
            raise HuabiError(f"instruct: {bundle.name} is an InstructPix2Pix model; it edits whole images "
                             "(no --mask or --outpaint)")
        extra["Image CFG scale"] = options.image_cfg_scale
    patches: list[Patch] = []
    refiner = engine.refiner_stage(request, bundle)
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
    control = engine.control_patch(bundle, request, fallback_image=image, fallback_mask=mask, crop=control_crop)
    if control is not None:
        patches.insert(0, control)
        extra.update(control.infotext())

    def run_batch(job_bundle, seeds, variation_seeds, on_step, embeddings):
        variation = noise_variation(bundle, request, variation_seeds)
        if instruct:
            return instruct_pix2pix(job_bundle, request, image, seeds, image_cfg_scale=options.image_cfg_scale,
                                    denoising_strength=options.denoising_strength, device=engine.device,
                                    on_step=on_step, embeddings=embeddings, variation=variation,
                                    patches=patches)
        if mask is None:
            return img2img(job_bundle, request, image, seeds, denoising_strength=options.denoising_strength,
                           device=engine.device, on_step=on_step, embeddings=embeddings, variation=variation,
                           patches=patches)
        return inpaint(job_bundle, request, image, mask, seeds, options, device=engine.device, on_step=on_step,
                       embeddings=embeddings, working_size=(work_w, work_h) if only_masked else None,
                       variation=variation, patches=patches)

    return BatchPlan(run_batch, recorded=request.replace(width_px=work_w, height_px=work_h),
                     infotext_size=(work_w, work_h))
