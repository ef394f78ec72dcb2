"""ControlNet preprocessors that need no downloaded weights (classic image filters).

Each module turns an RGB image (uint8 ``[H, W, 3]`` numpy array) into a
"detected map": float32 ``[H, W, 3]`` in [0, 1], the ControlNet's conditioning
image (sd-webui-controlnet's ``hint = map / 255``).  ``inpaint_only`` also uses
-1 for the pixels to repaint.  Modules that look at image structure first
resize the input so its short side is ``processor_res`` (sd-webui-controlnet's
"Processor Res"); the map is later fitted to the generation size by the resize mode.

=================  ==========================================================================
``none``           the image as it is: a depth/pose/normal/... map made elsewhere
``invert``         255 - image (a black-on-white drawing to the white-on-black maps models expect)
``canny``          ``cv2.Canny`` edges; Threshold A / B = low / high hysteresis thresholds (100 / 200)
``softedge_sobel`` soft edges from classic filters (instead of HED/PiDiNet networks): Gaussian blur
                   (sigma = Threshold A, 1.5), Sobel gradient magnitude of the grey image, scaled so
                   its 99th percentile is 1, then gamma 0.8 to lift faint lines
``scribble_xdog``  difference of Gaussians (sigma 0.5 and 5.0, the darkest channel), thresholded
                   at Threshold A (32) into white strokes on black, as sd-webui-controlnet's xdog
``tile_resample``  downsample by Threshold A (1.0, area filter): the tile model's blurry input
``blur_gaussian``  Gaussian blur with sigma Threshold A (9.0)
``color``          t2ia_color_grid: shrink to 1/64 (bicubic), enlarge back with nearest neighbour
``shuffle``        content shuffle: a smooth random flow field (seeded) warps the image
``inpaint_only``   the image with the pixels under the mask set to -1 (A1111's inpaint_only)
``lineart_standard`` dark strokes on a light page -> white lines on black: how much darker than its
                   blurred surroundings (sigma 6) each pixel is, median stroke scaled to 127
=================  ==========================================================================

Network preprocessors (weights from the user's files, run by ``huabi.models.annotators``):
``softedge_hed``/``softedge_hedsafe``/``scribble_hed`` (ControlNetHED.pth), ``lineart_realistic``
(sk_model.pth), ``lineart_coarse`` (sk_model2.pth), ``lineart_anime`` (netG.pth),
``lineart_anime_denoise`` (erika.pth: manga structural lines, screen tones dropped), ``mlsd``
(mlsd_large_512_fp32.pth; Threshold A / B = value / distance thresholds, 0.1 / 0.1),
``softedge_pidinet``/``softedge_pidisafe``/``scribble_pidinet``/``t2ia_sketch_pidi`` (table5_pidinet.pth);
``openpose`` body skeleton on black (body_pose_model.pth), ``openpose_hand`` + hands (hand_pose_model.pth),
``openpose_face`` + face points (facenet.pth), ``openpose_full`` both, ``openpose_faceonly`` face points only;
``depth_midas`` MiDaS DPT-Hybrid depth (dpt_hybrid-midas-501f0c75.pt, alias ``depth``), ``depth_anything`` /
``depth_anything_v2`` Depth Anything depth, ``normal_midas`` normal from MiDaS depth (Threshold A =
background threshold, 0.4), ``softedge_teed`` (7_model.pth; Threshold A = Safe Steps, 2: 0 keeps every grey level),
``normal_bae`` (scannet.pt; RGB normal map, x red, y green, z blue), ``depth_zoe`` ZoeDepth depth (ZoeD_M12_N.pt),
``seg_anime_face`` anime face parts in sd-webui-controlnet's colours (UNet.pth), ``seg_ufade20k`` ADE20K
classes in the ADE20K palette (upernet_global_small.pth, alias ``segmentation``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from huabi.errors import HuabiError

ColorGridCell = 64  # t2ia_color_grid's cell size in pixels
SHUFFLE_CELL_PX = 256  # scale of the shuffle flow field's features


@dataclass(frozen=True)
class ModuleSpec:
    name: str
    fn: Callable[..., np.ndarray] | None  # None: a network annotator (huabi.models.annotators runs it)
    uses_res: bool  # resize the input to processor_res (short side) first
    threshold_a: tuple[str, float, float, float] | None = None  # (meaning, default, min, max)
    threshold_b: tuple[str, float, float, float] | None = None
    needs_mask: bool = False

    @property
    def is_network(self) -> bool:
        """Needs annotator weights from the user's files (run by the service layer, not here)."""
        return self.fn is None

    def check_thresholds(self, a: float | None, b: float | None) -> tuple[float | None, float | None]:
        """The thresholds this module uses (defaults filled in); unused ones come back None."""
        result = []
        for label, value, spec in (("A", a, self.threshold_a), ("B", b, self.threshold_b)):
            if spec is None:
                result.append(None)
                continue
            meaning, default, low, high = spec
            if value is None:
                result.append(float(default))
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise HuabiError(f"control threshold {label} ({self.name} {meaning}): must be from {low:g} to {high:g}, got {value!r}")
            result.append(float(value))
        return result[0], result[1]


