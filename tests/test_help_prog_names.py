"""Every sub-command's --help names itself as the user typed it (``usage: huabi data build``, not
``usage: python -m huabi.data.build``), including the pass-through tools (data, train) and the
nested ones (eval fid, train lora, ...)."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from huabi.cli.main import build_parser, main
from huabi.train.user_config import MODES


def all_command_words() -> list[tuple[str, ...]]:
    words: list[tuple[str, ...]] = []
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        words.append((name,))
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                words.extend((name, inner) for inner in action.choices)
    # the pass-through tools parse their own arguments
    words += [("data", "build")] + [("train", mode) for mode in (*MODES, "mini", "mini-v2")]
    return words


def test_the_list_covers_the_pass_through_and_nested_commands():
    words = all_command_words()
    assert {("generate",), ("data", "build"), ("train", "lora"), ("train", "mini"), ("eval", "fid")} <= set(words)


@pytest.mark.parametrize("words", all_command_words(), ids=" ".join)
def test_help_shows_the_huabi_prog_name(words):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            code = main([*words, "--help"])
        except SystemExit as exit_:
            code = exit_.code
    assert code == 0
    first = out.getvalue().splitlines()[0]
    assert first.startswith(f"usage: huabi {' '.join(words)}"), first
