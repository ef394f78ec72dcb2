"""Load a checkpoint (single file or diffusers folder) into a ``ModelBundle``.

Steps: read tensors -> detect -> infer configs from shapes -> convert keys ->
build diffusers modules on the meta device and assign the tensors (strict:
every key used, every shape checked) -> text encoders and tokenizers ->
prediction type -> noise schedule -> hash. Tensors are moved out of the
state dict as each part is built, so at most one copy of the weights exists
besides the modules' own (none when the file is already in ``dtype``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from huabi.errors import HuabiError
from huabi.models.bundle import ModelBundle
from huabi.models.configs import (
    NORM_NUM_GROUPS,
    native_size_px,
    pooled_text_dim,
    unet_config_from_unet,
    vae_config_from_vae,
    vae_norm_num_groups,
    vae_scaling_factor,
)
from huabi.models.convert import check_against_module, is_diffusers_vae, unet_to_diffusers, vae_to_diffusers
from huabi.models.detect import MARKER_VAE_NORM_GROUPS, UNET_PREFIX, VAE_PREFIX, Detected, detect, marker_value
from huabi.core.family import Prediction
from huabi.models.formats import read_json_object, read_state_dict
from huabi.models.hashes import HashCache

# SD's training schedule: betas linear in sqrt space from 0.00085 to 0.012 over 1000 steps.
SD_BETA_START = 0.00085
SD_BETA_END = 0.012
SD_TRAIN_TIMESTEPS = 1000


def scaled_linear_alphas_cumprod(
    beta_start: float = SD_BETA_START, beta_end: float = SD_BETA_END, steps: int = SD_TRAIN_TIMESTEPS
) -> torch.Tensor:
    """[steps] float64 cumulative product of (1 - beta) for SD's "scaled linear" betas."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _pop_prefixed(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove and return the entries under ``prefix`` (prefix stripped) so the source stops holding them."""
    keys = [k for k in state_dict if k.startswith(prefix)]
    return {k[len(prefix):]: state_dict.pop(k) for k in keys}


