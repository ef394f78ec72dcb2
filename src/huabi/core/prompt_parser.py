"""A1111 WebUI's prompt language, as pure functions on strings.

Shared prompts are written for A1111, so huabi reads them the way A1111 does
(its ``modules/prompt_parser.py`` and ``extra_networks.py``).  The stages, in
A1111's order:

1. :func:`extract_extra_networks` removes ``<kind:name:weights...>`` tags
   (``<lora:x:0.8>``, ``<lyco:...>``, ``<hypernet:...>``, any ``<word:...>``)
   and returns them as data; applying them is the model layer's job.
2. :func:`split_composable` cuts the positive prompt at the word ``AND`` into
   sub-prompts, each with an optional trailing ``:weight`` (composable
   diffusion).  Negative prompts are not split.
3. :func:`prompt_schedule` resolves prompt editing ``[from:to:when]``,
   ``[to:when]``, ``[from::when]`` and alternation ``[a|b|c]`` into the texts
   in force at each step.
4. :func:`parse_prompt_attention` turns one such text into ``(text, weight)``
   runs: ``(a)`` x1.1, ``[a]`` /1.1, ``(a:1.4)``, ``\\(`` escapes, and ``BREAK``
   as the run ``("BREAK", -1.0)``; the conditioning encodes those runs.

Malformed syntax never raises: as in A1111 it falls back to literal text.
Only extra-network tags with a weight that is not a number raise, because
that tag would be applied wrongly.  Where A1111 itself crashes (a weight such
as ``(a:1.2.3)``), huabi keeps the text literally instead.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from huabi.errors import HuabiError

PromptRun = tuple[str, float]

ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1
BREAK_RUN: PromptRun = ("BREAK", -1.0)

# ---------------------------------------------------------------- 1. extra networks

_EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")
_NUMBER_ITEM = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")


@dataclass(frozen=True)
class ExtraNetworkTag:
    """One ``<kind:name:...>`` tag.

    ``weights`` are the positional numbers after the name (LoRA: text-encoder
    weight then UNet weight; an empty tuple means the network's default);
    ``options`` are ``key=value`` items such as A1111's ``te=``, ``unet=``,
    ``dyn=``, kept as text.
    """

    kind: str
    name: str
    weights: tuple[float, ...] = ()
    options: tuple[tuple[str, str], ...] = ()


def extract_extra_networks(text: str) -> tuple[str, list[ExtraNetworkTag]]:
    """Remove every ``<kind:args>`` tag from ``text``; return the rest and the tags in order."""
    tags: list[ExtraNetworkTag] = []

    def take(match: re.Match[str]) -> str:
        kind, args = match.group(1), match.group(2)
        name, *items = args.split(":")
        if not name.strip():
            raise HuabiError(f"prompt: extra-network tag <{kind}:{args}> has no name")
        weights: list[float] = []
        options: list[tuple[str, str]] = []
        for item in items:
            if "=" in item:
                key, _, value = item.partition("=")
                options.append((key.strip(), value.strip()))
            elif _NUMBER_ITEM.fullmatch(item):
                weights.append(float(item))
            else:
                raise HuabiError(
                    f"prompt: extra-network tag <{kind}:{args}> has {item!r} where a number belongs"
                )
        tags.append(ExtraNetworkTag(kind, name, tuple(weights), tuple(options)))
        return ""

    return _EXTRA_NETWORK_TAG.sub(take, text), tags


# ---------------------------------------------------------------- 2. AND (composable diffusion)

_AND = re.compile(r"\bAND\b")
# A sub-prompt's optional trailing weight: "a cat :1.2".  The text keeps its leading
# whitespace and loses its trailing whitespace, as in A1111.
_SUBPROMPT_WEIGHT = re.compile(r"(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*", re.S)


def split_composable(prompt: str) -> list[PromptRun]:
    """``"a cat :1.2 AND a dog :0.8"`` -> ``[("a cat", 1.2), (" a dog", 0.8)]`` (A1111's
    ``get_multicond_prompt_list`` for one prompt).  A prompt without AND gives one
    sub-prompt of weight 1."""
    parts: list[PromptRun] = []
    for subprompt in _AND.split(prompt):
        match = _SUBPROMPT_WEIGHT.fullmatch(subprompt)
        assert match is not None  # the pattern matches every string
        text, weight = match.group(1), match.group(2)
        parts.append((text, 1.0 if weight is None else float(weight)))
    return parts


# ---------------------------------------------------------------- 3. prompt editing and alternation
#
# A1111 parses with a grammar in which, inside brackets, a prompt is a sequence of
#   plain text | "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
#   | "[" [prompt ":"] prompt ":" NUMBER "]"  (editing) | "[" prompt ("|" prompt)+ "]"  (alternation)
# and at top level stray brackets and colons are also allowed (as text).  A prompt that
# does not fit (a "|" outside alternation, a trailing lone backslash) is not scheduled at
# all.  Below is a recursive-descent reading of that grammar; a bracket construct is
# preferred to reading its brackets as stray text, as A1111 resolves that ambiguity.

_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+", re.S)
# ":" already consumed: optional whitespace, a number (lark's SIGNED_NUMBER), whitespace, "]".
_WHEN = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")
_MAX_NESTING = 200


@dataclass(frozen=True)
class _Edit:
    before: tuple | None  # None: "[to:when]"
    after: tuple
    when: str  # the number as written; "." makes it a fraction of the steps


@dataclass(frozen=True)
class _Alternation:
    options: tuple[tuple, ...]


class _Unparseable(Exception):
    pass


class _ScheduleGrammar:
    """Parse tree of one prompt: a tuple of str | _Edit | _Alternation nodes."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.item_memo: dict[int, tuple[tuple, int] | None] = {}
        self.prompt_memo: dict[int, tuple[tuple, int]] = {}

    def parse(self) -> tuple:
        nodes: list = []
        i, n = 0, len(self.text)
        while i < n:
            item = self._item(i, 0)
            if item is not None:
                nodes.extend(item[0])
                i = item[1]
            elif self.text[i] in "[]():":
                nodes.append(self.text[i])  # stray bracket or colon: text
                i += 1
            else:
                raise _Unparseable
        return tuple(nodes)

    def _prompt(self, i: int, depth: int) -> tuple[tuple, int]:
        if i in self.prompt_memo:
            return self.prompt_memo[i]
        nodes: list = []
        j = i
        while (item := self._item(j, depth)) is not None:
            nodes.extend(item[0])
            j = item[1]
        self.prompt_memo[i] = (tuple(nodes), j)
        return self.prompt_memo[i]

    def _item(self, i: int, depth: int) -> tuple[tuple, int] | None:
        if i in self.item_memo:
            return self.item_memo[i]
        if depth > _MAX_NESTING:
            raise _Unparseable
        result: tuple[tuple, int] | None = None
        text = self.text
        if i < len(text):
            char = text[i]
            if char == "(":
                result = self._round(i, depth + 1)
            elif char == "[":
                result = self._square(i, depth + 1)
            elif (plain := _PLAIN.match(text, i)) is not None:
                result = ((plain.group(0),), plain.end())
        self.item_memo[i] = result
        return result

    def _round(self, i: int, depth: int) -> tuple[tuple, int] | None:
        inner, j = self._prompt(i + 1, depth)
        if self._at(j, ")"):
            return (("(", *inner, ")"), j + 1)
        if self._at(j, ":"):
            weight, k = self._prompt(j + 1, depth)
            if self._at(k, ")"):
                return (("(", *inner, ":", *weight, ")"), k + 1)
        return None

    def _square(self, i: int, depth: int) -> tuple[tuple, int] | None:
        first, j = self._prompt(i + 1, depth)
        if self._at(j, "]"):
            return (("[", *first, "]"), j + 1)
        if self._at(j, ":"):
            when = _WHEN.match(self.text, j + 1)
            if when is not None:
                return ((_Edit(None, first, when.group(1)),), when.end())
            second, k = self._prompt(j + 1, depth)
            if self._at(k, ":") and (when := _WHEN.match(self.text, k + 1)) is not None:
                return ((_Edit(first, second, when.group(1)),), when.end())
            return None
        if self._at(j, "|"):
            options = [first]
            while self._at(j, "|"):
                option, j = self._prompt(j + 1, depth)
                options.append(option)
            if self._at(j, "]"):
                return ((_Alternation(tuple(options)),), j + 1)
        return None

    def _at(self, i: int, char: str) -> bool:
        return i < len(self.text) and self.text[i] == char


def _edit_step(when: str, steps: int, base_steps: int | None) -> int:
    """The last step (1-based) of an edit's first part; A1111's rounding (truncation)."""
    value = float(when)
    if base_steps is None:
        value = value * steps if "." in when else value
    else:  # hires pass: fractions count from 1.0, step numbers from the end of the first pass
        value = (value - 1.0) * steps if "." in when else value - base_steps
    if math.isnan(value) or value < 0:
        return -1
    return min(steps, int(min(value, steps)))


def _walk(nodes: tuple):
    for node in nodes:
        yield node
        if isinstance(node, _Edit):
            yield from _walk(node.before or ())
            yield from _walk(node.after)
        elif isinstance(node, _Alternation):
            for option in node.options:
                yield from _walk(option)


def _render(nodes: tuple, step: int, ends: dict[int, int]) -> str:
    parts: list[str] = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Edit):
            chosen = (node.before or ()) if step <= ends[id(node)] else node.after
            parts.append(_render(chosen, step, ends))
        else:
            parts.append(_render(node.options[(step - 1) % len(node.options)], step, ends))
    return "".join(parts)


