"""``--backend compile``: the UNet through ``torch.compile`` (inductor) with frozen weights.

Measured on the development machine (AMD Zen 4, avx512_bf16, 2 threads; bench/bench_compile.py,
docs/cpu.md), on a heavily loaded machine, so noisy: the full-size SD1.5 UNet at 512x512, batch 2,
bf16, compiled with ``freezing`` (weights become constants: folded and prepacked for oneDNN)
ran 2.4-3.1x faster per call than eager bf16 in the calls measured at moderate load, and
slower in one call at peak load; the compile took 6-7 minutes. Without freezing (tiny model)
it gained nothing, as DESIGN.md recorded earlier. Hence an explicit option, not the default.

Costs and rules:
- the compile is paid once per input shape (batch, latent size, token count) and per weight
  set: frozen weights are baked into the compiled code, so a LoRA change (weights patched in
  place) must recompile: :class:`CompiledUNets` keys its compiled module by the LoRA set and
  clears torch's compile caches when it changes;
- each compile is reported on the ``huabi`` logger with its seconds;
- features that patch the UNet's modules at run time (hypernetworks, IP-Adapter, ControlNet
  residuals, ``--tile``) run eagerly: the engine falls back before it gets here.
"""

from __future__ import annotations

import logging
import shutil
import time

import torch

log = logging.getLogger("huabi")

COMPILE_OPTIONS = {"freezing": True}


def compiler_available() -> bool:
    """inductor's CPU code generation needs a C++ compiler on PATH."""
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


class CompiledUNet(torch.nn.Module):
    """Stands in for a diffusers UNet: same call, run by the compiled graph; reports each compile."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.config = unet.config
        self._compiled = torch.compile(unet, dynamic=False, options=dict(COMPILE_OPTIONS))
        self.compile_seconds: dict[tuple, float] = {}  # input signature -> seconds of its first call

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def forward(self, sample, timestep, encoder_hidden_states=None, **kwargs):
        signature = (tuple(sample.shape), tuple(getattr(encoder_hidden_states, "shape", ())),
                     tuple(sorted(kwargs)))
        if signature in self.compile_seconds:
            return self._compiled(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)
        log.warning("huabi: note: torch.compile: compiling the UNet for input %s (once per shape and LoRA set; "
                    "minutes for a full-size model)", "x".join(map(str, sample.shape)))
        start = time.perf_counter()
        out = self._compiled(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)
        self.compile_seconds[signature] = time.perf_counter() - start
        log.warning("huabi: note: torch.compile: UNet compiled and run once in %.1f s", self.compile_seconds[signature])
        return out


class CompiledUNets:
    """The compiled UNet of the current (model, LoRA set); owned by the engine's backend choice."""

    def __init__(self) -> None:
        self._current: tuple[tuple, CompiledUNet] | None = None
        self.compiles = 0  # CompiledUNet objects made (a new model or LoRA set)

    def unet_for(self, unet: torch.nn.Module, key: tuple) -> CompiledUNet:
        if self._current is not None and self._current[0] == key and self._current[1].unet is unet:
            return self._current[1]
        if self._current is not None:
            # The old graph holds the old weights as constants; dynamo's caches would also
            # reuse it for the same module object after an in-place LoRA change.
            self._current = None
            torch._dynamo.reset()
        compiled = CompiledUNet(unet)
        self._current = (key, compiled)
        self.compiles += 1
        return compiled
