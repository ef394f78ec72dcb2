"""Text encoder conversion: vs diffusers' single-file converters, vs an OpenCLIP forward, round trips."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from huabi.errors import HuabiError
from huabi.models.family import ModelFamily
from huabi.models.text_encoders import (
    TEXT_ENCODER_PREFIXES,
    text_encoders_from_original,
    text_encoders_to_original,
    sd2_diffusers_text_encoder,
    tiny_text_encoder_configs,
    unconverted_text_encoder_keys,
)

VOCAB = 49408
POSITIONS = 77


def open_clip_state_dict(prefix: str, *, hidden: int = 64, layers: int = 2, proj: int | None = 32, seed: int = 0):
    """A random OpenCLIP text tower in its original key layout (as SD2/SDXL files store it)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen) * 0.05

    sd = {
        prefix + "token_embedding.weight": rnd(VOCAB, hidden),
        prefix + "positional_embedding": rnd(POSITIONS, hidden),
        prefix + "ln_final.weight": 1 + rnd(hidden),
        prefix + "ln_final.bias": rnd(hidden),
        prefix + "logit_scale": torch.tensor(4.6052),
    }
    if proj is not None:
        sd[prefix + "text_projection"] = rnd(hidden, proj)
    for i in range(layers):
        b = f"{prefix}transformer.resblocks.{i}."
        sd.update({
            b + "ln_1.weight": 1 + rnd(hidden), b + "ln_1.bias": rnd(hidden),
            b + "attn.in_proj_weight": rnd(3 * hidden, hidden), b + "attn.in_proj_bias": rnd(3 * hidden),
            b + "attn.out_proj.weight": rnd(hidden, hidden), b + "attn.out_proj.bias": rnd(hidden),
            b + "ln_2.weight": 1 + rnd(hidden), b + "ln_2.bias": rnd(hidden),
            b + "mlp.c_fc.weight": rnd(4 * hidden, hidden), b + "mlp.c_fc.bias": rnd(4 * hidden),
            b + "mlp.c_proj.weight": rnd(hidden, 4 * hidden), b + "mlp.c_proj.bias": rnd(hidden),
        })
    return sd


def hf_clip_state_dict(prefix: str, *, seed: int = 1, text_model: bool = True):
    """A random OpenAI CLIP-L text tower in the HF key layout of SD1/SDXL files."""
    torch.manual_seed(seed)
    model = CLIPTextModel(tiny_text_encoder_configs(ModelFamily.SD1)[0])
    inner = "text_model." if text_model else ""
    sd = {f"{prefix}{inner}{k}": v.detach().clone() for k, v in model.state_dict().items()}
    sd[f"{prefix}{inner}embeddings.position_ids"] = torch.arange(POSITIONS).unsqueeze(0)
    return sd


def original_checkpoint(family: ModelFamily) -> dict[str, torch.Tensor]:
    """Text-encoder part of a single-file checkpoint of ``family``, plus an unrelated UNet key.

    A fresh dict each call (tests delete and replace keys); the tensors are shared and never modified.
    """
    return dict(_original_checkpoint(family))


@functools.cache
def _original_checkpoint(family: ModelFamily) -> dict[str, torch.Tensor]:
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}
    prefixes = TEXT_ENCODER_PREFIXES[family]
    for n, prefix in enumerate(prefixes):
        if prefix.endswith(".transformer."):
            sd.update(hf_clip_state_dict(prefix, seed=10 + n))
        else:
            sd.update(open_clip_state_dict(prefix, seed=20 + n))
    return sd


def _without_ignored(sd, family):
    dropped = set(unconverted_text_encoder_keys(sd, family))
    return {k: v for k, v in sd.items() if k.startswith(TEXT_ENCODER_PREFIXES[family]) and k not in dropped}


# ---------------------------------------------------------------- against diffusers


