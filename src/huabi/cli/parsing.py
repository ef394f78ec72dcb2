"""Argument parsing that behaves like a careful CLI (git, ripgrep).

- No abbreviations: ``--step 2`` is not silently taken as ``--steps`` (a later
  flag that starts the same way would change its meaning).
- A mistyped flag names the sub-command and suggests the nearest real flag
  (``huabi generate: error: unrecognized argument --stpes; did you mean --steps?``).
- Errors that name an internal field (``width_px: ...``) are shown in the
  user's words (``--size width: ...``).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence


class HuabiArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with abbreviations off; sub-parsers inherit the class."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        """One line, like git: the sub-command, the problem, and where to look (no usage dump)."""
        hint = "" if "--help" in message else f" (see {self.prog} --help)"
        self.exit(2, f"{self.prog}: error: {message}{hint}\n")

    def parse_args(self, args: Sequence[str] | None = None, namespace=None):  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.report_unknown(parsed, extras)
        return parsed

    def report_unknown(self, parsed: argparse.Namespace, extras: list[str]) -> None:
        """Exit with a usage error from the innermost sub-command, suggesting the nearest flag."""
        target = self._innermost_parser(parsed)
        flags = [option for action in target._actions for option in action.option_strings]
        first = extras[0]
        name = first.split("=", 1)[0]
        if name.startswith("-"):
            close = difflib.get_close_matches(name, flags, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            target.error(f"unrecognized argument {name}{hint}")
        target.error(f"unexpected argument {first!r} (see {target.prog} --help)")

    def _innermost_parser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self
        while True:
            subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            if not subparsers:
                return parser
            action = subparsers[0]
            chosen = getattr(parsed, action.dest, None) if action.dest is not argparse.SUPPRESS else None
            if chosen is None or chosen not in action.choices:
                return parser
            parser = action.choices[chosen]


# Internal field names (as core validation reports them) -> the words on the command line.
USER_WORDS = {
    "width_px": "--size width",
    "height_px": "--size height",
    "cfg_scale": "--cfg",
    "batch_size": "--batch-size",
    "batch_count": "--batch-count",
    "clip_skip": "--clip-skip",
    "steps": "--steps",
    "seed": "--seed",
    "variation_seed": "--variation-seed",
    "variation_strength": "--variation-strength",
    "seed_resize_from_px width": "--seed-resize-from width",
    "seed_resize_from_px height": "--seed-resize-from height",
    "seed_resize_from_px": "--seed-resize-from",
    "hires_scale": "--hires-scale",
    "hires_steps": "--hires-steps",
    "hires_denoise": "--hires-denoise",
    "hires_resize_px": "--hires-resize",
    "refiner_switch_at": "--refiner-switch-at",
    "hypernetwork_strength": "--hypernet-strength",
    "ip_weight": "--ip-weight",
    "ip_adapter": "--ip-adapter",
    "denoising_strength": "--denoise",
    "sampler": "--sampler",
    "schedule": "--schedule",
}


def in_user_words(message: str) -> str:
    """``"width_px: must be a multiple of 8"`` -> ``"--size width: must be a multiple of 8"``."""
    head, separator, rest = message.partition(":")
    if separator and head in USER_WORDS:
        return f"{USER_WORDS[head]}:{rest}"
    return message


def quiet_libraries() -> None:
    """``--quiet``: also silence the progress bars transformers and huggingface_hub draw
    while loading or writing weights ("Loading weights", "Writing model shards")."""
    import os

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules or _importable("transformers"):
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
