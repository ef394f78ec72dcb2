"""Network preprocessors find sd-webui-controlnet's weight files in the user's folders (no download)."""

from pathlib import Path

import pytest

from huabi.errors import HuabiError
from huabi.models.annotators import annotator_search_dirs, find_annotator_file


def test_missing_weights_name_the_file_and_where_to_put_it(tmp_path):
    with pytest.raises(HuabiError) as caught:
        find_annotator_file("body_pose_model.pth", tmp_path / "models", module="openpose")
    message = str(caught.value)
    assert "\n" not in message
    assert "body_pose_model.pth" in message and "openpose" in message
    assert str(tmp_path / "models" / "annotators" / "body_pose_model.pth") in message


def test_huabi_folder_first_then_a1111_extension_layouts(tmp_path):
    models = tmp_path / "webui" / "models"
    extension = tmp_path / "webui" / "extensions" / "sd-webui-controlnet" / "annotator"
    downloads = extension / "downloads" / "openpose" / "body_pose_model.pth"
    downloads.parent.mkdir(parents=True)
    downloads.write_bytes(b"x")
    assert find_annotator_file("body_pose_model.pth", models, module="openpose") == downloads
    ckpts = extension / "ckpts" / "body_pose_model.pth"
    ckpts.parent.mkdir(parents=True)
    ckpts.write_bytes(b"x")
    assert find_annotator_file("body_pose_model.pth", models, module="openpose") == ckpts
    own = models / "annotators" / "pose" / "body_pose_model.pth"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"x")
    assert find_annotator_file("body_pose_model.pth", models, module="openpose") == own
    assert annotator_search_dirs(models)[0] == models / "annotators"


def test_a_folder_with_the_file_name_is_not_a_weight_file(tmp_path):
    (tmp_path / "annotators" / "netG.pth").mkdir(parents=True)
    with pytest.raises(HuabiError, match="netG.pth"):
        find_annotator_file("netG.pth", tmp_path, module="lineart_anime")
