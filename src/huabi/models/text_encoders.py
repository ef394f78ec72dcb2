"""Text encoders: original single-file layouts <-> transformers CLIP modules.

Two layouts occur in single-file checkpoints (A1111/civitai/Stability files):

* **HF layout** (OpenAI CLIP ViT-L/14 as wrapped by ``transformers``): SD1, huabi-mini
  and the first SDXL encoder.  Keys are the transformers ``CLIPTextModel`` keys
  under a prefix, normally with ``text_model.`` (``...text_model.encoder.layers.0.
  self_attn.q_proj.weight``); files written without ``text_model.`` are accepted too.
  transformers 5 ``CLIPTextModel`` has no ``text_model.`` level, so it is added and
  removed here.  Activation ``quick_gelu``.
* **OpenCLIP layout**: SD2 (ViT-H) and SDXL's bigG.  ``token_embedding.weight``,
  ``positional_embedding``, ``transformer.resblocks.N.{ln_1,attn,ln_2,mlp.c_fc,
  mlp.c_proj}``, ``ln_final``, ``text_projection``.  Attention stores q, k and v
  stacked in ``attn.in_proj_weight``/``in_proj_bias`` (split here, in that order);
  ``text_projection`` is used as ``x @ P`` with shape [hidden, proj], so the
  transformers ``Linear`` weight is its transpose.  Activation ``gelu``.

Dimensions come from tensor shapes.  The number of attention heads is not
visible in the weights: it is taken as ``hidden // 64`` (at least 1), which is
right for every released CLIP text tower (L: 768/12, H: 1024/16, bigG: 1280/20).
A model trained with another head width (e.g. a custom small encoder) must pass
``attention_heads`` explicitly, or it loads without error but computes wrongly.

Round trip: ``text_encoders_to_original(text_encoders_from_original(sd, f), f)``
returns every converted tensor bit-identical under the same key, in the
canonical spelling (HF layout always with ``text_model.``).  Keys listed by
:func:`unconverted_text_encoder_keys` (``position_ids``, ``logit_scale``) carry
nothing the encoder uses and are not part of the modules; a saver that wants
to keep them copies them from the source file.

SD2 keeps its last transformer layer and ``text_projection`` (so the round trip
is exact) although conditioning reads the penultimate layer.  diffusers instead
stores SD2's text encoder as a ``CLIPTextModel`` without the last layer and
without projection; :func:`sd2_diffusers_text_encoder` makes that form.  An SD2
state dict without ``text_projection`` is taken to be such a cut tower (it
comes from a diffusers folder): it is built as given, as a ``CLIPTextModel``,
and ``huabi.core.conditioning`` reads its last state.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from huabi.errors import HuabiError
from huabi.core.family import ModelFamily
from huabi.models.tokenizer import load_tokenizers  # re-exported: callers find both halves here

__all__ = [
    "TEXT_ENCODER_PREFIXES",
    "load_tokenizers",
    "sd2_diffusers_text_encoder",
    "text_encoders_from_original",
    "text_encoders_to_original",
    "tiny_text_encoder_configs",
    "unconverted_text_encoder_keys",
]

BOS_ID = 49406
EOS_ID = 49407
CLIP_VOCAB_SIZE = 49408
HEAD_DIM = 64  # every CLIP text tower uses 64-wide heads; heads are not stored in files

HF = "hf"
OPEN_CLIP = "open_clip"


@dataclass(frozen=True)
class EncoderSlot:
    prefix: str
    layout: str  # HF or OPEN_CLIP
    activation: str


_SLOTS: dict[ModelFamily, tuple[EncoderSlot, ...]] = {
    ModelFamily.SD1: (EncoderSlot("cond_stage_model.transformer.", HF, "quick_gelu"),),
    ModelFamily.HUABI_MINI: (EncoderSlot("cond_stage_model.transformer.", HF, "quick_gelu"),),
    ModelFamily.SD2: (EncoderSlot("cond_stage_model.model.", OPEN_CLIP, "gelu"),),
    ModelFamily.SDXL: (
        EncoderSlot("conditioner.embedders.0.transformer.", HF, "quick_gelu"),
        EncoderSlot("conditioner.embedders.1.model.", OPEN_CLIP, "gelu"),
    ),
    ModelFamily.SDXL_REFINER: (EncoderSlot("conditioner.embedders.0.model.", OPEN_CLIP, "gelu"),),
}

TEXT_ENCODER_PREFIXES: Mapping[ModelFamily, tuple[str, ...]] = {
    family: tuple(slot.prefix for slot in slots) for family, slots in _SLOTS.items()
}

# Keys the original files carry under the encoder prefix that hold nothing the
# text encoder needs: position ids are a fixed arange (some old files even hold
# corrupted float copies), logit_scale belongs to CLIP's image-text loss.
_IGNORED_SUFFIXES = ("embeddings.position_ids", "logit_scale", "attn_mask")

# OpenCLIP per-layer names -> transformers per-layer names (q/k/v handled apart).
_OPEN_CLIP_LAYER_MAP = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_OPEN_CLIP_TOP_MAP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
_QKV = ("q_proj", "k_proj", "v_proj")
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")


# ---------------------------------------------------------------- configs


def _clip_config(
    *,
    hidden: int,
    layers: int,
    intermediate: int,
    positions: int,
    vocab: int,
    activation: str,
    projection_dim: int | None,
    pad_id: int,
    heads: int | None = None,
) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads if heads is not None else max(1, hidden // HEAD_DIM),
        max_position_embeddings=positions,
        hidden_act=activation,
        layer_norm_eps=1e-5,
        projection_dim=projection_dim if projection_dim is not None else hidden,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,  # pooling takes the first EOS position, as CLIP's argmax over ids does
        pad_token_id=pad_id,
    )


def tiny_text_encoder_configs(family: ModelFamily) -> list[CLIPTextConfig]:
    """Configs for tiny random test encoders of ``family`` (hidden 64, 2 layers, real vocab).

    OpenCLIP-layout encoders (SD2, SDXL's second, refiner) get a projection of
    width 64, as the real ones project to their own width.
    """
    configs = []
    for slot in _slots(family):
        configs.append(
            _clip_config(
                hidden=64,
                layers=2,
                intermediate=256,
                positions=77,
                vocab=CLIP_VOCAB_SIZE,
                activation=slot.activation,
                projection_dim=64 if slot.layout == OPEN_CLIP else None,
                pad_id=EOS_ID if slot.layout == HF else 0,
            )
        )
    return configs


def _slots(family: ModelFamily) -> tuple[EncoderSlot, ...]:
    try:
        return _SLOTS[ModelFamily(family)]
    except (KeyError, ValueError):
        raise HuabiError(f"no text encoder layout for model family {family!r}") from None


# ---------------------------------------------------------------- original -> modules


def text_encoders_from_original(
    state_dict: Mapping[str, Tensor],
    family: ModelFamily,
    *,
    dtype: torch.dtype = torch.float32,
    attention_heads: Sequence[int] | None = None,
) -> list[torch.nn.Module]:
    """Build ``family``'s text encoder(s) from a whole original-layout checkpoint.

    Returns transformers modules in eval mode, in the family's order (SDXL:
    [CLIP-L ``CLIPTextModel``, bigG ``CLIPTextModelWithProjection``]).  Floating
    tensors are cast to ``dtype``; tensors already in ``dtype`` are used without a
    copy (the modules share their memory with ``state_dict``).  Raises
    ``HuabiError`` naming the key for a missing, unexpected or mis-shaped tensor.
    ``attention_heads`` (one per encoder) overrides the ``hidden // 64`` rule.
    """
    slots = _slots(family)
    family = ModelFamily(family)
    if attention_heads is not None and len(attention_heads) != len(slots):
        raise HuabiError(f"attention_heads needs {len(slots)} value(s) for {family.value}, got {len(attention_heads)}")
    encoders: list[torch.nn.Module] = []
    for n, slot in enumerate(slots):
        section = {k[len(slot.prefix) :]: v for k, v in state_dict.items() if k.startswith(slot.prefix)}
        if not section:
            raise HuabiError(f"checkpoint has no text encoder weights under '{slot.prefix}' (needed for {family.value})")
        if slot.layout == HF:
            hf_dict, projection = hf_text_section(section, slot.prefix)
        else:
            hf_dict, projection = _open_clip_section(section, slot.prefix)
        heads = None if attention_heads is None else attention_heads[n]
        encoders.append(build_text_encoder(hf_dict, projection, slot, dtype, heads))
    return encoders


def unconverted_text_encoder_keys(state_dict: Mapping[str, Tensor], family: ModelFamily) -> list[str]:
    """Keys under ``family``'s encoder prefixes that the conversion deliberately drops."""
    prefixes = TEXT_ENCODER_PREFIXES[ModelFamily(family)]
    return [k for k in state_dict if k.startswith(prefixes) and k.endswith(_IGNORED_SUFFIXES)]


