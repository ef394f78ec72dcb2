"""Which precision and how many threads this machine should use: decided, not assumed.

The same model runs several times faster in bf16 on some CPUs and twice as slow on
others (see DESIGN.md, "Offline facts"), so ``--dtype auto`` looks at the processor:

- ``amx_bf16`` (Intel Sapphire Rapids and later): bf16 tile units; bf16 always wins.
- ``avx512_bf16`` without AMX (AMD Zen 4/5, Cooper Lake): bf16 dot products exist but
  convolutions and attention may not gain, so a short measured probe (fp32 vs bf16 on
  the shapes a SD UNet runs) decides; its result is cached per machine, keyed by CPU
  model, flags and torch version, in ``<huabi cache>/cpu_probe.json``.
- no native bf16: fp32 (bf16 would be emulated: measured ~2x slower).

CUDA keeps its own rule (fp16). ``HUABI_AUTO_DTYPE=fp32|bf16`` pins the answer
(the test suite pins fp32 so its golden images do not depend on the machine).

Threads: torch's intra-op pool is sized to the physical cores this process may run
on (hyper-threads slow dense maths down); ``OMP_NUM_THREADS``/``HUABI_THREADS`` win.
A server that runs N jobs at once gives each ``cores // N`` threads, never more.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from huabi.errors import HuabiError
from huabi.models.files import atomic_write_text

# bf16 must beat fp32 by this factor in the probe to be chosen: below it the gain does
# not pay for bf16's rounding (~1% pixel error).
BF16_MIN_SPEEDUP = 1.15
PROBE_CACHE_FILE = "cpu_probe.json"
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class CpuInfo:
    """What /proc/cpuinfo (or the platform) says about the processor."""

    model_name: str
    flags: frozenset[str]
    logical_cpus: int  # CPUs this process may run on
    physical_cores: int  # distinct cores among them (hyper-threads counted once)

    @property
    def bf16_kind(self) -> str:
        """'amx' (bf16 tiles), 'avx512' (bf16 dot products only) or 'none'."""
        if "amx_bf16" in self.flags:
            return "amx"
        if "avx512_bf16" in self.flags:
            return "avx512"
        return "none"

    @property
    def relevant_flags(self) -> tuple[str, ...]:
        """The flags that matter for speed here, for printing beside every result."""
        keep = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                "amx_int8", "amx_fp16", "avx_vnni", "neon", "asimd", "bf16", "sve")
        return tuple(flag for flag in keep if flag in self.flags)


def parse_cpuinfo(text: str, allowed_cpus: set[int] | None = None) -> CpuInfo:
    """Parse Linux /proc/cpuinfo text (x86 and ARM layouts) restricted to ``allowed_cpus``."""
    model = ""
    flags: frozenset[str] = frozenset()
    cores: set[tuple[str, str]] = set()
    logical = 0
    for block in text.strip().split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        if "processor" not in fields or not fields["processor"].isdigit():
            continue
        if allowed_cpus is not None and int(fields["processor"]) not in allowed_cpus:
            continue
        logical += 1
        model = model or fields.get("model name") or fields.get("Processor") or fields.get("CPU part", "")
        flags = flags or frozenset((fields.get("flags") or fields.get("Features") or "").split())
        # Without topology fields (ARM, some VMs) every logical CPU is its own core.
        core = (fields.get("physical id", "0"), fields.get("core id", fields["processor"]))
        cores.add(core)
    if logical == 0:
        raise HuabiError("cpu: could not read any processor from /proc/cpuinfo")
    return CpuInfo(model_name=model or "unknown", flags=flags, logical_cpus=logical, physical_cores=len(cores))


def read_cpu_info() -> CpuInfo:
    """This machine's processor; platforms without /proc/cpuinfo get a flag-less description."""
    allowed = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            return parse_cpuinfo(handle.read(), allowed)
    except (OSError, HuabiError):
        import platform

        count = len(allowed) if allowed else (os.cpu_count() or 1)
        return CpuInfo(model_name=platform.processor() or platform.machine() or "unknown", flags=frozenset(),
                       logical_cpus=count, physical_cores=count)


# -- the probe ------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeResult:
    """Seconds for the same representative UNet work in fp32 and in bf16."""

    fp32_s: float
    bf16_s: float
    threads: int

    @property
    def bf16_speedup(self) -> float:
        return self.fp32_s / self.bf16_s if self.bf16_s > 0 else 0.0


