"""ControlNet annotators that are neural networks (depth, pose, lines, ...): weights from the user's files.

huabi downloads nothing, so each network preprocessor names the weight files it
needs with sd-webui-controlnet's file names (``body_pose_model.pth``,
``ControlNetHED.pth``, ...) and finds them in, first to last:

1. ``MODELS_DIR/annotators/`` (any sub-folder: A1111's ``downloads/<module>/`` layout works),
2. an A1111 install's ``extensions/sd-webui-controlnet/annotator/ckpts/`` and
   ``.../annotator/downloads/`` when ``MODELS_DIR`` is that install's ``models`` folder.

A missing file is one error line naming the file and where to put it.  Weights
are read with the same safe readers as every other model file (no pickled code
runs).  Each sub-module lists its annotators in ``ANNOTATORS``; the registry
imports them only when a network preprocessor is used (torch-heavy code stays
out of ``huabi --help``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from huabi.errors import HuabiError

ANNOTATOR_FOLDER = "annotators"
# Sub-modules that define ``ANNOTATORS`` (a tuple of Annotator); add yours here.
ANNOTATOR_MODULES: tuple[str, ...] = ("lines", "mlsd", "pidinet", "openpose", "depth", "normalbae", "manga_line", "teed", "zoe", "anime_face", "uniformer")


@dataclass(frozen=True)
class Annotator:
    """One network preprocessor.

    ``module``: its name in :data:`huabi.core.preprocess.MODULES`.
    ``weight_files``: the sd-webui-controlnet file names it reads (all required; ``"a|b"``: either).
    ``load(paths, device)``: the ready network(s) from ``{file name: path}``.
    ``detect(net, image, a, b)``: uint8 RGB ``[H, W, 3]`` (already resized to the
    processor resolution) -> float32 ``[H, W, 3]`` map in [0, 1].
    """

    module: str
    weight_files: tuple[str, ...]
    load: Callable[[dict[str, Path], torch.device], Any]
    detect: Callable[[Any, np.ndarray, float | None, float | None], np.ndarray]


def annotator_registry() -> dict[str, Annotator]:
    registry: dict[str, Annotator] = {}
    for name in ANNOTATOR_MODULES:
        for annotator in importlib.import_module(f"{__name__}.{name}").ANNOTATORS:
            registry[annotator.module] = annotator
    return registry


def annotator_search_dirs(models_dir: Path) -> list[Path]:
    """Where annotator weights are looked for, first match wins (see the module doc)."""
    models_dir = Path(models_dir).expanduser()
    extension = models_dir.parent / "extensions" / "sd-webui-controlnet" / "annotator"
    return [models_dir / ANNOTATOR_FOLDER, extension / "ckpts", extension / "downloads"]


def find_annotator_file(file_name: str, models_dir: Path, *, module: str) -> Path:
    """The path of ``file_name`` in the search folders, or a one-line error saying where to put it.

    ``file_name`` may name alternatives as ``"a.safetensors|a.pth"`` (the same weights
    released under two names): in each folder, the first listed name that is there wins.
    """
    names = file_name.split("|")
    for folder in annotator_search_dirs(models_dir):
        if not folder.is_dir():
            continue
        for name in names:
            direct = folder / name
            if direct.is_file():
                return direct
            for found in sorted(folder.rglob(name)):
                if found.is_file():
                    return found
    target = Path(models_dir).expanduser() / ANNOTATOR_FOLDER / names[0]
    raise HuabiError(
        f"preprocessor {module}: needs the annotator weights {' or '.join(names)} (sd-webui-controlnet's file); "
        f"put it at {target} (huabi downloads nothing)"
    )


def read_annotator_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .pth/.pt/.ckpt/.safetensors annotator file, read safely (no code runs)."""
    from huabi.models.formats import read_state_dict

    tensors, _ = read_state_dict(path)
    return tensors


def run_annotator(module: str, image: np.ndarray, *, threshold_a: float | None, threshold_b: float | None,
                  models_dir: Path, device: torch.device | str = "cpu") -> np.ndarray:
    """Find the weights, build the network and run it once (float32 [H, W, 3] map in [0, 1])."""
    annotator = annotator_registry().get(module)
    if annotator is None:
        raise HuabiError(f"preprocessor {module}: not a network annotator")
    paths = {name: find_annotator_file(name, models_dir, module=module) for name in annotator.weight_files}
    device = torch.device(device)
    net = annotator.load(paths, device)
    with torch.inference_mode():
        detected = annotator.detect(net, image, threshold_a, threshold_b)
    return np.ascontiguousarray(detected, dtype=np.float32)
