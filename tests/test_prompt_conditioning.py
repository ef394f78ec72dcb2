"""A1111 prompt syntax through conditioning and the pipeline, on tiny random-weight models.

Tolerances: exact (``torch.equal``) where the same float operations run; 1e-6
absolute where the same chunk is encoded in a different batch (row order in a
batched matmul may round differently); 1e-5 relative for algebraic identities of
CFG (``0.5 + 0.5`` sub-prompts vs one).
"""

from __future__ import annotations

import pytest
import torch

from huabi.core.conditioning import (
    _apply_weights,
    encode_a1111_prompts,
    encode_negative_prompts,
    encode_prompts,
)
from huabi.core.guidance import CFGDenoiser, PredictionDenoiser, ScheduledInputs, UNetInputs
from huabi.core.samplers import get_sampler
from huabi.core.schedules import DiscreteSchedule, compute_sigmas
from huabi.core.noise import SeededNoiseSampler, initial_noise
from huabi.errors import HuabiError
from huabi.models.load import load_model
from huabi.pipelines.common import denoise, encode_guidance, latent_shape, schedule_steps

SIZE_PX = 64
SEED = 7
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sd1(tiny_sd1_file):
    return load_model(tiny_sd1_file, compute_hash=False)


def encode(bundle, texts, **kw):
    with torch.inference_mode():
        return encode_a1111_prompts(bundle.text_encoders, bundle.tokenizers, bundle.family, texts, **kw)


def latents(bundle, prompt, negative="blurry", *, steps=3, sampler="Euler", cfg=5.0):
    guidance = encode_guidance(bundle, prompt, negative, clip_skip=1, width_px=SIZE_PX, height_px=SIZE_PX, device=CPU)
    return denoise(bundle, guidance, sampler_name=sampler, schedule_name="Karras", steps=steps, cfg_scale=cfg,
                   seeds=[SEED], shape=latent_shape(bundle, SIZE_PX, SIZE_PX), device=CPU)


class Recorder:
    """The real model, remembering the conditioning context of every call."""

    def __init__(self, model: PredictionDenoiser) -> None:
        self.model = model
        self.contexts: list[torch.Tensor] = []

    def __call__(self, x, sigma, inputs: UNetInputs):
        self.contexts.append(inputs.context.clone())
        return self.model(x, sigma, inputs)


def run_recorded(bundle, prompt, *, steps, sampler="Euler", negative="blurry"):
    """Denoise through a CFG denoiser whose model records each call's (uncond, cond) contexts."""
    guidance = encode_guidance(bundle, prompt, negative, clip_skip=1, width_px=SIZE_PX, height_px=SIZE_PX, device=CPU)
    conds, uncond = guidance.conditioning(schedule_steps(sampler, steps))
    schedule = DiscreteSchedule(bundle.alphas_cumprod)
    recorder = Recorder(PredictionDenoiser(bundle.unet, schedule, bundle.prediction))
    denoiser = CFGDenoiser(recorder, conds, uncond, 5.0)
    sigmas = compute_sigmas("Karras", sampler, steps, schedule)
    shape = latent_shape(bundle, SIZE_PX, SIZE_PX)
    x = initial_noise([SEED], shape, device=CPU, dtype=torch.float32) * sigmas[0]
    with torch.inference_mode():
        get_sampler(sampler).fn(denoiser, x, sigmas, noise=SeededNoiseSampler([SEED], shape, device=CPU, dtype=torch.float32))
    return guidance, recorder.contexts


def which(contexts, candidates: dict[str, torch.Tensor]) -> list[str]:
    """Name of the candidate each call's cond row equals (row 1: after the uncond row)."""
    names = []
    for context in contexts:
        cond = context[1]
        matches = [name for name, ctx in candidates.items() if torch.equal(cond, ctx[0])]
        assert len(matches) == 1, matches
        names.append(matches[0])
    return names


# ---------------------------------------------------------------- plain prompts unchanged


def test_plain_prompt_bit_identical_to_plain_encoding(sd1):
    prompt, negative = "a lighthouse on a cliff, watercolor", "blurry"
    ours = latents(sd1, prompt, negative)
    with torch.inference_mode():
        cond = encode_prompts(sd1.text_encoders, sd1.tokenizers, sd1.family, [prompt]).context
        uncond = encode_negative_prompts(sd1.text_encoders, sd1.tokenizers, sd1.family, [negative]).context
        schedule = DiscreteSchedule(sd1.alphas_cumprod)
        denoiser = CFGDenoiser(PredictionDenoiser(sd1.unet, schedule, sd1.prediction), UNetInputs(cond), UNetInputs(uncond), 5.0)
        sigmas = compute_sigmas("Karras", "Euler", 3, schedule)
        x = initial_noise([SEED], latent_shape(sd1, SIZE_PX, SIZE_PX), device=CPU, dtype=torch.float32) * sigmas[0]
        reference = get_sampler("Euler").fn(denoiser, x, sigmas)
    assert torch.equal(ours, reference)


