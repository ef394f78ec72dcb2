"""SD3/SD3.5 and FLUX.1 generation, as numbered steps: check -> encode -> latents -> denoise -> decode.

One function serves txt2img, img2img (``init_image`` + ``strength``: the sampler starts at the sigma
the strength selects) and inpainting (``mask``: white is repainted; outside the mask the denoised
estimate is the original latent at every step, and the final latent keeps the original there).

Conditioning follows diffusers' pipelines (the reference the tests compare against):

* SD3: CLIP-L and CLIP-G penultimate hidden states side by side (768 + 1280), zero-padded to T5's
  width and followed by T5's 256 tokens (256 zero tokens when T5 is absent, as the seed describes);
  pooled = projected CLIP-L ++ projected CLIP-G. CFG with the negative prompt at ``cfg_scale``.
* FLUX: CLIP-L's pooled output (no projection) and T5's tokens (512 for dev, 256 for schnell);
  dev takes the distilled guidance value as an input ("Distilled CFG Scale", default 3.5); real CFG
  with the negative prompt runs when ``cfg_scale > 1`` (diffusers' ``true_cfg_scale``).

Noise is drawn on the CPU per image from its seed, so image i of a batch equals a single run with
seed + i. Text encoders are asked for once per call (``bundle.encoders()``) and dropped before
denoising when the bundle does not keep them (low-memory mode).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from huabi.core.flow import (
    FLOW_SCHEDULES,
    SD3_SHIFT,
    cfg_combine,
    flow_sigmas,
    flux_shift_for,
    get_flow_sampler,
    start_index_for_strength,
    velocity_denoiser,
)
from huabi.core.noise import SeededNoiseSampler, initial_noise
from huabi.errors import HuabiError
from huabi.models.flow_load import (
    T5_MAX_LENGTH_FLUX_DEV,
    T5_MAX_LENGTH_FLUX_SCHNELL,
    T5_MAX_LENGTH_SD3,
    FlowBundle,
    FlowTextEncoders,
)
from huabi.models.transformer_families import TransformerFamily

CLIP_MAX_LENGTH = 77
FLUX_DEFAULT_GUIDANCE = 3.5


@dataclass(frozen=True)
class FlowRequest:
    """What one SD3/FLUX generation needs (validated at construction)."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 1.0  # SD3: CFG scale (Forge default 7 for SD3 files is the user's choice); FLUX: real CFG if > 1
    sampler: str = "Euler"
    schedule: str = "Simple"
    width_px: int = 1024
    height_px: int = 1024
    distilled_guidance: float = FLUX_DEFAULT_GUIDANCE  # FLUX dev/Fill guidance embedding
    shift: float | None = None  # None: the family's (SD3 3.0, FLUX dev by resolution, schnell 1.0)
    max_t5_tokens: int | None = None  # None: the family's (SD3 256, FLUX dev 512, schnell 256)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise HuabiError(f"steps: must be >= 1, got {self.steps}")
        get_flow_sampler(self.sampler)
        if self.schedule not in FLOW_SCHEDULES:
            raise HuabiError(f"schedule: {self.schedule!r} is not a flow-matching schedule; valid: {', '.join(FLOW_SCHEDULES)}")
        for name in ("width_px", "height_px"):
            value = getattr(self, name)
            if value < 16 or value % 16:
                raise HuabiError(f"{name}: must be a multiple of 16 (8-pixel latents in 2x2 patches) and >= 16, got {value}")
        if self.cfg_scale < 0:
            raise HuabiError(f"cfg_scale: must be >= 0, got {self.cfg_scale}")
        if self.shift is not None and not self.shift > 0:
            raise HuabiError(f"shift: must be > 0, got {self.shift}")


def family_shift(family: TransformerFamily, request: FlowRequest) -> float:
    if request.shift is not None:
        return float(request.shift)
    if family is TransformerFamily.FLUX_SCHNELL:
        return 1.0
    if family.is_flux:
        return flux_shift_for(request.width_px, request.height_px)
    return SD3_SHIFT


