"""huabi eval: behaviour of the metrics on images, the cache, the CLI and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from huabi.cli.main import main
from huabi.errors import HuabiError
from huabi.eval.api import EvalOptions, Session, clip_score, fid, kid


def shapes_set(folder, count: int, seed: int, size_px: int = 64):
    """Coloured circles and squares on varied backgrounds: a small synthetic 'real' set."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        image = Image.new("RGB", (size_px, size_px), tuple(int(c) for c in rng.integers(150, 256, 3)))
        draw = ImageDraw.Draw(image)
        x, y = rng.integers(4, size_px // 2, 2)
        extent = int(rng.integers(size_px // 4, size_px // 2))
        fill = tuple(int(c) for c in rng.integers(0, 200, 3))
        (draw.ellipse if i % 2 else draw.rectangle)((int(x), int(y), int(x) + extent, int(y) + extent), fill=fill)
        image.save(folder / f"{i:04d}.png")
    return folder


def degraded_copy(source, target, *, blur: float = 0.0, noise: float = 0.0, seed: int = 0):
    target.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for path in sorted(source.iterdir()):
        image = Image.open(path).convert("RGB")
        if blur:
            image = image.filter(ImageFilter.GaussianBlur(blur))
        if noise:
            array = np.asarray(image, dtype=np.float32) + rng.normal(scale=noise, size=(image.height, image.width, 3))
            image = Image.fromarray(array.clip(0, 255).astype(np.uint8))
        image.save(target / path.name)
    return target


@pytest.fixture(scope="module")
def real_set(tmp_path_factory):
    return shapes_set(tmp_path_factory.mktemp("real") / "real", 60, seed=1)


@pytest.fixture(scope="module")
def options(tmp_path_factory):
    return EvalOptions(device="cpu", cache_dir=tmp_path_factory.mktemp("cache"), batch_size=16)


@pytest.fixture(scope="module")
def session(options):
    with Session(options) as s:
        yield s


def test_fid_of_a_set_with_itself_is_zero(real_set, options, session):
    assert abs(fid(real_set, real_set, options, session=session).value) < 1e-6


@pytest.mark.parametrize("kind,levels", [("blur", (0.8, 2.0, 5.0)), ("noise", (8.0, 24.0, 64.0))])
def test_fid_and_kid_grow_with_degradation(real_set, tmp_path, options, session, kind, levels):
    fids, kids = [], []
    for level in levels:
        degraded = degraded_copy(real_set, tmp_path / f"{kind}-{level}", **{kind: level})
        fids.append(fid(real_set, degraded, options, session=session).value)
        kids.append(kid(real_set, degraded, options, session=session).value)
    assert 0 < fids[0] < fids[1] < fids[2], fids
    assert kids[0] < kids[1] < kids[2], kids


def test_a_second_run_reads_features_from_the_cache(real_set, options, tmp_path):
    from huabi.eval.features import compute_features
    from huabi.eval.folders import list_images

    paths = list_images(real_set)
    with Session(options) as s:
        first = compute_features(paths, s.extractor, cache=s._cache)

        def refuse(batch):
            raise AssertionError("the extractor ran although every image is cached")

        s.extractor.embed = refuse
        np.testing.assert_array_equal(compute_features(paths, s.extractor, cache=s._cache), first)
        # an edited image is new content: it misses the cache
        edited = tmp_path / "edited.png"
        Image.open(paths[0]).transpose(Image.FLIP_LEFT_RIGHT).save(edited)
        with pytest.raises(AssertionError, match="the extractor ran"):
            compute_features([edited], s.extractor, cache=s._cache)


def test_mixed_sizes_and_modes_are_converted_to_rgb_and_resized_per_image(tmp_path, options, session):
    rgb_dir, mixed_dir = tmp_path / "rgb", tmp_path / "mixed"
    rgb_dir.mkdir(), mixed_dir.mkdir()
    rng = np.random.default_rng(3)
    modes = ["RGBA", "L", "P", "RGB", "CMYK"]
    for i, mode in enumerate(modes):
        size = (48 + 16 * i, 64 + 8 * i)
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
        image.save(mixed_dir / f"{i}.{'jpg' if mode == 'CMYK' else 'png'}")
        Image.open(mixed_dir / f"{i}.{'jpg' if mode == 'CMYK' else 'png'}").convert("RGB").save(rgb_dir / f"{i}.png")
    mixed = session.vectors(sorted(mixed_dir.iterdir()), "mixed")
    converted = session.vectors(sorted(rgb_dir.iterdir()), "rgb")
    np.testing.assert_allclose(mixed, converted, rtol=1e-5, atol=1e-6)


def test_small_sets_warn_with_the_numbers(real_set, options, session):
    report = fid(real_set, real_set, options, session=session)
    assert report.warnings[0].startswith("real: 60 images < 256 feature dimensions")
    assert "NOT comparable with published" in report.note


def test_cli_prints_the_result_last_and_writes_json(real_set, tmp_path, options, capsys):
    out = tmp_path / "fid.json"
    code = main(["eval", "fid", str(real_set), str(real_set), "--device", "cpu", "--cache-dir", str(options.cache_dir),
                 "--json", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0
    last = captured.out.strip().splitlines()[-1]
    assert last.startswith("FID: ") and "real 60 images, generated 60 images; huabi-mini CLIP towers" in last
    assert "warning: real: 60 images < 256 feature dimensions" in captured.err
    data = json.loads(out.read_text())
    assert data["metric"] == "FID" and abs(data["value"]) < 1e-6 and data["extractor"]["comparable_to_published"] is False


@pytest.mark.parametrize("make,args,message", [
    ("empty", ["eval", "fid", "{empty}", "{real}"], r"^huabi: error: .*empty: no images \(looked for "),
    ("none", ["eval", "kid", "{real}", "{missing}"], r"^huabi: error: .*missing: folder not found$"),
    ("checkpoint", ["eval", "fid", "{real}", "{real}", "--features", "{checkpoint}"],
     r"^huabi: error: huabi-mini\.safetensors: not an FID Inception-v3 or CLIP weights file \(a Stable Diffusion checkpoint; \d+ tensors"),
    ("lora", ["eval", "fid", "{real}", "{real}", "--features", "{lora}"],
     r"^huabi: error: lora\.safetensors: not an FID Inception-v3 or CLIP weights file \(looks like a LoRA/LyCORIS file"),
    ("noprompt", ["eval", "clip-score", "{real}"], r"^huabi: error: .*0000\.png.* \(CLIP score needs each image's prompt: pass --prompts FILE\)$"),
    ("badprompts", ["eval", "clip-score", "{real}", "--prompts", "{prompts}"], r"^huabi: error: prompts\.txt: 2 prompts for 60 images"),
    ("truncated", ["eval", "fid", "{real}", "{broken}"], r"^huabi: error: .*bad\.png: not a readable image"),
])
def test_bad_input_is_one_line_naming_the_problem(real_set, tmp_path, options, capsys, make, args, message):
    import re

    from safetensors.torch import save_file
    import torch

    from huabi.service.engine import builtin_model_path

    (tmp_path / "empty").mkdir()
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 8)}, tmp_path / "lora.safetensors")
    (tmp_path / "prompts.txt").write_text("a\nb\n")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    values = {"empty": tmp_path / "empty", "real": real_set, "missing": tmp_path / "missing", "checkpoint": builtin_model_path(),
              "lora": tmp_path / "lora.safetensors", "prompts": tmp_path / "prompts.txt", "broken": tmp_path / "broken"}
    argv = [a.format(**values) for a in args] + ["--device", "cpu", "--cache-dir", str(options.cache_dir), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err


def test_fewer_images_than_is_splits_is_an_error(real_set, tmp_path):
    from huabi.eval import metrics

    with pytest.raises(HuabiError, match=r"^Inception Score: 5 images cannot be cut into 10 splits$"):
        metrics.inception_score(np.zeros((5, 8)))


# ---------------------------------------------------------------- on huabi-mini's own images


@pytest.fixture(scope="module")
def mini_images(tmp_path_factory):
    """One huabi-mini image per prompt (8 steps), saved with infotext as huabi generate writes them."""
    from huabi.core.request import GenerationRequest
    from huabi.service.engine import Engine

    out = tmp_path_factory.mktemp("mini")
    engine = Engine(device="cpu", dtype="fp32")
    prompts = ["a red apple", "a rocket", "a cat face", "a yellow star", "a house", "a green tree", "a blue car", "a smiling sun"]
    for i, prompt in enumerate(prompts):
        engine.generate(GenerationRequest(prompt=prompt, steps=8, seed=100 + i), out_dir=out)
    return out, prompts


def test_clip_score_of_matching_prompts_beats_shuffled_ones(mini_images, options, session, tmp_path):
    folder, prompts = mini_images
    matched = clip_score(folder, options, session=session)  # prompts from each PNG's infotext
    from huabi.eval.folders import list_images, prompts_from_infotext

    in_order = prompts_from_infotext(list_images(folder))
    assert sorted(in_order) == sorted(prompts)
    shuffled = clip_score(folder, options, prompts=in_order[3:] + in_order[:3], session=session)
    assert matched.value > shuffled.value + 5, (matched.value, shuffled.value)
    # the same number through a prompts file
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(in_order) + "\n")
    assert clip_score(folder, options, prompts=prompts_file, session=session).value == pytest.approx(matched.value, rel=1e-6)


def test_inception_score_with_clip_zero_shot_classes(mini_images, options, session):
    from huabi.eval.api import inception_score

    folder, prompts = mini_images
    two_splits = EvalOptions(**{**options.__dict__, "is_splits": 2})
    with Session(two_splits, extractor=session.extractor) as s:
        report = inception_score(folder, two_splits, session=s)
    assert report.details["labels"] == len(prompts) and 1.0 <= report.value <= len(prompts)


def test_compare_writes_an_offline_html_and_json_report(tmp_path, options, capsys):
    out = tmp_path / "report"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\na rocket\n")
    code = main(["eval", "compare", "--vary", "Steps: 1, 4", "--prompts", str(prompts), "--seeds", "1-2", "--out", str(out),
                 "--device", "cpu", "--dtype", "fp32", "--cache-dir", str(options.cache_dir), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert lines[-1] == str(out / "report.html")
    assert lines[-3].startswith("Steps: 1 | CLIP score ") and lines[-2].startswith("Steps: 4 | CLIP score ")
    report = json.loads((out / "report.json").read_text())
    assert [row["variant"] for row in report["variants"]] == ["Steps: 1", "Steps: 4"] and all(row["images"] == 4 for row in report["variants"])
    assert len(report["grids"]) == 3 and len(report["images"]) == 8
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2  # one grid per variant, inline: opens offline
    assert "NOT comparable with published" in page and "<th>CLIP score</th>" in page
    assert "http://" not in page and "https://" not in page


def test_compare_rejects_a_single_value_before_loading_anything(tmp_path, capsys):
    assert main(["eval", "compare", "--vary", "Steps: 4", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == "huabi: error: compare: --vary needs at least two values to compare, got 'Steps: 4'"


def test_inception_features_by_name_from_the_models_folder(tmp_path, options, monkeypatch, capsys):
    from test_eval_equivalence import random_inception_file

    models = tmp_path / "models"
    (models / "eval").mkdir(parents=True)
    random_inception_file(models / "eval" / "my-inception.pth")
    monkeypatch.setenv("HUABI_MODELS_DIR", str(models))
    images = shapes_set(tmp_path / "few", 4, seed=5, size_px=40)
    out = tmp_path / "is.json"
    assert main(["eval", "is", str(images), "--features", "my-inception", "--splits", "2", "--device", "cpu",
                 "--cache-dir", str(options.cache_dir), "--json", str(out), "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("IS: ") and "FID Inception-v3 (my-inception.pth)" in lines[-1]
    assert "weights not recognised as the published ones" in lines[-2]
    data = json.loads(out.read_text())
    assert data["details"] == {"splits": 2, "classes": 1008} and data["value"] >= 1.0
    assert data["extractor"]["resize"] == "tf1" and data["extractor"]["comparable_to_published"] is False


def test_in_memory_images_give_the_same_vectors_as_their_files(real_set, session):
    from huabi.eval.folders import list_images

    paths = list_images(real_set)[:5]
    from_files = session.vectors(paths, "files")
    from_memory = session.vectors_from_images([Image.open(p) for p in paths])
    np.testing.assert_allclose(from_memory, from_files, rtol=1e-6, atol=1e-7)
