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

Textual-inversion embeddings: pass ``embeddings``, a mapping ``name -> vectors``
(one ``[n, D_i]`` tensor per text encoder, in the family's order; it may load
lazily, only names a prompt uses are looked up).  As in A1111, a name is found
by its *tokens*: wherever a run's token sequence contains the tokenized name
(longest name first), those tokens are replaced by the embedding's n vectors.
They count as n tokens for chunking, and an embedding that does not fit in the
current chunk starts the next one.  The vectors are spliced into the token
embedding lookup's output for that one forward call (a forward hook removed
right after); the encoder's weights are never changed.

No gradients are disabled here (training code may need them); callers that
only sample wrap the call in ``torch.inference_mode()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from huabi.core.prompt_parser import is_break, parse_prompt_attention
from huabi.errors import HuabiError
from huabi.core.family import ModelFamily

CHUNK_TOKENS = 75  # content tokens per chunk; + BOS + EOS = 77
COMMA_BACKTRACK_TOKENS = 20
COMMA_TOKEN = ",</w>"

PromptRun = tuple[str, float]
# name -> one [n, D_i] tensor per text encoder of the family (see huabi.models.embeddings).
EmbeddingLookup = Mapping[str, Sequence[Tensor]]
_EMBEDDING_PLACEHOLDER_ID = 0  # token id standing where embedding vectors go (never EOS, so pooling is unaffected)


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
    embeddings_used: tuple[str, ...] = field(default=())  # textual-inversion names, in order of first use

    @property
    def chunks(self) -> int:
        return self.context.shape[1] // (CHUNK_TOKENS + 2)


# How each family reads its encoders: (layer rule, gives pooled) per encoder.
_LAST_OR_SKIP_LN = "last_or_skip_ln"  # SD1: clip skip, final layer norm
_PENULTIMATE_LN = "penultimate_ln"  # SD2
_PENULTIMATE = "penultimate"  # SDXL, refiner

FAMILY_ENCODER_RULES: dict[ModelFamily, tuple[tuple[str, bool], ...]] = {
    ModelFamily.SD1: ((_LAST_OR_SKIP_LN, False),),
    ModelFamily.HUABI_MINI: ((_LAST_OR_SKIP_LN, False),),
    ModelFamily.SD2: ((_PENULTIMATE_LN, False),),
    ModelFamily.SDXL: ((_PENULTIMATE, False), (_PENULTIMATE, True)),
    ModelFamily.SDXL_REFINER: ((_PENULTIMATE, True),),
}


# ---------------------------------------------------------------- chunking


@dataclass(frozen=True)
class _EmbeddingUse:
    """An embedding found in a prompt: stands for ``count`` consecutive tokens."""

    name: str
    count: int


@dataclass
class _Chunk:
    ids: list[int]
    weights: list[float]
    fixes: list[tuple[int, str]]  # (offset in ids, embedding name): where its vectors go


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
    chunks = _split_units(
        [int(t) for t in token_ids], weights, comma_id=comma_id, chunk_tokens=chunk_tokens,
        comma_backtrack=comma_backtrack,
    )
    return [(chunk.ids, chunk.weights) for chunk in chunks]


def _split_units(
    units: Sequence[int | _EmbeddingUse],
    weights: Sequence[float],
    *,
    comma_id: int | None,
    chunk_tokens: int = CHUNK_TOKENS,
    comma_backtrack: int = COMMA_BACKTRACK_TOKENS,
) -> list[_Chunk]:
    """:func:`split_into_chunks` over tokens and embeddings (an embedding of n vectors is n tokens).

    An embedding that does not fit in what is left of a chunk moves whole to
    the next chunk, as in A1111.
    """
    chunks: list[_Chunk] = []
    current = _Chunk([], [], [])
    last_comma = -1  # index in current.ids of the chunk's latest comma

    for unit, weight in zip(units, weights, strict=True):
        if isinstance(unit, int) and comma_id is not None and unit == comma_id:
            last_comma = len(current.ids)
        elif (
            comma_backtrack > 0
            and len(current.ids) == chunk_tokens
            and last_comma != -1
            and len(current.ids) - last_comma <= comma_backtrack
        ):
            cut = last_comma + 1
            moved = _Chunk(
                current.ids[cut:], current.weights[cut:],
                [(offset - cut, name) for offset, name in current.fixes if offset >= cut],
            )
            chunks.append(_Chunk(current.ids[:cut], current.weights[:cut],
                                 [fix for fix in current.fixes if fix[0] < cut]))
            current = moved
            last_comma = -1
        if len(current.ids) == chunk_tokens:
            chunks.append(current)
            current = _Chunk([], [], [])
            last_comma = -1
        if isinstance(unit, _EmbeddingUse):
            if unit.count > chunk_tokens:
                raise HuabiError(
                    f"embedding {unit.name!r} has {unit.count} vectors; at most {chunk_tokens} fit in a prompt chunk"
                )
            if len(current.ids) + unit.count > chunk_tokens:
                chunks.append(current)
                current = _Chunk([], [], [])
                last_comma = -1
            current.fixes.append((len(current.ids), unit.name))
            current.ids.extend([_EMBEDDING_PLACEHOLDER_ID] * unit.count)
            current.weights.extend([float(weight)] * unit.count)
        else:
            current.ids.append(int(unit))
            current.weights.append(float(weight))

    if current.ids or not chunks:
        chunks.append(current)
    return chunks