@pytest.mark.parametrize(
    ("family", "index", "prefix"),
    [
        (ModelFamily.SD2, 0, "cond_stage_model.model."),
        (ModelFamily.SDXL, 1, "conditioner.embedders.1.model."),
        (ModelFamily.SDXL_REFINER, 0, "conditioner.embedders.0.model."),
    ],
)
def test_open_clip_matches_diffusers(family, index, prefix):
    sd = original_checkpoint(family)
    ours = text_encoders_from_original(sd, family)[index]
    assert isinstance(ours, CLIPTextModelWithProjection)
    theirs = convert_open_clip_checkpoint(ours, sd, prefix=prefix)
    our_sd = ours.state_dict()
    for key, tensor in theirs.items():
        assert torch.equal(our_sd[key], tensor), key  # exact: a conversion only moves bits
    extra = set(our_sd) - set(theirs)
    if family is ModelFamily.SD2:
        # diffusers drops SD2's projection (its SD2 encoder has no head); huabi keeps it for the round trip.
        assert extra == {"text_projection.weight"}
        assert torch.equal(our_sd["text_projection.weight"], sd[prefix + "text_projection"].T)
    else:
        assert extra == set()


@pytest.mark.parametrize(
    ("family", "index"), [(ModelFamily.SD1, 0), (ModelFamily.HUABI_MINI, 0), (ModelFamily.SDXL, 0)]
)
def test_hf_layout_matches_diffusers(family, index):
    sd = original_checkpoint(family)
    ours = text_encoders_from_original(sd, family)[index]
    assert type(ours) is CLIPTextModel
    theirs = {
        k.removeprefix("text_model."): v
        for k, v in convert_ldm_clip_checkpoint(sd).items()
        if k.startswith("text_model.") and not k.endswith("position_ids")
    }
    our_sd = {k: v for k, v in ours.state_dict().items() if not k.endswith("position_ids")}
    assert set(our_sd) == set(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(our_sd[key], tensor), key


def test_sd2_diffusers_form_matches_diffusers():
    """With SD2's real 24 layers, diffusers drops resblocks.23 and the projection; so does our helper."""
    prefix = "cond_stage_model.model."
    sd = open_clip_state_dict(prefix, hidden=64, layers=24, proj=64, seed=5)
    (full,) = text_encoders_from_original(sd, ModelFamily.SD2)
    cut = sd2_diffusers_text_encoder(full)
    assert type(cut) is CLIPTextModel and cut.config.num_hidden_layers == 23
    theirs = {k.removeprefix("text_model."): v for k, v in convert_open_clip_checkpoint(full, sd, prefix=prefix).items()}
    ours = cut.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())
    ids = torch.tensor([[49406, 320, 2368, 49407] + [0] * 73])
    with torch.no_grad():
        penultimate = full.text_model.final_layer_norm(full(input_ids=ids, output_hidden_states=True).hidden_states[-2])
        torch.testing.assert_close(cut(input_ids=ids).last_hidden_state, penultimate, atol=1e-5, rtol=1e-5)
    with pytest.raises(HuabiError, match=r"expected the full SD2 tower \(CLIPTextModelWithProjection\), got CLIPTextModel"):
        sd2_diffusers_text_encoder(cut)


# ---------------------------------------------------------------- against an OpenCLIP forward


