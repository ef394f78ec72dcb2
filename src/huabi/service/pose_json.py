"""OpenPose JSON files (sd-webui-controlnet's pose editor format) as control images: drawn as pose maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from huabi.errors import HuabiError

MAX_POSE_JSON_BYTES = 16 * 1024 * 1024


def load_pose_json_map(path: str | Path, what: str = "control image") -> np.ndarray:
    """The uint8 RGB pose map drawn from an OpenPose JSON file (one-line error for anything malformed)."""
    from huabi.models.annotators.openpose import pose_map_from_json

    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_POSE_JSON_BYTES + 1)
    except OSError as error:
        raise HuabiError(f"{what} {path}: cannot read it ({error.strerror or error})") from None
    if len(raw) > MAX_POSE_JSON_BYTES:
        raise HuabiError(f"{what} {path}: a pose JSON larger than {MAX_POSE_JSON_BYTES // (1024 * 1024)} MB")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise HuabiError(f"{what} {path}: not a pose JSON ({type(error).__name__})") from None
    try:
        return pose_map_from_json(data)
    except HuabiError as error:
        raise HuabiError(f"{what} {path}: {error}") from None
