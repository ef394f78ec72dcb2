"""Prompt conditioning on tiny random encoders: A1111 chunking, clip skip, SDXL pooled, padding.

References: diffusers' own ``encode_prompt`` (SD1, SD2 and SDXL pipelines built
around the tiny encoders) for single-chunk prompts, and manual computations.
Tolerances: results that may differ only by float32 rounding (other batch
size, other kernels) use atol = rtol = 1e-5 (measured max |diff| 7.2e-7 on this
CPU); results that must be bit-identical use torch.equal.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from huabi.core.conditioning import (
    Conditioning,
    encode_negative_prompts,
    encode_prompts,
    encode_weighted_prompts,
    pad_to_same_length,
    sdxl_add_time_ids,
    split_into_chunks,
)
from huabi.errors import HuabiError
from huabi.models.family import ModelFamily
from huabi.models.text_encoders import (
    sd2_diffusers_text_encoder,
    text_encoders_from_original,
    text_encoders_to_original,
    tiny_text_encoder_configs,
)
from huabi.models.tokenizer import load_tokenizers

ATOL = 1e-5
CAT, DOG, COMMA = 2368, 1929, 267


def _model(config: CLIPTextConfig) -> torch.nn.Module:
    cls = CLIPTextModelWithProjection if config.hidden_act == "gelu" else CLIPTextModel
    return cls(config).eval()


@functools.cache
def tokenizers(family: ModelFamily):
    return load_tokenizers(family)


@functools.cache
def encoders(family: ModelFamily):
    torch.manual_seed(7)
    return [_model(c) for c in tiny_text_encoder_configs(family)]


def encode(family, prompts, **kw) -> Conditioning:
    with torch.no_grad():
        return encode_prompts(encoders(family), tokenizers(family), family, prompts, **kw)


def close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=ATOL)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("family", "width", "pooled"),
    [
        (ModelFamily.SD1, 64, None),
        (ModelFamily.HUABI_MINI, 64, None),
        (ModelFamily.SD2, 64, None),
        (ModelFamily.SDXL, 128, 64),
        (ModelFamily.SDXL_REFINER, 64, 64),
    ],
)
def test_shapes(family, width, pooled):
    cond = encode(family, ["a cat", ""])
    assert cond.context.shape == (2, 77, width) and cond.context.dtype == torch.float32
    assert cond.chunks == 1 and cond.empty_chunk.shape == (1, 77, width)
    assert (cond.pooled is None) if pooled is None else (cond.pooled.shape == (2, pooled))


def test_sdxl_widths_add_up_and_pooled_uses_projection():
    c1, c2 = tiny_text_encoder_configs(ModelFamily.SDXL)
    c2 = CLIPTextConfig(**{**c2.to_dict(), "hidden_size": 96, "projection_dim": 48})
    torch.manual_seed(3)
    pair = [_model(c1), _model(c2)]
    with torch.no_grad():
        cond = encode_prompts(pair, tokenizers(ModelFamily.SDXL), ModelFamily.SDXL, ["a cat", "cat " * 100])
    assert cond.context.shape == (2, 154, 64 + 96) and cond.pooled.shape == (2, 48)


# ---------------------------------------------------------------- against diffusers' encode_prompt


def test_sd1_matches_diffusers():
    from diffusers import StableDiffusionPipeline

    family = ModelFamily.SD1
    (encoder,) = encoders(family)
    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=encoder, tokenizer=tokenizers(family)[0], unet=None, scheduler=None,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    prompts = ["a photo of a cat", "masterpiece, best quality, 1girl"]
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    close(encode(family, prompts).context, theirs)


def test_sd2_matches_diffusers_penultimate():
    """diffusers' SD2 encoder is the OpenCLIP tower minus its last layer; we read hidden_states[-2] + final LN."""
    from diffusers import StableDiffusionPipeline

    family = ModelFamily.SD2
    (encoder,) = encoders(family)
    short_config = CLIPTextConfig(**{**encoder.config.to_dict(), "num_hidden_layers": 1})
    short = CLIPTextModel(short_config).eval()
    inner = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    missing, unexpected = short.load_state_dict(inner, strict=False)
    assert missing == [] and all(k.startswith("encoder.layers.1.") or k == "text_projection.weight" for k in unexpected)
    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=short, tokenizer=tokenizers(family)[0], unet=None, scheduler=None,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    prompts = ["a photo of a cat", "an oil painting"]
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    close(encode(family, prompts).context, theirs)
    # A1111 ignores clip skip for SD2.
    assert torch.equal(encode(family, prompts, clip_skip=2).context, encode(family, prompts).context)


