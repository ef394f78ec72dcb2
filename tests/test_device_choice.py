"""`--dtype auto` per machine: CPU flags -> choice, the probe and its cache, threads, infotext."""

from __future__ import annotations

import json

import pytest
import torch

from huabi.errors import HuabiError
from huabi.service import device_choice as dc

XEON_AMX = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu avx2 fma avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
physical id\t: 0
core id\t\t: 0

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu avx2 fma avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
physical id\t: 0
core id\t\t: 0

processor\t: 2
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu avx2 fma avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
physical id\t: 0
core id\t\t: 1
"""


def cpu(flags: str, model: str = "Test CPU", cores: int = 2) -> dc.CpuInfo:
    return dc.CpuInfo(model_name=model, flags=frozenset(flags.split()), logical_cpus=cores, physical_cores=cores)


def never_probe() -> dc.ProbeResult:
    raise AssertionError("the flags alone decide here: no probe")


def test_parse_cpuinfo_counts_hyperthreads_once_and_reads_flags():
    info = dc.parse_cpuinfo(XEON_AMX)
    assert (info.logical_cpus, info.physical_cores) == (3, 2)
    assert info.model_name == "Intel(R) Xeon(R) Platinum 8488C"
    assert info.bf16_kind == "amx"
    assert "amx_int8" in info.relevant_flags
    assert dc.parse_cpuinfo(XEON_AMX, allowed_cpus={2}).physical_cores == 1  # affinity mask respected


def test_arm_cpuinfo_without_topology_counts_each_cpu():
    text = "processor\t: 0\nFeatures\t: fp asimd bf16\n\nprocessor\t: 1\nFeatures\t: fp asimd bf16\n"
    info = dc.parse_cpuinfo(text)
    assert info.physical_cores == 2 and info.bf16_kind == "none"


@pytest.mark.parametrize(
    ("flags", "probe", "expected", "reason_part"),
    [
        ("avx2 avx512f avx512_bf16 amx_bf16 amx_tile", never_probe, torch.bfloat16, "AMX"),
        ("avx2 fma avx512f avx512_vnni", never_probe, torch.float32, "no native bf16"),
        ("avx2 fma", never_probe, torch.float32, "no native bf16"),
        ("avx2 avx512f avx512_bf16", dc.ProbeResult(fp32_s=0.25, bf16_s=0.11, threads=2), torch.bfloat16, "2.27x"),
        ("avx2 avx512f avx512_bf16", dc.ProbeResult(fp32_s=0.25, bf16_s=0.24, threads=2), torch.float32, "1.04x"),
        ("avx2 avx512f avx512_bf16", None, torch.float32, "no probe"),
    ],
    ids=["amx", "avx512-no-bf16", "avx2-only", "zen4-bf16-fast", "zen4-bf16-slow", "zen4-no-probe"],
)
def test_flags_and_probe_decide_the_cpu_dtype(flags, probe, expected, reason_part):
    choice = dc.choose_cpu_dtype(cpu(flags), probe)
    assert choice.dtype == expected
    assert reason_part in choice.reason


def test_probe_is_cached_per_machine_and_torch_version(tmp_path):
    calls = []

    def fake_run() -> dc.ProbeResult:
        calls.append(1)
        return dc.ProbeResult(fp32_s=0.2, bf16_s=0.1, threads=2)

    zen = cpu("avx512f avx512_bf16", model="AMD EPYC")
    first, cached = dc.cached_probe(zen, cache_dir=tmp_path, run=fake_run)
    again, cached_again = dc.cached_probe(zen, cache_dir=tmp_path, run=fake_run)
    assert (cached, cached_again, len(calls)) == (False, True, 1)
    assert again == first
    other = cpu("avx512f avx512_bf16", model="AMD EPYC 9654")  # another machine kind: its own probe
    dc.cached_probe(other, cache_dir=tmp_path, run=fake_run)
    assert len(calls) == 2
    stored = json.loads((tmp_path / dc.PROBE_CACHE_FILE).read_text())
    assert len(stored) == 2 and all(key.endswith(torch.__version__) for key in stored)


def test_corrupt_probe_cache_is_replaced(tmp_path):
    (tmp_path / dc.PROBE_CACHE_FILE).write_text("{not json")
    result, cached = dc.cached_probe(cpu("avx512_bf16"), cache_dir=tmp_path,
                                     run=lambda: dc.ProbeResult(0.3, 0.1, 1))
    assert not cached and result.bf16_speedup == pytest.approx(3.0)
    assert json.loads((tmp_path / dc.PROBE_CACHE_FILE).read_text())


def test_real_probe_measures_both_dtypes():
    result = dc.run_probe(threads=1, repeats=1)
    assert result.fp32_s > 0 and result.bf16_s > 0 and result.threads == 1


def test_auto_dtype_rules(monkeypatch, tmp_path):
    monkeypatch.delenv("HUABI_AUTO_DTYPE", raising=False)
    assert dc.auto_dtype(torch.device("cuda")).dtype == torch.float16
    amx = cpu("avx512_bf16 amx_bf16")
    assert dc.auto_dtype(torch.device("cpu"), cpu=amx, cache_dir=tmp_path).dtype == torch.bfloat16
    monkeypatch.setenv("HUABI_AUTO_DTYPE", "fp32")
    assert dc.auto_dtype(torch.device("cpu"), cpu=amx).dtype == torch.float32
    monkeypatch.setenv("HUABI_AUTO_DTYPE", "int4")
    with pytest.raises(HuabiError, match="HUABI_AUTO_DTYPE: 'int4' is not fp32 or bf16"):
        dc.auto_dtype(torch.device("cpu"), cpu=amx)


def test_threads_are_physical_cores_shared_between_jobs(monkeypatch):
    monkeypatch.delenv("HUABI_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(dc, "cgroup_cpu_limit", lambda: None)
    hyperthreaded = dc.CpuInfo("x", frozenset(), logical_cpus=16, physical_cores=8)
    assert dc.recommended_threads(hyperthreaded) == 8
    assert dc.recommended_threads(hyperthreaded, concurrent_jobs=2) == 4
    assert dc.recommended_threads(hyperthreaded, concurrent_jobs=32) == 1
    monkeypatch.setattr(dc, "cgroup_cpu_limit", lambda: 2.5)
    assert dc.recommended_threads(hyperthreaded) == 2  # container quota
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert dc.recommended_threads(hyperthreaded) == 3
    monkeypatch.setenv("HUABI_THREADS", "zero")
    with pytest.raises(HuabiError, match="HUABI_THREADS: 'zero' is not a positive integer"):
        dc.recommended_threads(hyperthreaded)


def test_cgroup_limit_parsing(tmp_path):
    limit = tmp_path / "cpu.max"
    limit.write_text("200000 100000\n")
    assert dc.cgroup_cpu_limit(limit) == 2.0
    limit.write_text("max 100000\n")
    assert dc.cgroup_cpu_limit(limit) is None
    assert dc.cgroup_cpu_limit(tmp_path / "missing") is None


def test_precision_infotext_only_when_not_the_reference():
    cpu_device, cuda = torch.device("cpu"), torch.device("cuda")
    assert dc.precision_infotext(cpu_device, torch.float32) == {"Dtype": None, "Backend": None}
    assert dc.precision_infotext(cpu_device, torch.bfloat16)["Dtype"] == "bf16"
    assert dc.precision_infotext(cuda, torch.float16)["Dtype"] is None
    assert dc.precision_infotext(cpu_device, torch.float32, "openvino")["Backend"] == "openvino"


def test_engine_records_bf16_in_infotext_and_fp32_not(tiny_sd1_file):
    from huabi.core.infotext import parse_infotext
    from huabi.core.request import GenerationRequest
    from huabi.service.engine import Engine

    request = GenerationRequest(prompt="a cat", model=str(tiny_sd1_file), steps=2, width_px=64, height_px=64, seed=3)
    [bf16] = Engine(device="cpu", dtype="bf16").generate(request)
    [fp32] = Engine(device="cpu", dtype="auto").generate(request)  # pinned to fp32 by conftest
    assert parse_infotext(bf16.infotext).params["Dtype"] == "bf16"
    assert "Dtype" not in parse_infotext(fp32.infotext).params


def test_system_command_prints_the_choice(capsys, monkeypatch):
    from huabi.cli.main import main

    assert main(["system", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "native bf16:" in out and "--dtype auto -> fp32: pinned by HUABI_AUTO_DTYPE" in out
    assert "backends: torch" in out
    assert "--backend auto -> full-size SD1/SD2/SDXL models: torch: pinned by HUABI_AUTO_BACKEND" in out