def hf_text_section(section: dict[str, Tensor], prefix: str) -> tuple[dict[str, Tensor], Tensor | None]:
    """HF-layout keys (with or without ``text_model.``) -> transformers 5 CLIPTextModel keys."""
    out: dict[str, Tensor] = {}
    for key, tensor in section.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        inner = key.removeprefix("text_model.")
        if inner in out:
            raise HuabiError(f"text encoder key '{prefix}{inner}' appears both with and without 'text_model.'")
        out[inner] = tensor
    return out, None


def _open_clip_section(section: dict[str, Tensor], prefix: str) -> tuple[dict[str, Tensor], Tensor | None]:
    out: dict[str, Tensor] = {}
    projection: Tensor | None = None
    for key, tensor in section.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        if key in _OPEN_CLIP_TOP_MAP:
            out[_OPEN_CLIP_TOP_MAP[key]] = tensor
            continue
        if key == "text_projection":
            if tensor.ndim != 2:
                raise HuabiError(f"'{prefix}text_projection' has shape {list(tensor.shape)}, expected [hidden, proj]")
            projection = tensor.t()  # x @ P  ==  Linear with weight P^T
            continue
        match = _RESBLOCK.fullmatch(key)
        if match is None:
            raise HuabiError(f"unexpected text encoder key '{prefix}{key}'")
        layer, name = match.groups()
        base = f"encoder.layers.{layer}."
        if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
            if tensor.shape[0] % 3 != 0:
                raise HuabiError(f"'{prefix}{key}' has {tensor.shape[0]} rows, not a multiple of 3 (q, k, v)")
            kind = "weight" if name.endswith("weight") else "bias"
            for proj_name, part in zip(_QKV, tensor.chunk(3, dim=0), strict=True):
                out[f"{base}self_attn.{proj_name}.{kind}"] = part
        elif name in _OPEN_CLIP_LAYER_MAP:
            out[base + _OPEN_CLIP_LAYER_MAP[name]] = tensor
        else:
            raise HuabiError(f"unexpected text encoder key '{prefix}{key}'")
    return out, projection


