"""Prompt conditioning: text -> cross-attention states (+ SDXL pooled and size ids).

Behaviour follows A1111 WebUI, so its infotexts reproduce:

* A prompt is tokenized without truncation and cut into chunks of 75 tokens.
  When a chunk fills up and its last comma lies within the final 20 tokens,
  the text after that comma moves on to the next chunk (A1111's "comma padding
  backtrack", default 20).
* Each chunk is encoded alone as ``[BOS] + tokens + [EOS] + pad`` (77 ids) and
  the chunks' states are concatenated along the token axis: ``[B, 77*k, D]``.
  The pad id is the tokenizer's ``pad_token_id`` (``<|endoftext|>`` for OpenAI
  CLIP-L, 0 for OpenCLIP; see ``huabi.models.tokenizer``).
* All prompts of a batch get the same number of chunks, ``k = max(min_chunks,
  longest prompt)``; shorter ones are filled with empty chunks (``[BOS, EOS,
  pad...]``).
* Which hidden state is used, per family:

  - SD1 / huabi-mini: ``clip_skip=1`` -> the last layer after the final layer
    norm; ``clip_skip=n`` -> ``hidden_states[-n]`` through the final layer norm.
  - SD2: the penultimate layer through the final layer norm (what SD2 was
    trained with: ldm's OpenCLIP embedder with ``layer="penultimate"``).
    ``clip_skip`` is ignored, as in A1111.  Two shapes of SD2 encoder exist
    and both work: the full OpenCLIP tower with its projection
    (``CLIPTextModelWithProjection``, what huabi builds from single files) is
    read at ``hidden_states[-2]``; diffusers' SD2 ``CLIPTextModel`` already
    lacks the last layer and is read at ``last_hidden_state``.
  - SDXL: CLIP-L's and bigG's penultimate layers, *without* final layer norm,
    concatenated (768 + 1280 = 2048 wide for the real models).  ``clip_skip``
    is ignored, as in A1111 (its default "sdxl_clip_l_skip" off).
    ``pooled`` is bigG's projected, final-layer-normed EOS state of the last
    layer, from the first chunk only.
  - SDXL refiner: bigG's penultimate layer without final layer norm, + pooled.

Prompt weights: :func:`encode_weighted_prompts` takes already parsed
``(text, weight)`` runs; each run is tokenized on its own and its tokens carry
its weight.  States are scaled per token and rescaled to keep their mean
(A1111's "Original" emphasis, with the mean taken per prompt and chunk rather
than over the whole batch so a prompt's result does not depend on its batch).
The run ``("BREAK", -1.0)`` ends the current chunk (padding it), as A1111's
``tokenize_line`` does; a trailing BREAK adds no empty chunk.  The parser for
``(word:1.2)`` / ``BREAK`` is :mod:`huabi.core.prompt_parser`;
:func:`encode_a1111_prompts` applies it.

No gradients are disabled here (training code may need them); callers that
only sample wrap the call in ``torch.inference_mode()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from huabi.core.prompt_parser import is_break, parse_prompt_attention
from huabi.errors import HuabiError
from huabi.models.family import ModelFamily

CHUNK_TOKENS = 75  # content tokens per chunk; + BOS + EOS = 77
COMMA_BACKTRACK_TOKENS = 20
COMMA_TOKEN = ",</w>"

PromptRun = tuple[str, float]


@dataclass(frozen=True)
class Conditioning:
    """Encoded prompts for one batch.

    ``empty_chunk`` ([1, 77, D]) is the encoding of one empty chunk by the same
    encoders; :func:`pad_to_same_length` uses it to lengthen a shorter
    conditioning exactly as if it had been encoded with more chunks.
    """

    context: Tensor  # [B, 77*k, D] cross-attention states
    pooled: Tensor | None  # [B, P] SDXL pooled text embedding (None for SD1/SD2)
    empty_chunk: Tensor | None = None  # [1, 77, D]

    @property
    def chunks(self) -> int:
        return self.context.shape[1] // (CHUNK_TOKENS + 2)


# How each family reads its encoders: (layer rule, gives pooled) per encoder.
_LAST_OR_SKIP_LN = "last_or_skip_ln"  # SD1: clip skip, final layer norm
_PENULTIMATE_LN = "penultimate_ln"  # SD2
_PENULTIMATE = "penultimate"  # SDXL, refiner

_FAMILY_RULES: dict[ModelFamily, tuple[tuple[str, bool], ...]] = {
    ModelFamily.SD1: ((_LAST_OR_SKIP_LN, False),),
    ModelFamily.HUABI_MINI: ((_LAST_OR_SKIP_LN, False),),
    ModelFamily.SD2: ((_PENULTIMATE_LN, False),),
    ModelFamily.SDXL: ((_PENULTIMATE, False), (_PENULTIMATE, True)),
    ModelFamily.SDXL_REFINER: ((_PENULTIMATE, True),),
}


# ---------------------------------------------------------------- chunking


def split_into_chunks(
    token_ids: Sequence[int],
    weights: Sequence[float],
    *,
    comma_id: int | None,
    chunk_tokens: int = CHUNK_TOKENS,
    comma_backtrack: int = COMMA_BACKTRACK_TOKENS,
) -> list[tuple[list[int], list[float]]]:
    """Cut a token sequence (no BOS/EOS) into chunks of at most ``chunk_tokens``.

    A1111's rule: when a chunk is full and the next token is not a comma, and
    the chunk's last comma is at most ``comma_backtrack`` tokens from its end,
    the tokens after that comma start the next chunk instead.  An empty
    sequence gives one empty chunk.
    """
    if len(token_ids) != len(weights):
        raise HuabiError(f"token ids ({len(token_ids)}) and weights ({len(weights)}) differ in length")
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    mults: list[float] = []
    last_comma = -1  # index in `ids` of the chunk's latest comma

    for token, weight in zip(token_ids, weights, strict=True):
        if comma_id is not None and token == comma_id:
            last_comma = len(ids)
        elif (
            comma_backtrack > 0
            and len(ids) == chunk_tokens
            and last_comma != -1
            and len(ids) - last_comma <= comma_backtrack
        ):
            cut = last_comma + 1
            chunks.append((ids[:cut], mults[:cut]))
            ids, mults = ids[cut:], mults[cut:]
            last_comma = -1
        if len(ids) == chunk_tokens:
            chunks.append((ids, mults))
            ids, mults = [], []
            last_comma = -1
        ids.append(int(token))
        mults.append(float(weight))

    if ids or not chunks:
        chunks.append((ids, mults))
    return chunks


def _tokenize_runs(tokenizer, runs: Sequence[PromptRun]) -> tuple[list[int], list[float]]:
    texts = [text for text, _ in runs]
    if not texts:
        return [], []
    # verbose=False: prompts longer than 77 tokens are expected here (we chunk them).
    encoded = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    ids: list[int] = []
    weights: list[float] = []
    for run_ids, (_, weight) in zip(encoded, runs, strict=True):
        ids.extend(run_ids)
        weights.extend([float(weight)] * len(run_ids))
    return ids, weights


def _chunk_prompt(tokenizer, runs: Sequence[PromptRun], comma_id: int | None) -> list[tuple[list[int], list[float]]]:
    """Tokenize and chunk one prompt's runs; each BREAK run starts a new chunk."""
    segments: list[list[PromptRun]] = [[]]
    for run in runs:
        if is_break(run):
            segments.append([])
        else:
            segments[-1].append(run)
    chunks: list[tuple[list[int], list[float]]] = []
    for index, segment in enumerate(segments):
        ids, weights = _tokenize_runs(tokenizer, segment)
        if not ids and index > 0 and index == len(segments) - 1:
            break  # "a BREAK": A1111 closes the chunk and opens no new one
        chunks += split_into_chunks(ids, weights, comma_id=comma_id)
    return chunks


