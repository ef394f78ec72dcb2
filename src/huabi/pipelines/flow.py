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
from huabi.core.progress import ProgressEvent, StopSampling
from huabi.errors import HuabiError
from huabi.models.flow_load import (
    T5_MAX_LENGTH_FLUX_DEV,
    T5_MAX_LENGTH_FLUX_SCHNELL,
    T5_MAX_LENGTH_SD3,
    FlowBundle,
    FlowTextEncoders,
)
from huabi.models.transformer_families import TransformerFamily
from huabi.pipelines.common import fixed_steps_schedule_length

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


def fixed_steps_flow_sigmas(steps: int, strength: float, *, shift: float, schedule: str = "Simple") -> torch.Tensor:
    """The hires fix's second-pass schedule by A1111's "fixed steps" rule, as SD1/SDXL run it
    (:func:`huabi.pipelines.common.fixed_steps_schedule_length`): the last ``steps`` + 1 sigmas of a
    flow schedule ``int(steps / min(strength, 0.999))`` steps long, so exactly ``steps`` steps run and
    one infotext means one schedule whatever the family. Strength 0: ``[0]`` (the input comes back,
    as SD1/SDXL's second pass at strength 0)."""
    if strength == 0:
        return torch.zeros(1, dtype=torch.float64)
    length = fixed_steps_schedule_length(steps, strength)
    return flow_sigmas(length, shift=shift, schedule=schedule)[length - steps:]


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
    return weighted_ids(tokenizer, texts, length, device)[0]


@dataclass
class PromptRows:
    """One encoder's input for a batch of prompts: ids, emphasis multipliers, and where textual-inversion
    vectors replace token embeddings (``(row, start, vectors)``); ``used`` embedding names, in order."""

    ids: torch.Tensor
    weights: torch.Tensor
    splices: list[tuple[int, int, torch.Tensor]]
    used: list[str]


def weighted_ids(tokenizer, texts: list[str], length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, length] and per-token emphasis multipliers [B, length] of ``texts``, Forge's way:
    A1111's ``(word:1.2)`` / ``[word]`` syntax is parsed, each run tokenized on its own and given its
    weight, then the tokenizer's special tokens and padding are added (``BREAK`` is dropped). A prompt
    without emphasis gives exactly the tokenizer's own ids (what diffusers feeds the encoders)."""
    rows = prompt_rows(tokenizer, texts, length, device)
    return rows.ids, rows.weights


def prompt_rows(tokenizer, texts: list[str], length: int, device, embeddings=None, encoder_index: int = 0) -> PromptRows:
    """:func:`weighted_ids` plus textual inversion (A1111/Forge): an embedding's name, matched within
    one run of the prompt, becomes its vectors for this encoder (``embeddings[name][encoder_index]``)."""
    from huabi.core.conditioning import EmbeddingNameIndex
    from huabi.core.prompt_parser import parse_prompt_attention

    names = EmbeddingNameIndex(tokenizer, embeddings)
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    room = length - len(bos) - 1
    # Placeholder ids for embedding vectors: never EOS (CLIP pools at the first EOS; CLIP-L pads with it).
    placeholder = bos[0] if bos else tokenizer.pad_token_id
    all_ids, all_weights, splices, used = [], [], [], []
    for row, text in enumerate(texts):
        ids: list[int] = []
        weights: list[float] = []
        for run_text, weight in parse_prompt_attention(text):
            if weight == -1.0 and run_text == "BREAK":
                continue
            run_ids = tokenizer(run_text, add_special_tokens=False).input_ids
            position = 0
            while position < len(run_ids):
                found = names.match(run_ids, position)
                if found is None:
                    ids.append(run_ids[position])
                    weights.append(float(weight))
                    position += 1
                    continue
                name, consumed = found
                vectors = embeddings[name][encoder_index]
                if len(bos) + len(ids) + vectors.shape[0] <= room + len(bos):
                    splices.append((row, len(bos) + len(ids), vectors))
                used.append(name)
                ids += [placeholder] * vectors.shape[0]  # replaced by the vectors
                weights += [float(weight)] * vectors.shape[0]
                position += consumed
        ids = bos + ids[:room] + [tokenizer.eos_token_id]
        weights = [1.0] * len(bos) + weights[:room] + [1.0]
        ids += [tokenizer.pad_token_id] * (length - len(ids))
        weights += [1.0] * (length - len(weights))
        all_ids.append(ids)
        all_weights.append(weights)
    return PromptRows(torch.tensor(all_ids, device=device), torch.tensor(all_weights, device=device), splices,
                      list(dict.fromkeys(used)))