# ---------------------------------------------------------------- long prompts, weights, BREAK


def test_long_prompt_conditions_on_its_last_chunk(sd1):
    words = [f"word{i}" for i in range(66)]  # "wordN" is 3 tokens: ~200 tokens
    base = " ".join(words)
    changed = " ".join(words[:-1] + ["lighthouse"])
    assert encode(sd1, [base]).chunks == 3
    assert not torch.equal(latents(sd1, base), latents(sd1, changed))


def test_weight_one_equals_plain_and_weights_change_the_image(sd1):
    plain = encode(sd1, ["a red apple"]).context
    assert torch.equal(encode(sd1, ["a (red:1.0) apple"]).context, plain)
    assert not torch.equal(encode(sd1, ["a (red:1.5) apple"]).context, plain)
    assert not torch.equal(latents(sd1, "a (red:1.5) apple"), latents(sd1, "a red apple"))


def test_mean_restoring_emphasis_hand_computed():
    # A1111 "Original": z *= weights; z *= old_mean / new_mean.
    states = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    weights = torch.tensor([[1.0, 2.0, 1.0]])
    # old mean 21/6 = 3.5; weighted [[1,2],[6,8],[5,6]] has mean 28/6; factor 3.5 / (28/6) = 0.75
    expected = torch.tensor([[[0.75, 1.5], [4.5, 6.0], [3.75, 4.5]]])
    assert torch.allclose(_apply_weights(states, weights), expected, atol=1e-6)


def test_break_forces_a_new_chunk(sd1):
    assert encode(sd1, ["a cat BREAK a dog"]).chunks == 2
    assert encode(sd1, ["a cat BREAK"]).chunks == 1  # a trailing BREAK adds no empty chunk
    assert encode(sd1, ["BREAK a dog"]).chunks == 2  # a leading one leaves an empty first chunk
    assert encode(sd1, ["a (cat BREAK) dog"]).chunks == 1  # weighted: the word BREAK, not a break
    both = encode(sd1, ["a cat BREAK a dog"]).context
    assert torch.allclose(both[:, :77], encode(sd1, ["a cat"]).context, atol=1e-6)
    assert torch.allclose(both[:, 77:], encode(sd1, ["a dog"]).context, atol=1e-6)


def test_break_pads_the_chunk_before_it():
    from huabi.core.conditioning import _chunk_prompt
    from huabi.models.tokenizer import load_clip_tokenizer

    tokenizer = load_clip_tokenizer()
    chunks = _chunk_prompt(tokenizer, [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.2)], comma_id=None)
    assert [len(ids) for ids, _ in chunks] == [2, 2]
    assert chunks[1][1] == [1.2, 1.2]


# ---------------------------------------------------------------- prompt editing, alternation


def test_prompt_editing_switches_at_a1111s_step(sd1):
    guidance, contexts = run_recorded(sd1, "a [cat:dog:3]", steps=6)
    candidates = {"cat": guidance.encode("a cat", False).context, "dog": guidance.encode("a dog", False).context}
    # A1111: entry (3, "a cat") holds while its call counter (from 0) is <= 3.
    assert which(contexts, candidates) == ["cat"] * 4 + ["dog"] * 2


def test_prompt_editing_with_a_second_order_sampler_counts_calls(sd1):
    assert schedule_steps("Heun", 4) == 8 and schedule_steps("Euler", 4) == 4
    guidance, contexts = run_recorded(sd1, "a [cat:dog:0.5]", steps=4, sampler="Heun")
    candidates = {"cat": guidance.encode("a cat", False).context, "dog": guidance.encode("a dog", False).context}
    assert len(contexts) == 7  # Heun: 2 calls per step, 1 for the step to sigma 0
    assert which(contexts, candidates) == ["cat"] * 5 + ["dog"] * 2  # 0.5 of 8 = 4: calls 0..4


def test_alternation_alternates(sd1):
    guidance, contexts = run_recorded(sd1, "a [cat|dog]", steps=5)
    candidates = {"cat": guidance.encode("a cat", False).context, "dog": guidance.encode("a dog", False).context}
    # entries (1,cat) (2,dog) (3,cat)...; call 0 and call 1 both fall in entry 1, as in A1111
    assert which(contexts, candidates) == ["cat", "cat", "dog", "cat", "dog"]


def test_negative_prompt_supports_editing_and_weights(sd1):
    guidance = encode_guidance(sd1, "a cat", "[blurry:(ugly:1.3):2]", clip_skip=1, width_px=SIZE_PX,
                               height_px=SIZE_PX, device=CPU)
    _conds, uncond = guidance.conditioning(4)
    assert [last for last, _ in uncond.entries] == [2, 4]
    assert torch.equal(uncond.entries[0][1].context, encode(sd1, ["blurry"], negative=True).context)
    assert torch.equal(uncond.entries[1][1].context, encode(sd1, ["(ugly:1.3)"], negative=True).context)
    assert guidance.subprompts == (("a cat", 1.0),)


