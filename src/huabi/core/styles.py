"""Prompt styles in A1111's ``styles.csv`` format (pure text; the file is read by the caller).

A styles file is CSV with a header row naming at least the columns ``name``,
``prompt`` and ``negative_prompt`` (other columns, such as A1111's newer
``description``, are ignored). Applying a style to a prompt, as A1111 does:

- if the style text holds ``{prompt}``, the user's prompt is put in its place;
- otherwise the style text is appended with ", " (an empty user prompt gives
  just the style text; an empty style text leaves the prompt as it is).

The same rule applies to the negative prompt. Several styles apply in the
order given, each to the result of the one before.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from huabi.errors import HuabiError

PROMPT_PLACEHOLDER = "{prompt}"
REQUIRED_COLUMNS = ("name", "prompt", "negative_prompt")


@dataclass(frozen=True)
class PromptStyle:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def parse_styles_csv(text: str, source: str = "styles.csv") -> dict[str, PromptStyle]:
    """The styles in ``text`` by name, in file order. ``source`` names the file in errors.

    Rows with an empty name are skipped (A1111 writes such rows as separators);
    a name given twice is an error, since one of the two would silently be lost.
    """
    if text.startswith("\ufeff"):
        text = text[1:]  # a byte-order mark, as spreadsheet programs write
    reader = csv.DictReader(io.StringIO(text), strict=True)  # a stray quote must not swallow the rest
    columns = [name.strip() for name in (reader.fieldnames or [])]
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    if missing:
        raise HuabiError(
            f"styles: {source}: missing column {', '.join(missing)} "
            f"(the first row must name the columns {','.join(REQUIRED_COLUMNS)})"
        )
    reader.fieldnames = columns
    styles: dict[str, PromptStyle] = {}
    try:
        for row in reader:
            name = (row.get("name") or "").strip()
            if not name:
                continue
            if name in styles:
                raise HuabiError(f"styles: {source}: style {name!r} is defined twice (line {reader.line_num})")
            styles[name] = PromptStyle(name, (row.get("prompt") or "").strip(), (row.get("negative_prompt") or "").strip())
    except csv.Error as err:
        raise HuabiError(f"styles: {source}: line {reader.line_num + 1}: {err}") from err
    return styles


def apply_style_text(user_text: str, style_text: str) -> str:
    """One style's text applied to one prompt (the rule in the module notes)."""
    if PROMPT_PLACEHOLDER in style_text:
        return style_text.replace(PROMPT_PLACEHOLDER, user_text)
    if not style_text:
        return user_text
    if not user_text:
        return style_text
    return f"{user_text}, {style_text}"


def apply_styles(
    prompt: str,
    negative_prompt: str,
    styles: Mapping[str, PromptStyle],
    names: Sequence[str],
    source: str = "styles.csv",
) -> tuple[str, str]:
    """(prompt, negative prompt) with the named styles applied in order."""
    for name in names:
        style = styles.get(name)
        if style is None:
            available = ", ".join(styles) if styles else "none"
            raise HuabiError(f"style: unknown style {name!r} in {source}; available: {available}")
        prompt = apply_style_text(prompt, style.prompt)
        negative_prompt = apply_style_text(negative_prompt, style.negative_prompt)
    return prompt, negative_prompt
