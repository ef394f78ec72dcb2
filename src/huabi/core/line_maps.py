"""Pure-numpy pieces of the line and edge preprocessors (sd-webui-controlnet's behaviour).

sd-webui-controlnet resizes a control image so its short side is the processor
resolution, then pads right and bottom by repeating the edge pixels up to a
multiple of 64 (networks halve the size several times), runs the detector on
the padded image and crops the padding off again.  The network annotators in
``huabi.models.annotators`` and ``lineart_standard`` here do the same, so their
maps match A1111's pixel for pixel.
"""

from __future__ import annotations

import numpy as np

PAD_MULTIPLE_PX = 64


def pad_edge(image: np.ndarray, multiple: int = PAD_MULTIPLE_PX) -> np.ndarray:
    """``image`` ([H, W] or [H, W, C]) padded at the bottom/right, edge pixels repeated, to a multiple of ``multiple``."""
    h, w = image.shape[:2]
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h == 0 and pad_w == 0:
        return np.ascontiguousarray(image)
    widths = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (image.ndim - 2)
    return np.pad(image, widths, mode="edge")


def lineart_standard(image: np.ndarray) -> np.ndarray:
    """Dark strokes on a light background -> white lines on black (uint8 [H, W]).

    How much darker than its Gaussian-blurred surroundings (sigma 6) each pixel is,
    in its least-dark channel, scaled so the median of the clearly dark pixels
    (above 8) lands at 127 (the median never counts below 16, so a clean page
    stays black).  Computed on the edge-padded image, as sd-webui-controlnet does.
    """
    import cv2

    h, w = image.shape[:2]
    pixels = pad_edge(image).astype(np.float32)
    blurred = cv2.GaussianBlur(pixels, (0, 0), 6.0)
    darkness = np.min(blurred - pixels, axis=2).clip(0, 255)
    dark = darkness[darkness > 8]
    # np.median of an empty selection is NaN (and warns); max(16, NaN) keeps 16 as A1111's max() does.
    median = float(np.median(dark)) if dark.size else float("nan")
    darkness /= max(16.0, median)
    darkness *= 127
    return darkness.clip(0, 255).astype(np.uint8)[:h, :w]


def thin_edges(edges: np.ndarray, threshold: float, sigma: float) -> np.ndarray:
    """Non-maximum suppression of a soft edge map (uint8 [H, W]) -> 0/255 thin lines.

    Blur with ``sigma``; keep a pixel where it is the maximum of its 3-pixel line
    in any of the four directions (horizontal, vertical, two diagonals) and above
    ``threshold``.
    """
    import cv2

    blurred = cv2.GaussianBlur(edges.astype(np.float32), (0, 0), sigma)
    directions = (
        np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=np.uint8),
        np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=np.uint8),
        np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.uint8),
        np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.uint8),
    )
    kept = np.zeros_like(blurred)
    for kernel in directions:
        is_peak = cv2.dilate(blurred, kernel=kernel) == blurred
        kept[is_peak] = blurred[is_peak]
    return np.where(kept > threshold, 255, 0).astype(np.uint8)


def scribble_from_edges(edges: np.ndarray) -> np.ndarray:
    """A soft edge map (uint8 [H, W]) -> bold 0/255 scribble strokes (sd-webui-controlnet's scribble_hed/pidinet)."""
    import cv2

    thin = thin_edges(edges, 127, 3.0)
    blurred = cv2.GaussianBlur(thin, (0, 0), 3.0)
    return np.where(blurred > 4, 255, 0).astype(np.uint8)


def quantise_probability(edge: np.ndarray, *, safe: bool) -> np.ndarray:
    """An edge probability map in [0, 1] -> uint8, as A1111 stores it (truncated, not rounded).

    ``safe``: first snap it to the three levels 0, 0.5, 1 (the "safe" soft-edge
    variants: fewer faint details for the ControlNet to copy).
    """
    if safe:
        edge = (edge.astype(np.float32) * 3.0).astype(np.int32).astype(np.float32) / 2.0
    return (edge * 255.0).clip(0, 255).astype(np.uint8)
