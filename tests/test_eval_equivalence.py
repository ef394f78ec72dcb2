"""huabi.eval against the reference implementations, on the same inputs.

References (see tests/eval_reference.py for how they load without torchvision):
torch-fidelity 0.4.0 (Inception extractor, FID/KID/IS statistics), pytorch-fid 0.3.0
(calculate_frechet_distance), clean-fid 0.1.35 (frechet_distance, kernel_distance, the
"clean" resize), transformers (CLIPModel + CLIPImageProcessor).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from eval_reference import ReferenceLoader, clean_fid_modules, pytorch_fid_score, torch_fidelity_modules
from huabi.eval import metrics

REL = 1e-5


@pytest.fixture
def references():
    loader = ReferenceLoader()
    yield loader
    loader.close()


def correlated_features(n: int, dim: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return (rng.normal(size=(n, dim)) @ mixing + shift).astype(np.float32)


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("n_1,n_2,dim", [(300, 260, 48), (40, 50, 64)])  # well-conditioned; fewer images than dims
def test_fid_equals_pytorch_fid_clean_fid_and_torch_fidelity(references, n_1, n_2, dim):
    f_1, f_2 = correlated_features(n_1, dim, 1), correlated_features(n_2, dim, 2, shift=0.3)
    ours = metrics.fid_from_features(f_1, f_2)
    stats_1, stats_2 = metrics.feature_statistics(f_1), metrics.feature_statistics(f_2)

    pytorch_fid = pytorch_fid_score(references)
    mu_1, sigma_1 = np.mean(f_1, axis=0), np.cov(f_1, rowvar=False)  # pytorch-fid's own statistics
    mu_2, sigma_2 = np.mean(f_2, axis=0), np.cov(f_2, rowvar=False)
    assert ours == pytest.approx(pytorch_fid.calculate_frechet_distance(mu_1, sigma_1, mu_2, sigma_2), rel=REL)
    clean = clean_fid_modules(references)["fid"]
    assert ours == pytest.approx(clean.frechet_distance(stats_1.mu, stats_1.sigma, stats_2.mu, stats_2.sigma), rel=REL)
    if n_1 > dim and n_2 > dim:  # torch-fidelity takes eigenvalues instead of sqrtm: equal when non-singular
        fidelity = torch_fidelity_modules(references)["fid"]
        theirs = fidelity.fid_statistics_to_metric(fidelity.fid_features_to_statistics(torch.from_numpy(f_1)),
                                                   fidelity.fid_features_to_statistics(torch.from_numpy(f_2)), verbose=False)
        assert ours == pytest.approx(theirs[fidelity.KEY_METRIC_FID], rel=REL)


def test_kid_equals_torch_fidelity_with_its_subsets(references):
    fidelity = torch_fidelity_modules(references)
    f_1, f_2 = correlated_features(220, 32, 3), correlated_features(180, 32, 4, shift=0.2)
    ours = metrics.kernel_inception_distance(f_1, f_2, subsets=20, subset_size=100, seed=2020)
    kwargs = {**fidelity["defaults"].DEFAULTS, "kid_subsets": 20, "kid_subset_size": 100, "rng_seed": 2020, "verbose": False}
    theirs = fidelity["kid"].kid_features_to_metric(torch.from_numpy(f_1), torch.from_numpy(f_2), **kwargs)
    assert ours.mean == pytest.approx(theirs[fidelity["kid"].KEY_METRIC_KID_MEAN], rel=REL)
    assert ours.std == pytest.approx(theirs[fidelity["kid"].KEY_METRIC_KID_STD], rel=REL)
    assert ours.mean > 0


def test_kid_equals_clean_fid_with_the_same_subsets(references, monkeypatch):
    clean = clean_fid_modules(references)["fid"]
    f_1, f_2 = correlated_features(150, 24, 5), correlated_features(150, 24, 6, shift=0.5)
    # clean-fid draws from the global numpy RNG, Y subset first; one subset of everything makes the draws irrelevant
    theirs = clean.kernel_distance(f_1, f_2, num_subsets=1, max_subset_size=150)
    ours = metrics.kernel_inception_distance(f_1, f_2, subsets=1, subset_size=150)
    assert ours.mean == pytest.approx(theirs, rel=REL)


def test_inception_score_equals_torch_fidelity(references):
    isc = torch_fidelity_modules(references)["isc"]
    logits = np.random.default_rng(7).normal(scale=3.0, size=(250, 1008)).astype(np.float32)
    ours = metrics.inception_score(logits)
    theirs = isc.isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=True, rng_seed=2020)
    assert ours.mean == pytest.approx(theirs[isc.KEY_METRIC_ISC_MEAN], rel=REL)
    assert ours.std == pytest.approx(theirs[isc.KEY_METRIC_ISC_STD], rel=REL)
    assert ours.mean > 1.5


def test_clip_score_equals_the_torchmetrics_formula():
    rng = np.random.default_rng(8)
    text, image = rng.normal(size=(30, 16)), rng.normal(size=(30, 16))
    text_t, image_t = torch.from_numpy(text), torch.from_numpy(image)
    # torchmetrics' _clip_score_update: normalise, 100 * row-wise cosine, clamp at 0, mean
    expected = (100 * (text_t / text_t.norm(dim=-1, keepdim=True) * (image_t / image_t.norm(dim=-1, keepdim=True))).sum(-1)).clamp(min=0).mean()
    assert metrics.clip_score(text, image) == pytest.approx(float(expected), rel=REL)


# ---------------------------------------------------------------- extractors


def random_inception_file(path, seed: int = 0):
    """Random weights in the FID Inception's layout, scaled so activations stay O(1)."""
    from huabi.models.inception_fid import FIDInceptionV3

    generator = torch.Generator().manual_seed(seed)
    state = FIDInceptionV3().state_dict()
    for name, tensor in state.items():
        if not tensor.dtype.is_floating_point:
            continue
        if name.endswith("running_var"):
            tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
        elif name.endswith(("running_mean", "bn.bias")):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
        elif name.endswith("bn.weight"):
            tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.5)
        else:
            fan_in = tensor[0].numel() if tensor.dim() > 1 else 1
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * (1.0 / fan_in) ** 0.5)
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    return path


