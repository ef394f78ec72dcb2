"""The shipped CLIP tokenizer against golden ids and a from-scratch BPE reference.

The reference below re-implements the original CLIP tokenizer algorithm
(byte -> symbol table, regex pre-split, rank-ordered BPE merges) directly from
the merge list, independent of ``tokenizers``.  Where the original runs
``ftfy.fix_text`` it uses NFC normalisation (ftfy's default normalisation) and
it skips HTML unescaping; both are documented differences of huabi's runtime
tokenizer (see ``huabi.models.tokenizer``).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import random
import sys
import unicodedata
import zipfile

import pytest
import regex

from huabi.errors import HuabiError
from huabi.models.family import ModelFamily
from huabi.models.tokenizer import load_clip_tokenizer, load_tokenizers, tokenizer_dir

N_MERGES = 48894


def _byte_table() -> tuple[dict[int, str], list[int]]:
    """Byte -> symbol, and the byte order CLIP's base vocabulary uses."""
    kept = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    table: dict[int, str] = {b: chr(b) for b in kept}
    moved = [b for b in range(256) if b not in table]
    for n, b in enumerate(moved):
        table[b] = chr(256 + n)
    return table, kept + moved


class ReferenceClipBpe:
    PATTERN = regex.compile(
        r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        regex.IGNORECASE,
    )

    def __init__(self, merges: list[tuple[str, str]]):
        self.byte_to_symbol, order = _byte_table()
        base = [self.byte_to_symbol[b] for b in order]
        tokens = base + [s + "</w>" for s in base] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.token_id = {t: i for i, t in enumerate(tokens)}
        self.rank = {pair: i for i, pair in enumerate(merges)}

    def _bpe(self, word: str) -> list[str]:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            ranked = [(self.rank[p], p) for p in zip(parts, parts[1:]) if p in self.rank]
            if not ranked:
                break
            best = min(ranked)[1]
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[int]:
        text = unicodedata.normalize("NFC", text)
        text = regex.sub(r"\s+", " ", text).strip().lower()
        ids: list[int] = []
        for piece in self.PATTERN.findall(text):
            if piece in ("<|startoftext|>", "<|endoftext|>"):  # the original pre-seeds its BPE cache with these
                ids.append(self.token_id[piece])
                continue
            symbols = "".join(self.byte_to_symbol[b] for b in piece.encode("utf-8"))
            ids.extend(self.token_id[t] for t in self._bpe(symbols))
        return ids


def _shipped_merges() -> list[tuple[str, str]]:
    lines = (tokenizer_dir() / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0].startswith("#version")
    return [tuple(line.split(" ")) for line in lines[1:] if line]


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


@pytest.fixture(scope="module")
def reference():
    return ReferenceClipBpe(_shipped_merges())


HAND_WRITTEN = [
    "a photo of a cat",
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer, (red eyes:1.2), [blue sky]",
    "(worst quality, low quality:1.4), lowres, bad anatomy, bad hands, text, error, missing fingers",
    "A RED apple on a WOODEN table, studio lighting, 85mm, f/1.8, bokeh",
    "photo of a dog  \t\n  running   on the beach",
    "don't stop, it's what we're doing; they've, I'm, you'll, he'd",
    "1234567890 3.14159 1e-5 100% $5.99 #hashtag @user",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "antidisestablishmentarianism-ish hyper_realistic octane-render 8k uhd",
    "🐱🐶 cat and dog 🍎🍏 emoji art ❤️ 👍🏽 👨‍👩‍👧",
    "日本語のプロンプト、美しい風景、桜の木",
    "中文提示词：一只可爱的猫，水彩画风格",
    "한국어 프롬프트 고양이",
    "Ελληνικά κείμενο και русский текст",
    "café naïve résumé Æsir Øresund Ångström façade",
    "e\u0301cole cafe\u0301",  # decomposed accents, NFC folds them
    "non\u00a0breaking\u2009thin\u3000ideographic spaces",
    "tabs\tand\nnewlines\r\nmixed",
    "<lora:detail_tweaker:0.8> <hypernet:foo:1>",
    "BREAK landscape BREAK portrait",
    "((((extremely detailed)))) [[[faded]]] {curly} <angle>",
    "a|b|c x^2 a~b a`b a\\b a/b",
    "...!!!???,,,;;;:::---___",
    "'quoted' \"double quoted\" `back`",
    "score_9, score_8_up, score_7_up, source_anime",
    "trending on artstation, by greg rutkowski and alphonse mucha",
    "",
    "   ",
    "x",
    "ALLCAPS ShoutingText camelCaseWord snake_case_word kebab-case-word",
    "n'est-ce pas l'homme d'affaires",
    "١٢٣ ٤٥٦ arabic digits and العربية",
    "हिन्दी पाठ",
    "ﬁne ligature and ＦＵＬＬＷＩＤＴＨ text",
    "mathematical 𝔸𝕓𝕔 and ∑∫√∞ symbols ±×÷",
    "zero\u200bwidth\u200djoiner",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "The quick brown fox jumps over the lazy dog.",
    "<|startoftext|>already has specials<|endoftext|>",
]

