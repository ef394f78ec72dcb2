"""Sequential offload for SD3/FLUX transformers on small CUDA cards (Forge's / diffusers' idea).

The transformer's blocks (FLUX: ``transformer_blocks`` + ``single_transformer_blocks``; SD3:
``transformer_blocks``) live in host memory; each is moved to the compute device just before it runs
and back right after, so the card holds the small parts (embedders, final layer), one block and the
activations. Everything else of the bundle (VAE, kept text encoders) sits on the compute device.
Packed GGUF and fp8 weights move as stored (the parametrizations dequantize on the device).

On CUDA host memory is pinned and copies are asynchronous on the current stream. On a CPU-only
machine the moves are no-ops, so only the logic (order, one block resident, same results) can be
tested here; the speed and memory on a real card are not measured.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a diffusers SD3/FLUX transformer, in run order."""
    blocks: list[torch.nn.Module] = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        blocks += list(getattr(transformer, name, ()))
    return blocks


class SequentialOffload:
    """Hooks that keep ``blocks`` on ``storage`` and bring each to ``compute`` only while it runs.

    ``resident`` is the set of block indices on the compute device now (at most one during a
    forward); ``moves`` counts block transfers in both directions (for tests and logs).
    """

    def __init__(self, transformer: torch.nn.Module, compute: torch.device | str,
                 storage: torch.device | str = "cpu") -> None:
        self.compute = torch.device(compute)
        self.storage = torch.device(storage)
        self.blocks = transformer_blocks(transformer)
        block_ids = {id(block) for block in self.blocks}
        # The small parts stay on the compute device for good.
        for module in transformer.children():
            if id(module) not in block_ids and not isinstance(module, torch.nn.ModuleList):
                module.to(self.compute)
        for name, parameter in transformer.named_parameters(recurse=False):
            parameter.data = parameter.data.to(self.compute)
        self.resident: set[int] = set()
        self.peak_resident = 0
        self.moves = 0
        self._handles: list = []
        for index, block in enumerate(self.blocks):
            self._to(block, self.storage, pin=self.storage.type == "cpu" and self.compute.type == "cuda")
            self._handles.append(block.register_forward_pre_hook(self._arrive(index)))
            self._handles.append(block.register_forward_hook(self._leave(index)))

    def _to(self, block: torch.nn.Module, device: torch.device, *, pin: bool = False) -> None:
        for tensor in _tensors(block):
            moved = tensor.data.to(device, non_blocking=device.type == "cuda")
            if pin and moved.device.type == "cpu" and not moved.is_pinned():
                moved = moved.pin_memory()
            tensor.data = moved

    def _arrive(self, index: int):
        def hook(block: torch.nn.Module, _args) -> None:
            self._to(block, self.compute)
            self.resident.add(index)
            self.peak_resident = max(self.peak_resident, len(self.resident))
            self.moves += 1
        return hook

    def _leave(self, index: int):
        def hook(block: torch.nn.Module, _args, _output) -> None:
            self._to(block, self.storage)
            self.resident.discard(index)
            self.moves += 1
        return hook

    def detach(self) -> None:
        """Remove the hooks and put every block on the compute device (enough memory again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for block in self.blocks:
            self._to(block, self.compute)


def _tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from (buffer for buffer in module.buffers() if buffer is not None)


def offload_fits(non_block_bytes: int, largest_block_bytes: int, activation_bytes: int, available: int) -> bool:
    """Whether sequential offload fits the card: the resident parts, one block and the activations."""
    return non_block_bytes + largest_block_bytes + activation_bytes <= available
