"""Sample images during training, and DreamBooth class images, through huabi's engine.

All image generation of user training goes through :func:`generate_with_engine`, the one
adapter to the service layer (the engine is being rebuilt; only this function changes).

A prompts file has one prompt per line with kohya's per-line flags: ``--n`` negative
prompt, ``--w``/``--h`` size, ``--d`` seed, ``--s`` steps, ``--l`` CFG scale
(``#`` starts a comment line). Images are saved as PNGs with their infotext.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from huabi.errors import HuabiError

_FLAG = re.compile(r"\s--([a-z])\s+")


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width_px: int | None = None
    height_px: int | None = None
    seed: int | None = None
    steps: int = 20
    cfg_scale: float = 7.0


def parse_prompt_line(line: str) -> SamplePrompt | None:
    """One prompts-file line -> SamplePrompt (None for blank and ``#`` lines)."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    parts = _FLAG.split(" " + text)
    prompt = parts[0].strip()
    values: dict = {}
    for flag, value in zip(parts[1::2], parts[2::2]):
        value = value.strip()
        try:
            if flag == "n":
                values["negative_prompt"] = value
            elif flag == "w":
                values["width_px"] = int(value)
            elif flag == "h":
                values["height_px"] = int(value)
            elif flag == "d":
                values["seed"] = int(value)
            elif flag == "s":
                values["steps"] = int(value)
            elif flag == "l":
                values["cfg_scale"] = float(value)
            # other kohya flags (--a, --ss...) are ignored, as unknown flags are in kohya
        except ValueError:
            raise HuabiError(f"sample prompt {text!r}: --{flag} needs a number, got {value!r}") from None
    if not prompt:
        raise HuabiError(f"sample prompt line {text!r} has no prompt")
    return SamplePrompt(prompt, **values)


def read_prompts_file(path: str | Path) -> list[SamplePrompt]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise HuabiError(f"sample prompts file {path} does not exist") from None
    prompts = [p for p in (parse_prompt_line(line) for line in lines) if p is not None]
    if not prompts:
        raise HuabiError(f"sample prompts file {path} has no prompts")
    return prompts


def generate_with_engine(
    model: str | Path,
    prompts: list[SamplePrompt],
    out_dir: Path,
    *,
    device: str = "cpu",
    models_dir: Path | None = None,
    embeddings_dir: Path | None = None,
    sampler: str = "Euler a",
    default_seed: int = 0,
    default_size_px: int | None = None,
) -> list[Path]:
    """Generate one PNG (with infotext) per prompt with today's engine; returns the paths.

    LoRA and embeddings are used by name in the prompt (``<lora:name:1>``, the TI token)
    and found in ``models_dir/Lora`` and ``embeddings_dir``.
    """
    from huabi.core.request import GenerationRequest
    from huabi.service.engine import Engine

    # torch, not auto: each sample is a one-off of a model that changes between samples, so an
    # OpenVINO conversion (~30 s and a new cached graph at SD1.5 size) would never pay
    engine = Engine(device=device, dtype="auto", backend="torch", models_dir=models_dir,
                    embeddings_dir=embeddings_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for index, item in enumerate(prompts):
        request = GenerationRequest(
            prompt=item.prompt, negative_prompt=item.negative_prompt, steps=item.steps, cfg_scale=item.cfg_scale,
            sampler=sampler, seed=item.seed if item.seed is not None else default_seed + index,
            width_px=item.width_px or default_size_px, height_px=item.height_px or default_size_px, model=str(model),
        )
        for image in engine.generate(request, out_dir=out_dir):
            if getattr(image, "path", None) is not None:
                paths.append(Path(image.path))
    return paths
