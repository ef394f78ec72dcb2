"""Run the huabi command line in-process, as tests call it."""

from __future__ import annotations

from huabi.cli.main import main


def run(capsys, *argv) -> tuple[int, str, str]:
    """``huabi ARGV...`` (paths and numbers allowed): exit code, stdout, stderr."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
