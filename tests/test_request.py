import pytest

from huabi.core.request import GenerationRequest
from huabi.errors import HuabiError


def test_defaults_validate_and_canonicalise_names():
    req = GenerationRequest("a cat", sampler="dpm++ 2m", schedule="karras")
    assert req.sampler == "DPM++ 2M"
    assert req.schedule == "Karras"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sampler": "Eular"}, "sampler: unknown sampler 'Eular'; valid: Euler, Euler a"),
        ({"schedule": "Fancy"}, "schedule: unknown schedule type 'Fancy'; valid: Automatic"),
        ({"width_px": 500}, "width_px: must be a multiple of 8, got 500"),
        ({"height_px": 100000}, "height_px: must be from 8 to 8192"),
        ({"steps": 0}, "steps: must be from 1 to 1000, got 0"),
        ({"seed": -5}, "seed: must be -1 (random) or a whole number from 0 to 4294967295"),
        ({"seed": 2**32}, "seed: must be -1 (random) or a whole number from 0 to 4294967295"),
        ({"negative_prompt": "a\0b"}, "negative prompt: contains a NUL character"),
        ({"cfg_scale": -1}, "cfg_scale: must be a number from 0 to 100"),
        ({"batch_size": 0}, "batch_size: must be from 1 to 64"),
    ],
)
def test_bad_fields_are_named(kwargs, message):
    with pytest.raises(HuabiError) as err:
        GenerationRequest("a cat", **kwargs)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_nul_in_prompt_is_refused_up_front():
    with pytest.raises(HuabiError, match="^prompt: contains a NUL character, which an image's infotext cannot hold$"):
        GenerationRequest("a\0b")


def test_seed_resolution_and_per_image_seeds():
    req = GenerationRequest("x", seed=-1, batch_size=2, batch_count=2).with_resolved_seed()
    assert req.seed >= 0
    assert req.image_seeds() == [[req.seed, req.seed + 1], [req.seed + 2, req.seed + 3]]
