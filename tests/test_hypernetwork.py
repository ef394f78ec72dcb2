"""Hypernetworks (A1111 .pt): file reading, the attention change, restore, engine/CLI wiring, errors.

Tolerances: strength 0 and a ``--from`` regeneration are exact (identical
pixels); one attention layer with a hypernetwork matches the attention written
out by hand to 1e-4 absolute (float32 with a different summation order; outputs
of order 1, measured worst 1.2e-5, while the hypernetwork moves them by >1e-2); the UNet is
bit-identical (same tensors, same modules) after use.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_runner import run
from huabi.core.infotext import parse_infotext, request_from_infotext
from huabi.core.request import GenerationRequest
from huabi.errors import HuabiError
from huabi.models.hypernetwork import (
    HypernetworkModule,
    HypernetworkStructure,
    dropout_structure_for,
    hypernetwork_dict,
    load_hypernetwork,
)
from huabi.service.attention_adapters import applied_hypernetworks, check_hypernetwork_fits, hypernetwork_uses
from huabi.service.engine import Engine
from huabi.service.pngio import read_infotext

CPU = torch.device("cpu")


class NotATensor:  # pickled into a .pt file: weights_only loading must refuse it
    pass


def random_modules(width: int, structure: HypernetworkStructure, seed: int, scale: float = 0.3):
    """(k_state, v_state) of A1111's module layout with seeded random weights."""
    generator = torch.Generator().manual_seed(seed)
    states = []
    for _ in range(2):
        module = HypernetworkModule(width, structure)
        state = {key: torch.randn(value.shape, generator=generator) * scale for key, value in module.state_dict().items()}
        states.append(state)
    return states[0], states[1]


def write_hypernetwork(path: Path, widths=(64, 32), *, seed=0, structure=None, scale=0.3) -> Path:
    structure = structure or HypernetworkStructure(layer_structure=(1, 2, 1), activation_func="relu")
    modules = {width: random_modules(width, structure, seed + width, scale) for width in widths}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(hypernetwork_dict(modules, structure, name=path.stem), path)
    return path


@pytest.fixture(scope="module")
def sd1_unet():
    from tiny_models import build_tiny_parts

    from huabi.models.family import ModelFamily

    return build_tiny_parts(ModelFamily.SD1).unet


# ---------------------------------------------------------------- the file format


def test_a1111_dict_loads_with_its_structure_and_hash(tmp_path):
    structure = HypernetworkStructure(layer_structure=(1, 1.5, 2, 1), activation_func="swish", add_layer_norm=True,
                                      activate_output=False, dropout_structure=(0, 0.3, 0.3, 0))
    path = write_hypernetwork(tmp_path / "style.pt", widths=(64,), structure=structure)
    network = load_hypernetwork(path)
    assert network.name == "style" and network.widths == (64,)
    assert network.short_hash == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    k_module = network.modules[64][0]
    kinds = [type(layer).__name__ for layer in k_module.linear]
    # Linear, act, norm, dropout | Linear, act, norm, dropout | Linear, norm (no act/dropout on the last)
    assert kinds == ["Linear", "Hardswish", "LayerNorm", "Dropout", "Linear", "Hardswish", "LayerNorm", "Dropout",
                     "Linear", "LayerNorm"]
    assert k_module.linear[0].weight.shape == (96, 64) and k_module.linear[4].weight.shape == (128, 96)
    assert not k_module.training