def build_module(
    model_class: type,
    config: Mapping[str, Any],
    weights: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    what: str,
    consume: bool = False,
) -> torch.nn.Module:
    """Instantiate ``model_class(**config)`` without initialising weights, then assign ``weights`` strictly.

    ``consume``: ``weights`` is the caller's to give away (a dict nothing else references): each
    tensor leaves it as it is cast, so a checkpoint read into memory (.ckpt/.pt pickles; safetensors
    are file-backed pages the kernel can drop) is not held twice: an fp16 SD1.5 .ckpt loaded in fp32
    peaked at 6.42 GiB, now 4.70 (4.53-4.60 after loading)."""
    with torch.device("meta"):
        module = model_class(**config)
    check_against_module(weights, module, what)

    def place(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)

    # Place each tensor on its device/dtype before assigning: no second full copy, no module.to().
    if consume:
        placed = {key: place(weights.pop(key)) for key in list(weights)}
    else:
        placed = {k: place(v) for k, v in weights.items()}
    module.load_state_dict(placed, strict=True, assign=True)
    leftover = [name for name, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if leftover:  # a non-persistent buffer the file cannot provide; never ship a meta tensor
        raise HuabiError(f"{what}: tensors without values after loading: {', '.join(leftover[:3])}")
    return module.eval().requires_grad_(False)


def build_unet(
    config: Mapping[str, Any], weights: Mapping[str, torch.Tensor], *, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32, consume: bool = False,
) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return build_module(UNet2DConditionModel, config, weights, device=device, dtype=dtype, what="UNet", consume=consume)


def build_vae(
    config: Mapping[str, Any], weights: Mapping[str, torch.Tensor], *, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32, consume: bool = False,
) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return build_module(AutoencoderKL, config, weights, device=device, dtype=dtype, what="VAE", consume=consume)


@torch.no_grad()
def is_v_prediction_sd2(unet: torch.nn.Module) -> bool:
    """A1111's test for SD2 files that do not say: one UNet call on a constant input.

    Input and context are all 0.5, timestep 999 (almost pure noise). An
    epsilon model predicts roughly the input back; a v model predicts about
    -x there, so ``mean(output - input) < -1`` means v-prediction.
    """
    config = unet.config
    parameter = next(unet.parameters())
    device = parameter.device
    x_test = torch.full((1, int(config.in_channels), 8, 8), 0.5, device=device, dtype=torch.float32)
    context = torch.full((1, 2, int(config.cross_attention_dim)), 0.5, device=device, dtype=torch.float32)
    original_dtype = parameter.dtype
    # The threshold was set in fp32. (Base-class .to: diffusers' own override warns about fp32 modules.)
    if original_dtype != torch.float32:
        torch.nn.Module.to(unet, torch.float32)
    try:
        output = unet(x_test, torch.tensor([999], device=device), encoder_hidden_states=context).sample
    finally:
        if original_dtype != torch.float32:
            torch.nn.Module.to(unet, original_dtype)
    return (output - x_test).mean().item() < -1.0


def read_vae_file(path: str | Path) -> tuple[dict[str, torch.Tensor], int]:
    """A standalone VAE as original-layout keys (``encoder.*``...), from a file or diffusers vae folder,
    and its GroupNorm group count: a folder's ``config.json`` says it, a huabi-mini checkpoint marks it
    (``huabi.vae_norm_num_groups``); any other file is SD's layout (32), which shapes cannot tell apart."""
    path = Path(path)
    groups = NORM_NUM_GROUPS
    if path.is_dir():
        from huabi.models.formats import read_component_weights

        if (path / "vae").is_dir():  # a whole pipeline folder: take its VAE
            path = path / "vae"
        tensors = read_component_weights(path, "VAE")
        config_path = path / "config.json"
        if config_path.is_file():
            value = read_json_object(config_path).get("norm_num_groups", NORM_NUM_GROUPS)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise HuabiError(f"{config_path}: norm_num_groups must be a positive integer, got {value!r}")
            groups = value
    else:
        tensors, _ = read_state_dict(path)
        marked = marker_value(tensors, MARKER_VAE_NORM_GROUPS)
        if marked is not None:
            groups = int(marked)
    if any(k.startswith(VAE_PREFIX) for k in tensors):
        tensors = {k[len(VAE_PREFIX):]: v for k, v in tensors.items() if k.startswith(VAE_PREFIX)}
    if is_diffusers_vae(tensors):
        from huabi.models.convert import vae_to_original

        tensors = vae_to_original(tensors)
    # EMA VAEs from the original releases carry training-only tensors; they are not weights.
    tensors = {k: v for k, v in tensors.items() if not k.startswith(("model_ema.", "loss."))}
    if not any(k.startswith("encoder.") for k in tensors) or not any(k.startswith("decoder.") for k in tensors):
        raise HuabiError(f"{path.name}: not a VAE file: no encoder.*/decoder.* tensors (first keys: {', '.join(list(tensors)[:3])})")
    return tensors, groups


def check_float_weights(tensors: dict, source: str, skip=()) -> None:
    """Refuse a file whose layer weights are integers (an all-integer or integer-quantized
    checkpoint): torch would fail deep inside ``load_state_dict`` with a page of text."""
    bad = [name for name, tensor in tensors.items()
           if name.endswith((".weight", ".bias")) and name not in skip
           and not (tensor.is_floating_point() or tensor.is_complex())]
    if bad:
        raise HuabiError(f"{source}: {len(bad)} of its layer weights are integers, not floating point "
                         f"(first: {bad[0]}, {tensors[bad[0]].dtype}); not a usable model (integer-quantized or corrupted?)")


def load_model(
    path: str | Path,
    *,
    vae: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    prediction: Prediction | None = None,
    hash_cache: HashCache | None = None,
    compute_hash: bool = True,
    base: str | Path | None = None,
    gguf_on_the_fly: bool = False,
) -> ModelBundle:
    """Load a ``.safetensors``/``.ckpt`` single file or a diffusers folder.

    ``vae`` replaces the checkpoint's VAE (original or diffusers layout, file or
    folder). ``prediction`` overrides detection. ``hash_cache`` defaults to the
    user cache (see ``hashes.py``); ``compute_hash=False`` skips hashing.
    ``base``: for a GGUF UNet file, the checkpoint that supplies everything but the UNet;
    ``gguf_on_the_fly`` keeps its quantized weights packed, dequantized at each use.
    """
    path = Path(path)
    from huabi.models.text_encoders import text_encoders_from_original
    from huabi.models.tokenizer import load_tokenizers

    # 1. read and detect
    packed: dict = {}  # GGUF weights kept quantized (on the fly), by original UNet key
    if path.suffix.lower() == ".gguf":  # a UNet-only GGUF takes text encoders and VAE from ``base``
        from huabi.models.formats import with_companion_parts
        from huabi.models.gguf_io import read_gguf_packed

        if gguf_on_the_fly:
            state_dict, metadata, packed = read_gguf_packed(path)
        else:
            state_dict, metadata = read_state_dict(path)
        state_dict, metadata = with_companion_parts(path, state_dict, metadata, base)
    else:
        state_dict, metadata = read_state_dict(path)
    check_float_weights(state_dict, path.name, skip=packed)
    detected: Detected = detect(state_dict, metadata=metadata, source=path.name)
    family = detected.family

    # 2. VAE first: its depth gives the latent scale factor the UNet config needs
    vae_source = path if vae is None else Path(vae)
    if vae is None:
        if not detected.has_vae:
            raise HuabiError(f"{path.name}: checkpoint has no VAE weights (nothing under {VAE_PREFIX}); pass a VAE file with vae=")
        vae_sd = _pop_prefixed(state_dict, VAE_PREFIX)
        vae_groups = vae_norm_num_groups(family, state_dict)
    else:
        _pop_prefixed(state_dict, VAE_PREFIX)  # the checkpoint's own VAE is not used
        vae_sd, vae_groups = read_vae_file(vae_source)  # its layout, not the checkpoint's VAE's
        check_float_weights(vae_sd, vae_source.name)
    provisional_prediction = prediction or detected.prediction
    vae_config = vae_config_from_vae(
        vae_sd,
        scaling_factor=vae_scaling_factor(family, state_dict),
        sample_size=native_size_px(family, provisional_prediction, state_dict),
        norm_num_groups=vae_groups,
    )
    vae_weights = vae_to_diffusers(vae_sd)
    del vae_sd  # the converted dict holds the file's tensors now; the build frees each as it casts it
    vae_module = build_vae(vae_config, vae_weights, device=device, dtype=dtype, consume=True)
    vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)

    # 3. UNet
    pooled_dim = pooled_text_dim(state_dict, family)
    unet_sd = _pop_prefixed(state_dict, UNET_PREFIX)
    unet_config = unet_config_from_unet(
        unet_sd, family, prediction=provisional_prediction, vae_scale_factor=vae_scale_factor,
        pooled_dim=pooled_dim, markers=state_dict,
    )
    if packed:
        from huabi.models.gguf_io import build_unet_packed

        packed = unet_to_diffusers({k[len(UNET_PREFIX):]: v for k, v in packed.items()}, unet_config)
        unet = build_unet_packed(unet_config, unet_to_diffusers(unet_sd, unet_config), packed, device=device, dtype=dtype)
        del unet_sd
    else:
        unet_weights = unet_to_diffusers(unet_sd, unet_config)
        del unet_sd  # as for the VAE: one copy of each tensor at a time
        unet = build_unet(unet_config, unet_weights, device=device, dtype=dtype, consume=True)

    # 4. prediction: override > what the file says > A1111's SD2 test
    if prediction is not None:
        final_prediction = Prediction(prediction)
    elif detected.prediction_known:
        final_prediction = detected.prediction
    else:
        final_prediction = Prediction.V if is_v_prediction_sd2(unet) else Prediction.EPSILON
    final_native_px = native_size_px(family, final_prediction, state_dict)
    if final_prediction is not provisional_prediction:  # SD2: 768 for v, 512 for epsilon
        unet.register_to_config(sample_size=final_native_px // vae_scale_factor)
        vae_module.register_to_config(sample_size=final_native_px)

    # 5. text encoders and tokenizers (engineer C's converters read dims from shapes)
    encoders = [e.to(device=device).requires_grad_(False) for e in text_encoders_from_original(state_dict, family, dtype=dtype)]
    tokenizers = load_tokenizers(family)

    # 6. noise schedule: the file's own when it ships one
    alphas_cumprod = state_dict.get("alphas_cumprod")
    if alphas_cumprod is not None and alphas_cumprod.numel() == SD_TRAIN_TIMESTEPS:
        alphas_cumprod = alphas_cumprod.to(torch.float64).reshape(SD_TRAIN_TIMESTEPS).clone()
    else:
        alphas_cumprod = scaled_linear_alphas_cumprod()
    state_dict.clear()

    # 7. identity
    cache = hash_cache if hash_cache is not None else (HashCache() if compute_hash else None)
    short_hash = cache.short_hash(path) if cache is not None else None
    vae_name = vae_hash = None
    if vae is not None:
        vae_name = vae_source.stem if vae_source.is_file() else vae_source.name
        vae_hash = cache.short_hash(vae_source) if cache is not None and vae_source.is_file() else None
    return ModelBundle(
        family=family,
        prediction=final_prediction,
        variant=detected.variant,
        unet=unet,
        vae=vae_module,
        text_encoders=encoders,
        tokenizers=tokenizers,
        alphas_cumprod=alphas_cumprod,
        native_size_px=final_native_px,
        name=path.stem if path.is_file() else path.name,
        path=path,
        short_hash=short_hash,
        vae_name=vae_name,
        vae_short_hash=vae_hash,
        metadata=dict(metadata),
    )

