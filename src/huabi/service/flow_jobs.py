"""SD3/SD3.5 and FLUX.1 models behind the Engine: loading, the memory guard, the request mapping.

``Engine.load`` hands transformer-family files to :func:`load_flow_for`; ``Engine.prepare`` hands a
loaded ``FlowBundle`` to :func:`huabi.service.flow_plans.plan_flow`, whose plans run in the engine's
one batch loop like SD1/SDXL's; :func:`flow_request` maps a ``GenerationRequest`` to the pipeline's.

Request mapping (Forge's conventions, so its PNGs and huabi's read each other):

* ``Distilled CFG Scale`` (FLUX dev guidance, default 3.5) and ``Shift`` travel in
  ``GenerationRequest.extra`` (CLI ``--distilled-cfg`` / ``--shift``; ``--from`` keeps them).
* ``CFG scale``: SD3's CFG. For FLUX real CFG runs only with a negative prompt and a scale
  above 1; otherwise the image records ``CFG scale: 1`` (what ran), as Forge does for FLUX.
* ``Schedule type``: ``Automatic`` means ``Simple``. Samplers: Euler, Euler a, Heun, DPM++ 2M.
* Separately loaded files are recorded as Forge writes them: ``Module 1: ae``, ``Module 2: clip_l``...
  On ``--from`` they are found again by name in the models folder.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from pathlib import Path

import torch

from huabi.errors import HuabiError
from huabi.models.flow_load import FlowBundle, find_part, is_flow_model, load_flow_model
from huabi.models.transformer_families import TransformerFamily
from huabi.pipelines.flow import FLUX_DEFAULT_GUIDANCE, FlowRequest

FLUX_FILL_DEFAULT_GUIDANCE = 30.0

__all__ = ["FlowBundle", "is_flow_model", "load_flow_for", "flow_request", "estimate_flow_memory"]

_PART_NAMES = ("clip_l", "clip_g", "t5xxl")


def _recorded_modules(extra: Mapping[str, str]) -> dict[str, str]:
    """Forge's ``Module N: name`` entries, classified by name (ae/vae, clip_l, clip_g, t5xxl)."""
    found: dict[str, str] = {}
    for key, value in extra.items():
        if not key.startswith("Module "):
            continue
        lowered = value.lower()
        kind = "t5xxl" if "t5" in lowered else "clip_g" if "clip_g" in lowered else "clip_l" if "clip_l" in lowered else "vae"
        found[kind] = value
    return found


def _by_name(models_dir: Path, kind: str, name: str) -> Path | None:
    folders = ("vae", "VAE") if kind == "vae" else ("text_encoders", "clip", "text_encoder", "CLIP")
    for folder in folders:
        for suffix in (".safetensors", ".gguf"):
            candidate = models_dir / folder / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def load_flow_for(engine, path: Path, vae: Path | None, extra: Mapping[str, str] | None = None) -> FlowBundle:
    """Load (or reuse) an SD3/FLUX model for ``engine``: parts from the engine's flags, else the
    names a ``--from`` infotext recorded, else the models folder's usual files."""
    parts: dict[str, Path | None] = {name: engine.text_encoder_files.get(name) for name in _PART_NAMES}
    parts["vae"] = vae
    for kind, name in _recorded_modules(dict(extra or {})).items():
        if parts.get(kind) is None:
            parts[kind] = _by_name(engine.models_dir, kind, name)
    key = (str(path.resolve()), tuple(str(parts[k]) for k in (*_PART_NAMES, "vae")), engine.device, engine.dtype, engine.gguf_on_the_fly)
    cached = engine._flow_loaded
    if cached is not None and cached[0] == key:
        return cached[1]
    engine._flow_loaded = None
    engine._flow_lora = None  # merged into the model being dropped
    engine._loaded = None  # one model resident at a time
    gc.collect()
    check_flow_memory(engine, path, parts)
    from huabi.models.hashes import HashCache

    offload = getattr(engine, "flow_offload", False)
    bundle = load_flow_model(
        path, clip_l=parts["clip_l"], clip_g=parts["clip_g"], t5xxl=parts["t5xxl"], vae=parts["vae"],
        models_dir=engine.models_dir, device="cpu" if offload else engine.device, dtype=engine.dtype,
        gguf_on_the_fly=True, low_memory=engine.flow_low_memory or offload, hash_cache=HashCache(),
    )
    if offload:
        bundle = with_sequential_offload(bundle, engine.device)
    engine._flow_loaded = (key, bundle)
    return bundle