def _config_from_shapes(
    hf_dict: dict[str, Tensor], projection: Tensor | None, slot: EncoderSlot, heads: int | None
) -> CLIPTextConfig:
    def need(key: str) -> Tensor:
        if key not in hf_dict:
            raise HuabiError(f"text encoder weights under '{slot.prefix}' lack '{key}'")
        return hf_dict[key]

    token_embedding = need("embeddings.token_embedding.weight")
    vocab, hidden = token_embedding.shape
    if vocab < CLIP_VOCAB_SIZE:
        raise HuabiError(
            f"'{slot.prefix}' token embedding has {vocab} rows; the CLIP tokenizer needs at least {CLIP_VOCAB_SIZE}"
        )
    positions = need("embeddings.position_embedding.weight").shape[0]
    layer_ids = {int(m.group(1)) for k in hf_dict if (m := _HF_LAYER.match(k))}
    if not layer_ids or sorted(layer_ids) != list(range(len(layer_ids))):
        raise HuabiError(f"text encoder under '{slot.prefix}' has layers {sorted(layer_ids)}, expected 0..N-1")
    intermediate = need("encoder.layers.0.mlp.fc1.weight").shape[0]
    if heads is not None and (heads < 1 or hidden % heads != 0):
        raise HuabiError(f"attention_heads={heads} does not divide the hidden size {hidden} of '{slot.prefix}'")
    return _clip_config(
        hidden=int(hidden),
        layers=len(layer_ids),
        intermediate=int(intermediate),
        positions=int(positions),
        vocab=int(vocab),
        activation=slot.activation,
        projection_dim=int(projection.shape[0]) if projection is not None else None,
        pad_id=EOS_ID if slot.layout == HF else 0,
        heads=heads,
    )