def test_sd2_diffusers_form_conditions_the_same():
    """A diffusers-folder SD2 encoder (cut tower, no projection), also after a trip through the original layout."""
    family = ModelFamily.SD2
    (full,) = encoders(family)
    cut = sd2_diffusers_text_encoder(full)
    (via_file,) = text_encoders_from_original(text_encoders_to_original([cut], family), family)
    prompts = ["a photo of a cat", "cat " * 90]
    reference = encode(family, prompts).context
    for encoder in (cut, via_file):
        with torch.no_grad():
            close(encode_prompts([encoder], tokenizers(family), family, prompts).context, reference)


def test_sdxl_matches_diffusers():
    from diffusers import StableDiffusionXLPipeline

    family = ModelFamily.SDXL
    e1, e2 = encoders(family)
    t1, t2 = tokenizers(family)
    pipe = StableDiffusionXLPipeline(
        vae=None, text_encoder=e1, text_encoder_2=e2, tokenizer=t1, tokenizer_2=t2, unet=None, scheduler=None
    )
    prompts = ["a photo of a cat", "a dog, watercolor"]
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    ours = encode(family, prompts)
    close(ours.context, context)
    close(ours.pooled, pooled)
    assert torch.equal(encode(family, prompts, clip_skip=2).context, ours.context)  # ignored, as in A1111


