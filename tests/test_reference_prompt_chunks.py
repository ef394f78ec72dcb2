"""Long prompts: huabi's conditioning against A1111's chunking and emphasis rebuilt here (issue 22).

The older tests check huabi's chunker with hand-made id lists and its own encodings. Here the reference
is A1111's ``FrozenCLIPEmbedderWithCustomWords`` behaviour written out in this file: the prompt's
``(text, weight)`` runs tokenized by transformers' ``CLIPTokenizer`` (``truncation=False``, no special
tokens), A1111's ``tokenize_line`` (75 tokens a chunk; a full chunk whose last comma is at most 20
tokens back (A1111's default ``comma_padding_backtrack``) moves the text after the comma to the next
chunk; ``BREAK`` closes the chunk, empty or not; each chunk ``[BOS] + 75 tokens padded with EOS + [EOS]``;
a trailing empty chunk only when there is no chunk at all), each chunk through the same
``CLIPTextModel`` (last hidden state) and A1111's "Original" emphasis (multiply by the weights, then
rescale to the chunk's original mean), chunks joined along the token axis.

The runs come from huabi's ``parse_prompt_attention`` (checked against A1111's documented values in
test_prompt_parser.py): this test is about tokenizing, chunking, padding and emphasis. float32, same
modules: measured max difference 0; asserted 1e-6 relative to the largest value.
"""

from __future__ import annotations

import random

import pytest
import torch

from huabi.core.conditioning import encode_a1111_prompts
from huabi.core.prompt_parser import parse_prompt_attention
from huabi.models.load import load_model

CHUNK = 75
COMMA_BACKTRACK = 20


def a1111_chunks(tokenizer, prompt: str) -> list[tuple[list[int], list[float]]]:
    """A1111's tokenize_line, written out: 77 ids and 77 multipliers per chunk."""
    runs = parse_prompt_attention(prompt)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma = tokenizer.get_vocab().get(",</w>")
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    mults: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, mults, last_comma
        padding = CHUNK - len(ids)
        chunks.append(([bos] + ids + [eos] * padding + [eos], [1.0] + mults + [1.0] * padding + [1.0]))
        ids, mults, last_comma = [], [], -1

    tokenized = tokenizer([text for text, _ in runs], truncation=False, add_special_tokens=False).input_ids
    for tokens, (text, weight) in zip(tokenized, runs):
        if text == "BREAK" and weight == -1:
            close()
            continue
        for token in tokens:
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved, moved_mults = ids[cut:], mults[cut:]
                ids, mults = ids[:cut], mults[:cut]
                close()
                ids, mults = moved, moved_mults
            if len(ids) == CHUNK:
                close()
            ids.append(token)
            mults.append(weight)
    if ids or not chunks:
        close()
    return chunks


def a1111_conditioning(encoder, tokenizer, prompt: str) -> torch.Tensor:
    states = []
    for ids, mults in a1111_chunks(tokenizer, prompt):
        with torch.inference_mode():
            z = encoder(input_ids=torch.tensor([ids])).last_hidden_state
        original_mean = z.mean()
        z = z * torch.tensor(mults).reshape(1, -1, 1)
        states.append(z * (original_mean / z.mean()))
    return torch.cat(states, dim=1)


WORDS = ["cat", "dog", "lighthouse", "red", "old", "castle", "on", "a", "hill", "painting", "by", "sunset", "misty",
         "forest", "very", "detailed", "photo", "of", "the", "sea", "blue", "sky", "night", "stars", "watercolour"]


def generated_prompts(n: int, seed: int = 22) -> list[str]:
    """Prompts of 40-260 tokens: commas everywhere, some weighted runs, a few BREAKs."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(30, 200)):
            word = rng.choice(WORDS)
            roll = rng.random()
            if roll < 0.05:
                word = f"({word}:{rng.choice([0.5, 1.3, 1.7])})"
            elif roll < 0.08:
                word = f"[{word}]"
            elif roll < 0.10:
                word = "BREAK"
            parts.append(word + ("," if rng.random() < 0.15 else ""))
        prompts.append(" ".join(parts))
    return prompts


HAND_WRITTEN = [
    "a cat",
    "",
    "BREAK a cat",
    "a cat BREAK BREAK a dog",
    "a cat BREAK",
    "cat " * 60 + ", " + "dog " * 30,  # comma 15 tokens before the chunk's end: moved
    "cat " * 54 + ", " + "dog " * 30,  # 21 back: not moved
    "cat " * 74 + ", dog",  # the comma is the chunk's last token
    "cat " * 75 + ", dog",  # a comma that starts the next chunk
    "(cat:1.5) " * 80 + "[dog] " * 10,
]


@pytest.fixture(scope="module")
def sd1(tiny_sd1_file):
    return load_model(tiny_sd1_file)


@pytest.mark.parametrize("prompt", HAND_WRITTEN + generated_prompts(12), ids=lambda p: f"{len(p)}ch")
def test_long_prompt_conditioning_matches_a1111s_chunking(sd1, prompt):
    encoder, tokenizer = sd1.text_encoders[0], sd1.tokenizers[0]
    expected = a1111_conditioning(encoder, tokenizer, prompt)
    with torch.inference_mode():
        ours = encode_a1111_prompts(sd1.text_encoders, sd1.tokenizers, sd1.family, [prompt]).context
    assert ours.shape == expected.shape, f"{ours.shape[1] // 77} chunks, A1111 {expected.shape[1] // 77}"
    difference = ((ours - expected).abs().max() / expected.abs().max()).item()
    assert difference <= 1e-6