def open_clip_forward(sd: dict, prefix: str, ids: torch.Tensor, layers: int, heads: int | None = None):
    """The OpenCLIP text transformer written with torch.nn.MultiheadAttention, as open_clip builds it."""
    hidden = sd[prefix + "token_embedding.weight"].shape[1]
    x = F.embedding(ids, sd[prefix + "token_embedding.weight"]) + sd[prefix + "positional_embedding"][: ids.shape[1]]
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    states = [x]
    for i in range(layers):
        b = f"{prefix}transformer.resblocks.{i}."
        attn = torch.nn.MultiheadAttention(hidden, heads or hidden // 64, batch_first=True)
        attn.load_state_dict({
            "in_proj_weight": sd[b + "attn.in_proj_weight"], "in_proj_bias": sd[b + "attn.in_proj_bias"],
            "out_proj.weight": sd[b + "attn.out_proj.weight"], "out_proj.bias": sd[b + "attn.out_proj.bias"],
        })
        h = F.layer_norm(x, (hidden,), sd[b + "ln_1.weight"], sd[b + "ln_1.bias"])
        x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.layer_norm(x, (hidden,), sd[b + "ln_2.weight"], sd[b + "ln_2.bias"])
        h = F.gelu(F.linear(h, sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"]))
        x = x + F.linear(h, sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])
        states.append(x)
    final = F.layer_norm(x, (hidden,), sd[prefix + "ln_final.weight"], sd[prefix + "ln_final.bias"])
    pooled = final[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ sd[prefix + "text_projection"]
    return states, pooled


def test_open_clip_semantics_match_reference_forward():
    """Two heads (hidden 128): q/k/v order, head split, gelu, projection direction all checked by values."""
    prefix = "cond_stage_model.model."
    sd = open_clip_state_dict(prefix, hidden=128, layers=2, proj=48, seed=3)
    (model,) = text_encoders_from_original(sd, ModelFamily.SD2)
    assert model.config.num_attention_heads == 2
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70, [49406, 1929, 49407] + [0] * 74])
    with torch.no_grad():
        ref_states, ref_pooled = open_clip_forward(sd, prefix, ids, layers=2)
        out = model(input_ids=ids, output_hidden_states=True)
    # float32 on CPU, sdpa vs MultiheadAttention: measured max |diff| 0.0 here; tolerance allows other kernels
    for ours, ref in zip(out.hidden_states, ref_states, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.text_embeds, ref_pooled, atol=1e-5, rtol=1e-5)


def test_attention_heads_override():
    """A custom tower with 32-wide heads loads correctly only with the explicit head count."""
    prefix = "cond_stage_model.model."
    sd = open_clip_state_dict(prefix, hidden=128, layers=1, proj=16, seed=4)
    ids = torch.tensor([[49406, 320, 2368, 49407] + [0] * 73])
    (model,) = text_encoders_from_original(sd, ModelFamily.SD2, attention_heads=[4])
    assert model.config.num_attention_heads == 4
    with torch.no_grad():
        ref_states, _ = open_clip_forward(sd, prefix, ids, layers=1, heads=4)
        torch.testing.assert_close(model(input_ids=ids, output_hidden_states=True).hidden_states[-1], ref_states[-1],
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(HuabiError, match=r"attention_heads=3 does not divide the hidden size 128 of 'cond_stage_model\.model\.'"):
        text_encoders_from_original(sd, ModelFamily.SD2, attention_heads=[3])
    with pytest.raises(HuabiError, match=r"attention_heads needs 1 value\(s\) for sd2, got 2"):
        text_encoders_from_original(sd, ModelFamily.SD2, attention_heads=[2, 2])


# ---------------------------------------------------------------- round trips and shapes


@pytest.mark.parametrize("family", list(ModelFamily))
def test_round_trip_bit_identical(family):
    sd = original_checkpoint(family)
    encoders = text_encoders_from_original(sd, family)
    back = text_encoders_to_original(encoders, family)
    expected = _without_ignored(sd, family)
    assert set(back) == set(expected)
    for key, tensor in expected.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    assert sorted(unconverted_text_encoder_keys(sd, family)) == sorted(
        k for k in sd if k.endswith(("position_ids", "logit_scale"))
    )


@pytest.mark.parametrize("family", list(ModelFamily))
def test_round_trip_from_tiny_configs(family):
    torch.manual_seed(0)
    encoders = [
        (CLIPTextModelWithProjection if c.hidden_act == "gelu" else CLIPTextModel)(c)
        for c in tiny_text_encoder_configs(family)
    ]
    sd = text_encoders_to_original(encoders, family)
    again = text_encoders_to_original(text_encoders_from_original(sd, family), family)
    assert set(sd) == set(again) and all(torch.equal(sd[k], again[k]) for k in sd)
    for rebuilt, original in zip(text_encoders_from_original(sd, family), encoders, strict=True):
        assert type(rebuilt) is type(original)
        for field in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                      "max_position_embeddings", "vocab_size", "hidden_act", "projection_dim"):
            assert getattr(rebuilt.config, field) == getattr(original.config, field), field


def test_tiny_configs_shape():
    sdxl = tiny_text_encoder_configs(ModelFamily.SDXL)
    assert [c.hidden_act for c in sdxl] == ["quick_gelu", "gelu"]
    assert all(c.hidden_size == 64 and c.num_hidden_layers == 2 and c.vocab_size == 49408 for c in sdxl)
    assert sdxl[1].projection_dim == 64


def test_half_precision_round_trip():
    family = ModelFamily.SDXL
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in original_checkpoint(family).items()}
    encoders = text_encoders_from_original(sd, family, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for e in encoders for p in e.parameters())
    back = text_encoders_to_original(encoders, family)
    for key, tensor in _without_ignored(sd, family).items():
        assert torch.equal(back[key], tensor), key


