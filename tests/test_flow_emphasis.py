"""Emphasis for SD3/FLUX as Forge does it: ``(word:w)`` parsed for every encoder, each run tokenized
with its weight, A1111's "Original" emphasis (scale tokens, restore the mean) on T5's and SD3's CLIP
hidden states; FLUX's CLIP-L gives only a pooled vector, which emphasis does not touch. A prompt
without emphasis gives exactly the tokenizers' own ids (the path the diffusers comparisons cover)."""

from __future__ import annotations

import pytest
import torch

from flow_fixtures import TinyFlowModel
from huabi.models.transformer_families import TransformerFamily as F
from huabi.pipelines.flow import clip_tokenizer, encode_flux, encode_sd3, t5_tokenizer, weighted_ids

TEXTS = ["a red apple on a wooden table", "", "photo, 8k, " * 40]


@pytest.mark.parametrize("tokenizer", [clip_tokenizer(True), clip_tokenizer(False), t5_tokenizer()],
                         ids=["clip_l", "clip_g", "t5"])
def test_plain_prompts_give_the_tokenizers_own_ids(tokenizer):
    length = 77 if tokenizer.bos_token_id is not None else 128
    ids, weights = weighted_ids(tokenizer, TEXTS, length, "cpu")
    expected = tokenizer(TEXTS, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, expected) and bool((weights == 1).all())


def _forge_original(z: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    original = z.mean()
    scaled = z * multipliers[..., None]
    return scaled * (original / scaled.mean())


def test_t5_emphasis_scales_the_weighted_tokens_and_keeps_the_mean():
    model = TinyFlowModel(F.FLUX_DEV)

    class Encoders:
        clip_l, t5 = model.clip_l, model.t5

    plain = encode_flux(Encoders, ["a red apple"], t5_tokens=16, device="cpu", dtype=torch.float32)
    same = encode_flux(Encoders, ["a (red:1.0) apple"], t5_tokens=16, device="cpu", dtype=torch.float32)
    assert torch.equal(plain.tokens, same.tokens) and torch.equal(plain.pooled, same.pooled)
    weighted = encode_flux(Encoders, ["a (red:1.5) apple"], t5_tokens=16, device="cpu", dtype=torch.float32)
    ids, multipliers = weighted_ids(t5_tokenizer(), ["a (red:1.5) apple"], 16, "cpu")
    red = t5_tokenizer()("red", add_special_tokens=False).input_ids
    assert multipliers[0].tolist().count(1.5) == len(red)
    assert torch.allclose(weighted.tokens, _forge_original(plain.tokens, multipliers), atol=1e-6)
    assert torch.equal(weighted.pooled, plain.pooled)  # CLIP-L's pooled output: syntax removed, no emphasis


def test_sd3_clip_hidden_states_take_emphasis_too():
    model = TinyFlowModel(F.SD3_MEDIUM)

    class Encoders:
        clip_l, clip_g, t5 = model.clip_l, model.clip_g, None

    plain = encode_sd3(Encoders, ["a red apple"], t5_tokens=8, joint_dim=32, device="cpu", dtype=torch.float32)
    weighted = encode_sd3(Encoders, ["a [red] apple"], t5_tokens=8, joint_dim=32, device="cpu", dtype=torch.float32)
    _, multipliers = weighted_ids(clip_tokenizer(True), ["a [red] apple"], 77, "cpu")
    assert pytest.approx(1 / 1.1) in multipliers[0].tolist()
    clip_l_width = 32
    expected = _forge_original(plain.tokens[:, :77, :clip_l_width], multipliers)
    assert torch.allclose(weighted.tokens[:, :77, :clip_l_width], expected, atol=1e-6)
    assert torch.equal(weighted.pooled, plain.pooled)