def _cv2():
    import cv2

    return cv2


def _to_unit(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255.0


def _grey3(single: np.ndarray) -> np.ndarray:
    return np.repeat(single[..., None], 3, axis=2)


def _none(image, **_):
    return _to_unit(image)


def _invert(image, **_):
    return _to_unit(255 - image)


def _canny(image, a, b, **_):
    edges = _cv2().Canny(image, float(a), float(b))
    return _grey3(edges.astype(np.float32) / 255.0)


def _softedge_sobel(image, a, **_):
    cv2 = _cv2()
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    blurred = cv2.GaussianBlur(grey, (0, 0), float(a))
    dx = cv2.Sobel(blurred, cv2.CV_32F, 1, 0, ksize=3)
    dy = cv2.Sobel(blurred, cv2.CV_32F, 0, 1, ksize=3)
    magnitude = np.sqrt(dx * dx + dy * dy)
    top = float(np.percentile(magnitude, 99))
    soft = np.clip(magnitude / top, 0.0, 1.0) ** 0.8 if top > 0 else np.zeros_like(magnitude)
    return _grey3(soft.astype(np.float32))


def _scribble_xdog(image, a, **_):
    cv2 = _cv2()
    pixels = image.astype(np.float32)
    fine = cv2.GaussianBlur(pixels, (0, 0), 0.5)
    coarse = cv2.GaussianBlur(pixels, (0, 0), 5.0)
    darkest = np.min(coarse - fine, axis=2)  # > 0 where a pixel is darker than its surroundings
    strength = 255.0 - np.clip(255.0 - darkest, 0, 255)  # clipped to the 0..255 of an 8-bit map
    strokes = (2.0 * strength > float(a)).astype(np.float32)
    return _grey3(strokes)


def _tile_resample(image, a, **_):
    cv2 = _cv2()
    rate = float(a)
    if rate <= 1.0:
        return _to_unit(image)
    h, w = image.shape[:2]
    small = cv2.resize(image, (max(1, round(w / rate)), max(1, round(h / rate))), interpolation=cv2.INTER_AREA)
    return _to_unit(small)


def _blur_gaussian(image, a, **_):
    return _to_unit(_cv2().GaussianBlur(image, (0, 0), float(a)))


def _color(image, **_):
    cv2 = _cv2()
    h, w = image.shape[:2]
    small = cv2.resize(image, (max(1, w // ColorGridCell), max(1, h // ColorGridCell)), interpolation=cv2.INTER_CUBIC)
    return _to_unit(cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST))


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Uniform noise on a coarse grid, bicubically enlarged and rescaled to [0, 1]."""
    cv2 = _cv2()
    coarse = rng.uniform(0.0, 1.0, size=(h // cell + 2, w // cell + 2)).astype(np.float32)
    fine = cv2.resize(coarse, (w + 2 * cell, h + 2 * cell), interpolation=cv2.INTER_CUBIC)[cell:cell + h, cell:cell + w]
    fine = fine - fine.min()
    top = fine.max()
    return fine / top if top > 0 else fine


def _shuffle(image, seed, **_):
    cv2 = _cv2()
    h, w = image.shape[:2]
    rng = np.random.default_rng(seed)
    map_x = _smooth_noise(rng, h, w, SHUFFLE_CELL_PX) * float(w - 1)
    map_y = _smooth_noise(rng, h, w, SHUFFLE_CELL_PX) * float(h - 1)
    return _to_unit(cv2.remap(image, map_x, map_y, interpolation=cv2.INTER_LINEAR))


def _lineart_standard(image, **_):
    from huabi.core.line_maps import lineart_standard

    return _grey3(lineart_standard(image).astype(np.float32) / 255.0)


def _inpaint_only(image, mask, **_):
    if mask is None:
        raise HuabiError("control module inpaint_only: needs a mask (--control-mask, or the edit's --mask)")
    if mask.shape[:2] != image.shape[:2]:
        mask = _cv2().resize(mask, (image.shape[1], image.shape[0]), interpolation=_cv2().INTER_NEAREST)
    result = _to_unit(image)
    result[mask > 127] = -1.0
    return result


MODULES: dict[str, ModuleSpec] = {
    spec.name: spec
    for spec in (
        ModuleSpec("none", _none, uses_res=False),
        ModuleSpec("invert", _invert, uses_res=False),
        ModuleSpec("canny", _canny, uses_res=True, threshold_a=("low threshold", 100, 1, 255),
                   threshold_b=("high threshold", 200, 1, 255)),
        ModuleSpec("softedge_sobel", _softedge_sobel, uses_res=True, threshold_a=("blur sigma", 1.5, 0.1, 16)),
        ModuleSpec("scribble_xdog", _scribble_xdog, uses_res=True, threshold_a=("XDoG threshold", 32, 1, 64)),
        ModuleSpec("tile_resample", _tile_resample, uses_res=False, threshold_a=("down sampling rate", 1.0, 1.0, 8.0)),
        ModuleSpec("blur_gaussian", _blur_gaussian, uses_res=True, threshold_a=("sigma", 9.0, 0.01, 64.0)),
        ModuleSpec("color", _color, uses_res=True),
        ModuleSpec("shuffle", _shuffle, uses_res=True),
        ModuleSpec("inpaint_only", _inpaint_only, uses_res=False, needs_mask=True),
        ModuleSpec("lineart_standard", _lineart_standard, uses_res=True),
        # Line and edge networks (huabi.models.annotators.lines / .mlsd / .pidinet).
        ModuleSpec("softedge_hed", None, uses_res=True),
        ModuleSpec("softedge_hedsafe", None, uses_res=True),
        ModuleSpec("scribble_hed", None, uses_res=True),
        ModuleSpec("lineart_realistic", None, uses_res=True),
        ModuleSpec("lineart_coarse", None, uses_res=True),
        ModuleSpec("lineart_anime", None, uses_res=True),
        ModuleSpec("lineart_anime_denoise", None, uses_res=True),  # huabi.models.annotators.manga_line
        ModuleSpec("mlsd", None, uses_res=True, threshold_a=("MLSD Value Threshold", 0.1, 0.01, 2.0),
                   threshold_b=("MLSD Distance Threshold", 0.1, 0.01, 20.0)),
        ModuleSpec("softedge_pidinet", None, uses_res=True),
        ModuleSpec("softedge_pidisafe", None, uses_res=True),
        ModuleSpec("scribble_pidinet", None, uses_res=True),
        ModuleSpec("t2ia_sketch_pidi", None, uses_res=True),
        # OpenPose (huabi.models.annotators.openpose): body, + hands, + face, face only, everything.
        ModuleSpec("openpose", None, uses_res=True),
        ModuleSpec("openpose_hand", None, uses_res=True),
        ModuleSpec("openpose_face", None, uses_res=True),
        ModuleSpec("openpose_faceonly", None, uses_res=True),
        ModuleSpec("openpose_full", None, uses_res=True),
        # network annotators (huabi.models.annotators.depth)
        ModuleSpec("depth_midas", None, uses_res=True),
        ModuleSpec("depth_anything", None, uses_res=True),
        ModuleSpec("depth_anything_v2", None, uses_res=True),
        ModuleSpec("normal_midas", None, uses_res=True, threshold_a=("Normal Background Threshold", 0.4, 0.0, 1.0)),
        ModuleSpec("softedge_teed", None, uses_res=True, threshold_a=("Safe Steps", 2, 0, 10)),  # annotators.teed
        # Surface normals (huabi.models.annotators.normalbae).
        ModuleSpec("normal_bae", None, uses_res=True),
        ModuleSpec("depth_zoe", None, uses_res=True),  # ZoeDepth metric depth (huabi.models.annotators.zoe)
        ModuleSpec("seg_anime_face", None, uses_res=True),  # anime face parts (huabi.models.annotators.anime_face)
        ModuleSpec("seg_ufade20k", None, uses_res=True),  # ADE20K segmentation (huabi.models.annotators.uniformer)
    )
}
# sd-webui-controlnet's display names and older names for the same modules.
MODULE_ALIASES = {
    "invert (from white bg & black line)": "invert",
    "t2ia_color_grid": "color",
    "softedge": "softedge_sobel",
    "scribble": "scribble_xdog",
    "tile": "tile_resample",
    "blur": "blur_gaussian",
    "inpaint": "inpaint_only",
    "content_shuffle": "shuffle",
    "lineart_standard (from white bg & black line)": "lineart_standard",
    "hed": "softedge_hed",
    "hed_safe": "softedge_hedsafe",
    "lineart": "lineart_realistic",
    "pidinet": "softedge_pidinet",
    "pidinet_safe": "softedge_pidisafe",
    "pidinet_scribble": "scribble_pidinet",
    "pidinet_sketch": "t2ia_sketch_pidi",
    "depth": "depth_midas",
    "normal_map": "normal_midas",
    "te_hed": "softedge_teed",
    "zoe_depth": "depth_zoe",
    "anime_face_segment": "seg_anime_face",
    "segmentation": "seg_ufade20k",
}


def module_spec(name: str) -> ModuleSpec:
    key = str(name).strip().lower() if isinstance(name, str) else name
    key = MODULE_ALIASES.get(key, key)
    spec = MODULES.get(key) if isinstance(key, str) else None
    if spec is None:
        raise HuabiError(
            f"control module: unknown preprocessor {name!r}; built in: {', '.join(MODULES)} "
            "(a map made elsewhere: use module none)"
        )
    return spec


def resize_short_side(image: np.ndarray, short_side_px: int) -> np.ndarray:
    """Resize so the shorter side is ``short_side_px`` (area filter shrinking, cubic enlarging)."""
    cv2 = _cv2()
    h, w = image.shape[:2]
    scale = short_side_px / min(h, w)
    if scale == 1.0:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)


def run_preprocessor(
    module: str,
    image: np.ndarray,
    *,
    processor_res: int = 512,
    threshold_a: float | None = None,
    threshold_b: float | None = None,
    mask: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Apply ``module`` to an RGB uint8 image; returns the float32 [H, W, 3] detected map.

    ``mask``: uint8 [H, W] (255 = repaint) for ``inpaint_only``; ``seed`` for ``shuffle``.
    """
    spec = module_spec(module)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise HuabiError(f"control image: expected an 8-bit RGB image, got {image.dtype} {image.shape}")
    a, b = spec.check_thresholds(threshold_a, threshold_b)
    if spec.uses_res:
        image = resize_short_side(image, processor_res)
    if spec.is_network:
        raise HuabiError(f"preprocessor {spec.name}: a network annotator; run it with huabi.service.control.detect_map")
    return np.ascontiguousarray(spec.fn(image, a=a, b=b, mask=mask, seed=seed), dtype=np.float32)


def map_to_uint8(detected: np.ndarray) -> np.ndarray:
    """A detected map as an 8-bit RGB image for previews (-1 shows as black)."""
    return (np.clip(detected, 0.0, 1.0) * 255.0).round().astype(np.uint8)