def prompt_schedule(prompt: str, steps: int, *, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """The texts of ``prompt`` over ``steps`` steps: ``[(last_step, text), ...]``.

    A1111's ``get_learned_conditioning_prompt_schedules`` for one prompt: steps
    count from 1 and an entry holds up to and including its ``last_step``.
    ``when`` with a decimal point is a fraction of the steps (``0.25``), without
    one a step number (``5``); ``[a:b:5]`` is ``a`` for steps 1-5.  Alternation
    switches option every step.  With ``hires_steps`` (a second pass of that many
    steps after ``steps``), fractions count from 1.0 and step numbers from the end
    of the first pass.  A prompt that does not parse is one entry, unchanged.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise HuabiError(f"steps must be an integer >= 1, got {steps!r}")
    total = steps if hires_steps is None else hires_steps
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise HuabiError(f"hires_steps must be an integer >= 1, got {hires_steps!r}")
    try:
        tree = _ScheduleGrammar(prompt).parse()
    except _Unparseable:
        return [(total, prompt)]
    base = None if hires_steps is None else steps
    ends: dict[int, int] = {}
    boundaries = {total}
    for node in _walk(tree):
        if isinstance(node, _Edit):
            end = ends[id(node)] = _edit_step(node.when, total, base)
            if end >= 1:
                boundaries.add(end)
        elif isinstance(node, _Alternation):
            boundaries.update(range(1, total + 1))
    return [(step, _render(tree, step, ends)) for step in sorted(boundaries)]


def schedule_entry_index(last_steps: list[int] | tuple[int, ...], step: int) -> int:
    """Which schedule entry is in force at 0-based sampling ``step``.

    A1111 counts its denoiser calls from 0 and takes the first entry whose
    ``last_step`` is >= that count, so ``[a:b:5]`` is ``a`` for calls 0..5.
    Past the end the last entry stays (A1111 would fall back to the first,
    which never happens with its own step counts).
    """
    for index, last in enumerate(last_steps):
        if step <= last:
            return index
    return len(last_steps) - 1


# ---------------------------------------------------------------- 4. attention (weights) and BREAK

_ATTENTION_TOKEN = re.compile(
    r"""
      \\[()\[\]\\]               # escaped bracket or backslash: literal
    | \\                         # any other backslash: dropped
    | [(\[]                      # opening bracket
    | :\s*([+-]?[.\d]+)\s*\)     # ":1.3)" closes a round bracket with that weight
    | [)\]]                      # closing bracket
    | [^\\()\[\]:]+              # text
    | :                          # a colon that is only text
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def _as_weight(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "1.2.3", "." -- A1111 crashes here; huabi keeps the text
        return None


def parse_prompt_attention(text: str) -> list[PromptRun]:
    """Split ``text`` into ``(text, weight)`` runs, A1111's emphasis rules.

    ``(a)`` multiplies by 1.1, ``[a]`` divides by 1.1, ``(a:w)`` multiplies by
    ``w``; nesting multiplies, in the order the brackets close.  ``\\(``,
    ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are literal characters.  An unclosed
    bracket applies to the rest of the prompt; an unmatched closer is ignored.
    ``BREAK`` (a whole word, outside brackets) becomes ``("BREAK", -1.0)``.
    Neighbouring runs of equal weight merge; an empty text gives ``[("", 1.0)]``.
    """
    runs: list[list] = []  # [text, weight], mutable while brackets close
    open_round: list[int] = []  # index of the first run inside each open bracket
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    def add_text(part: str) -> None:
        for k, piece in enumerate(_BREAK.split(part)):
            if k:
                runs.append(list(BREAK_RUN))
            runs.append([piece, 1.0])

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight_text = match.group(0), match.group(1)
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(runs))
        elif token == "[":
            open_square.append(len(runs))
        elif weight_text is not None and open_round and (weight := _as_weight(weight_text)) is not None:
            scale_from(open_round.pop(), weight)
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND_BRACKET_MULTIPLIER)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            add_text(token)

    # Unclosed brackets reach to the end of the prompt.
    for start in open_round:
        scale_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_BRACKET_MULTIPLIER)

    if not runs:
        return [("", 1.0)]
    merged: list[list] = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(run_text, float(weight)) for run_text, weight in merged]


def is_break(run: PromptRun) -> bool:
    """A run that ends the current 75-token chunk (only an unweighted ``BREAK``)."""
    return run[0] == BREAK_RUN[0] and run[1] == BREAK_RUN[1]


__all__ = [
    "BREAK_RUN",
    "ExtraNetworkTag",
    "PromptRun",
    "extract_extra_networks",
    "is_break",
    "parse_prompt_attention",
    "prompt_schedule",
    "schedule_entry_index",
    "split_composable",
]
