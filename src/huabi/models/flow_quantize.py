"""``huabi quantize`` for SD3/SD3.5/FLUX.1 transformers: any file layout huabi loads -> a GGUF file in
the community layout ComfyUI-GGUF (and diffusers' GGUF loader) read: the transformer alone, original
(BFL / Stability) tensor names without a prefix, ``general.architecture`` ``flux`` or ``sd3``, big
matrices block-quantized (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0) and 1-D / small tensors in F32.

The source's tensors are read one at a time (safetensors are memory-mapped), so an original-layout
file needs about the quantized output's size in memory (GGUFWriter holds it until it writes); a
diffusers folder is converted to the original names first and needs the whole transformer in memory.
Scaled fp8 files (``*_fp8_scaled``) are unscaled per tensor before quantizing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from huabi.errors import HuabiError
from huabi.models.flow_load import (
    TensorSource,
    component_weight_files,
    is_transformer_key,
    split_fp8_scales,
    write_transformer_gguf,
)
from huabi.models.transformer_families import TransformerFamily, detect_transformer, flux_to_original, sd3_to_original


class _UnscaledTensors(Mapping):
    """The transformer's tensors under ``prefix`` (removed), read on access; scaled fp8 weights come
    back as float32 products with their ``scale_weight``."""

    def __init__(self, source: TensorSource, prefix: str) -> None:
        full = {name[len(prefix):]: name for name in source
                if name.startswith(prefix) and is_transformer_key(name[len(prefix):])}
        kept, scales = split_fp8_scales({bare: torch.empty(0) for bare in full})
        self._source = source
        self._names = {bare: full[bare] for bare in kept}
        self._scale_names = {bare: full[bare[: -len("weight")] + "scale_weight"] for bare in scales}

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._source[self._names[name]]
        if name in self._scale_names:
            return tensor.float() * self._source[self._scale_names[name]].float()
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def read_flow_transformer(path: str | Path) -> tuple[Mapping[str, torch.Tensor], TransformerFamily]:
    """The transformer of an SD3/FLUX file or diffusers folder, in original names (lazily where it can)."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        raise HuabiError(f"quantize: {path.name} is already GGUF; quantize from the original checkpoint")
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        source = TensorSource(component_weight_files(folder))
    else:
        source = TensorSource([path])
    detected = detect_transformer(source.shapes(), source=path.name)
    tensors = _UnscaledTensors(source, detected.prefix)
    if detected.layout == "diffusers":
        plain = {name: tensors[name] for name in tensors}
        tensors = flux_to_original(plain) if detected.family.is_flux else sd3_to_original(plain)
    return tensors, detected.family


def quantize_flow_transformer(src: str | Path, out: str | Path, qtype: str) -> tuple[dict[str, int], TransformerFamily]:
    """Write ``src``'s transformer as a ComfyUI-GGUF file of ``qtype`` (atomically); (type counts, family)."""
    tensors, family = read_flow_transformer(src)
    counts = write_transformer_gguf(tensors, out, qtype, arch="flux" if family.is_flux else "sd3")
    return counts, family