def test_dtype_cast_and_dims_from_shapes():
    sd = open_clip_state_dict("conditioner.embedders.0.model.", hidden=192, layers=3, proj=40)
    (model,) = text_encoders_from_original(sd, ModelFamily.SDXL_REFINER, dtype=torch.bfloat16)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.num_attention_heads, c.projection_dim) == (
        192, 3, 768, 3, 40)
    assert c.hidden_act == "gelu" and c.eos_token_id == 49407
    assert model.text_projection.weight.dtype == torch.bfloat16
    assert model.text_model.embeddings.position_ids.device.type == "cpu"
    assert not model.training


def test_sd1_without_text_model_prefix():
    prefix = "cond_stage_model.transformer."
    plain = hf_clip_state_dict(prefix, text_model=False)
    canonical = hf_clip_state_dict(prefix, text_model=True)
    (a,) = text_encoders_from_original(plain, ModelFamily.SD1)
    (b,) = text_encoders_from_original(canonical, ModelFamily.SD1)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert set(text_encoders_to_original([a], ModelFamily.SD1)) == set(_without_ignored(canonical, ModelFamily.SD1))


def test_sd2_without_projection_builds_plain_model():
    sd = open_clip_state_dict("cond_stage_model.model.", proj=None)
    (model,) = text_encoders_from_original(sd, ModelFamily.SD2)
    assert type(model) is CLIPTextModel
    back = text_encoders_to_original([model], ModelFamily.SD2)
    assert "cond_stage_model.model.text_projection" not in back


# ---------------------------------------------------------------- bad inputs


def test_error_no_weights_under_prefix():
    with pytest.raises(HuabiError, match=r"no text encoder weights under 'conditioner\.embedders\.1\.model\.' \(needed for sdxl\)"):
        text_encoders_from_original(hf_clip_state_dict("conditioner.embedders.0.transformer."), ModelFamily.SDXL)


def test_error_missing_key():
    sd = original_checkpoint(ModelFamily.SD2)
    del sd["cond_stage_model.model.transformer.resblocks.1.mlp.c_fc.bias"]
    with pytest.raises(HuabiError, match=r"lacks 'cond_stage_model\.model\.transformer\.resblocks\.1\.mlp\.c_fc\.bias'"):
        text_encoders_from_original(sd, ModelFamily.SD2)


def test_error_missing_token_embedding():
    sd = original_checkpoint(ModelFamily.SD1)
    del sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    with pytest.raises(HuabiError, match=r"lack 'embeddings\.token_embedding\.weight'"):
        text_encoders_from_original(sd, ModelFamily.SD1)


