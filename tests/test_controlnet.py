"""ControlNet: loading (original and diffusers layouts), the sampling-time hook, and
equivalence with diffusers' StableDiffusionControlNetPipeline on a tiny SD1 model.

The tiny ControlNet is ``ControlNetModel.from_unet`` of the tiny UNet with every
weight randomised (zero convolutions included, so the control really matters).
huabi runs the ControlNet loaded from an original-layout file written by
huabi; diffusers runs the module it was built from.  Same prompt, noise,
sigmas (Euler, Karras) and control image: measured
max|ours - theirs| / max|theirs| = see RELATIVE_TOLERANCE below (asserted).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, EulerDiscreteScheduler, StableDiffusionControlNetPipeline
from PIL import Image

from tiny_models import build_tiny_parts, randomize_

from huabi.core.control import ControlMode, ControlUnit, residual_scales
from huabi.errors import HuabiError
from huabi.models.controlnet import (
    controlnet_to_original,
    legacy_model_hash,
    load_controlnet,
    read_controlnet_file,
    save_controlnet_original,
)
from huabi.models.family import ModelFamily
from huabi.models.load import load_model
from huabi.pipelines.common import denoise, encode_guidance, latent_shape
from huabi.pipelines.control import ControlSet, PreparedControl, fit_map
from huabi.core.control import ResizeMode

PROMPT = "a lighthouse on a cliff"
NEGATIVE = "blurry"
SIZE_PX = 64
STEPS = 6
CFG = 6.0
SEED = 77
RELATIVE_TOLERANCE = 2e-5
CPU = torch.device("cpu")


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def make_controlnet(unet, seed: int = 5) -> ControlNetModel:
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    generator = torch.Generator().manual_seed(seed)
    randomize_(controlnet, generator)
    with torch.no_grad():  # randomize_ keeps "embedding" tensors small; the hint encoder needs real scale
        for name, param in controlnet.controlnet_cond_embedding.named_parameters():
            if param.ndim == 4:
                param.copy_(torch.randn(param.shape, generator=generator) / param[0].numel() ** 0.5)
    return controlnet.eval()


def control_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE_PX, SIZE_PX, 3), dtype=np.uint8))


def prepared(model, image: Image.Image, **unit_fields) -> PreparedControl:
    unit = ControlUnit(model="tiny_cn", **unit_fields)
    detected = np.asarray(image, dtype=np.float32) / 255.0
    return PreparedControl(unit, model, detected, "tiny_cn [00000000]")


def huabi_latents(bundle, controls=(), *, sampler="Euler", steps=STEPS, seed=SEED) -> tuple[torch.Tensor, list]:
    guidance = encode_guidance(bundle, PROMPT, NEGATIVE, clip_skip=1, width_px=SIZE_PX, height_px=SIZE_PX, device=CPU)
    hooks: list = []
    control_set = ControlSet(tuple(controls), sdxl=bundle.family is ModelFamily.SDXL)

    def factory(sigmas, shape):
        hooks.append(control_set.hooks(sigmas, shape))
        return hooks[-1]

    latents = denoise(
        bundle, guidance, sampler_name=sampler, schedule_name="Karras", steps=steps, cfg_scale=CFG, seeds=[seed],
        shape=latent_shape(bundle, SIZE_PX, SIZE_PX), device=CPU, unet_kwargs_for=factory if controls else None,
    )
    return latents, hooks


def diffusers_latents(pipeline_class, bundle, image: Image.Image, control_modules: dict, **call_kwargs) -> torch.Tensor:
    """diffusers' own pipeline on ``bundle``'s modules, Euler/Karras from the same seeded noise as huabi."""
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       use_karras_sigmas=True)
    pipe = pipeline_class(
        vae=bundle.vae, text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0], unet=bundle.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        **control_modules,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(STEPS)
    sigma_max = float(pipe.scheduler.sigmas[0])
    generator = torch.Generator("cpu").manual_seed(SEED)
    noise = torch.randn(latent_shape(bundle, SIZE_PX, SIZE_PX), generator=generator)[None]
    start = noise * sigma_max / float(pipe.scheduler.init_noise_sigma)
    with torch.inference_mode():
        return pipe(PROMPT, image=image, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                    height=SIZE_PX, width=SIZE_PX, latents=start, generator=generator, output_type="latent",
                    **call_kwargs).images


@pytest.fixture(scope="module")
def sd1(tiny_sd1_file, tmp_path_factory):
    bundle = load_model(tiny_sd1_file)
    reference = make_controlnet(bundle.unet)
    path = tmp_path_factory.mktemp("cn") / "tiny_cn.safetensors"
    save_controlnet_original(reference, path)
    loaded = load_controlnet(path, base_family=bundle.family, unet_config=bundle.unet.config)
    return bundle, reference, loaded, path


def test_sd1_controlnet_matches_diffusers_pipeline(sd1):
    bundle, reference, loaded, _path = sd1
    image = control_image(1)
    ours, _ = huabi_latents(bundle, [prepared(loaded, image, weight=0.8)])

    theirs = diffusers_latents(StableDiffusionControlNetPipeline, bundle, image, {"controlnet": reference},
                               controlnet_conditioning_scale=0.8)
    plain, _ = huabi_latents(bundle)
    difference = relative_difference(ours, theirs)
    print(f"relative difference vs diffusers {difference:.2e}; control effect {relative_difference(ours, plain):.2e}")
    assert difference < RELATIVE_TOLERANCE
    assert relative_difference(ours, plain) > 1e-2  # the control matters


def test_weight_zero_is_exactly_no_control(sd1):
    bundle, _reference, loaded, _path = sd1
    plain, _ = huabi_latents(bundle)
    zero, hooks = huabi_latents(bundle, [prepared(loaded, control_image(1), weight=0.0)])
    assert torch.equal(plain, zero)
    assert hooks and all(not any(active) for _step, active in hooks[0].calls)


def test_other_control_image_changes_output(sd1):
    bundle, _reference, loaded, _path = sd1
    first, _ = huabi_latents(bundle, [prepared(loaded, control_image(1))])
    second, _ = huabi_latents(bundle, [prepared(loaded, control_image(2))])
    assert relative_difference(first, second) > 5e-4  # measured 2.1e-3; float noise is ~1e-6


def test_start_end_fractions_select_steps(sd1):
    bundle, _reference, loaded, _path = sd1
    # 6 steps: step s is active when 0.34 <= s/6 <= 0.7 -> s in {3, 4}.
    _latents, hooks = huabi_latents(bundle, [prepared(loaded, control_image(1), guidance_start=0.34, guidance_end=0.7)])
    active_steps = [step for step, active in hooks[0].calls if active[0]]
    assert active_steps == [3, 4]
    assert [step for step, _ in hooks[0].calls] == list(range(STEPS))
    # Second-order sampler: its extra call at the next sigma counts as that step.
    _latents, hooks = huabi_latents(bundle, [prepared(loaded, control_image(1), guidance_end=0.5)], sampler="Heun", steps=4)
    steps = [step for step, _ in hooks[0].calls]
    assert steps == [0, 1, 1, 2, 2, 3, 3]  # Heun: no second call on the last step (to sigma 0)
    assert [active[0] for _, active in hooks[0].calls] == [s <= 2 for s in steps]


def test_full_range_equals_unscheduled_and_end_zero_only_first_step(sd1):
    bundle, _reference, loaded, _path = sd1
    full, _ = huabi_latents(bundle, [prepared(loaded, control_image(1), guidance_start=0.0, guidance_end=1.0)])
    first_only, hooks = huabi_latents(bundle, [prepared(loaded, control_image(1), guidance_end=0.0)])
    assert [active[0] for _, active in hooks[0].calls] == [True] + [False] * (STEPS - 1)
    assert not torch.equal(full, first_only)


def test_control_modes(sd1):
    bundle, _reference, loaded, _path = sd1
    image = control_image(1)
    results = {mode: huabi_latents(bundle, [prepared(loaded, image, control_mode=mode)])[0] for mode in ControlMode}
    assert len({tuple(r.flatten()[:50].tolist()) for r in results.values()}) == 3
    # Soft injection: SD1's 13 scales 0.825**12 .. 1; SDXL keeps the first ten of those.
    sd1_scales = residual_scales(13, 1.0, ControlMode.PROMPT, sdxl=False)
    assert sd1_scales[-1] == 1.0 and sd1_scales[0] == pytest.approx(0.825**12)
    sdxl_scales = residual_scales(10, 2.0, ControlMode.CONTROL, sdxl=True)
    assert sdxl_scales == pytest.approx([2.0 * 0.825 ** (12 - i) for i in range(10)])
    assert residual_scales(6, 0.5, ControlMode.BALANCED, sdxl=False) == [0.5] * 6


def test_control_mode_controlnet_only_touches_positive_rows(sd1):
    """With CFG scale 1 only the positive rows run: "ControlNet is more important" then
    equals "My prompt is more important" (same soft scales, no negative rows to spare)."""
    bundle, _reference, loaded, _path = sd1
    image = control_image(1)
    guidance = encode_guidance(bundle, PROMPT, "", clip_skip=1, width_px=SIZE_PX, height_px=SIZE_PX, device=CPU)
    outputs = []
    for mode in (ControlMode.PROMPT, ControlMode.CONTROL):
        control_set = ControlSet((prepared(loaded, image, control_mode=mode),), sdxl=False)
        outputs.append(denoise(bundle, guidance, sampler_name="Euler", schedule_name="Karras", steps=3, cfg_scale=1.0,
                               seeds=[SEED], shape=latent_shape(bundle, SIZE_PX, SIZE_PX), device=CPU,
                               unet_kwargs_for=control_set.hooks))
    assert torch.equal(outputs[0], outputs[1])


def test_two_units_sum(sd1):
    bundle, _reference, loaded, _path = sd1
    both, hooks = huabi_latents(bundle, [prepared(loaded, control_image(1), weight=0.5),
                                         prepared(loaded, control_image(2), weight=0.5)])
    one, _ = huabi_latents(bundle, [prepared(loaded, control_image(1), weight=0.5)])
    assert len(hooks[0].controls) == 2
    assert relative_difference(both, one) > 1e-3


def test_original_layout_round_trip_is_bit_identical(sd1, tmp_path):
    _bundle, reference, loaded, path = sd1
    for key, tensor in reference.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[key]), key
    tensors, _config = read_controlnet_file(path)
    again = controlnet_to_original(loaded.state_dict(), loaded.config)
    assert tensors.keys() == again.keys()
    assert all(torch.equal(tensors[k], again[k]) for k in tensors)
    assert any(k.startswith("input_hint_block.") for k in tensors)
    assert any(k.startswith("zero_convs.") for k in tensors) and "middle_block_out.0.weight" in tensors
    # Written twice: the same bytes (and so the same sd-webui-controlnet hash).
    second = save_controlnet_original(loaded, tmp_path / "again.safetensors")
    assert second.read_bytes() == path.read_bytes()
    assert len(legacy_model_hash(path)) == 8


def test_diffusers_folder_and_bare_weights_load(sd1, tmp_path):
    bundle, reference, _loaded, _path = sd1
    folder = tmp_path / "cn_folder"
    reference.save_pretrained(folder)
    from_folder = load_controlnet(folder, base_family=bundle.family, unet_config=bundle.unet.config)
    bare = tmp_path / "bare.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, bare)
    from_bare = load_controlnet(bare, base_family=bundle.family, unet_config=bundle.unet.config)
    for module in (from_folder, from_bare):
        for key, tensor in reference.state_dict().items():
            assert torch.equal(tensor, module.state_dict()[key])


def test_wrong_family_is_one_line_error(sd1, tmp_path):
    bundle, _reference, _loaded, _path = sd1
    sdxl_parts = build_tiny_parts(ModelFamily.SDXL)
    sdxl_cn = make_controlnet(sdxl_parts.unet)
    path = tmp_path / "xl_cn.safetensors"
    save_controlnet_original(sdxl_cn, path)
    with pytest.raises(HuabiError, match=r"^ControlNet xl_cn: made for sdxl, the loaded model is sd1$"):
        load_controlnet(path, base_family=bundle.family, unet_config=bundle.unet.config)
    with pytest.raises(HuabiError, match="made for sd1, the loaded model is sdxl"):
        load_controlnet(_path, base_family=ModelFamily.SDXL, unet_config=sdxl_parts.unet.config)


def test_not_a_controlnet_errors(tiny_sd1_file, tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(HuabiError, match="is a checkpoint, not a ControlNet"):
        load_controlnet(tiny_sd1_file, base_family=ModelFamily.SD1, unet_config={})
    lora = tmp_path / "control-lora.safetensors"
    save_file({"lora_controlnet": torch.zeros(1)}, lora)
    with pytest.raises(HuabiError, match="control-lora files are not supported"):
        load_controlnet(lora, base_family=ModelFamily.SD1, unet_config={})
    with pytest.raises(HuabiError, match="no such file"):
        load_controlnet(tmp_path / "missing.safetensors", base_family=ModelFamily.SD1, unet_config={})


def test_sdxl_controlnet_runs(tiny_sdxl_file, tmp_path):
    bundle = load_model(tiny_sdxl_file)
    path = tmp_path / "xl_cn.safetensors"
    save_controlnet_original(make_controlnet(bundle.unet), path)
    loaded = load_controlnet(path, base_family=bundle.family, unet_config=bundle.unet.config)
    plain, _ = huabi_latents(bundle, steps=3)
    controlled, hooks = huabi_latents(bundle, [prepared(loaded, control_image(1))], steps=3)
    assert torch.isfinite(controlled).all()
    assert relative_difference(controlled, plain) > 1e-3
    assert all(active == (True,) for _, active in hooks[0].calls)


def test_fit_map_resize_modes():
    detected = np.zeros((20, 40, 3), dtype=np.float32)
    detected[:, :20] = 0.25
    detected[:, 20:] = 0.75
    just = fit_map(detected, 16, 16, ResizeMode.JUST_RESIZE)
    assert just.shape == (16, 16, 3)
    crop = fit_map(detected, 16, 16, ResizeMode.CROP_AND_RESIZE)
    assert crop.shape == (16, 16, 3)  # 40x20 scaled to 32x16, centre 16 columns kept
    assert crop[0, 0, 0] == pytest.approx(0.25) and crop[0, -1, 0] == pytest.approx(0.75)
    fill = fit_map(detected, 16, 16, ResizeMode.RESIZE_AND_FILL)
    assert fill.shape == (16, 16, 3)  # 40x20 scaled to 16x8 in the middle rows, margins the border median
    assert fill[0, 0, 0] == pytest.approx(0.5) and fill[8, 0, 0] == pytest.approx(0.25)


# ----------------------------------------------------------------------------- T2I-Adapter

def make_adapter(seed: int = 11):
    from diffusers import T2IAdapter

    adapter = T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=2, downscale_factor=8, adapter_type="full_adapter")
    return randomize_(adapter, torch.Generator().manual_seed(seed)).eval()


def adapter_to_original(state_dict, blocks: int) -> dict:
    """TencentARC's layout, written independently of huabi's converter: body.K = level * blocks + block."""
    original = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")[1:]  # drop "adapter."
        if parts[0] == "body" and parts[2] == "resnets":
            parts = ["body", str(int(parts[1]) * blocks + int(parts[3]))] + parts[4:]
        elif parts[0] == "body":  # in_conv of a level's first block
            parts = ["body", str(int(parts[1]) * blocks)] + parts[2:]
        original[".".join(parts)] = tensor.contiguous()
    return original


def test_t2i_adapter_original_file_matches_diffusers_adapter_pipeline(sd1, tmp_path):
    from diffusers import StableDiffusionAdapterPipeline
    from safetensors.torch import save_file

    from huabi.models.controlnet import load_control_model

    bundle, _reference, _loaded, _path = sd1
    adapter = make_adapter()
    path = tmp_path / "t2iadapter_tiny.safetensors"
    save_file(adapter_to_original(adapter.state_dict(), blocks=2), path)
    loaded = load_control_model(path, base_family=bundle.family, unet_config=bundle.unet.config)
    for key, tensor in adapter.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[key]), key
    image = control_image(3)
    ours, hooks = huabi_latents(bundle, [prepared(loaded, image, weight=0.7)])

    theirs = diffusers_latents(StableDiffusionAdapterPipeline, bundle, image, {"adapter": adapter},
                               adapter_conditioning_scale=0.7)
    plain, _ = huabi_latents(bundle)
    difference = relative_difference(ours, theirs)
    print(f"T2I-Adapter: relative difference vs diffusers {difference:.2e}; effect {relative_difference(ours, plain):.2e}")
    assert difference < RELATIVE_TOLERANCE
    assert relative_difference(ours, plain) > 1e-3
    assert len(hooks[0]._adapter_features) == 1  # the adapter ran once for the whole pass


def test_t2i_adapter_family_and_width_errors(sd1, tmp_path):
    from safetensors.torch import save_file

    from huabi.models.controlnet import load_control_model

    bundle, *_ = sd1
    path = tmp_path / "wide.safetensors"
    from diffusers import T2IAdapter

    wide = T2IAdapter(in_channels=3, channels=[64, 64], num_res_blocks=1, downscale_factor=8, adapter_type="full_adapter")
    save_file(adapter_to_original(wide.state_dict(), blocks=1), path)
    with pytest.raises(HuabiError, match=r"T2I-Adapter wide: widths \[64, 64\] do not fit the model's UNet \[32, 64\]"):
        load_control_model(path, base_family=bundle.family, unet_config=bundle.unet.config)
    folder = tmp_path / "xl_adapter"
    T2IAdapter(in_channels=3, channels=[32, 64, 64], num_res_blocks=1, downscale_factor=16,
               adapter_type="full_adapter_xl").save_pretrained(folder)
    with pytest.raises(HuabiError, match="T2I-Adapter xl_adapter: made for sdxl, the loaded model is sd1"):
        load_control_model(folder, base_family=bundle.family, unet_config=bundle.unet.config)


def test_original_layout_agrees_with_diffusers_single_file_converter(sd1):
    """diffusers' own original -> diffusers ControlNet conversion (an independent implementation)
    turns the file huabi wrote back into exactly the reference module's tensors."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors.torch import load_file

    _bundle, reference, _loaded, path = sd1
    converted = convert_controlnet_checkpoint(load_file(path), dict(reference.config))
    expected = reference.state_dict()
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)


