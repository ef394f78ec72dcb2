"""Execution backends for the denoising UNet, the VAE and the text encoders.

``torch`` (the default) runs the loaded modules as they are. ``openvino`` converts them
at first use (:mod:`huabi.backends.openvino`, needs the ``[openvino]`` extra). Nothing
heavy is imported here: only whether a backend can be used.
"""

from __future__ import annotations

import importlib.util

BACKENDS = ("torch", "openvino")


def available_backends() -> list[str]:
    """The backends that can run on this installation (checked without importing them)."""
    found = ["torch"]
    if importlib.util.find_spec("openvino") is not None:
        found.append("openvino")
    return found
