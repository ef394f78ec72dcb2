"""`huabi merge`: weighted sum, add difference, MBW block weights, A1111 recipe metadata, errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from huabi.cli.main import main
from huabi.core.request import GenerationRequest
from huabi.errors import HuabiError
from huabi.models.configs import REFERENCE_UNET_CONFIGS
from huabi.models.convert import unet_key_table
from huabi.models.family import ModelFamily, UNetVariant
from huabi.models.formats import read_safetensors
from huabi.models.merge import MergeSpec, block_layout, merge_checkpoints, merge_state_dicts, parse_block_weights
from huabi.service.engine import Engine
from tiny_models import write_tiny_single_file

UNET = "model.diffusion_model."


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    """Three tiny SD1 models with the same layout and different (seeded) weights."""
    root = tmp_path_factory.mktemp("merge_parents")
    return [write_tiny_single_file(root, ModelFamily.SD1, seed=seed, filename=f"{name}.safetensors")
            for seed, name in ((0, "a"), (1, "b"), (2, "c"))]


def _identical(left, right):
    assert set(left) == set(right)
    return all(torch.equal(left[k], right[k]) and left[k].dtype == right[k].dtype for k in left)


def test_m0_and_m1_reproduce_each_parent_bit_identically(parents, tmp_path):
    a, b, c = parents
    ta, tb = read_safetensors(a)[0], read_safetensors(b)[0]
    assert main(["merge", str(a), str(b), "--alpha", "0", "--out", str(tmp_path / "m0.safetensors")]) == 0
    assert main(["merge", str(a), str(b), "--alpha", "1", "--out", str(tmp_path / "m1.safetensors")]) == 0
    assert main(["merge", str(a), str(b), str(c), "--mode", "add-difference", "--alpha", "0",
                 "--out", str(tmp_path / "d0.safetensors")]) == 0
    assert _identical(read_safetensors(tmp_path / "m0.safetensors")[0], ta)
    assert _identical(read_safetensors(tmp_path / "m1.safetensors")[0], tb)
    assert _identical(read_safetensors(tmp_path / "d0.safetensors")[0], ta)


def test_formulas(parents):
    tensors = [read_safetensors(p)[0] for p in parents]
    ta, tb, tc = tensors
    merged, *_ = merge_state_dicts(tensors[:2], MergeSpec("weighted-sum", 0.3))
    diff, *_ = merge_state_dicts(tensors, MergeSpec("add-difference", 0.7))
    for key in ta:
        assert torch.equal(merged[key], ta[key] * (1 - 0.3) + tb[key] * 0.3), key
        assert torch.equal(diff[key], ta[key] + (tb[key] - tc[key]) * 0.7), key
    # A + (B - B) * M is A
    same, *_ = merge_state_dicts([ta, tb, tb], MergeSpec("add-difference", 0.5))
    assert all(torch.equal(same[k], ta[k]) for k in ta)


def test_block_weights_mbw(parents):
    ta, tb = (read_safetensors(p)[0] for p in parents[:2])
    layout = block_layout(ta)
    labels = layout.labels  # tiny SD1: IN00-IN03, M00, OUT00-OUT03
    assert labels == ["IN00", "IN01", "IN02", "IN03", "M00", "OUT00", "OUT01", "OUT02", "OUT03"]
    weights = [1.0 if label.startswith("IN") else 0.0 for label in labels]
    merged, base, blocks, _ = merge_state_dicts([ta, tb], MergeSpec("weighted-sum", 0.25, block_weights=tuple(weights)))
    assert base == 0.25 and list(blocks) == weights
    for key in ta:
        if key.startswith(UNET + "input_blocks."):
            assert torch.equal(merged[key], tb[key]), key
        elif key.startswith((UNET + "middle_block.", UNET + "output_blocks.")):
            assert torch.equal(merged[key], ta[key]), key
        else:  # time_embed, out, text encoder, VAE: BASE
            assert torch.equal(merged[key], ta[key] * 0.75 + tb[key] * 0.25), key
    # SuperMerger order: BASE first, then the blocks
    with_base, base, blocks, _ = merge_state_dicts([ta, tb], MergeSpec("weighted-sum", 0.9, block_weights=(0.0, *weights)))
    assert base == 0.0 and all(torch.equal(with_base[k], tb[k] if k.startswith(UNET + "input_blocks.") else ta[k]) for k in ta)
    with pytest.raises(HuabiError, match=r"^merge: --mbw needs 9 weights for this UNet \(IN00\.\.OUT03\), or 10 with BASE first; got 3$"):
        merge_state_dicts([ta, tb], MergeSpec("weighted-sum", 0.5, block_weights=(0.1, 0.2, 0.3)))


@pytest.mark.parametrize("name,count,last", [("sd1", 25, "OUT11"), ("sd2_v", 25, "OUT11"), ("sdxl", 19, "OUT08")])
def test_mbw_labels_of_full_size_unets(name, count, last):
    keys = {UNET + original + ".weight": torch.empty(0) for original, _ in unet_key_table(REFERENCE_UNET_CONFIGS[name])}
    labels = block_layout(keys).labels
    assert len(labels) == count and labels[0] == "IN00" and labels[-1] == last
    assert labels[len(labels) // 2] == "M00"


def test_recipe_metadata_and_output(parents, tmp_path, capsys):
    a, b = parents[:2]
    before = (_sha(a), _sha(b))
    out = tmp_path / "merged.safetensors"
    weights = ",".join(["0.5"] * 9)
    assert main(["merge", str(a), str(b), "--alpha", "0.4", "--mbw", weights, "--dtype", "fp16", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"{out}\tWeighted sum, M=0.4, per-block weights"
    tensors, metadata = read_safetensors(out)
    recipe = json.loads(metadata["sd_merge_recipe"])
    assert recipe["type"] == "webui" and recipe["interp_method"] == "Weighted sum" and recipe["multiplier"] == 0.4
    assert recipe["primary_model_hash"] == before[0] and recipe["secondary_model_hash"] == before[1]
    assert recipe["tertiary_model_hash"] is None and recipe["save_as_half"] is True
    assert recipe["block_weights"]["BASE"] == 0.4 and recipe["block_weights"]["OUT03"] == 0.5
    models = json.loads(metadata["sd_merge_models"])
    assert models[before[0]]["name"] == "a" and models[before[1]]["name"] == "b"
    assert {t.dtype for k, t in tensors.items() if t.is_floating_point()} == {torch.float16}
    assert (_sha(a), _sha(b)) == before  # inputs untouched
    # a merge of a merge carries the parents' recipe along (as A1111)
    again = tmp_path / "again.safetensors"
    merge_checkpoints([out, a], MergeSpec("weighted-sum", 0.5), again)
    models = json.loads(read_safetensors(again)[1]["sd_merge_models"])
    assert models[_sha(out)]["sd_merge_recipe"]["interp_method"] == "Weighted sum"


def test_merged_model_generates(parents, tmp_path):
    out = tmp_path / "half.safetensors"
    merge_checkpoints(parents[:2], MergeSpec("weighted-sum", 0.5), out)
    engine = Engine(device="cpu", dtype="fp32")
    request = GenerationRequest(prompt="a red apple", seed=1, steps=2, width_px=64, height_px=64, model=str(out))
    image = np.asarray(engine.generate(request)[0].image)
    parent = np.asarray(engine.generate(request.replace(model=str(parents[0])))[0].image)
    assert image.shape == parent.shape and not np.array_equal(image, parent)


def test_incompatible_models_are_refused(parents, tiny_sdxl_file, tmp_path, capsys):
    a, b = parents[:2]
    ta = read_safetensors(a)[0]
    reshaped = dict(ta)
    key = UNET + "input_blocks.1.1.proj_in.weight"
    reshaped[key] = torch.zeros(7, *ta[key].shape[1:])
    odd = tmp_path / "odd.safetensors"
    save_file(reshaped, str(odd))
    missing = dict(ta)
    del missing[UNET + "out.2.bias"]
    lacking = tmp_path / "lacking.safetensors"
    save_file(missing, str(lacking))
    out = tmp_path / "out.safetensors"
    cases = [
        ([a, tiny_sdxl_file], "merge: cannot merge a.safetensors (sd1) with tiny_sdxl_base_epsilon.safetensors (sdxl): different model families"),
        ([a, odd], f"merge: incompatible models: {key} has shape (32, 32, 1, 1) in a.safetensors but (7, 32, 1, 1) in odd.safetensors"),
        ([a, lacking], f"merge: incompatible models: {UNET}out.2.bias is in a.safetensors but not in lacking.safetensors"),
        ([a], "merge: weighted-sum takes 2 models (A B), got 1"),
    ]
    for models, message in cases:
        assert main(["merge", *map(str, models), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == f"huabi: error: {message}\n", err
    assert main(["merge", str(a), str(b), "--mbw", "0.1,x", "--out", str(out)]) == 2
    assert "merge: --mbw value 2 is not a number: 'x'" in capsys.readouterr().err
    assert main(["merge", str(a), str(b), "--out", str(a)]) == 2
    assert "is one of the inputs" in capsys.readouterr().err
    assert main(["merge", str(a), str(b), "--out", str(tmp_path / "m.ckpt")]) == 2
    assert "merge: output m.ckpt must end in .safetensors" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(HuabiError, match="unknown mode"):
        MergeSpec("sum", 0.5)
    assert parse_block_weights(" 1, 0.5 ,0") == (1.0, 0.5, 0.0)


def test_inpainting_merge_as_a1111(parents, tmp_path):
    """inpainting A + (B - C): latent channels of the first conv merged, A's mask/image channels kept."""
    inpaint = write_tiny_single_file(tmp_path, ModelFamily.SD1, UNetVariant.INPAINT, seed=5, filename="inpaint.safetensors")
    b, c = parents[1], parents[2]
    out = tmp_path / "custom-inpainting.safetensors"
    assert main(["merge", str(inpaint), str(b), str(c), "--mode", "add-difference", "--alpha", "1", "--out", str(out)]) == 0
    ta, tb, tc = (read_safetensors(p)[0] for p in (inpaint, b, c))
    merged, metadata = read_safetensors(out)
    conv_in = UNET + "input_blocks.0.0.weight"
    assert torch.equal(merged[conv_in][:, :4], ta[conv_in][:, :4] + (tb[conv_in] - tc[conv_in]))
    assert torch.equal(merged[conv_in][:, 4:], ta[conv_in][:, 4:])
    assert torch.equal(merged[UNET + "out.2.weight"], ta[UNET + "out.2.weight"] + (tb[UNET + "out.2.weight"] - tc[UNET + "out.2.weight"]))
    recipe = json.loads(metadata["sd_merge_recipe"])
    assert recipe["is_inpainting"] is True and recipe["is_instruct_pix2pix"] is False
    from huabi.models.inspect import detect_file

    assert detect_file(out).variant is UNetVariant.INPAINT
    # the other way round (ordinary A, inpainting B) is refused, naming the key
    with pytest.raises(HuabiError, match=r"^merge: incompatible models: model\.diffusion_model\.input_blocks\.0\.0\.weight has shape \(32, 4, 3, 3\)"):
        merge_checkpoints([b, inpaint], MergeSpec("weighted-sum", 0.5), tmp_path / "no.safetensors")


