"""Sequential offload of SD3/FLUX transformer blocks (for small CUDA cards). This machine has no GPU:
the moves are CPU -> CPU no-ops, so these tests check only the logic (hooks in run order, one block
resident at a time, identical results, the memory guard's choice); speed and memory on a card are
not measured here."""

from __future__ import annotations

import torch

from flow_fixtures import TinyFlowModel
from huabi.models.flow_load import load_flow_model
from huabi.models.offload import SequentialOffload, transformer_blocks
from huabi.models.transformer_families import TransformerFamily as F
from huabi.pipelines.flow import FlowRequest, flow_generate
from huabi.service.flow_jobs import transformer_block_bytes, with_sequential_offload


def test_blocks_arrive_one_at_a_time_and_results_are_unchanged(tmp_path):
    for family in (F.FLUX_DEV, F.SD3_MEDIUM):
        model = TinyFlowModel(family)
        path = model.write_all_in_one(tmp_path / f"{family.value}.safetensors")
        request = FlowRequest("a red apple", steps=2, width_px=64, height_px=64, max_t5_tokens=16,
                              cfg_scale=1.0 if family.is_flux else 3.0)
        plain = flow_generate(load_flow_model(path), request, [4], decode=False).latents
        bundle = load_flow_model(path, low_memory=True)
        order = []
        for index, block in enumerate(transformer_blocks(bundle.transformer)):
            block.register_forward_pre_hook(lambda _m, _a, i=index: order.append(i))
        bundle = with_sequential_offload(bundle, torch.device("cpu"))
        streamed = flow_generate(bundle, request, [4], decode=False).latents
        assert torch.equal(streamed, plain)
        blocks = len(transformer_blocks(bundle.transformer))
        assert order[:blocks] == list(range(blocks))  # in run order, every block, every step


def test_offload_keeps_at_most_one_block_resident():
    model = TinyFlowModel(F.FLUX_DEV)
    transformer = model.transformer
    offload = SequentialOffload(transformer, compute="cpu")
    seen = []
    for block in offload.blocks:
        block.register_forward_pre_hook(lambda _m, _a: seen.append(set(offload.resident)))
    def run():
        with torch.inference_mode():
            transformer(hidden_states=torch.randn(1, 16, 64), timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                        pooled_projections=torch.randn(1, 32), encoder_hidden_states=torch.randn(1, 8, 32),
                        txt_ids=torch.zeros(8, 3), img_ids=torch.zeros(16, 3), return_dict=False)

    run()
    assert offload.peak_resident == 1 and not offload.resident
    assert offload.moves == 2 * len(offload.blocks)
    assert all(len(now) == 1 for now in seen)
    offload.detach()
    run()
    assert offload.moves == 2 * len(offload.blocks)  # hooks gone


def test_block_sizes_from_the_header_and_the_guard_chooses_offload_only_on_cuda(tmp_path, monkeypatch):
    model = TinyFlowModel(F.FLUX_DEV)
    path = model.write_transformer(tmp_path / "flux.safetensors")
    non_block, largest = transformer_block_bytes(path, torch.float32)
    sizes = {name: value.numel() * 4 for name, value in model.transformer_original().items()}
    double = sum(v for k, v in sizes.items() if k.startswith("double_blocks.0."))
    single = sum(v for k, v in sizes.items() if k.startswith("single_blocks.0."))
    assert largest == max(double, single) and non_block == sum(sizes.values()) - double - single

    import huabi.service.devices as devices
    from huabi.service.flow_jobs import check_flow_memory

    class FakeEngine:
        dtype = torch.float32
        flow_low_memory = False
        flow_offload = False

    engine = FakeEngine()
    engine.device = torch.device("cuda")
    budget = int((non_block + largest) * 1.2)  # less than the transformer, more than one block + the rest
    assert budget < non_block + double + single
    monkeypatch.setattr(devices, "available_memory_bytes", lambda device: max(budget, 1))
    small_parts = {"clip_l": None, "t5xxl": None, "vae": None}  # the transformer alone decides here
    check_flow_memory(engine, path, small_parts)
    assert engine.flow_offload
    import pytest

    from huabi.errors import HuabiError

    cpu = FakeEngine()
    cpu.device = torch.device("cpu")
    with pytest.raises(HuabiError, match="needs about"):
        check_flow_memory(cpu, path, small_parts)