def test_old_files_without_dropout_structure_follow_a1111_defaults(tmp_path):
    assert dropout_structure_for((1, 2, 1), False, False) == (0, 0, 0)
    assert dropout_structure_for((1, 2, 2, 1), True, False) == (0, 0.3, 0, 0)
    assert dropout_structure_for((1, 2, 2, 1), True, True) == (0, 0.3, 0.3, 0)
    # Earliest A1111 files: linear1/linear2 names, no activation, no structure keys.
    generator = torch.Generator().manual_seed(1)
    old = {"linear1.weight": torch.randn(128, 64, generator=generator), "linear1.bias": torch.randn(128, generator=generator),
           "linear2.weight": torch.randn(64, 128, generator=generator), "linear2.bias": torch.randn(64, generator=generator)}
    torch.save({64: [old, dict(old)]}, tmp_path / "old.pt")
    network = load_hypernetwork(tmp_path / "old.pt")
    x = torch.randn(1, 3, 64, generator=generator)
    expected = x + (x @ old["linear1.weight"].T + old["linear1.bias"]) @ old["linear2.weight"].T + old["linear2.bias"]
    torch.testing.assert_close(network.modules[64][0](x), expected, atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x04garbage")
    torch.save({64: [{"linear.0.weight": NotATensor()}, {}]}, tmp_path / "code.pt")
    torch.save({"string_to_param": {"*": torch.zeros(1, 64)}}, tmp_path / "embedding.pt")
    structure = HypernetworkStructure()
    k, v = random_modules(64, structure, 0)
    torch.save({64: [k, v], "layer_structure": [1, 4, 1]}, tmp_path / "shape.pt")
    cases = {
        "corrupt.pt": r"^hypernetwork corrupt\.pt: cannot read it safely",
        "code.pt": r"^hypernetwork code\.pt: this file needs code execution to load .* huabi never executes code",
        "embedding.pt": r"^hypernetwork embedding: no per-width modules found",
        "shape.pt": r"^hypernetwork shape: width 64 k linear\.0\.weight has shape \[128, 64\], expected \[256, 64\]",
        "missing.pt": r"^hypernetwork .*missing\.pt: no such file",
    }
    for name, message in cases.items():
        with pytest.raises(HuabiError, match=message) as err:
            load_hypernetwork(tmp_path / name)
        assert "\n" not in str(err.value)


def test_width_matching_no_attention_layer_is_an_error(sd1_unet, tmp_path):
    network = load_hypernetwork(write_hypernetwork(tmp_path / "sd15style.pt", widths=(768, 320)))
    with pytest.raises(HuabiError, match=r"^hypernetwork sd15style: its widths 320, 768 match no attention layer "
                                         r"of this model \(context widths 32, 64\)$"):
        check_hypernetwork_fits(network, sd1_unet)


# ---------------------------------------------------------------- the attention change


def attention_by_hand(attn, x, context_k, context_v):
    """Multi-head attention written out: softmax(q k^T / sqrt(d)) v per head, then to_out."""
    q, k, v = attn.to_q(x), attn.to_k(context_k), attn.to_v(context_v)
    heads = attn.heads
    batch, tokens, inner = q.shape
    d = inner // heads

    def split(t):
        return t.reshape(batch, -1, heads, d).permute(0, 2, 1, 3)

    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (weights @ split(v)).permute(0, 2, 1, 3).reshape(batch, tokens, inner)
    return attn.to_out[1](attn.to_out[0](out))


def test_strength_one_matches_hand_computed_attention_and_strength_zero_is_exact(sd1_unet, tmp_path):
    network = load_hypernetwork(write_hypernetwork(tmp_path / "h.pt"))
    attn = sd1_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2  # cross-attention, 32 wide, 64 context
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 32, generator=generator)
    context = torch.randn(2, 7, 64, generator=generator)
    k_mod, v_mod = network.modules[64]
    with torch.no_grad():
        plain = attn(x, encoder_hidden_states=context)
        with applied_hypernetworks(sd1_unet, [(network, 0.0)]):
            at_zero = attn(x, encoder_hidden_states=context)
        with applied_hypernetworks(sd1_unet, [(network, 1.0)]) as changed:
            at_one = attn(x, encoder_hidden_states=context)
        expected = attention_by_hand(attn, x, context + k_mod.linear(context), context + v_mod.linear(context))
        after = attn(x, encoder_hidden_states=context)
    # Tiny SD1 has 4 transformer blocks: 4 cross-attentions (context 64) and 4 self-attentions (32 or
    # 64 wide); all 8 change, since this network has 64 and 32 entries (A1111 matches by width only).
    assert changed == 8
    assert torch.equal(at_zero, plain)
    torch.testing.assert_close(at_one, expected, atol=1e-4, rtol=0)
    assert (at_one - plain).abs().max() > 1e-2
    assert torch.equal(after, plain)


def test_several_networks_chain_in_order_and_unet_is_restored_bit_identically(sd1_unet, tmp_path):
    first = load_hypernetwork(write_hypernetwork(tmp_path / "a.pt", widths=(64,), seed=1))
    second = load_hypernetwork(write_hypernetwork(tmp_path / "b.pt", widths=(64,), seed=2))
    attn = sd1_unet.mid_block.attentions[0].transformer_blocks[0].attn2
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 64, generator=generator)
    context = torch.randn(1, 5, 64, generator=generator)
    before = {key: value.clone() for key, value in sd1_unet.state_dict().items()}
    modules_before = {name: id(module) for name, module in sd1_unet.named_modules()}
    with torch.no_grad():
        with applied_hypernetworks(sd1_unet, [(first, 0.5), (second, 0.8)]):
            chained = attn(x, encoder_hidden_states=context)
            assert set(sd1_unet.state_dict()) != set(before)  # wrappers are in place
        ck = second.modules[64][0](first.modules[64][0](context, 0.5), 0.8)
        cv = second.modules[64][1](first.modules[64][1](context, 0.5), 0.8)
        expected = attention_by_hand(attn, x, ck, cv)
    torch.testing.assert_close(chained, expected, atol=1e-4, rtol=0)
    after = sd1_unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[key], before[key]) for key in before)
    assert {name: id(module) for name, module in sd1_unet.named_modules()} == modules_before


