"""Inpainting and outpainting on tiny random-weight SD1 models (base and 9-channel inpainting)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from huabi.core.masks import blur_mask, bounding_box, crop_region, fill_masked, latent_mask, outpaint_mask
from huabi.core.request import EditOptions, GenerationRequest, parse_outpaint
from huabi.errors import HuabiError
from huabi.models.family import ModelFamily, UNetVariant
from huabi.models.load import load_model
from huabi.pipelines.inpaint import KeepUnmaskedDenoiser, inpaint, outpaint_canvas
from test_img2img import gradient_image

CPU = torch.device("cpu")
REQUEST = GenerationRequest(prompt="a red apple", steps=3, sampler="Euler a", cfg_scale=5.0, seed=3)


@pytest.fixture(scope="module")
def bundle(tiny_sd1_file):
    return load_model(tiny_sd1_file, device=CPU, dtype=torch.float32, compute_hash=False)


@pytest.fixture(scope="module")
def inpaint_bundle(tiny_model_factory):
    path = tiny_model_factory(ModelFamily.SD1, UNetVariant.INPAINT)
    return load_model(path, device=CPU, dtype=torch.float32, compute_hash=False)


def square_mask(size: int = 64, box: tuple[int, int, int, int] = (24, 24, 40, 40)) -> Image.Image:
    array = np.zeros((size, size), dtype=np.uint8)
    left, top, right, bottom = box
    array[top:bottom, left:right] = 255
    return Image.fromarray(array)


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def outside(mask_image: Image.Image) -> np.ndarray:
    return np.asarray(mask_image) == 0


@pytest.mark.parametrize("content", ["original", "fill", "latent noise", "latent nothing"])
def test_pixels_outside_blurred_mask_are_the_input(bundle, content):
    image = gradient_image()
    options = EditOptions("x.png", denoising_strength=0.9, mask_image="m.png", mask_blur_px=2, masked_content=content)
    result = inpaint(bundle, REQUEST, image, square_mask(), [3, 4], options, device=CPU)
    keep = outside(result.mask)
    assert keep.sum() > 0.5 * keep.size  # the blurred square still leaves most of the image kept
    for final in result.images:
        assert final.size == image.size
        assert np.array_equal(arr(final)[keep], arr(image)[keep])  # exact
        inside = np.asarray(square_mask()) == 255
        assert np.abs(arr(final)[inside] - arr(image)[inside]).mean() > 2  # something was repainted


def test_only_masked_area_and_inverted_mask(bundle):
    image = gradient_image()
    options = EditOptions("x.png", denoising_strength=0.8, mask_image="m.png", mask_blur_px=0,
                          inpaint_area="masked", padding_px=4)
    result = inpaint(bundle, REQUEST, image, square_mask(), [3], options, device=CPU, working_size=(64, 64))
    keep = outside(result.mask)
    assert np.array_equal(arr(result.images[0])[keep], arr(image)[keep])
    assert not np.array_equal(arr(result.images[0]), arr(image))
    inverted = EditOptions("x.png", denoising_strength=0.8, mask_image="m.png", mask_blur_px=0, invert_mask=True)
    result = inpaint(bundle, REQUEST, image, square_mask(), [3], inverted, device=CPU)
    centre = np.asarray(square_mask()) == 255
    assert np.array_equal(arr(result.images[0])[centre], arr(image)[centre])


def test_inpainting_checkpoint_gets_mask_channels(inpaint_bundle):
    image = gradient_image()
    options = EditOptions("x.png", denoising_strength=1.0, mask_image="m.png", mask_blur_px=4)
    result = inpaint(inpaint_bundle, REQUEST, image, square_mask(), [3], options, device=CPU)
    keep = outside(result.mask)
    assert np.array_equal(arr(result.images[0])[keep], arr(image)[keep])
    assert not np.array_equal(arr(result.images[0]), arr(image))


def test_keep_unmasked_denoiser_reimposes_init_latent():
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 2:5] = 1
    wrapped = KeepUnmaskedDenoiser(lambda x, sigma: x * 0 + 7.0, init, mask)
    out = wrapped(torch.zeros(1, 4, 8, 8), torch.tensor([1.0]))
    assert torch.equal(out[..., 2:5, 2:5], torch.full((1, 4, 3, 3), 7.0))
    assert torch.equal(out * (1 - mask), init * (1 - mask))


def test_outpaint_keeps_original_and_fills_new_area(bundle):
    image = gradient_image(64, 32)
    options = EditOptions("x.png", denoising_strength=1.0, outpaint=parse_outpaint("left=16,down=32"),
                          mask_blur_px=2, masked_content="fill")
    canvas, mask = outpaint_canvas(image, options, seed=3)
    assert canvas.size == (80, 64)
    assert np.array_equal(arr(canvas)[0:32, 16:80], arr(image))
    result = inpaint(bundle, REQUEST, canvas, mask, [3], options, device=CPU)
    final = arr(result.images[0])
    # Original preserved beyond the overlap (8 px) plus the blur's reach (2.5 * 2 px).
    assert np.array_equal(final[0:32 - 14, 16 + 14:80], arr(image)[0:18, 14:64])
    new_area = final[32:, :]
    assert new_area.std() > 3 and new_area.mean() > 3  # not blank


def test_outpaint_noise_fill(bundle):
    options = EditOptions("x.png", outpaint=(0, 8, 0, 0), masked_content="latent noise")
    canvas, mask = outpaint_canvas(gradient_image(), options, seed=1)
    assert canvas.size == (72, 64)
    assert arr(canvas)[:, 64:].std() > 20  # seeded noise pixels
    assert np.asarray(mask)[:, 56:].min() == 255 and np.asarray(mask)[:, :56].max() == 0


def test_mask_maths():
    mask = torch.zeros(32, 32)
    mask[10:14, 20:22] = 1
    assert bounding_box(mask) == (20, 10, 22, 14)
    assert bounding_box(torch.zeros(4, 4)) is None
    blurred = blur_mask(mask, 2)
    assert blurred.max() < 1 and blurred[0, 0] == 0 and bounding_box(blurred) == (15, 5, 27, 19)
    edge = torch.zeros(16, 16)
    edge[:, :10] = 1  # wider than the kernel reaches (8 px at sigma 3)
    assert blur_mask(edge, 3)[:, 0].min() > 0.99  # touching the border stays on there
    region = crop_region(mask, 2, 64, 64)
    assert region[2] - region[0] == region[3] - region[1]  # square like the working size
    assert region[0] <= 18 and region[2] >= 24
    image = torch.zeros(3, 16, 16)
    image[0] = 0.5
    hole = torch.zeros(16, 16)
    hole[4:12, 4:12] = 1
    filled = fill_masked(image, hole)
    assert torch.allclose(filled[0, 4:12, 4:12], torch.full((8, 8), 0.5), atol=1e-4)
    assert torch.equal(filled[:, :4], image[:, :4])
    assert latent_mask(hole, 2, 2).flatten().tolist() == [0.0, 0.0, 0.0, 0.0]
    assert latent_mask(hole, 4, 4)[0, 0, 1:3, 1:3].min() == 1
    assert outpaint_mask(24, 8, (8, 0, 24, 8), 4)[:, :12].min() == 1


def test_bad_inputs(bundle):
    with pytest.raises(HuabiError, match=r"^mask: nothing to inpaint: the mask is all black"):
        inpaint(bundle, REQUEST, gradient_image(), Image.new("L", (64, 64)), [3],
                EditOptions("x.png", mask_image="m.png"), device=CPU)
    with pytest.raises(HuabiError, match=r"^mask: size 32x32 differs from the image's 64x64$"):
        inpaint(bundle, REQUEST, gradient_image(), Image.new("L", (32, 32), 255), [3],
                EditOptions("x.png", mask_image="m.png"), device=CPU)
    with pytest.raises(HuabiError, match=r"^denoising strength: must be from 0 to 1, got -0.1$"):
        EditOptions("x.png", denoising_strength=-0.1)
    with pytest.raises(HuabiError, match=r"^masked content: unknown 'blur'"):
        EditOptions("x.png", masked_content="blur")
    with pytest.raises(HuabiError, match=r"^inpaint area: unknown 'all'; valid: whole, masked$"):
        EditOptions("x.png", inpaint_area="all")
    with pytest.raises(HuabiError, match=r"^outpaint left: must be a multiple of 8, got 10$"):
        EditOptions("x.png", outpaint=(10, 0, 0, 0))
    with pytest.raises(HuabiError, match=r"^outpaint: every side is 0; nothing to extend$"):
        EditOptions("x.png", outpaint=(0, 0, 0, 0))
    with pytest.raises(HuabiError, match=r"^outpaint: expected side=pixels with sides left, right, up, down, got 'top=8'$"):
        parse_outpaint("top=8")
    with pytest.raises(HuabiError, match=r"^outpaint right: must be a whole number of pixels, got 'x'$"):
        parse_outpaint("right=x")
    with pytest.raises(HuabiError, match=r"^mask_blur: must be from 0 to 256, got -1$"):
        EditOptions("x.png", mask_blur_px=-1)
