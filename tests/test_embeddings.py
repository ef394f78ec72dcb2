"""Textual-inversion embeddings: file formats, token splicing, chunking, weights, SDXL, errors, infotext.

Tolerances: exact (``torch.equal`` / identical pixels) throughout: an embedding
whose vectors are a word's own token embeddings runs the very same float
operations as that word, and a ``--from`` regeneration runs the same request.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cli_runner import run
from huabi.core.conditioning import encode_a1111_prompts
from huabi.core.infotext import parse_infotext
from huabi.errors import HuabiError
from huabi.models.embeddings import (
    EmbeddingLibrary,
    embedding_short_hash,
    list_embedding_files,
    read_embedding_file,
)
from huabi.models.load import load_model
from huabi.pipelines.common import encode_guidance
from huabi.service.pngio import read_infotext

CPU = torch.device("cpu")


class NotATensor:  # pickled into a .pt file: weights_only loading must refuse it
    pass


@pytest.fixture(scope="module")
def sd1(tiny_sd1_file):
    return load_model(tiny_sd1_file, compute_hash=False)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_file):
    return load_model(tiny_sdxl_file, compute_hash=False)


def library(bundle, folder: Path) -> EmbeddingLibrary:
    return EmbeddingLibrary.from_folder(folder, family=bundle.family, text_encoders=bundle.text_encoders)


def encode(bundle, texts, embeddings=None, **kw):
    with torch.inference_mode():
        return encode_a1111_prompts(
            bundle.text_encoders, bundle.tokenizers, bundle.family, texts, embeddings=embeddings, **kw
        )


def word_vectors(bundle, word: str, encoder_index: int = 0) -> torch.Tensor:
    """The token embeddings of ``word`` in one text encoder: [n tokens, D]."""
    tokenizer = bundle.tokenizers[encoder_index]
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    table = bundle.text_encoders[encoder_index].get_input_embeddings().weight
    return table[torch.tensor(ids)].detach().clone()


def save_a1111_pt(path: Path, vectors: torch.Tensor) -> Path:
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.clone().requires_grad_(True)},
                "name": path.stem, "step": 1000, "sd_checkpoint": None, "sd_checkpoint_name": None}, path)
    return path


# ---------------------------------------------------------------- file formats


def test_each_file_format_loads(tmp_path):
    vectors = torch.randn(3, 64)
    save_a1111_pt(tmp_path / "a1111.pt", vectors)
    torch.save({"<my-token>": vectors[0]}, tmp_path / "diffusers.bin")
    torch.save({"<my-token>": vectors}, tmp_path / "diffusers_multi.bin")
    save_file({"emb_params": vectors}, tmp_path / "a1111.safetensors")
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, tmp_path / "sdxl.safetensors")

    assert torch.equal(read_embedding_file(tmp_path / "a1111.pt")[""], vectors)
    assert torch.equal(read_embedding_file(tmp_path / "diffusers.bin")[""], vectors[:1])  # [D] -> [1, D]
    assert torch.equal(read_embedding_file(tmp_path / "diffusers_multi.bin")[""], vectors)
    assert torch.equal(read_embedding_file(tmp_path / "a1111.safetensors")[""], vectors)
    sdxl_sets = read_embedding_file(tmp_path / "sdxl.safetensors")
    assert {k: tuple(v.shape) for k, v in sdxl_sets.items()} == {"clip_l": (2, 768), "clip_g": (2, 1280)}
    assert sorted(list_embedding_files(tmp_path)) == ["a1111", "diffusers", "diffusers_multi", "sdxl"]


def test_unknown_layout_and_bad_tensors_are_errors(tmp_path):
    torch.save({"a": torch.zeros(2), "b": torch.zeros(2)}, tmp_path / "two.pt")
    with pytest.raises(HuabiError, match=r"embedding two\.pt: not a textual-inversion embedding"):
        read_embedding_file(tmp_path / "two.pt")
    torch.save({"string_to_param": {"*": torch.zeros(2, 3, 4)}}, tmp_path / "cube.pt")
    with pytest.raises(HuabiError, match=r"embedding cube\.pt: string_to_param has shape \[2, 3, 4\]"):
        read_embedding_file(tmp_path / "cube.pt")
    save_file({"clip_l": torch.zeros(2, 8), "clip_g": torch.zeros(3, 8)}, tmp_path / "uneven.safetensors")
    with pytest.raises(HuabiError, match=r"uneven\.safetensors: clip_l has 2 vectors but clip_g has 3"):
        read_embedding_file(tmp_path / "uneven.safetensors")
    save_file({"clip_l": torch.zeros(2, 8)}, tmp_path / "half.safetensors")
    with pytest.raises(HuabiError, match=r"half\.safetensors: an SDXL embedding needs both clip_l and clip_g"):
        read_embedding_file(tmp_path / "half.safetensors")


# ---------------------------------------------------------------- conditioning (SD1)


def test_embedding_of_a_words_vectors_equals_that_word(sd1, tmp_path):
    word = "strawberry cake"  # several tokens
    save_a1111_pt(tmp_path / "myemb.pt", word_vectors(sd1, word))
    lib = library(sd1, tmp_path)
    with_embedding = encode(sd1, ["a photo of myemb, on a table"], lib)
    plain = encode(sd1, [f"a photo of {word}, on a table"])
    assert torch.equal(with_embedding.context, plain.context)
    assert with_embedding.embeddings_used == ("myemb",)
    # Case does not matter (the tokenizer lowercases), nor punctuation around the name.
    assert torch.equal(encode(sd1, ["a photo of MyEmb, on a table"], lib).context, plain.context)


def test_random_embedding_changes_conditioning_only_where_used(sd1, tmp_path):
    save_a1111_pt(tmp_path / "style.pt", torch.randn(2, 64, generator=torch.Generator().manual_seed(0)))
    lib = library(sd1, tmp_path)
    assert not torch.equal(encode(sd1, ["a cat style"], lib).context, encode(sd1, ["a cat style"]).context)
    # Not on a token boundary: "styles" is a different token, so no embedding.
    assert encode(sd1, ["a cat styles"], lib).embeddings_used == ()
    assert torch.equal(encode(sd1, ["a cat styles"], lib).context, encode(sd1, ["a cat styles"]).context)


def test_vectors_count_as_tokens_for_chunks(sd1, tmp_path):
    save_a1111_pt(tmp_path / "three.pt", torch.randn(3, 64, generator=torch.Generator().manual_seed(1)))
    lib = library(sd1, tmp_path)
    assert len(sd1.tokenizers[0]("a " * 74, add_special_tokens=False)["input_ids"]) == 74
    # 72 tokens + 3 vectors = 75: one chunk; 74 + 3 does not fit: the embedding moves whole to chunk 2.
    assert encode(sd1, ["a " * 72 + "three"], lib).chunks == 1
    two = encode(sd1, ["a " * 74 + "three"], lib)
    assert two.chunks == 2
    # The second chunk is exactly "three" encoded alone, the first the 74 tokens alone.
    assert torch.equal(two.context[:, 77:], encode(sd1, ["three"], lib).context)
    assert torch.allclose(two.context[:, :77], encode(sd1, ["a " * 74]).context, atol=1e-6)


def test_weights_apply_to_embedding_vectors(sd1, tmp_path):
    save_a1111_pt(tmp_path / "myemb.pt", word_vectors(sd1, "red apple"))
    lib = library(sd1, tmp_path)
    weighted = encode(sd1, ["a (myemb:1.4) on grass"], lib)
    assert torch.equal(weighted.context, encode(sd1, ["a (red apple:1.4) on grass"]).context)
    assert not torch.equal(weighted.context, encode(sd1, ["a myemb on grass"], lib).context)


def test_negative_prompt_uses_embeddings(sd1, tmp_path):
    save_a1111_pt(tmp_path / "easynegative.pt", word_vectors(sd1, "blurry lowres"))
    lib = library(sd1, tmp_path)
    guidance = encode_guidance(sd1, "a cat", "easynegative", clip_skip=1, width_px=64, height_px=64,
                               device=CPU, embeddings=lib)
    assert guidance.embeddings_used() == ("easynegative",)
    _conds, uncond = guidance.conditioning(1)
    expected = encode(sd1, ["blurry lowres"], negative=True).context
    assert torch.equal(uncond.entries[0][1].context, expected)


def test_unreferenced_bad_files_are_ignored_and_missing_names_are_words(sd1, tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"not a zip file")
    lib = library(sd1, tmp_path)
    assert torch.equal(encode(sd1, ["a cat, nosuchembedding"], lib).context,
                       encode(sd1, ["a cat, nosuchembedding"]).context)


# ---------------------------------------------------------------- SDXL


def test_sdxl_clip_l_and_clip_g(sdxl, tmp_path):
    word = "golden hour"
    save_file({"clip_l": word_vectors(sdxl, word, 0), "clip_g": word_vectors(sdxl, word, 1)},
              tmp_path / "light.safetensors")
    lib = library(sdxl, tmp_path)
    with_embedding = encode(sdxl, ["a beach at light"], lib)
    plain = encode(sdxl, [f"a beach at {word}"])
    assert torch.equal(with_embedding.context, plain.context)
    assert torch.equal(with_embedding.pooled, plain.pooled)
    # Swapped sets give a different conditioning: each encoder reads its own key.
    save_file({"clip_l": word_vectors(sdxl, "night", 0), "clip_g": word_vectors(sdxl, word, 1)[:1]},
              tmp_path / "mixed.safetensors")
    mixed = encode(sdxl, ["a beach at mixed"], library(sdxl, tmp_path))
    width_l = sdxl.text_encoders[0].config.hidden_size
    assert torch.equal(mixed.context[..., :width_l], encode(sdxl, ["a beach at night"]).context[..., :width_l])


def test_sd1_embedding_on_sdxl_and_sdxl_embedding_on_sd1_are_errors(sd1, sdxl, tmp_path):
    save_a1111_pt(tmp_path / "sd1emb.pt", torch.randn(2, 64))
    save_file({"clip_l": torch.randn(2, 64), "clip_g": torch.randn(2, 64)}, tmp_path / "xlemb.safetensors")
    with pytest.raises(HuabiError, match=r"embedding sd1emb\.pt: has one vector set \(width 64\); this sdxl model "
                                         r"needs clip_l and clip_g vectors \(64, 64 wide\)"):
        encode(sdxl, ["a sd1emb"], library(sdxl, tmp_path))
    with pytest.raises(HuabiError, match=r"embedding xlemb\.safetensors: is an SDXL embedding \(clip_l 64, clip_g 64\)"):
        encode(sd1, ["a xlemb"], library(sd1, tmp_path))


# ---------------------------------------------------------------- errors


def test_wrong_width_is_an_error_naming_file_and_widths(sd1, tmp_path):
    save_file({"emb_params": torch.randn(2, 768)}, tmp_path / "wide.safetensors")
    with pytest.raises(HuabiError, match=r"embedding wide\.safetensors: vectors are width 768 wide but this sd1 "
                                         r"model's text encoder\(s\) are 64 wide"):
        encode(sd1, ["a wide cat"], library(sd1, tmp_path))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_corrupt_and_pickled_code_files_are_errors_naming_the_file(sd1, tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x04garbage")
    torch.save({"string_to_param": {"*": NotATensor()}}, tmp_path / "code.pt")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    lib = library(sd1, tmp_path)
    with pytest.raises(HuabiError, match=r"^embedding corrupt\.pt: cannot read it safely"):
        encode(sd1, ["a corrupt cat"], lib)
    with pytest.raises(HuabiError, match=r"^embedding code\.pt: this file needs code execution to load .* huabi never executes code from a model file"):
        encode(sd1, ["a code cat"], lib)
    with pytest.raises(HuabiError, match=r"cut\.safetensors"):
        encode(sd1, ["a cut cat"], lib)


def test_too_many_vectors_for_a_chunk_is_an_error(sd1, tmp_path):
    save_a1111_pt(tmp_path / "huge.pt", torch.randn(76, 64))
    with pytest.raises(HuabiError, match=r"embedding 'huge' has 76 vectors; at most 75 fit in a prompt chunk"):
        encode(sd1, ["huge"], library(sd1, tmp_path))


# ---------------------------------------------------------------- CLI: image, infotext, --from


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_cli_embedding_changes_image_records_ti_hashes_and_from_reproduces(capsys, tiny_sd1_file, tmp_path):
    emb_dir = tmp_path / "embeddings"
    emb_dir.mkdir()
    path = save_a1111_pt(emb_dir / "mystyle.pt", torch.randn(2, 64, generator=torch.Generator().manual_seed(3)) * 3)
    common = ["--model", tiny_sd1_file, "--steps", "2", "--size", "64x64", "--seed", "5", "--quiet"]

    code, out, err = run(capsys, "generate", "a cat, mystyle", "--embeddings", emb_dir, "--out", tmp_path / "a", *common)
    assert code == 0, err
    image = Path(out.split()[0])
    params = parse_infotext(read_infotext(image)).params
    expected_hash = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert params["TI hashes"] == f"mystyle: {expected_hash}"
    assert embedding_short_hash(path) == expected_hash
    assert '"mystyle: ' in read_infotext(image)  # quoted, as A1111 writes it

    code, out, err = run(capsys, "generate", "a cat, mystyle", "--out", tmp_path / "b", *common,
                         "--embeddings", tmp_path / "empty_dir_does_not_exist")
    assert code == 2 and "embeddings:" in err and "no such folder" in err

    (tmp_path / "none").mkdir()
    code, out, err = run(capsys, "generate", "a cat, mystyle", "--embeddings", tmp_path / "none",
                         "--out", tmp_path / "b", *common)
    assert code == 0, err
    without = Path(out.split()[0])
    assert not np.array_equal(pixels(image), pixels(without))
    assert "TI hashes" not in parse_infotext(read_infotext(without)).params

    code, out, err = run(capsys, "generate", "--from", image, "--model", tiny_sd1_file, "--embeddings", emb_dir,
                         "--out", tmp_path / "c", "--quiet")
    assert code == 0, err
    again = Path(out.split()[0])
    assert np.array_equal(pixels(again), pixels(image))
    assert read_infotext(again) == read_infotext(image)


def test_comma_backtrack_moves_an_embedding_with_its_tokens():
    from huabi.core.conditioning import _EmbeddingUse, _split_units

    comma, word = 11, 22
    # 60 words, a comma, 2 words, a 3-vector embedding, 9 words: a full chunk of 75; the next word
    # sends everything after the comma (14 tokens, the embedding at offset 2) to chunk 2, as A1111.
    units = [word] * 60 + [comma] + [word] * 2 + [_EmbeddingUse("e", 3)] + [word] * 10
    chunks = _split_units(units, [1.0] * len(units), comma_id=comma)
    assert [len(chunk.ids) for chunk in chunks] == [61, 15]
    assert chunks[0].fixes == [] and chunks[1].fixes == [(2, "e")]