def test_restored_even_when_generation_raises(sd1_unet, tmp_path):
    network = load_hypernetwork(write_hypernetwork(tmp_path / "h.pt"))
    attn = sd1_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    original = attn.to_k
    with pytest.raises(RuntimeError, match="boom"):
        with applied_hypernetworks(sd1_unet, [(network, 1.0)]):
            assert attn.to_k is not original
            raise RuntimeError("boom")
    assert attn.to_k is original


def test_prompt_tags_and_setting_are_collected_in_order():
    request = GenerationRequest("a cat <hypernet:anime:0.6> AND a dog <hypernet:ink> <lora:x:1>",
                                hypernetwork="base", hypernetwork_strength=0.3)
    assert hypernetwork_uses(request) == [("base", 0.3), ("anime", 0.6), ("ink", 1.0)]


def test_request_fields_are_checked():
    with pytest.raises(HuabiError, match=r"^hypernetwork_strength: must be a number from -10 to 10, got 11"):
        GenerationRequest("x", hypernetwork="a", hypernetwork_strength=11)
    with pytest.raises(HuabiError, match=r"^hypernetwork: must be a name or path"):
        GenerationRequest("x", hypernetwork=" ")


# ---------------------------------------------------------------- engine and CLI


def pixels(path_or_image) -> np.ndarray:
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_engine_tags_strength_zero_and_unknown_name(tiny_sd1_file, tmp_path):
    models = tmp_path / "models"
    write_hypernetwork(models / "hypernetworks" / "inky.pt", scale=0.5)
    engine = Engine(device="cpu", dtype="fp32", models_dir=models, embeddings_dir=None)
    base = GenerationRequest("a cat", steps=2, width_px=64, height_px=64, seed=3, model=str(tiny_sd1_file))
    plain = engine.generate(base)[0]
    zero = engine.generate(base.replace(prompt="a cat <hypernet:inky:0>"))[0]
    tagged = engine.generate(base.replace(prompt="a cat <hypernet:inky:1>"))[0]
    assert np.array_equal(pixels(zero.image), pixels(plain.image))
    assert not np.array_equal(pixels(tagged.image), pixels(plain.image))
    # The tag stays in the recorded prompt (as A1111 records it); no setting keys.
    assert tagged.infotext.startswith("a cat <hypernet:inky:1>\n")
    assert "Hypernet" not in parse_infotext(tagged.infotext).params
    again = engine.generate(base.replace(prompt="a cat <hypernet:inky:1>"))[0]
    assert np.array_equal(pixels(again.image), pixels(tagged.image))
    with pytest.raises(HuabiError, match=r"^hypernetwork nope: no such file, and none of that name in .*hypernetworks$"):
        engine.generate(base.replace(prompt="a cat <hypernet:nope:1>"))


def test_cli_setting_records_a1111_keys_and_from_reproduces(capsys, tiny_sd1_file, tmp_path):
    models = tmp_path / "models"
    path = write_hypernetwork(models / "hypernetworks" / "inky.pt", scale=0.5)
    common = ["--model", tiny_sd1_file, "--models-dir", models, "--steps", "2", "--size", "64x64", "--seed", "5", "--quiet"]
    code, out, err = run(capsys, "generate", "a cat", "--hypernet", "inky", "--hypernet-strength", "0.7",
                         "--out", tmp_path / "a", *common)
    assert code == 0, err
    image = Path(out.split()[0])
    params = parse_infotext(read_infotext(image)).params
    assert params["Hypernet"] == "inky"
    assert params["Hypernet hash"] == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert params["Hypernet strength"] == "0.7"
    request = request_from_infotext(read_infotext(image))
    assert (request.hypernetwork, request.hypernetwork_strength) == ("inky", 0.7)

    code, out, err = run(capsys, "generate", "--from", image, "--models-dir", models, "--model", tiny_sd1_file,
                         "--out", tmp_path / "b", "--quiet")
    assert code == 0, err
    again = Path(out.split()[0])
    assert np.array_equal(pixels(again), pixels(image))
    assert read_infotext(again) == read_infotext(image)

    code, out, err = run(capsys, "generate", "a cat", "--hypernet", "inky", "--hypernet-strength", "0",
                         "--out", tmp_path / "c", *common)
    assert code == 0, err
    code, out_plain, err = run(capsys, "generate", "a cat", "--out", tmp_path / "d", *common)
    assert np.array_equal(pixels(Path(out.split()[0])), pixels(Path(out_plain.split()[0])))

    write_hypernetwork(models / "hypernetworks" / "wide.pt", widths=(768,))
    code, out, err = run(capsys, "generate", "a cat", "--hypernet", "wide", "--out", tmp_path / "e", *common)
    assert code == 2
    assert "huabi: error: hypernetwork wide: its widths 768 match no attention layer" in err
