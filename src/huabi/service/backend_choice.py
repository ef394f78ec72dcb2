"""``--backend auto``: torch or OpenVINO, per machine and per model, decided not assumed.

OpenVINO runs a full-size SD UNet faster than torch on the CPUs measured so far (SD1.5
512x512, CFG: 4.49 vs 6.06 s/step in bf16 on an AVX512-BF16 Zen 4, docs/cpu.md; 1.54 vs
2.14 s on an AMX Xeon, issue 20's probe), but it must first convert the model (~35 s for
SD1.5, cached on disk afterwards) and it cannot run every feature. So ``auto`` uses it when
all of these hold, and torch otherwise, silently:

- the device is the CPU and the ``openvino`` package is installed;
- the model is one OpenVINO can take (SD1/SD2/SDXL layouts; not SD3/FLUX transformers);
- the UNet is full-size (at least ``AUTO_MIN_UNET_PARAMS``): small UNets such as
  huabi-mini's already run in tens of milliseconds per step in torch, where a conversion
  would never pay for itself;
- there is room to convert it: tracing copies the UNet in fp32 beside the loaded model
  (SD1.5's first run peaked 3.5 GiB above torch's job, ~4.4 bytes per UNet parameter),
  so free memory must be at least ``CONVERSION_BYTES_PER_PARAM`` per parameter; otherwise
  torch runs it (an SDXL UNet asks ~19 GiB free);
- a short measured probe on this machine (the same SD-UNet-like mix of convolution,
  feed-forward and attention work as the dtype probe, run by torch and by OpenVINO in the
  engine's precision) finds OpenVINO at least ``OPENVINO_MIN_SPEEDUP`` times faster. Its
  result is cached per machine (CPU model, speed flags, torch and OpenVINO versions,
  precision) in ``<huabi cache>/cpu_probe.json``, like the dtype probe.

A job whose features OpenVINO cannot run (ControlNet, hypernetworks, ...) runs in torch.
``HUABI_AUTO_BACKEND=torch|openvino`` pins the answer for full-size models that fit the
memory rule.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from huabi.errors import HuabiError
from huabi.service.device_choice import (
    CpuInfo,
    auto_dtype,
    cached_measurement,
    dtype_name,
    read_cpu_info,
    recommended_threads,
    system_report,
)

# Below this many UNet parameters torch is kept (huabi-mini: 13.8 M; SD1.5: 860 M).
AUTO_MIN_UNET_PARAMS = 100_000_000
# OpenVINO must beat torch by this factor in the probe: a smaller gain does not pay for the
# first run's conversion and the graph's different rounding.
OPENVINO_MIN_SPEEDUP = 1.10
# Free memory a conversion needs per UNet parameter: the measured 4.4 bytes with a 2x margin.
CONVERSION_BYTES_PER_PARAM = 8


@dataclass(frozen=True)
class BackendProbe:
    """Seconds for the same representative UNet work in torch and in OpenVINO."""

    torch_s: float
    openvino_s: float
    precision: str  # fp32 or bf16: the engine's compute precision, used by both
    threads: int

    @property
    def openvino_speedup(self) -> float:
        return self.torch_s / self.openvino_s if self.openvino_s > 0 else 0.0


@dataclass(frozen=True)
class BackendDecision:
    backend: str  # "torch" or "openvino"
    reason: str  # one line for `huabi system` and the log
    probe: BackendProbe | None = None


class _ProbeBlock(torch.nn.Module):
    """The first UNet level's work at 512x512 with CFG: a 3x3 convolution over 320 channels
    at 64x64, the feed-forward of 4,096 tokens, attention over 1,024 tokens in 8 heads."""

    def __init__(self, width: int = 320) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(width, width, 3, padding=1)
        self.up = torch.nn.Linear(width, 4 * width)
        self.down = torch.nn.Linear(4 * width, width)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor, heads: torch.Tensor):
        return (self.conv(image), self.down(torch.nn.functional.gelu(self.up(tokens))),
                torch.nn.functional.scaled_dot_product_attention(heads, heads, heads))


def run_backend_probe(dtype: torch.dtype, threads: int, repeats: int = 3) -> BackendProbe:
    """Time :class:`_ProbeBlock` in torch (``dtype``) and OpenVINO (the matching precision
    hint), best of ``repeats`` each. A few seconds, conversion included."""
    import openvino as ov

    from huabi.backends.openvino import cpu_compile_config

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        with torch.random.fork_rng(devices=[]):  # seeded weights without moving the caller's global RNG
            torch.manual_seed(0)
            block = _ProbeBlock().eval()
        inputs = (torch.randn(2, 320, 64, 64, generator=generator), torch.randn(2, 4096, 320, generator=generator),
                  torch.randn(2, 8, 1024, 40, generator=generator))
        precision = "bf16" if dtype == torch.bfloat16 else "f32"

        def best_of(work: Callable[[], object]) -> float:
            work()  # warm-up: kernels chosen and cached
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                work()
                best = min(best, time.perf_counter() - start)
            return best

        with torch.inference_mode():
            compiled = ov.Core().compile_model(ov.convert_model(block, example_input=inputs), "CPU",
                                               cpu_compile_config(precision, threads))
            arrays = [tensor.numpy() for tensor in inputs]
            openvino_s = best_of(lambda: compiled(arrays))
            typed = block.to(dtype)
            typed_inputs = (inputs[0].to(dtype).contiguous(memory_format=torch.channels_last),
                            inputs[1].to(dtype), inputs[2].to(dtype))
            typed.conv.to(memory_format=torch.channels_last)
            torch_s = best_of(lambda: typed(*typed_inputs))
        return BackendProbe(torch_s=torch_s, openvino_s=openvino_s, precision=dtype_name(dtype), threads=threads)
    finally:
        torch.set_num_threads(previous)


def backend_probe_key(cpu: CpuInfo, dtype: torch.dtype) -> str:
    import openvino

    return "|".join(("backend", cpu.model_name, ",".join(sorted(cpu.relevant_flags)), torch.__version__,
                     openvino.__version__, dtype_name(dtype)))


def cached_backend_probe(cpu: CpuInfo, dtype: torch.dtype, threads: int, *, cache_dir=None,
                         run: Callable[[], BackendProbe] | None = None) -> tuple[BackendProbe, bool]:
    """``(probe, was_cached)`` for this machine and precision (measured once, then read)."""
    run = run or (lambda: run_backend_probe(dtype, threads))
    return cached_measurement(
        backend_probe_key(cpu, dtype), lambda: asdict(run()),
        lambda entry: BackendProbe(float(entry["torch_s"]), float(entry["openvino_s"]), str(entry["precision"]),
                                   int(entry["threads"])),
        cache_dir=cache_dir)


def choose_backend(*, device: torch.device, openvino_installed: bool, convertible: bool, unet_params: int,
                   probe: Callable[[], BackendProbe] | BackendProbe | None = None,
                   free_bytes: int | None = None) -> BackendDecision:
    """The rules of the module docstring; ``probe`` (a result, or a function measuring one) is
    consulted only when every other rule allows OpenVINO. ``free_bytes``: memory available now
    (None: not checked, e.g. the graph is already converted)."""
    if device.type != "cpu":
        return BackendDecision("torch", f"torch: device {device} (OpenVINO is used on the CPU only)")
    if not openvino_installed:
        return BackendDecision("torch", "torch: OpenVINO is not installed (pip install 'huabi[openvino]')")
    if not convertible:
        return BackendDecision("torch", "torch: OpenVINO does not convert this model family (SD3/FLUX)")
    if unet_params < AUTO_MIN_UNET_PARAMS:
        return BackendDecision("torch", f"torch: small UNet ({unet_params / 1e6:.1f} M parameters < "
                                        f"{AUTO_MIN_UNET_PARAMS / 1e6:.0f} M): a conversion would not pay")
    if free_bytes is not None and free_bytes < unet_params * CONVERSION_BYTES_PER_PARAM:
        return BackendDecision("torch", f"torch: converting this UNet to OpenVINO needs ~"
                                        f"{unet_params * CONVERSION_BYTES_PER_PARAM / 2**30:.1f} GiB free, "
                                        f"{free_bytes / 2**30:.1f} GiB are")
    pinned = os.environ.get("HUABI_AUTO_BACKEND", "").strip().lower()
    if pinned:
        if pinned not in ("torch", "openvino"):
            raise HuabiError(f"HUABI_AUTO_BACKEND: {pinned!r} is not torch or openvino")
        return BackendDecision(pinned, f"{pinned}: pinned by HUABI_AUTO_BACKEND")
    if probe is None:
        return BackendDecision("torch", "torch: no backend probe result")
    result = probe() if callable(probe) else probe
    speedup = result.openvino_speedup
    if speedup >= OPENVINO_MIN_SPEEDUP:
        return BackendDecision("openvino", f"OpenVINO: measured {speedup:.2f}x torch's speed in {result.precision} "
                                           f"(>= {OPENVINO_MIN_SPEEDUP})", result)
    return BackendDecision("torch", f"torch: OpenVINO measured only {speedup:.2f}x torch's speed in "
                                    f"{result.precision} (< {OPENVINO_MIN_SPEEDUP})", result)


def auto_backend_report(device: torch.device, dtype: torch.dtype, cpu: CpuInfo, threads: int, *,
                        cache_dir=None) -> list[str]:
    """Lines for `huabi system`: what ``--backend auto`` does with a full-size SD1/SD2/SDXL model here."""
    from huabi.backends import available_backends

    installed = "openvino" in available_backends()
    probe = (lambda: cached_backend_probe(cpu, dtype, threads, cache_dir=cache_dir)[0]) if installed else None
    decision = choose_backend(device=device, openvino_installed=installed, convertible=True,
                              unet_params=AUTO_MIN_UNET_PARAMS, probe=probe)
    lines = []
    if decision.probe is not None:
        lines.append(f"backend probe: torch {decision.probe.torch_s * 1000:.1f} ms, OpenVINO "
                     f"{decision.probe.openvino_s * 1000:.1f} ms ({decision.probe.precision}, {decision.probe.threads} threads)")
    lines.append(f"--backend auto -> full-size SD1/SD2/SDXL models: {decision.reason}; "
                 f"smaller models (e.g. huabi-mini) and SD3/FLUX: torch")
    return lines


def system_report_with_backend(device: torch.device, *, cache_dir=None) -> list[str]:
    """`huabi system`: the processor and the dtype choice (device_choice), then the backend choice."""
    cpu = read_cpu_info()
    choice = auto_dtype(device, cpu=cpu, cache_dir=cache_dir)
    return [*system_report(device, cpu, choice, cache_dir=cache_dir),
            *auto_backend_report(device, choice.dtype, cpu, recommended_threads(cpu), cache_dir=cache_dir)]
