"""ControlNet units of a request -> a ready :class:`huabi.pipelines.control.ControlSet`.

Finds each unit's model (an explicit file/folder path, or a name -- file stem
or folder name, case-insensitive -- under the models folder's ``ControlNet/``),
loads it for the current base model, reads the control image (and mask) and runs
the unit's preprocessor.  Also the preview behind ``huabi preprocess``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from huabi.core.control import ControlUnit
from huabi.core.preprocess import map_to_uint8, module_spec, resize_short_side, run_preprocessor
from huabi.errors import HuabiError
from huabi.models.bundle import ModelBundle
from huabi.models.controlnet import CONTROLNET_SUFFIXES, legacy_model_hash, load_control_model
from huabi.core.family import ModelFamily
from huabi.pipelines.control import ControlSet, PreparedControl

CONTROLNET_FOLDER = "ControlNet"


def controlnet_candidates(models_dir: Path) -> list[Path]:
    """ControlNet files and diffusers folders (with a config.json) under ``models_dir/ControlNet``."""
    folder = Path(models_dir).expanduser() / CONTROLNET_FOLDER
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in CONTROLNET_SUFFIXES and not path.name.startswith("diffusion_pytorch_model"):
            found.append(path)
        elif path.is_dir() and (path / "config.json").is_file():
            found.append(path)
    return found


def resolve_controlnet(reference: str, models_dir: Path) -> Path:
    """A path as given, or the ControlNet called ``reference`` (stem/folder name, any case) in the models folder."""
    given = Path(reference).expanduser()
    if given.exists():
        return given
    # Infotext names look like "name [hash]"; the name finds the file.
    name = reference.rsplit(" [", 1)[0] if reference.endswith("]") else reference
    candidates = controlnet_candidates(models_dir)
    for path in candidates:
        if (path.stem if path.is_file() else path.name).lower() == name.strip().lower():
            return path
    listed = ", ".join(p.stem if p.is_file() else p.name for p in candidates[:8]) or "none"
    raise HuabiError(
        f"controlnet: no ControlNet {reference!r} (not a path; in {Path(models_dir).expanduser() / CONTROLNET_FOLDER}: {listed})"
    )


def _load_rgb(path: str, what: str) -> np.ndarray:
    from huabi.service.images import load_image

    if str(path).lower().endswith(".json"):  # an OpenPose JSON (A1111's pose editor): drawn as its pose map
        from huabi.service.pose_json import load_pose_json_map

        return load_pose_json_map(path, what)

    return np.asarray(load_image(path, what=what), dtype=np.uint8)


def _load_mask(path: str, width_px: int, height_px: int) -> np.ndarray:
    from huabi.service.images import load_mask

    return np.asarray(load_mask(path, width_px, height_px), dtype=np.uint8)


def detect_map(
    unit: ControlUnit,
    *,
    seed: int = 0,
    fallback_image: Image.Image | None = None,
    fallback_mask: Image.Image | None = None,
    index: int = 0,
    crop: tuple[tuple[int, int, int, int], tuple[int, int]] | None = None,
    models_dir: Path | None = None,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """The unit's detected map (float32 [H, W, 3]).

    Network preprocessors (depth, pose, ...) read their annotator weights from
    ``models_dir`` (default: the usual models folder) and run on ``device``.

    ``fallback_image`` / ``fallback_mask``: an edit's own image and mask, used by a
    unit without an image (sd-webui-controlnet uses the img2img input then).
    ``crop``: ``(box, size)``, a (left, top, right, bottom) box in an image of
    ``size`` (width, height); the control image and mask are cropped to the same
    box scaled to their own size before preprocessing ("Only masked" inpainting).
    """
    if unit.image is not None:
        image = _load_rgb(unit.image, f"control image {index}")
    elif fallback_image is not None:
        image = np.asarray(fallback_image.convert("RGB"), dtype=np.uint8)
    else:
        raise HuabiError(
            f"controlnet {index}: no control image; give --control-image (images are not stored in a PNG's infotext)"
        )
    mask = None
    if unit.mask is not None:
        mask = _load_mask(unit.mask, image.shape[1], image.shape[0])
    elif fallback_mask is not None:
        mask = np.asarray(fallback_mask.convert("L").resize((image.shape[1], image.shape[0])), dtype=np.uint8)
    if crop is not None:
        image, mask = _crop(image, crop), (None if mask is None else _crop(mask, crop))
    spec = module_spec(unit.module)
    if spec.is_network:
        from huabi.models.annotators import run_annotator

        a, b = spec.check_thresholds(unit.threshold_a, unit.threshold_b)
        if spec.uses_res:
            image = resize_short_side(image, unit.processor_res)
        if models_dir is None:
            from huabi.service.model_files import default_models_dir

            models_dir = default_models_dir()
        from huabi.service.devices import resolve_device

        return run_annotator(spec.name, image, threshold_a=a, threshold_b=b, models_dir=Path(models_dir),
                             device=resolve_device(str(device)))
    return run_preprocessor(unit.module, image, processor_res=unit.processor_res, threshold_a=unit.threshold_a,
                            threshold_b=unit.threshold_b, mask=mask, seed=seed)


def _crop(pixels: np.ndarray, crop: tuple[tuple[int, int, int, int], tuple[int, int]]) -> np.ndarray:
    (left, top, right, bottom), (width, height) = crop
    scale_x, scale_y = pixels.shape[1] / width, pixels.shape[0] / height
    box_left, box_top = int(round(left * scale_x)), int(round(top * scale_y))
    box_right = max(box_left + 1, int(round(right * scale_x)))
    box_bottom = max(box_top + 1, int(round(bottom * scale_y)))
    return np.ascontiguousarray(pixels[box_top:box_bottom, box_left:box_right])


def prepare_controls(
    bundle: ModelBundle,
    units: Sequence[ControlUnit],
    *,
    models_dir: Path,
    device: torch.device,
    seed: int = 0,
    fallback_image: Image.Image | None = None,
    fallback_mask: Image.Image | None = None,
    crop: tuple[tuple[int, int, int, int], tuple[int, int]] | None = None,
) -> ControlSet | None:
    """Load and preprocess every unit (None when there are none); errors name the unit.
    ``crop``: see :func:`detect_map`."""
    if not units:
        return None
    if bundle.family not in (ModelFamily.SD1, ModelFamily.SD2, ModelFamily.SDXL, ModelFamily.HUABI_MINI):
        raise HuabiError(f"controlnet: no ControlNets exist for {bundle.family.value} models")
    dtype = next(bundle.unet.parameters()).dtype
    loaded: dict[Path, torch.nn.Module] = {}  # one module per file, shared by units that name it twice
    prepared = []
    for index, unit in enumerate(units):
        path = resolve_controlnet(unit.model, models_dir)
        if path not in loaded:
            loaded[path] = load_control_model(path, base_family=bundle.family, unet_config=bundle.unet.config,
                                           device=device, dtype=dtype)
        detected = detect_map(unit, seed=seed, fallback_image=fallback_image, fallback_mask=fallback_mask, index=index,
                              crop=crop, models_dir=models_dir, device=device)
        label = f"{path.stem if path.is_file() else path.name} [{legacy_model_hash(path)}]"
        prepared.append(PreparedControl(unit, loaded[path], detected, label))
    return ControlSet(tuple(prepared), sdxl=bundle.family is ModelFamily.SDXL, vae_scale_factor=bundle.vae_scale_factor)


def preview_map(unit: ControlUnit, out: Path, *, seed: int = 0, overwrite: bool = False,
                models_dir: Path | None = None, device: torch.device | str = "cpu") -> Path:
    """Run the unit's preprocessor and write the map (atomically) in the format ``out``'s suffix names.

    An existing folder as ``out`` gets ``<image>-<module>.png`` inside it; an
    existing file is replaced only with ``overwrite`` (never the input image).
    """
    from huabi.service.outputs import check_output_file, image_format_for, save_image_file

    out = Path(out).expanduser()
    if out.is_dir():
        out = out / f"{Path(unit.image).stem}-{unit.module}.png"
    image_format_for(out)
    check_output_file(out, overwrite=overwrite)
    if os.path.lexists(out) and os.path.samefile(out, Path(unit.image).expanduser()):
        raise HuabiError(f"--out {out}: is the input image; choose another file")
    detected = detect_map(unit, seed=seed, models_dir=models_dir, device=device)
    return save_image_file(Image.fromarray(map_to_uint8(detected)), out, overwrite=overwrite)
