"""LoRA / LyCORIS files: parsing, name mapping onto huabi's modules, deltas, errors, hashes.

Equivalence with diffusers' own loader (an independent implementation): a
kohya-format LoRA built here from random low-rank weights (alpha != rank, UNet
attention/projection/feed-forward layers and every text-encoder layer) is
applied by huabi and by ``pipe.load_lora_weights`` + ``fuse_lora`` on a second
copy of the same tiny model. Measured: every UNet and text-encoder tensor is
identical (max abs difference 0.0) for SD1 and SDXL; asserted below 1e-6.
With diffusers' *unfused* peft layers running the sampler (Euler/Karras, 5 steps,
CFG 6.5), the latents differ from huabi's by 1.8e-6 relative to the largest
latent (float32 rounding of W x + s B A x against (W + s B A) x); asserted
below 2e-5 as for the plain txt2img comparison. A peft-format file written by
diffusers' own ``save_lora_weights`` patches the same weights as the kohya file
it came from (difference 0.0).
LyCORIS types (LoCon, LoCon CP, LoHa, LoHa CP, LoKr, LoKr CP, full diff) are
checked against their formulas written out element by element on small tensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from huabi.errors import HuabiError
from huabi.models.convert import unet_key_table
from huabi.models.family import ModelFamily
from huabi.models.load import load_model
from huabi.models.lora import (
    LoraModule,
    lora_short_hash,
    model_targets,
    module_delta,
    read_lora_file,
    resolve_lora,
)
from huabi.service.adapters import LoraPatcher, LoraUse

RANK = 4
ALPHA = 2.0  # scale alpha / rank = 0.5, so a missing alpha would show


def _original_unet_name(unet, name: str) -> str:
    table = {d: o for o, d in unet_key_table(unet.config)}
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            return ".".join([table[prefix], *parts[cut:]])
    raise KeyError(name)


def kohya_lora_state_dict(bundle, *, seed: int = 0, scale: float = 0.1, unet_layout: str | None = None,
                          text_encoders: bool = True, conv: bool = False) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA for ``bundle`` as kohya's trainer names it: diffusers UNet names for
    SD1, original (LDM) names for SDXL; ``lora_te_`` / ``lora_te1_``+``lora_te2_`` with ``text_model``."""
    generator = torch.Generator().manual_seed(seed)
    layout = unet_layout or ("original" if bundle.family is ModelFamily.SDXL else "diffusers")
    tensors: dict[str, torch.Tensor] = {}

    def add(key: str, down_shape: tuple, up_shape: tuple) -> None:
        tensors[key + ".lora_down.weight"] = torch.randn(down_shape, generator=generator) * scale
        tensors[key + ".lora_up.weight"] = torch.randn(up_shape, generator=generator) * scale
        tensors[key + ".alpha"] = torch.tensor(ALPHA)

    for name, module in bundle.unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        unet_name = name if layout == "diffusers" else _original_unet_name(bundle.unet, name)
        key = "lora_unet_" + unet_name.replace(".", "_")
        if isinstance(module, torch.nn.Linear) and any(part in name for part in ("attn", "proj", "ff.net")):
            add(key, (RANK, module.in_features), (module.out_features, RANK))
        elif isinstance(module, torch.nn.Conv2d) and name.endswith(("proj_in", "proj_out")):
            add(key, (RANK, module.in_channels, 1, 1), (module.out_channels, RANK, 1, 1))
        elif conv and isinstance(module, torch.nn.Conv2d) and "resnets" in name and name.endswith("conv1"):
            kernel = module.kernel_size
            add(key, (RANK, module.in_channels, *kernel), (module.out_channels, RANK, 1, 1))
    if text_encoders:
        prefixes = ["lora_te1", "lora_te2"] if len(bundle.text_encoders) == 2 else ["lora_te"]
        for prefix, encoder in zip(prefixes, bundle.text_encoders):
            for name, module in encoder.named_modules():
                if isinstance(module, torch.nn.Linear) and ("self_attn" in name or "mlp" in name):
                    full = name if name.startswith("text_model.") else "text_model." + name
                    add(f"{prefix}_{full.replace('.', '_')}", (RANK, module.in_features), (module.out_features, RANK))
    return tensors


