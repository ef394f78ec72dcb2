"""huabi's CLIP tokenizer against the original CLIP tokenizer code (issue 22).

test_tokenizer.py compares huabi's shipped tokenizer with a BPE written from scratch over huabi's own
merges file (and, when the open_clip wheel is there, the merges with the original file). Here the
reference is OpenCLIP's ``SimpleTokenizer`` itself (the OpenAI CLIP tokenizer code with its own
``bpe_simple_vocab_16e6.txt.gz``), loaded from the ``open_clip_torch`` wheel without installing the
package (``setup.sh --dev`` downloads the wheel into ``<venv>/huabi-reference``; open_clip itself pulls
torchvision, so it is never installed). Same strings, same ids expected:

* every text of test_tokenizer's hand-written and generated sets (300 generated: words, punctuation,
  whitespace runs, upper case, random code points from several scripts and emoji), except those the
  original changes with ``ftfy.fix_text`` / ``html.unescape`` first (huabi documents that it skips
  both: huabi.models.tokenizer) and those holding the literal text of a special token (transformers'
  tokenizer, like A1111, reads it as the token); the test counts how many it left out (7 of 333) and
  asserts most were compared;
* whole 77-id sequences as SD2's OpenCLIP encoder gets them (``open_clip.tokenize``: BOS, ids, EOS,
  zeros after; a long prompt truncated to 76 ids + EOS) against huabi's SD2 tokenizer with
  ``padding="max_length", truncation=True``.
"""

from __future__ import annotations

import glob
import gzip
import html
import importlib.util
import os
import sys
import zipfile
from pathlib import Path

import pytest

from huabi.models.family import ModelFamily
from huabi.models.tokenizer import load_clip_tokenizer, load_tokenizers
from test_tokenizer import HAND_WRITTEN, _generated_strings

WHEEL_GLOB = "open_clip_torch-*.whl"


def _wheel() -> str | None:
    candidates = [os.environ.get("HUABI_OPEN_CLIP_WHEEL", "")]
    candidates += sorted(glob.glob(str(Path(sys.prefix) / "huabi-reference" / WHEEL_GLOB)))
    candidates += sorted(glob.glob(f"/tmp/oc/{WHEEL_GLOB}"))
    return next((c for c in candidates if c and os.path.isfile(c) and zipfile.is_zipfile(c)), None)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """OpenCLIP's SimpleTokenizer, its module file and vocabulary taken out of the wheel."""
    wheel = _wheel()
    if wheel is None:
        pytest.skip("open_clip_torch wheel not found (bash setup.sh --dev downloads it; or set HUABI_OPEN_CLIP_WHEEL)")
    if importlib.util.find_spec("ftfy") is None:
        pytest.skip("ftfy not installed (pip install -e .[dev])")
    folder = tmp_path_factory.mktemp("open_clip")
    with zipfile.ZipFile(wheel) as archive:
        for name in ("open_clip/tokenizer.py", "open_clip/bpe_simple_vocab_16e6.txt.gz"):
            (folder / Path(name).name).write_bytes(archive.read(name))
    spec = importlib.util.spec_from_file_location("open_clip_original_tokenizer", folder / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # a standalone module: ftfy, regex, numpy, torch
    assert gzip.open(folder / "bpe_simple_vocab_16e6.txt.gz").readline()  # the original vocabulary is there
    return module


def _not_comparable(text: str) -> bool:
    """Documented differences: the original's ftfy/html cleaning (huabi skips it), and the literal
    text ``<|startoftext|>``/``<|endoftext|>``, a special token to transformers' tokenizer (as in A1111)
    but plain characters to OpenCLIP's (its specials are spelled ``<start_of_text>``)."""
    import ftfy

    if "<|startoftext|>" in text or "<|endoftext|>" in text:
        return True
    return ftfy.fix_text(text) != text or html.unescape(html.unescape(text)) != text


def test_ids_equal_the_original_clip_tokenizer(original):
    reference = original.SimpleTokenizer()
    ours = load_clip_tokenizer()
    texts = list(HAND_WRITTEN) + _generated_strings(300)
    compared = [t for t in texts if not _not_comparable(t)]
    left_out = len(texts) - len(compared)
    print(f"compared {len(compared)} texts; {left_out} left out (documented differences)")
    assert len(compared) >= 0.8 * len(texts)
    got = ours(compared, add_special_tokens=False, verbose=False).input_ids
    mismatches = [text for text, ids in zip(compared, got) if ids != reference.encode(text)]
    assert mismatches == []


@pytest.mark.parametrize("text", ["a photo of a cat", "A Lighthouse, at NIGHT!! (oil painting)",
                                  "cat " * 120, ""])
def test_sd2_sequences_equal_open_clip_tokenize(original, text):
    [sd2] = load_tokenizers(ModelFamily.SD2)
    expected = original.tokenize([text])[0].tolist()
    got = sd2(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert got == expected
