"""SD3/FLUX hires fix: the second pass follows the same documented rule as SD1/SDXL's.

README ("Hires fix"): the second pass runs exactly its S steps by A1111's "fixed steps" rule, the last S
of a schedule of ``int(S / min(strength, 0.999))`` steps (A1111's ``setup_img2img_steps`` with steps
given). Here the sigmas the engine's hires plan really feeds the transformer are recorded with a forward
pre-hook and compared with that rule computed by hand from S, the strength and the flow shift (SD3: 3;
FLUX dev: ``exp(mu)``, mu linear in the target's patch count, diffusers' ``calculate_shift`` defaults).
"""

from __future__ import annotations

import math

import pytest

from flow_fixtures import TinyFlowModel
from huabi.core.request import GenerationRequest
from huabi.models.transformer_families import TransformerFamily as F
from huabi.service.engine import Engine, Job

# The transformer sees float32 timesteps (FLUX: sigma; SD3: sigma * 1000) of float64 sigmas.
RELATIVE_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow_hires_steps")
    flux = TinyFlowModel(F.FLUX_DEV)
    flux.write_parts(root)
    flux.write_transformer(root / "flux1-dev-tiny.safetensors")
    TinyFlowModel(F.SD3_MEDIUM).write_all_in_one(root / "sd3-tiny.safetensors")
    return root


@pytest.fixture(scope="module")
def engine(models_dir):
    return Engine(device="cpu", dtype="fp32", models_dir=models_dir)


def shifted(sigma: float, shift: float) -> float:
    return shift * sigma / (1 + (shift - 1) * sigma)


def flux_dev_shift(width_px: int, height_px: int) -> float:
    patches = (width_px // 16) * (height_px // 16)
    mu = 0.5 + (patches - 256) * (1.15 - 0.5) / (4096 - 256)
    return math.exp(mu)


def fixed_steps_model_sigmas(steps: int, denoise: float, shift: float) -> list[float]:
    """The sigmas at which Euler calls the model in the second pass, by the README's rule."""
    if denoise == 0:
        return []
    length = int(steps / min(denoise, 0.999))
    # "Simple" schedule of `length` steps: linspace(1, 1/length, length), shifted, then 0.
    schedule = [shifted(1 - i / length, shift) for i in range(length)] + [0.0]
    return schedule[length - steps: length]  # the last `steps` steps (their start sigmas)


def recorded_sigmas(engine: Engine, request: GenerationRequest) -> list[float]:
    prepared = engine.prepare(Job(request))
    bundle = prepared.bundle
    seen: list[float] = []
    scale = 1.0 if bundle.family.is_flux else 1000.0  # SD3's transformer takes sigma * 1000

    def record(_module, _args, kwargs):
        seen.extend(float(t) / scale for t in kwargs["timestep"].flatten()[:1])

    handle = bundle.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        prepared.plan.run_batch(bundle, [request.seed], None, lambda _event: None, prepared.embeddings)
    finally:
        handle.remove()
    return seen


CASES = [(4, 0.5), (3, 0.7), (5, 0.35), (2, 1.0), (3, 0.0)]


@pytest.mark.parametrize("steps, denoise", CASES)
@pytest.mark.parametrize("model, size, scale", [("flux1-dev-tiny", 64, 2.0), ("sd3-tiny", 64, 1.5)])
def test_second_pass_sigmas_follow_the_fixed_steps_rule(engine, model, size, scale, steps, denoise):
    first_steps = 2
    request = GenerationRequest("a red apple", model=model, width_px=size, height_px=size, steps=first_steps,
                                sampler="Euler", seed=5, cfg_scale=1.0, hires=True, hires_scale=scale,
                                hires_steps=steps, hires_denoise=denoise)
    seen = recorded_sigmas(engine, request)
    target = int(size * scale)
    shift = flux_dev_shift(target, target) if model.startswith("flux") else 3.0
    expected = fixed_steps_model_sigmas(steps, denoise, shift)
    second = seen[first_steps:]
    assert len(second) == len(expected), (second, expected)  # exactly S steps (none at strength 0)
    for ours, ref in zip(second, expected):
        assert abs(ours - ref) <= RELATIVE_TOLERANCE * ref, (second, expected)


def test_hires_steps_zero_means_the_first_pass_steps(engine):
    request = GenerationRequest("a red apple", model="sd3-tiny", width_px=64, height_px=64, steps=3,
                                sampler="Euler", seed=5, cfg_scale=1.0, hires=True, hires_scale=1.5,
                                hires_steps=0, hires_denoise=0.6)
    second = recorded_sigmas(engine, request)[3:]
    expected = fixed_steps_model_sigmas(3, 0.6, 3.0)
    assert len(second) == 3 and all(abs(o - r) <= RELATIVE_TOLERANCE * r for o, r in zip(second, expected))
