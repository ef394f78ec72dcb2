"""A prompt written in A1111's syntax survives the infotext round trip: `--from` redoes the image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from huabi.cli.main import main
from huabi.core.infotext import parse_infotext
from huabi.service.pngio import read_infotext

SYNTAX_PROMPT = (
    "(red:1.3) apple, ((shiny)), [dull], [on a table:in a bowl:0.5], [oil|watercolor] BREAK "
    "still life, \\(detail\\) AND a pear :0.6"
)  # (LoRA tags need their files: their --from round trip is in test_lora_engine.py)
NEGATIVE = "(blurry:1.2), [lowres::3]"


def test_syntax_prompt_is_recorded_verbatim_and_from_reproduces_pixels(capsys, tiny_sd1_file, tmp_path):
    args = ["generate", SYNTAX_PROMPT, "-n", NEGATIVE, "--model", str(tiny_sd1_file), "--steps", "4",
            "--size", "64x64", "--seed", "21", "--sampler", "Euler a", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    first = Path(capsys.readouterr().out.strip())
    parsed = parse_infotext(read_infotext(first))
    assert parsed.prompt == SYNTAX_PROMPT
    assert parsed.negative_prompt == NEGATIVE

    assert main(["generate", "--from", str(first), "--model", str(tiny_sd1_file), "--out", str(tmp_path / "b"),
                 "--quiet"]) == 0
    again = Path(capsys.readouterr().out.strip())
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))

    # The syntax matters: the same words without it give a different image.
    plain = SYNTAX_PROMPT.replace("(red:1.3)", "red")
    assert main(["generate", plain, *args[2:], "--out", str(tmp_path / "c")]) == 0
    different = Path(capsys.readouterr().out.strip())
    assert not np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(different)))
