"""Textual inversion's template captions (kohya's --use-object-template / --use-style-template)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from huabi.errors import HuabiError
from huabi.train.user_config import UserTrainConfig
from huabi.train.user_train import OBJECT_TEMPLATES, STYLE_TEMPLATES, UserTrainer


def config_for(tmp_path: Path, model: Path, **changes) -> UserTrainConfig:
    group = tmp_path / "data" / "2_ignored caption"
    group.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (30 + 100 * i, 90, 200)).save(group / f"{i}.png")
    (group / "0.txt").write_text("a caption the templates replace", encoding="utf-8")
    values = dict(mode="textual-inversion", train_data_dir=str(tmp_path / "data"), output=str(tmp_path / "zqtok.safetensors"),
                  model=str(model), resolution=64, min_bucket_reso=64, max_train_steps=2, token_string="zqtok",
                  num_vectors_per_token=2, caption_extension=".txt")
    values.update(changes)
    return UserTrainConfig(**values)


@pytest.mark.parametrize(("flag", "templates"), [("use_object_template", OBJECT_TEMPLATES), ("use_style_template", STYLE_TEMPLATES)])
def test_templates_replace_captions_with_the_expanded_token(flag, templates, tiny_sd1_file, tmp_path):
    trainer = UserTrainer(config_for(tmp_path, tiny_sd1_file, **{flag: True}), log=lambda m: None, progress=False)
    trainer.started_at = 0
    trainer.setup()
    expected = {t.format("zqtok zqtok_1") for t in templates}
    captions = [trainer.caption_for(entry, torch.Generator().manual_seed(k)) for k in range(40) for entry in trainer.dataset.entries]
    assert set(captions) <= expected and len(set(captions)) > 5
    again = [trainer.caption_for(entry, torch.Generator().manual_seed(k)) for k in range(40) for entry in trainer.dataset.entries]
    assert again == captions  # drawn from the step's generator: resumable
    assert trainer.run().steps == 2


def test_template_flags_are_textual_inversion_only_and_exclusive(tmp_path):
    with pytest.raises(HuabiError, match="for textual-inversion only"):
        config_for(tmp_path, Path("m"), mode="lora", use_object_template=True).validate()
    with pytest.raises(HuabiError, match="exclude each other"):
        config_for(tmp_path, Path("m"), use_object_template=True, use_style_template=True).validate()
