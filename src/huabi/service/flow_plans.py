"""SD3/SD3.5 and FLUX.1 jobs as plans of the engine's one batch loop (:meth:`Engine.run`).

:meth:`Engine.prepare` hands a loaded :class:`FlowBundle` to :func:`plan_flow`, which checks the
request against what these families support, builds the pipeline's :class:`FlowRequest` and returns
a :class:`BatchPlan` plus the job's patches, exactly as :mod:`huabi.service.plans` does for SD1/SDXL.
The engine's batch loop then does the rest for every family alike: progress events with the denoised
latent (previews), cancellation (interrupt/skip), the backend's VAE choice, infotext and PNGs.

* LoRA is a patch (:class:`FlowLoras`): the prompt's ``<lora:...>`` files merged into the
  transformer when the job is prepared, kept while following jobs ask for the same set (as A1111
  and the SD1/SDXL LoRA patch do), replaced or restored bit for bit when they do not.
* Hires fix (Forge runs it for FLUX and SD3): first pass at the request's size, upscale (a latent
  mode on the normalised 16-channel latent, or decode -> Lanczos / model upscaler -> encode), then
  the flow img2img path at the target size with ``hires_steps`` and ``hires_denoise``, same seeds
  (the second pass's noise is what a plain run at the target size starts from). The second pass
  follows A1111's "fixed steps" rule as SD1/SDXL's does (exactly ``hires_steps`` steps, the last of
  a flow schedule ``int(hires_steps / min(denoise, 0.999))`` steps long; FLUX dev's shift is the
  target size's), so one infotext means one schedule in every family.
* Edits: img2img, inpainting (white repainted), and with a FLUX.1 Fill model inpainting and
  outpainting as diffusers' ``FluxFillPipeline`` (mask and masked image as extra input channels).

Request mapping (Forge's conventions, so its PNGs and huabi's read each other): see
:mod:`huabi.service.flow_jobs`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from huabi.core.progress import ProgressEvent
from huabi.core.request import HIRES_LATENT_MODES, EditOptions, GenerationRequest
from huabi.errors import HuabiError
from huabi.models.flow_load import FlowBundle
from huabi.models.transformer_families import TransformerFamily
from huabi.pipelines.flow import FlowRequest, decode_latents, encode_image, flow_generate
from huabi.pipelines.hires import HiresPlan, crop_latent, hires_plan, lanczos_upscaler, upscale_latent
from huabi.pipelines.patches import HIRES_PASS, Patch
from huabi.service.plans import BatchPlan, hires_pixel_upscaler

if TYPE_CHECKING:
    from huabi.models.flow_lora import FlowLoraPatch
    from huabi.service.engine import Engine


@dataclass(frozen=True)
class FlowBatch:
    """One batch's images, as the engine's batch loop reads every pipeline's result."""

    images: list[Image.Image]
    seeds: list[int]
    width_px: int
    height_px: int
    embeddings_used: tuple[str, ...] = ()


# --------------------------------------------------------------------------- LoRA as a patch


@dataclass
class ActiveFlowLoras:
    """The LoRA set merged into a transformer now: the merge (to restore) and its key."""

    merge: FlowLoraPatch
    key: tuple
    hashes: str


class FlowLoras(Patch):
    """FLUX/SD3 LoRA files merged into the transformer (kohya and diffusers layouts); records ``Lora hashes``."""

    def __init__(self, hashes: str | None) -> None:
        self.hashes = hashes

    def infotext(self) -> dict[str, Any]:
        return {"Lora hashes": self.hashes}  # always set: a stale value from --from must not survive


