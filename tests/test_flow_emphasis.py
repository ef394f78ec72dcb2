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


# --------------------------------------------------------------------------- textual inversion


def _reference_with_new_tokens(clip, tokenizer, text_before: str, vectors: torch.Tensor, text_after: str):
    """An independent reference: the CLIP tower with the vectors appended to its vocabulary as new
    token ids, fed ids built by hand (no hooks), as diffusers' load_textual_inversion does it."""
    import copy

    model = copy.deepcopy(clip)
    vocab = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(vocab + vectors.shape[0])
    with torch.no_grad():
        model.get_input_embeddings().weight[vocab:] = vectors
    before = tokenizer(text_before, add_special_tokens=False).input_ids
    after = tokenizer(text_after, add_special_tokens=False).input_ids
    ids = [tokenizer.bos_token_id, *before, *range(vocab, vocab + vectors.shape[0]), *after, tokenizer.eos_token_id]
    ids += [tokenizer.pad_token_id] * (77 - len(ids))
    return model, torch.tensor([ids])


def test_flux_textual_inversion_reaches_clip_l_pooled_only():
    model = TinyFlowModel(F.FLUX_DEV)
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(4))

    class Encoders:
        clip_l, t5 = model.clip_l, model.t5

    used = []
    ours = encode_flux(Encoders, ["a shiny-tok apple"], t5_tokens=16, device="cpu", dtype=torch.float32,
                       embeddings={"shiny-tok": (vectors,)}, used=used)
    assert used == ["shiny-tok"]
    reference_model, ids = _reference_with_new_tokens(model.clip_l, clip_tokenizer(True), "a", vectors, "apple")
    pooled = reference_model.text_model(input_ids=ids).pooler_output
    assert torch.allclose(ours.pooled, pooled, atol=1e-6)
    plain = encode_flux(Encoders, ["a shiny-tok apple"], t5_tokens=16, device="cpu", dtype=torch.float32)
    assert torch.equal(ours.tokens, plain.tokens)  # T5 reads the name as text, as in Forge
    assert not torch.allclose(ours.pooled, plain.pooled)


def test_sd3_textual_inversion_uses_sdxl_style_clip_l_and_clip_g_vectors():
    model = TinyFlowModel(F.SD3_MEDIUM)
    generator = torch.Generator().manual_seed(5)
    vectors_l, vectors_g = torch.randn(1, 32, generator=generator), torch.randn(1, 32, generator=generator)

    class Encoders:
        clip_l, clip_g, t5 = model.clip_l, model.clip_g, None

    ours = encode_sd3(Encoders, ["a glossy apple"], t5_tokens=8, joint_dim=32, device="cpu", dtype=torch.float32,
                      embeddings={"glossy": (vectors_l, vectors_g)})
    for index, (clip, tokenizer, vectors) in enumerate(((model.clip_l, clip_tokenizer(True), vectors_l),
                                                        (model.clip_g, clip_tokenizer(False), vectors_g))):
        reference_model, ids = _reference_with_new_tokens(clip, tokenizer, "a", vectors, "apple")
        out = reference_model(input_ids=ids, output_hidden_states=True)
        width = slice(index * 32, index * 32 + 32)
        if index == 0:  # the tiny joint width (32) keeps only CLIP-L's states (real SD3: 768 + 1280 < 4096)
            assert torch.allclose(ours.tokens[0, :77, width], out.hidden_states[-2][0], atol=1e-6)
        assert torch.allclose(ours.pooled[0, width], out.text_embeds[0], atol=1e-6)


def test_engine_records_ti_hashes_for_flux(tmp_path):
    from safetensors.torch import save_file

    from huabi.core.request import GenerationRequest
    from huabi.service.engine import Engine, Job

    model = TinyFlowModel(F.FLUX_SCHNELL)
    model.write_parts(tmp_path)
    model.write_transformer(tmp_path / "flux1-schnell-tiny.safetensors")
    (tmp_path / "embeddings").mkdir()
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(1))},
              str(tmp_path / "embeddings" / "shinystyle.safetensors"))
    engine = Engine(device="cpu", dtype="fp32", models_dir=tmp_path)
    request = GenerationRequest("a shinystyle apple", model="flux1-schnell-tiny", width_px=64, height_px=64, steps=2,
                                sampler="Euler", seed=3, cfg_scale=1.0)
    with_ti = engine.run(Job(request))[0]
    assert 'TI hashes: "shinystyle: ' in with_ti.infotext
    without = engine.run(Job(request.replace(prompt="a apple")))[0]
    assert "TI hashes" not in without.infotext