def with_sequential_offload(bundle: FlowBundle, device: torch.device) -> FlowBundle:
    """``bundle`` (loaded in host memory, text encoders per job) running on ``device`` with its
    transformer blocks brought over one at a time (:mod:`huabi.models.offload`); the VAE and, during
    encoding, the text encoders sit on ``device``."""
    import dataclasses

    from huabi.models.offload import SequentialOffload

    SequentialOffload(bundle.transformer, compute=device)
    bundle.vae.to(device)
    load = bundle.load_text_encoders

    def load_on_device():
        encoders = load()
        for field in dataclasses.fields(encoders):
            module = getattr(encoders, field.name)
            if isinstance(module, torch.nn.Module):
                module.to(device)
        return encoders

    return dataclasses.replace(bundle, load_text_encoders=load_on_device, text_encoders=None)


# --------------------------------------------------------------------------- memory guard


def _file_bytes_at(path: Path, dtype: torch.dtype) -> int:
    """Bytes a weight file takes once loaded: fp8 and GGUF-packed tensors stay as stored, others in ``dtype``."""
    element = torch.finfo(dtype).bits // 8
    if path.is_dir():
        return sum(_file_bytes_at(p, dtype) for p in path.rglob("*.safetensors"))
    if path.suffix.lower() == ".gguf":
        return path.stat().st_size
    if path.suffix.lower() != ".safetensors":
        return path.stat().st_size
    from huabi.models.formats import read_safetensors_header

    total = 0
    for name, entry in read_safetensors_header(path).items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in entry["shape"]:
            count *= int(dim)
        total += count * (1 if entry["dtype"].startswith("F8") else element)
    return total


