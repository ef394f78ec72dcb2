"""Evaluation numbers in training reports: before/after CLIP score and FID through huabi.eval.

The report's numbers are checked against huabi.eval's public API run independently over the
images the trainer kept (``eval/NAME/before|after``) and the training folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from huabi.eval.api import EvalOptions, clip_score, fid
from huabi.train.user_config import UserTrainConfig
from huabi.train.user_train import UserTrainer


def dataset(root: Path, count: int) -> Path:
    group = root / "data" / "1_zq style"
    group.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        array = np.full((64, 64, 3), (40 + 15 * i, 180, 90), dtype=np.uint8)
        array[:, ::8] = 250
        array += rng.integers(0, 20, array.shape, dtype=np.uint8)
        Image.fromarray(array).save(group / f"img{i:02d}.png")
    return root / "data"


def prompts_file(path: Path, count: int) -> Path:
    lines = [f"zq style {'striped ' * (i % 3)}card --w 64 --h 64 --d {100 + i} --s 2 --l 5" for i in range(count)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def config_for(tmp_path: Path, model: Path, images: int, **changes) -> UserTrainConfig:
    values = dict(mode="lora", train_data_dir=str(dataset(tmp_path, images)), output=str(tmp_path / "out" / "zq.safetensors"),
                  model=str(model), resolution=64, min_bucket_reso=64, max_train_steps=2, network_dim=4, network_alpha=4.0,
                  learning_rate=1e-2, save_precision="float")
    values.update(changes)
    return UserTrainConfig(**values)


def test_report_has_before_after_clip_score_and_fid_equal_to_huabi_eval(tiny_sd1_file, tmp_path):
    config = config_for(tmp_path, tiny_sd1_file, images=10, eval_prompts=str(prompts_file(tmp_path / "eval.txt", 10)))
    logs: list[str] = []
    result = UserTrainer(config, log=logs.append, progress=False).run()

    report = json.loads(Path(config.output).with_suffix(".report.json").read_text(encoding="utf-8"))
    assert result.report == Path(config.output).with_suffix(".report.json")
    assert report["steps"] == 2 and report["eval"] == result.eval
    evaluation = report["eval"]
    assert evaluation["extractor"]["name"] == "huabi-mini CLIP towers"
    assert "compare" in evaluation["note"]  # huabi-mini numbers only compare runs
    texts = [line.split(" --")[0] for line in (tmp_path / "eval.txt").read_text().splitlines()]
    folder = Path(evaluation["images"])
    for phase in ("before", "after"):
        numbers = evaluation[phase]
        assert numbers["images"] == 10
        independent_clip = clip_score(folder / phase, EvalOptions(), prompts=texts)
        assert numbers["clip_score"] == pytest.approx(independent_clip.value, rel=1e-5)
        independent_fid = fid(Path(config.train_data_dir) / "1_zq style", folder / phase, EvalOptions())
        assert numbers["fid_vs_training_images"] == pytest.approx(independent_fid.value, rel=1e-5)
    # the LoRA changed the images, so at least one number moved
    assert evaluation["before"] != evaluation["after"]
    with Image.open(folder / "after" / "000.png") as image:
        assert "<lora:zq:1>" in image.info["parameters"] and "Seed: 100" in image.info["parameters"]
    with Image.open(folder / "before" / "000.png") as image:
        assert "<lora:" not in image.info["parameters"]

    with safe_open(str(result.output), "pt") as handle:
        assert json.loads(handle.metadata()["huabi_eval"]) == evaluation
    printed = [line for line in logs if line.startswith("eval (10 images): CLIP score ")]
    assert printed and "FID vs training images" in printed[0]


def test_sample_prompts_are_the_default_set_few_images_skip_fid_and_sample_points_are_measured(tiny_sd1_file, tmp_path):
    prompts = prompts_file(tmp_path / "samples.txt", 2)
    config = config_for(tmp_path, tiny_sd1_file, images=3, sample_every_n_steps=1, sample_prompts=str(prompts),
                        eval_at_samples=True)
    result = UserTrainer(config, log=lambda message: None, progress=False).run()
    evaluation = result.eval
    assert evaluation["prompts"] == str(prompts)
    assert evaluation["after"]["fid_vs_training_images"] is None
    assert "FID needs at least 10 images on each side (2 rendered, 3 training images)" == evaluation["after"]["fid_skipped"]
    assert [item["step"] for item in evaluation["at_samples"]] == [1, 2]
    sample_folder = Path(config.output).parent / "sample"
    step2 = tmp_path / "step2"  # the sample folder holds both steps' images; measure step 2's alone
    step2.mkdir()
    for index in range(2):
        (step2 / f"{index}.png").write_bytes((sample_folder / f"zq_000002_{index:02d}.png").read_bytes())
    expected = clip_score(step2, EvalOptions(), prompts=["zq style card", "zq style striped card"])
    assert evaluation["at_samples"][1]["clip_score"] == pytest.approx(expected.value, rel=1e-5)


def test_no_prompt_set_or_no_evaluate_writes_a_report_without_numbers(tiny_sd1_file, tmp_path):
    prompts = prompts_file(tmp_path / "eval.txt", 2)
    config = config_for(tmp_path, tiny_sd1_file, images=3, eval_prompts=str(prompts), evaluate=False)
    result = UserTrainer(config, log=lambda message: None, progress=False).run()
    assert result.eval is None
    report = json.loads(result.report.read_text(encoding="utf-8"))
    assert report["eval"] is None and report["steps"] == 2
    assert not (Path(config.output).parent / "eval").exists()
    with safe_open(str(result.output), "pt") as handle:
        assert "huabi_eval" not in handle.metadata()
