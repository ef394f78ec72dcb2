"""The text-faithfulness evaluation: its metrics on known inputs, and a whole run on a tiny trained model."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from huabi.errors import HuabiError
from huabi.eval.faithfulness import (
    FaithfulnessConfig,
    clip_score,
    composed_grid,
    evaluate,
    format_report,
    nearest,
    pick_items,
    retrieval_accuracy,
    retrieval_ranks,
    text_to_image_accuracy,
)


def test_retrieval_counts_a_hit_when_a_same_label_key_is_within_k():
    keys = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    key_labels = torch.tensor([0, 1, 2, 1])
    queries = torch.tensor([[0.1, 0.0], [9.0, 9.5], [0.0, 4.0]])
    neighbours = nearest(queries, keys, 2, metric="l2")
    assert neighbours.tolist() == [[0, 1], [3, 2], [0, 2]]
    # query 0 (label 0): nearest is key 0 -> top1; query 1 (label 2): key 2 second -> top2 only; query 2 (label 1): miss
    assert retrieval_accuracy(neighbours, [0, 2, 1], key_labels, (1, 2)) == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(2 / 3)}
    assert retrieval_ranks(neighbours, [0, 2, 1], key_labels) == [1, 2, None]


def test_text_to_image_ranks_each_prompt_against_all_images():
    text = torch.eye(3)
    image = torch.tensor([[1.0, 0, 0], [0, 0.5, 1.0], [0, 1.0, 0.5]])  # images 1 and 2 swapped, each second best
    assert text_to_image_accuracy(text, image, (1, 2)) == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(1.0)}
    assert clip_score(text, text) == pytest.approx(100.0)
    assert clip_score(text, -text) == 0.0  # negative cosines clip at 0, as torchmetrics


def test_composed_grid_has_a_row_per_prompt_and_a_column_per_seed():
    images = torch.linspace(-1, 1, 8).reshape(8, 1, 1, 1).expand(8, 3, 32, 32)
    grid = composed_grid(images, seeds_per_prompt=4)
    assert grid.size == (4 * 32, 2 * 32)
    for index in (1, 4, 7):  # image i sits in row i // 4, column i % 4
        row, col = divmod(index, 4)
        assert grid.getpixel((col * 32, row * 32)) == composed_grid(images[index : index + 1]).getpixel((0, 0))


def test_items_are_picked_once_per_name_and_seeded():
    names = ["apple", "apple", "cat", "dog", "cat", "sun"]
    picked = pick_items(names, 3, seed=1)
    assert picked == pick_items(names, 3, seed=1) and len({names[i] for i in picked}) == 3
    assert set(picked) <= {0, 2, 3, 5}
    with pytest.raises(HuabiError, match="^count 5 is more than the 4 distinct item names in the dataset$"):
        pick_items(names, 5, seed=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny recipe trained end to end on 8 captioned shapes: (data folder, model file, CLIP pair file)."""
    from huabi.train.recipe import RecipeRun, run_recipe, tiny_recipe

    root = tmp_path_factory.mktemp("eval")
    data = root / "data"
    data.mkdir()
    for name, rgb in {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 190, 40), "yellow": (230, 210, 20)}.items():
        for shape in ("circle", "square"):
            image = Image.new("RGB", (48, 48), "white")
            draw = ImageDraw.Draw(image)
            (draw.ellipse if shape == "circle" else draw.rectangle)((8, 8, 40, 40), fill=rgb)
            image.save(data / f"{name}_{shape}.png")
            (data / f"{name}_{shape}.txt").write_text(f"a {name} {shape}\n{name}, {shape}\n", encoding="utf-8")
    run = RecipeRun(data_dir=data, state_dir=root / "state", out_path=root / "mini.safetensors", clip_out_path=root / "mini-clip.safetensors", log=lambda m: None)
    run_recipe(run, tiny_recipe())
    return data, run.out_path, run.clip_out_path