def t5_length(family: TransformerFamily, request: FlowRequest) -> int:
    if request.max_t5_tokens is not None:
        return request.max_t5_tokens
    if family is TransformerFamily.FLUX_SCHNELL:
        return T5_MAX_LENGTH_FLUX_SCHNELL
    return T5_MAX_LENGTH_FLUX_DEV if family.is_flux else T5_MAX_LENGTH_SD3


# --------------------------------------------------------------------------- tokenizers


def clip_tokenizer(pad_with_eos: bool):
    from huabi.models.tokenizer import EOS_TOKEN, OPEN_CLIP_PAD_TOKEN, load_clip_tokenizer

    return load_clip_tokenizer(pad_token=EOS_TOKEN if pad_with_eos else OPEN_CLIP_PAD_TOKEN)


def t5_tokenizer():
    """T5's SentencePiece vocabulary from huabi's assets (``tokenizers`` JSON form; offline)."""
    from importlib import resources

    from transformers import T5TokenizerFast

    path = resources.files("huabi") / "assets" / "t5_tokenizer" / "tokenizer.json"
    return T5TokenizerFast(tokenizer_file=str(path), eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0, model_max_length=512)


def _ids(tokenizer, texts: list[str], length: int, device) -> torch.Tensor:
    batch = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return batch.input_ids.to(device)


# --------------------------------------------------------------------------- conditioning


@dataclass(frozen=True)
class FlowConditioning:
    tokens: torch.Tensor  # [B, seq, joint_dim]
    pooled: torch.Tensor  # [B, pooled_dim]


def _clip_outputs(model, ids: torch.Tensor):
    return model(input_ids=ids, output_hidden_states=True)


@torch.inference_mode()
def encode_sd3(encoders: FlowTextEncoders, texts: list[str], *, t5_tokens: int, joint_dim: int, device, dtype) -> FlowConditioning:
    clip_states, pooled = [], []
    for model, pad_with_eos in ((encoders.clip_l, True), (encoders.clip_g, False)):
        out = _clip_outputs(model, _ids(clip_tokenizer(pad_with_eos), texts, CLIP_MAX_LENGTH, device))
        pooled.append(out.text_embeds)
        clip_states.append(out.hidden_states[-2])
    clip = torch.cat(clip_states, dim=-1)
    if encoders.t5 is not None:
        t5 = encoders.t5(_ids(t5_tokenizer(), texts, t5_tokens, device))[0]
    else:  # SD3 without T5: zero tokens where T5's would be (diffusers: max_sequence_length of them)
        t5 = torch.zeros(len(texts), t5_tokens, joint_dim, device=device, dtype=clip.dtype)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return FlowConditioning(torch.cat([clip, t5.to(clip.dtype)], dim=-2).to(dtype), torch.cat(pooled, dim=-1).to(dtype))


@torch.inference_mode()
def encode_flux(encoders: FlowTextEncoders, texts: list[str], *, t5_tokens: int, device, dtype) -> FlowConditioning:
    if encoders.t5 is None:
        raise HuabiError("FLUX needs the T5-XXL text encoder (pass --t5xxl, e.g. t5xxl_fp16.safetensors)")
    clip = encoders.clip_l
    inner = getattr(clip, "text_model", clip)  # FLUX reads CLIP-L's pooled output before any projection
    pooled = inner(input_ids=_ids(clip_tokenizer(True), texts, CLIP_MAX_LENGTH, device)).pooler_output
    t5 = encoders.t5(_ids(t5_tokenizer(), texts, t5_tokens, device))[0]
    return FlowConditioning(t5.to(dtype), pooled.to(dtype))


# --------------------------------------------------------------------------- FLUX latent packing


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: FLUX's 2x2 patches as tokens."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def latent_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """[(H/2)(W/2), 3] RoPE positions of the image tokens: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------- the model call