def write_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def all_tensors(bundle) -> dict[str, torch.Tensor]:
    tensors = {f"unet.{k}": v for k, v in bundle.unet.state_dict().items()}
    for index, encoder in enumerate(bundle.text_encoders):
        tensors.update({f"te{index}.{k}": v for k, v in encoder.state_dict().items()})
    return tensors


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def sd1_bundle(tiny_sd1_file):
    return load_model(tiny_sd1_file, compute_hash=False)


@pytest.fixture(scope="module")
def sdxl_bundle(tiny_sdxl_file):
    return load_model(tiny_sdxl_file, compute_hash=False)


def _diffusers_pipe(bundle):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       use_karras_sigmas=True)
    if bundle.family is ModelFamily.SDXL:
        pipe = StableDiffusionXLPipeline(
            vae=bundle.vae, text_encoder=bundle.text_encoders[0], text_encoder_2=bundle.text_encoders[1],
            tokenizer=bundle.tokenizers[0], tokenizer_2=bundle.tokenizers[1], unet=bundle.unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(
            vae=bundle.vae, text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0], unet=bundle.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- vs diffusers


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_lora_matches_diffusers_load_lora_weights(family, tiny_model_factory, tmp_path):
    model_file = tiny_model_factory(ModelFamily(family))
    ours = load_model(model_file, compute_hash=False)
    theirs = load_model(model_file, compute_hash=False)
    base = {k: v.clone() for k, v in all_tensors(ours).items()}
    lora_path = write_lora(tmp_path / "style.safetensors", kohya_lora_state_dict(ours))

    patcher = LoraPatcher()
    active = patcher.activate(ours, [LoraUse("style", lora_path)])
    assert active.infotext_hashes == f"style: {lora_short_hash(lora_path)}"

    pipe = _diffusers_pipe(theirs)
    pipe.load_lora_weights(str(lora_path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, drops the peft layers
    difference = max_difference(all_tensors(ours), all_tensors(theirs))
    print(f"{family}: max |huabi - diffusers| = {difference:.2e}")
    assert difference < 1e-6
    changed = [k for k, v in all_tensors(ours).items() if not torch.equal(v, base[k])]
    assert any(k.startswith("unet.") for k in changed) and any(k.startswith("te0.") for k in changed)
    if family == "sdxl":
        assert any(k.startswith("te1.") for k in changed)

    patcher.restore()
    for key, tensor in all_tensors(ours).items():
        assert torch.equal(tensor, base[key]), key


def test_kohya_lora_image_matches_diffusers_unfused(tiny_sd1_file, tmp_path):
    """The sampler driven by diffusers' own (unfused, peft) LoRA layers gives huabi's latents."""
    from test_txt2img_vs_diffusers import NEGATIVE, RELATIVE_TOLERANCE, diffusers_latents, huabi_latents, relative_difference

    ours = load_model(tiny_sd1_file, compute_hash=False)
    theirs = load_model(tiny_sd1_file, compute_hash=False)
    lora_path = write_lora(tmp_path / "style.safetensors", kohya_lora_state_dict(ours, scale=0.2))
    plain = huabi_latents(ours, "Euler", "Karras", NEGATIVE)
    LoraPatcher().activate(ours, [LoraUse("style", lora_path)])
    with_lora = huabi_latents(ours, "Euler", "Karras", NEGATIVE)
    pipe = _diffusers_pipe(theirs)
    pipe.load_lora_weights(str(lora_path))
    reference = diffusers_latents(pipe, theirs, NEGATIVE)
    difference = relative_difference(with_lora, reference)
    print(f"relative difference vs diffusers (unfused LoRA): {difference:.2e}")
    assert difference < RELATIVE_TOLERANCE
    assert relative_difference(plain, reference) > 100 * RELATIVE_TOLERANCE  # the LoRA really changed the image


def test_peft_format_written_by_diffusers_gives_the_same_weights(sd1_bundle, tiny_sd1_file, tmp_path):
    """diffusers converts our kohya file and saves it in its own peft format; huabi reads that file back."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    kohya = write_lora(tmp_path / "kohya.safetensors", kohya_lora_state_dict(sd1_bundle, seed=3))
    carrier = load_model(tiny_sd1_file, compute_hash=False)
    pipe = _diffusers_pipe(carrier)
    pipe.load_lora_weights(str(kohya), adapter_name="style")
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "peft",
        unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="style"),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, adapter_name="style"),
        unet_lora_adapter_metadata=pipe.unet.peft_config["style"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["style"].to_dict(),
    )
    peft_path = tmp_path / "peft" / "pytorch_lora_weights.safetensors"
    parsed = read_lora_file(peft_path)
    assert parsed.format == "diffusers"
    assert all(key.startswith(("unet.", "text_encoder.")) for key in (m.key for m in parsed.modules))

    def patched(path: Path) -> dict[str, torch.Tensor]:
        bundle = load_model(tiny_sd1_file, compute_hash=False)
        LoraPatcher().activate(bundle, [LoraUse(path.stem, path)])
        return all_tensors(bundle)

    difference = max_difference(patched(kohya), patched(peft_path))
    print(f"kohya vs diffusers-written peft file: {difference:.2e}")
    assert difference < 1e-6


def test_old_diffusers_attention_processor_names(sd1_bundle, tmp_path):
    """``unet...attn1.processor.to_q_lora.down.weight`` and ``text_encoder...q_proj.lora_linear_layer``."""
    generator = torch.Generator().manual_seed(5)
    q = sd1_bundle.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    te_q = sd1_bundle.text_encoders[0].encoder.layers[0].self_attn.q_proj
    prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora"
    te_prefix = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer"
    tensors = {
        f"{prefix}.down.weight": torch.randn(RANK, q.in_features, generator=generator),
        f"{prefix}.up.weight": torch.randn(q.out_features, RANK, generator=generator),
        f"{te_prefix}.down.weight": torch.randn(RANK, te_q.in_features, generator=generator),
        f"{te_prefix}.up.weight": torch.randn(te_q.out_features, RANK, generator=generator),
    }
    # Old processor keys spell the parameter as ``to_q_lora.down.weight``; normalise to ``to_q.lora.down``.
    path = write_lora(tmp_path / "old.safetensors", tensors)
    base_q, base_te = q.weight.detach().clone(), te_q.weight.detach().clone()
    patcher = LoraPatcher()
    patcher.activate(sd1_bundle, [LoraUse("old", path, te_weight=0.5, unet_weight=2.0)])
    try:
        expected_q = base_q + 2.0 * tensors[f"{prefix}.up.weight"] @ tensors[f"{prefix}.down.weight"]
        expected_te = base_te + 0.5 * tensors[f"{te_prefix}.up.weight"] @ tensors[f"{te_prefix}.down.weight"]
        torch.testing.assert_close(q.weight.detach(), expected_q, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(te_q.weight.detach(), expected_te, rtol=1e-6, atol=1e-5)
    finally:
        patcher.restore()
    assert torch.equal(q.weight, base_q) and torch.equal(te_q.weight, base_te)


# --------------------------------------------------------------------------- LyCORIS formulas


def _module(params: dict, alpha: float | None = None) -> LoraModule:
    return LoraModule("lora_unet_x", "unet", "x", params, alpha)


def test_locon_conv_delta_is_up_times_down_reshaped():
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(3, 5, 3, 3, generator=g), torch.randn(7, 3, 1, 1, generator=g)
    delta, bias, scale = module_delta(_module({"lora_down.weight": down, "lora_up.weight": up}, alpha=1.5), (7, 5, 3, 3))
    expected = torch.zeros(7, 5, 3, 3)
    for o in range(7):
        for r in range(3):
            expected[o] += up[o, r, 0, 0] * down[r]
    torch.testing.assert_close(delta, expected)
    assert bias is None and scale == pytest.approx(1.5 / 3)


def test_locon_cp_delta():
    g = torch.Generator().manual_seed(2)
    down, mid, up = torch.randn(3, 5, 1, 1, generator=g), torch.randn(3, 3, 3, 3, generator=g), torch.randn(7, 3, 1, 1, generator=g)
    delta, _, _ = module_delta(_module({"lora_down.weight": down, "lora_up.weight": up, "lora_mid.weight": mid}), (7, 5, 3, 3))
    expected = torch.zeros(7, 5, 3, 3)
    for o in range(7):
        for i in range(5):
            for a in range(3):
                for b in range(3):
                    expected[o, i] += up[o, a, 0, 0] * mid[a, b] * down[b, i, 0, 0]
    torch.testing.assert_close(delta, expected)


def test_loha_delta_is_hadamard_of_two_low_rank_products():
    g = torch.Generator().manual_seed(3)
    w1a, w1b = torch.randn(6, 2, generator=g), torch.randn(2, 4, generator=g)
    w2a, w2b = torch.randn(6, 2, generator=g), torch.randn(2, 4, generator=g)
    params = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}
    delta, _, scale = module_delta(_module(params, alpha=1.0), (6, 4))
    expected = torch.tensor([[sum(w1a[o, r] * w1b[r, i] for r in range(2)) * sum(w2a[o, r] * w2b[r, i] for r in range(2))
                              for i in range(4)] for o in range(6)])
    torch.testing.assert_close(delta, expected)
    assert scale == pytest.approx(0.5)


def test_loha_cp_delta():
    g = torch.Generator().manual_seed(4)
    rank, out_ch, in_ch = 2, 5, 3
    params = {}
    for index in (1, 2):
        params[f"hada_t{index}"] = torch.randn(rank, rank, 3, 3, generator=g)
        params[f"hada_w{index}_a"] = torch.randn(rank, out_ch, generator=g)  # CP form: (rank, out)
        params[f"hada_w{index}_b"] = torch.randn(rank, in_ch, generator=g)  # (rank, in)
    delta, _, _ = module_delta(_module(params), (out_ch, in_ch, 3, 3))

    def rebuild(t, a, b):
        result = torch.zeros(out_ch, in_ch, 3, 3)
        for o in range(out_ch):
            for i in range(in_ch):
                for p in range(rank):
                    for q in range(rank):
                        result[o, i] += t[p, q] * a[p, o] * b[q, i]
        return result

    expected = rebuild(params["hada_t1"], params["hada_w1_a"], params["hada_w1_b"]) * rebuild(
        params["hada_t2"], params["hada_w2_a"], params["hada_w2_b"])
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decomposed", [False, True])
def test_lokr_delta_is_kronecker_product(decomposed):
    g = torch.Generator().manual_seed(5)
    w1 = torch.randn(2, 3, generator=g)
    if decomposed:
        w2a, w2b = torch.randn(4, 2, generator=g), torch.randn(2, 5, generator=g)
        params, w2, alpha = {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b}, w2a @ w2b, 1.0
    else:
        w2 = torch.randn(4, 5, generator=g)
        params, alpha = {"lokr_w1": w1, "lokr_w2": w2}, 8.0
    delta, _, scale = module_delta(_module(params, alpha=alpha), (8, 15))
    expected = torch.zeros(8, 15)
    for i in range(2):
        for j in range(3):
            expected[i * 4:(i + 1) * 4, j * 5:(j + 1) * 5] = w1[i, j] * w2
    torch.testing.assert_close(delta, expected)
    # alpha / rank only when a factor is low-rank; full factors have no rank (scale 1, as A1111)
    assert scale == pytest.approx(0.5 if decomposed else 1.0)


def test_lokr_conv_with_cp_core():
    g = torch.Generator().manual_seed(6)
    w1 = torch.randn(2, 2, generator=g)
    t2, w2a, w2b = torch.randn(2, 2, 3, 3, generator=g), torch.randn(2, 3, generator=g), torch.randn(2, 4, generator=g)
    delta, _, _ = module_delta(_module({"lokr_w1": w1, "lokr_t2": t2, "lokr_w2_a": w2a, "lokr_w2_b": w2b}), (6, 8, 3, 3))
    w2 = torch.einsum("pqkl,po,qi->oikl", t2, w2a, w2b)
    expected = torch.zeros(6, 8, 3, 3)
    for i in range(2):
        for j in range(2):
            expected[i * 3:(i + 1) * 3, j * 4:(j + 1) * 4] = w1[i, j] * w2
    torch.testing.assert_close(delta, expected)


def test_full_diff_with_bias(sd1_bundle, tmp_path):
    proj = sd1_bundle.unet.down_blocks[0].attentions[0].proj_in  # a 1x1 conv in SD1
    g = torch.Generator().manual_seed(7)
    diff, diff_b = torch.randn(proj.weight.shape, generator=g), torch.randn(proj.bias.shape, generator=g)
    path = write_lora(tmp_path / "full.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.diff": diff,
        "lora_unet_down_blocks_0_attentions_0_proj_in.diff_b": diff_b,
    })
    base_w, base_b = proj.weight.detach().clone(), proj.bias.detach().clone()
    patcher = LoraPatcher()
    patcher.activate(sd1_bundle, [LoraUse("full", path, unet_weight=0.5)])
    try:
        torch.testing.assert_close(proj.weight.detach(), base_w + 0.5 * diff)
        torch.testing.assert_close(proj.bias.detach(), base_b + 0.5 * diff_b)
    finally:
        patcher.restore()
    assert torch.equal(proj.weight, base_w) and torch.equal(proj.bias, base_b)


def test_locon_on_resnet_convs_and_both_unet_layouts(sd1_bundle, tmp_path):
    """kohya names the SD1 UNet after diffusers modules, SDXL after the original ones; both are
    accepted for any family and land on the same weights."""
    tensors = kohya_lora_state_dict(sd1_bundle, text_encoders=False, conv=True, seed=8)
    renamed = {}
    for key, value in tensors.items():
        module, _, param = key.partition(".")
        diffusers_name = module[len("lora_unet_"):]
        # back to dotted diffusers name via the model's own module list
        dotted = next(n for n, _ in sd1_bundle.unet.named_modules() if n.replace(".", "_") == diffusers_name)
        renamed["lora_unet_" + _original_unet_name(sd1_bundle.unet, dotted).replace(".", "_") + "." + param] = value
    diffusers_file = write_lora(tmp_path / "a.safetensors", tensors)
    original_file = write_lora(tmp_path / "b.safetensors", renamed)
    results = []
    for path in (diffusers_file, original_file):
        patcher = LoraPatcher()
        patcher.activate(sd1_bundle, [LoraUse(path.stem, path)])
        results.append({k: v.clone() for k, v in sd1_bundle.unet.state_dict().items()})
        patcher.restore()
    assert max_difference(*results) == 0
    conv1 = sd1_bundle.unet.down_blocks[0].resnets[0].conv1.weight
    assert not torch.equal(results[0]["down_blocks.0.resnets.0.conv1.weight"], conv1)


# --------------------------------------------------------------------------- errors


def test_lora_matching_nothing_names_the_first_keys(sd1_bundle, tmp_path):
    path = write_lora(tmp_path / "none.safetensors", {
        "lora_unet_not_a_module.lora_down.weight": torch.zeros(2, 4),
        "lora_unet_not_a_module.lora_up.weight": torch.zeros(4, 2),
        "some.other.tensor": torch.zeros(1),
    })
    with pytest.raises(HuabiError, match=r"LoRA 'none' matches nothing in .*2 unmatched keys, e\.g\. "
                                         r"lora_unet_not_a_module, some\.other\.tensor"):
        LoraPatcher().activate(sd1_bundle, [LoraUse("none", path)])


def test_partly_unmatched_lora_warns_with_counts(sd1_bundle, tmp_path, caplog):
    tensors = kohya_lora_state_dict(sd1_bundle, text_encoders=False)
    tensors["lora_unet_extra_module.lora_down.weight"] = torch.zeros(2, 4)
    tensors["lora_unet_extra_module.lora_up.weight"] = torch.zeros(4, 2)
    matched = len({k.split(".")[0] for k in tensors}) - 1
    path = write_lora(tmp_path / "partial.safetensors", tensors)
    patcher = LoraPatcher()
    with caplog.at_level(logging.WARNING, logger="huabi.lora"):
        patcher.activate(sd1_bundle, [LoraUse("partial", path)])
    patcher.restore()
    assert f"LoRA 'partial': 1 of {matched + 1} modules match nothing in this model (e.g. lora_unet_extra_module); " \
           f"applied the other {matched}" in caplog.text


def test_sdxl_lora_on_sd1_and_sd1_lora_on_sdxl_are_refused(sd1_bundle, sdxl_bundle, tmp_path):
    sdxl_lora = write_lora(tmp_path / "xl.safetensors", kohya_lora_state_dict(sdxl_bundle))
    sd1_lora = write_lora(tmp_path / "one.safetensors", kohya_lora_state_dict(sd1_bundle))
    before = {k: v.clone() for k, v in all_tensors(sd1_bundle).items()}
    with pytest.raises(HuabiError, match=r"^LoRA 'xl' is an SDXL LoRA; model 'tiny_sd1.*' is SD1$"):
        LoraPatcher().activate(sd1_bundle, [LoraUse("xl", sdxl_lora)])
    with pytest.raises(HuabiError, match=r"^LoRA 'one' is an SD1/SD2 LoRA \(its text-encoder keys are lora_te_\*, "
                                         r"one encoder\); model 'tiny_sdxl.*' is SDXL$"):
        LoraPatcher().activate(sdxl_bundle, [LoraUse("one", sd1_lora)])
    assert all(torch.equal(v, before[k]) for k, v in all_tensors(sd1_bundle).items())


def test_unet_only_sdxl_lora_on_sd1_is_a_shape_error(sd1_bundle, sdxl_bundle, tmp_path):
    # No text-encoder keys to tell; the cross-attention widths do (128 vs 64 in the tiny models).
    tensors = kohya_lora_state_dict(sdxl_bundle, text_encoders=False, unet_layout="diffusers")
    path = write_lora(tmp_path / "xlunet.safetensors", tensors)
    with pytest.raises(HuabiError, match=r"^LoRA 'xlunet' does not fit model 'tiny_sd1.*' \(SD1\): lora_unet_\S+ makes "
                                         r"a \(\d+, \d+\) change for a \(\d+, \d+\) weight$"):
        LoraPatcher().activate(sd1_bundle, [LoraUse("xlunet", path)])


def test_metadata_family_is_checked(sd1_bundle, tmp_path):
    tensors = kohya_lora_state_dict(sd1_bundle, text_encoders=False)
    path = write_lora(tmp_path / "tagged.safetensors", tensors, {"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(HuabiError, match=r"LoRA 'tagged' is an SDXL LoRA; model .* is SD1"):
        LoraPatcher().activate(sd1_bundle, [LoraUse("tagged", path)])


def test_unsupported_network_type_is_named(sd1_bundle, tmp_path):
    path = write_lora(tmp_path / "ia3.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1.0),
        "lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale": torch.ones(32, 1),
    })
    with pytest.raises(HuabiError, match=r"LoRA 'ia3': module lora_unet_down_blocks_0_attentions_0_proj_in has "
                                         r"parameters \(dora_scale\) of a network type huabi does not support"):
        LoraPatcher().activate(sd1_bundle, [LoraUse("ia3", path)])


def test_truncated_lora_file_is_an_error(tmp_path):
    path = write_lora(tmp_path / "cut.safetensors", {"lora_unet_a.lora_down.weight": torch.zeros(64, 64)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(HuabiError, match=r"cut\.safetensors: truncated safetensors file"):
        read_lora_file(path)


# --------------------------------------------------------------------------- hashes


def test_lora_hash_is_a1111_autov3(tmp_path):
    tensors = {"lora_unet_a.lora_down.weight": torch.arange(8.0).reshape(2, 4)}
    first = write_lora(tmp_path / "a.safetensors", tensors, {"ss_output_name": "a"})
    second = write_lora(tmp_path / "b.safetensors", tensors, {"ss_output_name": "something longer"})
    data = first.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    assert lora_short_hash(first) == hashlib.sha256(data[8 + header_len:]).hexdigest()[:12]
    # AutoV3 ignores the header: metadata edits keep the hash, the full-file hash changes.
    assert lora_short_hash(first) == lora_short_hash(second)
    assert hashlib.sha256(first.read_bytes()).hexdigest() != hashlib.sha256(second.read_bytes()).hexdigest()
    # kohya records its own hash; A1111 prefers it.
    third = write_lora(tmp_path / "c.safetensors", tensors, {"sshs_model_hash": "0123456789abcdef" * 4})
    assert lora_short_hash(third, read_lora_file(third).metadata) == "0123456789ab"
    pickled = tmp_path / "d.pt"
    torch.save(tensors, pickled)
    assert lora_short_hash(pickled) == hashlib.sha256(pickled.read_bytes()).hexdigest()[:12]


def test_resolve_lists_matches_per_part(sd1_bundle, tmp_path):
    path = write_lora(tmp_path / "x.safetensors", kohya_lora_state_dict(sd1_bundle))
    lora = read_lora_file(path)
    resolved = resolve_lora(lora, family=sd1_bundle.family,
                            targets=model_targets(sd1_bundle.unet, sd1_bundle.text_encoders), text_encoder_count=1)
    assert not resolved.unmatched
    assert {target.part for _, target in resolved.matches} == {"unet", "te0"}
    assert json.dumps(lora.metadata) == "{}"


# --------------------------------------------------------------------------- DoRA, dynamic rank


def _single_target_deltas(module: LoraModule, layer: torch.nn.Module, multiplier: float, dyn_dim=None):
    from huabi.models.lora import ModelTarget, ResolvedLora, lora_deltas

    target = ModelTarget("unet", "layer", layer)
    resolved = ResolvedLora(lora=None, matches=((module, target),), unmatched=())
    [(delta, _bias)] = lora_deltas([(resolved, multiplier, multiplier, dyn_dim)]).values()
    return delta


@pytest.mark.parametrize("side", ["per_input", "per_output"])
def test_dora_renormalises_the_merged_weight(side):
    g = torch.Generator().manual_seed(9)
    layer = torch.nn.Linear(3, 4)
    base = layer.weight.detach().clone()
    down, up = torch.randn(2, 3, generator=g), torch.randn(4, 2, generator=g)
    magnitude = torch.rand(1, 3, generator=g) + 0.5 if side == "per_input" else torch.rand(4, 1, generator=g) + 0.5
    module = _module({"lora_down.weight": down, "lora_up.weight": up, "dora_scale": magnitude}, alpha=1.0)
    delta = _single_target_deltas(module, layer, multiplier=0.5)
    merged = base + 0.5 * (up @ down)  # alpha / rank = 0.5
    expected = torch.zeros(4, 3)
    for o in range(4):
        for i in range(3):
            if side == "per_input":
                norm = sum(merged[r, i] ** 2 for r in range(4)) ** 0.5
                expected[o, i] = merged[o, i] * magnitude[0, i] / norm
            else:
                norm = sum(merged[o, c] ** 2 for c in range(3)) ** 0.5
                expected[o, i] = merged[o, i] * magnitude[o, 0] / norm
    # A1111: the renormalised change is scaled by the tag weight afterwards.
    torch.testing.assert_close(delta, 0.5 * (expected - base))


def test_dyn_uses_the_first_ranks():
    from huabi.core.prompt_parser import ExtraNetworkTag
    from huabi.service.adapters import tag_dyn_dim

    g = torch.Generator().manual_seed(10)
    down, up = torch.randn(4, 3, generator=g), torch.randn(5, 4, generator=g)
    delta, _, scale = module_delta(_module({"lora_down.weight": down, "lora_up.weight": up}, alpha=4.0), (5, 3), dyn_dim=2)
    torch.testing.assert_close(delta, up[:, :2] @ down[:2])
    assert scale == 1.0
    assert tag_dyn_dim(ExtraNetworkTag("lora", "x", (1.0, 1.0, 2.0))) == 2
    assert tag_dyn_dim(ExtraNetworkTag("lora", "x", (1.0,), (("dyn", "3"),))) == 3
    assert tag_dyn_dim(ExtraNetworkTag("lora", "x", (1.0,))) is None
    with pytest.raises(HuabiError, match=r"<lora:x:...> has dyn=0.5; a whole number of ranks from 1 belongs there"):
        tag_dyn_dim(ExtraNetworkTag("lora", "x", (1.0,), (("dyn", "0.5"),)))