def test_each_distinct_text_is_encoded_once(sd1):
    guidance = encode_guidance(sd1, "[a|b]", "", clip_skip=1, width_px=SIZE_PX, height_px=SIZE_PX, device=CPU)
    conds, _ = guidance.conditioning(6)
    assert len(conds[0][0].entries) == 6
    # six entries, two texts: every entry of one text is the same encoded object
    assert len({id(inputs) for _, inputs in conds[0][0].entries}) == 2


# ---------------------------------------------------------------- AND


def test_and_with_one_subprompt_of_weight_one_is_the_plain_prompt(sd1):
    assert torch.equal(latents(sd1, "a cat :1"), latents(sd1, "a cat"))
    halves = latents(sd1, "a cat :0.5 AND a cat :0.5")
    plain = latents(sd1, "a cat")
    assert ((halves - plain).abs().max() / plain.abs().max()).item() < 1e-5


def test_and_combines_as_a1111(sd1):
    guidance = encode_guidance(sd1, "a cat :1.2 AND a dog :0.8", "blurry", clip_skip=1, width_px=SIZE_PX,
                               height_px=SIZE_PX, device=CPU)
    assert guidance.subprompts == (("a cat", 1.2), (" a dog", 0.8))
    conds, uncond = guidance.conditioning(1)
    model = PredictionDenoiser(sd1.unet, DiscreteSchedule(sd1.alphas_cumprod), sd1.prediction)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    sigma = torch.tensor([3.0])
    with torch.inference_mode():
        combined = CFGDenoiser(model, conds, uncond, 7.0)(x, sigma)
        u = model(x, sigma, uncond.at(0))
        c1 = model(x, sigma, conds[0][0].at(0))
        c2 = model(x, sigma, conds[1][0].at(0))
    expected = u + (c1 - u) * (1.2 * 7.0) + (c2 - u) * (0.8 * 7.0)
    assert torch.allclose(combined, expected, atol=1e-4, rtol=1e-5)


def test_and_needs_an_uncond():
    with pytest.raises(HuabiError, match="cond: at least one conditioning is needed"):
        CFGDenoiser(lambda *a: None, [], None, 7.0)
    with pytest.raises(HuabiError, match="scheduled conditioning needs at least one entry"):
        ScheduledInputs(())


# ---------------------------------------------------------------- extra networks


def test_extra_network_tags_are_recorded_and_not_encoded(sd1):
    guidance = encode_guidance(sd1, "a cat <lora:style:0.8>", "<hypernet:h:1>blurry", clip_skip=1,
                               width_px=SIZE_PX, height_px=SIZE_PX, device=CPU)
    assert [(t.kind, t.name, t.weights) for t in guidance.extra_networks] == [("lora", "style", (0.8,))]
    assert [(t.kind, t.name) for t in guidance.negative_extra_networks] == [("hypernet", "h")]
    conds, uncond = guidance.conditioning(1)
    assert torch.equal(conds[0][0].at(0).context, encode(sd1, ["a cat"]).context)
    assert torch.equal(uncond.at(0).context, encode(sd1, ["blurry"], negative=True).context)


def test_bad_extra_network_weight_is_a_clear_error(sd1):
    with pytest.raises(HuabiError, match=r"extra-network tag <lora:style:strong> has 'strong' where a number belongs"):
        encode_guidance(sd1, "a cat <lora:style:strong>", "", clip_skip=1, width_px=SIZE_PX, height_px=SIZE_PX, device=CPU)


# ---------------------------------------------------------------- SDXL


def test_sdxl_and_editing_each_part_has_its_own_pooled(tiny_sdxl_file):
    bundle = load_model(tiny_sdxl_file, compute_hash=False)
    guidance = encode_guidance(bundle, "a [cat:dog:1] AND a (tree:1.2) BREAK sky", "", clip_skip=1,
                               width_px=SIZE_PX, height_px=SIZE_PX, device=CPU)
    conds, uncond = guidance.conditioning(3)
    first = conds[0][0]
    cat, dog = first.entries[0][1], first.entries[1][1]
    assert not torch.equal(cat.added["text_embeds"], dog.added["text_embeds"])  # pooled per scheduled text
    second = conds[1][0].at(0)
    assert second.context.shape[1] == 154
    with torch.inference_mode():
        pooled = encode_a1111_prompts(bundle.text_encoders, bundle.tokenizers, bundle.family, [" a (tree:1.2) BREAK sky"]).pooled
    assert torch.equal(second.added["text_embeds"], pooled)  # from that sub-prompt's first chunk
    assert torch.count_nonzero(uncond.at(0).context) == 0  # empty SDXL negative: zeros
    out = latents(bundle, "a [cat:dog:1] AND a (tree:1.2) BREAK sky", "", steps=2)
    assert torch.isfinite(out).all()
