"""``--dtype auto`` end to end from stated inputs (issue 22): a stated CPU and a stated probe record.

test_device_choice.py checks the rule table with probe results handed in. Here the inputs are what a
machine states: its /proc/cpuinfo text and the probe cache file a previous run left, and the answer
is the documented rule (device_choice's module notes): AMX -> bf16 without probing; no native bf16 ->
fp32; AVX512-BF16 without AMX -> bf16 exactly when the recorded fp32/bf16 time ratio is at least
``BF16_MIN_SPEEDUP`` (1.15); CUDA -> fp16; any other device -> fp32; ``HUABI_AUTO_DTYPE`` wins on the CPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from huabi.service import device_choice as dc

ZEN4_CPUINFO = """processor\t: 0
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni avx512_bf16
physical id\t: 0
core id\t\t: 0

processor\t: 1
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni avx512_bf16
physical id\t: 0
core id\t\t: 1
"""


def _never_probe():
    raise AssertionError("a recorded probe was there: no new probe may run")


@pytest.mark.parametrize(("fp32_s", "bf16_s", "expected"), [
    (1.15, 1.0, torch.bfloat16),  # exactly the threshold (1.15 / 1.0 == 1.15 in floats) counts as fast enough
    (1.1499, 1.0, torch.float32),  # just below
    (0.390, 0.206, torch.bfloat16),  # this machine's measured probe (closing note: 390 vs 206 ms)
    (0.200, 0.400, torch.float32),  # bf16 slower
])
def test_recorded_probe_decides_on_avx512_bf16_without_amx(tmp_path, monkeypatch, fp32_s, bf16_s, expected):
    monkeypatch.delenv("HUABI_AUTO_DTYPE", raising=False)
    cpu = dc.parse_cpuinfo(ZEN4_CPUINFO)
    assert cpu.bf16_kind == "avx512" and cpu.physical_cores == 2
    record = {dc.probe_cache_key(cpu): {"fp32_s": fp32_s, "bf16_s": bf16_s, "threads": 2}}
    (tmp_path / dc.PROBE_CACHE_FILE).write_text(json.dumps(record), encoding="utf-8")
    monkeypatch.setattr(dc, "run_probe", lambda **_: _never_probe())
    choice = dc.auto_dtype(torch.device("cpu"), cpu=cpu, cache_dir=tmp_path)
    assert choice.dtype == expected
    assert f"{fp32_s / bf16_s:.2f}x" in choice.reason


def test_a_probe_recorded_for_another_torch_build_is_not_reused(tmp_path, monkeypatch):
    monkeypatch.delenv("HUABI_AUTO_DTYPE", raising=False)
    cpu = dc.parse_cpuinfo(ZEN4_CPUINFO)
    stale = {dc.probe_cache_key(cpu, torch_version="1.0.0"): {"fp32_s": 1.0, "bf16_s": 0.1, "threads": 2}}
    (tmp_path / dc.PROBE_CACHE_FILE).write_text(json.dumps(stale), encoding="utf-8")
    ran = []
    monkeypatch.setattr(dc, "run_probe", lambda **_: ran.append(1) or dc.ProbeResult(0.2, 0.4, 2))
    assert dc.auto_dtype(torch.device("cpu"), cpu=cpu, cache_dir=tmp_path).dtype == torch.float32
    assert ran == [1]


@pytest.mark.parametrize(("device", "expected"), [("cuda", torch.float16), ("mps", torch.float32),
                                                  ("meta", torch.float32)])
def test_non_cpu_devices(device, expected, monkeypatch):
    monkeypatch.setenv("HUABI_AUTO_DTYPE", "bf16")  # a CPU pin does not reach other devices
    assert dc.auto_dtype(torch.device(device)).dtype == expected
