"""The benchmarks still run: each end to end at toy sizes (they are not run by CI otherwise, and
bench_cpu once rotted unnoticed when the shared step callback changed). Numbers are not checked,
only that every run of the script completes and writes its JSON with the fields the docs quote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
pytestmark = pytest.mark.slow


def run_bench(script: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HUABI_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(BENCH / script), *args], cwd=BENCH, env=env, capture_output=True,
                          text=True, timeout=900)


def test_bench_cpu_runs_every_row(tmp_path):
    pytest.importorskip("openvino")
    out = tmp_path / "cpu.json"
    done = run_bench("bench_cpu.py", "--tiny", "--size", "64", "--steps", "2", "--json", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    names = [run["name"] for run in result["runs"]]
    assert names[0] == "diffusers fp32" and "huabi openvino" in names and any(n.startswith("huabi torch") for n in names)
    for run in result["runs"]:
        assert run["s_per_step"] > 0 and run["decode_s"] > 0 and run["peak_gib"] > 0
        assert run["mean_abs_pixel_diff"] < 5  # same weights, fp32 on both sides (HUABI_AUTO_DTYPE=fp32)
    assert result["lcm"]["end_to_end_s"] > 0 and "auto_backend" in result and "flags" in result


def test_bench_openvino_memory_runs_its_modes(tmp_path):
    pytest.importorskip("openvino")
    out = tmp_path / "memory.json"
    done = run_bench("bench_openvino_memory.py", "--size", "64", "--steps", "3", "--dtype", "fp32",
                     "--modes", "diffusers,torch", "--json", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [r["mode"] for r in result["results"]] == ["diffusers", "torch"]
    assert all(r["process_peak_gib"] > 0 and len(r["jobs"]) == 2 for r in result["results"])
    assert result["results"][1]["mean_abs_pixel_diff_vs_torch"] == 0
    # seconds per step from the step callbacks of both (diffusers' and huabi's), and their ratio
    assert all(job["s_per_step"] > 0 for r in result["results"] for job in r["jobs"])
    assert [job["backend"] for job in result["results"][1]["jobs"]] == ["torch", "torch"]
    assert result["results"][1]["step_speed_vs_diffusers"] > 0