def random_images(count: int, size: tuple[int, int], seed: int, mode: str = "RGB") -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        smooth = Image.fromarray(rng.integers(0, 256, (size[1] // 4 + 1, size[0] // 4 + 1, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        images.append(smooth.convert(mode))
    return images


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    return random_inception_file(tmp_path_factory.mktemp("inception") / "random_inception.pth")


def test_inception_features_equal_torch_fidelity_on_the_same_weights(references, inception_file):
    from huabi.eval.extractors import load_extractor

    fidelity = torch_fidelity_modules(references)["inception"]
    theirs_model = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                        feature_extractor_weights_path=str(inception_file))
    extractor = load_extractor(inception_file, device="cpu", resize="tf1")
    images = random_images(3, (96, 72), 0)
    ours = extractor.embed(torch.stack([extractor.prepare(im) for im in images]))
    with torch.no_grad():
        pool, logits = theirs_model(torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]))
    assert float(pool.abs().mean()) > 1e-3 and float(pool.std()) > 1e-3  # the comparison is not of zeros
    np.testing.assert_allclose(ours[:, :2048], pool.numpy(), rtol=1e-4, atol=1e-5 * float(pool.abs().max()))
    np.testing.assert_allclose(ours[:, 2048:], logits.numpy(), rtol=1e-4, atol=1e-5 * float(logits.abs().max()))


def test_clean_resize_equals_clean_fid(references):
    from huabi.eval.preprocess import inception_input

    resize = clean_fid_modules(references)["resize"]
    theirs = resize.make_resizer("PIL", False, "bicubic", (299, 299))
    for image in random_images(2, (120, 90), 1):
        expected = theirs(np.array(image))  # [299, 299, 3] float in [0, 255]
        ours = inception_input(image, "clean").permute(1, 2, 0).numpy()
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


def test_torch_resize_is_pytorch_fids_bilinear():
    from huabi.eval.preprocess import inception_input

    image = random_images(1, (64, 64), 2)[0]
    pixels = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None] / 255
    # pytorch-fid: ToTensor ([0, 1]) -> F.interpolate(bilinear, align_corners=False) -> 2x - 1 inside its network;
    # ours stays in [0, 255] and maps with (x - 128) / 128, so compare the resized pixels
    expected = torch.nn.functional.interpolate(pixels, size=(299, 299), mode="bilinear", align_corners=False)[0] * 255
    torch.testing.assert_close(inception_input(image, "torch"), expected, rtol=1e-5, atol=1e-3)


def scaled_vit_b32_file(tmp_path, seed: int = 0):
    """A CLIPModel of ViT-B/32's shape scaled down (width 128 = 2 heads of 64, 2 layers, 32px patches,
    96px input), saved as one transformers-layout file and as a folder."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig.from_dict({
        "projection_dim": 64,
        "vision_config": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2,
                          "patch_size": 32, "image_size": 96, "hidden_act": "quick_gelu"},
        "text_config": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407},
    })
    model = CLIPModel(config).eval()
    from safetensors.torch import save_file

    file = tmp_path / "clip-vit-b32-scaled.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("position_ids")}, file)
    folder = tmp_path / "clip-folder"
    model.save_pretrained(folder)
    return model, file, folder


def test_clip_image_features_equal_transformers(tmp_path):
    from transformers import CLIPImageProcessor

    from huabi.eval.extractors import load_extractor

    reference, file, folder = scaled_vit_b32_file(tmp_path)
    processor = CLIPImageProcessor(size={"shortest_edge": 96}, crop_size={"height": 96, "width": 96})
    images = random_images(2, (130, 100), 3) + random_images(1, (80, 120), 4, mode="RGBA")
    with torch.no_grad():
        pixel_values = processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        expected = reference.get_image_features(pixel_values=pixel_values)
        expected = getattr(expected, "pooler_output", expected).numpy()
    for source in (file, folder):
        extractor = load_extractor(source, device="cpu")
        prepared = torch.stack([extractor.prepare(im) for im in images])
        torch.testing.assert_close(prepared, pixel_values, rtol=0, atol=1e-5)
        np.testing.assert_allclose(extractor.embed(prepared), expected, rtol=1e-5, atol=1e-5)


def test_clip_text_features_equal_transformers(tmp_path):
    from huabi.eval.extractors import load_extractor
    from huabi.models.clip_features import load_clip_tokenizer

    reference, file, _ = scaled_vit_b32_file(tmp_path)
    prompts = ["a red apple", "a cat wearing a hat, watercolor"]
    tokenizer = load_clip_tokenizer(None)
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids[0, 0] == 49406 and 49407 in ids[0].tolist()  # OpenAI CLIP's BOS/EOS
    with torch.no_grad():
        expected = reference.get_text_features(input_ids=ids)
        expected = getattr(expected, "pooler_output", expected).numpy()
    np.testing.assert_allclose(load_extractor(file, device="cpu").text_features(prompts), expected, rtol=1e-5, atol=1e-5)
