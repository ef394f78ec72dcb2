"""OpenVINO backend: the loaded torch UNet and VAE decoder converted at first use.

``openvino.convert_model`` traces the *loaded* modules (so LoRAs merged into the weights
are in the graph; no optimum, no hub). The converted graph has dynamic shapes and is
saved as OpenVINO IR under ``<huabi cache>/openvino/<key>/`` where the key is the
model's hash, a checksum of the weights as loaded (LoRA set included), the part and
the weight format (fp32 / int8); a changed model or LoRA set gives a new key. Each
call shape (batch, latent size, token count) is compiled once with static shapes
(faster on the CPU) and OpenVINO's own blob cache (``CACHE_DIR``, in the graph's folder)
makes the second run's compile near free. Beyond ``HUABI_OPENVINO_CACHE_GB`` (default 20)
the least recently used graph folders are deleted after a conversion.

Precision: ``INFERENCE_PRECISION_HINT`` is bf16 when the engine chose bf16 for this
CPU (see :mod:`huabi.service.device_choice`), else f32. Inputs and outputs stay fp32.
int8 (optional, needs NNCF): weight-only INT8 compression of the UNet's IR.

Text encoders stay in torch: they run once per prompt (well under 1% of an image's
time) and their hidden-state/clip-skip outputs would need one graph per skip.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from huabi.errors import HuabiError

UNET_INPUTS_SD = ("sample", "timestep", "context")
UNET_INPUTS_SDXL = ("sample", "timestep", "context", "text_embeds", "time_ids")


def return_freed_memory() -> None:
    """Hand memory freed after a conversion or compile back to the OS (glibc's ``malloc_trim``).

    Tracing, conversion and compilation allocate and free gigabytes in many mid-sized
    blocks; glibc keeps freed heap for reuse, so without this the process's resident set
    stayed ~1.7 GB higher on a mid-size SD1 model (bench/bench_openvino_memory.py). No-op
    where glibc is not the allocator."""
    import ctypes
    import gc
    import sys

    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def require_openvino():
    try:
        import openvino
    except ImportError as err:
        raise HuabiError("backend: openvino is not installed; pip install 'huabi[openvino]' "
                         "(or use --backend torch)") from err
    return openvino


def weights_checksum(module: torch.nn.Module) -> str:
    """A digest of every weight as it is now (LoRA-patched weights differ): per tensor its
    name, shape, float64 sum and sum of squares. ~0.5 s for an 860M-parameter UNet."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            values = tensor.detach().to(torch.float64)
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}{float(values.sum()):.10e}"
                          f"{float((values * values).sum()):.10e}".encode())
    return digest.hexdigest()[:16]


