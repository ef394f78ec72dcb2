"""LoRA at generation time: tags and --lora, weights, exact restore, caching, infotext and
--from, LCM-LoRA with the LCM sampler, merge-lora, and the models list skipping adapter folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from huabi.cli.main import main
from huabi.core.request import GenerationRequest
from huabi.errors import HuabiError
from huabi.models.load import load_model
from huabi.models.lora import lora_short_hash
from huabi.service.engine import Engine
from huabi.service.pngio import read_infotext
from test_lora import all_tensors, kohya_lora_state_dict, write_lora

SIZE = "64x64"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_sd1_file):
    root = tmp_path_factory.mktemp("models")
    bundle = load_model(tiny_sd1_file, compute_hash=False)
    write_lora(root / "Lora" / "style.safetensors", kohya_lora_state_dict(bundle, seed=11, scale=0.3))
    write_lora(root / "LyCORIS" / "sub" / "lcm-lora-tiny.safetensors", kohya_lora_state_dict(bundle, seed=12, scale=0.3))
    return root


@pytest.fixture
def engine(models_dir):
    """A fresh engine per test: LoRA patches live in the engine's loaded model, so a shared one
    would let a test depend on what the previous test left applied (or restored)."""
    return Engine(device="cpu", dtype="fp32", models_dir=models_dir)


def request(model, prompt: str, **fields) -> GenerationRequest:
    values = dict(model=str(model), steps=3, seed=5, width_px=64, height_px=64, sampler="Euler")
    return GenerationRequest(prompt, **{**values, **fields})


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_tag_applies_restores_exactly_and_is_kept_while_repeated(engine, tiny_sd1_file, models_dir):
    bundle = engine.load(str(tiny_sd1_file))
    engine.generate(request(tiny_sd1_file, "a house"))  # whatever an earlier test left: base weights now
    base = {k: v.clone() for k, v in all_tensors(bundle).items()}
    [plain] = engine.generate(request(tiny_sd1_file, "a house"))

    [styled] = engine.generate(request(tiny_sd1_file, "a house <lora:style:0.8>"))
    assert np.abs(pixels(styled.image) - pixels(plain.image)).max() > 0
    expected_hash = lora_short_hash(models_dir / "Lora" / "style.safetensors")
    assert styled.infotext.startswith("a house <lora:style:0.8>\n")
    assert f'Lora hashes: "style: {expected_hash}"' in styled.infotext
    assert "Lora hashes" not in plain.infotext

    # Same set again: nothing is re-applied (A1111 keeps it), the image is the same.
    patched = {k: v.clone() for k, v in all_tensors(bundle).items()}
    active_before = engine._loras.activate(bundle, engine._loras._active.uses)
    [again] = engine.generate(request(tiny_sd1_file, "a house <lora:style:0.8>", seed=5))
    assert engine._loras._active is active_before
    assert np.array_equal(pixels(again.image), pixels(styled.image))
    assert all(torch.equal(v, patched[k]) for k, v in all_tensors(bundle).items())

    # Another weight is another set; no LoRA restores the base bit for bit.
    [stronger] = engine.generate(request(tiny_sd1_file, "a house <lora:style:1.2>"))
    assert np.abs(pixels(stronger.image) - pixels(styled.image)).max() > 0
    [after] = engine.generate(request(tiny_sd1_file, "a house"))
    for key, tensor in all_tensors(bundle).items():
        assert torch.equal(tensor, base[key]), key
    assert np.array_equal(pixels(after.image), pixels(plain.image))


def test_separate_text_encoder_and_unet_weights(engine, tiny_sd1_file):
    bundle = engine.load(str(tiny_sd1_file))
    engine.generate(request(tiny_sd1_file, "x"))
    base = {k: v.clone() for k, v in all_tensors(bundle).items()}

    def changed(prompt: str) -> set[str]:
        engine.generate(request(tiny_sd1_file, prompt))
        return {k.split(".")[0] for k, v in all_tensors(bundle).items() if not torch.equal(v, base[k])}

    assert changed("x <lora:style:0:1>") == {"unet"}  # A1111: te weight, then unet weight
    assert changed("x <lora:style:1:0>") == {"te0"}
    assert changed("x <lora:style:te=0.5:unet=0>") == {"te0"}
    assert changed("x <lyco:lcm-lora-tiny:1>") == {"unet", "te0"}  # found in LyCORIS/sub/
    assert changed("x <lora:style:0.5> <lora:lcm-lora-tiny:0.5>") == {"unet", "te0"}
    # two LoRAs add up: style 0.5 + lcm 0.5 differs from either alone
    both = {k: v.clone() for k, v in all_tensors(bundle).items()}
    engine.generate(request(tiny_sd1_file, "x <lora:style:0.5>"))
    assert any(not torch.equal(v, both[k]) for k, v in all_tensors(bundle).items())
    engine.generate(request(tiny_sd1_file, "x"))


def test_unknown_lora_name_lists_where_it_looked(engine, tiny_sd1_file, models_dir):
    with pytest.raises(HuabiError) as error:
        engine.generate(request(tiny_sd1_file, "x <lora:missing:1>"))
    message = str(error.value)
    assert message.startswith("LoRA 'missing': no such file (looked for missing{.safetensors,.pt,.ckpt,.bin} in ")
    assert str(models_dir / "Lora") in message and str(models_dir / "LyCORIS") in message


def test_cli_tag_flag_and_from_reproduce_the_image(tiny_sd1_file, models_dir, tmp_path, capsys):
    common = ["--model", str(tiny_sd1_file), "--models-dir", str(models_dir), "--steps", "3", "--size", SIZE,
              "--seed", "9", "--sampler", "Euler", "--quiet"]
    assert main(["generate", "a tower <lora:style:0.7>", *common, "--out", str(tmp_path / "tag")]) == 0
    assert main(["generate", "a tower", "--lora", "style:0.7", *common, "--out", str(tmp_path / "flag")]) == 0
    [tagged] = sorted((tmp_path / "tag").glob("*.png"))
    [flagged] = sorted((tmp_path / "flag").glob("*.png"))
    assert read_infotext(flagged).startswith("a tower <lora:style:0.7>\n")
    assert np.array_equal(pixels(Image.open(tagged)), pixels(Image.open(flagged)))

    assert main(["generate", "--from", str(tagged), "--models-dir", str(models_dir), "--model", str(tiny_sd1_file),
                 "--quiet", "--out", str(tmp_path / "again")]) == 0
    [again] = sorted((tmp_path / "again").glob("*.png"))
    assert read_infotext(again) == read_infotext(tagged)
    assert np.array_equal(pixels(Image.open(again)), pixels(Image.open(tagged)))

    capsys.readouterr()
    assert main(["generate", "x", "--lora", "nope", *common, "--out", str(tmp_path / "x")]) != 0
    assert "huabi: error: LoRA 'nope': no such file (looked for nope{" in capsys.readouterr().err


def test_lcm_lora_with_lcm_sampler_few_steps_low_cfg(engine, tiny_sd1_file):
    """The A1111 recipe: sampler LCM, 4-8 steps, CFG 1-2, the LCM-LoRA at weight 1."""
    lcm = dict(sampler="LCM", steps=4, cfg_scale=1.5, seed=3)
    [plain] = engine.generate(GenerationRequest("a cat", model=str(tiny_sd1_file), width_px=64, height_px=64, **lcm))
    [fast] = engine.generate(GenerationRequest("a cat <lora:lcm-lora-tiny:1>", model=str(tiny_sd1_file),
                                               width_px=64, height_px=64, **lcm))
    assert "Sampler: LCM" in fast.infotext and "Steps: 4" in fast.infotext and "lcm-lora-tiny: " in fast.infotext
    assert np.abs(pixels(fast.image) - pixels(plain.image)).max() > 0
    engine.generate(request(tiny_sd1_file, "x"))


def test_edit_applies_the_tag(engine, tiny_sd1_file, tmp_path):
    from huabi.core.request import EditOptions

    start = tmp_path / "start.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(start)
    options = EditOptions(str(start), denoising_strength=0.6)
    [plain] = engine.edit(request(tiny_sd1_file, "a house"), options)
    [styled] = engine.edit(request(tiny_sd1_file, "a house <lora:style:1>"), options)
    assert "Lora hashes: \"style: " in styled.infotext
    assert np.abs(pixels(styled.image) - pixels(plain.image)).max() > 0
    engine.generate(request(tiny_sd1_file, "x"))


def test_merge_lora_bakes_the_weights_and_records_the_recipe(engine, tiny_sd1_file, models_dir, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    assert main(["merge-lora", str(tiny_sd1_file), "style:0.8", "lcm-lora-tiny:0.5:0", "--out", str(out),
                 "--models-dir", str(models_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    merged = load_model(out, compute_hash=False)
    bundle = engine.load(str(tiny_sd1_file))
    engine.generate(request(tiny_sd1_file, "x <lora:style:0.8> <lora:lcm-lora-tiny:0.5:0>"))
    expected = all_tensors(bundle)
    for key, tensor in all_tensors(merged).items():
        assert torch.equal(tensor, expected[key]), key
    engine.generate(request(tiny_sd1_file, "x"))
    with safe_open(str(out), "pt") as handle:
        recipe = json.loads(handle.metadata()["sd_merge_recipe"])
        assert handle.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float32  # the base's dtype
    assert recipe["type"] == "huabi merge-lora"
    assert [(item["name"], item["te_weight"], item["unet_weight"]) for item in recipe["loras"]] == [
        ("style", 0.8, 0.8), ("lcm-lora-tiny", 0.5, 0.0)]

    half = tmp_path / "half.safetensors"
    assert main(["merge-lora", str(tiny_sd1_file), "style", "--out", str(half), "--dtype", "fp16",
                 "--models-dir", str(models_dir)]) == 0
    with safe_open(str(half), "pt") as handle:
        assert handle.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
    capsys.readouterr()
    before = tiny_sd1_file.read_bytes()
    assert main(["merge-lora", str(tiny_sd1_file), "style", "--out", str(tiny_sd1_file),
                 "--models-dir", str(models_dir)]) != 0
    assert "is one of the inputs" in capsys.readouterr().err
    assert tiny_sd1_file.read_bytes() == before


def test_models_list_skips_adapter_folders(models_dir, tiny_sd1_file, tmp_path):
    import shutil

    root = tmp_path / "models"
    for folder in ("Lora", "LyCORIS", "hypernetworks", "ControlNet", "VAE", "embeddings", "Stable-diffusion"):
        (root / folder).mkdir(parents=True)
        shutil.copy(models_dir / "Lora" / "style.safetensors", root / folder / f"{folder}.safetensors")
    names = [entry.name for entry in Engine(device="cpu", dtype="fp32", models_dir=root).iter_models()
             if entry.path.is_relative_to(root)]
    assert names == ["Stable-diffusion"]


def test_from_finds_a_renamed_lora_by_its_hash(tiny_sd1_file, models_dir, tmp_path):
    """As A1111 does when it reads an image: a tag whose name has no file falls back to ``Lora hashes``."""
    import shutil

    common = ["--model", str(tiny_sd1_file), "--steps", "2", "--size", SIZE, "--seed", "4", "--sampler", "Euler", "--quiet"]
    assert main(["generate", "a boat <lora:style:0.6>", *common, "--models-dir", str(models_dir),
                 "--out", str(tmp_path / "first")]) == 0
    [first] = sorted((tmp_path / "first").glob("*.png"))
    renamed_dir = tmp_path / "models"
    (renamed_dir / "Lora").mkdir(parents=True)
    shutil.copy(models_dir / "Lora" / "style.safetensors", renamed_dir / "Lora" / "style-v2.safetensors")
    assert main(["generate", "--from", str(first), *common, "--models-dir", str(renamed_dir),
                 "--out", str(tmp_path / "again")]) == 0
    [again] = sorted((tmp_path / "again").glob("*.png"))
    assert np.array_equal(pixels(Image.open(again)), pixels(Image.open(first)))
    assert read_infotext(again) == read_infotext(first)
    with pytest.raises(HuabiError, match="LoRA 'style': no such file"):
        Engine(device="cpu", dtype="fp32", models_dir=renamed_dir).generate(
            request(tiny_sd1_file, "a boat <lora:style:0.6>", extra=(("Lora hashes", "style: 000000000000"),)))