def run_probe(threads: int | None = None, repeats: int = 3) -> ProbeResult:
    """Time an SD-UNet-like mix (3x3 conv, the attention projections and feed-forward
    matmuls, attention itself) at the first UNet level of a 512x512 image, fp32 vs bf16.

    About 1-2 s on a laptop-class CPU; the best of ``repeats`` is kept for each dtype.
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        tokens, width, batch = 64 * 64, 320, 2
        base = {
            "image": torch.randn(batch, width, 64, 64, generator=generator),
            "conv": torch.randn(width, width, 3, 3, generator=generator) * 0.02,
            "tokens": torch.randn(batch * tokens, width, generator=generator),
            "proj": torch.randn(width, 4 * width, generator=generator) * 0.02,
            "heads": torch.randn(batch, 8, 1024, width // 8, generator=generator),
        }
        timings = {}
        for dtype in (torch.float32, torch.bfloat16):
            parts = {name: tensor.to(dtype) for name, tensor in base.items()}
            parts["image"] = parts["image"].contiguous(memory_format=torch.channels_last)

            def work() -> None:
                torch.nn.functional.conv2d(parts["image"], parts["conv"], padding=1)
                torch.nn.functional.gelu(parts["tokens"] @ parts["proj"]) @ parts["proj"].T
                torch.nn.functional.scaled_dot_product_attention(parts["heads"], parts["heads"], parts["heads"])

            with torch.inference_mode():
                work()  # warm-up: oneDNN picks and caches its kernels
                best = float("inf")
                for _ in range(repeats):
                    start = time.perf_counter()
                    work()
                    best = min(best, time.perf_counter() - start)
            timings[dtype] = best
        return ProbeResult(fp32_s=timings[torch.float32], bf16_s=timings[torch.bfloat16],
                           threads=torch.get_num_threads())
    finally:
        torch.set_num_threads(previous)


def probe_cache_key(cpu: CpuInfo, torch_version: str | None = None) -> str:
    """One probe per machine kind and torch build: model name, speed flags, torch version."""
    return "|".join((cpu.model_name, ",".join(sorted(cpu.relevant_flags)), torch_version or torch.__version__))


def default_cache_dir() -> Path:
    from huabi.models.hashes import default_cache_dir as huabi_cache_dir

    return huabi_cache_dir()


def cached_measurement(key: str, run: Callable[[], dict], decode: Callable[[dict], Any], *,
                       cache_dir: Path | None = None) -> tuple[Any, bool]:
    """``(decode(entry), was_cached)``: ``key``'s stored measurement in this machine's probe
    file, or ``run()``'s fresh one saved atomically beside the others. A missing, corrupt or
    undecodable entry is measured again and rewritten."""
    cache_file = (cache_dir or default_cache_dir()) / PROBE_CACHE_FILE
    stored: dict = {}
    try:
        stored = json.loads(cache_file.read_text(encoding="utf-8"))
        if not isinstance(stored, dict):
            stored = {}
        if isinstance(stored.get(key), dict):
            return decode(stored[key]), True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    entry = run()
    stored[key] = entry
    try:
        atomic_write_text(cache_file, json.dumps(stored, indent=1))
    except OSError:
        pass  # a read-only cache only costs a probe next time
    return decode(entry), False


def cached_probe(cpu: CpuInfo, *, cache_dir: Path | None = None,
                 run: Callable[[], ProbeResult] = run_probe) -> tuple[ProbeResult, bool]:
    """``(result, was_cached)``: the stored probe for this machine, or a fresh one saved atomically."""
    return cached_measurement(
        probe_cache_key(cpu), lambda: asdict(run()),
        lambda entry: ProbeResult(float(entry["fp32_s"]), float(entry["bf16_s"]), int(entry["threads"])),
        cache_dir=cache_dir)


# -- the choice -------------------------------------------------------------------


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str  # one line for `huabi system` and logs
    probe: ProbeResult | None = None


def choose_cpu_dtype(cpu: CpuInfo, probe: Callable[[], ProbeResult] | ProbeResult | None = None) -> DtypeChoice:
    """The flags decide where they can; ``probe`` (a result, or a function that measures
    one) is consulted only for CPUs with AVX512-BF16 but no AMX."""
    kind = cpu.bf16_kind
    if kind == "amx":
        return DtypeChoice(torch.bfloat16, "bf16: the CPU has AMX bf16 tile units (amx_bf16)")
    if kind == "none":
        return DtypeChoice(torch.float32, "fp32: the CPU has no native bf16 (no amx_bf16 / avx512_bf16); "
                                          "bf16 would be emulated and slower")
    if probe is None:
        return DtypeChoice(torch.float32, "fp32: avx512_bf16 without AMX and no probe result")
    result = probe() if callable(probe) else probe
    speedup = result.bf16_speedup
    if speedup >= BF16_MIN_SPEEDUP:
        return DtypeChoice(torch.bfloat16, f"bf16: avx512_bf16 without AMX; measured bf16 {speedup:.2f}x "
                                           f"faster than fp32 (>= {BF16_MIN_SPEEDUP})", result)
    return DtypeChoice(torch.float32, f"fp32: avx512_bf16 without AMX; measured bf16 only {speedup:.2f}x "
                                      f"as fast as fp32 (< {BF16_MIN_SPEEDUP})", result)


def auto_dtype(device: torch.device, *, cpu: CpuInfo | None = None, cache_dir: Path | None = None) -> DtypeChoice:
    """``--dtype auto`` for ``device``: fp16 on CUDA; on the CPU, :func:`choose_cpu_dtype`
    with the cached probe (``HUABI_AUTO_DTYPE`` pins the CPU answer)."""
    if device.type == "cuda":
        return DtypeChoice(torch.float16, "fp16: CUDA device")
    if device.type != "cpu":
        return DtypeChoice(torch.float32, f"fp32: {device.type} device")
    pinned = os.environ.get("HUABI_AUTO_DTYPE", "").strip().lower()
    if pinned:
        if pinned not in ("fp32", "bf16"):
            raise HuabiError(f"HUABI_AUTO_DTYPE: {pinned!r} is not fp32 or bf16")
        return DtypeChoice(torch.float32 if pinned == "fp32" else torch.bfloat16,
                           f"{pinned}: pinned by HUABI_AUTO_DTYPE")
    cpu = cpu or read_cpu_info()
    return choose_cpu_dtype(cpu, lambda: cached_probe(cpu, cache_dir=cache_dir, run=lambda: run_probe(
        threads=recommended_threads(cpu)))[0])


# -- threads ------------------------------------------------------------------------


def recommended_threads(cpu: CpuInfo | None = None, *, concurrent_jobs: int = 1) -> int:
    """Intra-op threads for one job: the physical cores this process may use, shared by
    ``concurrent_jobs`` (at least 1); ``HUABI_THREADS`` / ``OMP_NUM_THREADS`` win."""
    for variable in ("HUABI_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(variable, "").strip()
        if value:
            try:
                if int(value) >= 1:
                    return int(value)
            except ValueError:
                pass
            raise HuabiError(f"{variable}: {value!r} is not a positive integer")
    cpu = cpu or read_cpu_info()
    cores = cpu.physical_cores
    quota = cgroup_cpu_limit()
    if quota is not None:  # a container limited to N CPUs' time gains nothing from more threads
        cores = min(cores, max(1, int(quota)))
    return max(1, cores // max(1, concurrent_jobs))


def cgroup_cpu_limit(cpu_max_file: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """CPUs' worth of time this container may use (cgroup v2 ``cpu.max``), None if unlimited."""
    try:
        quota, period = cpu_max_file.read_text(encoding="ascii").split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def configure_threads(cpu: CpuInfo | None = None, *, concurrent_jobs: int = 1) -> int:
    """Size torch's CPU thread pool (process-wide, so called once by an interface at start)."""
    threads = recommended_threads(cpu, concurrent_jobs=concurrent_jobs)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


