"""Execution backends for the denoising UNet, the VAE and the text encoders.

``torch`` (the default) runs the loaded modules as they are. ``openvino`` converts them
at first use (:mod:`huabi.backends.openvino`, needs the ``[openvino]`` extra); ``compile``
runs the UNet through ``torch.compile`` with frozen weights (:mod:`huabi.backends.compiled`,
needs a C++ compiler). Nothing
heavy is imported here: only whether a backend can be used.
"""

from __future__ import annotations

import importlib.util

BACKENDS = ("torch", "openvino", "compile")


def available_backends() -> list[str]:
    """The backends that can run on this installation (checked without importing them)."""
    found = ["torch"]
    if importlib.util.find_spec("openvino") is not None:
        found.append("openvino")
    from huabi.backends.compiled import compiler_available

    if compiler_available():
        found.append("compile")
    return found
