"""FLUX LoRA files in the diffusers and kohya (BFL names, fused qkv) layouts, merged by huabi, against
PEFT's own merge of the same adapter; restore gives the base weights back bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from flow_fixtures import tiny_flux
from huabi.errors import HuabiError
from huabi.models.flow_lora import FlowLoraPatch, lora_deltas
from huabi.models.transformer_families import TransformerFamily as F

RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def adapter():
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    base = tiny_flux(F.FLUX_DEV)
    with_lora = copy.deepcopy(base)
    with_lora.add_adapter(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["to_q", "to_k", "to_v", "add_q_proj",
                                                                                     "add_k_proj", "add_v_proj", "proj_mlp"]))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in with_lora.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    lora_sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(with_lora).items()}
    from peft.tuners.lora import LoraLayer

    for module in with_lora.modules():
        if isinstance(module, LoraLayer):
            module.merge()  # PEFT's own merge: W + (alpha / r) * B @ A
    merged = {k.replace("base_layer.", ""): v.detach().clone() for k, v in with_lora.state_dict().items() if "lora_" not in k}
    return base, lora_sd, merged


def _kohya(lora_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same adapter as kohya's FLUX layout: fused q/k/v modules (down stacked, up block-diagonal)."""
    out: dict[str, torch.Tensor] = {}

    def put(name: str, parts: list[str], block: str):
        downs = [lora_sd[f"{block}.{p}.lora_A.weight"] for p in parts]
        ups = [lora_sd[f"{block}.{p}.lora_B.weight"] for p in parts]
        out[f"lora_unet_{name}.lora_down.weight"] = torch.cat(downs)
        out[f"lora_unet_{name}.lora_up.weight"] = torch.block_diag(*ups)
        out[f"lora_unet_{name}.alpha"] = torch.tensor(ALPHA * len(parts))

    put("double_blocks_0_img_attn_qkv", ["to_q", "to_k", "to_v"], "transformer_blocks.0.attn")
    put("double_blocks_0_txt_attn_qkv", ["add_q_proj", "add_k_proj", "add_v_proj"], "transformer_blocks.0.attn")
    # single block: linear1 fuses q, k, v and the MLP input
    block = "single_transformer_blocks.0"
    parts = [f"{block}.attn.to_q", f"{block}.attn.to_k", f"{block}.attn.to_v", f"{block}.proj_mlp"]
    out["lora_unet_single_blocks_0_linear1.lora_down.weight"] = torch.cat([lora_sd[p + ".lora_A.weight"] for p in parts])
    out["lora_unet_single_blocks_0_linear1.lora_up.weight"] = torch.block_diag(*[lora_sd[p + ".lora_B.weight"] for p in parts])
    out["lora_unet_single_blocks_0_linear1.alpha"] = torch.tensor(ALPHA * 4)
    out["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(RANK, 32)  # text-encoder part: skipped
    out["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(32, RANK)
    return out


def _diffusers_layout(lora_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"transformer." + k: v for k, v in lora_sd.items()}
    for key in lora_sd:
        if key.endswith(".lora_A.weight"):
            out["transformer." + key.replace(".lora_A.weight", ".alpha")] = torch.tensor(ALPHA)
    return out


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_merged_weights_equal_peft_merge_and_restore_is_exact(adapter, layout):
    base, lora_sd, merged = adapter
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    file_sd = _diffusers_layout(lora_sd) if layout == "diffusers" else _kohya(lora_sd)
    deltas, report = lora_deltas(file_sd, F.FLUX_DEV, model)
    assert report.skipped_text_encoder == (1 if layout == "kohya" else 0)
    patch = FlowLoraPatch(model)
    patch.apply(deltas)
    after = model.state_dict()
    changed = 0
    for key, value in merged.items():
        assert torch.allclose(after[key], value, atol=1e-5), key
        changed += not torch.equal(before[key], value)
    assert changed >= 7
    patch.restore()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_lora_for_another_model_is_a_one_line_error(adapter):
    base, _, _ = adapter
    with pytest.raises(HuabiError, match="does not match a FLUX.1 dev transformer weight"):
        lora_deltas({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 8),
                     "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(8, 4)}, F.FLUX_DEV, base, source="sd15.safetensors")