def run_with_vectors(model, rows: PromptRows, token_embedding=None, **kwargs):
    """``model(input_ids=rows.ids, **kwargs)`` with the textual-inversion vectors in place of their
    placeholders' token embeddings (a forward hook on the token embedding for this one call;
    ``token_embedding`` defaults to ``model.get_input_embeddings()``)."""
    if not rows.splices:
        return model(input_ids=rows.ids, **kwargs)

    fired = []

    def splice(_module, args, output):
        ids = args[0] if args else None
        # the model may pass a view of our ids (same storage): anything else is another caller's call
        if not isinstance(ids, torch.Tensor) or ids.data_ptr() != rows.ids.data_ptr() or ids.numel() != rows.ids.numel():
            return None
        fired.append(True)
        output = output.clone()
        for row, start, vectors in rows.splices:
            output[row, start:start + vectors.shape[0]] = vectors.to(output.device, output.dtype)
        return output

    handle = (token_embedding or model.get_input_embeddings()).register_forward_hook(splice)
    try:
        out = model(input_ids=rows.ids, **kwargs)
    finally:
        handle.remove()
    if not fired:
        raise HuabiError(f"{type(model).__name__}: its token embedding was not called as expected; cannot use embeddings")
    return out


def apply_emphasis(z: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """A1111/Forge's "Original" emphasis on encoder outputs [B, seq, D]: scale each token by its
    multiplier, then restore each prompt's mean (Forge encodes each prompt on its own)."""
    if bool((multipliers == 1.0).all()):
        return z
    out = []
    for one, weights in zip(z, multipliers):
        original_mean = one.float().mean()
        scaled = one.float() * weights[:, None].float()
        out.append((scaled * (original_mean / scaled.mean())).to(z.dtype))
    return torch.stack(out)


# --------------------------------------------------------------------------- conditioning


@dataclass(frozen=True)
class FlowConditioning:
    tokens: torch.Tensor  # [B, seq, joint_dim]
    pooled: torch.Tensor  # [B, pooled_dim]


def _clip_outputs(model, ids: torch.Tensor):
    return model(input_ids=ids, output_hidden_states=True)


@torch.inference_mode()
def encode_sd3(encoders: FlowTextEncoders, texts: list[str], *, t5_tokens: int, joint_dim: int, device, dtype,
               embeddings=None, used: list[str] | None = None) -> FlowConditioning:
    """SD3's conditioning; ``embeddings`` (textual inversion: a name -> (CLIP-L vectors, CLIP-G vectors)
    mapping, SDXL's embedding files) reach both CLIP towers, not T5 (as Forge); names used go to ``used``."""
    clip_states, pooled = [], []
    for index, (model, pad_with_eos) in enumerate(((encoders.clip_l, True), (encoders.clip_g, False))):
        rows = prompt_rows(clip_tokenizer(pad_with_eos), texts, CLIP_MAX_LENGTH, device, embeddings, index)
        out = run_with_vectors(model, rows, output_hidden_states=True)
        pooled.append(out.text_embeds)  # the pooled output carries no emphasis (as in A1111/Forge)
        clip_states.append(apply_emphasis(out.hidden_states[-2], rows.weights))
        if used is not None:
            used.extend(name for name in rows.used if name not in used)
    clip = torch.cat(clip_states, dim=-1)
    if encoders.t5 is not None:
        ids, weights = weighted_ids(t5_tokenizer(), texts, t5_tokens, device)
        t5 = apply_emphasis(encoders.t5(ids)[0], weights)
    else:  # SD3 without T5: zero tokens where T5's would be (diffusers: max_sequence_length of them)
        t5 = torch.zeros(len(texts), t5_tokens, joint_dim, device=device, dtype=clip.dtype)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return FlowConditioning(torch.cat([clip, t5.to(clip.dtype)], dim=-2).to(dtype), torch.cat(pooled, dim=-1).to(dtype))


@torch.inference_mode()
def encode_flux(encoders: FlowTextEncoders, texts: list[str], *, t5_tokens: int, device, dtype,
                embeddings=None, used: list[str] | None = None) -> FlowConditioning:
    """FLUX's conditioning; ``embeddings`` (textual inversion, SD1-style 768-wide files) reach CLIP-L,
    i.e. its pooled vector, not T5 (as Forge); names used go to ``used``."""
    if encoders.t5 is None:
        raise HuabiError("FLUX needs the T5-XXL text encoder (pass --t5xxl, e.g. t5xxl_fp16.safetensors)")
    clip = encoders.clip_l
    inner = getattr(clip, "text_model", clip)  # FLUX reads CLIP-L's pooled output before any projection
    rows = prompt_rows(clip_tokenizer(True), texts, CLIP_MAX_LENGTH, device, embeddings, 0)
    pooled = run_with_vectors(inner, rows, token_embedding=clip.get_input_embeddings()).pooler_output
    if used is not None:
        used.extend(name for name in rows.used if name not in used)
    ids, weights = weighted_ids(t5_tokenizer(), texts, t5_tokens, device)
    t5 = apply_emphasis(encoders.t5(ids)[0], weights)  # Forge applies emphasis to T5's tokens too
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
                    latent_hw: tuple[int, int], image_tokens: torch.Tensor | None = None,
                    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(x [B,16,h,w], sigma [B]) -> velocity``, with CFG / distilled guidance as the family uses them.
    ``image_tokens`` [B, seq, C]: channels appended to every packed latent token (FLUX.1 Fill's
    masked-image latent and mask)."""
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
            hidden = pack_latents(x).to(dtype)
            if image_tokens is not None:
                hidden = torch.cat([hidden, image_tokens.to(dtype).expand(batch, -1, -1)], dim=2)
            out = transformer(
                hidden_states=hidden, timestep=timestep, guidance=guidance,
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


# --------------------------------------------------------------------------- FLUX.1 Fill


def fill_image_tokens(bundle: FlowBundle, image: Image.Image, mask: Image.Image, device) -> torch.Tensor:
    """FLUX.1 Fill's extra input channels per latent token [1, seq, 64 + 256] (diffusers' FluxFillPipeline):
    the latent of the image with the masked part blanked (pixels * (1 - mask)), packed 2x2 like the
    latent, then the binarised pixel mask with each 8x8 cell folded into 64 channels, packed too."""
    scale = bundle.vae_scale_factor
    width_px, height_px = image.size
    h, w = height_px // scale, width_px // scale
    mask_px = torch.from_numpy(np.asarray(mask.convert("L").resize(image.size, Image.LANCZOS), dtype=np.float32) / 255.0)
    mask_px = (mask_px >= 0.5).float()[None, None]  # binarised, as diffusers' mask processor does
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    vae = bundle.vae
    with torch.inference_mode():
        mean = vae.encode((pixels * (1 - mask_px)).to(device=device, dtype=next(vae.parameters()).dtype)).latent_dist.mean
    masked_latent = (mean.float() - vae.config.shift_factor) * vae.config.scaling_factor
    folded = mask_px[:, 0].view(1, h, scale, w, scale).permute(0, 2, 4, 1, 3).reshape(1, scale * scale, h, w)
    return torch.cat([pack_latents(masked_latent), pack_latents(folded.to(masked_latent.device))], dim=2)


# --------------------------------------------------------------------------- the pipeline


@dataclass(frozen=True)
class FlowResult:
    images: list[Image.Image]
    latents: torch.Tensor  # final latents, normalised (before the VAE)
    seeds: list[int]
    sigmas: torch.Tensor  # the schedule that ran
    shift: float
    embeddings_used: tuple[str, ...] = ()


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
    on_event: Callable[[ProgressEvent], None] | None = None,
    init_latent: torch.Tensor | None = None,
    phase: str = "first pass",
    embeddings=None,
    fixed_steps: bool = False,
) -> FlowResult:
    """One batch (one image per seed). ``on_step(done, total)`` and ``on_event`` (a :class:`ProgressEvent`
    with ``phase`` and the denoised latent) are called after each step; ``on_event`` may raise
    :class:`StopSampling` to end the loop early (the latest denoised latent is returned, A1111's
    interrupt/skip). ``init_latent`` [1 or B, 16, h, w] (normalised) replaces ``init_image``'s encoding:
    the hires fix's second pass starts from the upscaled first-pass latent. ``embeddings``: textual
    inversion by name (:func:`encode_flux` / :func:`encode_sd3`); the names used are in the result.
    ``fixed_steps`` (the hires fix's second pass): an init image or latent is denoised by A1111's
    fixed-steps rule (:func:`fixed_steps_flow_sigmas`) instead of diffusers' img2img rule (the last
    ``int(steps * strength)`` steps of the ``steps``-step schedule)."""
    device = torch.device(device)
    family = bundle.family
    fill = family is TransformerFamily.FLUX_FILL
    if fill and (init_image is None or mask is None):
        raise HuabiError("FLUX.1 Fill repaints the masked part of an image: it needs an init image and a mask")

    # 1. Check sizes and build the schedule.
    scale = bundle.vae_scale_factor
    h, w = request.height_px // scale, request.width_px // scale
    max_patches = getattr(bundle.transformer.config, "pos_embed_max_size", None)  # SD3's learned positions
    if max_patches and max(h, w) > 2 * max_patches:
        raise HuabiError(f"size: {request.width_px}x{request.height_px} is larger than this model's position "
                         f"embedding covers (at most {2 * max_patches * scale} px per side)")
    shift = family_shift(family, request)
    sigmas = flow_sigmas(request.steps, shift=shift, schedule=request.schedule)
    if init_image is not None or init_latent is not None:
        if init_image is not None and init_image.size != (request.width_px, request.height_px):
            init_image = init_image.convert("RGB").resize((request.width_px, request.height_px), Image.LANCZOS)
        if fixed_steps:
            sigmas = fixed_steps_flow_sigmas(request.steps, strength, shift=shift, schedule=request.schedule)
        else:
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
    used: list[str] = []
    if family.is_flux:
        conds = encode_flux(encoders, texts, t5_tokens=t5_length(family, request), device=device, dtype=dtype,
                            embeddings=embeddings, used=used)
    else:
        conds = encode_sd3(encoders, texts, t5_tokens=t5_length(family, request),
                           joint_dim=int(bundle.transformer.config.joint_attention_dim), device=device, dtype=dtype,
                           embeddings=embeddings, used=used)
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
    sigma_start = float(sigmas[0])
    if init_image is not None and init_latent is None:
        init_latent = encode_image(bundle, init_image, device)
    if init_latent is not None:
        init_latent = init_latent.to(device=device, dtype=work_dtype).expand(batch, -1, -1, -1)
        x = (1.0 - sigma_start) * init_latent + sigma_start * noise
    else:
        x = noise * sigma_start

    # 4. Denoise.
    name, sampler = get_flow_sampler(request.sampler)
    image_tokens = fill_image_tokens(bundle, init_image, mask, device) if fill else None
    denoiser = velocity_denoiser(flow_model_call(bundle, cond, uncond, request, (h, w), image_tokens))
    latent_mask = None
    if mask is not None and not fill:  # Fill sees the mask as input and repaints by itself (as diffusers)
        mask_array = np.asarray(mask.convert("L").resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
        latent_mask = torch.from_numpy(mask_array)[None, None].to(device)
        inner = denoiser

        def denoiser(x_in: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:  # noqa: F811 - the masked wrapper
            return latent_mask * inner(x_in, sigma) + (1 - latent_mask) * init_latent

    noise_sampler = SeededNoiseSampler(seeds, shape, device=device, dtype=work_dtype) if name == "Euler a" else None

    latest = [x]

    def step_callback(i: int, total: int, _x, denoised) -> None:
        latest[0] = denoised
        if on_step is not None:
            on_step(i + 1, total)
        if on_event is not None:
            on_event(ProgressEvent(i + 1, total, phase=phase, latent=denoised))

    try:
        if len(sigmas) > 1:
            latents = sampler(denoiser, x, sigmas.to(work_dtype), noise=noise_sampler, on_step=step_callback)
        else:  # strength 0 by the fixed-steps rule: nothing to denoise
            latents = x
    except StopSampling:
        latents = latest[0]
    if latent_mask is not None:
        latents = latent_mask * latents + (1 - latent_mask) * init_latent

    # 5. Decode.
    images = decode_latents(bundle, latents) if decode else []
    return FlowResult(images=images, latents=latents, seeds=list(seeds), sigmas=sigmas, shift=shift,
                      embeddings_used=tuple(used))
