"""Seamless tiling: generate images whose left/right and top/bottom edges join up.

While the context manager is open, every ``torch.nn.Conv2d`` in the given
modules pads with ``"circular"`` instead of zeros, so each convolution sees
the opposite edge as its neighbour: the UNet denoises a latent that lives on a
torus, and the VAE decoder paints pixels that wrap the same way. This is the
mechanism behind A1111's "Tiling" option and Midjourney's ``--tile``.

Only the ``padding_mode`` attribute of each layer changes (weights are never
touched) and the previous value is put back on exit, also when generation
raises. The modules are the caller's: the engine runs one job at a time, so no
other generation sees the change.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def circular_padding(*modules: torch.nn.Module) -> Iterator[int]:
    """Make every padded Conv2d in ``modules`` pad circularly; yields how many layers changed."""
    changed: list[tuple[torch.nn.Conv2d, str]] = []
    seen: set[int] = set()
    try:
        for module in modules:
            for layer in module.modules():
                if not isinstance(layer, torch.nn.Conv2d) or id(layer) in seen:
                    continue
                seen.add(id(layer))
                if layer.padding == "valid" or (not isinstance(layer.padding, str) and not any(layer.padding)):
                    continue  # unpadded layers (1x1 convs): nothing to wrap
                changed.append((layer, layer.padding_mode))
                layer.padding_mode = "circular"
        yield len(changed)
    finally:
        for layer, mode in reversed(changed):
            layer.padding_mode = mode