def _chunk_rows(
    chunks: list[tuple[list[int], list[float]]], *, bos_id: int, eos_id: int, pad_id: int
) -> tuple[list[list[int]], list[list[float]]]:
    rows, row_weights = [], []
    for ids, mults in chunks:
        pad = CHUNK_TOKENS - len(ids)
        rows.append([bos_id, *ids, eos_id] + [pad_id] * pad)
        row_weights.append([1.0, *mults, 1.0] + [1.0] * pad)
    return rows, row_weights


# ---------------------------------------------------------------- encoding


def _final_layer_norm(encoder: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(encoder, "text_model", encoder)
    return inner.final_layer_norm


def _num_layers(encoder: torch.nn.Module) -> int:
    return int(encoder.config.num_hidden_layers)


def _encoder_device_dtype(encoder: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    weight = next(encoder.parameters())
    return weight.device, weight.dtype


def _run_encoder(
    encoder: torch.nn.Module, input_ids: Tensor, rule: str, clip_skip: int, want_pooled: bool
) -> tuple[Tensor, Tensor | None]:
    """[N, 77] ids -> ([N, 77, D] states, [N, P] pooled or None)."""
    out = encoder(input_ids=input_ids, output_hidden_states=True)
    if rule == _LAST_OR_SKIP_LN:
        states = out.last_hidden_state if clip_skip == 1 else _final_layer_norm(encoder)(out.hidden_states[-clip_skip])
    elif rule == _PENULTIMATE_LN:
        if hasattr(encoder, "text_projection"):
            states = _final_layer_norm(encoder)(out.hidden_states[-2])
        else:  # diffusers-style SD2 tower: its last layer was removed, so its last state is the one
            states = out.last_hidden_state
    else:
        states = out.hidden_states[-2]
    pooled = None
    if want_pooled:
        pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            raise HuabiError(f"{type(encoder).__name__} has no text projection; SDXL's second encoder needs one")
    return states, pooled


def _apply_weights(states: Tensor, weights: Tensor) -> Tensor:
    """A1111 "Original" emphasis on rows [N, 77, D] with weights [N, 77]; a no-op at weight 1."""
    if bool((weights == 1.0).all()):
        return states
    original_mean = states.mean(dim=(1, 2), keepdim=True)
    scaled = states * weights.unsqueeze(-1)
    return scaled * (original_mean / scaled.mean(dim=(1, 2), keepdim=True))


def encode_weighted_prompts(
    text_encoders: Sequence[torch.nn.Module],
    tokenizers: Sequence,
    family: ModelFamily,
    prompts: Sequence[Sequence[PromptRun]],
    *,
    clip_skip: int = 1,
    min_chunks: int = 1,
) -> Conditioning:
    """Encode prompts given as parsed ``(text, weight)`` runs.  See the module notes."""
    try:
        rules = _FAMILY_RULES[ModelFamily(family)]
    except (KeyError, ValueError):
        raise HuabiError(f"no prompt conditioning for model family {family!r}") from None
    if len(text_encoders) != len(rules):
        raise HuabiError(f"{ModelFamily(family).value} needs {len(rules)} text encoder(s), got {len(text_encoders)}")
    if len(tokenizers) != len(rules):
        raise HuabiError(f"{ModelFamily(family).value} needs {len(rules)} tokenizer(s), got {len(tokenizers)}")
    if len(prompts) == 0:
        raise HuabiError("prompts: at least one prompt is needed")
    if not isinstance(min_chunks, int) or min_chunks < 1:
        raise HuabiError(f"min_chunks must be an integer >= 1, got {min_chunks!r}")
    if not isinstance(clip_skip, int) or clip_skip < 1:
        raise HuabiError(f"clip_skip must be an integer >= 1, got {clip_skip!r}")
    for rule, encoder in zip(rules, text_encoders, strict=True):
        if rule[0] == _LAST_OR_SKIP_LN and clip_skip > _num_layers(encoder):
            raise HuabiError(f"clip_skip={clip_skip} exceeds the text encoder's {_num_layers(encoder)} layers")

    # 1. tokenize and chunk, per encoder (SDXL's two tokenizers share a vocabulary).
    per_encoder_chunks = []
    for tokenizer in tokenizers:
        comma_id = tokenizer.convert_tokens_to_ids(COMMA_TOKEN)
        if comma_id == tokenizer.unk_token_id:
            comma_id = None  # a vocabulary without CLIP's comma token: no backtracking
        chunked = [_chunk_prompt(tokenizer, runs, comma_id) for runs in prompts]
        per_encoder_chunks.append(chunked)
    counts = [[len(c) for c in chunked] for chunked in per_encoder_chunks]
    if any(c != counts[0] for c in counts):
        raise HuabiError("the family's tokenizers split the prompts differently; they must share one vocabulary")
    n_chunks = max(min_chunks, *counts[0])
    batch = len(prompts)

    # 2. encode every chunk of every prompt in one forward per encoder, plus one empty chunk.
    contexts, empties, pooled = [], [], None
    out_dtype: torch.dtype | None = None
    out_device: torch.device | None = None  # the first encoder's; SDXL's second may sit elsewhere (offload)
    for (rule, want_pooled), encoder, tokenizer, chunked in zip(
        rules, text_encoders, tokenizers, per_encoder_chunks, strict=True
    ):
        device, dtype = _encoder_device_dtype(encoder)
        out_dtype = out_dtype or dtype
        out_device = out_device or device
        ids_rows: list[list[int]] = []
        weight_rows: list[list[float]] = []
        for chunks in chunked:
            filled = chunks + [([], [])] * (n_chunks - len(chunks))
            rows, row_weights = _chunk_rows(
                filled, bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id
            )
            ids_rows += rows
            weight_rows += row_weights
        empty_rows, empty_weights = _chunk_rows(
            [([], [])], bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id
        )
        input_ids = torch.tensor(ids_rows + empty_rows, dtype=torch.long, device=device)
        weights = torch.tensor(weight_rows + empty_weights, dtype=dtype, device=device)

        states, pooled_rows = _run_encoder(encoder, input_ids, rule, clip_skip, want_pooled)
        states = _apply_weights(states, weights)
        width = states.shape[-1]
        contexts.append(states[:-1].reshape(batch, n_chunks * (CHUNK_TOKENS + 2), width).to(out_device, out_dtype))
        empties.append(states[-1:].to(out_device, out_dtype))
        if pooled_rows is not None:
            # The first chunk's pooled output, as A1111 and sgm take it.
            pooled = pooled_rows[:-1].reshape(batch, n_chunks, -1)[:, 0].to(out_device, out_dtype)

    return Conditioning(
        context=torch.cat(contexts, dim=-1),
        pooled=pooled,
        empty_chunk=torch.cat(empties, dim=-1),
    )


def encode_prompts(
    text_encoders: Sequence[torch.nn.Module],
    tokenizers: Sequence,
    family: ModelFamily,
    prompts: Sequence[str],
    *,
    clip_skip: int = 1,
    min_chunks: int = 1,
) -> Conditioning:
    """Encode plain prompts (no weighting syntax) for ``family``.

    ``text_encoders``/``tokenizers`` are in the family's order (SDXL: CLIP-L,
    bigG).  Runs on whatever device/dtype the encoders are on; the result has
    the first encoder's device and dtype.
    """
    if isinstance(prompts, str):
        raise HuabiError("prompts must be a list of strings, not one string")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise HuabiError(f"prompts[{i}] is a {type(prompt).__name__}, not a string")
    return encode_weighted_prompts(
        text_encoders,
        tokenizers,
        family,
        [[(prompt, 1.0)] for prompt in prompts],
        clip_skip=clip_skip,
        min_chunks=min_chunks,
    )


def encode_negative_prompts(
    text_encoders: Sequence[torch.nn.Module],
    tokenizers: Sequence,
    family: ModelFamily,
    prompts: Sequence[str],
    *,
    clip_skip: int = 1,
    min_chunks: int = 1,
) -> Conditioning:
    """Encode negative prompts, with SDXL's empty-negative rule.

    For SDXL and its refiner, a batch whose negative prompts are all exactly
    ``""`` is conditioned on zeros (context and pooled), as A1111 (via sgm's
    ``force_zero_embeddings``) and diffusers (``force_zeros_for_empty_prompt``)
    do; the size/aesthetic ids are not affected.  Other families encode ``""``
    normally.  ``empty_chunk`` stays the real empty-chunk encoding, which is
    what A1111 pads with.
    """
    cond = encode_prompts(text_encoders, tokenizers, family, prompts, clip_skip=clip_skip, min_chunks=min_chunks)
    return _zero_empty_negative(cond, family, prompts)


def _zero_empty_negative(cond: Conditioning, family: ModelFamily, prompts: Sequence[str]) -> Conditioning:
    if ModelFamily(family) in (ModelFamily.SDXL, ModelFamily.SDXL_REFINER) and all(p == "" for p in prompts):
        pooled = torch.zeros_like(cond.pooled) if cond.pooled is not None else None
        return Conditioning(torch.zeros_like(cond.context), pooled, cond.empty_chunk)
    return cond


def encode_a1111_prompts(
    text_encoders: Sequence[torch.nn.Module],
    tokenizers: Sequence,
    family: ModelFamily,
    prompts: Sequence[str],
    *,
    clip_skip: int = 1,
    min_chunks: int = 1,
    negative: bool = False,
) -> Conditioning:
    """Encode prompts written with A1111's emphasis syntax: ``(a)``, ``[a]``, ``(a:1.3)``, ``BREAK``.

    Prompt editing, alternation, ``AND`` and extra-network tags must already be
    resolved (see :mod:`huabi.core.prompt_parser`): the texts given here are the
    ones in force at one step.  With ``negative=True`` SDXL's empty-negative rule
    of :func:`encode_negative_prompts` applies (to the text as given, before
    emphasis parsing, as in A1111).  A prompt without emphasis syntax encodes
    exactly as :func:`encode_prompts` would.
    """
    if isinstance(prompts, str):
        raise HuabiError("prompts must be a list of strings, not one string")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise HuabiError(f"prompts[{i}] is a {type(prompt).__name__}, not a string")
    cond = encode_weighted_prompts(
        text_encoders,
        tokenizers,
        family,
        [parse_prompt_attention(prompt) for prompt in prompts],
        clip_skip=clip_skip,
        min_chunks=min_chunks,
    )
    return _zero_empty_negative(cond, family, prompts) if negative else cond


# ---------------------------------------------------------------- cond/uncond helpers


def _lengthen(cond: Conditioning, tokens: int) -> Conditioning:
    missing = tokens - cond.context.shape[1]
    if missing == 0:
        return cond
    batch = cond.context.shape[0]
    chunk_len = CHUNK_TOKENS + 2
    if cond.empty_chunk is not None and missing % chunk_len == 0:
        empty = cond.empty_chunk.to(cond.context.device, cond.context.dtype)
        tail = empty.expand(batch, -1, -1).repeat(1, missing // chunk_len, 1)
    else:
        # No empty-chunk encoding at hand: repeat the last token state (A1111's older padding).
        tail = cond.context[:, -1:].expand(batch, missing, -1)
    return Conditioning(torch.cat([cond.context, tail], dim=1), cond.pooled, cond.empty_chunk)


def pad_to_same_length(a: Conditioning, b: Conditioning) -> tuple[Conditioning, Conditioning]:
    """Give two conditionings (e.g. prompt and negative prompt) the same token length.

    The shorter is extended with encoded empty chunks, which equals encoding it
    with ``min_chunks`` set to the longer one's chunk count (A1111's "pad
    prompt/negative prompt" option).  Padding changes the image: extra keys
    enter the cross-attention softmax.  A1111's default instead runs the UNet
    separately for cond and uncond when their lengths differ; a pipeline that
    wants A1111's default images must do the same and call this only to
    batch equal-meaning inputs.  Without ``empty_chunk`` the last token state is
    repeated (A1111's older variant of that option).
    """
    if a.context.shape[-1] != b.context.shape[-1]:
        raise HuabiError(
            f"conditionings differ in width ({a.context.shape[-1]} vs {b.context.shape[-1]}); "
            "they must come from the same text encoders"
        )
    tokens = max(a.context.shape[1], b.context.shape[1])
    return _lengthen(a, tokens), _lengthen(b, tokens)


def sdxl_add_time_ids(
    original_size_hw: tuple[int, int],
    crop_top_left: tuple[int, int],
    target_size_hw: tuple[int, int],
    *,
    aesthetic_score: float | None = None,
    dtype: torch.dtype,
    device: torch.device | str,
) -> Tensor:
    """SDXL micro-conditioning ids, shape [1, 6] (base) or [1, 5] (refiner).

    Base: ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``.
    Refiner (``aesthetic_score`` given): ``(orig_h, orig_w, crop_top, crop_left,
    aesthetic_score)`` -- the refiner has no target size.  Usual scores: 6.0
    for the prompt, 2.5 for the negative prompt.
    """

    def pair(name: str, value, *, minimum: int) -> tuple[int, int]:
        try:
            first, second = value
        except (TypeError, ValueError):
            raise HuabiError(f"{name} must be a pair of integers, got {value!r}") from None
        for v in (first, second):
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise HuabiError(f"{name} must be a pair of integers >= {minimum}, got {value!r}")
        return first, second

    original = pair("original_size_hw", original_size_hw, minimum=1)
    crop = pair("crop_top_left", crop_top_left, minimum=0)
    if aesthetic_score is None:
        values = [*original, *crop, *pair("target_size_hw", target_size_hw, minimum=1)]
    else:
        values = [*original, *crop, float(aesthetic_score)]
    return torch.tensor([values], dtype=dtype, device=device)