def flow_model_call(bundle: FlowBundle, cond: FlowConditioning, uncond: FlowConditioning | None, request: FlowRequest,
                    latent_hw: tuple[int, int]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(x [B,16,h,w], sigma [B]) -> velocity``, with CFG / distilled guidance as the family uses them."""
    transformer = bundle.transformer
    family = bundle.family
    dtype = bundle.dtype
    h, w = latent_hw
    use_cfg = uncond is not None

    if family.is_flux:
        device = cond.tokens.device
        img_ids = latent_image_ids(h, w, device, dtype)
        txt_ids = torch.zeros(cond.tokens.shape[1], 3, device=device, dtype=dtype)
        guided = bool(transformer.config.guidance_embeds)

        def run(x: torch.Tensor, sigma: torch.Tensor, c: FlowConditioning) -> torch.Tensor:
            batch = x.shape[0]
            timestep = (sigma.float() * 1000).to(dtype) / 1000
            guidance = torch.full((batch,), float(request.distilled_guidance), device=x.device, dtype=torch.float32) if guided else None
            out = transformer(
                hidden_states=pack_latents(x).to(dtype), timestep=timestep, guidance=guidance,
                pooled_projections=c.pooled.expand(batch, -1) if c.pooled.shape[0] == 1 else c.pooled,
                encoder_hidden_states=c.tokens, txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
            )[0]
            return unpack_latents(out, h, w).to(x.dtype)

        def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                v = run(x, sigma, cond)
                if use_cfg:
                    v = cfg_combine(v, run(x, sigma, uncond), request.cfg_scale)
            return v

        return velocity

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            timestep = sigma.float() * 1000
            if use_cfg:  # one batch [uncond, cond], as diffusers' SD3 pipeline runs it
                tokens = torch.cat([uncond.tokens, cond.tokens])
                pooled = torch.cat([uncond.pooled, cond.pooled])
                out = transformer(hidden_states=torch.cat([x, x]).to(dtype), timestep=torch.cat([timestep, timestep]),
                                  encoder_hidden_states=tokens, pooled_projections=pooled, return_dict=False)[0]
                v_uncond, v_cond = out.chunk(2)
                return cfg_combine(v_cond, v_uncond, request.cfg_scale).to(x.dtype)
            return transformer(hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=cond.tokens,
                               pooled_projections=cond.pooled, return_dict=False)[0].to(x.dtype)

    return velocity


# --------------------------------------------------------------------------- VAE


def encode_image(bundle: FlowBundle, image: Image.Image, device) -> torch.Tensor:
    """RGB image -> normalised latent [1, 16, h, w] (the distribution's mean, as A1111/Forge use)."""
    vae = bundle.vae
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1)[None].to(device=device, dtype=next(vae.parameters()).dtype)
    with torch.inference_mode():
        mean = vae.encode(pixels).latent_dist.mean
    config = vae.config
    return ((mean.float() - config.shift_factor) * config.scaling_factor)


def decode_latents(bundle: FlowBundle, latents: torch.Tensor) -> list[Image.Image]:
    from huabi.pipelines.common import to_pil

    vae = bundle.vae
    config = vae.config
    images = []
    with torch.inference_mode():
        for one in latents.split(1):
            scaled = one / config.scaling_factor + config.shift_factor
            decoded = vae.decode(scaled.to(next(vae.parameters()).dtype), return_dict=False)[0]
            images.append(to_pil(decoded[0]))
    return images


# --------------------------------------------------------------------------- the pipeline


@dataclass(frozen=True)
class FlowResult:
    images: list[Image.Image]
    latents: torch.Tensor  # final latents, normalised (before the VAE)
    seeds: list[int]
    sigmas: torch.Tensor  # the schedule that ran
    shift: float


def flow_generate(
    bundle: FlowBundle,
    request: FlowRequest,
    seeds: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    init_image: Image.Image | None = None,
    strength: float = 1.0,
    mask: Image.Image | None = None,
    on_step: Callable[[int, int], None] | None = None,
    decode: bool = True,
) -> FlowResult:
    device = torch.device(device)
    family = bundle.family
    if family is TransformerFamily.FLUX_FILL:
        raise HuabiError("FLUX.1 Fill runs through the inpainting job with a mask and an image (not supported in this pipeline yet)")

    # 1. Check sizes and build the schedule.
    scale = bundle.vae_scale_factor
    h, w = request.height_px // scale, request.width_px // scale
    max_patches = getattr(bundle.transformer.config, "pos_embed_max_size", None)  # SD3's learned positions
    if max_patches and max(h, w) > 2 * max_patches:
        raise HuabiError(f"size: {request.width_px}x{request.height_px} is larger than this model's position "
                         f"embedding covers (at most {2 * max_patches * scale} px per side)")
    shift = family_shift(family, request)
    sigmas = flow_sigmas(request.steps, shift=shift, schedule=request.schedule)
    if init_image is not None:
        if init_image.size != (request.width_px, request.height_px):
            init_image = init_image.convert("RGB").resize((request.width_px, request.height_px), Image.LANCZOS)
        sigmas = sigmas[start_index_for_strength(request.steps, strength):]
    elif mask is not None:
        raise HuabiError("inpainting needs an init image")

    # 2. Encode the prompt (and the negative prompt when CFG runs), then let the encoders go.
    dtype = bundle.dtype
    texts = [request.prompt]
    use_cfg = request.cfg_scale > 1.0
    if use_cfg:
        texts.append(request.negative_prompt)
    encoders = bundle.encoders()
    if family.is_flux:
        conds = encode_flux(encoders, texts, t5_tokens=t5_length(family, request), device=device, dtype=dtype)
    else:
        conds = encode_sd3(encoders, texts, t5_tokens=t5_length(family, request),
                           joint_dim=int(bundle.transformer.config.joint_attention_dim), device=device, dtype=dtype)
    del encoders
    if bundle.text_encoders is None:  # low-memory mode: the encoders go before the transformer runs
        gc.collect()
    cond = FlowConditioning(conds.tokens[:1], conds.pooled[:1])
    uncond = FlowConditioning(conds.tokens[1:], conds.pooled[1:]) if use_cfg else None
    batch = len(seeds)
    cond = FlowConditioning(cond.tokens.expand(batch, -1, -1), cond.pooled.expand(batch, -1))
    if uncond is not None:
        uncond = FlowConditioning(uncond.tokens.expand(batch, -1, -1), uncond.pooled.expand(batch, -1))

    # 3. Seeded noise (CPU, per image), mixed with the init latent for img2img.
    shape = (bundle.latent_channels, h, w)
    work_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # sampler arithmetic
    noise = initial_noise(seeds, shape, device=device, dtype=work_dtype)
    init_latent = None
    sigma_start = float(sigmas[0])
    if init_image is not None:
        init_latent = encode_image(bundle, init_image, device).to(work_dtype).expand(batch, -1, -1, -1)
        x = (1.0 - sigma_start) * init_latent + sigma_start * noise
    else:
        x = noise * sigma_start

    # 4. Denoise.
    name, sampler = get_flow_sampler(request.sampler)
    denoiser = velocity_denoiser(flow_model_call(bundle, cond, uncond, request, (h, w)))
    latent_mask = None
    if mask is not None:
        mask_array = np.asarray(mask.convert("L").resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
        latent_mask = torch.from_numpy(mask_array)[None, None].to(device)
        inner = denoiser

        def denoiser(x_in: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:  # noqa: F811 - the masked wrapper
            return latent_mask * inner(x_in, sigma) + (1 - latent_mask) * init_latent

    noise_sampler = SeededNoiseSampler(seeds, shape, device=device, dtype=work_dtype) if name == "Euler a" else None

    def step_callback(i: int, total: int, _x, _denoised) -> None:
        if on_step is not None:
            on_step(i + 1, total)

    latents = sampler(denoiser, x, sigmas.to(work_dtype), noise=noise_sampler, on_step=step_callback)
    if latent_mask is not None:
        latents = latent_mask * latents + (1 - latent_mask) * init_latent

    # 5. Decode.
    images = decode_latents(bundle, latents) if decode else []
    return FlowResult(images=images, latents=latents, seeds=list(seeds), sigmas=sigmas, shift=shift)
