"""Where an OpenVINO UNet step spends its time: per-operation profile of the compiled graph.

    .venv/bin/python bench/profile_openvino.py                     # full SD1.5 UNet, 512x512, bf16 hint
    .venv/bin/python bench/profile_openvino.py --precision f32     # the no-bf16 path
    .venv/bin/python bench/profile_openvino.py --threads 1 --json out.json

Converts the full-size SD1.5 UNet (random weights, seeded) exactly as the engine does
(``huabi.backends.openvino``: same graph wrapper, fp16 IR weights), compiles it with the
engine's CPU settings plus ``PERF_COUNT``, runs a few CFG-batch steps and sums the plugin's
per-node times by node type and by kernel. Convolutions, matmuls and attention are reported as
GFLOP/s (from the graph's shapes), so their share of the CPU's peak can be read off:
this is how docs/cpu.md knows which part of a step is near the hardware's limit and which
is not. Run it on every kind of CPU you report speed for; the header prints its flags.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def module_path(node_name: str) -> str:
    """The torch module a converted node came from: the plugin names a fused node after one
    of its original ops (".../to_q/aten::linear/Add" for MatMul + bias), all of which share
    this prefix."""
    return node_name.split("/aten::")[0]


def _dims(shape) -> list[int]:
    return [d.get_length() for d in shape]


def op_flops(op) -> float:
    """FLOPs of one convolution, matmul or attention op of a static-shaped IR (0 for others)."""
    kind = op.get_type_name()
    if kind == "Convolution":  # weights [out, in, kh, kw]
        return 2.0 * np.prod(_dims(op.get_output_partial_shape(0))) * np.prod(_dims(op.input(1).get_partial_shape())[1:])
    if kind == "MatMul":
        a = _dims(op.input(0).get_partial_shape())
        inner = a[-2] if op.get_attributes().get("transpose_a") else a[-1]
        return 2.0 * np.prod(_dims(op.get_output_partial_shape(0))) * inner
    if kind == "ScaledDotProductAttention":  # q [..., L, D], k [..., S, D]: QK^T and AV
        q, k = _dims(op.input(0).get_partial_shape()), _dims(op.input(1).get_partial_shape())
        return 4.0 * np.prod(q) * k[-2]
    return 0.0


def graph_flops(model) -> tuple[dict[str, float], dict[str, float]]:
    """FLOPs of the static-shaped IR by module (see :func:`module_path`) and by op type."""
    by_module: dict[str, float] = collections.defaultdict(float)
    by_kind: dict[str, float] = collections.defaultdict(float)
    for op in model.get_ordered_ops():
        flop = op_flops(op)
        if flop:
            by_module[module_path(op.get_friendly_name())] += flop
            by_kind[op.get_type_name()] += flop
    return dict(by_module), dict(by_kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--precision", choices=("bf16", "f32"), default="bf16", help="the INFERENCE_PRECISION_HINT")
    parser.add_argument("--threads", type=int, default=0, help="0: OpenVINO's default (the physical cores)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="toy widths (the smoke test); not a measurement")
    parser.add_argument("--top", type=int, default=12, help="how many of the slowest nodes to list")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import openvino as ov

    from bench_cpu import build_bundle
    from huabi.backends.openvino import _UNetGraph, convert_to_ir, cpu_compile_config
    from huabi.service.device_choice import read_cpu_info

    cpu = read_cpu_info()
    bundle = build_bundle("sd1", torch.float32, tiny=args.tiny)
    latent = args.size // 8
    context_width = int(bundle.unet.config.cross_attention_dim)
    example = (torch.randn(2, 4, latent, latent), torch.tensor([500.0, 500.0]), torch.randn(2, 77, context_width))
    with tempfile.TemporaryDirectory(prefix="huabi-profile-") as work:
        started = time.perf_counter()
        xml = convert_to_ir(_UNetGraph(bundle.unet, False), example, ("sample", "timestep", "context"),
                            Path(work) / "unet", weights="fp16")
        convert_s = time.perf_counter() - started
        del bundle
        core = ov.Core()
        model = core.read_model(xml)
        model.reshape({model.inputs[i]: ov.PartialShape(list(t.shape)) for i, t in enumerate(example)})
        flops, flops_by_kind = graph_flops(model)
        config = {**cpu_compile_config(args.precision, args.threads or None), "PERF_COUNT": True}
        compiled = core.compile_model(model, "CPU", config)
        request = compiled.create_infer_request()
        inputs = [tensor.numpy() for tensor in example]
        step_s = []
        for _ in range(args.steps + 1):  # the first also builds kernels: not in the median
            started = time.perf_counter()
            request.infer(inputs)
            step_s.append(time.perf_counter() - started)
        profile = request.get_profiling_info()  # the last step's

    by_type: dict[str, float] = collections.defaultdict(float)
    by_kernel: dict[str, float] = collections.defaultdict(float)
    flop_by_type: dict[str, float] = collections.defaultdict(float)
    nodes = []
    counted: set[str] = set()  # a module's FLOPs go to its first heavy node (the rest are fused pieces)
    for info in profile:
        seconds = info.real_time.total_seconds()
        by_type[info.node_type] += seconds
        by_kernel[f"{info.node_type} {info.exec_type}"] += seconds
        path = module_path(info.node_name)
        node_flop = 0.0
        if info.node_type in ("Convolution", "FullyConnected", "MatMul", "Subgraph", "ScaledDotProductAttention") \
                and path in flops and path not in counted:
            node_flop = flops[path]
            counted.add(path)
        flop_by_type[info.node_type] += node_flop
        nodes.append({"node": info.node_name, "type": info.node_type, "kernel": info.exec_type, "s": seconds,
                      "gflop_s": node_flop / seconds / 1e9 if node_flop and seconds else None})
    total = sum(by_type.values())
    header = {"cpu": cpu.model_name, "flags": list(cpu.relevant_flags), "physical_cores": cpu.physical_cores,
              "threads": args.threads or "default", "precision": args.precision, "size": args.size,
              "convert_s": round(convert_s, 1), "s_per_step": round(statistics.median(step_s[1:]), 3),
              "first_step_s": round(step_s[0], 3), "profiled_s": round(total, 3),
              "graph_gflop": round(sum(flops.values()) / 1e9, 1),
              "gflop_by_op": {kind: round(flop / 1e9, 6) for kind, flop in flops_by_kind.items()}}
    print(f"CPU: {cpu.model_name}; flags: {' '.join(cpu.relevant_flags)}; threads {header['threads']}; "
          f"hint {args.precision}; {args.size}x{args.size}, batch 2")
    print(f"step {header['s_per_step']} s (median of {args.steps}), profiled sum {total:.3f} s; "
          f"conv+matmul {header['graph_gflop']} GFLOP -> {sum(flops.values()) / header['s_per_step'] / 1e9:.0f} GFLOP/s overall")
    print(f"\n{'node type':28s} {'s':>7s} {'share':>6s} {'GFLOP/s':>8s}")
    rows_type = []
    for kind, seconds in sorted(by_type.items(), key=lambda kv: -kv[1]):
        if seconds < 0.005 * total:
            continue
        rate = flop_by_type[kind] / seconds / 1e9 if flop_by_type[kind] else None
        rows_type.append({"type": kind, "s": round(seconds, 4), "share": round(seconds / total, 4),
                          "gflop_s": round(rate) if rate else None})
        print(f"{kind:28s} {seconds:7.3f} {100 * seconds / total:5.1f}% {f'{rate:8.0f}' if rate else '':>8s}")
    print(f"\n{'kernel':50s} {'s':>7s} {'share':>6s}")
    rows_kernel = []
    for kernel, seconds in sorted(by_kernel.items(), key=lambda kv: -kv[1])[: args.top]:
        rows_kernel.append({"kernel": kernel, "s": round(seconds, 4), "share": round(seconds / total, 4)})
        print(f"{kernel:50s} {seconds:7.3f} {100 * seconds / total:5.1f}%")
    print("\nslowest nodes")
    slowest = sorted(nodes, key=lambda node: -node["s"])[: args.top]
    for node in slowest:
        rate = f"{node['gflop_s']:.0f} GFLOP/s" if node["gflop_s"] else ""
        print(f"{node['s']:7.3f} {node['type']:16s} {rate:>14s}  {node['node'][:88]}")
    if args.json:
        Path(args.json).write_text(json.dumps({**header, "by_type": rows_type, "by_kernel": rows_kernel,
                                               "slowest": slowest}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