def build_text_encoder(
    hf_dict: dict[str, Tensor], projection: Tensor | None, slot: EncoderSlot, dtype: torch.dtype, heads: int | None
) -> torch.nn.Module:
    config = _config_from_shapes(hf_dict, projection, slot, heads)
    # Build on the meta device: random initialisation of a 700M-parameter bigG
    # would cost seconds and be thrown away.
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config) if projection is not None else CLIPTextModel(config)
    inner = model.text_model if projection is not None else model
    full = {("text_model." + k if projection is not None else k): v for k, v in hf_dict.items()}
    if projection is not None:
        full["text_projection.weight"] = projection

    expected = model.state_dict()
    missing = [k for k in expected if k not in full]
    unexpected = [k for k in full if k not in expected]
    if missing:
        raise HuabiError(f"text encoder under '{slot.prefix}' lacks '{_original_name(missing[0], slot)}'")
    if unexpected:
        raise HuabiError(f"unexpected text encoder key '{_original_name(unexpected[0], slot)}'")
    for key, want in expected.items():
        if tuple(full[key].shape) != tuple(want.shape):
            raise HuabiError(
                f"text encoder tensor '{_original_name(key, slot)}' has shape {list(full[key].shape)}, "
                f"expected {list(want.shape)}"
            )
    cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in full.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    # The only non-persistent buffer is still on meta; give it a real arange next to the weights.
    device = inner.embeddings.position_embedding.weight.device
    inner.embeddings.position_ids = torch.arange(config.max_position_embeddings, device=device).expand((1, -1))
    return model.eval()


def _original_name(hf_key: str, slot: EncoderSlot) -> str:
    """Best-effort original spelling of a transformers key, for error messages."""
    key = hf_key.removeprefix("text_model.")
    if slot.layout == HF:
        return f"{slot.prefix}text_model.{key}"
    for original, ours in {**_OPEN_CLIP_TOP_MAP, "text_projection": "text_projection.weight"}.items():
        if key == ours:
            return slot.prefix + original
    match = _HF_LAYER.match(key)
    if match:
        rest = key[match.end() :]
        for original, ours in _OPEN_CLIP_LAYER_MAP.items():
            if rest == ours:
                return f"{slot.prefix}transformer.resblocks.{match.group(1)}.{original}"
        kind = "weight" if rest.endswith("weight") else "bias"
        return f"{slot.prefix}transformer.resblocks.{match.group(1)}.attn.in_proj_{kind}"
    return slot.prefix + key