@pytest.mark.parametrize("family, zero_convs", [("sd1", 12), ("sdxl", 9)])
def test_full_size_key_names(family, zero_convs):
    """The real files' numbering: SD1 has zero_convs 0..11, SDXL 0..8, hint convs 0..14, label_emb on SDXL."""
    from huabi.models.configs import REFERENCE_UNET_CONFIGS
    from huabi.models.controlnet import controlnet_key_table

    config = {k: v for k, v in REFERENCE_UNET_CONFIGS[family].items() if k not in ("up_block_types", "sample_size", "out_channels")}
    with torch.device("meta"):
        module = ControlNetModel(**config)
    original = controlnet_to_original(module.state_dict(), module.config)
    assert {f"zero_convs.{i}.0.weight" for i in range(zero_convs)} <= original.keys()
    assert f"zero_convs.{zero_convs}.0.weight" not in original
    assert {f"input_hint_block.{i}.weight" for i in range(0, 16, 2)} <= original.keys()
    assert "middle_block_out.0.weight" in original and "middle_block.1.proj_in.weight" in original
    assert ("label_emb.0.0.weight" in original) == (family == "sdxl")
    assert len(controlnet_key_table(module.config)) > 0


def test_global_pooling_yaml_makes_a_shuffle_model(sd1, tmp_path):
    """A sibling .yaml with global_average_pooling: True (ControlNet 1.1's shuffle) makes the module pool
    its residuals (diffusers' global_pool_conditions); huabi then applies them to the positive rows only."""
    bundle, reference, _loaded, path = sd1
    shuffle = tmp_path / "control_shuffle.safetensors"
    shuffle.write_bytes(path.read_bytes())
    shuffle.with_suffix(".yaml").write_text("model:\n  params:\n    control_stage_config:\n      params:\n"
                                            "        global_average_pooling: True\n")
    loaded = load_controlnet(shuffle, base_family=bundle.family, unet_config=bundle.unet.config)
    assert loaded.config.global_pool_conditions is True
    plain_config = load_controlnet(path, base_family=bundle.family, unet_config=bundle.unet.config).config
    assert plain_config.global_pool_conditions is False
    image = control_image(1)
    pooled, _ = huabi_latents(bundle, [prepared(loaded, image)])
    unpooled, _ = huabi_latents(bundle, [prepared(reference, image)])
    assert relative_difference(pooled, unpooled) > 1e-3
