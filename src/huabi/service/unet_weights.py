"""The loaded model's torch UNet weights, released while a compiled graph runs the UNet.

With ``--backend openvino`` the UNet runs as an OpenVINO graph that holds its own copy
of the weights; keeping the torch module's weights too made peak memory 1.76x
diffusers' at SD1.5 size (docs/cpu.md). After a conversion the engine therefore moves
the torch UNet's parameters to the meta device (shapes kept, no memory) and reads them
back from the model file only when torch needs them again:

- a LoRA set whose graph is not known yet (LoRAs are merged into the weights before
  conversion; the graph key is a checksum of the merged weights),
- a job that falls back to torch (ControlNet, hypernetworks, IP-Adapter, ``--tile``).

Reading back gives the base weights; the LoRA set that was active is then applied again,
so the module is exactly what it was before the release. A model that did not come
from a file (built in memory) is never released. The file must not change on disk
while loaded: a changed file is an error, not silently different weights.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path

import torch

from huabi.errors import HuabiError
from huabi.models.bundle import ModelBundle


def release_parameters(module: torch.nn.Module) -> None:
    """Replace every parameter of ``module`` by a meta tensor of the same shape and dtype."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            setattr(sub, name, torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad))


def has_released_parameters(module: torch.nn.Module) -> bool:
    return any(param.is_meta for param in module.parameters())


class ReleasableUNet:
    """One loaded bundle's UNet: :meth:`release` its weights, :meth:`ensure_resident` before torch uses them.

    ``patcher`` is the engine's LoRA patcher (:class:`huabi.service.adapters.LoraPatcher`);
    ``read_unet`` loads the model's UNet afresh from its file (base weights, the engine's
    dtype, device and memory format).
    """

    def __init__(self, bundle: ModelBundle, patcher, read_unet: Callable[[], torch.nn.Module]) -> None:
        if bundle.path is None:
            raise HuabiError("unet weights: a model built in memory has no file to read its weights back from")
        self._bundle = weakref.ref(bundle)
        self.path = Path(bundle.path)
        self.patcher = patcher
        self.read_unet = read_unet
        self._stamp: tuple[int, int] | None = None
        self.reloads = 0  # times the weights were read back from the file (for tests and logs)

    @property
    def bundle(self) -> ModelBundle | None:
        return self._bundle()

    @property
    def released(self) -> bool:
        bundle = self.bundle
        return bundle is not None and has_released_parameters(bundle.unet)

    def release(self) -> None:
        """Free the torch UNet's weights (and the LoRA patcher's backups of them)."""
        bundle = self.bundle
        if bundle is None or self.released:
            return
        self._stamp = self._file_stamp()
        release_parameters(bundle.unet)
        self.patcher.forget_released()
        from huabi.backends.openvino import return_freed_memory

        return_freed_memory()

    def ensure_resident(self) -> None:
        """Read the weights back from the file and re-apply the active LoRA set (no-op if resident)."""
        bundle = self.bundle
        if bundle is None or not self.released:
            return
        if self._file_stamp() != self._stamp:
            raise HuabiError(f"model: {self.path} changed on disk after it was loaded; its UNet weights were "
                             "released for the compiled backend and cannot be read back unchanged: restart, "
                             "or use --backend torch")
        uses = self.patcher.active.uses
        self.patcher.restore()  # text encoders back to base; the released UNet targets have no backups
        fresh = self.read_unet()
        bundle.unet.load_state_dict(fresh.state_dict(), strict=True, assign=True)
        del fresh
        if uses:
            self.patcher.activate(bundle, uses)
        self.reloads += 1

    def _file_stamp(self) -> tuple[int, int]:
        try:
            if self.path.is_dir():  # a diffusers folder: its UNet weights' files
                stats = [f.stat() for f in sorted(self.path.joinpath("unet").glob("*")) if f.is_file()]
                return (sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0))
            stat = self.path.stat()
        except OSError as err:
            raise HuabiError(f"model: {self.path}: cannot read it back ({err.strerror or err})") from None
        return (stat.st_size, stat.st_mtime_ns)


def releasable_unet(engine, bundle: ModelBundle) -> ReleasableUNet | None:
    """``bundle``'s UNet as ``engine`` may release it, or None when it must stay resident:
    not the engine's loaded model, built in memory, or GGUF weights kept packed."""
    loaded = engine._loaded
    if loaded is None or loaded[1] is not bundle or bundle.path is None or engine.gguf_on_the_fly:
        return None
    path, vae, _device, _dtype, base, _on_the_fly = loaded[0]

    def read_unet() -> torch.nn.Module:
        from huabi.models.load import load_model

        fresh = load_model(Path(path), vae=Path(vae) if vae else None, device=engine.device, dtype=engine.dtype,
                           base=Path(base) if base else None, compute_hash=False)
        unet = fresh.unet
        if engine.device.type == "cpu":  # as Engine.load leaves it
            unet.to(memory_format=torch.channels_last)
        return unet

    return ReleasableUNet(bundle, engine._loras, read_unet)