class _UNetGraph(torch.nn.Module):
    """The UNet with positional tensor inputs, as convert_model traces it."""

    def __init__(self, unet: torch.nn.Module, with_added: bool) -> None:
        super().__init__()
        self.unet = unet
        self.with_added = with_added

    def forward(self, sample, timestep, context, text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.with_added else None
        return self.unet(sample, timestep, encoder_hidden_states=context, added_cond_kwargs=added,
                         return_dict=False)[0]


class _DecoderGraph(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


def cpu_compile_config(precision: str, threads: int | None = None, blob_dir: Path | None = None) -> dict:
    """How every huabi graph is compiled for the CPU: one latency-bound request at a time
    (a job's steps run one after another), in ``precision`` (f32 or bf16)."""
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if blob_dir is not None:
        config["CACHE_DIR"] = str(blob_dir)
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


class CompiledGraph:
    """One converted graph (IR on disk), compiled per input-shape signature."""

    def __init__(self, xml_path: Path, input_names: Sequence[str], *, precision: str, blob_dir: Path,
                 threads: int | None = None) -> None:
        self.xml_path = xml_path
        self.input_names = tuple(input_names)
        self.precision = precision
        self.blob_dir = blob_dir
        self.threads = threads
        self._compiled: dict[tuple, Any] = {}

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        signature = tuple(tuple(tensor.shape) for tensor in tensors)
        compiled = self._compiled.get(signature)
        if compiled is None:
            compiled = self._compile(signature)
            self._compiled[signature] = compiled
        arrays = [tensor.detach().to(torch.float32).contiguous().cpu().numpy() for tensor in tensors]
        result = compiled(arrays)[0]
        return torch.from_numpy(result.copy())

    def _compile(self, signature: tuple) -> Any:
        ov = require_openvino()
        core = ov.Core()
        model = core.read_model(self.xml_path)
        model.reshape({model.inputs[i]: ov.PartialShape(list(shape)) for i, shape in enumerate(signature)})
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        compiled = core.compile_model(model, "CPU", cpu_compile_config(self.precision, self.threads, self.blob_dir))
        del model
        return_freed_memory()
        return compiled


def convert_to_ir(graph: torch.nn.Module, example: tuple, input_names: Sequence[str], out_dir: Path, *,
                  weights: str = "fp32") -> Path:
    """Trace ``graph`` on ``example`` and write ``model.xml``/``model.bin`` atomically into ``out_dir``,
    weights stored as ``weights`` (fp32, fp16 or int8; see :func:`weight_format`)."""
    ov = require_openvino()
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        # diffusers' shape asserts become constants in the trace: true for every shape we run.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        model = ov.convert_model(graph.eval(), example_input=example)
    for port, name in zip(model.inputs, input_names):
        port.get_tensor().set_names({name})
    if weights == "int8":
        model = compress_int8(model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        ov.save_model(model, staging / "model.xml", compress_to_fp16=weights == "fp16")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir / "model.xml"


def fits_fp16(module: torch.nn.Module) -> bool:
    """Whether every floating weight survives a round trip through fp16 unchanged, as weights
    read from an fp16 file (most shared checkpoints) do: an fp16 IR then computes exactly
    what an fp32 one would."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.is_floating_point() and not torch.equal(tensor, tensor.to(torch.float16).to(tensor.dtype)):
                return False
    return True


def weight_format(precision: str, int8: bool, *, exact_in_fp16: bool = False) -> str:
    """How a graph's weights are stored on disk. The CPU plugin keeps the IR's constants beside
    its own compute-precision copy, so with a bf16 hint fp32 constants cost twice the bf16
    weights for nothing (SD1.5 UNet: 5.16 GiB compiled from fp32, 3.56 from fp16, same speed;
    docs/cpu.md). fp16 holds every bf16 value's precision and more. fp32 runs store fp16 only
    when that is lossless (``exact_in_fp16``: :func:`fits_fp16`), else fp32."""
    if int8:
        return "int8"
    return "fp16" if precision == "bf16" or exact_in_fp16 else "fp32"


def compress_int8(model):
    """Weight-only INT8 (asymmetric, per channel) with NNCF: weights stored as int8, matmuls
    and convolutions dequantize on the fly; activations stay in the compute precision."""
    try:
        import nncf
    except ImportError as err:
        raise HuabiError("int8: NNCF is not installed; pip install 'huabi[openvino]'") from err
    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)


class OpenVINOUNet(torch.nn.Module):
    """Stands in for a diffusers UNet2DConditionModel: same call, run by OpenVINO.

    ``config`` is the torch UNet's. The one (empty-valued) parameter tells callers to
    pass fp32 inputs. Extra UNet keyword arguments (ControlNet residuals, attention
    processors) cannot reach the converted graph: calling with them is an error, so the
    engine falls back to torch for such jobs before it gets here.
    """

    def __init__(self, torch_unet: torch.nn.Module, graph: CompiledGraph, with_added: bool, graph_key: str = "") -> None:
        super().__init__()
        self.config = torch_unet.config
        self.graph = graph
        self.with_added = with_added
        self.graph_key = graph_key  # which IR this is (model hash, weights checksum, format)
        self.input_dtype = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True,
                **extra):
        if extra:
            raise HuabiError(f"backend openvino: the UNet cannot take {', '.join(sorted(extra))} "
                             "(use --backend torch)")
        timestep = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        if timestep.numel() == 1 and sample.shape[0] != 1:
            timestep = timestep.expand(sample.shape[0])
        inputs = [sample, timestep, encoder_hidden_states]
        if self.with_added:
            inputs += [added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]]
        out = self.graph(*inputs).to(sample.device)
        return (out,) if not return_dict else _Output(out)


class _Output:
    def __init__(self, sample: torch.Tensor) -> None:
        self.sample = sample


class OpenVINOVAE(torch.nn.Module):
    """The torch AutoencoderKL with ``decode`` run by OpenVINO (encode stays in torch:
    image-to-image encodes once per image)."""

    def __init__(self, torch_vae: torch.nn.Module, graph: CompiledGraph) -> None:
        super().__init__()
        self.torch_vae = torch_vae
        self.config = torch_vae.config
        self.graph = graph
        self.input_dtype = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    @property
    def decoder(self) -> torch.nn.Module:
        return self.torch_vae.decoder

    @property
    def encoder(self) -> torch.nn.Module:
        return self.torch_vae.encoder

    def encode(self, pixels, return_dict=True):
        torch_dtype = next(self.torch_vae.parameters()).dtype
        return self.torch_vae.encode(pixels.to(torch_dtype), return_dict=return_dict)

    def decode(self, latents, return_dict=True):
        out = self.graph(latents).to(latents.device)
        return (out,) if not return_dict else _Output(out)


# Each graph costs ~3.5 GB at SD1.5 size (fp16 IR + compiled blob); every model and LoRA set
# converted adds one. HUABI_OPENVINO_CACHE_GB caps the folder; the least recently used go first.
DEFAULT_CACHE_LIMIT_GB = 20.0


def cache_limit_bytes() -> int:
    value = os.environ.get("HUABI_OPENVINO_CACHE_GB", "").strip()
    try:
        limit = float(value) if value else DEFAULT_CACHE_LIMIT_GB
    except ValueError:
        raise HuabiError(f"HUABI_OPENVINO_CACHE_GB: {value!r} is not a number of gigabytes") from None
    if limit <= 0:
        raise HuabiError(f"HUABI_OPENVINO_CACHE_GB: must be > 0, got {value!r}")
    return int(limit * 1e9)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def prune_cache(cache_dir: Path, limit_bytes: int, *, keep: set[Path] = frozenset()) -> list[Path]:
    """Delete the least recently used graph folders of ``cache_dir`` until it holds at most
    ``limit_bytes`` (never those in ``keep``); returns what was deleted. A process still running
    a deleted graph keeps working (its files stay open until it ends)."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    graphs = [path for path in cache_dir.iterdir() if path.is_dir() and not path.name.startswith(".")]
    sizes = {path: _folder_bytes(path) for path in graphs}
    total = sum(sizes.values())
    removed = []
    for path in sorted(graphs, key=lambda p: p.stat().st_mtime):
        if total <= limit_bytes:
            break
        if path in keep:
            continue
        shutil.rmtree(path, ignore_errors=True)
        total -= sizes[path]
        removed.append(path)
    return removed


class OpenVINORuntime:
    """Converts and compiles one model's parts, caching IR on disk; owned by the engine."""

    def __init__(self, cache_dir: Path, *, precision: str = "f32", int8: bool = False,
                 threads: int | None = None) -> None:
        if precision not in ("f32", "bf16"):
            raise HuabiError(f"backend openvino: precision must be f32 or bf16, got {precision!r}")
        self.cache_dir = Path(cache_dir)
        self.precision = precision
        self.int8 = int8
        self.threads = threads
        self._graphs: dict[str, CompiledGraph] = {}
        self.conversions = 0  # graphs converted (not read from the disk cache) by this runtime

    def graph_key(self, part: str, model_hash: str | None, module: torch.nn.Module, *, int8: bool) -> str:
        checksum = weights_checksum(module)
        exact = self.precision == "f32" and not int8 and fits_fp16(module)
        return f"{part}-{model_hash or 'nohash'}-{checksum}-{weight_format(self.precision, int8, exact_in_fp16=exact)}"

    @staticmethod
    def key_weight_format(key: str) -> str:
        """The weight format a :meth:`graph_key` names (its last field)."""
        return key.rsplit("-", 1)[-1]

    def has_graph(self, key: str) -> bool:
        """Whether ``key``'s graph can be used without the torch weights (compiled or on disk)."""
        ir_dir = self.cache_dir / key
        return key in self._graphs or ((ir_dir / "model.xml").exists() and (ir_dir / "model.bin").exists())

    def _graph(self, key: str, build: Callable[[], tuple[torch.nn.Module, tuple]], names: Sequence[str]) -> CompiledGraph:
        """``key``'s compiled graph, its weights stored as the key says; ``build`` (the traceable
        module and an example input) is called only when the IR is not on disk, so a cache hit
        never copies the weights."""
        if key in self._graphs:
            return self._graphs[key]
        ir_dir = self.cache_dir / key
        xml = ir_dir / "model.xml"
        if not self.has_graph(key):
            graph_module, example = build()
            convert_to_ir(graph_module, example, names, ir_dir, weights=self.key_weight_format(key))
            del graph_module, example
            return_freed_memory()
            self.conversions += 1
            prune_cache(self.cache_dir, cache_limit_bytes(), keep={self.cache_dir / k for k in (*self._graphs, key)})
        os.utime(ir_dir)  # last use, for the least-recently-used pruning
        # the graph's compiled blobs live in its folder, so pruning a graph removes them too
        compiled = CompiledGraph(xml, names, precision=self.precision, blob_dir=ir_dir / "blobs",
                                 threads=self.threads)
        self._graphs[key] = compiled
        return compiled

    def unet_key(self, torch_unet: torch.nn.Module, model_hash: str | None) -> str:
        """The UNet graph's cache key (needs the torch weights resident: it checksums them)."""
        return self.graph_key("unet", model_hash, torch_unet, int8=self.int8)

    def unet(self, torch_unet: torch.nn.Module, model_hash: str | None, *, context_width: int,
             pooled_width: int | None, time_ids: int | None, key: str | None = None) -> OpenVINOUNet:
        """The UNet as an OpenVINO graph. ``key``: a graph key known from an earlier call with
        the same weights; with it (and the graph compiled or on disk) the torch weights are not
        read at all, so they may have been released."""
        with_added = pooled_width is not None
        key = key or self.unet_key(torch_unet, model_hash)
        names = UNET_INPUTS_SDXL if with_added else UNET_INPUTS_SD

        def build() -> tuple[torch.nn.Module, tuple]:
            channels = int(torch_unet.config.in_channels)
            dtype = next(torch_unet.parameters()).dtype
            example: tuple = (torch.randn(2, channels, 8, 8, dtype=dtype), torch.tensor([500.0, 500.0], dtype=dtype),
                              torch.randn(2, 77, context_width, dtype=dtype))
            if with_added:
                example += (torch.randn(2, pooled_width, dtype=dtype), torch.randn(2, time_ids, dtype=dtype))
            graph_module: torch.nn.Module = _UNetGraph(torch_unet, with_added)
            if dtype != torch.float32:  # trace in fp32: OpenVINO picks the compute precision itself
                graph_module = _float32_copy(graph_module)
                example = tuple(tensor.float() for tensor in example)
            return graph_module, example

        graph = self._graph(key, build, names)
        return OpenVINOUNet(torch_unet, graph, with_added, graph_key=key)

    def vae(self, torch_vae: torch.nn.Module, model_hash: str | None) -> OpenVINOVAE:
        key = self.graph_key("vae-decoder", model_hash, torch_vae.decoder, int8=False)

        def build() -> tuple[torch.nn.Module, tuple]:
            dtype = next(torch_vae.parameters()).dtype
            graph_module: torch.nn.Module = _DecoderGraph(torch_vae)
            example = (torch.randn(1, int(torch_vae.config.latent_channels), 8, 8, dtype=dtype),)
            if dtype != torch.float32:
                graph_module = _float32_copy(graph_module)
                example = (example[0].float(),)
            return graph_module, example

        graph = self._graph(key, build, ("latents",))
        return OpenVINOVAE(torch_vae, graph)


def _float32_copy(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module).float()