def sd2_diffusers_text_encoder(encoder: torch.nn.Module) -> CLIPTextModel:
    """diffusers' form of an SD2 text encoder: the tower without its last layer and projection.

    Its ``last_hidden_state`` equals the full tower's penultimate state through
    the final layer norm, which is what SD2 conditions on.  Weights are shared,
    not copied.
    """
    if not isinstance(encoder, CLIPTextModelWithProjection):
        raise HuabiError(f"expected the full SD2 tower (CLIPTextModelWithProjection), got {type(encoder).__name__}")
    config = CLIPTextConfig(**{**encoder.config.to_dict(), "num_hidden_layers": encoder.config.num_hidden_layers - 1})
    if config.num_hidden_layers < 1:
        raise HuabiError("an SD2 text encoder with one layer has no penultimate layer to keep")
    last = f"encoder.layers.{config.num_hidden_layers}."
    kept = {k: v for k, v in encoder.text_model.state_dict().items() if not k.startswith(last) and not k.endswith("position_ids")}
    with torch.device("meta"):
        cut = CLIPTextModel(config)
    cut.load_state_dict(kept, strict=True, assign=True)
    device = cut.embeddings.position_embedding.weight.device
    cut.embeddings.position_ids = torch.arange(config.max_position_embeddings, device=device).expand((1, -1))
    return cut.eval()


# ---------------------------------------------------------------- modules -> original


def text_encoders_to_original(encoders: Sequence[torch.nn.Module], family: ModelFamily) -> dict[str, Tensor]:
    """The inverse of :func:`text_encoders_from_original`: original-layout tensors, prefixed.

    Tensors are detached and contiguous in the modules' own dtype.
    """
    slots = _slots(family)
    family = ModelFamily(family)
    if len(encoders) != len(slots):
        raise HuabiError(f"{family.value} has {len(slots)} text encoder(s), got {len(encoders)}")
    out: dict[str, Tensor] = {}
    for encoder, slot in zip(encoders, slots, strict=True):
        if not isinstance(encoder, (CLIPTextModel, CLIPTextModelWithProjection)):
            raise HuabiError(f"text encoder for '{slot.prefix}' is a {type(encoder).__name__}, not a transformers CLIP text model")
        inner = encoder.text_model if isinstance(encoder, CLIPTextModelWithProjection) else encoder
        inner_sd = {k: v.detach() for k, v in inner.state_dict().items() if not k.endswith("position_ids")}
        projection = encoder.text_projection.weight.detach() if isinstance(encoder, CLIPTextModelWithProjection) else None
        if slot.layout == HF:
            if projection is not None:
                raise HuabiError(f"the encoder for '{slot.prefix}' (OpenAI CLIP layout) must not have a text projection")
            for key, tensor in inner_sd.items():
                out[f"{slot.prefix}text_model.{key}"] = tensor.contiguous()
        else:
            out.update(_to_open_clip(inner_sd, projection, slot.prefix))
    return out


def _to_open_clip(inner_sd: dict[str, Tensor], projection: Tensor | None, prefix: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    top_inverse = {ours: original for original, ours in _OPEN_CLIP_TOP_MAP.items()}
    layer_inverse = {ours: original for original, ours in _OPEN_CLIP_LAYER_MAP.items()}
    for key, tensor in inner_sd.items():
        if key in top_inverse:
            out[prefix + top_inverse[key]] = tensor.contiguous()
            continue
        match = _HF_LAYER.match(key)
        if match is None:
            raise HuabiError(f"unexpected text encoder module key '{key}'")
        rest = key[match.end() :]
        base = f"{prefix}transformer.resblocks.{match.group(1)}."
        if rest in layer_inverse:
            out[base + layer_inverse[rest]] = tensor.contiguous()
        elif rest.startswith("self_attn.q_proj."):
            kind = rest.rsplit(".", 1)[1]
            layer = f"encoder.layers.{match.group(1)}.self_attn."
            parts = [inner_sd[f"{layer}{name}.{kind}"] for name in _QKV]
            out[f"{base}attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
        elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            continue  # written together with q_proj
        else:
            raise HuabiError(f"unexpected text encoder module key '{key}'")
    if projection is not None:
        out[prefix + "text_projection"] = projection.t().contiguous()
    return out
