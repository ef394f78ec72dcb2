"""``python -m huabi.train``: argument errors are one-line messages, not tracebacks."""

from __future__ import annotations

import pytest

from huabi.train.__main__ import build_parser, main


@pytest.mark.parametrize("bad", ["unet", "unet=0", "dit=5", "clip=ten"])
def test_bad_steps_override_is_named(bad, capsys, tmp_path):
    assert main(["mini", "--state", str(tmp_path), "--data", str(tmp_path), "--steps", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --steps expects vae=N, clip=N or unet=N with N >= 1, got {bad!r}"


def test_missing_dataset_folder_is_named(capsys, tmp_path):
    assert main(["mini", "--state", str(tmp_path / "state"), "--data", str(tmp_path / "nowhere"), "--stage", "vae"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"error: dataset folder {tmp_path / 'nowhere'} does not exist")
    assert "[recipe] stopped: HuabiError: dataset folder" in (tmp_path / "state" / "train.log").read_text()


def test_parser_defaults_and_stage_choices():
    args = build_parser().parse_args(["mini"])
    assert args.stage == "all" and args.device == "cpu"
    assert str(args.state).endswith(".cache/huabi/train/huabi-mini")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["mini", "--stage", "dit"])