def test_a_whole_evaluation_runs_on_a_tiny_trained_model(trained):
    from huabi.models.clip_pair import load_clip_pair
    from huabi.service.engine import Engine
    from huabi.train.data import default_tokenizer

    data, model_path, clip_path = trained
    engine = Engine(device="cpu", dtype="fp32")
    bundle = engine.load(str(model_path))
    with pytest.raises(HuabiError, match=r"^mini-clip\.safetensors: has no text tower; pass the checkpoint's text encoder$"):
        load_clip_pair(clip_path)
    clip = load_clip_pair(clip_path, text_encoder=bundle.text_encoders[0])
    config = FaithfulnessConfig(count=4, steps=2, ks=(1, 3))
    report = evaluate(engine, bundle, clip, default_tokenizer(), data, config, log=None)
    for label in ("prompted", "empty prompt (baseline)"):
        row = report[label]
        assert set(row["retrieval_thumbnail"]) == {"top1", "top3"}
        assert 0.0 <= row["retrieval_clip_image"]["top1"] <= row["retrieval_clip_image"]["top3"] <= 1.0
        assert 0.0 <= row["clip_score"] <= 100.0
    assert report["chance"]["top1"] == pytest.approx(1 / 8)  # one image per name among 8
    items = report["items"]  # one record per prompt, consistent with the prompted row's accuracy
    assert [item["seed"] for item in items] == [config.seed + i for i in range(4)]
    assert sum(item["thumbnail_rank"] == 1 for item in items) / 4 == pytest.approx(report["prompted"]["retrieval_thumbnail"]["top1"])
    assert all(item["thumbnail_nearest"] in {f"a {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("circle", "square")} for item in items)
    composed = report["composed"]
    assert composed["_images"].shape == (8 * 4, 3, 32, 32)
    distances = composed["nearest_real_thumbnail_distance"]
    assert distances["uniform noise"] > 0 and set(distances) == {"composed", "empty prompt", "uniform noise"}
    text = format_report({**report, "composed": {k: v for k, v in composed.items() if k != "_images"}})
    assert "| prompted |" in text and "composed prompts: CLIP score" in text


def test_clip_pair_file_without_config_is_refused(tmp_path):
    from safetensors.torch import save_file

    from huabi.models.clip_pair import load_clip_pair

    save_file({"logit_scale": torch.zeros(())}, str(tmp_path / "x.safetensors"))
    with pytest.raises(HuabiError, match=r"^x\.safetensors: not a huabi CLIP pair \(no 'huabi\.clip_config' in its metadata\)$"):
        load_clip_pair(tmp_path / "x.safetensors")


def _script(name: str):
    """A module of the repository's scripts/ folder, imported from its file."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_by_group_script_counts_ranks_per_emoji_group(tmp_path, capsys):
    import json

    script = _script("faithfulness_by_group")
    records = [("red apple", "Food & Drink"), ("pear", "Food & Drink"), ("dog face", "Animals & Nature")]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"captions": [name, "x"], "group": group}) + "\n" for name, group in records), encoding="utf-8")
    items = [{"prompt": "red apple", "thumbnail_rank": 1, "thumbnail_nearest": "red apple"},
             {"prompt": "pear", "thumbnail_rank": None, "thumbnail_nearest": "red apple"},
             {"prompt": "dog face", "thumbnail_rank": 4, "thumbnail_nearest": "cat face"}]
    (tmp_path / "report.json").write_text(json.dumps({"items": items}), encoding="utf-8")
    assert script.main([str(tmp_path / "report.json"), "--data", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| Food & Drink | 2 | 50.0% | 50.0% |" in out and "| Animals & Nature | 1 | 0.0% | 100.0% |" in out
    assert "1 of 3 prompts have no image of their name among the 10 nearest" in out and "'pear' (Food & Drink) -> nearest 'red apple'" in out
    assert script.main([str(tmp_path / "missing.json"), "--data", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: FileNotFoundError")


def test_the_text_crowding_script_finds_each_names_nearest_other_name(tmp_path, capsys):
    import json

    script = _script("text_name_crowding")
    features = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=-1)
    cosine, index = script.nearest_other(features)
    assert index.tolist() == [1, 0, 1] and cosine[0] == pytest.approx(float(features[0] @ features[1]))
    names = ["red apple", "green apple", "dog", "cat"]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"captions": [n, "x"]}) + "\n" for n in names), encoding="utf-8")
    items = [{"prompt": "red apple", "thumbnail_rank": 1}, {"prompt": "dog", "thumbnail_rank": None}]
    (tmp_path / "report.json").write_text(json.dumps({"items": items}), encoding="utf-8")
    assert script.main(["--data", str(tmp_path), "--report", str(tmp_path / "report.json"), "--prompt", "a cat"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("projected text: nearest other name's cosine, median") and "hits" in out[0] and "(1), misses" in out[0]
    assert out[1].startswith("state sequence:")
    assert out[2].startswith("'a cat' -> ") and out[2].count(",") == 3  # four names, all listed
    assert script.main(["--data", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: FileNotFoundError")