class EmbeddingNameIndex:
    """Embedding names by their first token, longest token sequence first (A1111's lookup)."""

    def __init__(self, tokenizer, embeddings: EmbeddingLookup | None) -> None:
        self.by_first: dict[int, list[tuple[list[int], str]]] = {}
        names = [name for name in (embeddings or {}) if name.strip()]
        if not names:
            return
        encoded = tokenizer(names, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        for name, ids in zip(names, encoded, strict=True):
            if ids:
                self.by_first.setdefault(ids[0], []).append((list(ids), name))
        for candidates in self.by_first.values():
            candidates.sort(key=lambda item: -len(item[0]))

    def match(self, ids: Sequence[int], position: int) -> tuple[str, int] | None:
        for name_ids, name in self.by_first.get(ids[position], ()):
            if list(ids[position:position + len(name_ids)]) == name_ids:
                return name, len(name_ids)
        return None


def _tokenize_runs(
    tokenizer, runs: Sequence[PromptRun], names: EmbeddingNameIndex | None = None, embeddings: EmbeddingLookup | None = None
) -> tuple[list[int | _EmbeddingUse], list[float]]:
    texts = [text for text, _ in runs]
    if not texts:
        return [], []
    # verbose=False: prompts longer than 77 tokens are expected here (we chunk them).
    encoded = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    units: list[int | _EmbeddingUse] = []
    weights: list[float] = []
    for run_ids, (_, weight) in zip(encoded, runs, strict=True):
        if names is None or not names.by_first:
            units.extend(run_ids)
            weights.extend([float(weight)] * len(run_ids))
            continue
        # Embedding names are matched within one run (as A1111 tokenizes run by run).
        position = 0
        while position < len(run_ids):
            found = names.match(run_ids, position)
            if found is None:
                units.append(run_ids[position])
                position += 1
            else:
                name, length = found
                units.append(_EmbeddingUse(name, _vector_count(name, embeddings[name])))
                position += length
            weights.append(float(weight))
    return units, weights


def _vector_count(name: str, vectors: Sequence[Tensor]) -> int:
    counts = {int(v.shape[0]) for v in vectors}
    if len(counts) != 1 or not all(v.dim() == 2 for v in vectors):
        raise HuabiError(f"embedding {name!r}: its vector sets must be [n, width] with the same n")
    return counts.pop()


def _chunk_prompt(tokenizer, runs: Sequence[PromptRun], comma_id: int | None) -> list[tuple[list[int], list[float]]]:
    """Tokenize and chunk one prompt's runs (no embeddings): ``[(ids, weights)]`` per chunk."""
    return [(chunk.ids, chunk.weights) for chunk in _chunk_prompt_units(tokenizer, runs, comma_id)]


def _chunk_prompt_units(
    tokenizer, runs: Sequence[PromptRun], comma_id: int | None,
    names: EmbeddingNameIndex | None = None, embeddings: EmbeddingLookup | None = None,
) -> list[_Chunk]:
    """Tokenize and chunk one prompt's runs; each BREAK run starts a new chunk."""
    segments: list[list[PromptRun]] = [[]]
    for run in runs:
        if is_break(run):
            segments.append([])
        else:
            segments[-1].append(run)
    chunks: list[_Chunk] = []
    for index, segment in enumerate(segments):
        units, weights = _tokenize_runs(tokenizer, segment, names, embeddings)
        if not units and index > 0 and index == len(segments) - 1:
            break  # "a BREAK": A1111 closes the chunk and opens no new one
        chunks += _split_units(units, weights, comma_id=comma_id)
    return chunks


def _chunk_rows(
    chunks: list[_Chunk], *, bos_id: int, eos_id: int, pad_id: int
) -> tuple[list[list[int]], list[list[float]]]:
    rows, row_weights = [], []
    for chunk in chunks:
        pad = CHUNK_TOKENS - len(chunk.ids)
        rows.append([bos_id, *chunk.ids, eos_id] + [pad_id] * pad)
        row_weights.append([1.0, *chunk.weights, 1.0] + [1.0] * pad)
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


Splice = tuple[int, int, Tensor]  # (row, first position, [n, D] vectors)


def _token_embedding(encoder: torch.nn.Module) -> torch.nn.Module:
    return encoder.get_input_embeddings()


def _forward_with_vectors(encoder: torch.nn.Module, input_ids: Tensor, splices: Sequence[Splice]):
    """The encoder's own forward, with embedding vectors put in place of placeholder token embeddings.

    transformers' CLIPTextModel takes no ``inputs_embeds``, so the token
    embedding lookup's output is edited by a forward hook that lives for this
    one call and only touches the call made with ``input_ids`` (another caller
    of the same encoder meanwhile is left alone).  Positions, causal mask,
    hidden states and EOS pooling stay the model's own.
    """
    fired: list[bool] = []

    def splice(_module: torch.nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        ids = args[0] if args else None
        if not isinstance(ids, Tensor) or ids.data_ptr() != input_ids.data_ptr() or ids.shape != input_ids.shape:
            return None
        fired.append(True)
        spliced = output.clone()  # out of place: gradients (embedding training) flow to the vectors
        for row, start, vectors in splices:
            spliced[row, start:start + vectors.shape[0]] = vectors.to(spliced.device, spliced.dtype)
        return spliced

    handle = _token_embedding(encoder).register_forward_hook(splice)
    try:
        out = encoder(input_ids=input_ids, output_hidden_states=True)
    finally:
        handle.remove()
    if not fired:
        raise HuabiError(f"{type(encoder).__name__}: its token embedding was not called as expected; cannot use embeddings")
    return out


def run_text_encoder(
    encoder: torch.nn.Module, input_ids: Tensor, rule: str, clip_skip: int, want_pooled: bool,
    splices: Sequence[Splice] = (),
) -> tuple[Tensor, Tensor | None]:
    """[N, 77] ids -> ([N, 77, D] states, [N, P] pooled or None)."""
    if splices:
        out = _forward_with_vectors(encoder, input_ids, splices)
    else:
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
    embeddings: EmbeddingLookup | None = None,
) -> Conditioning:
    """Encode prompts given as parsed ``(text, weight)`` runs.  See the module notes."""
    try:
        rules = FAMILY_ENCODER_RULES[ModelFamily(family)]
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
        names = EmbeddingNameIndex(tokenizer, embeddings) if embeddings else None
        chunked = [_chunk_prompt_units(tokenizer, runs, comma_id, names, embeddings) for runs in prompts]
        per_encoder_chunks.append(chunked)
    used: list[str] = []
    for chunked in per_encoder_chunks[:1]:
        for chunks in chunked:
            for chunk in chunks:
                used += [name for _, name in chunk.fixes if name not in used]
    for name in used:
        _check_embedding(name, embeddings[name], text_encoders)
    counts = [[len(c) for c in chunked] for chunked in per_encoder_chunks]
    if any(c != counts[0] for c in counts):
        raise HuabiError("the family's tokenizers split the prompts differently; they must share one vocabulary")
    n_chunks = max(min_chunks, *counts[0])
    batch = len(prompts)

    # 2. encode every chunk of every prompt in one forward per encoder, plus one empty chunk.
    contexts, empties, pooled = [], [], None
    out_dtype: torch.dtype | None = None
    out_device: torch.device | None = None  # the first encoder's; SDXL's second may sit elsewhere (offload)
    for encoder_index, ((rule, want_pooled), encoder, tokenizer, chunked) in enumerate(zip(
        rules, text_encoders, tokenizers, per_encoder_chunks, strict=True
    )):
        device, dtype = _encoder_device_dtype(encoder)
        out_dtype = out_dtype or dtype
        out_device = out_device or device
        ids_rows: list[list[int]] = []
        weight_rows: list[list[float]] = []
        splices: list[Splice] = []
        for chunks in chunked:
            filled = chunks + [_Chunk([], [], []) for _ in range(n_chunks - len(chunks))]
            for chunk in filled:
                for offset, name in chunk.fixes:  # +1: after BOS
                    splices.append((len(ids_rows), offset + 1, embeddings[name][encoder_index]))
                rows, row_weights = _chunk_rows(
                    [chunk], bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                    pad_id=tokenizer.pad_token_id,
                )
                ids_rows += rows
                weight_rows += row_weights
        empty_rows, empty_weights = _chunk_rows(
            [_Chunk([], [], [])], bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id,
        )
        input_ids = torch.tensor(ids_rows + empty_rows, dtype=torch.long, device=device)
        weights = torch.tensor(weight_rows + empty_weights, dtype=dtype, device=device)

        states, pooled_rows = run_text_encoder(encoder, input_ids, rule, clip_skip, want_pooled, splices)
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
        embeddings_used=tuple(used),
    )


def _check_embedding(name: str, vectors: Sequence[Tensor], text_encoders: Sequence[torch.nn.Module]) -> None:
    if len(vectors) != len(text_encoders):
        raise HuabiError(
            f"embedding {name!r} has {len(vectors)} vector set(s) but the model has {len(text_encoders)} text encoder(s)"
        )
    for vector_set, encoder in zip(vectors, text_encoders, strict=True):
        width = int(_token_embedding(encoder).weight.shape[-1])
        if vector_set.shape[-1] != width:
            raise HuabiError(
                f"embedding {name!r} has {vector_set.shape[-1]}-wide vectors; the text encoder is {width} wide"
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
        return Conditioning(torch.zeros_like(cond.context), pooled, cond.empty_chunk, cond.embeddings_used)
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
    embeddings: EmbeddingLookup | None = None,
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
        embeddings=embeddings,
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
    return Conditioning(torch.cat([cond.context, tail], dim=1), cond.pooled, cond.empty_chunk, cond.embeddings_used)


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
