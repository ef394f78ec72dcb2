"""Two ControlNet units against diffusers' ``MultiControlNetModel`` (issue 22).

The older two-unit test only checks that a second unit changes the output. Here two different random
ControlNets with different control images and weights run in huabi (loaded from original-layout files
huabi wrote, as a user's would be) and in diffusers' ``StableDiffusionControlNetPipeline`` given the
list of both modules (which wraps them in ``MultiControlNetModel``: the units' down/mid residuals,
each times its conditioning scale, summed), from the same noise, sigmas (Euler, Karras), prompt and
CFG. Same tolerance as the one-unit comparison in test_controlnet.py (2e-5 relative to the largest
latent value).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionControlNetPipeline
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from huabi.models.controlnet import load_controlnet, save_controlnet_original
from test_controlnet import (
    RELATIVE_TOLERANCE,
    control_image,
    diffusers_latents,
    huabi_latents,
    make_controlnet,
    prepared,
    relative_difference,
    sd1,  # noqa: F401 - the tiny SD1 model with its first ControlNet (a module fixture)
)

WEIGHTS = (0.7, 0.45)


@pytest.fixture(scope="module")
def two_controlnets(sd1, tmp_path_factory):
    bundle, first_reference, first_loaded, _ = sd1
    second_reference = make_controlnet(bundle.unet, seed=9)
    path = tmp_path_factory.mktemp("cn2") / "tiny_cn_2.safetensors"
    save_controlnet_original(second_reference, path)
    second_loaded = load_controlnet(path, base_family=bundle.family, unet_config=bundle.unet.config)
    return bundle, (first_reference, second_reference), (first_loaded, second_loaded)


def test_two_units_match_diffusers_multicontrolnet(two_controlnets):
    bundle, references, loaded = two_controlnets
    images = (control_image(1), control_image(2))
    ours, hooks = huabi_latents(bundle, [prepared(model, image, weight=weight)
                                         for model, image, weight in zip(loaded, images, WEIGHTS)])
    assert len(hooks[0].controls) == 2
    pipe_modules = {"controlnet": MultiControlNetModel(list(references))}
    theirs = diffusers_latents(StableDiffusionControlNetPipeline, bundle, list(images), pipe_modules,
                               controlnet_conditioning_scale=list(WEIGHTS))
    first_only, _ = huabi_latents(bundle, [prepared(loaded[0], images[0], weight=WEIGHTS[0])])
    difference = relative_difference(ours, theirs)
    second_effect = relative_difference(ours, first_only)
    print(f"two units vs diffusers MultiControlNetModel: {difference:.2e}; second unit's effect {second_effect:.2e}")
    assert second_effect > 1e-2  # the second unit matters, so a dropped or replaced unit fails
    assert difference < RELATIVE_TOLERANCE
