"""Wildcards and dynamic prompts, with the ``dynamicprompts`` library.

Template syntax (dynamicprompts' defaults):

- ``{red|green|blue}``: one of the options; ``{2$$a|b|c}``: two of them,
  joined with ", "; options may nest.
- ``__colors__``: a line of ``colors.txt`` in the wildcards folder
  (``__animals/cats__`` for ``animals/cats.txt``); a missing file is an error
  naming it.

A1111's own prompt syntax passes through untouched: ``(word:1.2)``,
``[a:b:5]`` and the alternation ``[a|b]`` use round and square brackets,
which dynamicprompts leaves alone.

Two modes, as in A1111's dynamic-prompts extension:

- random (default): every image gets its own draw, seeded with that image's
  seed, so an image is reproducible from its infotext alone. A request whose
  template has choices becomes one single-image request per image.
- combinatorial: one request per combination (each with the request's own
  batch size and seed), at most ``MAX_COMBINATIONS``.

Each resolved request records ``Template: <original prompt>`` (and
``Negative Template``) in its infotext; the resolved text is the prompt.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from huabi.core.request import GenerationRequest
from huabi.errors import HuabiError

MAX_COMBINATIONS = 1000
TEMPLATE_KEY = "Template"
NEGATIVE_TEMPLATE_KEY = "Negative Template"


def default_wildcards_dir() -> Path:
    home = os.environ.get("HUABI_HOME")
    return (Path(home) if home else Path.home() / "huabi") / "wildcards"


def has_dynamic_syntax(text: str) -> bool:
    """True when ``text`` has variants or wildcards that dynamicprompts would change."""
    return "{" in text or "__" in text


def _manager(wildcards_dir: Path | None):
    from dynamicprompts.wildcards import WildcardManager

    class StrictWildcardManager(WildcardManager):
        """Turns dynamicprompts' "leave __name__ in the prompt and log a warning" into an error."""

        def get_values(self, wildcard: str):
            values = super().get_values(wildcard)
            if not values:
                where = str(wildcards_dir) if wildcards_dir is not None else "the wildcards folder"
                raise HuabiError(f"wildcards: no wildcard file for __{wildcard}__ in {where} (expected {wildcard}.txt)")
            return values

    folder = wildcards_dir if wildcards_dir is not None and wildcards_dir.is_dir() else None
    manager = StrictWildcardManager(folder)
    return manager


def _draw(generator, template: str, seeds: list[int]) -> list[str]:
    """One random resolution of ``template`` per seed; each depends only on its own seed."""
    if not has_dynamic_syntax(template):
        return [template] * len(seeds)
    return [_generate(generator, template, 1, seeds=[seed])[0] for seed in seeds]


def _generate(generator, template: str, count: int, **kwargs) -> list[str]:
    # dynamicprompts logs each missing wildcard as a warning; ours raises instead, so keep its log quiet.
    quiet = logging.getLogger("dynamicprompts")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return generator.generate(template, count, **kwargs)
    except HuabiError:
        raise
    except Exception as err:  # pyparsing and dynamicprompts raise their own types for a bad template
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise HuabiError(f"wildcards: cannot read the prompt template {template!r}: {message}") from err
    finally:
        quiet.setLevel(level)


def _with_templates(request: GenerationRequest, prompt: str, negative: str, seed: int, **changes) -> GenerationRequest:
    extra = [(k, v) for k, v in request.extra if k not in (TEMPLATE_KEY, NEGATIVE_TEMPLATE_KEY)]
    if prompt != request.prompt:
        extra.append((TEMPLATE_KEY, request.prompt))
    if negative != request.negative_prompt:
        extra.append((NEGATIVE_TEMPLATE_KEY, request.negative_prompt))
    return request.replace(prompt=prompt, negative_prompt=negative, seed=seed, extra=tuple(extra), **changes)


def expand_request(
    request: GenerationRequest,
    *,
    wildcards_dir: Path | None = None,
    combinatorial: bool = False,
) -> list[GenerationRequest]:
    """The requests that ``request``'s prompt template stands for (itself when it has no choices).

    ``request.seed`` must be concrete (random mode draws from it).
    """
    if not (has_dynamic_syntax(request.prompt) or has_dynamic_syntax(request.negative_prompt)):
        return [request]
    if request.seed == -1:
        raise HuabiError("seed: resolve -1 to a concrete seed before expanding wildcards")
    from dynamicprompts.generators import CombinatorialPromptGenerator, RandomPromptGenerator

    manager = _manager(wildcards_dir)
    seeds = [seed for batch in request.image_seeds() for seed in batch]
    random_gen = RandomPromptGenerator(manager, seed=request.seed)
    if combinatorial:
        prompts = _generate(CombinatorialPromptGenerator(manager), request.prompt, MAX_COMBINATIONS + 1)
        if len(prompts) > MAX_COMBINATIONS:
            raise HuabiError(
                f"wildcards: the prompt has more than {MAX_COMBINATIONS} combinations; "
                "narrow it or use random mode (without --combinatorial)"
            )
        [negative] = _draw(random_gen, request.negative_prompt, [request.seed])
        return [_with_templates(request, prompt, negative, request.seed) for prompt in prompts]
    prompts = _draw(random_gen, request.prompt, seeds)
    negatives = _draw(random_gen, request.negative_prompt, seeds)
    return [
        _with_templates(request, prompt, negative, seed, batch_size=1, batch_count=1)
        for prompt, negative, seed in zip(prompts, negatives, seeds)
    ]