# -- report ---------------------------------------------------------------------------


def system_report(device: torch.device, cpu: CpuInfo, choice: DtypeChoice, *, cache_dir: Path | None = None) -> list[str]:
    """Lines for `huabi system`: the processor (``cpu``), what it supports, and what huabi chose
    (``choice``, made by the caller for the backend report too)."""
    lines = [
        f"CPU: {cpu.model_name}",
        f"cores: {cpu.physical_cores} physical, {cpu.logical_cpus} logical (available to this process)",
        f"speed flags: {' '.join(cpu.relevant_flags) or '(none found)'}",
        f"native bf16: {cpu.bf16_kind}",
        f"torch: {torch.__version__}, threads: {recommended_threads(cpu)}",
    ]
    if torch.cuda.is_available():
        lines.append(f"CUDA: {torch.cuda.get_device_name(0)}")
    if choice.probe is not None:
        lines.append(f"probe: fp32 {choice.probe.fp32_s * 1000:.1f} ms, bf16 {choice.probe.bf16_s * 1000:.1f} ms "
                     f"({choice.probe.threads} threads; cached in {(cache_dir or default_cache_dir()) / PROBE_CACHE_FILE})")
    lines.append(f"device: {device}; --dtype auto -> {choice.reason}")
    from huabi.backends import available_backends

    lines.append(f"backends: {', '.join(available_backends())}")
    return lines


_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def precision_infotext(device: torch.device, dtype: torch.dtype, backend: str = "torch") -> dict[str, str | None]:
    """Infotext keys that make an image reproducible across machines: "Dtype" when it is not
    the device's reference precision (fp32 on the CPU, fp16 on CUDA), "Backend" when it is
    not torch. Values are None (left out) otherwise, so a stale copy from ``--from`` is dropped."""
    reference = torch.float16 if device.type == "cuda" else torch.float32
    return {"Dtype": None if dtype == reference else dtype_name(dtype),
            "Backend": None if backend == "torch" else backend}
