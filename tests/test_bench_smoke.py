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
    # anonymous memory is part of the resident set, sampled at the same moments
    assert all(0 < job["anon_peak_gib"] <= job["peak_gib"] and 0 < job["anon_after_gib"] <= job["rss_after_gib"]
               for r in result["results"] for job in r["jobs"])
    assert result["results"][1]["mean_abs_pixel_diff_vs_torch"] == 0
    # seconds per step from the step callbacks of both (diffusers' and huabi's), and their ratio
    assert all(job["s_per_step"] > 0 for r in result["results"] for job in r["jobs"])
    assert [job["backend"] for job in result["results"][1]["jobs"]] == ["torch", "torch"]
    assert result["results"][1]["step_speed_vs_diffusers"] > 0


def test_profile_openvino_counts_the_unets_flops(tmp_path):
    """The per-op profile runs, and its FLOP accounting (what docs/cpu.md's "share of peak"
    rests on) equals an independent count on the torch UNet: forward hooks on every Conv2d and
    Linear, and the attention's QK^T + AV from the shapes its processor sees."""
    pytest.importorskip("openvino")
    sys.path.insert(0, str(BENCH))
    try:
        from bench_cpu import build_bundle
    finally:
        sys.path.remove(str(BENCH))
    import torch
    from diffusers.models.attention_processor import Attention

    out = tmp_path / "profile.json"
    done = run_bench("profile_openvino.py", "--tiny", "--size", "64", "--steps", "1", "--json", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    types = {row["type"] for row in result["by_type"]}
    assert {"Convolution", "FullyConnected"} <= types and result["s_per_step"] > 0 and result["flags"]

    unet = build_bundle("sd1", torch.float32, tiny=True).unet
    counted = {"conv": 0.0, "linear": 0.0, "attention": 0.0}

    def conv_hook(module, _inputs, output):
        counted["conv"] += 2.0 * output.numel() * module.weight[0].numel()

    def linear_hook(module, _inputs, output):
        counted["linear"] += 2.0 * output.numel() * module.in_features

    def attention_hook(module, args, kwargs, _output):
        queries = args[0] if args else kwargs["hidden_states"]
        keys = kwargs.get("encoder_hidden_states")
        keys = queries if keys is None else keys
        counted["attention"] += 4.0 * queries.shape[0] * queries.shape[1] * keys.shape[1] * module.inner_dim

    for module in unet.modules():
        if isinstance(module, Attention):
            module.register_forward_hook(attention_hook, with_kwargs=True)
        elif isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(conv_hook)
        elif isinstance(module, torch.nn.Linear):
            module.register_forward_hook(linear_hook)
    with torch.no_grad():
        unet(torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0]), encoder_hidden_states=torch.randn(2, 77, 64))
    by_op = result["gflop_by_op"]
    assert by_op["Convolution"] * 1e9 == pytest.approx(counted["conv"], rel=1e-3)
    assert by_op["MatMul"] * 1e9 == pytest.approx(counted["linear"], rel=1e-3)
    assert by_op["ScaledDotProductAttention"] * 1e9 == pytest.approx(counted["attention"], rel=1e-3)