def test_error_unexpected_key():
    sd = original_checkpoint(ModelFamily.SD2)
    sd["cond_stage_model.model.transformer.resblocks.0.attn.rotary"] = torch.zeros(1)
    with pytest.raises(HuabiError, match=r"unexpected text encoder key 'cond_stage_model\.model\.transformer\.resblocks\.0\.attn\.rotary'"):
        text_encoders_from_original(sd, ModelFamily.SD2)


def test_error_unexpected_hf_key():
    sd = original_checkpoint(ModelFamily.SD1)
    sd["cond_stage_model.transformer.text_model.pooler.weight"] = torch.zeros(1)
    with pytest.raises(HuabiError, match=r"unexpected text encoder key 'cond_stage_model\.transformer\.text_model\.pooler\.weight'"):
        text_encoders_from_original(sd, ModelFamily.SD1)


def test_error_wrong_shape():
    sd = original_checkpoint(ModelFamily.SDXL)
    sd["conditioner.embedders.1.model.transformer.resblocks.0.ln_2.bias"] = torch.zeros(63)
    with pytest.raises(HuabiError, match=r"'conditioner\.embedders\.1\.model\.transformer\.resblocks\.0\.ln_2\.bias' has shape \[63\], expected \[64\]"):
        text_encoders_from_original(sd, ModelFamily.SDXL)


def test_error_in_proj_not_divisible():
    sd = original_checkpoint(ModelFamily.SD2)
    sd["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias"] = torch.zeros(100)
    with pytest.raises(HuabiError, match=r"in_proj_bias' has 100 rows, not a multiple of 3"):
        text_encoders_from_original(sd, ModelFamily.SD2)


def test_error_small_vocab():
    sd = original_checkpoint(ModelFamily.SD2)
    sd["cond_stage_model.model.token_embedding.weight"] = torch.zeros(1000, 64)
    with pytest.raises(HuabiError, match=r"token embedding has 1000 rows; the CLIP tokenizer needs at least 49408"):
        text_encoders_from_original(sd, ModelFamily.SD2)


def test_error_layer_gap():
    sd = original_checkpoint(ModelFamily.SD1)
    sd = {k.replace("encoder.layers.1.", "encoder.layers.2."): v for k, v in sd.items()}
    with pytest.raises(HuabiError, match=r"has layers \[0, 2\], expected 0\.\.N-1"):
        text_encoders_from_original(sd, ModelFamily.SD1)


def test_error_duplicate_spelling():
    sd = original_checkpoint(ModelFamily.SD1)
    sd["cond_stage_model.transformer.final_layer_norm.bias"] = torch.zeros(64)
    with pytest.raises(HuabiError, match=r"'cond_stage_model\.transformer\.final_layer_norm\.bias' appears both with and without 'text_model\.'"):
        text_encoders_from_original(sd, ModelFamily.SD1)


def test_error_wrong_encoder_count_and_type():
    encoders = text_encoders_from_original(original_checkpoint(ModelFamily.SDXL), ModelFamily.SDXL)
    with pytest.raises(HuabiError, match=r"sdxl has 2 text encoder\(s\), got 1"):
        text_encoders_to_original(encoders[:1], ModelFamily.SDXL)
    with pytest.raises(HuabiError, match=r"is a Linear, not a transformers CLIP text model"):
        text_encoders_to_original([torch.nn.Linear(1, 1)], ModelFamily.SD1)
    with pytest.raises(HuabiError, match=r"must not have a text projection"):
        text_encoders_to_original([encoders[1]], ModelFamily.SD1)


def test_family_given_as_string():
    sd = original_checkpoint(ModelFamily.SD1)
    assert set(text_encoders_to_original(text_encoders_from_original(sd, "sd1"), "sd1")) == set(
        _without_ignored(sd, ModelFamily.SD1))


def test_load_tokenizers_reexported():
    from huabi.models import text_encoders, tokenizer

    assert text_encoders.load_tokenizers is tokenizer.load_tokenizers


def test_error_unknown_family():
    with pytest.raises(HuabiError, match=r"no text encoder layout for model family 'sd9'"):
        text_encoders_from_original({}, "sd9")
