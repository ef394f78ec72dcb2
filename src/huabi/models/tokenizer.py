"""The CLIP tokenizer, built offline from huabi's own vocabulary files.

``src/huabi/assets/tokenizer/`` holds ``vocab.json`` and ``merges.txt``,
generated once by ``scripts/make_tokenizer.py`` from OpenAI CLIP's BPE merge
list.  Every family uses the same vocabulary; they differ only in the token
that fills a sequence after its end-of-text token:

* OpenAI CLIP-L (SD1, huabi-mini, SDXL's first encoder): ``<|endoftext|>`` (49407),
  as A1111, diffusers and the original ldm/sgm code do;
* OpenCLIP (SD2, SDXL's bigG, the refiner): id 0 (the token ``!``), as
  ``open_clip.tokenize`` pads and as A1111/diffusers reproduce it. A ``!`` in the
  prompt stays an ordinary token there (``!!`` is one token, as open_clip and
  A1111 read it; transformers alone would read each ``!`` as padding), and so
  does the literal text ``<|endoftext|>``.

Text normalisation is transformers' (NFC, whitespace runs -> one space,
lower case).  The original CLIP code additionally runs ``ftfy.fix_text``
(curly quotes -> straight, ligatures, full-width forms, mojibake) and, for
OpenCLIP, HTML-unescapes; prompts containing such characters can tokenize
differently from A1111.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer

from huabi.errors import HuabiError
from huabi.core.family import ModelFamily

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
OPEN_CLIP_PAD_TOKEN = "!"  # id 0
MODEL_MAX_LENGTH = 77

# Pad token per encoder, in the family's encoder order.
_PAD_TOKENS: dict[ModelFamily, tuple[str, ...]] = {
    ModelFamily.SD1: (EOS_TOKEN,),
    ModelFamily.HUABI_MINI: (EOS_TOKEN,),
    ModelFamily.SD2: (OPEN_CLIP_PAD_TOKEN,),
    ModelFamily.SDXL: (EOS_TOKEN, OPEN_CLIP_PAD_TOKEN),
    ModelFamily.SDXL_REFINER: (OPEN_CLIP_PAD_TOKEN,),
}


def tokenizer_dir() -> Path:
    """The folder holding huabi's shipped ``vocab.json`` and ``merges.txt``."""
    return Path(str(resources.files("huabi") / "assets" / "tokenizer"))


def _read_files(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    for path in (vocab_path, merges_path):
        if not path.is_file():
            raise HuabiError(f"tokenizer file missing: {path} (run scripts/make_tokenizer.py)")
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise HuabiError(f"tokenizer file {vocab_path} is not valid JSON: {exc.msg}") from None
    merges: list[tuple[str, str]] = []
    for line_no, line in enumerate(merges_path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise HuabiError(f"tokenizer file {merges_path} line {line_no} is not a 'left right' merge")
        merges.append((parts[0], parts[1]))
    if vocab.get(BOS_TOKEN) != 49406 or vocab.get(EOS_TOKEN) != 49407:
        raise HuabiError(f"tokenizer file {vocab_path} does not hold the CLIP vocabulary (bos/eos ids differ)")
    return vocab, merges


def _make(vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str) -> CLIPTokenizer:
    # OpenCLIP pads with "!" (id 0), also an ordinary token: transformers would cut every "!" of a
    # prompt out as the pad token ("wow!!" -> [wow, pad, pad]), where A1111 (open_clip's own
    # tokenizer for these encoders) reads "!!" as one token. split_special_tokens keeps prompt text
    # ordinary text, as open_clip does (BOS/EOS/padding are added outside the text either way).
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=pad_token,
        model_max_length=MODEL_MAX_LENGTH,
        split_special_tokens=pad_token == OPEN_CLIP_PAD_TOKEN,
    )


def load_clip_tokenizer(*, pad_token: str = EOS_TOKEN, folder: Path | None = None) -> CLIPTokenizer:
    """One CLIP tokenizer from local files only (``folder`` defaults to the shipped one)."""
    vocab, merges = _read_files(folder if folder is not None else tokenizer_dir())
    return _make(vocab, merges, pad_token)


def load_tokenizers(family: ModelFamily) -> list[CLIPTokenizer]:
    """The tokenizer(s) of ``family``, ordered like its text encoders.  Never touches the network."""
    try:
        pad_tokens = _PAD_TOKENS[ModelFamily(family)]
    except (KeyError, ValueError):
        raise HuabiError(f"no tokenizer for model family {family!r}") from None
    vocab, merges = _read_files(tokenizer_dir())
    return [_make(vocab, merges, pad) for pad in pad_tokens]