_WORDS = [
    "cat", "dog", "portrait", "landscape", "cyberpunk", "watercolor", "highly", "detailed", "4k", "8K",
    "sunset", "neon", "girl", "boy", "octane", "render", "unreal", "engine", "photorealistic", "bokeh",
    "猫", "犬", "風景", "café", "Zürich", "Ærø", "émigré", "🐱", "🌸", "✨", "🔥", "😀", "1girl", "2boys",
    "(", ")", "[", "]", ":", "1.2", "0.8", ",", ".", "!", "?", "-", "_", "/", "'s", "n't", "&", "%",
    "xyzzyqux", "Pneumonia", "antiquarianism", "photoshop", "HDR", "RAW", "DSLR", "f/2.8", "35mm",
]


def _generated_strings(n: int) -> list[str]:
    rng = random.Random(1234)
    separators = [" ", " ", " ", ", ", "", "  ", "\t", "\n", ",", " (", ") "]
    out = []
    for _ in range(n):
        parts = [rng.choice(_WORDS) + rng.choice(separators) for _ in range(rng.randint(1, 40))]
        text = "".join(parts)
        if rng.random() < 0.3:
            text = text.upper()
        if rng.random() < 0.2:  # random code points from a few scripts and symbols
            text += "".join(chr(rng.choice([rng.randint(0x20, 0x7E), rng.randint(0xA0, 0x24F),
                                            rng.randint(0x3040, 0x30FF), rng.randint(0x4E00, 0x4FFF),
                                            rng.randint(0x1F300, 0x1F64F)])) for _ in range(rng.randint(1, 12)))
        out.append(text)
    return out


def test_golden_ids(tokenizer):
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert tokenizer.bos_token_id == 49406 and tokenizer.eos_token_id == 49407
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77


@pytest.mark.parametrize("text", HAND_WRITTEN)
def test_hand_written_match_reference(tokenizer, reference, text):
    assert tokenizer(text, add_special_tokens=False, verbose=False).input_ids == reference.encode(text)


def test_generated_match_reference(tokenizer, reference):
    texts = _generated_strings(300)
    got = tokenizer(texts, add_special_tokens=False, verbose=False).input_ids
    mismatches = [t for t, ids in zip(texts, got) if ids != reference.encode(t)]
    assert mismatches == []


def test_vocab_json_is_clips_layout():
    """vocab.json is exactly bytes, bytes+</w>, one token per merge, then the two specials."""
    vocab = json.loads((tokenizer_dir() / "vocab.json").read_text(encoding="utf-8"))
    merges = _shipped_merges()
    assert len(merges) == N_MERGES
    assert vocab == ReferenceClipBpe(merges).token_id


def _wheel_or_gz() -> str | None:
    candidates = [os.environ.get("HUABI_OPEN_CLIP_WHEEL", "")] + sorted(glob.glob("/tmp/oc/open_clip_torch-*.whl"))
    candidates += sorted(glob.glob(os.path.join(sys.prefix, "huabi-reference", "open_clip_torch-*.whl")))  # setup.sh --dev
    return next((c for c in candidates if c and os.path.isfile(c)), None)


def test_merges_equal_original_file_when_available():
    source = _wheel_or_gz()
    if source is None:
        pytest.skip("open_clip_torch wheel not available offline (set HUABI_OPEN_CLIP_WHEEL)")
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as wheel:
            raw = gzip.decompress(wheel.read("open_clip/bpe_simple_vocab_16e6.txt.gz"))
    else:
        raw = gzip.decompress(open(source, "rb").read())
    original = [tuple(line.split()) for line in raw.decode("utf-8").split("\n")[1 : 1 + N_MERGES]]
    assert _shipped_merges() == original


def test_family_pad_tokens():
    pads = {family: [t.pad_token_id for t in load_tokenizers(family)] for family in ModelFamily}
    assert pads == {
        ModelFamily.SD1: [49407],
        ModelFamily.HUABI_MINI: [49407],
        ModelFamily.SD2: [0],
        ModelFamily.SDXL: [49407, 0],
        ModelFamily.SDXL_REFINER: [0],
    }
    # OpenCLIP convention: [BOS] text [EOS] then zeros, as open_clip.tokenize gives.
    open_clip_style = load_tokenizers(ModelFamily.SD2)[0]
    ids = open_clip_style("a cat", padding="max_length", max_length=77).input_ids
    assert ids[:4] == [49406, 320, 2368, 49407] and set(ids[4:]) == {0} and len(ids) == 77


def test_load_uses_no_network():
    # The autouse network guard of conftest fails this test on any connection attempt.
    assert [len(t) for t in load_tokenizers(ModelFamily.SDXL)] == [49408, 49408]


def test_missing_files_error(tmp_path):
    with pytest.raises(HuabiError, match=r"tokenizer file missing: .*vocab\.json"):
        load_clip_tokenizer(folder=tmp_path)


def test_bad_merges_line_error(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"<|startoftext|>": 49406, "<|endoftext|>": 49407}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(HuabiError, match=r"merges\.txt line 2 is not a 'left right' merge"):
        load_clip_tokenizer(folder=tmp_path)


def test_not_clip_vocab_error(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(HuabiError, match=r"does not hold the CLIP vocabulary"):
        load_clip_tokenizer(folder=tmp_path)


def test_bad_json_error(tmp_path):
    (tmp_path / "vocab.json").write_text("{not json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(HuabiError, match=r"vocab\.json is not valid JSON"):
        load_clip_tokenizer(folder=tmp_path)


def test_unknown_family_error():
    with pytest.raises(HuabiError, match=r"no tokenizer for model family 'sd9'"):
        load_tokenizers("sd9")