def flow_lora_patch(engine: Engine, bundle: FlowBundle, request: GenerationRequest) -> FlowLoras:
    """Merge ``request``'s LoRA tags into ``bundle``'s transformer now (or keep the merge already
    there when it is the same set); without tags the base weights come back."""
    from huabi.core.prompt_parser import extract_extra_networks
    from huabi.models.flow_lora import FlowLoraPatch, lora_deltas
    from huabi.models.formats import read_state_dict
    from huabi.models.lora import lora_short_hash
    from huabi.service.adapters import lora_folders, lora_uses, parse_lora_hashes

    _, tags = extract_extra_networks(request.prompt)
    folders = lora_folders(engine.models_dir) + [engine.models_dir / "loras"]  # ComfyUI's folder name too
    uses = lora_uses(tags, folders, parse_lora_hashes(dict(request.extra).get("Lora hashes")))
    key = (id(bundle.transformer), tuple((str(use.path.resolve()), use.path.stat().st_mtime_ns, use.unet_weight)
                                         for use in uses))
    active: ActiveFlowLoras | None = getattr(engine, "_flow_lora", None)
    if active is not None and active.key == key:
        return FlowLoras(active.hashes)
    if active is not None:
        active.merge.restore()
        engine._flow_lora = None
    if not uses:
        return FlowLoras(None)
    merge = FlowLoraPatch(bundle.transformer)
    hashes = []
    try:
        for use in uses:
            tensors, metadata = read_state_dict(use.path)
            deltas, _report = lora_deltas(tensors, bundle.family, bundle.transformer, weight=use.unet_weight,
                                          source=use.path.name)
            merge.apply(deltas, source=use.path.name)
            hashes.append(f"{use.name}: {lora_short_hash(use.path, metadata)}")
    except BaseException:
        merge.restore()
        raise
    engine._flow_lora = ActiveFlowLoras(merge, key, ", ".join(hashes))
    return FlowLoras(engine._flow_lora.hashes)


def release_flow_loras(engine: Engine) -> None:
    """Forget the merged LoRA set (the model it was merged into is being dropped)."""
    engine._flow_lora = None


# --------------------------------------------------------------------------- the plans


def plan_flow(engine: Engine, request: GenerationRequest, edit: EditOptions | None, bundle: FlowBundle,
              image: Image.Image | None, mask: Image.Image | None, extra: dict) -> tuple[BatchPlan, list[Patch]]:
    """The plan and patches of one SD3/FLUX job (``request`` has its seed resolved)."""
    patches: list[Patch] = [flow_lora_patch(engine, bundle, request)]  # before any text encoding
    if edit is None:
        if bundle.family is TransformerFamily.FLUX_FILL:
            raise HuabiError("FLUX.1 Fill: it edits an image through a mask; use huabi edit IMAGE --mask MASK "
                             "(or --outpaint)")
        return plan_flow_txt2img(engine, request, bundle, extra), patches
    return plan_flow_edit(engine, request, edit, bundle, image, mask, extra), patches


def _flow_request(request: GenerationRequest, bundle: FlowBundle, width_px: int, height_px: int,
                  extra: dict) -> tuple[FlowRequest, GenerationRequest]:
    from huabi.service.flow_jobs import flow_request

    flow, flow_extra, cfg_ran = flow_request(request, bundle, width_px, height_px)
    extra.update(flow_extra)
    return flow, request.replace(cfg_scale=cfg_ran, schedule=flow.schedule)


def _flow_hires_plan(request: GenerationRequest, width_px: int, height_px: int) -> HiresPlan:
    """Where the upscale goes; flow latents are patched 2x2, so every size is a multiple of 16."""
    if request.hires_resize_px is not None:
        target_w, target_h = request.hires_resize_px
        if target_w % 16 or target_h % 16:
            raise HuabiError(f"hires resize: {target_w}x{target_h} must be multiples of 16 for SD3/FLUX "
                             "(8-pixel latents in 2x2 patches)")
        return hires_plan(request, width_px, height_px, 8)
    target_w, target_h = request.hires_target_px(width_px, height_px, 16)
    return HiresPlan(target_w, target_h, 0, 0, target_w, target_h)