def test_mixed_formats_merge(parents, tmp_path):
    """A .safetensors (read tensor by tensor) with a .ckpt (read whole): M=1 is B exactly."""
    from huabi.models.convert_file import convert_checkpoint

    b_ckpt = convert_checkpoint(parents[1], tmp_path / "b.ckpt").path
    out = tmp_path / "m1.safetensors"
    merge_checkpoints([parents[0], b_ckpt], MergeSpec("weighted-sum", 1.0), out)
    assert _identical(read_safetensors(out)[0], read_safetensors(parents[1])[0])


def test_same_merge_gives_the_same_bytes(parents, tmp_path):
    # safetensors writes __metadata__ in its Rust hash map's order, which changes from map to map, so
    # the same merge used to give files of different SHA-256 (A1111's full-file hash). Five runs of the
    # CLI must give one digest, and the recipe must read back unchanged.
    a, b = parents[:2]
    digests = set()
    for run in range(5):
        out = tmp_path / f"merged-{run}.safetensors"
        assert main(["merge", str(a), str(b), "--alpha", "0.3", "--out", str(out)]) == 0
        digests.add(_sha(out))
    assert len(digests) == 1, digests
    _, recipe = merge_checkpoints([a, b], MergeSpec("weighted-sum", 0.3), tmp_path / "api.safetensors")
    assert _sha(tmp_path / "api.safetensors") in digests  # the Python API writes the same file
    tensors, metadata = read_safetensors(out)  # loads (header length and offsets intact)
    assert metadata == recipe and list(metadata) == sorted(metadata)
    assert _identical(tensors, read_safetensors(tmp_path / "api.safetensors")[0])