def test_refiner_is_penultimate_without_final_norm():
    family = ModelFamily.SDXL_REFINER
    (encoder,) = encoders(family)
    ids = tokenizers(family)[0](["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids[0, 4:].eq(0).all()  # OpenCLIP padding
    with torch.no_grad():
        out = encoder(input_ids=ids, output_hidden_states=True)
    ours = encode(family, ["a cat"])
    close(ours.context, out.hidden_states[-2])
    close(ours.pooled, out.text_embeds)


# ---------------------------------------------------------------- chunks


def test_long_prompt_two_chunks_and_tail_only_changes_second():
    family = ModelFamily.SD1
    long_a = "cat " * 100
    long_b = "cat " * 99 + "dog"
    a = encode(family, [long_a])
    b = encode(family, [long_b])
    assert a.context.shape == (1, 154, 64)
    assert torch.equal(a.context[:, :77], b.context[:, :77])
    assert not torch.allclose(a.context[:, 77:], b.context[:, 77:])
    # The second chunk is its own [BOS] + 25 tokens + [EOS] + padding.
    (encoder,) = encoders(family)
    ids = torch.tensor([[49406] + [CAT] * 25 + [49407] * 51])
    with torch.no_grad():
        close(a.context[:, 77:], encoder(input_ids=ids).last_hidden_state)


def test_clip_skip_two_equals_manual():
    family = ModelFamily.SD1
    (encoder,) = encoders(family)
    ids = tokenizers(family)[0](["a red apple"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = encoder(input_ids=ids, output_hidden_states=True)
        manual = encoder.final_layer_norm(out.hidden_states[-2])
    skip2 = encode(family, ["a red apple"], clip_skip=2).context
    close(skip2, manual)
    close(encode(family, ["a red apple"]).context, out.last_hidden_state)
    assert not torch.allclose(skip2, out.last_hidden_state)


def test_batch_equals_prompts_alone():
    family = ModelFamily.SDXL
    short, long = "a cat", "cat, " * 40 + "dog " * 30
    both = encode(family, [short, long])
    assert both.chunks == 2
    alone_long = encode(family, [long])
    close(both.context[1:], alone_long.context)
    close(both.pooled[1:], alone_long.pooled)
    alone_short = encode(family, [short])
    close(both.context[:1, :77], alone_short.context)
    close(both.pooled[:1], alone_short.pooled)
    # The padding chunk is an encoded empty prompt.
    close(both.context[:1, 77:], encode(family, [""]).context)
    close(both.context[:1], encode(family, [short], min_chunks=2).context)


def test_sdxl_pooled_from_first_chunk():
    family = ModelFamily.SDXL
    _, bigg = encoders(family)
    cond = encode(family, ["dog " * 75 + "cat " * 10])
    ids = torch.tensor([[49406] + [DOG] * 75 + [49407]])
    with torch.no_grad():
        close(cond.pooled, bigg(input_ids=ids).text_embeds)


def test_min_chunks():
    cond = encode(ModelFamily.SD2, ["a cat"], min_chunks=3)
    assert cond.context.shape == (1, 231, 64)


def test_pad_to_same_length_equals_encoding_with_more_chunks():
    for family in (ModelFamily.SD1, ModelFamily.SDXL):
        short, long = encode(family, ["ugly, blurry"]), encode(family, ["cat " * 80, "dog " * 10])
        padded_short, same_long = pad_to_same_length(short, long)
        assert same_long is long
        close(padded_short.context, encode(family, ["ugly, blurry"], min_chunks=2).context)
        assert padded_short.pooled is short.pooled
        back_long, back_short = pad_to_same_length(long, short)  # order does not matter
        assert back_long is long and torch.equal(back_short.context, padded_short.context)


def test_pad_without_empty_chunk_repeats_last_state():
    a = Conditioning(torch.arange(6.0).reshape(1, 3, 2), None)
    b = Conditioning(torch.zeros(2, 5, 2), None)
    pa, pb = pad_to_same_length(a, b)
    assert pb is b
    assert pa.context.tolist() == [[[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]]]


def test_pad_width_mismatch_error():
    with pytest.raises(HuabiError, match=r"conditionings differ in width \(64 vs 128\)"):
        pad_to_same_length(encode(ModelFamily.SD1, ["a"]), encode(ModelFamily.SDXL, ["a"]))


@pytest.mark.parametrize("family", [ModelFamily.SDXL, ModelFamily.SDXL_REFINER])
def test_sdxl_empty_negative_is_zero(family):
    enc, toks = encoders(family), tokenizers(family)
    with torch.no_grad():
        zero = encode_negative_prompts(enc, toks, family, ["", ""])
        text = encode_negative_prompts(enc, toks, family, ["", "blurry"])
        space = encode_negative_prompts(enc, toks, family, [" "])
    assert zero.context.shape == (2, 77, zero.context.shape[-1]) and not zero.context.any() and not zero.pooled.any()
    assert torch.equal(zero.empty_chunk, encode(family, [""]).empty_chunk)
    assert torch.equal(text.context, encode(family, ["", "blurry"]).context)  # only an all-empty batch is zeroed
    assert space.context.any()


def test_sdxl_empty_negative_matches_diffusers():
    from diffusers import StableDiffusionXLPipeline

    family = ModelFamily.SDXL
    e1, e2 = encoders(family)
    t1, t2 = tokenizers(family)
    pipe = StableDiffusionXLPipeline(
        vae=None, text_encoder=e1, text_encoder_2=e2, tokenizer=t1, tokenizer_2=t2, unet=None, scheduler=None
    )
    with torch.no_grad():
        _, negative, _, negative_pooled = pipe.encode_prompt(["a cat"], device="cpu")
        ours = encode_negative_prompts([e1, e2], [t1, t2], family, [""])
    assert torch.equal(ours.context, negative) and torch.equal(ours.pooled, negative_pooled)


def test_sd1_empty_negative_is_encoded():
    with torch.no_grad():
        neg = encode_negative_prompts(encoders(ModelFamily.SD1), tokenizers(ModelFamily.SD1), ModelFamily.SD1, [""])
    assert torch.equal(neg.context, encode(ModelFamily.SD1, [""]).context)


# ---------------------------------------------------------------- comma backtracking


def _lengths(ids):
    return [len(chunk) for chunk, _ in split_into_chunks(ids, [1.0] * len(ids), comma_id=COMMA)]


def test_comma_backtrack_rules():
    assert _lengths([CAT] * 60 + [COMMA] + [CAT] * 30) == [61, 30]  # comma 15 from the end: moved
    assert _lengths([CAT] * 55 + [COMMA] + [CAT] * 30) == [56, 30]  # exactly 20 from the end: moved
    assert _lengths([CAT] * 54 + [COMMA] + [CAT] * 30) == [75, 10]  # 21 from the end: not moved
    assert _lengths([CAT] * 75 + [COMMA] + [CAT] * 5) == [75, 6]  # a comma that starts a chunk
    assert _lengths([CAT] * 74 + [COMMA] + [CAT] * 5) == [75, 5]  # comma is the chunk's last token
    assert _lengths([CAT] * 150) == [75, 75]
    assert _lengths([]) == [0]
    chunks = split_into_chunks([CAT] * 70 + [COMMA] + [DOG] * 10, [1.0] * 70 + [2.0] + [1.5] * 10, comma_id=COMMA)
    assert [c[0] for c in chunks] == [[CAT] * 70 + [COMMA], [DOG] * 10]
    assert chunks[0][1][-1] == 2.0 and chunks[1][1] == [1.5] * 10
    assert [len(c) for c, _ in split_into_chunks([CAT] * 60 + [COMMA] + [CAT] * 30, [1.0] * 91, comma_id=None)] == [75, 16]


def test_comma_backtrack_in_encoding():
    family = ModelFamily.SD1
    cond = encode(family, ["cat " * 60 + ", " + "dog " * 30])
    assert cond.chunks == 2
    close(cond.context[:, :77], encode(family, ["cat " * 60 + ","]).context)
    close(cond.context[:, 77:], encode(family, ["dog " * 30]).context)


def test_split_length_mismatch_error():
    with pytest.raises(HuabiError, match=r"token ids \(2\) and weights \(1\) differ in length"):
        split_into_chunks([1, 2], [1.0], comma_id=None)


# ---------------------------------------------------------------- weights seam


def test_weighted_runs():
    family = ModelFamily.SD1
    enc, toks = encoders(family), tokenizers(family)
    with torch.no_grad():
        plain = encode_weighted_prompts(enc, toks, family, [[("a red apple", 1.0)]]).context
        split = encode_weighted_prompts(enc, toks, family, [[("a red ", 1.0), ("apple", 1.0)]]).context
        weighted = encode_weighted_prompts(enc, toks, family, [[("a red ", 1.0), ("apple", 1.5)]]).context
    assert torch.equal(plain, encode(family, ["a red apple"]).context)
    close(split, plain)
    assert not torch.allclose(weighted, plain)
    torch.testing.assert_close(weighted.mean(), plain.mean(), atol=1e-6, rtol=1e-5)  # mean kept, as A1111
    # Only the weighted token's state changes direction; the others are rescaled uniformly.
    ratio = weighted[0, 3] / plain[0, 3]
    close(ratio, torch.full_like(ratio, ratio[0].item()))


# ---------------------------------------------------------------- dtype


def test_runs_in_encoder_dtype():
    family = ModelFamily.SD1
    torch.manual_seed(0)
    encoder = _model(tiny_text_encoder_configs(family)[0]).to(torch.bfloat16)
    with torch.no_grad():
        cond = encode_prompts([encoder], tokenizers(family), family, ["a cat"])
    assert cond.context.dtype == torch.bfloat16 and cond.context.device.type == "cpu"


# ---------------------------------------------------------------- SDXL size ids


def test_sdxl_add_time_ids():
    ids = sdxl_add_time_ids((1024, 768), (0, 16), (1024, 768), dtype=torch.float16, device="cpu")
    assert ids.tolist() == [[1024, 768, 0, 16, 1024, 768]] and ids.dtype == torch.float16
    refiner = sdxl_add_time_ids((1024, 1024), (0, 0), (1024, 1024), aesthetic_score=6.0, dtype=torch.float32, device="cpu")
    assert refiner.tolist() == [[1024, 1024, 0, 0, 6.0]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (((0, 5), (0, 0), (8, 8)), r"original_size_hw must be a pair of integers >= 1, got \(0, 5\)"),
        (((8, 8), (-1, 0), (8, 8)), r"crop_top_left must be a pair of integers >= 0, got \(-1, 0\)"),
        (((8, 8), (0, 0), "1024"), r"target_size_hw must be a pair of integers, got '1024'"),
        (((8, 8), (0, 0), (True, 8)), r"target_size_hw must be a pair of integers >= 1, got \(True, 8\)"),
        (((8.5, 8), (0, 0), (8, 8)), r"original_size_hw must be a pair of integers >= 1"),
    ],
)
def test_sdxl_add_time_ids_errors(args, message):
    with pytest.raises(HuabiError, match=message):
        sdxl_add_time_ids(*args, dtype=torch.float32, device="cpu")


# ---------------------------------------------------------------- bad inputs


def test_errors():
    sd1, sdxl = ModelFamily.SD1, ModelFamily.SDXL
    enc, toks = encoders(sd1), tokenizers(sd1)
    cases = [
        (lambda: encode_prompts(enc, tokenizers(sdxl), sdxl, ["a"]), r"sdxl needs 2 text encoder\(s\), got 1"),
        (lambda: encode_prompts(encoders(sdxl), toks, sdxl, ["a"]), r"sdxl needs 2 tokenizer\(s\), got 1"),
        (lambda: encode_prompts(enc, toks, sd1, []), r"prompts: at least one prompt is needed"),
        (lambda: encode_prompts(enc, toks, sd1, "a cat"), r"prompts must be a list of strings, not one string"),
        (lambda: encode_prompts(enc, toks, sd1, ["a", None]), r"prompts\[1\] is a NoneType, not a string"),
        (lambda: encode_prompts(enc, toks, sd1, ["a"], clip_skip=0), r"clip_skip must be an integer >= 1, got 0"),
        (lambda: encode_prompts(enc, toks, sd1, ["a"], clip_skip=3), r"clip_skip=3 exceeds the text encoder's 2 layers"),
        (lambda: encode_prompts(enc, toks, sd1, ["a"], min_chunks=0), r"min_chunks must be an integer >= 1, got 0"),
        (lambda: encode_prompts(enc, toks, "sd9", ["a"]), r"no prompt conditioning for model family 'sd9'"),
        (
            lambda: encode_prompts([encoders(sdxl)[0]] * 2, tokenizers(sdxl), sdxl, ["a"]),
            r"CLIPTextModel has no text projection; SDXL's second encoder needs one",
        ),
    ]
    for call, message in cases:
        with pytest.raises(HuabiError, match=message):
            with torch.no_grad():
                call()