def transformer_block_bytes(path: Path, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes outside the repeated blocks, bytes of the largest block) of a transformer file, from its
    header (safetensors) or tensor table (GGUF); a folder counts as one block (no offload estimate)."""
    import re

    pattern = re.compile(r"(?:^|\.)(double_blocks|single_blocks|joint_blocks|transformer_blocks|single_transformer_blocks)\.(\d+)\.")
    element = torch.finfo(dtype).bits // 8
    sizes: list[tuple[str, int]] = []
    if path.is_dir():
        total = _file_bytes_at(path, dtype)
        return 0, total
    if path.suffix.lower() == ".gguf":
        from huabi.models.gguf_io import gguf_reader

        sizes = [(t.name, int(t.n_bytes)) for t in gguf_reader(path).tensors]
    else:
        from huabi.models.formats import read_safetensors_header

        for name, entry in read_safetensors_header(path).items():
            if name == "__metadata__" or name.startswith(("text_encoders.", "first_stage_model.")):
                continue
            count = 1
            for dim in entry["shape"]:
                count *= int(dim)
            sizes.append((name, count * (1 if entry["dtype"].startswith("F8") else element)))
    blocks: dict[tuple[str, str], int] = {}
    non_block = 0
    for name, size in sizes:
        found = pattern.search(name)
        if found is None:
            non_block += size
        else:
            blocks[found.groups()] = blocks.get(found.groups(), 0) + size
    return non_block, max(blocks.values(), default=0)


def estimate_flow_memory(path: Path, parts: Mapping[str, Path | None], dtype: torch.dtype) -> tuple[int, int]:
    """(bytes with everything resident, bytes in low-memory mode: the larger of encoders and transformer)."""
    main = _file_bytes_at(path, dtype)
    others = sum(_file_bytes_at(p, dtype) for p in parts.values() if p is not None and p.exists())
    return main + others, max(main, others)


def check_flow_memory(engine, path: Path, parts: Mapping[str, Path | None]) -> None:
    """Refuse what cannot fit, saying what would; switch to low-memory mode when that is enough."""
    from huabi.service.devices import available_memory_bytes

    everything, low = estimate_flow_memory(path, parts, engine.dtype)
    available = available_memory_bytes(engine.device)
    headroom = 1.15  # activations, the VAE decode and allocator slack
    if everything * headroom <= available:
        return
    if low * headroom <= available:
        engine.flow_low_memory = True  # text encoders loaded per job and released before the transformer runs
        return
    if engine.device.type == "cuda":  # small cards: transformer blocks streamed from host memory one at a time
        non_block, largest_block = transformer_block_bytes(path, engine.dtype)
        separate_parts = everything - _file_bytes_at(path, engine.dtype)  # encoders + VAE, on the card in turn
        if max(non_block + largest_block, separate_parts) * headroom <= available:
            engine.flow_offload = True
            return
    gib = 2**30
    raise HuabiError(
        f"memory: {path.name} needs about {everything / gib:.1f} GiB with its text encoders in "
        f"{str(engine.dtype).removeprefix('torch.')} ({low / gib:.1f} GiB at best, encoders loaded one at a time) "
        f"but {engine.device} has {available / gib:.1f} GiB free; use a GGUF Q8_0/Q4_0 or fp8 transformer file, "
        f"t5xxl_fp8_e4m3fn for the T5 encoder, or --dtype bf16"
        + (" (sequential offload of the transformer's blocks would not fit either)" if engine.device.type == "cuda" else "")
    )


# --------------------------------------------------------------------------- jobs


def flow_request(request, bundle: FlowBundle, width_px: int, height_px: int) -> tuple[FlowRequest, dict[str, object], float]:
    """The pipeline's request from a ``GenerationRequest``, the infotext extras, and the CFG scale that ran."""
    extra = dict(request.extra)
    family = bundle.family
    unsupported = [name for name, used in (
        ("refiner", request.refiner), ("ControlNet", request.controlnets),
        ("hypernetwork", request.hypernetwork), ("IP-Adapter", request.ip_adapter), ("tiling", request.tile),
        ("variation seed", request.variation_strength > 0), ("seed resize", request.seed_resize_from_px),
    ) if used]
    if unsupported:
        raise HuabiError(f"{family.label}: {', '.join(unsupported)} not supported for this family yet")
    schedule = "Simple" if request.schedule == "Automatic" else request.schedule
    # FLUX.1 Fill is run at guidance 30 (BFL's and diffusers' FluxFillPipeline examples, ComfyUI's Fill workflow).
    default_guidance = FLUX_FILL_DEFAULT_GUIDANCE if family is TransformerFamily.FLUX_FILL else FLUX_DEFAULT_GUIDANCE
    distilled = float(extra.get("Distilled CFG Scale", default_guidance))
    shift = float(extra["Shift"]) if "Shift" in extra else None
    cfg = float(request.cfg_scale)
    if family.is_flux and not (request.negative_prompt.strip() and cfg > 1.0):
        cfg = 1.0  # FLUX is guidance-distilled: no real CFG unless asked for with a negative prompt
    from huabi.core.prompt_parser import extract_extra_networks

    prompt, tags = extract_extra_networks(request.prompt)
    unsupported = [tag for tag in tags if tag.kind.lower() not in ("lora", "lyco")]
    if unsupported:
        raise HuabiError(f"prompt: <{unsupported[0].kind}:...> tags are not supported for {family.label}")
    negative, _ = extract_extra_networks(request.negative_prompt)
    flow = FlowRequest(
        prompt=prompt, negative_prompt=negative, steps=request.steps, cfg_scale=cfg, sampler=request.sampler,
        schedule=schedule, width_px=width_px, height_px=height_px, distilled_guidance=distilled, shift=shift,
    )
    infotext: dict[str, object] = {}
    if family.is_flux and bundle.transformer.config.guidance_embeds:
        infotext["Distilled CFG Scale"] = distilled
    if shift is not None:
        infotext["Shift"] = shift
    for number, module in enumerate(bundle.modules, start=1):
        infotext[f"Module {number}"] = module
    return flow, infotext, cfg


def find_parts_for_listing(models_dir: Path) -> dict[str, Path | None]:
    """The parts the models folder would supply (for ``huabi models`` listings and messages)."""
    return {name: find_part(models_dir, name) for name in (*_PART_NAMES, "vae")}