def plan_flow_txt2img(engine: Engine, request: GenerationRequest, bundle: FlowBundle, extra: dict) -> BatchPlan:
    width_px = request.width_px or bundle.native_size_px
    height_px = request.height_px or bundle.native_size_px
    flow, recorded = _flow_request(request, bundle, width_px, height_px, extra)
    if not request.hires:
        def run_batch(job_bundle, seeds, variation_seeds, on_step, embeddings):
            result = flow_generate(job_bundle, flow, seeds, device=engine.device, on_event=on_step,
                                   embeddings=embeddings)
            return FlowBatch(result.images, result.seeds, width_px, height_px, result.embeddings_used)

        return BatchPlan(run_batch, recorded=recorded, steps_per_batch=request.steps)

    plan = _flow_hires_plan(request, width_px, height_px)
    pixel_upscaler = hires_pixel_upscaler(engine, request)
    hires_steps = request.hires_steps or request.steps
    total = request.steps + hires_steps
    # FLUX dev's shift follows the second pass's size (family_shift reads it from this request).
    second = dataclasses.replace(flow, steps=hires_steps, width_px=plan.target_w_px, height_px=plan.target_h_px)

    def run_batch(job_bundle, seeds, variation_seeds, on_step, embeddings):
        def first_step(event: ProgressEvent) -> None:
            on_step(ProgressEvent(min(event.step, request.steps), total, phase=event.phase, latent=event.latent))

        def second_step(event: ProgressEvent) -> None:
            done = request.steps + round(event.step * hires_steps / max(event.total, 1))
            on_step(ProgressEvent(done, total, phase=HIRES_PASS, latent=event.latent))

        latents = flow_hires_upscale(
            job_bundle, flow_generate(job_bundle, flow, seeds, device=engine.device, on_event=first_step,
                                      decode=False, embeddings=embeddings).latents,
            request.hires_upscaler, plan, pixel_upscaler, engine.device)
        result = flow_generate(job_bundle, second, seeds, device=engine.device, init_latent=latents,
                               strength=float(request.hires_denoise), on_event=second_step, phase=HIRES_PASS,
                               embeddings=embeddings, fixed_steps=True)
        return FlowBatch(result.images, result.seeds, width_px, height_px, result.embeddings_used)

    return BatchPlan(run_batch, recorded=recorded, steps_per_batch=total, infotext_size=(width_px, height_px))


