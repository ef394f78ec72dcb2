"""``huabi merge-lora`` against independent references (issue 22).

The older merge-lora test compares the written file with the engine's own patched weights (the same
LoraPatcher and the same save/load tables both ways). Here:

* diffusers: the base loaded into a ``StableDiffusionPipeline``, both LoRAs through
  ``load_lora_weights`` + ``set_adapters`` (per-component weights for the second) + ``fuse_lora``;
  every UNet and text-encoder weight of the merged file (as huabi loads it) against diffusers' fused
  weights: 1e-6 absolute, as the other LoRA-vs-diffusers tests.
* By hand, on the raw files: kohya's rule ``W' = W + weight * (alpha / rank) * up @ down`` (convs
  flattened to matrices and reshaped) summed over the LoRAs, read with safetensors straight from the
  base file, the LoRA files and the merged file, for modules whose names map by the published SD1
  layout (``down_blocks.0.attentions.0`` is ``input_blocks.1.1``; the text encoder keeps its names
  under ``cond_stage_model.transformer.``). Same float32 sums in another order: 1e-6 absolute.
* A LoRA given without a weight merges at weight 1 (as ``<lora:name>`` does).

Measured on the tiny SD1 model: 6.0e-8 (diffusers), 0 (by hand), the largest change of a weight 0.6.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from huabi.cli.main import main
from huabi.models.load import load_model
from test_lora import ALPHA, RANK, _diffusers_pipe, all_tensors, kohya_lora_state_dict, max_difference, write_lora

FIRST_WEIGHT = 0.8
SECOND_TE, SECOND_UNET = -0.4, 0.6

# kohya module name -> the original single-file weight it changes (SD1's published layout).
HAND_MAPPED = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q":
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight",
    "lora_unet_down_blocks_0_attentions_0_proj_in": "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
}


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_sd1_file):
    """(base file, models dir, merged file) for ``first:0.8 second:-0.4:0.6``."""
    root = tmp_path_factory.mktemp("merge")
    bundle = load_model(tiny_sd1_file, compute_hash=False)
    write_lora(root / "Lora" / "first.safetensors", kohya_lora_state_dict(bundle, seed=21, scale=0.3))
    write_lora(root / "Lora" / "second.safetensors", kohya_lora_state_dict(bundle, seed=22, scale=0.3))
    out = root / "merged.safetensors"
    code = main(["merge-lora", str(tiny_sd1_file), f"first:{FIRST_WEIGHT}", f"second:{SECOND_TE}:{SECOND_UNET}",
                 "--out", str(out), "--models-dir", str(root)])
    assert code == 0
    return tiny_sd1_file, root, out


def test_merged_file_equals_diffusers_fuse_lora(merged):
    base_file, root, out = merged
    ours = load_model(out, compute_hash=False)
    theirs = load_model(base_file, compute_hash=False)
    pipe = _diffusers_pipe(theirs)
    pipe.load_lora_weights(str(root / "Lora" / "first.safetensors"), adapter_name="first")
    pipe.load_lora_weights(str(root / "Lora" / "second.safetensors"), adapter_name="second")
    pipe.set_adapters(["first", "second"],
                      adapter_weights=[FIRST_WEIGHT, {"text_encoder": SECOND_TE, "unet": SECOND_UNET}])
    pipe.fuse_lora(adapter_names=["first", "second"])
    pipe.unload_lora_weights()
    expected = all_tensors(theirs)
    difference = max_difference(all_tensors(ours), expected)
    base = all_tensors(load_model(base_file, compute_hash=False))
    changed = max((expected[k] - base[k]).abs().max().item() for k in expected)
    print(f"merge-lora vs diffusers fuse_lora: max difference {difference:.2e} (largest change {changed:.2e})")
    assert changed > 1e-2  # the LoRAs really change the weights
    assert difference < 1e-6


def _raw(path, key: str) -> torch.Tensor:
    with safe_open(str(path), "pt") as handle:
        return handle.get_tensor(key).float()


def _kohya_change(lora_file, module: str) -> torch.Tensor:
    """``(alpha / rank) * up @ down`` of one module, convs as matrices, in the up's output shape."""
    down, up = _raw(lora_file, f"{module}.lora_down.weight"), _raw(lora_file, f"{module}.lora_up.weight")
    alpha = _raw(lora_file, f"{module}.alpha").item()
    rank = down.shape[0]
    assert (alpha, rank) == (ALPHA, RANK)
    return (alpha / rank) * (up.flatten(1) @ down.flatten(1))


@pytest.mark.parametrize("module", sorted(HAND_MAPPED))
def test_merged_file_follows_kohyas_rule_on_the_raw_files(merged, module):
    base_file, root, out = merged
    key = HAND_MAPPED[module]
    base = _raw(base_file, key)
    second_weight = SECOND_TE if module.startswith("lora_te_") else SECOND_UNET
    change = (FIRST_WEIGHT * _kohya_change(root / "Lora" / "first.safetensors", module)
              + second_weight * _kohya_change(root / "Lora" / "second.safetensors", module))
    expected = base + change.reshape(base.shape)
    got = _raw(out, key)
    difference = (got - expected).abs().max().item()
    print(f"{key}: max |merged - hand| = {difference:.2e}, change {change.abs().max():.2e}")
    assert change.abs().max() > 1e-2
    assert difference < 1e-6


def test_a_lora_without_weight_merges_at_weight_one(merged, tmp_path):
    base_file, root, _ = merged
    out = tmp_path / "plain.safetensors"
    assert main(["merge-lora", str(base_file), "first", "--out", str(out), "--models-dir", str(root)]) == 0
    module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    key = HAND_MAPPED[module]
    expected = _raw(base_file, key) + _kohya_change(root / "Lora" / "first.safetensors", module)
    assert (_raw(out, key) - expected).abs().max().item() < 1e-6