def flow_hires_upscale(bundle: FlowBundle, latents: torch.Tensor, upscaler: str, plan: HiresPlan,
                       pixel_upscaler: Callable[[Image.Image, int, int], Image.Image] | None,
                       device: torch.device) -> torch.Tensor:
    """The hires fix's step 2 for flow latents: to the cover size, then cropped to the target."""
    factor = bundle.vae_scale_factor
    if upscaler in HIRES_LATENT_MODES:
        latents = upscale_latent(latents.float(), plan.upscale_h_px // factor, plan.upscale_w_px // factor, upscaler)
    else:
        resize = pixel_upscaler or lanczos_upscaler
        images = [resize(image, plan.upscale_w_px, plan.upscale_h_px) for image in decode_latents(bundle, latents)]
        latents = torch.cat([encode_image(bundle, image, device) for image in images])
    latents = crop_latent(latents, plan.crop_h_cells, plan.crop_w_cells)
    return latents[:, :, : plan.target_h_px // factor, : plan.target_w_px // factor]


def plan_flow_edit(engine: Engine, request: GenerationRequest, options: EditOptions, bundle: FlowBundle,
                   image: Image.Image, mask: Image.Image | None, extra: dict) -> BatchPlan:
    """img2img / inpainting for SD3/FLUX: the init image at the working size (multiples of 16), the
    sampler starting at the sigma ``options.denoising_strength`` selects; white mask areas repainted.
    A FLUX.1 Fill model inpaints and outpaints with the mask as its input (see :mod:`huabi.pipelines.flow`)."""
    from PIL import ImageFilter, ImageOps

    fill = bundle.family is TransformerFamily.FLUX_FILL
    if getattr(options, "instruct", False):
        raise HuabiError(f"edit: instruct editing is not supported for {bundle.family.label}")
    if options.outpaint is not None and not fill:
        raise HuabiError(f"edit: outpainting needs a FLUX.1 Fill model for {bundle.family.label} "
                         "(e.g. flux1-fill-dev.safetensors)")
    if fill and mask is None and options.outpaint is None:
        raise HuabiError("FLUX.1 Fill: give a mask (--mask MASK) or --outpaint; the model repaints only masked areas")
    work_w = request.width_px or max(16, image.width // 16 * 16)
    work_h = request.height_px or max(16, image.height // 16 * 16)
    image = image.convert("RGB").resize((work_w, work_h), Image.LANCZOS)
    extra["Denoising strength"] = options.denoising_strength
    if mask is not None:
        mask = mask.convert("L").resize((work_w, work_h), Image.LANCZOS)
        if options.invert_mask:
            mask = ImageOps.invert(mask)
            extra["Mask mode"] = "Inpaint not masked"
    if options.outpaint is not None:
        from huabi.pipelines.inpaint import outpaint_canvas

        image, mask = outpaint_canvas(image, options, request.seed)
        work_w, work_h = image.size
        if work_w % 16 or work_h % 16:
            raise HuabiError(f"outpaint: the canvas {work_w}x{work_h} must be multiples of 16 for "
                             f"{bundle.family.label}; extend by multiples of 16")
        extra["Outpaint"] = ",".join(
            f"{side}={value}" for side, value in zip(("left", "right", "up", "down"), options.outpaint) if value)
    if mask is not None:
        if options.mask_blur_px:
            mask = mask.filter(ImageFilter.GaussianBlur(options.mask_blur_px))
        extra["Mask blur"] = options.mask_blur_px
    flow, recorded = _flow_request(request.replace(width_px=work_w, height_px=work_h), bundle, work_w, work_h, extra)

    soft_mask = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0) if mask is not None else None

    def run_batch(job_bundle, seeds, variation_seeds, on_step, embeddings):
        result = flow_generate(job_bundle, flow, seeds, device=engine.device, init_image=image, mask=mask,
                               strength=options.denoising_strength, on_event=on_step, embeddings=embeddings)
        images = result.images
        if soft_mask is not None:  # paste back: the unmasked part is the original's pixels (A1111/Forge)
            from huabi.pipelines.inpaint import composite

            images = [composite(image, piece, soft_mask, None) for piece in images]
        return FlowBatch(images, result.seeds, work_w, work_h, result.embeddings_used)

    return BatchPlan(run_batch, recorded=recorded, infotext_size=(work_w, work_h))


def flow_embeddings(engine: Engine, bundle: FlowBundle):
    """The embeddings folder as SD3/FLUX's CLIP towers see it (Forge: textual inversion reaches the CLIP
    encoders, not T5): FLUX reads SD1-style files (one 768-wide set for CLIP-L), SD3 SDXL-style files
    (``clip_l`` + ``clip_g`` sets). Widths come from the loaded towers, or in low-memory mode from the
    transformer's pooled width (FLUX: CLIP-L's; SD3: CLIP-L's 768 + CLIP-G's rest)."""
    from huabi.core.family import ModelFamily
    from huabi.models.embeddings import EmbeddingLibrary, list_embedding_files, text_encoder_widths

    encoders = bundle.text_encoders
    if encoders is not None:
        towers = [encoders.clip_l] if bundle.family.is_flux else [encoders.clip_l, encoders.clip_g]
        widths = text_encoder_widths(towers)
    else:
        pooled = int(bundle.transformer.config.pooled_projection_dim)
        widths = [pooled] if bundle.family.is_flux else [768, pooled - 768]
    family = ModelFamily.SD1 if bundle.family.is_flux else ModelFamily.SDXL
    return EmbeddingLibrary(list_embedding_files(engine.embeddings_dir), family=family, encoder_widths=widths)
